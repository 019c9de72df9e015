"""Job plumbing that needs no cluster: safe output paths, threshold fallback, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.common import RunLayout, atomic_write_text, safe_name
from wsseg_core.thresholds import load_thresholds


@pytest.mark.parametrize("ident,expected", [
    ("PETCT_0001", "PETCT_0001"),
    ("08-12-2002-NA-PET-CT Ganzkoerper  primaer mit KM-10445", "08-12-2002-NA-PET-CT_Ganzkoerper_primaer_mit_KM-10445"),
    ("../../etc/passwd", "etc_passwd"),
    ("a/b\\c", "a_b_c"),
])
def test_safe_name_keeps_ids_inside_their_folder(ident, expected):
    assert safe_name(ident) == expected


@pytest.mark.parametrize("ident", ["..", ".", "", "///"])
def test_safe_name_rejects_names_that_are_only_dots_or_separators(ident):
    with pytest.raises(ValueError):
        safe_name(ident)


def test_mask_paths_stay_under_out(tmp_path):
    layout = RunLayout(tmp_path)
    rel = layout.mask("GradCAM++", "../../x", "../y z")
    assert not rel.is_absolute()
    assert (tmp_path / rel).resolve().is_relative_to(tmp_path.resolve())
    assert rel.as_posix() == "masks/GradCAMpp/x/y_z.nii.gz"


def test_thresholds_default_to_the_paper_and_tuned_values_win(tmp_path):
    paper = load_thresholds(None)
    assert paper["CAM"]["t"] == 0.3 and paper["CAM"]["q"] == 31.0
    assert paper["ScoreCAM"]["t"] == 0.4 and paper["GradCAM"]["q"] == 35.0
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"methods": {"CAM": {"t": 0.5, "q": 40.0, "val_dice": 0.6}}}))
    tuned = load_thresholds(path)
    assert tuned["CAM"] == {"t": 0.5, "q": 40.0, "val_dice": 0.6, "source": "tuned"}
    assert tuned["GradCAM"]["source"] == "paper"


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "run.json", "{}\n")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["run.json"]


def test_failure_text_recognises_study_errors_by_type_not_by_name():
    """A StudyError (and its subclasses) already names the file; any other exception, even one
    that happens to be called StudyError, is unexpected and gets the SUV path and its type."""
    from jobs.score_cohort import _failure_text
    from wsseg_core.data import StudyError, StudyRef

    ref = StudyRef(patient_id="p", study_id="s", suv_path="/d/SUV.nii.gz", ct_path="/d/CT.nii.gz",
                   seg_path=None)

    class Truncated(StudyError):
        pass

    class Impostor(Exception):
        pass

    Impostor.__name__ = "StudyError"
    assert _failure_text(ref, StudyError("/d/SUV.nii.gz", "corrupt")) == "/d/SUV.nii.gz: corrupt"
    assert _failure_text(ref, Truncated("/d/SUV.nii.gz", "truncated")) == "/d/SUV.nii.gz: truncated"
    assert _failure_text(ref, Impostor("boom")) == "/d/SUV.nii.gz: StudyError: boom"
    assert _failure_text(ref, ValueError("boom")) == "/d/SUV.nii.gz: ValueError: boom"


def test_paper_preset_without_imagenet_weights_stops_before_anything_runs(tmp_path, monkeypatch):
    """`jobs.pipeline --preset paper` offline: exit with the how-to message, nothing written, no Ray;
    `--weights random` and a local weights file are the two ways on (issue 18, item 4)."""
    import torchvision.models._api as tv_api
    from torchvision.models import vgg16

    from jobs import pipeline
    from jobs.train_classifier import resolve_weights, weights_arg

    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--preset", "paper", "--out", str(out)])
    assert "ImageNet VGG16 weights could not be fetched" in str(err.value.code)
    assert "--weights random" in str(err.value.code)
    assert not out.exists()
    # the ways on
    assert weights_arg("random") is None and weights_arg("none") is None
    assert resolve_weights(weights_arg("random"), "paper") is None
    assert resolve_weights("imagenet", "small") is None  # width 1/8: no pretrained weights exist
    local = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg16().state_dict(), local)
    assert resolve_weights(str(local), "paper") == str(local)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve_weights(str(tmp_path / "missing.pth"), "paper")


def test_load_labelled_study_skips_bad_and_unlabelled_studies(tmp_path, caplog):
    """The stages that learn or tune from labelled studies leave a bad one out with a log line
    naming it and the problem, and an unlabelled one out silently."""
    import logging

    from jobs.common import load_labelled_study
    from wsseg_core.data import StudyRef
    from wsseg_core.phantom import write_phantom_cohort

    ref = write_phantom_cohort(tmp_path / "c", n=1, shape=(24, 24, 8), seed=3)[0]
    got = load_labelled_study(ref.to_dict(), "tuning")
    assert got is not None and got[0] == ref and got[1].seg.shape == (24, 24, 8)
    assert load_labelled_study(StudyRef(**{**ref.to_dict(), "seg_path": None}), "tuning") is None
    broken = tmp_path / "SUV.nii.gz"
    broken.write_bytes(b"not a nifti")
    with caplog.at_level(logging.WARNING, logger="wsseg"):
        assert load_labelled_study(StudyRef(**{**ref.to_dict(), "suv_path": str(broken)}), "tuning") is None
    assert f"tuning skips {ref.patient_id}/{ref.study_id}: {broken}" in caplog.text


def test_map_stride_option_reaches_the_fit_keywords_only_when_set():
    """`--map-stride 4` (16x16 CAMs in the small preset) travels to `fit`; left unset, the fit
    keywords carry no `map_stride`, so runs trained before the option keep their fingerprint."""
    from jobs import pipeline
    from jobs.common import PIPELINE_PRESETS
    from jobs.train_classifier import build_parser, classifier_recipe

    small, paper = PIPELINE_PRESETS["small"], PIPELINE_PRESETS["paper"]
    assert "map_stride" not in classifier_recipe(paper)  # paper runs keep their fingerprint
    # the small model preset's 16x16 CAMs (dilated stride 4) enter the small preset's fit config
    assert classifier_recipe(small)["map_stride"] == 4 and classifier_recipe(small)["atrous"] is True
    assert classifier_recipe(small, map_stride=4)["map_stride"] == 4
    # stride 4 also says whether it dilates, so dilated and plain runs have different fingerprints
    assert classifier_recipe(small, map_stride=4)["atrous"] is True
    assert classifier_recipe(small, map_stride=4, atrous=False)["atrous"] is False
    assert "atrous" not in classifier_recipe(small, map_stride=8)
    with pytest.raises(ValueError, match="atrous"):
        classifier_recipe(small, map_stride=8, atrous=True)
    assert pipeline.build_parser().parse_args(["--out", "x", "--no-atrous"]).atrous is False
    assert build_parser().parse_args(["--cohort", "c", "--out", "x"]).atrous is None
    assert pipeline.build_parser().parse_args(["--out", "x", "--map-stride", "4"]).map_stride == 4
    assert build_parser().parse_args(["--cohort", "c", "--out", "x"]).map_stride is None
    with pytest.raises(SystemExit):  # only the strides the network has
        pipeline.build_parser().parse_args(["--out", "x", "--map-stride", "2"])


def test_patience_start_enters_the_small_preset_fit_keywords_only():
    """The small preset's "half_lr" patience start (README, "classifier recipe") is a fit keyword,
    so it enters the run fingerprint and a run trained before it retrains; the paper preset, which
    sets none, keeps its keywords (and fingerprint) unchanged."""
    from jobs.common import PIPELINE_PRESETS
    from jobs.ray_train import run_fingerprint
    from jobs.train_classifier import classifier_recipe

    small, paper = PIPELINE_PRESETS["small"], PIPELINE_PRESETS["paper"]
    assert classifier_recipe(small)["patience_start"] == "half_lr"
    assert "patience_start" not in classifier_recipe(paper)
    without = {k: v for k, v in classifier_recipe(small).items() if k != "patience_start"}
    fp = lambda c: run_fingerprint({"epochs": small["epochs"], **c}, metric="val_auc", mode="max")["digest"]
    assert fp(classifier_recipe(small)) != fp(without)
