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
from wsseg_core.segment import PAPER_THRESHOLDS, segment_volume
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


def test_each_cam_method_gives_non_trivial_masks(trained):
    model, pre, test, _, _ = trained
    engine = CamEngine(model)
    scores: dict[str, list[float]] = {m: [] for m in CAM_METHODS}
    for st in test:
        if not st.seg.any():
            continue
        z = flagged_slices(classify_volume(model, pre, st.suv, st.ct))
        maps = volume_cams(engine, pre, st.suv, st.ct, z)
        for m in CAM_METHODS:
            t, q = PAPER_THRESHOLDS[m]
            scores[m].append(dice(segment_volume(st.suv, z, maps[m], t, q), st.seg))
    medians = {m: float(np.median(v)) for m, v in scores.items()}
    print("median Dice with the paper's (t_m, q_m):", {m: round(v, 3) for m, v in medians.items()})
    for m, v in medians.items():
        assert v > 0.1, f"{m}: median Dice {v:.3f}"
