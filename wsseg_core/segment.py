"""CAM-based segmentation (Früh et al. 2021, Algorithm 1) and the global-threshold baseline.

Units: SUV volumes in g/ml (dimensionless SUV), CAMs normalised to [0, 1], CAM thresholds ``t`` in
[0, 1], percentiles ``q`` in percent (0-100). Volumes are ``(X, Y, Z)`` arrays, slice ``z`` is
``vol[:, :, z]``; masks come back as ``bool`` (one slice) or ``uint8`` {0, 1} (a volume).

Reading of Algorithm 1 (the paper's text and pseudo-code disagree in two places):

* Step 4-5 literally take the percentile of ``H'' = X ⊙ H'``, an image that is zero outside the CAM
  region, so the zeros of the whole slice would enter the percentile and drag ``t_q`` to ~0 for any
  q below the fraction of the slice outside the region (i.e. always). The text says "a fixed
  percentile q_m of the SUV distribution *inside the masked region*"; we follow the text: the
  percentile is taken over the SUV values of the region's voxels only.
* Step 6 writes ``H >= t_q`` with H the CAM, which compares a CAM in [0, 1] with an SUV threshold;
  it can only mean the SUV inside the region. The mask is ``region & (SUV >= t_q)``; ``>=`` as in
  step 6 (the text's "larger than" differs only on ties). Intersecting with the region keeps the mask
  inside the CAM region even if ``t_q <= 0``, which is what ``X ⊙ H'`` intends.
* The paper reports q_m as "0.31": the 31st percentile, so ``q`` is stored in percent (31.0), the
  unit ``np.percentile`` takes.

Extension (issue 16), ``grow``: Algorithm 1's mask never leaves the CAM region, so a lesion larger
than the region (a coarse CAM, or a t chosen on validation studies with smaller lesions) is cut at
the region's border even where its SUV stays above t_q. ``grow="slice"`` is a hysteresis step:
the mask becomes the connected components (8-connected, within the slice) of ``SUV >= t_q`` that
hold at least one voxel of Algorithm 1's mask - the CAM says where, the SUV says how far. It only
adds voxels (Algorithm 1's mask is a subset), uses the same t_q, and adds no parameter; with
``--grow auto`` the pipeline chooses it on the tuning studies jointly with (t, q) (``GROW_MODES``;
"none", the paper's Algorithm 1, wins ties). Not the pipeline's default: it also follows SUV >= t_q
into physiological uptake connected to the seed (docs/EXPERIMENTS.md, issue 16). Step 1 (which slices) is
unchanged: nothing grows into a slice the classifier did not flag.

Extension (issue 16), ``q_rule``: step 5's percentile of the region's SUVs depends on what the
region holds: a region mostly inside a large hot lesion keeps only the lesion's hottest (100 - q) %,
one mostly background keeps background. ``q_rule="max"`` takes ``t_q = q/100 x`` the SUVmax inside
the region instead: the fixed-%-of-SUVmax isocontour of clinical PET (EANM 41 %), the reading the
Threshold baseline already uses (``reference="max"``), here local to the CAM region. "percentile"
is the paper's step 5 and these functions' default; the pipeline's default (``--q-rule auto``)
chooses between the two on the tuning studies jointly with (t, q) (``Q_RULES``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from wsseg_core.metrics import dice_from_counts
# The paper's (t_m, q_m) and the pipeline's Threshold reference belong to the thresholds.json format;
# re-exported here, where the segmenters that take them live.
from wsseg_core.thresholds import PAPER_THRESHOLDS, THRESHOLD_REFERENCE

__all__ = [
    "PAPER_THRESHOLDS",
    "T_GRID",
    "Q_GRID",
    "GROW_MODES",
    "Q_RULES",
    "grow_slice",
    "THRESHOLD_REFERENCE",
    "THRESHOLD_REFERENCES",
    "BODY_CT_HU",
    "BODY_SUV_FLOOR",
    "cam_region",
    "pointing_game",
    "segment_slice",
    "segment_volume",
    "dice_grid",
    "dice_grid_counts",
    "body_mask_slice",
    "threshold_slice",
    "threshold_volume",
    "threshold_dice_grid",
    "threshold_dice_grid_counts",
]

#: Search grids of the paper (2.2): 10 CAM thresholds, 20 SUV percentiles (percent).
T_GRID: np.ndarray = np.linspace(0.1, 0.9, 10)
Q_GRID: np.ndarray = np.linspace(20, 50, 20)

#: Reference distributions the global-threshold baseline can take its percentile from.
THRESHOLD_REFERENCES = ("slice", "body", "max")
#: CT body threshold (HU): soft tissue, fat (~-100 HU) and bone are above, air (-1000 HU) below.
BODY_CT_HU = -500.0
#: SUV body floor without CT: reconstructed air is ~0 with noise of a few hundredths, while the
#: lowest-uptake tissues (fat, lung) sit at SUV ~0.3-0.6, so 0.1 separates them with margin on both
#: sides (0.05 would let positive air noise and scatter halos into the "body").
BODY_SUV_FLOOR = 0.1

_PERCENTILE_METHOD = "linear"

#: How Algorithm 1's per-slice mask may be extended (module docstring): "none" (the paper's
#: Algorithm 1) or "slice" (hysteresis growth within the slice along SUV >= t_q).
GROW_MODES = ("none", "slice")
#: How step 5 turns q into the SUV threshold t_q (module docstring): "percentile" (the paper's:
#: the q-th percentile of the region's SUVs) or "max" (q % of the region's SUVmax).
Q_RULES = ("percentile", "max")
#: 8-connectivity in the slice: a lesion's diagonal neighbours are the same lesion.
_GROW_STRUCTURE = np.ones((3, 3), dtype=bool)

#: ``(ri (X,), ci (Y,))``: the CAM cell of each native row and column, -1 outside the network's
#: input (``wsseg_core.geometry.SliceGeometry.cam_index``).
CamIndex = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------
# helpers


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index for nearest-neighbour resizing, as torch computes it.

    ``src = floor(dst * n_in / n_out)``, evaluated exactly like PyTorch's CPU kernel
    (``torch.nn.functional.interpolate(mode="nearest")``): float32 scale and product, clamped, with
    its identity and exact-2x shortcuts. Exact rational arithmetic differs from torch for a few
    size pairs (e.g. 2 -> 82) by float32 rounding; matching torch bit for bit keeps these masks
    identical to any torch-side upsampling of the same CAM.
    """
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)


def _upsample_nearest(cam: np.ndarray, shape: tuple[int, int],
                      cam_index: CamIndex | None = None) -> np.ndarray:
    """The CAM itself resized to ``shape`` (nearest); thresholding commutes with this resize.

    ``cam_index``: ``(ri (X,), ci (Y,))`` CAM cell of each native row / column, -1 where the voxel
    lies outside the network's input (``wsseg_core.geometry.SliceGeometry.cam_index``); those
    voxels get -inf, below every threshold. None: ``floor(i h / X)`` (the whole slice resized).
    """
    cam = np.asarray(cam)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (h, w), got shape {cam.shape}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (X, Y) with positive sizes, got {shape}")
    if cam_index is None:
        ri = _nearest_index(cam.shape[0], int(shape[0]))
        ci = _nearest_index(cam.shape[1], int(shape[1]))
        return cam[np.ix_(ri, ci)]
    ri, ci = (np.asarray(a, dtype=np.int64) for a in cam_index)
    if ri.shape != (int(shape[0]),) or ci.shape != (int(shape[1]),):
        raise ValueError(f"cam_index must be ((X,), (Y,)) for shape {tuple(shape)}, got "
                         f"{ri.shape} and {ci.shape}")
    if ri.max(initial=-1) >= cam.shape[0] or ci.max(initial=-1) >= cam.shape[1]:
        raise ValueError(f"cam_index points past the {cam.shape} CAM")
    up = cam[np.ix_(np.maximum(ri, 0), np.maximum(ci, 0))]
    if (ri < 0).any() or (ci < 0).any():
        up = up.astype(np.result_type(up.dtype, np.float32))  # -inf needs a float
        up[ri < 0, :] = -np.inf
        up[:, ci < 0] = -np.inf
    return up


def _check_q(q: float | np.ndarray) -> None:
    qa = np.asarray(q, dtype=float)
    if not np.all((qa >= 0) & (qa <= 100)):
        raise ValueError(f"percentile q must be in [0, 100] (percent), got {q}")


def _check_flagged(flagged_z: np.ndarray | Sequence[int], n_z: int) -> np.ndarray:
    z = np.asarray(flagged_z)
    if z.size == 0:
        return np.zeros(0, dtype=np.int64)
    if z.ndim != 1 or z.dtype.kind not in "iu":
        raise ValueError(f"flagged_z must be a 1-D array of slice indices, got {z.dtype} {z.shape}")
    if z.min() < 0 or z.max() >= n_z:
        raise ValueError(f"flagged_z out of range [0, {n_z}): {z.min()}..{z.max()}")
    if np.unique(z).size != z.size:
        raise ValueError("flagged_z has repeated slice indices")
    return z.astype(np.int64)


def _check_cams(cams: np.ndarray, n: int) -> np.ndarray:
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != n:
        raise ValueError(f"cams must be (n_flagged={n}, h, w), got shape {cams.shape}")
    return cams


def _n_at_or_above(sorted_vals: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the (ascending) values are >= each threshold."""
    return sorted_vals.size - np.searchsorted(sorted_vals, thresholds, side="left")


def _reference_mask(seg: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if seg is None:
        return None
    ref = np.asarray(seg) > 0
    if ref.shape != shape:
        raise ValueError(f"seg shape {ref.shape} differs from suv shape {shape}")
    return ref


# --------------------------------------------------------------------------------------------------
# Algorithm 1


def cam_region(cam: np.ndarray, t: float, shape: tuple[int, int],
               cam_index: CamIndex | None = None) -> np.ndarray:
    """Candidate region of one slice: ``cam >= t`` upsampled nearest-neighbour to ``shape``.

    Args:
        cam: ``(h, w)`` CAM normalised to [0, 1] (e.g. 32x32 for a 256x256 input).
        t: CAM threshold t_m in [0, 1].
        shape: ``(X, Y)`` of the original slice in voxels (non-integer factors such as 32 -> 400
            are fine; the mapping is ``src = floor(dst * h / X)``, as torch's "nearest").
        cam_index: the CAM cell of each native row / column when the slice was not simply resized
            (preprocessing "resample_mm"; -1: outside the input, never in the region); None: the
            mapping above.

    Returns:
        ``bool (X, Y)``.
    """
    return _upsample_nearest(cam, shape, cam_index) >= t


def pointing_game(cam: np.ndarray, reference: np.ndarray, body: np.ndarray,
                  cam_index: CamIndex | None = None) -> tuple[bool, float]:
    """Does the CAM's hottest cell lie on the reference (Zhang et al.'s pointing game, per cell)?

    Why: Algorithm 1's Dice mixes where the CAM points with the SUV percentile that segments inside
    its region (at a high q a CAM covering the whole slice can score as well as one on the tumour),
    so this asks the CAM alone. A hit when the argmax cell (first one on ties) covers at least
    one reference voxel; chance: the share of the cells covering body or reference voxels that
    cover reference voxels, what a cell drawn at random from the body would hit.

    Args:
        cam: ``(h, w)`` CAM of one slice.
        reference: ``bool (X, Y)`` tumour voxels of the slice (at least one).
        body: ``bool (X, Y)`` body voxels (e.g. ``body_mask_slice``).
        cam_index: as for :func:`cam_region`; None: the slice was resized to the input.
    Returns:
        ``(hit, chance)``.
    """
    cam = np.asarray(cam)
    reference = np.asarray(reference, dtype=bool)
    if not reference.any():
        raise ValueError("the reference slice has no tumour voxel: the pointing game is undefined")
    h, w = cam.shape
    ids = np.arange(h * w, dtype=np.float64).reshape(h, w)
    cell = _upsample_nearest(ids, reference.shape, cam_index)  # -inf outside the input canvas
    tumour_cells = np.unique(cell[reference & np.isfinite(cell)])
    body_cells = np.unique(cell[(np.asarray(body, dtype=bool) | reference) & np.isfinite(cell)])
    hit = float(np.argmax(cam)) in set(tumour_cells.tolist())
    return bool(hit), float(len(tumour_cells) / max(len(body_cells), 1))


def _check_grow(grow: str) -> None:
    if grow not in GROW_MODES:
        raise ValueError(f"grow must be one of {GROW_MODES}, got {grow!r}")


def _check_q_rule(q_rule: str) -> None:
    if q_rule not in Q_RULES:
        raise ValueError(f"q_rule must be one of {Q_RULES}, got {q_rule!r}")


def _region_thresholds(vals: np.ndarray, q: float | np.ndarray, q_rule: str) -> np.ndarray:
    """t_q of step 5 from the region's SUVs (float64, non-empty) for each q (percent)."""
    if q_rule == "max":
        return (np.asarray(q, dtype=float) / 100.0) * vals.max()
    return np.percentile(vals, q, method=_PERCENTILE_METHOD)


def grow_slice(seed: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``candidates`` that hold a voxel of ``seed`` (hysteresis).

    Args:
        seed: ``bool (X, Y)`` (Algorithm 1's mask: the strong voxels).
        candidates: ``bool (X, Y)`` (``SUV >= t_q``: the weak voxels); seed voxels outside it are
            not kept, and do not connect anything.

    Returns:
        ``bool (X, Y)``, a superset of ``seed & candidates``.
    """
    seed = np.asarray(seed, dtype=bool)
    candidates = np.asarray(candidates, dtype=bool)
    if seed.shape != candidates.shape:
        raise ValueError(f"seed {seed.shape} and candidates {candidates.shape} differ in shape")
    lab, n = ndimage.label(candidates, structure=_GROW_STRUCTURE)
    if n == 0:
        return np.zeros(seed.shape, dtype=bool)
    keep = np.zeros(n + 1, dtype=bool)
    keep[lab[seed]] = True
    keep[0] = False
    return keep[lab]


def segment_slice(suv_slice: np.ndarray, cam: np.ndarray, t: float, q: float,
                  cam_index: CamIndex | None = None, grow: str = "none",
                  q_rule: str = "percentile") -> np.ndarray:
    """Algorithm 1, steps 2-6, for one slice the classifier called tumorous.

    Args:
        suv_slice: ``(X, Y)`` SUV (g/ml).
        cam: ``(h, w)`` CAM in [0, 1].
        t: CAM threshold t_m in [0, 1].
        q: SUV percentile q_m in percent, taken over the SUVs *inside* the CAM region (the text's
            reading, not the pseudo-code's ``X ⊙ H'``; see the module docstring).
        cam_index: CAM -> voxel map (:func:`cam_region`); None: the slice was resized.
        grow: "none" (Algorithm 1) or "slice": grown along ``suv >= t_q`` (:func:`grow_slice`).
        q_rule: "percentile" (Algorithm 1) or "max": ``t_q`` is q % of the region's SUVmax.

    Returns:
        ``bool (X, Y)``: ``region & (suv >= t_q)`` (grown with ``grow="slice"``); all False if the
        region is empty.
    """
    _check_q(q)
    _check_grow(grow)
    _check_q_rule(q_rule)
    suv_slice = np.asarray(suv_slice)
    if suv_slice.ndim != 2:
        raise ValueError(f"suv_slice must be 2-D (X, Y), got shape {suv_slice.shape}")
    region = cam_region(cam, t, suv_slice.shape, cam_index)
    if not region.any():
        return region
    # float64 throughout so that dice_grid's vectorised percentiles compare identically.
    suv64 = suv_slice.astype(np.float64, copy=False)
    t_q = _region_thresholds(suv64[region], q, q_rule)
    above = suv64 >= t_q
    if grow == "slice":
        return grow_slice(region & above, above)
    return region & above


def segment_volume(
    suv: np.ndarray,
    flagged_z: np.ndarray | Sequence[int],
    cams: np.ndarray,
    t: float,
    q: float,
    cam_index: CamIndex | None = None,
    grow: str = "none",
    q_rule: str = "percentile",
) -> np.ndarray:
    """Algorithm 1 over a volume: each flagged slice segmented with its CAM, the rest left empty.

    Args:
        suv: ``(X, Y, Z)`` SUV (g/ml).
        flagged_z: ``(n,)`` distinct indices of the slices the classifier called tumorous.
        cams: ``(n, h, w)`` CAMs in [0, 1], ``cams[i]`` belongs to slice ``flagged_z[i]``.
        t: CAM threshold t_m in [0, 1].
        q: SUV percentile q_m in percent.
        cam_index: CAM -> voxel map of the study's slices (:func:`cam_region`); None: resized.
        grow: "none" (Algorithm 1) or "slice" (:func:`segment_slice`).
        q_rule: "percentile" (Algorithm 1) or "max" (:func:`segment_slice`).

    Returns:
        ``uint8 (X, Y, Z)`` mask in {0, 1}.
    """
    _check_grow(grow)
    _check_q_rule(q_rule)
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D (X, Y, Z), got shape {suv.shape}")
    z = _check_flagged(flagged_z, suv.shape[2])
    out = np.zeros(suv.shape, dtype=np.uint8)
    if z.size == 0:
        return out
    cams = _check_cams(cams, z.size)
    for zi, cam in zip(z, cams):
        out[:, :, zi] = segment_slice(suv[:, :, zi], cam, t, q, cam_index, grow, q_rule)
    return out


def dice_grid(
    suv: np.ndarray,
    seg: np.ndarray | None,
    flagged_z: np.ndarray | Sequence[int],
    cams: np.ndarray,
    t_grid: Sequence[float] | np.ndarray = T_GRID,
    q_grid: Sequence[float] | np.ndarray = Q_GRID,
    cam_index: CamIndex | None = None,
    grow: str = "none",
    q_rule: str = "percentile",
) -> np.ndarray:
    """3-D Dice of Algorithm 1 for every ``(t, q)`` of one study: :func:`dice_grid_counts` as Dice.

    Returns:
        ``float (len(t_grid), len(q_grid))``; all NaN when the reference is empty or None.
    """
    return dice_from_counts(*dice_grid_counts(suv, seg, flagged_z, cams, t_grid, q_grid, cam_index, grow,
                                              q_rule))


def dice_grid_counts(
    suv: np.ndarray,
    seg: np.ndarray | None,
    flagged_z: np.ndarray | Sequence[int],
    cams: np.ndarray,
    t_grid: Sequence[float] | np.ndarray = T_GRID,
    q_grid: Sequence[float] | np.ndarray = Q_GRID,
    cam_index: CamIndex | None = None,
    grow: str = "none",
    q_rule: str = "percentile",
    per_slice: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The voxel counts behind the 3-D Dice of Algorithm 1 for every ``(t, q)`` of one study.

    Equals ``dice(segment_volume(suv, flagged_z, cams, t, q), seg)`` for each grid point, without
    building any 3-D mask: per slice and t the region is formed once, all q percentiles come from
    one ``np.percentile`` call, and only the counts ``|pred|`` and ``|pred ∩ ref|`` are accumulated
    (by binary search in the sorted region SUVs).

    Args:
        suv: ``(X, Y, Z)`` SUV (g/ml).
        seg: ``(X, Y, Z)`` reference mask (anything > 0 is tumour), or None (no reference).
        flagged_z: ``(n,)`` flagged slice indices; cams: ``(n, h, w)`` CAMs in [0, 1].
        t_grid: CAM thresholds in [0, 1]; q_grid: SUV percentiles in percent.
        cam_index: CAM -> voxel map of the study's slices (:func:`cam_region`); None: resized.
        grow: "none" (Algorithm 1) or "slice" (:func:`segment_slice`); "slice" labels the slice's
            ``suv >= t_q`` once per grid point (no binary-search shortcut), so it costs more.
        q_rule: "percentile" (Algorithm 1) or "max" (:func:`segment_slice`).
        per_slice: return the counts of each flagged slice, ``(n, len(t_grid), len(q_grid))``
            (every step of Algorithm 1 is per slice, so any subset of the flagged slices sums to
            its own counts: the flag-rule search, issue 16); |pred| is then counted in tumour-free
            studies too (no reference: |pred ∩ ref| stays 0).

    Returns:
        ``(inter, n_pred, n_ref)``: ``int64 (len(t_grid), len(q_grid))`` |pred ∩ ref| and |pred|,
        and |ref| over the whole volume; the counts are all 0 when ``n_ref`` is 0 (Dice NaN)
        unless ``per_slice``.
    """
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D (X, Y, Z), got shape {suv.shape}")
    _check_grow(grow)
    _check_q_rule(q_rule)
    t_arr = np.asarray(t_grid, dtype=float).ravel()
    q_arr = np.asarray(q_grid, dtype=float).ravel()
    _check_q(q_arr)
    ref = _reference_mask(seg, suv.shape)
    shape = (t_arr.size, q_arr.size)
    n_ref = 0 if ref is None else int(ref.sum())
    z = _check_flagged(flagged_z, suv.shape[2])
    if per_slice:
        n_pred = np.zeros((z.size, *shape), dtype=np.int64)
        inter = np.zeros((z.size, *shape), dtype=np.int64)
    else:
        n_pred = np.zeros(shape, dtype=np.int64)
        inter = np.zeros(shape, dtype=np.int64)
    if (n_ref == 0 and not per_slice) or t_arr.size == 0 or q_arr.size == 0:
        return inter, n_pred, n_ref
    if z.size:
        cams = _check_cams(cams, z.size)
    for k, (zi, cam) in enumerate(zip(z, cams if z.size else ())):
        s = suv[:, :, zi].astype(np.float64, copy=False)
        r = ref[:, :, zi] if ref is not None else np.zeros(s.shape, dtype=bool)
        n_out = n_pred[k] if per_slice else n_pred
        i_out = inter[k] if per_slice else inter
        up = _upsample_nearest(cam, s.shape, cam_index)
        for ti, t in enumerate(t_arr):
            region = up >= t
            if not region.any():
                continue
            vals = s[region]
            t_q = _region_thresholds(vals, q_arr, q_rule)
            if grow == "slice":
                for qi, tq in enumerate(t_q):
                    above = s >= tq
                    m = grow_slice(region & above, above)
                    n_out[ti, qi] += int(m.sum())
                    i_out[ti, qi] += int((m & r).sum())
                continue
            n_out[ti] += _n_at_or_above(np.sort(vals), t_q)
            ref_vals = vals[r[region]]
            if ref_vals.size:
                i_out[ti] += _n_at_or_above(np.sort(ref_vals), t_q)
    return inter, n_pred, n_ref


# --------------------------------------------------------------------------------------------------
# Global-threshold baseline (method "Threshold", paper 2.3.1)
#
# "A global threshold based on a fixed SUV percentile was applied to all images in which the
# classification network predicts a tumor", q searched on linspace(20, 50, 20). The literal reading
# (percentile of all voxels of the flagged slice) is degenerate: air is about half of a whole-body
# axial slice, so for q in 20..50 the threshold is ~0 and about half the slice (air included) is
# selected. Three explicit readings, selected by ``reference``:
#
#   "slice"  percentile q of all voxels of the slice: the literal reading, kept for comparison.
#   "body"   percentile q of the SUVs of the body voxels, mask restricted to the body. Removes the
#            air that makes "slice" degenerate while staying a percentile of the SUV distribution
#            as the paper says. Body = CT > -500 HU when CT is given, else SUV > BODY_SUV_FLOOR;
#            holes are filled per slice so lungs and bowel gas, which are body, count too.
#   "max"    q percent of the slice's SUVmax (the clinical fixed-%-of-SUVmax threshold; q = 41
#            is the EANM 41 % isocontour). Not a percentile, but the only reading under which a
#            20..50 grid selects lesion-sized regions.
#
# "max" is the default: with any true percentile (slice, body) q in 20..50 keeps 50..80 % of the
# reference voxels, i.e. hundreds of ml per flagged slice, far from the paper's Threshold results
# (median |dMTV| 44 ml, Dice 0.29); "max" is the reading compatible with those (small tumours
# overestimated, large ones underestimated, as the paper observes).


def body_mask_slice(
    suv_slice: np.ndarray, ct_slice: np.ndarray | None = None
) -> np.ndarray:
    """Body of one axial slice: ``CT > BODY_CT_HU`` (or ``SUV > BODY_SUV_FLOOR``), holes filled.

    Args:
        suv_slice: ``(X, Y)`` SUV (g/ml); used only when ``ct_slice`` is None.
        ct_slice: ``(X, Y)`` CT in HU on the SUV grid, or None.

    Returns:
        ``bool (X, Y)``. The scanner table (> -500 HU) is part of it when CT is used; its SUV is
        ~0, so it lowers the body percentile slightly.
    """
    if ct_slice is not None:
        raw = np.asarray(ct_slice) > BODY_CT_HU
    else:
        raw = np.asarray(suv_slice) > BODY_SUV_FLOOR
    return ndimage.binary_fill_holes(raw)


def _threshold_candidates(
    suv_slice: np.ndarray, reference: str, body_mask: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """(voxels allowed in the mask or None for all, reference SUVs) for one slice, float64."""
    if reference == "body":
        if body_mask is None:
            body_mask = body_mask_slice(suv_slice)
        body_mask = np.asarray(body_mask, dtype=bool)
        if body_mask.shape != suv_slice.shape:
            raise ValueError(f"body_mask shape {body_mask.shape} != slice shape {suv_slice.shape}")
        return body_mask, suv_slice[body_mask]
    return None, suv_slice.ravel()


def _check_reference(reference: str) -> None:
    if reference not in THRESHOLD_REFERENCES:
        raise ValueError(f"reference must be one of {THRESHOLD_REFERENCES}, got {reference!r}")


def _thresholds(ref_vals: np.ndarray, q: np.ndarray, reference: str) -> np.ndarray | None:
    """SUV thresholds for each q; None when the slice selects nothing (no reference, no uptake)."""
    if ref_vals.size == 0:
        return None
    if reference == "max":
        m = ref_vals.max()
        # A slice without positive uptake has no meaningful fraction of its max; without this,
        # q% of 0 would select every voxel.
        return None if m <= 0 else (q / 100.0) * m
    return np.percentile(ref_vals, q, method=_PERCENTILE_METHOD)


def threshold_slice(
    suv_slice: np.ndarray,
    q: float,
    reference: str = "max",
    body_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Global-threshold baseline on one flagged slice.

    Args:
        suv_slice: ``(X, Y)`` SUV (g/ml).
        q: percent: a percentile for ``"slice"`` / ``"body"``, a fraction of SUVmax for ``"max"``.
        reference: ``"slice"``, ``"body"`` or ``"max"`` (default); see the notes above.
        body_mask: ``(X, Y)`` body for ``"body"``; None derives it from the SUV
            (``SUV > BODY_SUV_FLOOR``, holes filled).

    Returns:
        ``bool (X, Y)``: ``SUV >= threshold`` (within the body for ``"body"``).
    """
    _check_reference(reference)
    _check_q(q)
    s = np.asarray(suv_slice)
    if s.ndim != 2:
        raise ValueError(f"suv_slice must be 2-D (X, Y), got shape {s.shape}")
    s = s.astype(np.float64, copy=False)
    allowed, ref_vals = _threshold_candidates(s, reference, body_mask)
    thr = _thresholds(ref_vals, np.asarray(q, dtype=float), reference)
    if thr is None:
        return np.zeros(s.shape, dtype=bool)
    mask = s >= thr
    return mask if allowed is None else mask & allowed


def threshold_volume(
    suv: np.ndarray,
    flagged_z: np.ndarray | Sequence[int],
    q: float,
    reference: str = "max",
    ct: np.ndarray | None = None,
) -> np.ndarray:
    """Method ``Threshold``: :func:`threshold_slice` on every flagged slice, others empty.

    Args:
        suv: ``(X, Y, Z)`` SUV (g/ml).
        flagged_z: ``(n,)`` distinct indices of the slices the classifier called tumorous.
        q: percent (see :func:`threshold_slice`).
        reference: ``"slice"``, ``"body"`` or ``"max"`` (default).
        ct: ``(X, Y, Z)`` CT in HU on the SUV grid; used for the body of ``"body"``, else ignored.

    Returns:
        ``uint8 (X, Y, Z)`` mask in {0, 1}.
    """
    _check_reference(reference)
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D (X, Y, Z), got shape {suv.shape}")
    if ct is not None and np.shape(ct) != suv.shape:
        raise ValueError(f"ct shape {np.shape(ct)} differs from suv shape {suv.shape}")
    z = _check_flagged(flagged_z, suv.shape[2])
    out = np.zeros(suv.shape, dtype=np.uint8)
    for zi in z:
        s = suv[:, :, zi]
        body = None
        if reference == "body":
            body = body_mask_slice(s, None if ct is None else ct[:, :, zi])
        out[:, :, zi] = threshold_slice(s, q, reference, body)
    return out


def threshold_dice_grid(
    suv: np.ndarray,
    seg: np.ndarray | None,
    flagged_z: np.ndarray | Sequence[int],
    q_grid: Sequence[float] | np.ndarray = Q_GRID,
    reference: str = "max",
    ct: np.ndarray | None = None,
) -> np.ndarray:
    """3-D Dice of :func:`threshold_volume` for every q of one study, from counts only
    (:func:`threshold_dice_grid_counts` as Dice).

    Returns:
        ``float (len(q_grid),)``; all NaN when the reference is empty or None.
    """
    return dice_from_counts(*threshold_dice_grid_counts(suv, seg, flagged_z, q_grid, reference, ct))


def threshold_dice_grid_counts(
    suv: np.ndarray,
    seg: np.ndarray | None,
    flagged_z: np.ndarray | Sequence[int],
    q_grid: Sequence[float] | np.ndarray = Q_GRID,
    reference: str = "max",
    ct: np.ndarray | None = None,
    per_slice: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The voxel counts behind :func:`threshold_dice_grid`.

    Args:
        suv: ``(X, Y, Z)`` SUV (g/ml); seg: reference mask (> 0 is tumour) or None.
        flagged_z: ``(n,)`` flagged slice indices.
        q_grid: percents; reference, ct: as for :func:`threshold_volume`.
        per_slice: the counts of each flagged slice, ``(n, len(q_grid))``, as for
            :func:`dice_grid_counts` (|pred| counted without a reference too).

    Returns:
        ``(inter, n_pred, n_ref)``: ``int64 (len(q_grid),)`` |pred ∩ ref| and |pred|, and |ref| over
        the whole volume; the counts are all 0 when ``n_ref`` is 0 (Dice NaN) unless ``per_slice``.
    """
    _check_reference(reference)
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D (X, Y, Z), got shape {suv.shape}")
    if ct is not None and np.shape(ct) != suv.shape:
        raise ValueError(f"ct shape {np.shape(ct)} differs from suv shape {suv.shape}")
    q_arr = np.asarray(q_grid, dtype=float).ravel()
    _check_q(q_arr)
    ref = _reference_mask(seg, suv.shape)
    n_ref = 0 if ref is None else int(ref.sum())
    z = _check_flagged(flagged_z, suv.shape[2])
    shape = (z.size, q_arr.size) if per_slice else (q_arr.size,)
    n_pred_all = np.zeros(shape, dtype=np.int64)
    inter_all = np.zeros(shape, dtype=np.int64)
    if (n_ref == 0 and not per_slice) or q_arr.size == 0:
        return inter_all, n_pred_all, n_ref
    if ref is None:
        ref = np.zeros(suv.shape, dtype=bool)
    for k, zi in enumerate(z):
        n_pred = n_pred_all[k] if per_slice else n_pred_all
        inter = inter_all[k] if per_slice else inter_all
        s = suv[:, :, zi].astype(np.float64, copy=False)
        body = None
        if reference == "body":
            body = body_mask_slice(s, None if ct is None else ct[:, :, zi])
        allowed, ref_vals = _threshold_candidates(s, reference, body)
        thr = _thresholds(ref_vals, q_arr, reference)
        if thr is None:
            continue
        r = ref[:, :, zi]
        if allowed is None:
            cand, cand_ref = s.ravel(), s[r]
        else:
            cand, cand_ref = ref_vals, s[allowed & r]
        n_pred += _n_at_or_above(np.sort(cand), thr)
        if cand_ref.size:
            inter += _n_at_or_above(np.sort(cand_ref), thr)
    return inter_all, n_pred_all, n_ref
