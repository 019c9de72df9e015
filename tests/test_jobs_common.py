"""Job plumbing that needs no cluster: safe output paths, threshold fallback, atomic writes."""

from __future__ import annotations

import json

import pytest

from jobs.common import RunLayout, atomic_write_text, safe_name
from jobs.tune_thresholds import load_thresholds


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
