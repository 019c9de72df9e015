"""Per-study metrics: 3-D Dice, metabolic tumour volume (MTV, ml), total lesion glycolysis (TLG, g).

Masks are anything ``> 0`` (uint8 {0, 1}, bool or labels). SUV is in g/ml, so SUV x ml = g.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["dice", "voxel_volume_ml", "mtv_ml", "tlg_g", "study_metrics"]


def _as_mask(a: np.ndarray) -> np.ndarray:
    return np.asarray(a) > 0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """3-D Dice ``2|A∩B| / (|A| + |B|)``.

    Args:
        pred, ref: masks of equal shape; voxels ``> 0`` are foreground.

    Returns:
        Dice in [0, 1]; NaN when ``ref`` is empty (even if ``pred`` is empty too), as the metrics
        contract says: there is no tumour to overlap, and a 0 or 1 would bias per-method medians.
    """
    p, r = _as_mask(pred), _as_mask(ref)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} differs from ref shape {r.shape}")
    n_ref = int(np.count_nonzero(r))
    if n_ref == 0:
        return float("nan")
    inter = int(np.count_nonzero(p & r))
    return 2.0 * inter / (int(np.count_nonzero(p)) + n_ref)


def voxel_volume_ml(spacing_mm: np.ndarray | tuple[float, ...]) -> float:
    """Volume of one voxel in ml.

    Args:
        spacing_mm: ``(3,)`` voxel size in mm (``header.get_zooms()[:3]``), or a ``(4, 4)`` affine
            in mm, whose 3x3 block's ``|det|`` is the voxel volume also for oblique or flipped axes.

    Returns:
        ``prod(spacing) / 1000`` (mm^3 -> ml).
    """
    a = np.asarray(spacing_mm, dtype=float)
    if a.shape == (4, 4):
        vol_mm3 = abs(float(np.linalg.det(a[:3, :3])))
    elif a.shape == (3,):
        if np.any(a <= 0):
            raise ValueError(f"spacing must be positive (mm), got {a.tolist()}")
        vol_mm3 = float(np.prod(a))
    else:
        raise ValueError(f"expected a (3,) spacing in mm or a (4, 4) affine, got shape {a.shape}")
    if not math.isfinite(vol_mm3) or vol_mm3 <= 0:
        raise ValueError(f"voxel volume must be finite and positive, got {vol_mm3} mm^3")
    return vol_mm3 / 1000.0


def mtv_ml(mask: np.ndarray, voxel_ml: float) -> float:
    """Metabolic tumour volume: number of mask voxels x voxel volume (ml)."""
    return int(np.count_nonzero(_as_mask(mask))) * float(voxel_ml)


def tlg_g(mask: np.ndarray, suv: np.ndarray, voxel_ml: float) -> float:
    """Total lesion glycolysis: sum of SUV (g/ml) over the mask x voxel volume (ml) -> g.

    Equal to SUVmean x MTV, the paper's definition, without dividing by zero for an empty mask
    (TLG 0 g there).
    """
    m = _as_mask(mask)
    suv = np.asarray(suv)
    if m.shape != suv.shape:
        raise ValueError(f"mask shape {m.shape} differs from suv shape {suv.shape}")
    # float64 accumulation: a float32 sum over ~10^5 voxels loses grams.
    return float(np.sum(suv[m], dtype=np.float64)) * float(voxel_ml)


def study_metrics(
    pred: np.ndarray, ref: np.ndarray | None, suv: np.ndarray, voxel_ml: float
) -> dict[str, float]:
    """The per-(study, method) numbers of the metrics table.

    Args:
        pred: predicted mask; ref: reference mask or None (unlabeled study);
        suv: SUV volume (g/ml); voxel_ml: voxel volume (ml).

    Returns:
        ``dict(dice, mtv_true_ml, mtv_pred_ml, tlg_true_g, tlg_pred_g)``; the reference-based values
        (dice and the true ones) are NaN when ``ref`` is None.
    """
    nan = float("nan")
    out = {
        "dice": nan,
        "mtv_true_ml": nan,
        "mtv_pred_ml": mtv_ml(pred, voxel_ml),
        "tlg_true_g": nan,
        "tlg_pred_g": tlg_g(pred, suv, voxel_ml),
    }
    if ref is not None:
        out["dice"] = dice(pred, ref)
        out["mtv_true_ml"] = mtv_ml(ref, voxel_ml)
        out["tlg_true_g"] = tlg_g(ref, suv, voxel_ml)
    return out
