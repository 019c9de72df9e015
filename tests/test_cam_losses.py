"""bench.cam_losses' bookkeeping on a slice worked out by hand (issue 16): every reference voxel in
one category, false positives split by whether their component holds tumour."""

from __future__ import annotations

import numpy as np

from bench.cam_losses import CATS, _fp_split, categorise


def test_categories_and_false_positives_by_hand() -> None:
    # 6x6x2: SUV 1, lesion SUV 10 at rows 2-3, cols 2-3 in both slices; only slice 1 flagged; the
    # CAM's region is rows 0-2 (a 2x2 CAM, top row hot).
    suv = np.ones((6, 6, 2))
    suv[2:4, 2:4, :] = 10.0
    ref = np.zeros(suv.shape, dtype=bool)
    ref[2:4, 2:4, :] = True
    cams = np.array([[[1.0, 1.0], [0.0, 0.0]]])
    z = np.array([1])
    cat, mask = categorise(suv, ref, z, cams, None, 0.5, 50.0, q_rule="max")
    counts = dict(zip(CATS, np.bincount(cat[ref], minlength=len(CATS))))
    # slice 0: 4 unflagged; slice 1: row 2 found (t_q = 5), row 3 outside the region
    assert counts == {"TP": 2, "unflag": 4, "region": 2, "pct": 0}
    assert _fp_split(mask, ref) == (0, 0)
    # the paper's percentile, q = 50: t_q = 1, the whole region (18 voxels) in one component with
    # the 2 lesion voxels: 16 false positives touching tumour, none elsewhere
    cat, mask = categorise(suv, ref, z, cams, None, 0.5, 50.0)
    assert mask.sum() == 18 and _fp_split(mask, ref) == (16, 0)
    # q = 99 (t_q = 10): the two lesion voxels; a hot spot outside the tumour adds a component
    suv[0, 5, 1] = 10.0
    cat, mask = categorise(suv, ref, z, cams, None, 0.5, 99.0, q_rule="max")
    assert _fp_split(mask, ref) == (0, 1)
    counts = dict(zip(CATS, np.bincount(cat[ref], minlength=len(CATS))))
    assert counts == {"TP": 2, "unflag": 4, "region": 2, "pct": 0}
