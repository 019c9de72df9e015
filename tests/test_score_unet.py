"""The supervised U-Net is scored in the same pass as the CAM methods (issue 4), without Ray."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from jobs.common import RunLayout


def test_scorer_scores_unet_next_to_cam_methods(tmp_path):
    from jobs.score_cohort import StudyScorer, default_methods
    from jobs.tune_thresholds import load_thresholds
    from wsseg_core.models import build_slice_classifier, save_classifier
    from wsseg_core.phantom import write_phantom_cohort
    from wsseg_core.unet import build_unet, save_unet

    torch.manual_seed(0)
    refs = write_phantom_cohort(tmp_path / "cohort", n=1, shape=(64, 64, 24), seed=2, negative_fraction=0.0)
    layout = RunLayout(tmp_path / "out")
    model, pre = build_slice_classifier("small")
    save_classifier(layout.classifier, model, pre)
    assert "UNet" not in default_methods(layout.out)
    unet, upre = build_unet("small")
    save_unet(layout.unet, unet, upre)
    assert default_methods(layout.out)[-1] == "UNet"

    scorer = StudyScorer(load_thresholds(None), str(layout.out),
                         methods=["CAM", "UNet"], cam_batch_size=16)
    rows = scorer.score(**refs[0].to_dict())
    assert [r["method"] for r in rows] == ["CAM", "UNet"]
    unet_row = rows[1]
    assert unet_row["status"] == "ok", unet_row.get("error")
    assert unet_row["t_m"] is None and unet_row["q_m"] is None  # no thresholds for a supervised net
    mask_img = nib.load(layout.out / unet_row["mask_path"])
    suv_img = nib.load(refs[0].suv_path)
    assert mask_img.shape == suv_img.shape and np.allclose(mask_img.affine, suv_img.affine)
    pred = np.asarray(mask_img.dataobj) > 0
    assert unet_row["mtv_pred_ml"] == pytest.approx(pred.sum() * unet_row["voxel_volume_ml"])
