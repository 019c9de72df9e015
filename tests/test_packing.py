"""Issue 20: masks and SUV packed for the hand-over between scoring's GPU and CPU stages come back
exactly (masks) or exactly where the metrics read (SUV), and the metrics of a packed study equal
those of the original."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsseg_core.packing import crop_volume, pack_mask, uncrop_volume, union_box, unpack_mask


def _masks():
    rng = np.random.default_rng(0)
    shape = (13, 11, 9)
    yield np.zeros(shape, np.uint8)
    yield np.ones(shape, np.uint8)
    one = np.zeros(shape, np.uint8)
    one[12, 0, 8] = 1  # a corner voxel
    yield one
    yield (rng.random(shape) < 0.3).astype(np.uint8)
    labels = np.zeros(shape, np.int16)
    labels[2:5, 3:9, 1:4] = 7
    labels[6, 6, 6] = -3  # negative: background
    yield labels
    yield np.zeros((1, 1, 1), bool)
    yield np.ones((1, 5, 1), bool)


@pytest.mark.parametrize("i", range(7))
def test_pack_unpack_roundtrip(i):
    m = list(_masks())[i]
    p = pack_mask(m)
    back = unpack_mask(p)
    assert back.dtype == np.uint8 and back.shape == m.shape
    assert np.array_equal(back, (m > 0).astype(np.uint8))
    # bits: one per voxel of the box, rounded up to bytes
    n_box = int(np.prod(np.subtract(p["hi"], p["lo"])))
    assert len(p["bits"]) == (n_box + 7) // 8


def test_box_by_hand_and_union():
    m = np.zeros((10, 10, 10), np.uint8)
    m[2, 3, 4] = m[5, 8, 1] = 1
    p = pack_mask(m)
    assert p["lo"] == [2, 3, 1] and p["hi"] == [6, 9, 5]
    q = pack_mask(np.zeros_like(m))
    assert q["lo"] == q["hi"] == [0, 0, 0] and q["bits"] == b""
    r = np.zeros_like(m)
    r[9, 0, 9] = 1
    assert union_box([p, q, pack_mask(r)]) == ([2, 0, 1], [10, 9, 10])
    assert union_box([q]) is None


def test_crop_uncrop_volume():
    rng = np.random.default_rng(1)
    v = rng.random((8, 7, 6)).astype(np.float32)
    c = crop_volume(v, ([1, 2, 3], [5, 7, 4]))
    back = uncrop_volume(c)
    assert back.dtype == np.float32 and back.shape == v.shape
    assert np.array_equal(back[1:5, 2:7, 3:4], v[1:5, 2:7, 3:4])
    assert back.sum() == pytest.approx(v[1:5, 2:7, 3:4].sum())  # zero elsewhere
    empty = uncrop_volume(crop_volume(v, None))
    assert empty.shape == v.shape and not empty.any()


def test_packed_study_gives_the_same_metrics():
    """StudyMasks.pack / unpack: every metric of every method is the same as on the originals
    (TLG reads the SUV only inside the box that the packing keeps)."""
    from jobs.score_cohort import StudyMasks
    from wsseg_core.metrics import study_metrics
    from wsseg_core.phantom import make_phantom_study

    st = make_phantom_study(7, shape=(48, 48, 24))
    rng = np.random.default_rng(2)
    masks = {"a": (st.suv > 2.0).astype(np.uint8), "b": np.zeros(st.suv.shape, np.uint8),
             "c": (rng.random(st.suv.shape) < 0.01).astype(np.uint8)}
    sm = StudyMasks(suv=st.suv, seg=st.seg, affine=st.affine, spacing_mm=np.asarray(st.spacing_mm),
                    probs=rng.random(24).astype(np.float32), n_flagged=5, masks=masks)
    blob = sm.pack()
    back = StudyMasks.unpack(blob)
    # the random mask spans the volume, so the SUV travels whole here; the masks go as bits
    assert len(blob) < st.suv.nbytes + sum(v.nbytes for v in masks.values()) / 4
    assert np.array_equal(back.seg, st.seg) and np.array_equal(back.probs, sm.probs)
    assert np.array_equal(back.affine, st.affine) and back.n_flagged == 5
    for m in masks:
        assert np.array_equal(back.masks[m], masks[m])
        want = study_metrics(masks[m], st.seg, st.suv, sm.voxel_volume_ml, spacing_mm=st.spacing_mm)
        got = study_metrics(back.masks[m], back.seg, back.suv, back.voxel_volume_ml,
                            spacing_mm=back.spacing_mm)
        for k, w in want.items():
            g = got[k]
            assert (isinstance(w, float) and math.isnan(w) and math.isnan(g)) or g == w, (m, k, g, w)
    # an unlabeled study: no reference to pack
    sm.seg = None
    assert StudyMasks.unpack(sm.pack()).seg is None
