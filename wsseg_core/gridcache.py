"""A tuning cache holding only what the (t, q) Dice grids read: exact, and a few % of the volumes.

The threshold search (``jobs.tune_thresholds``) scores every validation study on the grid
``t >= t_min`` x ``q >= q_min`` with :func:`wsseg_core.segment.dice_grid` (Algorithm 1) and
:func:`wsseg_core.segment.threshold_dice_grid` (the Threshold baseline, reference ``"max"``). Those
read far less than the SUV, CT and SEG volumes:

* ``|ref|`` over the whole volume: one number (``n_ref``); SEG is read elsewhere only where a mask
  can be.
* Algorithm 1, per flagged slice: the region ``up(cam) >= t`` (nearest upsampling of the CAM, no
  component selection, nothing else) is monotone in ``t``: ``t >= t_min`` and ``up >= t`` give
  ``up >= t_min`` (one float comparison, transitive). So every region of the grid lies inside the
  region at ``t_min``, and its percentiles, ``|pred|`` and ``|pred ∩ ref|`` only involve those
  voxels' SUV and SEG bit. Their upsampled CAM value is ``cam[ri[x], ci[y]]`` with the same
  index maps as :func:`wsseg_core.segment._upsample_nearest`, so the CAMs stay at map resolution.
* Threshold ``"max"``, per flagged slice: the mask is ``SUV >= (q / 100) * SUVmax`` over the whole
  slice. ``q -> (q / 100) * m`` is monotone in IEEE arithmetic for ``m > 0`` (division and
  multiplication by a positive number are), so every mask of the grid lies inside the one at
  ``q_min``; the slice's SUVmax is kept as a number (it decides the thresholds and whether the
  slice counts at all, ``m <= 0`` selects nothing).

The cache therefore stores, per flagged slice, the voxels of the union of those supersets (the four
CAM methods' regions at ``t_min`` and the Threshold mask at ``q_min``) sparsely, in the slice's
row-major order (the order ``suv_slice[region]`` yields): flat in-slice index, SUV in its own
dtype, SEG bit; plus the CAMs, the slice SUVmax and ``n_ref``. The Dice grids computed from it
repeat the reference functions' arithmetic on exactly the same values, so they are bit-identical
(tests/test_gridcache.py compares them). A grid below ``t_min`` / ``q_min`` raises: the voxels it
would need were not kept.

Units: SUV g/ml, CAMs in [0, 1], ``t`` in [0, 1], ``q`` in percent; volumes ``(X, Y, Z)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from wsseg_core.segment import (_check_cams, _check_flagged, _check_q, _dice_from_counts,
                                _n_at_or_above, _nearest_index, _PERCENTILE_METHOD, _thresholds)

__all__ = ["GridCache", "build_grid_cache", "cache_dice_grid", "cache_threshold_dice_grid"]

#: The Threshold reference this cache can serve (the pipeline's THRESHOLD_REFERENCE). "slice" and
#: "body" take a percentile of the whole slice / body, which needs every voxel of it.
CACHE_REFERENCE = "max"


@dataclass(frozen=True)
class GridCache:
    """What the Dice grids of one study need (see the module docstring).

    Attributes:
        shape: ``(X, Y, Z)`` of the study's volumes.
        flagged_z: ``(n,)`` flagged slice indices.
        n_ref: tumour voxels in the whole volume (``seg > 0``).
        t_min: smallest CAM threshold the cache is exact for.
        q_min: smallest Threshold percent the cache is exact for.
        slice_max: ``(n,)`` float64 SUVmax of each flagged slice (g/ml).
        offsets: ``(n + 1,)`` int64; slice ``i``'s voxels are ``[offsets[i], offsets[i + 1])``.
        index: ``(N,)`` uint32 flat in-slice index ``x * Y + y``, ascending within a slice.
        suv: ``(N,)`` SUV of those voxels, the volume's dtype.
        ref: ``(N,)`` bool, ``seg > 0`` at those voxels.
        cams: method -> ``(n, h, w)`` CAMs at map resolution, their own dtype.
    """

    shape: tuple[int, int, int]
    flagged_z: np.ndarray
    n_ref: int
    t_min: float
    q_min: float
    slice_max: np.ndarray
    offsets: np.ndarray
    index: np.ndarray
    suv: np.ndarray
    ref: np.ndarray
    cams: dict[str, np.ndarray]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez`` (SEG bits packed 8 per byte); :meth:`from_arrays` inverts it."""
        return {"gc_shape": np.asarray(self.shape, dtype=np.int64),
                "flagged_z": np.asarray(self.flagged_z, dtype=np.int64),
                "n_ref": np.int64(self.n_ref), "t_min": np.float64(self.t_min),
                "q_min": np.float64(self.q_min), "slice_max": self.slice_max,
                "offsets": self.offsets, "index": self.index, "vox_suv": self.suv,
                "vox_ref": np.packbits(self.ref),
                **{f"cam_{m}": c for m, c in self.cams.items()}}

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> "GridCache":
        """The cache back from :meth:`to_arrays`' arrays (e.g. an ``np.load`` of its npz)."""
        index = np.asarray(a["index"])
        return cls(shape=tuple(int(v) for v in a["gc_shape"]), flagged_z=np.asarray(a["flagged_z"]),
                   n_ref=int(a["n_ref"]), t_min=float(a["t_min"]), q_min=float(a["q_min"]),
                   slice_max=np.asarray(a["slice_max"]), offsets=np.asarray(a["offsets"]),
                   index=index, suv=np.asarray(a["vox_suv"]),
                   ref=np.unpackbits(np.asarray(a["vox_ref"]), count=index.size).astype(bool),
                   cams={k[4:]: np.asarray(a[k]) for k in a.keys() if k.startswith("cam_")})

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays as stored (SEG packed)."""
        return int(sum(np.asarray(v).nbytes for v in self.to_arrays().values()))


def _gather_up(cam: np.ndarray, index: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
    """``_upsample_nearest(cam, shape_xy).ravel()[index]`` without building the full slice."""
    ri = _nearest_index(cam.shape[0], int(shape_xy[0]))
    ci = _nearest_index(cam.shape[1], int(shape_xy[1]))
    x, y = np.divmod(index.astype(np.int64), int(shape_xy[1]))
    return cam[ri[x], ci[y]]


def build_grid_cache(
    suv: np.ndarray,
    seg: np.ndarray | None,
    flagged_z: np.ndarray | Sequence[int],
    cams: Mapping[str, np.ndarray],
    t_min: float,
    q_min: float,
    reference: str = CACHE_REFERENCE,
) -> GridCache:
    """The compact cache of one study for grids with ``t >= t_min`` and ``q >= q_min``.

    Args:
        suv: ``(X, Y, Z)`` SUV (g/ml).
        seg: ``(X, Y, Z)`` reference (> 0 is tumour) or None (no reference: every Dice is NaN).
        flagged_z: ``(n,)`` flagged slice indices; cams: method -> ``(n, h, w)`` CAMs in [0, 1].
        t_min: the smallest CAM threshold any grid will use (e.g. ``min(T_GRID)``).
        q_min: the smallest Threshold percent any grid will use (e.g. ``min(Q_GRID)``).
        reference: the Threshold reference; only ``"max"`` (what the pipeline tunes) is possible.

    Returns:
        :class:`GridCache`.
    """
    if reference != CACHE_REFERENCE:
        raise ValueError(f"the grid cache holds what Threshold reference {CACHE_REFERENCE!r} needs; "
                         f"{reference!r} takes a percentile of every voxel of the slice")
    if not (np.isfinite(t_min) and np.isfinite(q_min)):
        raise ValueError(f"t_min and q_min must be finite, got {t_min}, {q_min}")
    _check_q(q_min)
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D (X, Y, Z), got shape {suv.shape}")
    if seg is not None and np.shape(seg) != suv.shape:
        raise ValueError(f"seg shape {np.shape(seg)} differs from suv shape {suv.shape}")
    if suv.shape[0] * suv.shape[1] > np.iinfo(np.uint32).max:
        raise ValueError(f"slice {suv.shape[:2]} too large for uint32 in-slice indices")
    z = _check_flagged(flagged_z, suv.shape[2])
    cams = {m: _check_cams(c, z.size) for m, c in cams.items()}
    shape_xy = suv.shape[:2]
    q_lo = np.array([float(q_min)])
    # np.float64, as dice_grid's t (an element of a float64 array): a Python float would be compared
    # in the CAM's float32 (NEP 50), a different test for values next to t_min.
    t_lo = np.float64(t_min)
    idx_parts, suv_parts, ref_parts = [], [], []
    offsets = np.zeros(z.size + 1, dtype=np.int64)
    slice_max = np.zeros(z.size, dtype=np.float64)
    for i, zi in enumerate(z):
        s = suv[:, :, zi]
        s64 = s.astype(np.float64, copy=False)
        # The same call threshold_dice_grid makes, so m and the lowest threshold are its values.
        m = s64.max()
        slice_max[i] = m
        thr = _thresholds(np.array([m]), q_lo, CACHE_REFERENCE)
        keep = np.zeros(shape_xy, dtype=bool) if thr is None else s64 >= thr[0]
        for c in cams.values():
            keep |= np.asarray(c[i])[np.ix_(_nearest_index(c.shape[1], shape_xy[0]),
                                            _nearest_index(c.shape[2], shape_xy[1]))] >= t_lo
        flat = np.flatnonzero(keep)  # ascending = row-major, the order of s[keep]
        idx_parts.append(flat.astype(np.uint32))
        suv_parts.append(s.ravel()[flat])
        ref_parts.append(np.zeros(flat.size, dtype=bool) if seg is None
                         else np.asarray(seg[:, :, zi]).ravel()[flat] > 0)
        offsets[i + 1] = offsets[i] + flat.size
    n_ref = 0 if seg is None else int(np.count_nonzero(np.asarray(seg) > 0))
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt))
    return GridCache(shape=tuple(int(v) for v in suv.shape), flagged_z=z, n_ref=n_ref,
                     t_min=float(t_min), q_min=float(q_min), slice_max=slice_max, offsets=offsets,
                     index=cat(idx_parts, np.uint32), suv=cat(suv_parts, suv.dtype),
                     ref=cat(ref_parts, bool), cams={m: np.asarray(c) for m, c in cams.items()})


def cache_dice_grid(
    cache: GridCache,
    method: str,
    t_grid: Sequence[float] | np.ndarray,
    q_grid: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """:func:`wsseg_core.segment.dice_grid` of the cached study with ``cache.cams[method]``.

    Args:
        cache: from :func:`build_grid_cache`; method: a CAM method it holds.
        t_grid: CAM thresholds, each ``>= cache.t_min`` (NaN allowed: an empty region, as there);
            q_grid: SUV percentiles in percent.

    Returns:
        ``float (len(t_grid), len(q_grid))``, bit-identical to ``dice_grid`` on the full volumes.
    """
    t_arr = np.asarray(t_grid, dtype=float).ravel()
    q_arr = np.asarray(q_grid, dtype=float).ravel()
    _check_q(q_arr)
    shape = (t_arr.size, q_arr.size)
    if cache.n_ref == 0 or t_arr.size == 0 or q_arr.size == 0:
        return np.full(shape, np.nan)
    below = t_arr[~np.isnan(t_arr)] < cache.t_min
    if below.any():
        raise ValueError(f"t grid goes below the cache's t_min={cache.t_min}: "
                         f"{t_arr[~np.isnan(t_arr)][below]}; rebuild the cache for it")
    cam = cache.cams[method]
    n_pred = np.zeros(shape, dtype=np.int64)
    inter = np.zeros(shape, dtype=np.int64)
    for i in range(cache.flagged_z.size):
        lo, hi = cache.offsets[i], cache.offsets[i + 1]
        if lo == hi:
            continue
        s = cache.suv[lo:hi].astype(np.float64, copy=False)
        r = cache.ref[lo:hi]
        up = _gather_up(cam[i], cache.index[lo:hi], cache.shape[:2])
        for ti, t in enumerate(t_arr):
            region = up >= t
            if not region.any():
                continue
            vals = s[region]
            t_q = np.percentile(vals, q_arr, method=_PERCENTILE_METHOD)
            n_pred[ti] += _n_at_or_above(np.sort(vals), t_q)
            ref_vals = vals[r[region]]
            if ref_vals.size:
                inter[ti] += _n_at_or_above(np.sort(ref_vals), t_q)
    return _dice_from_counts(inter, n_pred, cache.n_ref)


def cache_threshold_dice_grid(cache: GridCache, q_grid: Sequence[float] | np.ndarray) -> np.ndarray:
    """:func:`wsseg_core.segment.threshold_dice_grid` (reference ``"max"``) of the cached study.

    Args:
        cache: from :func:`build_grid_cache`; q_grid: percents of the slice SUVmax, each
            ``>= cache.q_min``.

    Returns:
        ``float (len(q_grid),)``, bit-identical to ``threshold_dice_grid`` on the full volumes.
    """
    q_arr = np.asarray(q_grid, dtype=float).ravel()
    _check_q(q_arr)
    if cache.n_ref == 0 or q_arr.size == 0:
        return np.full(q_arr.size, np.nan)
    if (q_arr < cache.q_min).any():
        raise ValueError(f"q grid goes below the cache's q_min={cache.q_min}: "
                         f"{q_arr[q_arr < cache.q_min]}; rebuild the cache for it")
    n_pred = np.zeros(q_arr.size, dtype=np.int64)
    inter = np.zeros(q_arr.size, dtype=np.int64)
    for i in range(cache.flagged_z.size):
        thr = _thresholds(cache.slice_max[i:i + 1], q_arr, CACHE_REFERENCE)
        if thr is None:
            continue
        lo, hi = cache.offsets[i], cache.offsets[i + 1]
        s = cache.suv[lo:hi].astype(np.float64, copy=False)
        n_pred += _n_at_or_above(np.sort(s), thr)
        s_ref = s[cache.ref[lo:hi]]
        if s_ref.size:
            inter += _n_at_or_above(np.sort(s_ref), thr)
    return _dice_from_counts(inter, n_pred, cache.n_ref)
