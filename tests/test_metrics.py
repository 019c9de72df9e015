"""Dice, voxel volume, MTV and TLG on volumes small enough to count by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsseg_core.metrics import dice, dice_from_counts, mtv_ml, study_metrics, tlg_g, voxel_volume_ml


def _masks():
    ref = np.zeros((3, 3, 2), np.uint8)
    ref.flat[[0, 1, 2, 3, 4]] = 1  # 5 voxels
    pred = np.zeros((3, 3, 2), np.uint8)
    pred.flat[[2, 3, 4, 10]] = 1  # 4 voxels, 3 of them in ref
    return pred, ref


def test_dice_by_hand():
    pred, ref = _masks()
    assert dice(pred, ref) == pytest.approx(6 / 9)  # 2*3 / (4+5)
    assert dice(ref, ref) == 1.0
    assert dice(np.zeros_like(ref), ref) == 0.0
    # anything > 0 is foreground: labels and bools work the same
    assert dice(pred.astype(bool), ref * 7) == pytest.approx(6 / 9)


def test_dice_nan_for_empty_reference():
    pred, ref = _masks()
    assert math.isnan(dice(pred, np.zeros_like(ref)))
    assert math.isnan(dice(np.zeros_like(ref), np.zeros_like(ref)))
    with pytest.raises(ValueError):
        dice(pred, ref[:, :, :1])


def test_dice_from_counts_by_hand():
    # |P & R| = 3, |P| = 4, |R| = 5 (the masks above): 2*3 / (4+5)
    assert dice_from_counts(3, 4, 5) == pytest.approx(6 / 9)
    assert type(dice_from_counts(3, 4, 5)) is float
    assert dice_from_counts(5, 5, 5) == 1.0
    assert dice_from_counts(0, 0, 5) == 0.0  # empty prediction, tumour present: 0 / 5
    assert dice_from_counts(0, 7, 5) == 0.0  # disjoint
    # Empty reference: NaN by default, whether the prediction is empty (0/0) or not (0 by formula).
    assert math.isnan(dice_from_counts(0, 0, 0))
    assert math.isnan(dice_from_counts(0, 4, 0))
    # Another convention for an empty reference, asked for explicitly.
    assert dice_from_counts(0, 0, 0, empty=1.0) == 1.0
    assert dice_from_counts(0, 4, 0, empty=0.0) == 0.0
    assert dice_from_counts(1, 1, 3, empty=1.0) == pytest.approx(0.5)  # 2 / 4: empty not used


def test_dice_from_counts_arrays_broadcast():
    inter = np.array([[0, 1], [2, 3]])
    n_pred = np.array([[0, 1], [4, 3]])
    out = dice_from_counts(inter, n_pred, 3)  # one |R| for the grid, as the (t, q) grids use it
    assert out.dtype == np.float64 and out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[0.0, 2 / 4], [4 / 7, 1.0]])
    with np.errstate(all="raise"):  # 0/0 cells are never divided
        empty_ref = dice_from_counts(np.zeros((2, 3), np.int64), np.array([0, 2, 5]), 0)
    assert empty_ref.shape == (2, 3) and np.isnan(empty_ref).all()
    # per-element |R| with a zero in it
    np.testing.assert_array_equal(dice_from_counts([1, 0], [1, 0], [1, 0], empty=-1.0), [1.0, -1.0])


def test_dice_from_counts_rejects_impossible_counts():
    for bad in [(-1, 2, 2), (3, 2, 5), (3, 5, 2)]:
        with pytest.raises(ValueError):
            dice_from_counts(*bad)


def test_voxel_volume_ml():
    assert voxel_volume_ml((2.0, 2.0, 3.0)) == pytest.approx(0.012)
    assert voxel_volume_ml(np.array([2.04, 2.04, 3.0], np.float32)) == pytest.approx(2.04 * 2.04 * 3 / 1000)
    aff = np.diag([-2.0, 2.0, 3.0, 1.0])  # LAS flip: |det| keeps the volume positive
    aff[:3, 3] = [100, -50, 7]
    assert voxel_volume_ml(aff) == pytest.approx(0.012)
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([2.0, 2.0, 3.0])
    assert voxel_volume_ml(oblique) == pytest.approx(0.012)
    for bad in [(2.0, 2.0), (2.0, 0.0, 3.0), np.zeros((4, 4))]:
        with pytest.raises(ValueError):
            voxel_volume_ml(bad)


def test_mtv_tlg_by_hand():
    v = voxel_volume_ml((2.0, 2.0, 3.0))  # 0.012 ml
    mask = np.zeros((2, 2, 2), np.uint8)
    mask[0, 0, 0] = mask[0, 1, 0] = mask[1, 1, 1] = 1
    suv = np.array([[[2.0, 9.0], [4.0, 9.0]], [[9.0, 9.0], [9.0, 6.0]]], np.float32)
    # SUVs under the mask: 2 + 4 + 6 = 12 (g/ml) -> TLG = 12 * 0.012 = 0.144 g; MTV = 3 * 0.012 ml
    assert mtv_ml(mask, v) == pytest.approx(0.036)
    assert tlg_g(mask, suv, v) == pytest.approx(0.144)
    # the paper's definition: TLG = SUVmean x MTV
    assert tlg_g(mask, suv, v) == pytest.approx(suv[mask > 0].mean() * mtv_ml(mask, v))
    assert tlg_g(np.zeros_like(mask), suv, v) == 0.0
    with pytest.raises(ValueError):
        tlg_g(mask, suv[:1], v)


def test_tlg_equals_suvmean_times_mtv_on_random_volume():
    rng = np.random.default_rng(0)
    suv = rng.gamma(2.0, 2.0, (20, 20, 10)).astype(np.float32)
    mask = (rng.random(suv.shape) > 0.7).astype(np.uint8)
    v = voxel_volume_ml((2.04, 2.04, 3.0))
    assert tlg_g(mask, suv, v) == pytest.approx(float(suv[mask > 0].mean(dtype=np.float64)) * mtv_ml(mask, v))


def test_study_metrics():
    pred, ref = _masks()
    suv = np.arange(18, dtype=np.float32).reshape(3, 3, 2)
    v = 0.012
    m = study_metrics(pred, ref, suv, v)
    assert set(m) == {"dice", "mtv_true_ml", "mtv_pred_ml", "tlg_true_g", "tlg_pred_g"}
    assert m["dice"] == pytest.approx(6 / 9)
    assert m["mtv_true_ml"] == pytest.approx(5 * v) and m["mtv_pred_ml"] == pytest.approx(4 * v)
    # flat indices 0..4 hold SUV 0..4 (sum 10); 2, 3, 4, 10 hold 2+3+4+10 = 19
    assert m["tlg_true_g"] == pytest.approx(10 * v) and m["tlg_pred_g"] == pytest.approx(19 * v)
    u = study_metrics(pred, None, suv, v)
    assert math.isnan(u["dice"]) and math.isnan(u["mtv_true_ml"]) and math.isnan(u["tlg_true_g"])
    assert u["mtv_pred_ml"] == pytest.approx(4 * v)
