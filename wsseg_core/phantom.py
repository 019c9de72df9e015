"""Synthetic whole-body FDG-PET/CT phantom cohort in the autoPET layout: the embedded default data.

Every demo and test trains on this phantom, so it is built to make the weak-supervision problem real
rather than easy:

* physiological uptake (brain, myocardium, kidneys, bladder, liver, spleen, bowel) is as bright as or
  brighter than many lesions and is *never* in SEG, so a plain SUV threshold over-segments;
* lesions (the only thing in SEG) vary from ~6 mm to ~50 mm, from SUV ~3 (low contrast) to ~20, are
  lumpy ellipsoids, some with a necrotic core, and are often clustered on one axial slice;
* PET is blurred with a ~6 mm FWHM PSF and gets signal-dependent, spatially correlated noise, so small
  lesions lose contrast through partial volume, as on a real scanner;
* a share of studies are negative controls, and some patients have a follow-up study with the same
  anatomy, so subject-level splits matter.

Geometry: arrays in nibabel voxel order ``(X, Y, Z)``, LAS orientation (x index runs toward the
patient's left, y toward anterior, z toward the head). The anatomy is scaled to the field of view (a
whole body squeezed into ``Z`` slices); lesion sizes are in mm. A default study (128x128x96) takes a
fraction of a second.

Internally positions are in body millimetres ``(u, v, w)``: ``u`` toward the patient's left from the
in-plane centre, ``v`` toward anterior from the in-plane centre, ``w`` from the first slice toward the
head.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from wsseg_core.data import StudyRef
from wsseg_core.storage import write_nifti

LOG = logging.getLogger(__name__)

DEFAULT_SHAPE: tuple[int, int, int] = (128, 128, 96)
DEFAULT_SPACING_MM: tuple[float, float, float] = (2.04, 2.04, 3.0)
PSF_FWHM_MM: float = 6.0

# Tissue labels of PhantomStudy.organs (index into ORGAN_NAMES).
AIR, FAT, SOFT, LUNG, BONE, MARROW, BRAIN, BLOOD, MYOCARDIUM, LIVER, SPLEEN, KIDNEY, BLADDER, BOWEL = range(14)
ORGAN_NAMES: tuple[str, ...] = (
    "air", "fat", "soft_tissue", "lung", "bone", "marrow", "brain", "blood_pool", "myocardium",
    "liver", "spleen", "kidney", "bladder", "bowel",
)
# Organs whose physiological uptake rivals tumour; lesions are kept out of them so SEG never covers them.
PHYSIOLOGICAL: tuple[int, ...] = (BRAIN, BLOOD, MYOCARDIUM, KIDNEY, BLADDER)

DIAGNOSES: tuple[str, ...] = ("LYMPHOMA", "LUNG_CANCER", "MELANOMA")
# Relative site frequencies per diagnosis: nodal chains for lymphoma, lung/mediastinum for lung
# cancer, scattered (skin, liver, lung) for melanoma - so a study-level classifier has something to learn.
_SITE_WEIGHTS: dict[str, dict[str, float]] = {
    "LYMPHOMA": {"neck": 3, "mediastinum": 3, "axilla": 2, "abdomen": 3, "inguinal": 2, "spleen": 1,
                 "bone": 1, "lung": 0.5},
    "LUNG_CANCER": {"lung": 4, "mediastinum": 3, "neck": 1, "liver": 1, "bone": 1.5, "abdomen": 0.5},
    "MELANOMA": {"subcutaneous": 2, "lung": 2, "liver": 2, "bone": 1, "axilla": 1.5, "inguinal": 1.5,
                 "abdomen": 1, "neck": 1},
}
# Largest plausible lesion diameter per site (mm).
_SITE_MAX_D: dict[str, float] = {"neck": 35, "mediastinum": 50, "axilla": 35, "abdomen": 50, "inguinal": 35,
                                 "spleen": 30, "bone": 35, "lung": 45, "liver": 50, "subcutaneous": 25}


@dataclass(frozen=True)
class PhantomOptions:
    """Knobs that make cohorts unlike the default one (all defaults reproduce the default phantom).

    Attributes:
        organ_uptake_scale: multiplies the physiological SUV of brain, blood pool, myocardium,
            liver, spleen, kidneys, bladder and bowel (2.0: organs twice as hot relative to lesions).
        lesion_diameter_mm: (min, max) equivalent-sphere diameter in mm; diameters are drawn
            log-uniform in [min, min(max, the site's plausible maximum)].
        lesion_suv: (min, max) SUV of ordinary lesions, drawn log-uniform (g/ml).
        low_contrast_fraction: share of lesions drawn instead from ``low_contrast_suv``.
        low_contrast_suv: (min, max) SUV of low-contrast lesions, drawn uniform (g/ml).
        body_z: (start, stop) fraction of the body length (0 = feet, 1 = top of head) that the
            z field of view covers; (0.45, 1.0) is a head-to-pelvis scan, the body keeps its
            proportions and the feet fall outside the volume.
    """

    organ_uptake_scale: float = 1.0
    lesion_diameter_mm: tuple[float, float] = (6.0, 50.0)
    lesion_suv: tuple[float, float] = (4.0, 20.0)
    low_contrast_fraction: float = 0.2
    low_contrast_suv: tuple[float, float] = (2.5, 4.0)
    body_z: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not self.organ_uptake_scale > 0:
            raise ValueError(f"organ_uptake_scale must be > 0, got {self.organ_uptake_scale}")
        for name in ("lesion_diameter_mm", "lesion_suv", "low_contrast_suv"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {(lo, hi)}")
        if not 0.0 <= self.low_contrast_fraction <= 1.0:
            raise ValueError(f"low_contrast_fraction must be in [0, 1], got {self.low_contrast_fraction}")
        lo, hi = self.body_z
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"body_z must satisfy 0 <= start < stop <= 1, got {(lo, hi)}")


DEFAULT_OPTIONS = PhantomOptions()


@dataclass(frozen=True)
class PhantomLesion:
    """Ground truth of one synthetic lesion.

    ``centre_vox`` is the voxel index (float) of the lesion centre; ``radii_mm`` the ellipsoid semi-axes
    before the lumpy perturbation; ``suv`` the true (pre-blur) uptake of the viable rim in SUV (g/ml);
    ``necrotic`` whether it has a low-uptake core (still in SEG); ``n_voxels`` its SEG voxels.
    """

    site: str
    centre_vox: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    suv: float
    necrotic: bool
    n_voxels: int
    z_range: tuple[int, int]  # inclusive slice range covered by the lesion

    @property
    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter of the (unperturbed) ellipsoid, mm."""
        return 2.0 * float(np.prod(self.radii_mm)) ** (1.0 / 3.0)


@dataclass
class PhantomStudy:
    """One synthetic PET/CT study.

    ``suv`` float32 SUV (g/ml), ``ct`` float32 HU, ``seg`` uint8 {0,1} lesion mask, all ``(X, Y, Z)``;
    ``affine`` (4, 4) LAS; ``organs`` uint8 tissue labels (see ``ORGAN_NAMES``), before lesions.
    """

    suv: np.ndarray
    ct: np.ndarray
    seg: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    lesions: list[PhantomLesion] = field(default_factory=list)
    organs: np.ndarray | None = None
    diagnosis: str = "NEGATIVE"
    seed: int = 0


def phantom_affine(shape: Sequence[int], spacing_mm: Sequence[float]) -> np.ndarray:
    """LAS affine (x flipped, like autoPET) with the in-plane centre on the world z axis, mm."""
    sx, sy, sz = (float(s) for s in spacing_mm)
    X, Y, _ = (int(n) for n in shape)
    aff = np.diag([-sx, sy, sz, 1.0])
    aff[:3, 3] = [(X - 1) / 2 * sx, -(Y - 1) / 2 * sy, 0.0]
    return aff


# --------------------------------------------------------------------------------------------------
# geometry helpers


@dataclass
class _Grid:
    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,) mm
    origin: np.ndarray  # (3,) body mm of voxel (0, 0, 0)
    u: np.ndarray  # (X,) mm toward patient left
    v: np.ndarray  # (Y,) mm toward anterior
    w: np.ndarray  # (Z,) mm toward head

    @classmethod
    def make(cls, shape: Sequence[int], spacing_mm: Sequence[float],
             body_z: tuple[float, float] = (0.0, 1.0)) -> "_Grid":
        X, Y, Z = (int(n) for n in shape)
        sp = np.asarray(spacing_mm, dtype=np.float64)
        # the field of view spans body_z of the body: slice 0 sits body_z[0] of the way up
        body_len = max((Z - 1) * sp[2], 1.0) / (body_z[1] - body_z[0])
        origin = np.array([-(X - 1) / 2 * sp[0], -(Y - 1) / 2 * sp[1], body_z[0] * body_len])
        return cls((X, Y, Z), sp, origin,
                   (origin[0] + np.arange(X) * sp[0]).astype(np.float32),
                   (origin[1] + np.arange(Y) * sp[1]).astype(np.float32),
                   (origin[2] + np.arange(Z) * sp[2]).astype(np.float32))

    def box(self, centre: np.ndarray, half: np.ndarray) -> tuple[tuple[slice, slice, slice], list[np.ndarray]] | None:
        """Index box around ``centre`` (mm) of half-size ``half`` (mm) and its local offsets (mm)."""
        lo = np.floor((centre - half - self.origin) / self.spacing).astype(int)
        hi = np.ceil((centre + half - self.origin) / self.spacing).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        d = [
            (self.u[sl[0]] - centre[0])[:, None, None],
            (self.v[sl[1]] - centre[1])[None, :, None],
            (self.w[sl[2]] - centre[2])[None, None, :],
        ]
        return sl, d

    def to_vox(self, p: np.ndarray) -> np.ndarray:
        return (np.asarray(p) - self.origin) / self.spacing


def _rho(d: list[np.ndarray], radii: np.ndarray, rot: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Normalised ellipsoid radius (1 on the surface) and the normalised local coordinates."""
    if rot is None:
        q = [d[k] / radii[k] for k in range(3)]
    else:
        # q_k = (R^T d)_k / r_k: rotate offsets into the ellipsoid frame
        q = [(rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / radii[k] for k in range(3)]
    return np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2), q


def _ellipsoid(grid: _Grid, centre: Sequence[float], radii: Sequence[float], rot: np.ndarray | None = None):
    """(slices, rho) of an ellipsoid's bounding box, or None if it misses the grid."""
    c = np.asarray(centre, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    half = np.full(3, r.max()) if rot is not None else r
    b = grid.box(c, half)
    if b is None:
        return None
    sl, d = b
    rho, _ = _rho(d, r, rot)
    return sl, rho


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------------------------
# anatomy


@dataclass
class _Anatomy:
    grid: _Grid
    A: float  # torso half-width, mm
    B: float  # torso half-depth, mm
    Lz: float  # body length along z, mm
    a: np.ndarray  # (Z,) trunk half-width per slice
    b: np.ndarray  # (Z,) trunk half-depth per slice
    fat: np.ndarray  # (Z,) fat rim thickness per slice
    spine_v: np.ndarray  # (Z,) spine centre v per slice
    organs: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (centre mm, radii mm)
    labels: np.ndarray  # uint8 (X, Y, Z)


# Trunk outline keypoints: (t = fraction of body length from the feet, half-width / A, half-depth / B).
_TRUNK_T = np.array([0.37, 0.40, 0.44, 0.52, 0.60, 0.70, 0.77, 0.795, 0.805, 0.835, 0.850, 0.915, 0.970, 0.995])
_TRUNK_A = np.array([0.80, 0.92, 0.97, 0.92, 0.95, 1.00, 1.00, 0.82, 0.33, 0.33, 0.45, 0.50, 0.40, 0.08])
_TRUNK_B = np.array([0.85, 0.92, 0.95, 1.00, 1.00, 1.00, 0.95, 0.80, 0.52, 0.52, 0.90, 1.02, 0.85, 0.12])
# Fat rim thickness as a multiple of the study's base thickness.
_FAT_T = np.array([0.0, 0.40, 0.50, 0.60, 0.78, 0.80, 0.83, 0.845, 1.0])
_FAT_K = np.array([0.8, 1.00, 1.35, 1.10, 0.90, 0.60, 0.60, 0.30, 0.3])


def _make_anatomy(grid: _Grid, rng: np.random.Generator, body_stop: float = 1.0) -> _Anatomy:
    X, Y, Z = grid.shape
    W = X * grid.spacing[0]
    H = Y * grid.spacing[1]
    A = 0.36 * W * rng.uniform(0.9, 1.05)
    B = min(A * 0.64 * rng.uniform(0.88, 1.08), 0.42 * H)
    Lz = max(grid.w[-1], 1.0) / body_stop * rng.uniform(0.97, 1.0)
    fat0 = rng.uniform(4.0, 13.0)
    t = grid.w / Lz
    a = np.interp(t, _TRUNK_T, _TRUNK_A, left=0.0, right=0.0) * A
    b = np.interp(t, _TRUNK_T, _TRUNK_B, left=0.0, right=0.0) * B
    fat = np.interp(t, _FAT_T, _FAT_K) * fat0
    fat = np.minimum(fat, 0.3 * np.minimum(a, b) + 0.5)

    u = grid.u[:, None, None]
    v = grid.v[None, :, None]
    labels = np.zeros(grid.shape, dtype=np.uint8)

    # trunk + head: elliptical cross-sections, fat rim outside the inner ellipse
    ok = (a > 1.0) & (b > 1.0)
    zs = np.flatnonzero(ok)
    if zs.size:
        z0, z1 = zs[0], zs[-1] + 1
        aa, bb, ff = a[z0:z1], b[z0:z1], fat[z0:z1]
        e = (u / aa) ** 2 + (v / bb) ** 2
        ei = (u / np.maximum(aa - ff, 0.5)) ** 2 + (v / np.maximum(bb - ff, 0.5)) ** 2
        sub = labels[:, :, z0:z1]
        sub[e <= 1.0] = FAT
        sub[ei <= 1.0] = SOFT
        # ribs: a thin shell just inside the fat, on a periodic subset of thoracic slices, open anteriorly
        tt = t[z0:z1]
        rib_z = (tt > 0.625) & (tt < 0.785) & (np.sin(2 * np.pi * grid.w[z0:z1] / (3.0 * grid.spacing[2])) > -0.2)
        if rib_z.any():
            ri = np.sqrt(ei[:, :, rib_z])
            rib = (ri > 0.86) & (ri < 0.93) & ~((np.abs(u) < 0.18 * A) & (v > 0))
            tmp = sub[:, :, rib_z]  # boolean z-index copies, so write back
            tmp[rib] = BONE
            sub[:, :, rib_z] = tmp

    # legs: two near-circular cross-sections that merge into the pelvis
    leg_t = (t > 0.012) & (t < 0.41)
    leg_r = np.interp(t, [0.012, 0.04, 0.20, 0.26, 0.41], [0.10, 0.13, 0.15, 0.19, 0.27]) * A
    leg_u = np.interp(t, [0.0, 0.41], [0.36, 0.47]) * A
    if leg_t.any():
        zl = np.flatnonzero(leg_t)
        z0, z1 = zl[0], zl[-1] + 1
        r, uc, ff = leg_r[z0:z1], leg_u[z0:z1], fat[z0:z1]
        sub = labels[:, :, z0:z1]
        shaft = t[z0:z1] > 0.03
        for side in (-1.0, 1.0):
            d2 = ((u - side * uc) / r) ** 2 + (v / (1.05 * r)) ** 2
            di2 = ((u - side * uc) / np.maximum(r - ff, 0.5)) ** 2 + (v / np.maximum(1.05 * r - ff, 0.5)) ** 2
            sub[(d2 <= 1.0) & (sub == AIR)] = FAT
            sub[di2 <= 1.0] = SOFT
            # femur / tibia: a cortical shaft with marrow, lying a little medial and posterior
            fu = side * uc * 0.95
            db = np.sqrt(((u - fu) ** 2 + (v + 0.05 * B) ** 2)) / np.maximum(0.30 * r, 2.0 * grid.spacing[0])
            bone = (db <= 1.0) & shaft
            sub[bone] = BONE
            sub[(db <= 0.55) & shaft] = MARROW

    organs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    anat = _Anatomy(grid, A, B, Lz, a, b, fat, np.zeros(Z), organs, labels)

    def paint(name: str, centre_tuvw, radii_abz, code: int, rot=None, inside=(SOFT, LUNG, FAT)) -> None:
        cu, cv, ct = centre_tuvw
        c = np.array([cu * A, cv * B, ct * Lz])
        rr = np.array([radii_abz[0] * A, radii_abz[1] * B, radii_abz[2] * Lz])
        rr = np.maximum(rr, grid.spacing * 0.75)
        organs[name] = (c, rr)
        e = _ellipsoid(grid, c, rr, rot)
        if e is None:
            return
        sl, rho = e
        sub = labels[sl]
        sub[(rho <= 1.0) & np.isin(sub, inside)] = code

    def j(s: float) -> float:  # per-study jitter of an organ size
        return s * rng.uniform(0.92, 1.08)

    def jt(t: float) -> float:  # per-study jitter of an organ's axial level (fraction of body length)
        return t + rng.uniform(-0.006, 0.006)

    lung_t, lung_h = jt(0.705), j(0.078)
    paint("lung_r", (-0.45, j(0.05), lung_t), (j(0.33), j(0.60), lung_h), LUNG, inside=(SOFT,))
    paint("lung_l", (0.47, j(0.05), lung_t), (j(0.31), j(0.60), 0.97 * lung_h), LUNG, inside=(SOFT,))
    paint("heart", (0.14, j(0.28), jt(0.668)), (j(0.30), j(0.45), 0.045), BLOOD,
          rot=_rot_z(rng.uniform(-0.5, -0.2)), inside=(SOFT, LUNG))
    hc, hr = organs["heart"]
    # left-ventricular wall: a shell; drawn inside the heart so its uptake is a ring on axial slices
    lv_c = hc + np.array([0.06 * A, -0.02 * B, -0.1 * hr[2]])
    lv_r = np.array([0.65 * hr[0], 0.62 * hr[1], 0.85 * hr[2]])
    wall = rng.uniform(6.0, 9.0)
    e = _ellipsoid(grid, lv_c, lv_r)
    if e is not None:
        sl, rho = e
        rin = 1.0 - wall / lv_r[:2].min()
        sub = labels[sl]
        sub[(rho <= 1.0) & (rho >= rin) & (sub == BLOOD)] = MYOCARDIUM
    organs["myocardium"] = (lv_c, lv_r)
    paint("liver", (-0.40, j(0.08), jt(0.600)), (j(0.52), j(0.72), j(0.062)), LIVER,
          rot=_rot_z(rng.uniform(-0.2, 0.1)), inside=(SOFT, LUNG))
    paint("spleen", (0.62, -0.30, jt(0.605)), (j(0.16), j(0.28), 0.032), SPLEEN, inside=(SOFT, LUNG))
    paint("kidney_r", (-0.40, -0.45, jt(0.548)), (j(0.14), j(0.22), 0.035), KIDNEY,
          rot=_rot_z(0.35), inside=(SOFT, LIVER))
    paint("kidney_l", (0.40, -0.45, jt(0.556)), (j(0.14), j(0.22), 0.035), KIDNEY,
          rot=_rot_z(-0.35), inside=(SOFT, SPLEEN))
    paint("bladder", (0.0, 0.40, jt(0.432)), (j(0.22), j(0.30), j(0.028)), BLADDER)
    # bowel loops: patchy moderate uptake in the abdomen, another classic threshold confounder
    for k in range(int(rng.integers(4, 9))):
        c = (rng.uniform(-0.5, 0.5), rng.uniform(-0.1, 0.6), rng.uniform(0.45, 0.56))
        r = rng.uniform(6.0, 12.0)
        paint(f"bowel_{k}", c, (r / A, r / B, r * rng.uniform(0.6, 1.0) / Lz), BOWEL, rot=_rot_z(rng.uniform(0, np.pi)))

    # spine: vertebral bodies along the posterior midline, following the body's depth into the neck
    sv = -np.interp(t, [0.40, 0.79, 0.805, 0.85], [0.62, 0.62, 0.24, 0.22]) * B
    sr = np.interp(t, [0.40, 0.79, 0.805, 0.85], [0.13, 0.12, 0.09, 0.08]) * A
    anat.spine_v = sv
    sp_z = np.flatnonzero((t > 0.40) & (t < 0.845))
    if sp_z.size:
        z0, z1 = sp_z[0], sp_z[-1] + 1
        d = np.sqrt(u ** 2 + (v - sv[z0:z1]) ** 2) / sr[z0:z1]
        sub = labels[:, :, z0:z1]
        sub[(d <= 1.0) & (sub != AIR)] = BONE
        sub[(d <= 0.62) & (sub != AIR)] = MARROW
    # pelvis: iliac wings (thin rotated plates) and femoral heads
    for side in (-1.0, 1.0):
        paint(f"ilium_{side:+.0f}", (side * 0.58, -0.30, 0.468), (0.30, 0.13, 0.038), BONE,
              rot=_rot_z(side * -0.6), inside=(SOFT, FAT, BOWEL))
        paint(f"femoral_head_{side:+.0f}", (side * 0.50, -0.05, 0.405), (0.12, 0.19, 0.02), BONE)
        c, r = organs[f"femoral_head_{side:+.0f}"]
        e = _ellipsoid(grid, c, r * 0.6)
        if e is not None:
            sl, rho = e
            labels[sl][rho <= 1.0] = MARROW
    # skull and brain
    paint("skull", (0.0, 0.04, 0.917), (0.45, 0.92, 0.066), BONE, inside=(SOFT, FAT))
    c, r = organs["skull"]
    br = np.maximum(r - 6.0, grid.spacing)
    e = _ellipsoid(grid, c, br)
    if e is not None:
        sl, rho = e
        sub = labels[sl]
        sub[(rho <= 1.0) & (sub == BONE)] = BRAIN
    organs["brain"] = (c, br)
    return anat


# --------------------------------------------------------------------------------------------------
# lesions


def _in_ellipsoid(rng: np.random.Generator, c: np.ndarray, r: np.ndarray, w: float | None, scale: float = 0.7):
    """A uniform point inside ``scale`` x the ellipsoid (optionally on the plane ``w``), or None."""
    if w is not None:
        s2 = scale ** 2 - ((w - c[2]) / r[2]) ** 2
        if s2 <= 0.02:
            return None
        s = math.sqrt(s2)
        rad, ang = math.sqrt(rng.uniform()) * s, rng.uniform(0, 2 * np.pi)
        return np.array([c[0] + rad * r[0] * math.cos(ang), c[1] + rad * r[1] * math.sin(ang), w])
    while True:
        p = rng.uniform(-1, 1, 3)
        if p @ p <= 1:
            return c + scale * p * r


def _sample_site(site: str, anat: _Anatomy, rng: np.random.Generator, w: float | None = None) -> np.ndarray | None:
    """A plausible lesion centre (body mm) for ``site``; ``w`` forces the axial level (clusters)."""
    A, B, Lz = anat.A, anat.B, anat.Lz
    side = rng.choice([-1.0, 1.0])

    def at(t_lo: float, t_hi: float) -> float | None:
        if w is None:
            return rng.uniform(t_lo, t_hi) * Lz
        return w if t_lo * Lz - 3.0 <= w <= t_hi * Lz + 3.0 else None

    if site == "lung":
        c, r = anat.organs["lung_r" if side < 0 else "lung_l"]
        return _in_ellipsoid(rng, c, r, w, 0.75)
    if site in ("liver", "spleen"):
        c, r = anat.organs[site]
        return _in_ellipsoid(rng, c, r, w, 0.7)
    if site == "bone":
        kind = rng.choice(["spine", "spine", "ilium", "femur"]) if w is None else "spine"
        if kind == "spine":
            ww = at(0.45, 0.80)
            if ww is None:
                return None
            z = int(np.clip(round(ww / anat.grid.spacing[2]), 0, anat.grid.shape[2] - 1))
            return np.array([rng.uniform(-3, 3), anat.spine_v[z], ww])
        c, r = anat.organs[f"{'ilium' if kind == 'ilium' else 'femoral_head'}_{side:+.0f}"]
        return c + rng.uniform(-0.4, 0.4, 3) * r
    box = {  # t range, u range (x side, / A), v range (/ B), bilateral
        "neck": ((0.805, 0.838), (0.10, 0.24), (-0.10, 0.30), True),
        "mediastinum": ((0.695, 0.775), (-0.12, 0.12), (-0.25, 0.35), False),
        "axilla": ((0.755, 0.785), (0.66, 0.82), (-0.30, 0.30), True),
        "abdomen": ((0.470, 0.560), (-0.32, 0.32), (-0.30, 0.35), False),
        "inguinal": ((0.398, 0.440), (0.30, 0.55), (0.10, 0.55), True),
    }
    if site in box:
        (t0, t1), (u0, u1), (v0, v1), bilateral = box[site]
        ww = at(t0, t1)
        if ww is None:
            return None
        uu = rng.uniform(u0, u1) * A * (side if bilateral else 1.0)
        return np.array([uu, rng.uniform(v0, v1) * B, ww])
    if site == "subcutaneous":
        ww = at(0.45, 0.78)
        if ww is None:
            return None
        z = int(np.clip(round(ww / anat.grid.spacing[2]), 0, anat.grid.shape[2] - 1))
        ang = rng.uniform(0, 2 * np.pi)
        k = 1.0 - 0.5 * anat.fat[z] / max(min(anat.a[z], anat.b[z]), 1.0)
        return np.array([k * anat.a[z] * math.cos(ang), k * anat.b[z] * math.sin(ang), ww])
    raise ValueError(f"unknown lesion site {site!r}")


def _lesion_hu(site: str, rng: np.random.Generator, liver_hu: float) -> float:
    if site == "liver":
        return liver_hu - rng.uniform(20.0, 35.0)  # hypodense metastasis
    if site == "bone":
        return rng.uniform(600.0, 900.0) if rng.uniform() < 0.4 else rng.uniform(40.0, 90.0)  # sclerotic/lytic
    return rng.uniform(25.0, 45.0)


def _place_lesions(anat: _Anatomy, rng: np.random.Generator, diagnosis: str, suv: np.ndarray, ct: np.ndarray,
                   seg: np.ndarray, ct_lut: np.ndarray,
                   opts: PhantomOptions = DEFAULT_OPTIONS) -> list[PhantomLesion]:
    """Paint 1-8 lesions into ``suv``/``ct``/``seg`` (pre-blur, in place) and return their ground truth."""
    grid, labels = anat.grid, anat.labels
    weights = _SITE_WEIGHTS[diagnosis]
    sites, p = list(weights), np.array(list(weights.values()), dtype=float)
    p /= p.sum()
    n = int(rng.integers(1, 9))
    placed: list[tuple[np.ndarray, float]] = []  # (centre, extent) for in-plane separation
    lesions: list[PhantomLesion] = []
    forbid = np.isin(np.arange(256), (AIR,) + PHYSIOLOGICAL)  # LUT over label codes
    anchor: tuple[str, float] | None = None
    cluster_left = 0

    for _ in range(n):
        for attempt in range(30):
            if cluster_left > 0 and attempt < 15:
                site, w = anchor[0], anchor[1] + rng.uniform(-2.0, 2.0)
                d_hi = 28.0  # clustered nodes/mets are small to medium, which keeps them distinct
            else:
                site, w = str(rng.choice(sites, p=p)), None
                d_hi = _SITE_MAX_D[site]
            c = _sample_site(site, anat, rng, w)
            if c is None:
                continue
            d_lo = opts.lesion_diameter_mm[0]
            d_hi = max(min(d_hi, opts.lesion_diameter_mm[1]), d_lo)
            d = math.exp(rng.uniform(math.log(d_lo), math.log(d_hi)))
            radii = d / 2 * rng.uniform(0.75, 1.3, 3)
            radii *= (d / 2) / np.prod(radii) ** (1 / 3)
            ext = float(radii.max()) * 1.3
            if any(np.hypot(*(c[:2] - pc[:2])) < ext + pe + 3.0 and abs(c[2] - pc[2]) < ext + pe
                   for pc, pe in placed):
                continue
            rot = _random_rotation(rng)
            b = grid.box(c, np.full(3, ext))
            if b is None:
                continue
            sl, dd = b
            rho, q = _rho(dd, radii, rot)
            # lumpy surface: a few low-order angular harmonics modulate the radius
            nrm = np.maximum(rho, 1e-6)
            lump = np.zeros_like(rho)
            for _k in range(3):
                om = rng.standard_normal(3)
                om *= rng.uniform(1.5, 3.0) / np.linalg.norm(om)
                lump += rng.uniform(0.0, 0.1) * np.cos((om[0] * q[0] + om[1] * q[1] + om[2] * q[2]) / nrm * np.pi
                                                       + rng.uniform(0, 2 * np.pi))
            rr = rho / (1.0 + lump)
            lab = labels[sl]
            mask = (rr <= 1.0) & ~forbid[lab]
            cv = np.round(grid.to_vox(c)).astype(int)
            if np.any(cv < 0) or np.any(cv >= grid.shape) or forbid[labels[tuple(cv)]]:
                continue
            # the smallest lesions would otherwise miss every voxel centre
            loc = tuple(int(cv[k] - sl[k].start) for k in range(3))
            if all(0 <= loc[k] < mask.shape[k] for k in range(3)):
                mask[loc] = True
            if not mask.any():
                continue
            break
        else:
            continue

        if rng.uniform() < opts.low_contrast_fraction:
            val = rng.uniform(*opts.low_contrast_suv)  # low contrast: near liver / bowel uptake
        else:
            val = math.exp(rng.uniform(math.log(opts.lesion_suv[0]), math.log(opts.lesion_suv[1])))
        necrotic = d > 25.0 and rng.uniform() < 0.6
        # viable tumour slightly hotter at the centre; a necrotic core is cold but still tumour (in SEG)
        prof = val * (1.1 - 0.2 * np.clip(rr, 0, 1))
        if necrotic:
            core = rr < rng.uniform(0.35, 0.6)
            prof = np.where(core, rng.uniform(0.5, 1.2), prof)
        hu = _lesion_hu(site, rng, float(ct_lut[LIVER]))
        suv[sl][mask] = prof[mask].astype(np.float32)
        ct_sub = ct[sl]
        ct_sub[mask] = hu
        if necrotic:
            ct_sub[mask & core] = rng.uniform(5.0, 25.0)
        seg[sl][mask] = 1
        zz = np.flatnonzero(mask.any(axis=(0, 1))) + sl[2].start
        lesions.append(PhantomLesion(site, tuple(float(x) for x in grid.to_vox(c)), tuple(float(x) for x in radii),
                                     float(val), bool(necrotic), int(mask.sum()), (int(zz[0]), int(zz[-1]))))
        placed.append((c, ext))

        if cluster_left > 0:
            cluster_left -= 1
        elif anchor is None and n - len(lesions) >= 1 and rng.uniform() < 0.65:
            anchor = (site, float(c[2]))
            cluster_left = int(rng.integers(1, min(3, n - len(lesions)) + 1))
    return lesions


# --------------------------------------------------------------------------------------------------
# public API


def make_phantom_study(
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    negative: bool = False,
    anatomy_seed: int | None = None,
    diagnosis: str | None = None,
    options: PhantomOptions = DEFAULT_OPTIONS,
) -> PhantomStudy:
    """Generate one synthetic whole-body PET/CT study.

    Args:
        seed: seeds the lesions, uptake levels and noise (and the anatomy unless ``anatomy_seed``).
        shape: ``(X, Y, Z)`` voxels; the body is scaled to this field of view.
        spacing_mm: voxel size in mm (x, y, z).
        negative: no lesions (SEG all zero), a negative control.
        anatomy_seed: seeds the body and organ geometry; follow-up studies of one patient share it.
        diagnosis: one of ``DIAGNOSES`` (drives lesion sites); random if None; "NEGATIVE" if negative.
        options: organ uptake, lesion size / contrast and z field of view (``PhantomOptions``).

    Returns:
        PhantomStudy with float32 SUV (g/ml), float32 CT (HU), uint8 SEG, LAS affine, lesion list.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing}")
    seed = int(seed)
    rng_anat = np.random.default_rng([int(anatomy_seed if anatomy_seed is not None else seed), 1])
    rng_up = np.random.default_rng([seed, 2])
    rng_les = np.random.default_rng([seed, 3])
    rng_noise = np.random.default_rng([seed, 4])

    grid = _Grid.make(shape, spacing, options.body_z)
    anat = _make_anatomy(grid, rng_anat, options.body_z[1])
    labels = anat.labels

    # per-study physiological uptake (SUV) and tissue density (HU), indexed by label
    suv_lut = np.zeros(256, dtype=np.float32)
    suv_lut[[FAT, SOFT, LUNG, BONE, MARROW, BRAIN, BLOOD, MYOCARDIUM, LIVER, SPLEEN, KIDNEY, BLADDER, BOWEL]] = [
        0.3, rng_up.uniform(0.6, 0.9), rng_up.uniform(0.15, 0.25), 0.5, rng_up.uniform(1.0, 1.8),
        rng_up.uniform(6.0, 10.0), rng_up.uniform(1.3, 1.9), rng_up.uniform(3.0, 8.0), rng_up.uniform(2.0, 2.5),
        rng_up.uniform(1.6, 2.1), rng_up.uniform(4.0, 8.0), rng_up.uniform(10.0, 30.0), rng_up.uniform(1.5, 3.5),
    ]
    hot = [BRAIN, BLOOD, MYOCARDIUM, LIVER, SPLEEN, KIDNEY, BLADDER, BOWEL]
    suv_lut[hot] *= np.float32(options.organ_uptake_scale)
    ct_lut = np.full(256, -1000.0, dtype=np.float32)
    ct_lut[[FAT, SOFT, LUNG, BONE, MARROW, BRAIN, BLOOD, MYOCARDIUM, LIVER, SPLEEN, KIDNEY, BLADDER, BOWEL]] = [
        -100.0, 40.0, -850.0, 900.0, 350.0, 35.0, 40.0, 45.0, rng_up.uniform(50.0, 65.0), 45.0, 35.0, 10.0, 20.0,
    ]
    suv = suv_lut[labels]
    ct = ct_lut[labels]
    seg = np.zeros(shape, dtype=np.uint8)

    if negative:
        diag, lesions = "NEGATIVE", []
    else:
        diag = diagnosis if diagnosis is not None else str(rng_les.choice(DIAGNOSES))
        if diag not in _SITE_WEIGHTS:
            raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diag!r}")
        lesions = _place_lesions(anat, rng_les, diag, suv, ct, seg, ct_lut, options)

    # PSF: Gaussian of PSF_FWHM_MM, per-axis sigma in voxels from the spacing
    sigma = PSF_FWHM_MM / (2.0 * math.sqrt(2.0 * math.log(2.0))) / np.asarray(spacing)
    pet = ndimage.gaussian_filter(suv, sigma, mode="constant", truncate=3.0)
    # counting noise: std ~ sqrt(signal), spatially correlated like reconstructed PET
    noise = rng_noise.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6, truncate=2.5)
    noise /= max(float(noise.std()), 1e-6)
    level = rng_noise.uniform(0.12, 0.2)
    pet += level * np.sqrt(np.maximum(pet, 0.0)) * noise
    np.maximum(pet, 0.0, out=pet)

    # CT: mild noise; lung parenchyma denser posteriorly (dependent lung)
    lung = labels == LUNG
    ct[lung] -= 0.25 * np.broadcast_to(grid.v[None, :, None], shape)[lung]
    ct += rng_noise.normal(0.0, 8.0, shape).astype(np.float32)

    return PhantomStudy(
        suv=pet.astype(np.float32, copy=False),
        ct=ct.astype(np.float32, copy=False),
        seg=seg,
        affine=phantom_affine(shape, spacing),
        spacing_mm=spacing,
        lesions=lesions,
        organs=labels,
        diagnosis=diag,
        seed=seed,
    )


def _atomic_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_nifti(path, img)


def _cohort_plan(n: int, seed: int, negative_fraction: float) -> list[tuple[int, int, bool, int, str]]:
    """(patient, visit, negative, anatomy seed, diagnosis) per study; deterministic for ``seed``."""
    rng = np.random.default_rng([int(seed), 0])
    n_neg = int(math.floor(n * float(negative_fraction) + 0.5))  # half up, not banker's rounding
    neg = np.zeros(n, dtype=bool)
    neg[rng.permutation(n)[:n_neg]] = True
    plan, patient, visit, diag = [], -1, 0, DIAGNOSES[0]
    for i in range(n):
        # ~20% of studies are a follow-up of the previous patient (never a third visit)
        if i > 0 and visit == 0 and rng.uniform() < 0.2:
            visit = 1
        else:
            patient, visit = patient + 1, 0
            diag = str(rng.choice(DIAGNOSES))  # a patient keeps its disease across visits
        anat_seed = int(np.random.SeedSequence([int(seed), patient, 7]).generate_state(1)[0])
        plan.append((patient, visit, bool(neg[i]), anat_seed, diag))
    return plan


def _iter_cohort(out, n, shape, seed, negative_fraction, spacing_mm, options=DEFAULT_OPTIONS):
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= negative_fraction <= 1.0:
        raise ValueError(f"negative_fraction must be in [0, 1], got {negative_fraction}")
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    for i, (patient, visit, negative, anat_seed, diag) in enumerate(_cohort_plan(n, seed, negative_fraction)):
        study_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        st = make_phantom_study(study_seed, shape=shape, spacing_mm=spacing_mm, negative=negative,
                                anatomy_seed=anat_seed, diagnosis=None if negative else diag,
                                options=options)
        pid = f"PETCT_{patient + 1:04d}"
        date = f"01-01-{2000 + visit}" if visit == 0 else f"{1 + (i % 12):02d}-15-{2000 + visit}"
        study_id = f"{date}-NA-PET-CT Ganzkoerper phantom-{i + 1:04d}"
        folder = root / pid / study_id
        folder.mkdir(parents=True, exist_ok=True)
        written.add(str(folder))
        _atomic_nifti(folder / "SUV.nii.gz", st.suv, st.affine, np.float32)
        _atomic_nifti(folder / "CTres.nii.gz", np.round(st.ct), st.affine, np.int16)
        _atomic_nifti(folder / "SEG.nii.gz", st.seg, st.affine, np.uint8)
        ref = StudyRef(pid, study_id, str(folder / "SUV.nii.gz"), str(folder / "CTres.nii.gz"),
                       str(folder / "SEG.nii.gz"), diagnosis=st.diagnosis)
        LOG.info("phantom %s / %s: %s, %d lesions, %d SEG voxels", pid, study_id, st.diagnosis,
                 len(st.lesions), int(st.seg.sum()))
        yield ref, st
    # stale studies of an earlier, larger cohort would be picked up by discover_cohort; say so, but
    # never delete anything in a user's folder
    stale = [p for p in root.glob("PETCT_*/*") if p.is_dir() and str(p) not in written]
    if stale:
        LOG.warning("%s holds %d study folders this run did not write (e.g. %s); remove them if unwanted",
                    root, len(stale), stale[0])


def write_phantom_cohort(
    out: str | os.PathLike,
    n: int = 24,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    negative_fraction: float = 0.25,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    options: PhantomOptions = DEFAULT_OPTIONS,
) -> list[StudyRef]:
    """Write ``n`` phantom studies in the autoPET layout and return their references.

    Layout: ``<out>/PETCT_0001/<date>-NA-PET-CT Ganzkoerper phantom-0001/{SUV,CTres,SEG}.nii.gz``
    (SUV float32 g/ml, CTres int16 HU, SEG uint8; LAS affine, ``spacing_mm`` mm).
    ``n * negative_fraction`` (rounded half up) studies are negative controls (SEG written, all zero);
    about a fifth of the studies are a follow-up of the previous patient (same anatomy and disease,
    new lesions), so splits must be by patient. An existing folder is overwritten
    file by file, deterministically for ``seed``; each file is written to a temp name then replaced.
    Paths in the returned refs are absolute; ``diagnosis`` is set (``"NEGATIVE"`` for controls).
    ``options`` varies organ uptake, lesion size / contrast and the z field of view.
    """
    return [ref for ref, _ in _iter_cohort(out, n, shape, seed, negative_fraction, spacing_mm, options)]


def options_from_args(args: argparse.Namespace) -> PhantomOptions:
    """PhantomOptions from the CLI flags that ``add_options_args`` defines."""
    return PhantomOptions(organ_uptake_scale=args.organ_uptake_scale,
                          lesion_diameter_mm=tuple(args.lesion_diameter),
                          lesion_suv=tuple(args.lesion_suv),
                          low_contrast_fraction=args.low_contrast_fraction,
                          body_z=tuple(args.body_z))


def add_options_args(p: argparse.ArgumentParser) -> None:
    """CLI flags for ``PhantomOptions`` (defaults: the default phantom)."""
    d = DEFAULT_OPTIONS
    p.add_argument("--organ-uptake-scale", type=float, default=d.organ_uptake_scale,
                   help="multiply physiological organ SUV (brain, heart, kidneys, bladder, ...)")
    p.add_argument("--lesion-diameter", type=float, nargs=2, default=list(d.lesion_diameter_mm),
                   metavar=("MIN", "MAX"), help="lesion diameter range, mm (default 6 50)")
    p.add_argument("--lesion-suv", type=float, nargs=2, default=list(d.lesion_suv), metavar=("MIN", "MAX"),
                   help="SUV range of ordinary lesions (default 4 20)")
    p.add_argument("--low-contrast-fraction", type=float, default=d.low_contrast_fraction,
                   help="share of lesions with SUV 2.5-4 (default 0.2)")
    p.add_argument("--body-z", type=float, nargs=2, default=list(d.body_z), metavar=("START", "STOP"),
                   help="fraction of the body the z field of view covers (default 0 1: whole body)")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m wsseg_core.phantom OUT --n 24 --shape X Y Z --seed 0 [--figure PNG]``."""
    p = argparse.ArgumentParser(prog="python -m wsseg_core.phantom", description=__doc__.split("\n")[0])
    p.add_argument("out", help="cohort root folder (created; existing studies are overwritten)")
    p.add_argument("--n", type=int, default=24, help="number of studies (default 24)")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING_MM), metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (default 2.04 2.04 3.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-fraction", type=float, default=0.25)
    p.add_argument("--figure", metavar="PNG", default=None, help="write a figure of the first positive study")
    add_options_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    fig_study = None
    for ref, st in _iter_cohort(args.out, args.n, args.shape, args.seed, args.negative_fraction, args.spacing,
                                options_from_args(args)):
        print(f"{ref.patient_id}  {ref.study_id}  {st.diagnosis:<11}  lesions={len(st.lesions)}  "
              f"seg_voxels={int(st.seg.sum())}  -> {Path(ref.suv_path).parent}")
        if fig_study is None and st.lesions:
            fig_study = (ref, st)
    if args.figure:
        if fig_study is None:
            print("no positive study: no figure written", file=sys.stderr)
            return 1
        from wsseg_core.report import phantom_figure

        ref, st = fig_study
        path = phantom_figure(st.suv, st.ct, st.seg, st.spacing_mm, args.figure,
                              title=f"{ref.patient_id} / {ref.study_id} ({st.diagnosis}, {len(st.lesions)} lesions)")
        print(f"figure -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
