"""The compact tuning cache (wsseg_core.gridcache) gives the full-volume Dice grids bit for bit.

Every study is scored twice: by wsseg_core.segment.dice_grid / threshold_dice_grid on the full
volumes (what the tuning trials computed until issue 20) and by cache_dice_grid /
cache_threshold_dice_grid on the cache after an npz round trip; the float64 results must have the
same bytes, for the whole grid and for subsets of it in any order. Studies: random ones
(non-integer CAM upsampling factors, tied SUVs and CAM values) and edge cases (no flagged slice,
empty / absent SEG, tumour outside the flagged slices, a one-voxel volume, slices without uptake,
t and q on and beyond every edge). One test checks the counts against masks built voxel by voxel.
"""

from __future__ import annotations

import numpy as np
import pytest

from wsseg_core.gridcache import (GridCache, build_grid_cache, cache_dice_grid,
                                  cache_threshold_dice_grid)
from wsseg_core.segment import dice_grid, segment_volume, threshold_dice_grid, threshold_volume

METHODS = ("A", "B")
# Edges: t = 0 (the whole slice), the float32 tie 0.1f next to 0.1, a CAM maximum (1.0), beyond
# every CAM value (empty regions); q = 0 and 100, and values between.
T_GRID = np.array([0.0, 0.1, float(np.float32(0.1)), 0.25, 0.5, 0.9, 1.0, 1.5])
Q_GRID = np.array([0.0, 20.0, 20.5, 31.0, 41.0, 50.0, 73.3, 99.0, 100.0])


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes()


def _roundtrip(cache: GridCache, tmp_path) -> GridCache:
    path = tmp_path / "c.npz"
    np.savez(path, **cache.to_arrays())
    with np.load(path) as a:
        return GridCache.from_arrays(a)


def _check(tmp_path, suv, seg, z, cams, reference="max", ct=None):
    """Full grid, a reordered subset with a NaN t (the Threshold cell's), and single points."""
    cache = _roundtrip(build_grid_cache(suv, seg, z, cams, T_GRID, Q_GRID, reference, ct), tmp_path)
    sub_t = np.array([0.9, np.nan, 0.1, 0.0])
    sub_q = np.array([100.0, 31.0, 0.0])
    for ts, qs in ((T_GRID, Q_GRID), (sub_t, sub_q), ([0.25], [41.0])):
        for m, c in cams.items():
            full = dice_grid(suv, seg, z, c, ts, qs)
            got = cache_dice_grid(cache, m, ts, qs)
            assert got.shape == full.shape and _bits(got) == _bits(full), (m, ts, qs, full, got)
        full = threshold_dice_grid(suv, seg, z, qs, reference=reference, ct=ct)
        got = cache_threshold_dice_grid(cache, qs)
        assert got.shape == full.shape and _bits(got) == _bits(full), (qs, full, got)
    return cache


def _random_study(rng: np.random.Generator, shape, n_flag, map_hw, tumour_z=None, ties=False):
    suv = rng.gamma(1.5, 1.0, size=shape).astype(np.float32)
    if ties:  # few distinct values: ties at every percentile and threshold
        suv = np.round(suv * 2) / 2
    seg = np.zeros(shape, dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        zz = rng.integers(0, shape[2]) if tumour_z is None else rng.choice(tumour_z)
        seg[max(x - 2, 0):x + 3, max(y - 3, 0):y + 2, zz] = 1
        suv[max(x - 2, 0):x + 3, max(y - 3, 0):y + 2, zz] += 4.0
    z = np.sort(rng.choice(shape[2], size=n_flag, replace=False))
    cams = {}
    for m in METHODS:
        c = rng.random((n_flag, *map_hw)).astype(np.float32)
        if ties:
            c = np.round(c * 10).astype(np.float32) / 10  # many CAM values exactly float32(0.1)
        cams[m] = c
    return suv, seg, z, cams


@pytest.mark.parametrize("seed,shape,map_hw,ties", [
    (0, (37, 29, 9), (8, 8), False),   # 8 -> 37, 8 -> 29: non-integer nearest factors
    (1, (40, 40, 7), (5, 20), True),   # 5 -> 40 (exact 8x), 20 -> 40 (2x shortcut), ties
    (2, (16, 16, 5), (16, 16), True),  # identity upsampling
    (3, (23, 31, 6), (32, 32), False),  # a CAM larger than the slice (downsampling)
])
def test_random_studies_bit_identical(tmp_path, seed, shape, map_hw, ties) -> None:
    rng = np.random.default_rng(seed)
    suv, seg, z, cams = _random_study(rng, shape, n_flag=shape[2] - 2, map_hw=map_hw, ties=ties)
    cache = _check(tmp_path, suv, seg, z, cams)
    # not a trivial grid: some Dice > 0, and some differ
    d = cache_dice_grid(cache, "A", T_GRID, Q_GRID)
    assert np.nanmax(d) > 0 and np.unique(d[np.isfinite(d)]).size > 5


@pytest.mark.parametrize("reference", ["slice", "body"])
def test_other_threshold_references_bit_identical(tmp_path, reference) -> None:
    rng = np.random.default_rng(4)
    suv, seg, z, cams = _random_study(rng, (30, 28, 6), n_flag=4, map_hw=(8, 8))
    ct = np.where(rng.random(suv.shape) < 0.3, -1000.0, 40.0).astype(np.float32)
    _check(tmp_path, suv, seg, z, cams, reference=reference, ct=ct)
    if reference == "body":
        _check(tmp_path, suv, seg, z, cams, reference=reference, ct=None)  # body from the SUV


def test_edge_cases_bit_identical(tmp_path) -> None:
    rng = np.random.default_rng(5)
    shape = (20, 24, 8)
    suv, seg, z, cams = _random_study(rng, shape, n_flag=4, map_hw=(8, 8))
    # no flagged slice (the CAMs are (0, h, w), as volume_cams gives them): Dice 0, |ref| > 0
    c = _check(tmp_path, suv, seg, np.zeros(0, dtype=np.int64),
               {m: np.zeros((0, 8, 8), np.float32) for m in METHODS})
    assert c.n_ref > 0 and (cache_dice_grid(c, "A", T_GRID, Q_GRID) == 0).all()
    # empty reference, and none at all: NaN everywhere
    c = _check(tmp_path, suv, np.zeros(shape, np.uint8), z, cams)
    assert c.n_ref == 0 and np.isnan(cache_dice_grid(c, "A", T_GRID, Q_GRID)).all()
    _check(tmp_path, suv, None, z, cams)
    # tumour only outside the flagged slices: Dice 0 everywhere, |ref| still counts
    suv2, seg2, _, _ = _random_study(rng, shape, 4, (8, 8), tumour_z=[0, 1])
    c = _check(tmp_path, suv2, seg2, np.array([3, 5, 6, 7]), cams)
    assert c.n_ref == int((seg2 > 0).sum()) and (cache_threshold_dice_grid(c, Q_GRID) == 0).all()
    # a slice without uptake (SUVmax 0: Threshold selects nothing there), one with negative SUV,
    # one whose CAM is 0.05 everywhere (no region from t = 0.1 on)
    suv3 = suv.copy()
    suv3[:, :, z[0]] = 0.0
    suv3[:, :, z[1]] = -np.abs(suv3[:, :, z[1]])
    cams3 = {m: c.copy() for m, c in cams.items()}
    cams3["A"][2] = 0.05
    _check(tmp_path, suv3, seg, z, cams3)
    # a CAM that is 1 on one map pixel, 0 elsewhere: t = 1.0 selects one upsampled block
    cams4 = {m: np.zeros_like(c) for m, c in cams.items()}
    cams4["A"][:, 3, 4] = 1.0
    cams4["B"][:, 0, 0] = 1.0
    _check(tmp_path, suv, seg, z, cams4)
    # one tumour voxel, SEG values other than 1 (anything > 0 is tumour)
    seg5 = np.zeros(shape, np.uint8)
    seg5[7, 9, z[1]] = 3
    _check(tmp_path, suv, seg5, z, cams)


def test_one_voxel_volume(tmp_path) -> None:
    suv = np.full((1, 1, 1), 2.5, dtype=np.float32)
    seg = np.ones((1, 1, 1), dtype=np.uint8)
    cams = {"A": np.full((1, 4, 4), 0.3, np.float32), "B": np.zeros((1, 4, 4), np.float32)}
    cache = _check(tmp_path, suv, seg, np.array([0]), cams)
    # the one voxel is the region up to t = 0.3 (Dice 1), nothing above
    np.testing.assert_array_equal(cache_dice_grid(cache, "A", [0.25, 0.5], [50.0]), [[1.0], [0.0]])


def test_grids_match_masks_built_voxel_by_voxel() -> None:
    """An independent check of the counts: masks from segment_volume / threshold_volume, Dice by
    hand from the boolean volumes."""
    rng = np.random.default_rng(9)
    suv, seg, z, cams = _random_study(rng, (30, 26, 6), n_flag=5, map_hw=(8, 8))
    cache = build_grid_cache(suv, seg, z, cams, [0.1, 0.45], [20.0, 60.0])
    ref = seg > 0
    for t in (0.1, 0.45):
        for q in (20.0, 60.0):
            mask = segment_volume(suv, z, cams["B"], t, q) > 0
            want = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
            assert cache_dice_grid(cache, "B", [t], [q])[0, 0] == pytest.approx(want, abs=1e-12)
            mask = threshold_volume(suv, z, q, reference="max") > 0
            want = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
            assert cache_threshold_dice_grid(cache, [q])[0] == pytest.approx(want, abs=1e-12)


def test_cache_refuses_what_it_cannot_answer() -> None:
    rng = np.random.default_rng(11)
    suv, seg, z, cams = _random_study(rng, (24, 24, 4), n_flag=3, map_hw=(6, 6))
    cache = build_grid_cache(suv, seg, z, cams, [0.1, 0.3], [20.0, 40.0])
    with pytest.raises(ValueError, match="not in the cache's grid"):
        cache_dice_grid(cache, "A", [0.2], [20.0])
    with pytest.raises(ValueError, match="not in the cache's grid"):
        cache_dice_grid(cache, "A", [0.1], [30.0])
    with pytest.raises(ValueError, match="not in the cache's grid"):
        cache_threshold_dice_grid(cache, [20.0, 41.0])
    with pytest.raises(KeyError):
        cache_dice_grid(cache, "GradCAM", [0.1], [20.0])
    with pytest.raises(ValueError, match="finite"):
        build_grid_cache(suv, seg, z, cams, [np.nan, 0.1], [20.0])
    with pytest.raises(ValueError, match="reference"):
        build_grid_cache(suv, seg, z, cams, [0.1], [20.0], reference="median")
