"""Früh et al. on the phantom, in one process: the small classifier separates tumour slices of
held-out patients, and Algorithm 1 with (t_m, q_m) tuned on validation patients gives test masks
that a uniform CAM (region = whole slice, i.e. no localisation) cannot match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg_core.cams import CAM_METHODS, CamEngine
from wsseg_core.gate import choose_flag_threshold
from wsseg_core.inference import classify_volume, flagged_slices, volume_cams
from wsseg_core.metrics import dice
from wsseg_core.models import build_slice_classifier
from wsseg_core.phantom import make_phantom_study
from wsseg_core.segment import Q_GRID, T_GRID, dice_grid, segment_volume
from wsseg_core.metrics import roc_auc
from wsseg_core.train import fit_classifier, predict_proba, slices_from_studies

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained():
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        shape = (96, 96, 64)
        # Independent seeds: validation and test studies are other "patients" than training.
        train = [make_phantom_study(seed=1000 + i, shape=shape, negative=(i % 4 == 3)) for i in range(12)]
        val = [make_phantom_study(seed=3000 + i, shape=shape, negative=(i == 3)) for i in range(4)]
        test = [make_phantom_study(seed=2000 + i, shape=shape, negative=(i == 4)) for i in range(5)]
        # Stride 8, Früh et al.'s architecture (their 32x32 at 256^2), not the small preset's
        # default: on this 12-patient cohort neither network's CAM argmax lands on a tumour
        # (pointing game 0 of 65-66 test slices, chance 10-16 %), and at the paper's q grid only
        # the 8x8 maps beat a uniform CAM (16x16 dilated: 0.014-0.025 against 0.013). The small
        # preset's 16x16 maps localise on the demo and hot15 (README, "CAM resolution").
        model, pre = build_slice_classifier("small", map_stride=8)
        x_tr, y_tr = slices_from_studies(train, pre)
        x_va, y_va = slices_from_studies(val, pre)
        best: dict = {"auc": -1.0}

        def keep_best(epoch, metrics, m):  # the checkpoint kept by validation AUC, as the job does
            if metrics["val_auc"] > best["auc"]:
                best.update(auc=metrics["val_auc"], state={k: v.clone() for k, v in m.state_dict().items()})

        fit_classifier(model, (x_tr, y_tr), (x_va, y_va), epochs=12, batch_size=32, lr=3e-3,
                       optimizer="adamw", schedule="onecycle", patience=6, seed=0, on_epoch=keep_best)
        model.load_state_dict(best["state"])
        model.eval()
        flag = choose_flag_threshold(predict_proba(model, x_va), y_va.numpy())
        yield model, pre, val, test, flag
    finally:
        torch.set_num_threads(old_threads)


def test_classifier_separates_tumour_slices_of_held_out_patients(trained):
    model, pre, _, test, _ = trained
    x_te, y_te = slices_from_studies(test, pre)
    auc = roc_auc(predict_proba(model, x_te), y_te.numpy())
    print(f"held-out slice AUC {auc:.3f} ({int(y_te.sum())} tumour slices of {len(y_te)})")
    assert auc > 0.85


def _maps(model, pre, engine, studies, flag):
    out = []
    for st in studies:
        if not st.seg.any():
            continue
        z = flagged_slices(classify_volume(model, pre, st.suv, st.ct), flag)
        maps = volume_cams(engine, pre, st.suv, st.ct, z)
        maps["uniform"] = np.ones_like(maps["CAM"])
        out.append((st, z, maps))
    return out


def test_each_cam_method_tuned_on_validation_beats_a_uniform_cam_on_test(trained):
    """(t_m, q_m) are chosen on the validation patients only, then applied to the test patients.
    A uniform CAM tuned the same way is Algorithm 1 without localisation (a percentile threshold of
    each flagged slice): each CAM method must beat it clearly on test."""
    model, pre, val, test, flag = trained
    engine = CamEngine(model)
    val_maps = _maps(model, pre, engine, val, flag)
    test_maps = _maps(model, pre, engine, test, flag)
    assert val_maps and test_maps
    test_dice: dict[str, float] = {}
    for m in CAM_METHODS + ("uniform",):
        grid = np.nanmean(np.stack([dice_grid(st.suv, st.seg, z, maps[m], T_GRID, Q_GRID)
                                    for st, z, maps in val_maps]), axis=0)
        i, j = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
        t, q = float(T_GRID[i]), float(Q_GRID[j])
        test_dice[m] = float(np.mean([dice(segment_volume(st.suv, z, maps[m], t, q), st.seg)
                                      for st, z, maps in test_maps]))
    print(f"flag threshold {flag:.3f}; mean test Dice at validation-tuned (t, q):",
          {m: round(v, 3) for m, v in test_dice.items()})
    # Measured once (2026-11-30, shared 2-core machine): CAM 0.036, GradCAM 0.037, GradCAM++ 0.037,
    # ScoreCAM 0.088, uniform 0.013, at an 8x8 CAM (input 64). Far from the paper's 0.46: the floors
    # say only that the CAMs localise, which a uniform CAM cannot (README, "Früh method").
    best = max(test_dice[m] for m in CAM_METHODS)
    assert best >= max(0.06, 4 * test_dice["uniform"]), f"best CAM method test Dice {best:.3f}"
    for m in ("CAM", "GradCAM++", "ScoreCAM"):
        assert test_dice[m] >= 2 * test_dice["uniform"], \
            f"{m}: {test_dice[m]:.3f} vs uniform CAM {test_dice['uniform']:.3f}"
