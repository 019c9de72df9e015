"""Früh et al. on the phantom, in one process: the small classifier separates tumour slices of
held-out patients, and Algorithm 1 on each of the four CAMs gives non-trivial masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg_core.cams import CAM_METHODS, CamEngine
from wsseg_core.inference import classify_volume, flagged_slices, volume_cams
from wsseg_core.metrics import dice
from wsseg_core.models import build_slice_classifier
from wsseg_core.phantom import make_phantom_study
from wsseg_core.segment import PAPER_THRESHOLDS, Q_GRID, T_GRID, dice_grid, segment_volume
from wsseg_core.train import fit_classifier, predict_proba, roc_auc, slices_from_studies

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    shape = (96, 96, 64)
    # Independent seeds: the test studies are other "patients" than the training ones.
    train = [make_phantom_study(seed=1000 + i, shape=shape, negative=(i % 4 == 3)) for i in range(12)]
    test = [make_phantom_study(seed=2000 + i, shape=shape, negative=(i == 4)) for i in range(5)]
    model, pre = build_slice_classifier("small")
    x_tr, y_tr = slices_from_studies(train, pre, negative_keep=0.5, generator=torch.Generator().manual_seed(0))
    x_te, y_te = slices_from_studies(test, pre)
    fit_classifier(model, (x_tr, y_tr), (x_te[:64], y_te[:64]), epochs=8, lr=0.01, seed=0)
    model.eval()
    return model, pre, test, x_te, y_te


def test_classifier_separates_tumour_slices_of_held_out_patients(trained):
    model, _, _, x_te, y_te = trained
    auc = roc_auc(predict_proba(model, x_te), y_te.numpy())
    print(f"held-out slice AUC {auc:.3f} ({int(y_te.sum())} tumour slices of {len(y_te)})")
    assert auc > 0.8


def test_each_cam_method_localises_better_than_no_cam(trained):
    """Non-trivial = the CAM region carries information: over the paper's (t_m, q_m) grid, each
    method's best mean Dice beats Algorithm 1 run with a uniform CAM (region = whole slice), and is
    far from zero. The paper's own (t_m, q_m) are printed for the record; on this small phantom at
    an 8x8 CAM they are not the best values (tuning exists for that)."""
    model, pre, test, _, _ = trained
    engine = CamEngine(model)
    grids: dict[str, list[np.ndarray]] = {m: [] for m in CAM_METHODS + ("uniform",)}
    paper: dict[str, list[float]] = {m: [] for m in CAM_METHODS}
    for st in test:
        if not st.seg.any():
            continue
        z = flagged_slices(classify_volume(model, pre, st.suv, st.ct))
        maps = volume_cams(engine, pre, st.suv, st.ct, z)
        maps["uniform"] = np.ones_like(maps["CAM"])
        for m, cams in maps.items():
            grids[m].append(dice_grid(st.suv, st.seg, z, cams, T_GRID, Q_GRID))
            if m in PAPER_THRESHOLDS:
                t, q = PAPER_THRESHOLDS[m]
                paper[m].append(dice(segment_volume(st.suv, z, cams, t, q), st.seg))
    best = {m: float(np.nanmax(np.nanmean(np.stack(g), axis=0))) for m, g in grids.items()}
    print("best mean Dice over the grid:", {m: round(v, 3) for m, v in best.items()})
    print("median Dice at the paper's (t_m, q_m):", {m: round(float(np.median(v)), 3) for m, v in paper.items()})
    for m in CAM_METHODS:
        assert best[m] > 0.05, f"{m}: best Dice {best[m]:.3f}"
        assert best[m] > 1.5 * best["uniform"], f"{m}: {best[m]:.3f} vs uniform CAM {best['uniform']:.3f}"
