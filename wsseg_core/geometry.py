"""Where a study's native axial slice lies on the classifier's S x S input, and the way back.

The slice classifier sees every axial slice on a square canvas of S x S pixels. Two ways to get
there, recorded in the classifier checkpoint (``SlicePreprocessor.mode``) so that training, tuning
and scoring apply the same one:

* ``"resize"``: the slice ``(X, Y)`` is resized to S x S. A voxel's size inside the network then
  depends on the field of view (a 700 mm FOV at 64 px is 11 mm a pixel, a 500 mm one 7.8 mm).
* ``"resample_mm"``: the slice is resampled in-plane to square pixels of ``pixel_mm`` (Früh et al.,
  Sec. 2.1: 2 x 2 mm in-plane, 256 x 256) with the study's voxel spacing, then padded or cropped to
  S x S around the body. A pixel is ``pixel_mm`` whatever the scanner's FOV; S pixels cover
  ``S * pixel_mm`` mm (512 mm at 256 x 2 mm).

Coordinates, per in-plane axis, in units of the native voxel (voxel ``i`` spans ``[i, i + 1)``, its
centre is ``i + 0.5``):

* the resampled image has ``n = floor(X * s)`` pixels, ``s = spacing / pixel_mm`` (resampled pixels
  per native voxel; torch's output size for ``scale_factor = s``); pixel ``k`` spans native
  ``[k / s, (k + 1) / s)`` and its value is the bilinear interpolation at its centre (half-pixel
  convention, ``align_corners=False``);
* canvas pixel ``u`` is resampled pixel ``k = u + offset``; canvas pixels with no resampled pixel
  (padding) hold 0, which the preprocessor's scaling gives to "no uptake, air";
* back: native voxel ``i`` takes the canvas pixel that holds its centre,
  ``u = floor((i + 0.5) s) - offset``, and from it the CAM cell ``floor(u h / S)`` (torch's
  nearest, as ``wsseg_core.segment`` upsamples). A voxel whose centre lies outside the canvas (a
  cropped FOV, or the partial last resampled pixel that ``floor`` drops) gets index -1: the network
  never saw it, so it is in no CAM region.

The body centre that places the canvas is one per study (all its slices share one in-plane frame):
the centroid of ``CT > BODY_CT_HU`` over the volume (``SUV > BODY_SUV_FLOOR`` without CT body
voxels; the FOV centre if neither has any). The canvas is centred on it, but never slides past the
FOV: a FOV that fits is padded without losing any of it, one that does not is cropped without
padding.

numpy only (no torch): ``wsseg_core.models.SlicePreprocessor`` does the resampling itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from wsseg_core.segment import BODY_CT_HU, BODY_SUV_FLOOR, _nearest_index

__all__ = ["PREPROCESSING_MODES", "SliceGeometry", "resize_geometry", "resample_geometry",
           "body_centre"]

#: ``SlicePreprocessor.mode`` values; a checkpoint written before the field existed reads "resize".
PREPROCESSING_MODES = ("resize", "resample_mm")


@dataclass(frozen=True)
class SliceGeometry:
    """The map between one study's native slice grid ``(X, Y)`` and the S x S network input.

    Attributes:
        mode: ``"resize"`` or ``"resample_mm"``.
        native_shape: ``(X, Y)`` voxels of the study's axial slices.
        size: S, canvas side in pixels.
        scale: ``(sx, sy)`` resampled pixels per native voxel (``spacing_mm / pixel_mm``);
            ``S / X`` and ``S / Y`` under "resize" (information only).
        resampled_shape: ``(nx, ny) = floor(X sx), floor(Y sy)`` ("resample_mm"); ``(S, S)`` under
            "resize".
        offset: ``(kx, ky)``: canvas pixel ``u`` is resampled pixel ``u + k`` (negative: padding
            before the FOV); ``(0, 0)`` under "resize".
    """

    mode: str
    native_shape: tuple[int, int]
    size: int
    scale: tuple[float, float]
    resampled_shape: tuple[int, int]
    offset: tuple[int, int]

    def native_to_canvas(self, axis: int, i: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Canvas pixel holding the centre of native voxel(s) ``i`` along ``axis`` (0: x, 1: y),
        -1 where it lies outside the canvas ("resample_mm" only; "resize" has no such map)."""
        if self.mode != "resample_mm":
            raise ValueError("native_to_canvas is defined for mode 'resample_mm' only")
        i = np.asarray(i, dtype=np.int64)
        # float64: (i + 0.5) s is exact for the spacings that matter (multiples of 1/2^k) and
        # otherwise rounds identically each time it is asked.
        k = np.floor((i + 0.5) * self.scale[axis]).astype(np.int64)
        u = k - self.offset[axis]
        ok = (k >= 0) & (k < self.resampled_shape[axis]) & (u >= 0) & (u < self.size)
        return np.where(ok, u, -1)

    def cam_index(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Per native row and column, the CAM cell (of an ``h x w`` map of the canvas) that covers
        it: ``(ri (X,), ci (Y,))`` int64, -1 where the voxel is outside the canvas.

        ``cam[np.ix_(ri, ci)]`` is the CAM on the native grid (where both are >= 0). Under
        "resize" it is ``floor(i h / X)``, the nearest upsampling ``wsseg_core.segment`` always used.
        """
        if self.mode == "resize":
            return (_nearest_index(int(h), self.native_shape[0]),
                    _nearest_index(int(w), self.native_shape[1]))
        out = []
        for axis, cells in ((0, int(h)), (1, int(w))):
            u = self.native_to_canvas(axis, np.arange(self.native_shape[axis]))
            cell = _nearest_index(cells, self.size)[np.maximum(u, 0)]
            out.append(np.where(u >= 0, cell, -1))
        return out[0], out[1]

    def cam_to_native(self, cam: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """One ``(h, w)`` CAM on the native slice grid ``(X, Y)`` (nearest, as segmentation reads
        it), ``fill`` where the voxel is outside the canvas. For display and single slices."""
        cam = np.asarray(cam)
        if cam.ndim != 2:
            raise ValueError(f"cam must be 2-D (h, w), got shape {cam.shape}")
        ri, ci = self.cam_index(*cam.shape)
        out = cam[np.ix_(np.maximum(ri, 0), np.maximum(ci, 0))].astype(np.float32)
        out[ri < 0, :] = fill
        out[:, ci < 0] = fill
        return out


def resize_geometry(native_shape: Sequence[int], size: int) -> SliceGeometry:
    """The "resize" geometry: the whole slice stretched onto the S x S canvas."""
    x, y = (int(v) for v in native_shape)
    s = int(size)
    return SliceGeometry(mode="resize", native_shape=(x, y), size=s, scale=(s / x, s / y),
                         resampled_shape=(s, s), offset=(0, 0))


def _offset(centre: float, n: int, size: int) -> int:
    """Canvas start in resampled pixels: centred on ``centre`` (resampled pixel coordinates), but
    within ``[min(0, n - S), max(0, n - S)]`` so the canvas never pads one side while cropping the
    FOV on the other."""
    k = math.floor(centre - size / 2.0 + 0.5)
    lo, hi = min(0, n - size), max(0, n - size)
    return int(min(max(k, lo), hi))


def resample_geometry(native_shape: Sequence[int], spacing_mm: Sequence[float], pixel_mm: float,
                      size: int, centre: Sequence[float] | None = None) -> SliceGeometry:
    """The "resample_mm" geometry of a study.

    Args:
        native_shape: ``(X, Y)`` of its axial slices.
        spacing_mm: its voxel size (x, y[, z]) in mm; z is not used (slices stay slices).
        pixel_mm: canvas pixel size in mm (2.0 for Früh et al.).
        size: S, canvas side in pixels.
        centre: ``(cx, cy)`` body centre in native voxel units (voxel ``i``'s centre is
            ``i + 0.5``; :func:`body_centre`); None: the FOV centre.
    """
    x, y = (int(v) for v in native_shape)
    sp = [float(v) for v in spacing_mm][:2]
    if len(sp) != 2 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise ValueError(f"spacing_mm must hold 2 or 3 positive sizes in mm, got {spacing_mm}")
    if not (np.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel_mm must be > 0, got {pixel_mm!r}")
    scale = (sp[0] / float(pixel_mm), sp[1] / float(pixel_mm))
    # torch's output size for scale_factor (math.floor of a float64 product): models.py checks it.
    n = (math.floor(x * scale[0]), math.floor(y * scale[1]))
    if min(n) < 1:
        raise ValueError(f"a {x}x{y} slice at {sp} mm is under one {pixel_mm} mm pixel")
    c = (x / 2.0, y / 2.0) if centre is None else tuple(float(v) for v in centre)
    offset = (_offset(c[0] * scale[0], n[0], int(size)), _offset(c[1] * scale[1], n[1], int(size)))
    return SliceGeometry(mode="resample_mm", native_shape=(x, y), size=int(size), scale=scale,
                         resampled_shape=n, offset=offset)


def body_centre(suv: np.ndarray, ct: np.ndarray | None) -> tuple[float, float]:
    """Centroid ``(cx, cy)`` of the study's body voxels in native voxel units (centre of voxel ``i``
    is ``i + 0.5``): ``CT > BODY_CT_HU`` over the whole volume, else ``SUV > BODY_SUV_FLOOR``,
    else the FOV centre. ``suv``, ``ct``: ``(X, Y, Z)`` (or one ``(X, Y)`` slice). From the
    projections, so no index arrays of the volume's size."""
    suv = np.asarray(suv)
    shape = suv.shape[:2]
    for body in ((None if ct is None else np.asarray(ct) > BODY_CT_HU), suv > BODY_SUV_FLOOR):
        if body is None:
            continue
        # One pass over the volume (the z sum), then the two small projections.
        plane = body.sum(axis=2, dtype=np.int64) if body.ndim == 3 else body.astype(np.int64)
        wx, wy = plane.sum(axis=1), plane.sum(axis=0)
        total = int(wx.sum())
        if total == 0:
            continue
        cx = float(np.dot(np.arange(shape[0]) + 0.5, wx)) / total
        cy = float(np.dot(np.arange(shape[1]) + 0.5, wy)) / total
        return cx, cy
    return shape[0] / 2.0, shape[1] / 2.0
