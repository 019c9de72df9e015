"""Compact, exact forms of a study's masks and SUV for passing between processes.

Scoring builds the masks where the GPU is and measures and writes them elsewhere (on CPU workers):
the masks travel through Ray's object store, so they travel small. A mask becomes its bounding box
and the box's voxels as packed bits (1 bit per voxel instead of a 400 x 400 x 326 uint8 volume's
52 MB); the SUV travels only inside the bounding box of everything the metrics read from it (the
masks and the reference), which is all that TLG sums over. Unpacking restores arrays of the full
shape, identical where the metrics look.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["pack_mask", "unpack_mask", "union_box", "crop_volume", "uncrop_volume"]


def _box_of(m: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    nz = [np.flatnonzero(m.any(axis=tuple(j for j in range(m.ndim) if j != i))) for i in range(m.ndim)]
    if nz[0].size == 0:
        return None
    return (np.array([a[0] for a in nz], np.int64), np.array([a[-1] + 1 for a in nz], np.int64))


def _slices(lo: Iterable[int], hi: Iterable[int]) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def pack_mask(mask: np.ndarray) -> dict:
    """``mask > 0`` as ``{"shape", "lo", "hi", "bits"}``: its bounding box (``lo`` inclusive, ``hi``
    exclusive voxel indices) and the box's voxels, C order, as ``np.packbits`` bytes. An empty mask
    has ``lo == hi == 0`` and no bits."""
    m = np.asarray(mask) > 0
    box = _box_of(m)
    if box is None:
        zero = [0] * m.ndim
        return {"shape": list(m.shape), "lo": zero, "hi": zero, "bits": b""}
    lo, hi = box
    return {"shape": list(m.shape), "lo": lo.tolist(), "hi": hi.tolist(),
            "bits": np.packbits(m[_slices(lo, hi)].ravel()).tobytes()}


def unpack_mask(packed: dict) -> np.ndarray:
    """The uint8 {0, 1} volume of the full shape that :func:`pack_mask` packed."""
    out = np.zeros(tuple(packed["shape"]), np.uint8)
    lo, hi = packed["lo"], packed["hi"]
    n = int(np.prod([b - a for a, b in zip(lo, hi)]))
    if n:
        bits = np.unpackbits(np.frombuffer(packed["bits"], np.uint8), count=n)
        out[_slices(lo, hi)] = bits.reshape([b - a for a, b in zip(lo, hi)])
    return out


def union_box(packed: Iterable[dict]) -> tuple[list[int], list[int]] | None:
    """The bounding box of several packed masks' boxes (None if all are empty)."""
    boxes = [(p["lo"], p["hi"]) for p in packed if p["bits"]]
    if not boxes:
        return None
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    return lo.tolist(), hi.tolist()


def crop_volume(volume: np.ndarray, box: tuple[list[int], list[int]] | None) -> dict:
    """``volume`` inside ``box`` (a copy) with the shape to restore; nothing when ``box`` is None."""
    v = np.asarray(volume)
    if box is None:
        return {"shape": list(v.shape), "lo": None, "hi": None, "dtype": v.dtype.str, "data": None}
    lo, hi = box
    return {"shape": list(v.shape), "lo": list(lo), "hi": list(hi), "dtype": v.dtype.str,
            "data": np.ascontiguousarray(v[_slices(lo, hi)])}


def uncrop_volume(cropped: dict) -> np.ndarray:
    """A full-shape volume, zero outside the box that :func:`crop_volume` kept.

    ``np.zeros`` maps untouched pages lazily, so a whole-body shape costs memory only for the box.
    """
    out = np.zeros(tuple(cropped["shape"]), np.dtype(cropped["dtype"]))
    if cropped["data"] is not None:
        out[_slices(cropped["lo"], cropped["hi"])] = cropped["data"]
    return out
