"""MIP-CAM is scored in the same pass as the CAM methods (issue 5), without Ray."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch


def test_scorer_scores_mipcam_next_to_cam_methods(scoring_layout):
    from jobs.score_cohort import MODEL_METHODS, StudyScorer, default_methods
    from wsseg_core.thresholds import load_thresholds, update_thresholds
    from wsseg_core.mipcam import build_mipcam, save_mipcam

    layout, ref = scoring_layout
    torch.manual_seed(0)
    assert "MIP-CAM" not in default_methods(layout.out)
    save_mipcam(layout.model(MODEL_METHODS["MIP-CAM"].checkpoint), build_mipcam("small"))
    assert default_methods(layout.out)[-1] == "MIP-CAM"
    update_thresholds(layout.thresholds, {"MIP-CAM": {"t": 0.2, "q": 30.0, "distance_weight": 0.01}})

    scorer = StudyScorer(load_thresholds(layout.thresholds), str(layout.out),
                         methods=["CAM", "MIP-CAM"], cam_batch_size=16)
    rows = scorer.score(**ref.to_dict())
    assert [r["method"] for r in rows] == ["CAM", "MIP-CAM"]
    row = rows[1]
    assert row["status"] == "ok", row.get("error")
    assert row["t_m"] == 0.2 and row["q_m"] == 30.0  # the tuned values travel with the rows
    mask_img = nib.load(layout.out / row["mask_path"])
    suv_img = nib.load(ref.suv_path)
    assert mask_img.shape == suv_img.shape and np.allclose(mask_img.affine, suv_img.affine)
    assert mask_img.get_data_dtype() == np.uint8
    pred = np.asarray(mask_img.dataobj) > 0
    # the voxel volume from the SUV header's zooms (mm), not the row's own voxel_volume_ml
    voxel_ml = float(np.prod(suv_img.header.get_zooms()[:3])) / 1000.0
    assert row["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert row["mtv_pred_ml"] == pytest.approx(pred.sum() * voxel_ml)


def test_score_refuses_untuned_mipcam(tmp_path):
    from jobs.score_cohort import score
    from wsseg_core.thresholds import load_thresholds

    with pytest.raises(ValueError, match="MIP-CAM"):
        score([], tmp_path, load_thresholds(None), methods=["CAM", "MIP-CAM"])
