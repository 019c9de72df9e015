"""A tuning cache holding only what the (t, q) Dice grids read: exact, and a few % of the volumes.

The threshold search (``jobs.tune_thresholds``) scores every validation study on one grid
``t_grid x q_grid`` with :func:`wsseg_core.segment.dice_grid` (Algorithm 1, per CAM method) and
:func:`wsseg_core.segment.threshold_dice_grid` (the Threshold baseline). A study's Dice at a grid
point is ``2 |pred ∩ ref| / (|pred| + |ref|)`` with the counts summed over its flagged slices, so
all a trial needs of a study is, per method, the two integer tables ``|pred ∩ ref|`` and ``|pred|``
over the grid, and ``|ref|``: the cache stores exactly these, computed once by
:func:`wsseg_core.segment.dice_grid_counts` / :func:`threshold_dice_grid_counts` while the study's
volumes are in memory, plus the CAMs at map resolution and the flagged slice indices. A trial's
Dice comes from the same integers through the same ``metrics.dice_from_counts``, so it is
bit-identical to the full-volume computation.

Why counts and not the voxels: Algorithm 1's region ``up(cam) >= t`` (nearest upsampling, no
component selection) is monotone in t, so the voxels of the region at ``min(t_grid)`` - and, for
Threshold "max", of the mask at ``min(q_grid)`` - hold every voxel any grid point can select, and a
sparse cache of them (index, SUV, SEG bit) gives exact grids for any ``t >= t_min``. But a
min-max normalised CAM is >= 0.1 on most of a slice, so that superset is most of every flagged
slice: measured 93 % of the volume bytes on 64 x 64 x 40 phantoms (bench/bench_tuning.py, 40 of 40
slices flagged), far above the 5 % target. The counts cost ``O(|t_grid| |q_grid|)`` integers per
method whatever the study's size; the price is that the cache answers the grid it was built for
(a different grid, or a grid point outside it, raises: rebuild the cache).

Variants of Algorithm 1 (``wsseg_core.segment``'s ``grow`` and ``q_rule``, issue 16): the counts of
the paper's Algorithm 1 are stored under the method's name; those of another ``(grow, q_rule)``
under ``variant_key(method, variant)``, e.g. ``"CAM|none|max"``.

Flag rules (issue 16, ``wsseg_core.gate.FlagRule``): built with ``per_slice=True`` the cache keeps
the counts of each cached slice (``(n, T, Q)``; every step of Algorithm 1 and of the Threshold
baseline is per slice, so a subset's counts are the sum of its slices') and the study's slice
probabilities ``probs``; the cache then holds every slice any candidate rule can flag, and
``z=`` picks the slices of one rule, exactly as if the cache had been built for them alone.

Units: SUV g/ml, CAMs in [0, 1], ``t`` in [0, 1], ``q`` in percent; volumes ``(X, Y, Z)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from wsseg_core.metrics import dice_from_counts
from wsseg_core.segment import (THRESHOLD_REFERENCES, _check_cams, _check_flagged, _check_q,
                                _check_grow, _check_q_rule, dice_grid_counts,
                                threshold_dice_grid_counts)

__all__ = ["GridCache", "PAPER_VARIANT", "variant_key", "build_grid_cache", "cache_dice_grid",
           "cache_threshold_dice_grid", "cache_grid_counts", "cache_threshold_counts"]

#: ``(grow, q_rule)`` of the paper's Algorithm 1.
PAPER_VARIANT: tuple[str, str] = ("none", "percentile")


def variant_key(method: str, variant: Sequence[str] = PAPER_VARIANT) -> str:
    """The cache key of a CAM method's counts under an Algorithm-1 variant ``(grow, q_rule)``: the
    method's name for the paper's variant (caches written before variants existed read the same)."""
    grow, q_rule = variant
    _check_grow(grow)
    _check_q_rule(q_rule)
    return method if tuple(variant) == PAPER_VARIANT else f"{method}|{grow}|{q_rule}"


@dataclass(frozen=True)
class GridCache:
    """The Dice grids' inputs of one study.

    Attributes:
        flagged_z: ``(n,)`` flagged slice indices.
        n_ref: tumour voxels in the whole volume (``seg > 0``).
        t_grid: ``(T,)`` CAM thresholds the counts were taken at; q_grid: ``(Q,)`` percents.
        inter, n_pred: CAM method -> ``int64 (T, Q)`` |pred ∩ ref| and |pred| of Algorithm 1 (and
            ``variant_key(method, variant)`` -> the same for each other variant built).
        thr_inter, thr_n_pred: ``int64 (Q,)`` the same for the Threshold baseline.
        reference: the Threshold reference the baseline's counts used ("max", "body", "slice").
        cams: method -> ``(n, h, w)`` CAMs at map resolution, their own dtype.
        probs: ``(Z,)`` the study's slice probabilities (None: not recorded); with per-slice
            counts (``inter`` arrays ``(n, T, Q)``, ``thr_*`` ``(n, Q)``) a flag rule's slices are
            chosen from them.
    """

    flagged_z: np.ndarray
    n_ref: int
    t_grid: np.ndarray
    q_grid: np.ndarray
    inter: dict[str, np.ndarray]
    n_pred: dict[str, np.ndarray]
    thr_inter: np.ndarray
    thr_n_pred: np.ndarray
    reference: str
    cams: dict[str, np.ndarray]
    probs: np.ndarray | None = None

    @property
    def per_slice(self) -> bool:
        """Whether the counts are kept per cached slice (any subset can be scored)."""
        return np.ndim(self.thr_inter) == 2

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez``; :meth:`from_arrays` inverts it."""
        out = {"flagged_z": np.asarray(self.flagged_z, dtype=np.int64), "n_ref": np.int64(self.n_ref),
               "t_grid": self.t_grid, "q_grid": self.q_grid, "thr_inter": self.thr_inter,
               "thr_n_pred": self.thr_n_pred, "reference": np.array(self.reference)}
        for m in self.inter:
            out[f"inter_{m}"] = self.inter[m]
            out[f"n_pred_{m}"] = self.n_pred[m]
        out.update({f"cam_{m}": c for m, c in self.cams.items()})
        if self.probs is not None:
            out["probs"] = np.asarray(self.probs)
        return out

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> "GridCache":
        """The cache back from :meth:`to_arrays`' arrays (e.g. an ``np.load`` of its npz)."""
        def by_prefix(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: np.asarray(a[k]) for k in a.keys() if k.startswith(prefix)}

        return cls(flagged_z=np.asarray(a["flagged_z"]), n_ref=int(a["n_ref"]),
                   t_grid=np.asarray(a["t_grid"]), q_grid=np.asarray(a["q_grid"]),
                   inter=by_prefix("inter_"), n_pred=by_prefix("n_pred_"),
                   thr_inter=np.asarray(a["thr_inter"]), thr_n_pred=np.asarray(a["thr_n_pred"]),
                   reference=str(a["reference"]), cams=by_prefix("cam_"),
                   probs=np.asarray(a["probs"]) if "probs" in a.keys() else None)

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays."""
        return int(sum(np.asarray(v).nbytes for v in self.to_arrays().values()))


def _grid(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    g = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(g).all():
        raise ValueError(f"{name} must be finite, got {g}")
    return g


def build_grid_cache(
    suv: np.ndarray,
    seg: np.ndarray | None,
    flagged_z: np.ndarray | Sequence[int],
    cams: Mapping[str, np.ndarray],
    t_grid: Sequence[float] | np.ndarray,
    q_grid: Sequence[float] | np.ndarray,
    reference: str = "max",
    ct: np.ndarray | None = None,
    cam_index: tuple[np.ndarray, np.ndarray] | None = None,
    variants: Sequence[Sequence[str]] = (PAPER_VARIANT,),
    per_slice: bool = False,
    probs: np.ndarray | None = None,
) -> GridCache:
    """The cache of one study for the grid ``t_grid x q_grid``.

    Args:
        suv: ``(X, Y, Z)`` SUV (g/ml).
        seg: ``(X, Y, Z)`` reference (> 0 is tumour) or None (no reference: every Dice is NaN).
        flagged_z: ``(n,)`` flagged slice indices; cams: method -> ``(n, h, w)`` CAMs in [0, 1].
        t_grid: CAM thresholds; q_grid: percents (Algorithm 1's percentile and Threshold's q).
        reference, ct: the Threshold baseline's, as for :func:`wsseg_core.segment.threshold_volume`.
        cam_index: the CAM -> voxel map of the study's slices (``SliceGeometry.cam_index``; None:
            the slices were resized to the input), as for :func:`wsseg_core.segment.cam_region`.
        variants: the ``(grow, q_rule)`` of Algorithm 1 to count (``dice_grid_counts``), each
            under :func:`variant_key`.
        per_slice: keep each slice's counts (a flag rule's subset can then be scored, ``z=``).
        probs: ``(Z,)`` the study's slice probabilities, stored for the flag-rule search.

    Returns:
        :class:`GridCache`.
    """
    t_arr, q_arr = _grid(t_grid, "t_grid"), _grid(q_grid, "q_grid")
    _check_q(q_arr)
    if reference not in THRESHOLD_REFERENCES:
        raise ValueError(f"reference must be one of {THRESHOLD_REFERENCES}, got {reference!r}")
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3-D (X, Y, Z), got shape {suv.shape}")
    z = _check_flagged(flagged_z, suv.shape[2])
    cams = {m: np.asarray(_check_cams(c, z.size)) for m, c in cams.items()}
    inter, n_pred, n_ref = {}, {}, 0
    for m, c in cams.items():
        for v in variants:
            k = variant_key(m, v)
            inter[k], n_pred[k], n_ref = dice_grid_counts(suv, seg, z, c, t_arr, q_arr, cam_index,
                                                          grow=v[0], q_rule=v[1], per_slice=per_slice)
    thr_inter, thr_n_pred, n_ref = threshold_dice_grid_counts(suv, seg, z, q_arr, reference, ct,
                                                              per_slice=per_slice)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if probs.size != suv.shape[2]:
            raise ValueError(f"probs has {probs.size} values for {suv.shape[2]} slices")
    return GridCache(flagged_z=z, n_ref=int(n_ref), t_grid=t_arr, q_grid=q_arr, inter=inter,
                     n_pred=n_pred, thr_inter=thr_inter, thr_n_pred=thr_n_pred,
                     reference=reference, cams=cams, probs=probs)


def _rows(cache: GridCache, z: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
    """Rows of the cache's per-slice counts that hold slices ``z`` (None: every cached slice).
    Raises when a slice of ``z`` is not cached, or when the cache only holds totals and ``z`` is
    not exactly its slices."""
    if z is None:
        return None
    z = np.unique(np.asarray(z, dtype=np.int64))
    have = np.asarray(cache.flagged_z, dtype=np.int64)
    missing = np.setdiff1d(z, have)
    if missing.size:
        raise ValueError(f"slices {missing.tolist()} are not in the cache (cached: {have.tolist()}); "
                         "rebuild it with every slice the flag rules can flag")
    if not cache.per_slice:
        if z.size != np.unique(have).size:
            raise ValueError("this cache holds totals over its flagged slices only; rebuild it with "
                             "per_slice=True to score a subset")
        return None
    return np.isin(have, z)


def _summed(arr: np.ndarray, rows: np.ndarray | None, per_slice: bool) -> np.ndarray:
    if not per_slice:
        return arr
    return arr.sum(axis=0) if rows is None else arr[rows].sum(axis=0)


def cache_grid_counts(
    cache: GridCache,
    method: str,
    t_grid: Sequence[float] | np.ndarray,
    q_grid: Sequence[float] | np.ndarray,
    variant: Sequence[str] = PAPER_VARIANT,
    z: np.ndarray | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(|pred ∩ ref|, |pred|, |ref|)`` of a CAM method over the grid (``int64 (T, Q)``),
    summed over the cached slices ``z`` (None: all of them); see :func:`cache_dice_grid`."""
    t_arr = np.asarray(t_grid, dtype=float).ravel()
    q_arr = np.asarray(q_grid, dtype=float).ravel()
    ti = _positions(cache.t_grid, t_arr, "t", nan_ok=True)
    qi = _positions(cache.q_grid, q_arr, "q")
    key = variant_key(method, variant)
    if key not in cache.inter:
        raise KeyError(f"no counts of CAM method {key!r} in the cache ({sorted(cache.inter)}); "
                       "rebuild the cache with this variant")
    rows_z = _rows(cache, z)
    tot_inter = _summed(cache.inter[key], rows_z, cache.per_slice)
    tot_pred = _summed(cache.n_pred[key], rows_z, cache.per_slice)
    inter = np.zeros((t_arr.size, q_arr.size), dtype=np.int64)
    n_pred = np.zeros_like(inter)
    rows = ti >= 0
    inter[rows] = tot_inter[np.ix_(ti[rows], qi)]
    n_pred[rows] = tot_pred[np.ix_(ti[rows], qi)]
    return inter, n_pred, cache.n_ref


def cache_threshold_counts(cache: GridCache, q_grid: Sequence[float] | np.ndarray,
                           z: np.ndarray | Sequence[int] | None = None
                           ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(|pred ∩ ref|, |pred|, |ref|)`` of the Threshold baseline (``int64 (Q,)``) over the
    cached slices ``z`` (None: all)."""
    qi = _positions(cache.q_grid, np.asarray(q_grid, dtype=float).ravel(), "q")
    rows_z = _rows(cache, z)
    return (_summed(cache.thr_inter, rows_z, cache.per_slice)[qi],
            _summed(cache.thr_n_pred, rows_z, cache.per_slice)[qi], cache.n_ref)


def _positions(cached: np.ndarray, wanted: np.ndarray, name: str, nan_ok: bool = False) -> np.ndarray:
    """Index in ``cached`` of each wanted value (-1 for NaN where allowed); raises if one is absent."""
    pos = np.full(wanted.size, -1, dtype=np.int64)
    for i, v in enumerate(wanted):
        if nan_ok and np.isnan(v):
            continue
        hit = np.flatnonzero(cached == v)
        if hit.size == 0:
            raise ValueError(f"{name} value {v!r} is not in the cache's grid {cached.tolist()}; "
                             "rebuild the cache for this grid")
        pos[i] = hit[0]
    return pos


def cache_dice_grid(
    cache: GridCache,
    method: str,
    t_grid: Sequence[float] | np.ndarray,
    q_grid: Sequence[float] | np.ndarray,
    variant: Sequence[str] = PAPER_VARIANT,
    z: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """:func:`wsseg_core.segment.dice_grid` of the cached study with its CAMs of ``method``.

    Args:
        cache: from :func:`build_grid_cache`; method: a CAM method it holds.
        t_grid, q_grid: values of the cache's grids, any subset and order; a NaN t (the Threshold
            cell's) selects nothing, as in ``dice_grid`` (Dice 0 where a reference exists).
        variant: ``(grow, q_rule)`` of Algorithm 1; the cache must have been built with it.
        z: the flagged slices to score (a subset of the cached ones; per-slice caches only for a
            proper subset); None: every cached slice.

    Returns:
        ``float (len(t_grid), len(q_grid))``, bit-identical to ``dice_grid`` on the full volumes.
    """
    inter, n_pred, n_ref = cache_grid_counts(cache, method, t_grid, q_grid, variant, z)
    return dice_from_counts(inter, n_pred, n_ref)


def cache_threshold_dice_grid(cache: GridCache, q_grid: Sequence[float] | np.ndarray,
                              z: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """:func:`wsseg_core.segment.threshold_dice_grid` (the cache's reference) of the cached study,
    over the cached slices ``z`` (None: all).

    Returns:
        ``float (len(q_grid),)``, bit-identical to ``threshold_dice_grid`` on the full volumes.
    """
    return dice_from_counts(*cache_threshold_counts(cache, q_grid, z))
