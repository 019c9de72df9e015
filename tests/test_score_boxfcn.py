"""BoxFCN is scored in the same pass as the CAM methods, with a UDE value, without Ray."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch


def test_scorer_scores_boxfcn_next_to_cam_methods(scoring_layout):
    from jobs.score_cohort import METRICS_SCHEMA, MODEL_METHODS, StudyScorer, default_methods
    from wsseg_core.thresholds import load_thresholds, update_thresholds
    from wsseg_core.boxfcn import build_boxfcn, save_boxfcn

    layout, ref = scoring_layout
    torch.manual_seed(0)
    assert "BoxFCN" not in default_methods(layout.out)
    save_boxfcn(layout.model(MODEL_METHODS["BoxFCN"].checkpoint), build_boxfcn("small"))
    assert "BoxFCN" in default_methods(layout.out)
    # a tuned entry: threshold 0 marks every voxel (an untrained net's p is in (0, 1)), no post-processing
    update_thresholds(layout.thresholds, {"BoxFCN": {"threshold": 0.0, "postprocess": False}})

    scorer = StudyScorer(load_thresholds(layout.thresholds), str(layout.out),
                         methods=["CAM", "BoxFCN"], cam_batch_size=16)
    rows = scorer.score(**ref.to_dict())
    assert [r["method"] for r in rows] == ["CAM", "BoxFCN"]
    row = rows[1]
    assert row["status"] == "ok", row.get("error")
    mask_img = nib.load(layout.out / row["mask_path"])
    suv_img = nib.load(ref.suv_path)
    assert mask_img.shape == suv_img.shape and np.allclose(mask_img.affine, suv_img.affine)
    pred = np.asarray(mask_img.dataobj) > 0
    assert pred.all()
    # the voxel volume from the SUV header's zooms (mm), not the row's own voxel_volume_ml
    voxel_ml = float(np.prod(suv_img.header.get_zooms()[:3])) / 1000.0
    assert row["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert row["mtv_pred_ml"] == pytest.approx(pred.sum() * voxel_ml)
    # the whole volume vs the lesions: a finite, positive UDE (mm); every row has the column
    assert math.isfinite(row["ude_mm"]) and row["ude_mm"] > 0
    assert "ude_mm" in METRICS_SCHEMA.names and all("ude_mm" in r for r in rows)
