"""The supervised U-Net is scored in the same pass as the CAM methods (issue 4), without Ray."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch


def test_scorer_scores_unet_next_to_cam_methods(scoring_layout):
    from jobs.score_cohort import StudyScorer, default_methods
    from wsseg_core.thresholds import load_thresholds
    from wsseg_core.unet import build_unet, save_unet

    layout, ref = scoring_layout
    torch.manual_seed(0)
    assert "UNet" not in default_methods(layout.out)
    unet, upre = build_unet("small")
    save_unet(layout.unet, unet, upre)
    assert default_methods(layout.out)[-1] == "UNet"

    scorer = StudyScorer(load_thresholds(None), str(layout.out),
                         methods=["CAM", "UNet"], cam_batch_size=16)
    rows = scorer.score(**ref.to_dict())
    assert [r["method"] for r in rows] == ["CAM", "UNet"]
    unet_row = rows[1]
    assert unet_row["status"] == "ok", unet_row.get("error")
    assert unet_row["t_m"] is None and unet_row["q_m"] is None  # no thresholds for a supervised net
    mask_img = nib.load(layout.out / unet_row["mask_path"])
    suv_img = nib.load(ref.suv_path)
    assert mask_img.shape == suv_img.shape and np.allclose(mask_img.affine, suv_img.affine)
    pred = np.asarray(mask_img.dataobj) > 0
    # the voxel volume from the SUV header's zooms (mm), not the row's own voxel_volume_ml
    voxel_ml = float(np.prod(suv_img.header.get_zooms()[:3])) / 1000.0
    assert unet_row["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert unet_row["mtv_pred_ml"] == pytest.approx(pred.sum() * voxel_ml)
