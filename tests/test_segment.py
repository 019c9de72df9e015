"""Algorithm 1, the global-threshold baseline and their grid-search helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg_core.metrics import dice
from wsseg_core.segment import (
    PAPER_THRESHOLDS,
    Q_GRID,
    T_GRID,
    body_mask_slice,
    cam_region,
    dice_grid,
    segment_slice,
    segment_volume,
    threshold_dice_grid,
    threshold_slice,
    threshold_volume,
)


def test_paper_constants():
    assert PAPER_THRESHOLDS["GradCAM"] == (0.2, 35.0)
    assert T_GRID.shape == (10,) and T_GRID[0] == pytest.approx(0.1) and T_GRID[-1] == pytest.approx(0.9)
    assert Q_GRID.shape == (20,) and Q_GRID[0] == 20 and Q_GRID[-1] == 50


# ---------------------------------------------------------------------------------------- cam_region


@pytest.mark.parametrize(
    "cam_shape, out_shape",
    # 32 -> 400 is autoPET; 2 -> 82 and 3 -> 123 are sizes where exact rational floor and torch's
    # float32 kernel disagree; 16 -> 32 hits torch's exact-2x path; non-square on purpose.
    [((32, 32), (400, 400)), ((32, 32), (256, 256)), ((2, 3), (82, 123)), ((16, 7), (32, 50)),
     ((5, 5), (5, 13)), ((32, 32), (400, 333))],
)
def test_cam_region_matches_torch_nearest(cam_shape, out_shape):
    rng = np.random.default_rng(0)
    cam = rng.random(cam_shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(cam)[None, None], size=out_shape, mode="nearest")[0, 0].numpy() >= 0.5
    got = cam_region(cam, 0.5, out_shape)
    assert got.dtype == bool and got.shape == out_shape
    np.testing.assert_array_equal(got, ref)


def test_cam_region_blocks():
    cam = np.array([[0.9, 0.1], [0.2, 0.5]])
    r = cam_region(cam, 0.3, (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = True
    expected[4:, 4:] = True
    np.testing.assert_array_equal(r, expected)
    # t is inclusive (Algorithm 1 step 2: values >= t_m)
    assert cam_region(cam, 0.5, (8, 8))[4:, 4:].all()


# ------------------------------------------------------------------------------------- Algorithm 1


def _hand_slice() -> tuple[np.ndarray, np.ndarray]:
    suv = np.full((8, 8), 100.0, dtype=np.float32)  # hot outside the region: must never be selected
    suv[:4, :4] = np.arange(1, 17).reshape(4, 4)
    suv[4:, 4:] = np.arange(17, 33).reshape(4, 4)
    cam = np.array([[0.9, 0.1], [0.2, 0.5]], dtype=np.float32)
    return suv, cam


def test_segment_slice_by_hand():
    suv, cam = _hand_slice()
    # Region = two 4x4 blocks holding SUV 1..32. Linear 25th percentile of 32 values sits at
    # position 31 * 0.25 = 7.75 between the 8th and 9th values: 8 + 0.75 = 8.75.
    # Mask = region voxels with SUV >= 8.75 = SUV 9..32 = 24 voxels.
    m = segment_slice(suv, cam, 0.3, 25.0)
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = suv[:4, :4] >= 9
    expected[4:, 4:] = True
    assert m.dtype == bool
    np.testing.assert_array_equal(m, expected)
    assert m.sum() == 24
    # The pseudo-code's literal X ⊙ H' would add 32 zeros and put t_q at 0: our reading does not.
    assert not (suv[m] < 8.75).any()


def test_segment_slice_empty_region_and_ties():
    suv, cam = _hand_slice()
    assert not segment_slice(suv, cam, 0.95, 30.0).any()
    # A flat region: every voxel ties the percentile and ">=" keeps all of them.
    flat = np.full((8, 8), 2.0)
    np.testing.assert_array_equal(segment_slice(flat, cam, 0.3, 40.0), cam_region(cam, 0.3, (8, 8)))


def test_segment_slice_rejects_bad_q():
    suv, cam = _hand_slice()
    with pytest.raises(ValueError):
        segment_slice(suv, cam, 0.3, 0.31 * 1000)


def _study(seed: int = 0, shape=(40, 36, 7), int_suv: bool = False):
    rng = np.random.default_rng(seed)
    if int_suv:  # many ties, to exercise ">=" on both code paths
        suv = rng.integers(0, 6, size=shape).astype(np.float32)
    else:
        suv = rng.gamma(2.0, 0.5, size=shape).astype(np.float32)
    suv[:4] = 0.0  # "air" border
    seg = np.zeros(shape, np.uint8)
    seg[12:20, 10:17, 1:5] = 1
    seg[28:31, 25:30, 3] = 1
    suv[seg > 0] += 6.0
    ct = np.where(suv > 0.0, 40.0, -1000.0).astype(np.float32)
    ct[20:24, 5:9, :] = -850.0  # "lung" inside the body
    flagged = np.array([0, 1, 3, 4, 6])
    cams = rng.random((flagged.size, 5, 5)).astype(np.float32) ** 2
    cams[2] *= 0.5  # a slice whose CAM never reaches the top thresholds
    return suv, seg, ct, flagged, cams


def test_segment_volume_leaves_unflagged_slices_empty():
    suv, seg, _, flagged, cams = _study()
    out = segment_volume(suv, flagged, cams, 0.3, 31.0)
    assert out.dtype == np.uint8 and out.shape == suv.shape
    assert set(np.unique(out)) <= {0, 1}
    for z in range(suv.shape[2]):
        if z in flagged:
            i = int(np.flatnonzero(flagged == z)[0])
            np.testing.assert_array_equal(out[:, :, z], segment_slice(suv[:, :, z], cams[i], 0.3, 31.0))
        else:
            assert not out[:, :, z].any()
    assert not segment_volume(suv, np.array([], int), np.zeros((0, 5, 5)), 0.3, 31.0).any()
    with pytest.raises(ValueError):
        segment_volume(suv, flagged, cams[:-1], 0.3, 31.0)
    with pytest.raises(ValueError):
        segment_volume(suv, np.array([1, 1]), cams[:2], 0.3, 31.0)


@pytest.mark.parametrize("int_suv", [False, True])
def test_dice_grid_equals_brute_force(int_suv):
    suv, seg, _, flagged, cams = _study(seed=1, int_suv=int_suv)
    t_grid = np.append(T_GRID, 0.99)  # 0.99: empty regions on every slice
    grid = dice_grid(suv, seg, flagged, cams, t_grid, Q_GRID)
    assert grid.shape == (t_grid.size, Q_GRID.size)
    brute = np.array([[dice(segment_volume(suv, flagged, cams, t, q), seg) for q in Q_GRID]
                      for t in t_grid])
    np.testing.assert_allclose(grid, brute, rtol=0, atol=1e-12)
    assert grid[-1].max() == 0.0 and grid.max() > 0.0


def test_dice_grid_without_reference_is_nan():
    suv, seg, _, flagged, cams = _study()
    assert np.isnan(dice_grid(suv, None, flagged, cams, [0.3], [31.0])).all()
    assert np.isnan(dice_grid(suv, np.zeros_like(seg), flagged, cams, [0.3], [31.0])).all()
    # Nothing flagged but a tumour present: an empty prediction scores 0, not NaN.
    assert (dice_grid(suv, seg, [], np.zeros((0, 5, 5)), [0.3], [31.0]) == 0).all()


# ------------------------------------------------------------------------------ threshold baseline


def _body_slice() -> np.ndarray:
    s = np.zeros((8, 8))
    s[2:6, 2:6] = np.arange(1, 17).reshape(4, 4)  # 16 "body" voxels in 48 voxels of air
    return s


def test_threshold_slice_references_by_hand():
    s = _body_slice()
    body = s > 0
    # "slice" (literal): 48 of 64 voxels are 0, so the 50th percentile is 0 and ">=" takes everything.
    assert threshold_slice(s, 50.0, "slice").all()
    # "body": median of 1..16 = 8.5 -> SUV 9..16 -> 8 voxels, all inside the body.
    m = threshold_slice(s, 50.0, "body", body_mask=body)
    np.testing.assert_array_equal(m, s >= 9)
    assert m.sum() == 8
    # Without a body mask the SUV floor finds the same body here.
    np.testing.assert_array_equal(threshold_slice(s, 50.0, "body"), m)
    # "max": 40 % of SUVmax 16 = 6.4 -> SUV 7..16 -> 10 voxels.
    mm = threshold_slice(s, 40.0, "max")
    np.testing.assert_array_equal(mm, s >= 7)
    assert mm.sum() == 10
    # No uptake / no body: nothing selected rather than everything.
    assert not threshold_slice(np.zeros((8, 8)), 40.0, "max").any()
    assert not threshold_slice(np.zeros((8, 8)), 40.0, "body").any()
    with pytest.raises(ValueError):
        threshold_slice(s, 40.0, "volume")


def test_body_mask_fills_holes_and_uses_ct():
    s = np.zeros((9, 9))
    s[1:8, 1:8] = 1.0
    s[3:6, 3:6] = 0.0  # a "lung": low uptake inside the body
    s[0, 0] = 0.05  # air noise below the floor
    body = body_mask_slice(s)
    assert body[3:6, 3:6].all() and body.sum() == 49 and not body[0, 0]
    ct = np.full((9, 9), -1000.0)
    ct[2:7, 2:7] = 0.0
    np.testing.assert_array_equal(body_mask_slice(s, ct), ct > -500)


def test_threshold_volume_flags_and_ct():
    suv, _, ct, flagged, _ = _study(seed=2)
    for ref in ("slice", "body", "max"):
        out = threshold_volume(suv, flagged, 35.0, reference=ref, ct=ct)
        assert out.dtype == np.uint8
        for z in range(suv.shape[2]):
            if z not in flagged:
                assert not out[:, :, z].any()
    z = int(flagged[1])
    with_ct = threshold_volume(suv, flagged, 35.0, "body", ct=ct)[:, :, z]
    body_ct = body_mask_slice(suv[:, :, z], ct[:, :, z])
    np.testing.assert_array_equal(with_ct, threshold_slice(suv[:, :, z], 35.0, "body", body_ct))
    assert not with_ct[~body_ct].any()


@pytest.mark.parametrize("reference", ["slice", "body", "max"])
@pytest.mark.parametrize("use_ct", [False, True])
def test_threshold_dice_grid_equals_brute_force(reference, use_ct):
    suv, seg, ct, flagged, _ = _study(seed=3, int_suv=reference == "slice")
    ct = ct if use_ct else None
    grid = threshold_dice_grid(suv, seg, flagged, Q_GRID, reference=reference, ct=ct)
    brute = np.array([dice(threshold_volume(suv, flagged, q, reference, ct), seg) for q in Q_GRID])
    assert grid.shape == Q_GRID.shape
    np.testing.assert_allclose(grid, brute, rtol=0, atol=1e-12)
    assert np.isnan(threshold_dice_grid(suv, None, flagged, Q_GRID, reference, ct)).all()


def test_pointing_game_by_hand():
    """A 4x4 CAM on an 8x8 slice (resize: cell (i, j) covers voxels 2i..2i+1, 2j..2j+1), its
    hottest cell (1, 2). Body: columns 2..7, i.e. cell columns 1..3 of all 4 cell rows, 12 cells."""
    from wsseg_core.segment import pointing_game

    cam = np.zeros((4, 4))
    cam[1, 2] = 1.0
    cam[3, 0] = 0.5
    body = np.zeros((8, 8), dtype=bool)
    body[:, 2:] = True
    ref = np.zeros((8, 8), dtype=bool)
    ref[3, 5] = True  # cell (1, 2): a hit; 1 of the 12 body cells
    assert pointing_game(cam, ref, body) == (True, 1 / 12)
    ref[3, 6] = True  # cell (1, 3) too: still a hit, 2 tumour cells of 12
    assert pointing_game(cam, ref, body) == (True, 2 / 12)
    miss = np.zeros((8, 8), dtype=bool)
    miss[0, 0] = True  # cell (0, 0), outside the body: counted with it, 1 of 13 cells
    assert pointing_game(cam, miss, body) == (False, 1 / 13)
    # first cell on ties, as numpy's argmax: a flat CAM points at cell (0, 0)
    assert pointing_game(np.ones((4, 4)), miss, body)[0]
    # a canvas that leaves out voxel row 0 (cam_index -1): a tumour there is in no cell
    ri = np.array([-1, 0, 0, 1, 1, 2, 2, 3])
    ci = np.arange(8) // 2
    assert pointing_game(cam, miss, body, cam_index=(ri, ci)) == (False, 0.0)
    with pytest.raises(ValueError, match="no tumour"):
        pointing_game(cam, np.zeros((8, 8), dtype=bool), body)
