"""autoPET FPV/FNV, HD95 and lesion-wise detection on volumes small enough to count by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsseg_core.metrics import (extra_metrics, false_negative_volume_ml, false_positive_volume_ml,
                                hd95_mm, lesion_detection, study_metrics)

VOX_ML = 0.5


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """ref: lesion A (2x2x2 = 8 voxels) and lesion B (1 voxel); pred: hits A with 3 voxels,
    plus a separate 4-voxel false component; B is missed."""
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:3, 1:3, 1:3] = 1          # A: 8 voxels
    ref[8, 8, 8] = 1                # B: 1 voxel
    pred = np.zeros_like(ref)
    pred[2:4, 2, 2] = 1             # touches A at (2,2,2), sticks out at (3,2,2)
    pred[2, 3, 2] = 1               # edge... face-adjacent to (2,2,2): same component, 3 voxels
    pred[5:7, 5:7, 10] = 1          # 4 voxels, far from any lesion
    return pred, ref


def test_fpv_fnv_by_hand():
    pred, ref = _scene()
    # false positive: only the 4-voxel component; the 3-voxel one touches A and counts zero
    assert false_positive_volume_ml(pred, ref, VOX_ML) == pytest.approx(4 * VOX_ML)
    # false negative: B (1 voxel) is untouched; A is touched
    assert false_negative_volume_ml(pred, ref, VOX_ML) == pytest.approx(1 * VOX_ML)
    assert false_positive_volume_ml(ref, ref, VOX_ML) == 0.0
    assert false_negative_volume_ml(ref, ref, VOX_ML) == 0.0


def test_fpv_fnv_empty_masks():
    pred, ref = _scene()
    empty = np.zeros_like(ref)
    # negative study: FNV undefined, FPV is the whole prediction (7 voxels)
    assert math.isnan(false_negative_volume_ml(pred, empty, VOX_ML))
    assert false_positive_volume_ml(pred, empty, VOX_ML) == pytest.approx(7 * VOX_ML)
    assert false_positive_volume_ml(empty, empty, VOX_ML) == 0.0
    # empty prediction: nothing false positive, every lesion missed (9 voxels)
    assert false_positive_volume_ml(empty, ref, VOX_ML) == 0.0
    assert false_negative_volume_ml(empty, ref, VOX_ML) == pytest.approx(9 * VOX_ML)


def test_18_connectivity():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[2, 2, 2] = 1
    pred = np.zeros_like(ref)
    # edge neighbours (differ in two axes) join under 18-connectivity ...
    pred[0, 0, 2] = pred[1, 1, 2] = 1
    assert lesion_detection(pred, ref)["n_pred_lesions"] == 1
    # ... corner neighbours (differ in all three) do not (they would under 26-connectivity)
    pred2 = np.zeros_like(ref)
    pred2[0, 0, 0] = pred2[1, 1, 1] = 1
    d = lesion_detection(pred2, ref)
    assert d["n_pred_lesions"] == 2 and d["n_pred_false"] == 2
    # "touching" the reference means sharing a voxel, not being adjacent: (1,1,1) borders the
    # lesion at (2,2,2) but overlaps nothing, so FPV counts both single-voxel components
    assert false_positive_volume_ml(pred2, ref, 1.0) == 2.0


def test_lesion_detection_by_hand():
    pred, ref = _scene()
    assert lesion_detection(pred, ref) == {"n_ref_lesions": 2, "n_ref_detected": 1,
                                           "n_pred_lesions": 2, "n_pred_false": 1}
    empty = np.zeros_like(ref)
    assert lesion_detection(empty, ref) == {"n_ref_lesions": 2, "n_ref_detected": 0,
                                            "n_pred_lesions": 0, "n_pred_false": 0}
    assert lesion_detection(pred, empty) == {"n_ref_lesions": 0, "n_ref_detected": 0,
                                             "n_pred_lesions": 2, "n_pred_false": 2}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_plates_shifted_by_k(k):
    """One-voxel-thick plates: every voxel is surface, each is exactly k voxels from the other plate."""
    spacing = (2.0, 1.0, 3.0)
    a = np.zeros((10, 9, 9), np.uint8)
    b = np.zeros_like(a)
    a[2, 1:8, 1:8] = 1
    b[2 + k, 1:8, 1:8] = 1
    assert hd95_mm(a, b, spacing) == pytest.approx(k * spacing[0])
    assert hd95_mm(b, a, spacing) == pytest.approx(k * spacing[0])
    assert hd95_mm(a, a, spacing) == 0.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hd95_cubes_shifted_by_k(k):
    """Two 6^3 cubes shifted by k along x: HD95 equals a brute-force all-pairs computation on the
    surface voxels, and lies within (0, k * sx] (the Hausdorff distance is k * sx)."""
    spacing = np.array([1.5, 1.0, 2.0])
    a = np.zeros((16, 10, 10), bool)
    a[2:8, 2:8, 2:8] = True
    b = np.roll(a, k, axis=0)

    def surface(m):  # a voxel is surface if any of its 6 face neighbours is background
        pad = np.pad(m, 1)
        inner = np.ones_like(m)
        for ax in range(3):
            for s in (-1, 1):
                inner &= np.roll(pad, s, axis=ax)[1:-1, 1:-1, 1:-1]
        return m & ~inner

    pa, pb = np.argwhere(surface(a)) * spacing, np.argwhere(surface(b)) * spacing
    dist = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=2)
    expected = np.percentile(np.concatenate([dist.min(axis=1), dist.min(axis=0)]), 95)
    assert hd95_mm(a, b, spacing) == pytest.approx(expected)
    assert 0 < hd95_mm(a, b, spacing) <= k * spacing[0] + 1e-9
    assert dist.min(axis=1).max() == pytest.approx(k * spacing[0])  # the Hausdorff distance


def test_hd95_empty_and_edge():
    a = np.zeros((5, 5, 5), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert math.isnan(hd95_mm(a, b, (1, 1, 1)))
    assert math.isnan(hd95_mm(b, a, (1, 1, 1)))
    assert math.isnan(hd95_mm(a, a, (1, 1, 1)))
    # single voxels at the array's corner and 4 voxels away along z (3 mm): 12 mm both ways
    c = a.copy()
    c[0, 0, 4] = 1
    assert hd95_mm(b, c, (1.0, 1.0, 3.0)) == pytest.approx(12.0)
    with pytest.raises(ValueError):
        hd95_mm(b, c, (1.0, 0.0, 3.0))


def test_extra_metrics_and_study_metrics():
    pred, ref = _scene()
    suv = np.ones(ref.shape, np.float32)
    e = extra_metrics(pred, ref, VOX_ML, (1.0, 1.0, 1.0))
    assert e["fpv_ml"] == pytest.approx(2.0) and e["fnv_ml"] == pytest.approx(0.5)
    assert e["n_ref_lesions"] == 2 and e["n_pred_false"] == 1 and e["hd95_mm"] > 0
    s = study_metrics(pred, ref, suv, VOX_ML, spacing_mm=(1.0, 1.0, 1.0))
    assert {k: s[k] for k in e if k != "hd95_mm"} == {k: e[k] for k in e if k != "hd95_mm"}
    assert s["hd95_mm"] == pytest.approx(e["hd95_mm"])
    # without spacing the old keys only (compatible signature)
    assert set(study_metrics(pred, ref, suv, VOX_ML)) == {"dice", "mtv_true_ml", "mtv_pred_ml",
                                                           "tlg_true_g", "tlg_pred_g"}
    # unlabeled study: reference-based values undefined, predicted lesions still counted
    u = extra_metrics(pred, None, VOX_ML, (1.0, 1.0, 1.0))
    assert math.isnan(u["fpv_ml"]) and math.isnan(u["fnv_ml"]) and math.isnan(u["hd95_mm"])
    assert u["n_ref_lesions"] is None and u["n_pred_false"] is None and u["n_pred_lesions"] == 2


def test_ude_by_hand():
    from wsseg_core.metrics import ude_mm

    ref = np.zeros((7, 5, 5), bool)
    ref[2:5, 2, 2] = True  # a 3-voxel line: every voxel is surface
    pred = np.zeros_like(ref)
    pred[2, 2, 2] = True
    # pred -> ref: 0; ref -> pred: 0, 1, 2 voxels along x at 2 mm: pooled mean (0 + 0 + 2 + 4) / 4
    assert ude_mm(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(1.5)
    assert ude_mm(ref, pred, (2.0, 1.0, 1.0)) == pytest.approx(1.5)  # symmetric
    assert ude_mm(ref, ref, (2.0, 1.0, 1.0)) == 0.0
    # two single voxels 3 apart along z at 3 mm: every distance is 9 mm
    a = np.zeros((5, 5, 8), bool)
    b = a.copy()
    a[2, 2, 1] = b[2, 2, 4] = True
    assert ude_mm(a, b, (1.0, 1.0, 3.0)) == pytest.approx(9.0)


def test_ude_empty_is_nan_and_in_extra_metrics():
    from wsseg_core.metrics import ude_mm

    pred, ref = _scene()
    empty = np.zeros_like(ref)
    assert math.isnan(ude_mm(empty, ref, (1, 1, 1))) and math.isnan(ude_mm(pred, empty, (1, 1, 1)))
    e = extra_metrics(pred, ref, VOX_ML, (1.0, 1.0, 1.0))
    assert e["ude_mm"] == pytest.approx(ude_mm(pred, ref, (1, 1, 1)))
    assert 0 < e["ude_mm"] <= e["hd95_mm"] + 1e-9 or e["hd95_mm"] == 0
    assert math.isnan(extra_metrics(pred, None, VOX_ML, (1, 1, 1))["ude_mm"])
