"""MIP-CAM geometry: anatomical axes, the two MIPs on 2 mm pixels, points projected onto a view.

Part of MIP-CAM (:mod:`wsseg_core.mipcam`, whose docstring describes the method, steps 1 and 4's
centre points); re-exported there. Never imports ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ISO_MM = 2.0  # MIP pixel size (paper: resampled to 2 x 2 x 2 mm)
SUV_CLIP = 30.0  # SUV clipped to [0, 30] then scaled to [0, 1] (paper 3.2)
VIEWS = ("coronal", "sagittal")


# --------------------------------------------------------------------------------------------------
# Geometry: axes, MIPs, projections
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MipView:
    """One view's geometry: which volume axis was projected and how the 2-D image maps back.

    ``axes`` are the two kept volume axes (image rows, image columns), ``proj_axis`` the projected
    one; ``native_shape`` / ``native_spacing_mm`` the volume's sizes and spacing (mm) along ``axes``;
    ``shape`` the 2-D image size on the ``iso_mm`` grid.
    """

    name: str
    proj_axis: int
    axes: tuple[int, int]
    native_shape: tuple[int, int]
    native_spacing_mm: tuple[float, float]
    iso_mm: float = ISO_MM

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(iso_size(n, s, self.iso_mm) for n, s in zip(self.native_shape,
                                                                  self.native_spacing_mm))


def anatomical_axes(affine: np.ndarray) -> dict[str, int]:
    """Volume axis index of left-right ("lr"), anterior-posterior ("ap"), superior-inferior ("si").

    From the affine's closest orientation (``nibabel.orientations.aff2axcodes``); an LAS autoPET
    volume gives {"lr": 0, "ap": 1, "si": 2}.
    """
    import nibabel as nib

    codes = nib.orientations.aff2axcodes(np.asarray(affine, dtype=float))
    found: dict[str, int] = {}
    for i, c in enumerate(codes):
        key = {"L": "lr", "R": "lr", "A": "ap", "P": "ap", "S": "si", "I": "si"}.get(str(c))
        if key is None or key in found:
            raise ValueError(f"affine has no clear anatomical axes (codes {codes})")
        found[key] = i
    return found


def mip_views(shape: Sequence[int], affine: np.ndarray, spacing_mm: Sequence[float],
              iso_mm: float = ISO_MM) -> dict[str, MipView]:
    """The coronal (max over AP) and sagittal (max over LR) view geometry of a volume."""
    ax = anatomical_axes(affine)
    out = {}
    for name, proj in (("coronal", ax["ap"]), ("sagittal", ax["lr"])):
        kept = tuple(i for i in range(3) if i != proj)
        out[name] = MipView(name, proj, kept, tuple(int(shape[i]) for i in kept),
                            tuple(float(spacing_mm[i]) for i in kept), float(iso_mm))
    return out


def iso_size(n: int, spacing_mm: float, iso_mm: float = ISO_MM) -> int:
    """Pixels of an axis of ``n`` voxels of ``spacing_mm`` resampled to ``iso_mm``: round(n s / iso)."""
    return max(1, int(math.floor(n * spacing_mm / iso_mm + 0.5)))


def iso_index(n: int, spacing_mm: float, iso_mm: float = ISO_MM) -> np.ndarray:
    """Native voxel of each ``iso_mm`` pixel (nearest at pixel centres): floor((j + 0.5) iso / s)."""
    m = iso_size(n, spacing_mm, iso_mm)
    return np.minimum(np.floor((np.arange(m) + 0.5) * iso_mm / spacing_mm).astype(np.int64), n - 1)


def native_index(n: int, spacing_mm: float, iso_mm: float = ISO_MM) -> np.ndarray:
    """``iso_mm`` pixel of each native voxel (nearest at voxel centres): floor((i + 0.5) s / iso)."""
    m = iso_size(n, spacing_mm, iso_mm)
    return np.minimum(np.floor((np.arange(n) + 0.5) * spacing_mm / iso_mm).astype(np.int64), m - 1)


def compute_mip(suv: np.ndarray, view: MipView, suv_clip: float = SUV_CLIP) -> np.ndarray:
    """One view's MIP: max of the SUV over ``view.proj_axis``, nearest-resampled to ``iso_mm``,
    clipped to [0, ``suv_clip``] and divided by ``suv_clip``. Returns float32 (H, W) in [0, 1]."""
    suv = np.asarray(suv, dtype=np.float32)
    if suv.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) SUV volume, got shape {suv.shape}")
    mip = suv.max(axis=view.proj_axis)  # kept axes stay in increasing order = view.axes
    ri = iso_index(view.native_shape[0], view.native_spacing_mm[0], view.iso_mm)
    ci = iso_index(view.native_shape[1], view.native_spacing_mm[1], view.iso_mm)
    mip = mip[np.ix_(ri, ci)]
    return (np.clip(mip, 0.0, suv_clip) / suv_clip).astype(np.float32)


def compute_mips(suv: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float],
                 iso_mm: float = ISO_MM) -> tuple[dict[str, np.ndarray], dict[str, MipView]]:
    """Coronal and sagittal MIPs of an SUV volume (see ``compute_mip``) and their geometry."""
    views = mip_views(np.shape(suv), affine, spacing_mm, iso_mm)
    return {n: compute_mip(suv, v) for n, v in views.items()}, views


def project_points_mm(centres_vox: np.ndarray, view: MipView) -> np.ndarray:
    """Lesion centres (K, 3) in voxel indices (float) -> (K, 2) positions on the view in mm.

    A position is measured from the volume edge along each kept axis: voxel index ``i`` (centre of
    voxel i) is at ``(i + 0.5) * s`` mm, the same frame in which 2 mm pixel j has its centre at
    ``(j + 0.5) * iso`` mm. The projected axis is dropped (that is the projection).
    """
    c = np.asarray(centres_vox, dtype=float).reshape(-1, 3)
    return np.stack([(c[:, a] + 0.5) * s for a, s in zip(view.axes, view.native_spacing_mm)], axis=1)


def distance_map_mm(points_mm: np.ndarray, shape: Sequence[int], iso_mm: float = ISO_MM
                    ) -> np.ndarray:
    """(H, W) float32: distance in mm from each pixel centre to the nearest point (K, 2) in mm.

    Zeros when there is no point (such views get no distance loss; see ``MipSample.has_points``).
    """
    pts = np.asarray(points_mm, dtype=float).reshape(-1, 2)
    h, w = int(shape[0]), int(shape[1])
    if len(pts) == 0:
        return np.zeros((h, w), dtype=np.float32)
    r = (np.arange(h) + 0.5) * iso_mm
    c = (np.arange(w) + 0.5) * iso_mm
    d2 = (r[None, :, None] - pts[:, 0, None, None]) ** 2 + (c[None, None, :] - pts[:, 1, None, None]) ** 2
    return np.sqrt(d2.min(axis=0)).astype(np.float32)
