"""Tuning and scoring apply the preprocessing the classifier checkpoint records (issue 18 item 3),
and the pipeline runs end to end with --pixel-mm on a tiny phantom cohort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg_core.cams import CamEngine
from wsseg_core.data import load_study
from wsseg_core.inference import volume_cams
from wsseg_core.metrics import dice
from wsseg_core.models import build_slice_classifier, load_classifier, save_classifier
from wsseg_core.segment import segment_volume

pytestmark = pytest.mark.usefixtures("two_torch_threads")

# 64 x 2.04 mm = 130.6 mm -> 32 pixels of 4 mm on a 64-pixel canvas: half of it padding, where a
# resized slice would fill all of it.
PIXEL_MM = 4.0


def _classifier(path, pixel_mm):
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small", pixel_mm=pixel_mm)
    save_classifier(path, model, pre)
    return path


def _expected_cam_mask(classifier, study, t, q, z):
    """Algorithm 1 by hand: the checkpoint's preprocessor, its geometry's CAM -> voxel map."""
    model, pre, _ = load_classifier(classifier)
    geo = pre.geometry(study.suv, study.ct, study.spacing_mm)
    cams = volume_cams(CamEngine(model), pre, study.suv, study.ct, z, ["CAM"], geometry=geo)["CAM"]
    return segment_volume(study.suv, z, cams, t, q, cam_index=geo.cam_index(*cams.shape[1:]))


def test_scoring_uses_the_checkpoints_preprocessing(scoring_layout):
    from jobs.score_cohort import StudyMasker

    layout, ref = scoring_layout
    resized = layout.classifier.with_name("resized.pt")
    layout.classifier.replace(resized)  # the fixture's classifier (mode "resize"), kept aside
    _classifier(layout.classifier, PIXEL_MM)
    assert torch.load(layout.classifier, weights_only=True)["preprocessor"]["mode"] == "resample_mm"
    th = {"CAM": {"t": 0.3, "q": 40.0}}
    # flag threshold 0: every slice flagged, so the mask depends on the CAMs alone
    got = StudyMasker(th, str(layout.out), methods=["CAM"], cam_batch_size=16,
                      flag_threshold=0.0).masks(ref).masks["CAM"]
    study = load_study(ref)
    z = np.arange(study.suv.shape[2])
    want = _expected_cam_mask(layout.classifier, study, 0.3, 40.0, z)
    assert got.shape == study.suv.shape and want.any()
    np.testing.assert_array_equal(got, want)
    # the same weights read as a resize checkpoint give other masks: the test can tell them apart
    model, pre, _ = load_classifier(layout.classifier)
    pre.mode, pre.pixel_mm = "resize", None
    save_classifier(resized, model, pre)
    assert not np.array_equal(_expected_cam_mask(resized, study, 0.3, 40.0, z), want)


def test_tuning_cache_counts_the_resampled_cams(tmp_path):
    from jobs.tune_thresholds import cache_study_cams
    from wsseg_core.gridcache import GridCache, cache_dice_grid
    from wsseg_core.phantom import write_phantom_cohort

    out = tmp_path / "run"
    _classifier(out / "models" / "classifier.pt", PIXEL_MM)
    ref = write_phantom_cohort(tmp_path / "cohort", n=1, shape=(48, 48, 12), seed=4,
                               negative_fraction=0.0)[0]
    ts, qs = [0.2, 0.5], [30.0, 60.0]
    f = cache_study_cams(ref.to_dict(), str(out), cam_batch_size=16, flag_threshold=0.0,
                         t_grid=ts, q_grid=qs)
    with np.load(f) as c:
        cache = GridCache.from_arrays(dict(c))
    # CAMs of the 64-pixel canvas at map stride 4 (16x16), not of the 48-voxel slice (12x12)
    assert cache.cams["CAM"].shape[1:] == (16, 16)
    study = load_study(ref)
    z = np.asarray(cache.flagged_z)
    want = [[dice(_expected_cam_mask(out / "models" / "classifier.pt", study, t, q, z), study.seg)
             for q in qs] for t in ts]
    assert np.isfinite(want).all() and np.ptp(want) > 0
    np.testing.assert_allclose(cache_dice_grid(cache, "CAM", ts, qs), want, atol=1e-12)


@pytest.mark.slow
def test_pipeline_runs_with_pixel_mm(tmp_path, ray_cluster):
    from jobs import pipeline
    from wsseg_core.phantom import write_phantom_cohort

    write_phantom_cohort(tmp_path / "cohort", n=6, shape=(48, 48, 24), seed=5)
    out = tmp_path / "out"
    run = pipeline.main(["--cohort", str(tmp_path / "cohort"), "--out", str(out), "--epochs", "1",
                         "--methods", "CAM", "--pixel-mm", str(PIXEL_MM), "--allow-weak-classifier"])
    assert run["studies"]["failed"] == 0 and run["studies"]["ok"] >= 1
    _, pre, _ = load_classifier(out / "models" / "classifier.pt")
    assert (pre.mode, pre.pixel_mm, pre.input_size) == ("resample_mm", PIXEL_MM, 64)
    masks = sorted((out / "masks").rglob("*.nii.gz"))
    assert masks
    import nibabel as nib

    assert all(nib.load(str(m)).shape == (48, 48, 24) for m in masks)  # the native grid
    from wsseg_core.thresholds import load_thresholds

    assert 0.0 <= load_thresholds(out / "thresholds.json")["CAM"]["t"] <= 1.0  # tuned on the canvas CAMs
