"""MIP-CAM is scored in the same pass as the CAM methods (issue 5), without Ray."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from jobs.common import RunLayout


def test_scorer_scores_mipcam_next_to_cam_methods(tmp_path):
    from jobs.score_cohort import MODEL_METHODS, StudyScorer, default_methods
    from jobs.tune_thresholds import load_thresholds, update_thresholds
    from wsseg_core.mipcam import build_mipcam, save_mipcam
    from wsseg_core.models import build_slice_classifier, save_classifier
    from wsseg_core.phantom import write_phantom_cohort

    torch.manual_seed(0)
    refs = write_phantom_cohort(tmp_path / "cohort", n=1, shape=(64, 64, 24), seed=2, negative_fraction=0.0)
    layout = RunLayout(tmp_path / "out")
    model, pre = build_slice_classifier("small")
    save_classifier(layout.classifier, model, pre)
    assert "MIP-CAM" not in default_methods(layout.out)
    save_mipcam(layout.model(MODEL_METHODS["MIP-CAM"].checkpoint), build_mipcam("small"))
    assert default_methods(layout.out)[-1] == "MIP-CAM"
    update_thresholds(layout.thresholds, {"MIP-CAM": {"t": 0.2, "q": 30.0, "distance_weight": 0.01}})

    scorer = StudyScorer(load_thresholds(layout.thresholds), str(layout.out),
                         methods=["CAM", "MIP-CAM"], cam_batch_size=16)
    rows = scorer.score(**refs[0].to_dict())
    assert [r["method"] for r in rows] == ["CAM", "MIP-CAM"]
    row = rows[1]
    assert row["status"] == "ok", row.get("error")
    assert row["t_m"] == 0.2 and row["q_m"] == 30.0  # the tuned values travel with the rows
    mask_img = nib.load(layout.out / row["mask_path"])
    suv_img = nib.load(refs[0].suv_path)
    assert mask_img.shape == suv_img.shape and np.allclose(mask_img.affine, suv_img.affine)
    assert mask_img.get_data_dtype() == np.uint8
    pred = np.asarray(mask_img.dataobj) > 0
    assert row["mtv_pred_ml"] == pytest.approx(pred.sum() * row["voxel_volume_ml"])


def test_score_refuses_untuned_mipcam(tmp_path):
    from jobs.score_cohort import score
    from jobs.tune_thresholds import load_thresholds

    with pytest.raises(ValueError, match="MIP-CAM"):
        score([], tmp_path, load_thresholds(None), methods=["CAM", "MIP-CAM"])
