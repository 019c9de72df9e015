"""Issue 20: the bounding-box metrics (wsseg_core.metrics) give the same values as the whole-volume
implementation they replaced, kept below verbatim (docstrings shortened) as the reference.

Compared on random masks (blobs, scattered voxels, many components) and on the edge cases where a
crop could change an answer: empty masks, one voxel, masks touching the array's faces and corners,
a mask filling the whole array, cavities, axes of length 1 and 2, anisotropic spacing, label and
negative values. Counts, volumes, Dice and TLG must be identical; HD95 and UDE agree to 1e-9 mm
(they are in practice bit-identical: the distance is recomputed from the voxel offset exactly as
``distance_transform_edt`` computes it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from wsseg_core import metrics as new
from wsseg_core.metrics import MaskSummary

# --- the reference: the whole-volume implementation before issue 20 ----------------------------------


def _old_as_mask(a):
    return np.asarray(a) > 0


def old_dice(pred, ref):
    p, r = _old_as_mask(pred), _old_as_mask(ref)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} differs from ref shape {r.shape}")
    n_ref = int(np.count_nonzero(r))
    if n_ref == 0:
        return float("nan")
    inter = int(np.count_nonzero(p & r))
    return 2.0 * inter / (int(np.count_nonzero(p)) + n_ref)


def old_mtv_ml(mask, voxel_ml):
    return int(np.count_nonzero(_old_as_mask(mask))) * float(voxel_ml)


def old_tlg_g(mask, suv, voxel_ml):
    m = _old_as_mask(mask)
    suv = np.asarray(suv)
    if m.shape != suv.shape:
        raise ValueError(f"mask shape {m.shape} differs from suv shape {suv.shape}")
    return float(np.sum(suv[m], dtype=np.float64)) * float(voxel_ml)


def old_study_metrics(pred, ref, suv, voxel_ml, spacing_mm=None):
    nan = float("nan")
    out = {
        "dice": nan,
        "mtv_true_ml": nan,
        "mtv_pred_ml": old_mtv_ml(pred, voxel_ml),
        "tlg_true_g": nan,
        "tlg_pred_g": old_tlg_g(pred, suv, voxel_ml),
    }
    if ref is not None:
        out["dice"] = old_dice(pred, ref)
        out["mtv_true_ml"] = old_mtv_ml(ref, voxel_ml)
        out["tlg_true_g"] = old_tlg_g(ref, suv, voxel_ml)
    if spacing_mm is not None:
        out.update(old_extra_metrics(pred, ref, voxel_ml, spacing_mm))
    return out


def _old_structure_18():
    return ndimage.generate_binary_structure(3, 2)


def _old_pair(pred, ref):
    p, r = _old_as_mask(pred), _old_as_mask(ref)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} differs from ref shape {r.shape}")
    if p.ndim != 3:
        raise ValueError(f"expected 3-D masks, got {p.ndim}-D")
    return p, r


def _old_component_hits(mask, other):
    lab, n = ndimage.label(mask, structure=_old_structure_18())
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    overlap = np.bincount(lab[other].ravel(), minlength=n + 1)[1:]
    return sizes, overlap > 0


def old_false_positive_volume_ml(pred, ref, voxel_ml):
    p, r = _old_pair(pred, ref)
    sizes, hit = _old_component_hits(p, r)
    return float(sizes[~hit].sum()) * float(voxel_ml)


def old_false_negative_volume_ml(pred, ref, voxel_ml):
    p, r = _old_pair(pred, ref)
    if not r.any():
        return float("nan")
    sizes, hit = _old_component_hits(r, p)
    return float(sizes[~hit].sum()) * float(voxel_ml)


def _old_surface(mask):
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _old_surface_distances(pred, ref, spacing_mm):
    p, r = _old_pair(pred, ref)
    if not p.any() or not r.any():
        return None
    spacing = np.asarray(spacing_mm, dtype=float).ravel()
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be 3 positive values in mm, got {spacing.tolist()}")
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp, sr = _old_surface(p)[box], _old_surface(r)[box]
    d_to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return np.concatenate([d_to_r[sp], d_to_p[sr]])


def old_hd95_mm(pred, ref, spacing_mm):
    d = _old_surface_distances(pred, ref, spacing_mm)
    return float("nan") if d is None else float(np.percentile(d, 95))


def old_ude_mm(pred, ref, spacing_mm):
    d = _old_surface_distances(pred, ref, spacing_mm)
    return float("nan") if d is None else float(d.mean())


def old_lesion_detection(pred, ref):
    p, r = _old_pair(pred, ref)
    _, ref_hit = _old_component_hits(r, p)
    _, pred_hit = _old_component_hits(p, r)
    return {
        "n_ref_lesions": int(ref_hit.size),
        "n_ref_detected": int(ref_hit.sum()),
        "n_pred_lesions": int(pred_hit.size),
        "n_pred_false": int((~pred_hit).sum()),
    }


def old_extra_metrics(pred, ref, voxel_ml, spacing_mm):
    if ref is None:
        _, n_pred = ndimage.label(_old_as_mask(pred), structure=_old_structure_18())
        nan = float("nan")
        return {"fpv_ml": nan, "fnv_ml": nan, "hd95_mm": nan, "ude_mm": nan, "n_ref_lesions": None,
                "n_ref_detected": None, "n_pred_lesions": int(n_pred), "n_pred_false": None}
    d = _old_surface_distances(pred, ref, spacing_mm)
    nan = float("nan")
    return {
        "fpv_ml": old_false_positive_volume_ml(pred, ref, voxel_ml),
        "fnv_ml": old_false_negative_volume_ml(pred, ref, voxel_ml),
        "hd95_mm": nan if d is None else float(np.percentile(d, 95)),
        "ude_mm": nan if d is None else float(d.mean()),
        **old_lesion_detection(pred, ref),
    }


# --- comparison helpers ------------------------------------------------------------------------------

DISTANCE_KEYS = ("hd95_mm", "ude_mm")


def assert_same_row(got: dict, want: dict) -> float:
    """Every key equal (NaN == NaN, None == None); distances to 1e-9 mm. Returns the largest
    absolute difference seen over the float values."""
    assert set(got) == set(want)
    worst = 0.0
    for k, w in want.items():
        g = got[k]
        if w is None:
            assert g is None, k
        elif isinstance(w, float) and math.isnan(w):
            assert isinstance(g, float) and math.isnan(g), (k, g)
        elif k in DISTANCE_KEYS:
            assert g == pytest.approx(w, abs=1e-9, rel=0), (k, g, w)
            worst = max(worst, abs(g - w))
        else:
            assert type(g) is type(w) and g == w, (k, g, w)  # counts stay ints, volumes exact
            worst = max(worst, abs(float(g) - float(w)))
    return worst


def compare(pred, ref, spacing, voxel_ml=0.37, seed=0) -> float:
    """New vs old on every entry point; ref given both as an array and as a shared MaskSummary."""
    rng = np.random.default_rng(seed)
    suv = rng.gamma(2.0, 1.5, size=np.shape(pred)).astype(np.float32)
    want = old_study_metrics(pred, ref, suv, voxel_ml, spacing)
    worst = assert_same_row(new.study_metrics(pred, ref, suv, voxel_ml, spacing), want)
    if ref is not None:
        summary = MaskSummary(ref)
        worst = max(worst, assert_same_row(new.study_metrics(pred, summary, suv, voxel_ml, spacing), want))
        # the single-purpose functions, on arrays
        assert_same_row({"x": new.false_positive_volume_ml(pred, ref, voxel_ml)},
                        {"x": old_false_positive_volume_ml(pred, ref, voxel_ml)})
        assert_same_row({"x": new.false_negative_volume_ml(pred, ref, voxel_ml)},
                        {"x": old_false_negative_volume_ml(pred, ref, voxel_ml)})
        assert_same_row({"hd95_mm": new.hd95_mm(pred, ref, spacing)},
                        {"hd95_mm": old_hd95_mm(pred, ref, spacing)})
        assert_same_row({"ude_mm": new.ude_mm(pred, ref, spacing)},
                        {"ude_mm": old_ude_mm(pred, ref, spacing)})
        assert new.lesion_detection(pred, ref) == old_lesion_detection(pred, ref)
        assert_same_row(new.extra_metrics(pred, ref, voxel_ml, spacing),
                        old_extra_metrics(pred, ref, voxel_ml, spacing))
    assert_same_row(new.study_metrics(pred, ref, suv, voxel_ml),
                    old_study_metrics(pred, ref, suv, voxel_ml))
    return worst


def blobs(rng, shape, level: float, sigma: float = 1.2) -> np.ndarray:
    """Thresholded smoothed noise: irregular blobs, several components, some touching the faces."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f > level * f.std()).astype(np.uint8)


SPACINGS = [(1.0, 1.0, 1.0), (2.04, 2.04, 3.0), (0.7, 3.1, 1.9)]


# --- random masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_match_old(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(9, 26, size=3))
    ref = blobs(rng, shape, 1.6)
    pred = blobs(rng, shape, 1.2)
    if seed % 2:  # a prediction overlapping the reference in part
        pred = np.where(rng.random(shape) < 0.5, ref, pred).astype(np.uint8)
    spacing = SPACINGS[seed % len(SPACINGS)]
    compare(pred, ref, spacing, seed=seed)
    compare(ref, pred, spacing, seed=seed)
    compare(pred, None, spacing, seed=seed)


@pytest.mark.parametrize("seed", range(3))
def test_scattered_voxels_many_components(seed):
    """Sparse random voxels: hundreds of components, many single voxels, corner-adjacent pairs
    (separate under 18-connectivity) among them."""
    rng = np.random.default_rng(100 + seed)
    shape = (17, 23, 11)
    pred = (rng.random(shape) < 0.06).astype(np.uint8)
    ref = (rng.random(shape) < 0.04).astype(np.uint8)
    assert new.lesion_detection(pred, ref)["n_pred_lesions"] > 50
    compare(pred, ref, (0.7, 3.1, 1.9), seed=seed)
    compare(pred, ref, (2.04, 2.04, 3.0), seed=seed)


def test_boxes_far_apart_and_disjoint():
    """pred and ref in opposite corners: the boxes do not overlap at all."""
    pred = np.zeros((20, 18, 16), np.uint8)
    ref = np.zeros_like(pred)
    pred[0:3, 0:4, 0:2] = 1
    ref[15:20, 12:18, 10:16] = 1
    ref[17, 14, 12] = 0  # an interior hole
    compare(pred, ref, (2.04, 2.04, 3.0))


# --- edge cases --------------------------------------------------------------------------------------

def _empty(shape=(7, 6, 5)):
    return np.zeros(shape, np.uint8)


def _one(at, shape=(7, 6, 5)):
    m = _empty(shape)
    m[at] = 1
    return m


EDGE_CASES = {
    "both empty": (_empty(), _empty()),
    "empty pred": (_empty(), _one((3, 3, 2))),
    "empty ref": (_one((3, 3, 2)), _empty()),
    "one voxel each, same": (_one((3, 3, 2)), _one((3, 3, 2))),
    "one voxel each, apart": (_one((0, 0, 0)), _one((6, 5, 4))),
    "corner voxels": (_one((0, 5, 0)), _one((6, 0, 4))),
    "whole array vs one voxel": (np.ones((7, 6, 5), np.uint8), _one((3, 3, 2))),
    "whole array vs whole array": (np.ones((7, 6, 5), np.uint8), np.ones((7, 6, 5), np.uint8)),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_edge_cases_match_old(name, spacing):
    pred, ref = EDGE_CASES[name]
    compare(pred, ref, spacing)
    compare(ref, pred, spacing)
    compare(pred, None, spacing)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("side", [0, -1])
def test_masks_touching_each_face(axis, side):
    """A slab on one face of the array: its face voxels are surface because the array ends there,
    which the box crop must reproduce (the box's face is the array's face)."""
    rng = np.random.default_rng(axis * 2 - side)
    shape = (12, 10, 9)
    slab = np.zeros(shape, np.uint8)
    idx = [slice(None)] * 3
    idx[axis] = slice(0, 3) if side == 0 else slice(-3, None)
    slab[tuple(idx)] = 1
    other = blobs(rng, shape, 1.0)
    compare(slab, other, (0.7, 3.1, 1.9))
    compare(other, slab, (2.04, 2.04, 3.0))
    # a slab spanning the whole array along two axes: its box is the array along those axes
    compare(slab, np.roll(slab, 4, axis=axis), (2.04, 2.04, 3.0))


@pytest.mark.parametrize("shape", [(1, 5, 5), (5, 1, 5), (5, 5, 1), (2, 6, 4), (1, 1, 1), (2, 2, 2)])
def test_thin_arrays(shape):
    """Axes of length 1 or 2: every foreground voxel is surface (a neighbour lies outside)."""
    rng = np.random.default_rng(sum(shape))
    pred = (rng.random(shape) < 0.5).astype(np.uint8)
    ref = (rng.random(shape) < 0.5).astype(np.uint8)
    pred.flat[0] = ref.flat[-1] = 1
    for sp in SPACINGS:
        compare(pred, ref, sp)
    compare(np.ones(shape, np.uint8), ref, (0.7, 3.1, 1.9))


def test_cavity_and_shell():
    """A hollow cube (inner surface around the cavity) vs a smaller solid cube inside the cavity."""
    shell = np.zeros((15, 15, 15), np.uint8)
    shell[2:13, 2:13, 2:13] = 1
    shell[5:10, 5:10, 5:10] = 0
    core = np.zeros_like(shell)
    core[6:9, 6:9, 6:9] = 1
    compare(shell, core, (2.04, 2.04, 3.0))
    compare(core, shell, (0.7, 3.1, 1.9))


def test_label_values_bool_and_negative():
    """Anything > 0 is foreground: label values, bools, and negatives (background) all work alike."""
    rng = np.random.default_rng(7)
    base = blobs(rng, (14, 13, 12), 1.2)
    ref = blobs(rng, (14, 13, 12), 1.4)
    labels = base * rng.integers(1, 5, size=base.shape)
    negative = np.where(base > 0, 3, -2).astype(np.int16)
    want = compare(base, ref, (2.04, 2.04, 3.0))
    assert compare(labels.astype(np.int32), ref * 9, (2.04, 2.04, 3.0)) == want
    compare(base.astype(bool), ref.astype(bool), (2.04, 2.04, 3.0))
    compare(negative, ref, (2.04, 2.04, 3.0))


# --- the parts, and why the crop is exact --------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_surface_on_box_equals_whole_volume_surface(seed):
    """``_surface`` of the tight crop equals the whole-volume 6-connected erosion surface restricted
    to the box, and nothing outside the box is surface."""
    rng = np.random.default_rng(seed)
    m = blobs(rng, (13, 11, 9), 1.0 + 0.3 * seed) > 0
    s = MaskSummary(m)
    whole = _old_surface(m)
    assert np.array_equal(new._surface(s.crop), whole[s.box])
    assert np.count_nonzero(whole) == np.count_nonzero(whole[s.box])
    # the surface points are the whole volume's, in raster order
    assert np.array_equal(s.surface_points, np.argwhere(whole))
    # the generic erosion on the crop, too
    assert np.array_equal(new._surface(s.crop), s.crop & ~ndimage.binary_erosion(s.crop, border_value=0))


def test_bbox_by_hand():
    m = np.zeros((6, 7, 8), bool)
    assert new._bbox(m) is None
    m[1, 2, 3] = m[4, 2, 7] = m[2, 6, 0] = True
    lo, hi = new._bbox(m)
    assert lo.tolist() == [1, 2, 0] and hi.tolist() == [5, 7, 8]
    s = MaskSummary(m)
    assert s.crop.shape == (4, 5, 8) and s.n_voxels == 3


def test_cropped_distance_transform_of_complement_needs_the_array_border():
    """Why distances are measured between surface points and not with a distance transform of the
    cropped complement: padding a crop with one background voxel is exact away from the array's
    border but wrong at it, because the whole-volume transform has no background beyond the array.
    (This pins down the pitfall; the implementation avoids it by construction.)"""
    m = np.zeros((8, 10, 10), bool)
    m[0:3, 1:9, 1:9] = True  # touches the array's face at x = 0
    whole = ndimage.distance_transform_edt(m, sampling=(2.0, 1.0, 1.0))
    s = MaskSummary(m)
    padded = np.pad(s.crop, 1)  # background on every side, including beyond the array at x = 0
    crop_dt = ndimage.distance_transform_edt(padded, sampling=(2.0, 1.0, 1.0))[1:-1, 1:-1, 1:-1]
    # voxel (0, 4, 4): 4 mm to the background at y = 0 in the whole volume, 2 mm to the padding
    assert whole[0, 4, 4] == 4.0 and crop_dt[0, 3, 3] == 2.0
    # away from the array's border the padded crop is exact
    inner = np.zeros((10, 8, 8), bool)
    inner[3:6, 2:5, 2:5] = True
    si = MaskSummary(inner)
    dt = ndimage.distance_transform_edt(np.pad(si.crop, 1), sampling=(2.0, 1.0, 1.0))[1:-1, 1:-1, 1:-1]
    assert np.array_equal(dt, ndimage.distance_transform_edt(inner, sampling=(2.0, 1.0, 1.0))[si.box])


def test_surface_distances_brute_force():
    """Both directions against an all-pairs computation on the surface voxels (independent of the
    old code): same distances, in the same order (pred -> ref, then ref -> pred, raster order)."""
    rng = np.random.default_rng(11)
    pred, ref = blobs(rng, (12, 10, 9), 1.0) > 0, blobs(rng, (12, 10, 9), 1.3) > 0
    spacing = np.array([0.7, 3.1, 1.9])
    sp, sr = np.argwhere(_old_surface(pred)) * spacing, np.argwhere(_old_surface(ref)) * spacing
    dist = np.linalg.norm(sp[:, None, :] - sr[None, :, :], axis=2)
    want = np.concatenate([dist.min(axis=1), dist.min(axis=0)])
    got = new._surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_summary_reused_across_predictions_and_spacings():
    """One reference summary serves several predictions and spacings (the k-d tree is cached per
    spacing) and gives the same values as fresh arrays each time."""
    rng = np.random.default_rng(5)
    ref = blobs(rng, (16, 15, 14), 1.4)
    summary = MaskSummary(ref)
    suv = rng.random(ref.shape).astype(np.float32)
    for i, spacing in enumerate([(2.04, 2.04, 3.0), (0.7, 3.1, 1.9), (2.04, 2.04, 3.0)]):
        pred = blobs(rng, ref.shape, 1.0 + 0.2 * i)
        assert_same_row(new.study_metrics(pred, summary, suv, 0.5, spacing),
                        old_study_metrics(pred, ref, suv, 0.5, spacing))
    assert len(summary._trees) == 2


def test_errors_kept():
    a, b = _one((1, 1, 1)), _one((2, 2, 2), shape=(7, 6, 6))
    with pytest.raises(ValueError):
        new.study_metrics(a, b, np.zeros(a.shape, np.float32), 1.0, (1, 1, 1))
    with pytest.raises(ValueError):
        new.study_metrics(a, None, np.zeros((2, 2, 2), np.float32), 1.0)
    with pytest.raises(ValueError):
        new.hd95_mm(a, a, (1.0, 0.0, 3.0))
    with pytest.raises(ValueError):
        new.extra_metrics(np.zeros((4, 4), np.uint8), None, 1.0, (1, 1, 1))


# --- the restricted reverse query (_near_candidates): only the big surface's voxels near the small one

@pytest.fixture
def near_always(monkeypatch):
    """Take the restricted path at test sizes (it is skipped below 20,000 surface voxels)."""
    monkeypatch.setattr(new, "_NEAR_MIN_POINTS", 0)


def _big_and_lesions(rng, shape=(40, 30, 24)):
    """A whole-array mask with scattered holes (surface everywhere, touching every face) and two
    small lesions inside it near one corner, one touching the array's face."""
    big = (rng.random(shape) > 0.02).astype(np.uint8)
    small = np.zeros(shape, np.uint8)
    small[2:5, 3:6, 2:4] = 1
    small[0:2, 8:10, 5:8] = 1
    return big, small


@pytest.mark.parametrize("spacing", SPACINGS)
def test_near_candidates_hold_every_nearest_voxel(near_always, spacing):
    """Every nearest big-surface voxel of every small-surface voxel (all of them on ties, found by
    brute force) is among the candidates, and the candidates are a strict subset."""
    rng = np.random.default_rng(3)
    big, small = _big_and_lesions(rng)
    spacing = np.asarray(spacing)
    b, s = MaskSummary(big), MaskSummary(small)
    d_back, j_back = new._nearest_mm(b.surface_points, s, spacing)
    keep = new._near_candidates(s, b, spacing, d_back, j_back)
    assert keep is not None and 0 < keep.size < b.surface_points.shape[0] // 4
    dist = np.linalg.norm((s.surface_points[:, None, :] - b.surface_points[None, :, :]) * spacing, axis=2)
    nearest = dist <= dist.min(axis=1, keepdims=True) + 1e-9
    assert np.all(np.isin(np.flatnonzero(nearest.any(axis=0)), keep))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_restricted_path_matches_old(near_always, spacing):
    """The whole row through the restricted path against the old implementation: the big mask with
    lesions, random blobs both ways round, and the edge cases (empty, one voxel, border)."""
    rng = np.random.default_rng(4)
    big, small = _big_and_lesions(rng)
    compare(big, small, spacing)
    compare(small, big, spacing)
    for _ in range(2):
        shape = tuple(int(x) for x in rng.integers(9, 22, size=3))
        a, c = blobs(rng, shape, 0.3), blobs(rng, shape, 1.6)
        compare(a, c, spacing)
        compare(c, a, spacing)
    for name in ("one voxel each, apart", "corner voxels", "whole array vs one voxel", "empty pred"):
        p, r = EDGE_CASES[name]
        compare(p, r, spacing)
        compare(r, p, spacing)


def test_surface_points_raster_order_and_offset():
    """surface_points: argwhere of the whole volume's surface (raster order), full-volume indices."""
    rng = np.random.default_rng(8)
    m = np.zeros((14, 12, 11), np.uint8)
    m[3:12, 2:9, 1:11] = blobs(rng, (9, 7, 10), 0.2)
    s = MaskSummary(m)
    assert np.array_equal(s.surface_points, np.argwhere(_old_surface(m > 0)))
    assert s.surface_points.dtype == np.int64


# --- roc_auc's ranks without scipy.stats (whose import cost every scoring actor 1-5 s) -------------

@pytest.mark.parametrize("seed", range(4))
def test_average_ranks_equal_rankdata_and_auc_bit_identical(seed):
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    s = rng.integers(0, max(2, n // 3), size=n).astype(np.float64) / 7.0  # many ties
    if seed == 3:
        s[: n // 2] = -0.0  # -0.0 and 0.0 tie
        s[n // 2:] = np.where(rng.random(n - n // 2) < 0.5, 0.0, np.inf)
    assert np.array_equal(new._average_ranks(s), rankdata(s))
    lab = rng.random(n) < 0.4
    if 0 < lab.sum() < n:
        want = float((rankdata(s)[lab].sum() - lab.sum() * (lab.sum() + 1) / 2.0)
                     / (lab.sum() * (n - lab.sum())))
        assert new.roc_auc(s, lab) == want


def test_roc_auc_nan_score_and_no_scipy_stats_import():
    assert math.isnan(new.roc_auc([0.1, float("nan"), 0.3], [0, 1, 1]))
    import subprocess
    import sys

    code = ("import sys; from wsseg_core.metrics import roc_auc; "
            "assert roc_auc([0.1, 0.4, 0.4], [0, 1, 0]) == 0.75; print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
