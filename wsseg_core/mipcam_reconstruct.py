"""MIP-CAM 3-D reconstruction: back-project each view's thresholded CAM, intersect, keep q % of each
component's SUVmax; the (t, q) Dice grid of the search.

Part of MIP-CAM (:mod:`wsseg_core.mipcam`, whose docstring describes the method, step 6);
re-exported there. Never imports ray.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from wsseg_core.metrics import dice_from_counts
from wsseg_core.mipcam_geometry import VIEWS, MipView, native_index


# --------------------------------------------------------------------------------------------------
# 3-D reconstruction
# --------------------------------------------------------------------------------------------------

def back_project(mask2d: np.ndarray, view: MipView, shape: Sequence[int]) -> np.ndarray:
    """A view's 2-D mask on the ``iso_mm`` grid -> 3-D bool volume of ``shape``: each native voxel
    takes its pixel (``native_index``) and the mask is repeated along ``view.proj_axis``."""
    m = np.asarray(mask2d, dtype=bool)
    if m.shape != view.shape:
        raise ValueError(f"{view.name} mask shape {m.shape} differs from the view's {view.shape}")
    ri = native_index(view.native_shape[0], view.native_spacing_mm[0], view.iso_mm)
    ci = native_index(view.native_shape[1], view.native_spacing_mm[1], view.iso_mm)
    native = m[np.ix_(ri, ci)]
    return np.broadcast_to(np.expand_dims(native, view.proj_axis), tuple(int(n) for n in shape))


def candidate_region(cams: Mapping[str, np.ndarray], views: Mapping[str, MipView], t: float,
                     shape: Sequence[int]) -> np.ndarray:
    """Back-projected coronal (CAM >= t) AND back-projected sagittal (CAM >= t): bool (X, Y, Z)."""
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"CAM threshold t must be in [0, 1], got {t!r}")
    region = np.ones(tuple(int(n) for n in shape), dtype=bool)
    for v in VIEWS:
        region &= back_project(np.asarray(cams[v]) >= t, views[v], shape)
    return region


_STRUCT26 = np.ones((3, 3, 3), dtype=bool)


def component_suvmax(suv: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per voxel of ``region``: the SUVmax of its 26-connected component (0 outside)."""
    labels, n = ndimage.label(region, structure=_STRUCT26)
    if n == 0:
        return np.zeros(region.shape, dtype=np.float32)
    mx = ndimage.maximum(suv, labels, np.arange(1, n + 1))
    lut = np.concatenate([[0.0], np.asarray(mx, dtype=np.float64)]).astype(np.float32)
    return lut[labels]


def segment_region(suv: np.ndarray, region: np.ndarray, q: float) -> np.ndarray:
    """uint8 mask: voxels of ``region`` with SUV >= q / 100 x SUVmax of their region component."""
    if not 0.0 <= float(q) <= 100.0:
        raise ValueError(f"q must be a percentage of SUVmax in [0, 100], got {q!r}")
    suv = np.asarray(suv, dtype=np.float32)
    ref = component_suvmax(suv, region)
    return (region & (suv >= np.float32(q / 100.0) * ref) & (ref > 0)).astype(np.uint8)


def reconstruct(suv: np.ndarray, cams: Mapping[str, np.ndarray], views: Mapping[str, MipView],
                t: float, q: float) -> np.ndarray:
    """The whole 3-D step: candidate region at CAM threshold t, then q % of component SUVmax."""
    return segment_region(suv, candidate_region(cams, views, t, np.shape(suv)), q)


def dice_grid(suv: np.ndarray, seg: np.ndarray, cams: Mapping[str, np.ndarray],
              views: Mapping[str, MipView], t_grid: Sequence[float], q_grid: Sequence[float]
              ) -> np.ndarray:
    """3-D Dice for every (t, q) (T, Q); NaN rows when ``seg`` is empty. One labelling per t."""
    seg = np.asarray(seg) > 0
    n_ref = int(seg.sum())
    # |pred & ref| and |pred| per grid point; an empty candidate region leaves its row at 0 (Dice 0).
    inter = np.zeros((len(t_grid), len(q_grid)), dtype=np.int64)
    n_pred = np.zeros_like(inter)
    if n_ref == 0:
        return dice_from_counts(inter, n_pred, n_ref)  # all NaN: skip the labelling
    suv = np.asarray(suv, dtype=np.float32)
    for i, t in enumerate(t_grid):
        region = candidate_region(cams, views, float(t), suv.shape)
        idx = np.flatnonzero(region)
        if idx.size == 0:
            continue
        rel = suv.ravel()[idx] / np.maximum(component_suvmax(suv, region).ravel()[idx], 1e-12)
        ref = seg.ravel()[idx]
        for j, q in enumerate(q_grid):
            keep = rel >= q / 100.0
            inter[i, j] = int((keep & ref).sum())
            n_pred[i, j] = int(keep.sum())
    return dice_from_counts(inter, n_pred, n_ref)
