"""Per-study metrics: 3-D Dice, metabolic tumour volume (MTV, ml), total lesion glycolysis (TLG, g).

Masks are anything ``> 0`` (uint8 {0, 1}, bool or labels). SUV is in g/ml, so SUV x ml = g.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["dice", "voxel_volume_ml", "mtv_ml", "tlg_g", "study_metrics", "false_positive_volume_ml",
           "false_negative_volume_ml", "hd95_mm", "ude_mm", "lesion_detection", "extra_metrics"]


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
    pred: np.ndarray, ref: np.ndarray | None, suv: np.ndarray, voxel_ml: float,
    spacing_mm: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float | int | None]:
    """The per-(study, method) numbers of the metrics table.

    Args:
        pred: predicted mask; ref: reference mask or None (unlabeled study);
        suv: SUV volume (g/ml); voxel_ml: voxel volume (ml);
        spacing_mm: ``(3,)`` voxel size (mm); when given, the :func:`extra_metrics` keys are added.

    Returns:
        ``dict(dice, mtv_true_ml, mtv_pred_ml, tlg_true_g, tlg_pred_g)``; the reference-based values
        (dice and the true ones) are NaN when ``ref`` is None. With ``spacing_mm`` also ``fpv_ml,
        fnv_ml, hd95_mm, ude_mm, n_ref_lesions, n_ref_detected, n_pred_lesions, n_pred_false``.
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
    if spacing_mm is not None:
        out.update(extra_metrics(pred, ref, voxel_ml, spacing_mm))
    return out


# --- autoPET challenge metrics, surface distance, lesion-wise detection -----------------------------

def _structure_18() -> np.ndarray:
    """18-connectivity (faces and edges, not corners), as in the autoPET challenge evaluation."""
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, 2)


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, r = _as_mask(pred), _as_mask(ref)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} differs from ref shape {r.shape}")
    if p.ndim != 3:
        raise ValueError(f"expected 3-D masks, got {p.ndim}-D")
    return p, r


def _component_hits(mask: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 18-connected component of ``mask``: its size (voxels) and whether it touches ``other``.

    One labelling and two bincounts instead of a loop over components: a whole-body prediction can
    hold thousands of small components.
    """
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=_structure_18())
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    overlap = np.bincount(lab[other].ravel(), minlength=n + 1)[1:]
    return sizes, overlap > 0


def false_positive_volume_ml(pred: np.ndarray, ref: np.ndarray, voxel_ml: float) -> float:
    """autoPET false-positive volume (ml): predicted components that overlap no reference voxel.

    Components are 18-connected. A predicted component touching the reference by even one voxel
    counts zero; one touching nothing counts with its whole volume. On a negative study (empty
    reference) that is the whole predicted volume.

    Args:
        pred, ref: masks of equal shape (voxels ``> 0`` are foreground); voxel_ml: voxel volume (ml).
    """
    p, r = _pair(pred, ref)
    sizes, hit = _component_hits(p, r)
    return float(sizes[~hit].sum()) * float(voxel_ml)


def false_negative_volume_ml(pred: np.ndarray, ref: np.ndarray, voxel_ml: float) -> float:
    """autoPET false-negative volume (ml): reference components that the prediction does not touch.

    Components are 18-connected. NaN on a negative study (empty reference): nothing can be missed,
    and a 0 there would pull per-method medians toward zero.

    Args:
        pred, ref: masks of equal shape (voxels ``> 0`` are foreground); voxel_ml: voxel volume (ml).
    """
    p, r = _pair(pred, ref)
    if not r.any():
        return float("nan")
    sizes, hit = _component_hits(r, p)
    return float(sizes[~hit].sum()) * float(voxel_ml)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # Voxels outside the array count as background (border_value=0), so a mask touching the
    # volume's edge has a surface there.
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _surface_distances(pred: np.ndarray, ref: np.ndarray,
                       spacing_mm: Sequence[float] | np.ndarray) -> np.ndarray | None:
    """Distances (mm) from every surface voxel of each mask to the other mask's surface, both
    directions concatenated (pred -> ref first). None when either mask is empty.

    Surface = mask & ~binary_erosion(mask) (6-connected erosion; voxels outside the array are
    background). Euclidean distance with the anisotropic ``spacing_mm`` between voxel centres.
    """
    from scipy import ndimage

    p, r = _pair(pred, ref)
    if not p.any() or not r.any():
        return None
    spacing = np.asarray(spacing_mm, dtype=float).ravel()
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be 3 positive values in mm, got {spacing.tolist()}")
    # Crop to the union's bounding box + 1 voxel: every surface voxel lies inside, so distances are
    # unchanged, and a whole-body volume costs a small box instead of 50 M voxels per transform.
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    # Surfaces from the full volume (edge voxels of the array stay surface), then cropped.
    sp, sr = _surface(p)[box], _surface(r)[box]
    d_to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return np.concatenate([d_to_r[sp], d_to_p[sr]])


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | np.ndarray) -> float:
    """95th percentile of the symmetric surface distances (mm), the "HD95".

    Surface = mask & ~binary_erosion(mask) (6-connected erosion). For every surface voxel of one
    mask, the Euclidean distance (in mm, anisotropic ``spacing_mm``) to the nearest surface voxel of
    the other; both directions are pooled and the 95th percentile (linear) is taken.

    Args:
        pred, ref: 3-D masks of equal shape; spacing_mm: ``(3,)`` voxel size in mm.

    Returns:
        HD95 in mm; NaN when either mask is empty (no surface to measure from).
    """
    d = _surface_distances(pred, ref, spacing_mm)
    return float("nan") if d is None else float(np.percentile(d, 95))


def ude_mm(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | np.ndarray) -> float:
    """Unsigned distance error (Afshari et al.; the QIN PET challenge's UDE): the mean symmetric
    surface distance in mm.

    The same surface distances as :func:`hd95_mm` (every surface voxel of each mask to the nearest
    surface voxel of the other, both directions pooled), averaged: ``(sum_{s in S_p} d(s, S_r) +
    sum_{s in S_r} d(s, S_p)) / (|S_p| + |S_r|)``. 0 for identical masks.

    Args:
        pred, ref: 3-D masks of equal shape; spacing_mm: ``(3,)`` voxel size in mm.

    Returns:
        UDE in mm; NaN when either mask is empty (no surface to measure from, as for HD95), so a
        negative study or an empty prediction is left out of per-method medians, not counted as 0.
    """
    d = _surface_distances(pred, ref, spacing_mm)
    return float("nan") if d is None else float(d.mean())


def lesion_detection(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """Lesion-wise detection with 18-connected components.

    A reference lesion is detected if any predicted voxel overlaps it; a predicted component is
    false if it overlaps no reference voxel.

    Returns:
        ``dict(n_ref_lesions, n_ref_detected, n_pred_lesions, n_pred_false)`` (counts).
    """
    p, r = _pair(pred, ref)
    _, ref_hit = _component_hits(r, p)
    _, pred_hit = _component_hits(p, r)
    return {
        "n_ref_lesions": int(ref_hit.size),
        "n_ref_detected": int(ref_hit.sum()),
        "n_pred_lesions": int(pred_hit.size),
        "n_pred_false": int((~pred_hit).sum()),
    }


def extra_metrics(
    pred: np.ndarray,
    ref: np.ndarray | None,
    voxel_ml: float,
    spacing_mm: Sequence[float] | np.ndarray,
) -> dict[str, float | int | None]:
    """The autoPET / lesion-wise columns of one (study, method) row.

    Args:
        pred: predicted mask; ref: reference mask or None (unlabeled study);
        voxel_ml: voxel volume (ml); spacing_mm: ``(3,)`` voxel size (mm).

    Returns:
        ``dict(fpv_ml, fnv_ml, hd95_mm, ude_mm, n_ref_lesions, n_ref_detected, n_pred_lesions,
        n_pred_false)``. Without a reference every reference-based value is NaN (floats) or None
        (counts); ``n_pred_lesions`` is always counted.
    """
    if ref is None:
        from scipy import ndimage

        _, n_pred = ndimage.label(_as_mask(pred), structure=_structure_18())
        nan = float("nan")
        return {"fpv_ml": nan, "fnv_ml": nan, "hd95_mm": nan, "ude_mm": nan, "n_ref_lesions": None,
                "n_ref_detected": None, "n_pred_lesions": int(n_pred), "n_pred_false": None}
    d = _surface_distances(pred, ref, spacing_mm)  # once for both HD95 and UDE
    nan = float("nan")
    return {
        "fpv_ml": false_positive_volume_ml(pred, ref, voxel_ml),
        "fnv_ml": false_negative_volume_ml(pred, ref, voxel_ml),
        "hd95_mm": nan if d is None else float(np.percentile(d, 95)),
        "ude_mm": nan if d is None else float(d.mean()),
        **lesion_detection(pred, ref),
    }
