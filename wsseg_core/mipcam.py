"""MIP class response (Amyar et al.): study-level CNN on coronal/sagittal MIPs, distance-corrected CAM,
3-D reconstruction by back-projection. Method name ``MIP-CAM``.

Pipeline (paper Sec. 2-3, our choices where the paper is silent marked *):

1. **MIPs.** Per study two maximum-intensity projections of the SUV: *coronal* = max over the
   anterior-posterior axis (image axes: left-right, superior-inferior) and *sagittal* = max over the
   left-right axis (image axes: anterior-posterior, superior-inferior). The axes are found from the
   affine (``nibabel.aff2axcodes``), so any axis order / flip is handled; the 2-D image keeps the two
   remaining volume axes in volume index order (no flips). The projection is taken on the native
   grid (every voxel counts) and the 2-D image is then resampled to 2 mm isotropic pixels with
   nearest neighbour (the paper resamples with k-nearest-neighbour interpolation). SUV is clipped to
   [0, 30] and divided by 30.
   Pixel ``j`` of a 2 mm axis covers ``[2j, 2j + 2)`` mm from the volume edge; it takes the native
   voxel ``floor((j + 0.5) * 2 / s)`` (s = native spacing, mm), and there are ``round(n * s / 2)``
   pixels.
2. **CNN.** 8 conv layers (4 stages of two conv3x3 -> norm -> ReLU; max-pool after the first
   ``n_pool`` stages), global average pooling, one linear layer (paper: "an 8 layers CNN",
   GAP + classification layer). *Norm is GroupNorm (4 groups) by default: with BatchNorm, on
   4-study phantom sets the eval-mode BCE rose (0.67 -> 1.13) while the train BCE fell
   (0.68 -> 0.29) - batch statistics of 8 MIPs mixing bright and empty studies do not carry over
   to eval mode; GroupNorm has no running statistics (``norm="batch"`` / ``"none"`` selectable). The paper's CAM is 1/16 of the input (``n_pool=4``, "paper"
   preset); the CPU preset uses ``n_pool=3`` because phantom MIPs are only ~50-150 px. One CNN
   serves both views (each view is one sample carrying the study's label)*.
   Classes: ``("tumour",)`` by default (one logit, tumour vs none); with ``classes`` = the cancer
   types (manifest ``diagnosis``), one logit per type. Targets are one-hot, all zero for a study
   without tumour, and the classification loss is BCE-with-logits (the paper's "binary
   cross-entropy").
3. **CAM (Eq. 1).** ``M_c = W_c^T f / max_x W_c^T f`` for the ground-truth class (training) or the
   highest-scoring class (inference). *We take ReLU before dividing by the max, so M is in [0, 1]
   (a map with no positive value is all 0), and compute it after bilinear upsampling of
   ``W_c^T f`` to the MIP grid, so thresholds and distances live on the 2 mm pixels.
4. **Distance loss** (``distance_loss``; the paper only says "a distance between the CAM and the
   central point"). For one view, let ``M = (A - min A) / (max A - min A)`` with ``A = W_c^T f``
   upsampled to the MIP grid (Eq. 1's max normalisation with the minimum subtracted, in [0, 1];
   see ``minmax_cam`` for why not ReLU), and let ``c_1..c_K`` be the lesion centre points projected
   onto the view (mm). With ``d(p) = min_k ||p - c_k||_2`` the distance in mm from pixel centre
   ``p`` to the nearest centre point,

       L_dist = sum_p M(p) d(p) / (sum_p M(p) + eps)     [mm]

   i.e. the CAM-weighted mean distance to the nearest centre point. It is 0 when all CAM mass sits
   on centre points, grows with CAM mass far from any lesion, is differentiable in the network's
   weights, and is averaged over the views that have centre points (negative studies only get the
   BCE). Total loss = BCE + ``distance_weight`` x L_dist
   (``distance_weight`` in 1/mm), back-propagated together, batch 8 (paper).
5. **Gate** (*as Früh et al.'s Algorithm 1 gates its slices; the paper segments the studies it
   classifies, all with cancer). A study whose predicted probability (sigmoid of the mean of the
   two views' logits; with cancer types, the highest class) is below ``gate_threshold`` (default
   ``DEFAULT_GATE`` = 0.5) gets an empty mask. Without the gate a tumour-free study was segmented
   too: a CAM divided by its own maximum reaches 1 somewhere whenever its class response is
   positive anywhere, so it has a region at every t. 0.5 is the decision boundary of
   the unweighted BCE this CNN is trained with (the slice classifier's weighted loss shifts its
   boundary, hence its tuned flag threshold; here nothing shifts it). ``gate_threshold=0`` turns
   the gate off.
6. **3-D reconstruction.** Threshold each view's CAM at ``t`` (``M >= t``), back-project the coronal
   mask along anterior-posterior and the sagittal mask along left-right (nearest, onto the native
   grid), intersect -> candidate region. Inside it, keep voxels with
   ``SUV >= q / 100 * SUVmax`` of their connected component of the region (26-connectivity).
   *Why relative and per component: a fixed SUV does not transfer between scanners, patients and
   uptake times, while a fraction of SUVmax is the usual PET delineation (e.g. 41 % SUVmax, EANM) and
   is what q_m means for the slice methods (a percentage); per component, because one region-wide
   SUVmax would let the brightest lesion (or physiological uptake caught in the region) erase the
   dimmer ones. Known limitation of two projections: K lesions at the same height can produce up to
   K^2 intersections ("ghosts"); the SUV threshold removes those that fall on background.

Pure numpy / scipy / torch; ``jobs/train_mipcam.py`` wraps training and the search in Ray. Never
imports ray.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from wsseg_core.checkpoint import load_checkpoint, save_checkpoint
from wsseg_core.metrics import dice_from_counts
from wsseg_core.storage import write_npz

ISO_MM = 2.0  # MIP pixel size (paper: resampled to 2 x 2 x 2 mm)
SUV_CLIP = 30.0  # SUV clipped to [0, 30] then scaled to [0, 1] (paper 3.2)
VIEWS = ("coronal", "sagittal")
TUMOUR_CLASSES: tuple[str, ...] = ("tumour",)
NEGATIVE_LABELS = frozenset({"NEGATIVE", "NONE", "", "NAN"})

MIPCAM_PRESETS: dict[str, dict[str, Any]] = {
    # Paper: CAM at 1/16 of the input; width not given (we take 32..256 channels).
    "paper": dict(width=32, n_pool=4),
    # CPU preset: 8..64 channels, CAM at 1/8 (phantom MIPs are ~50-150 px).
    "small": dict(width=8, n_pool=3),
}
PAPER_BATCH_SIZE = 8
DEFAULT_LR = 1e-3  # Adam; the paper gives no optimiser settings
# Untuned fallbacks for load_segmenter (the pipeline always tunes): CAM >= 0.5, 40 % of SUVmax.
DEFAULT_T = 0.5
DEFAULT_Q = 40.0
# Study-level gate (step 5 of the module docstring): segment only studies the CNN calls tumorous.
DEFAULT_GATE = 0.5
# Search grids: t as the slice methods (Früh: linspace(0.1, 0.9, 10)); q in % of the component's
# SUVmax, the same 20 values as q_m (20..50 %, bracketing the usual 41 %).
T_GRID: np.ndarray = np.linspace(0.1, 0.9, 10)
Q_GRID: np.ndarray = np.linspace(20, 50, 20)

CHECKPOINT_FORMAT = "wsseg.MipCamCNN"
CHECKPOINT_VERSION = 1
_EPS = 1e-6
NORMS = ("group", "batch", "none")


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


# --------------------------------------------------------------------------------------------------
# Samples (one per view of a study)
# --------------------------------------------------------------------------------------------------

@dataclass
class MipSample:
    """One training/validation image: a view's MIP, its target and its centre-point distance map.

    ``image`` float32 (H, W) in [0, 1]; ``target`` float32 (C,) one-hot (all 0 = no tumour);
    ``dist_mm`` float32 (H, W) distance to the nearest projected lesion centre (mm);
    ``has_points`` whether the view has centre points (else the distance loss skips it);
    ``points_mm`` (K, 2) the projected centres.
    """

    image: np.ndarray
    target: np.ndarray
    dist_mm: np.ndarray
    has_points: bool
    points_mm: np.ndarray
    view: str = ""
    study: str = ""


def study_target(has_tumour: bool, diagnosis: str | None, classes: Sequence[str]) -> np.ndarray:
    """One-hot target over ``classes``: ("tumour",) -> [has_tumour]; cancer types -> the study's
    ``diagnosis`` (all zeros for a study without tumour). Raises for an unknown diagnosis."""
    t = np.zeros(len(classes), dtype=np.float32)
    if not has_tumour:
        return t
    if tuple(classes) == TUMOUR_CLASSES:
        t[0] = 1.0
        return t
    d = str(diagnosis or "").upper()
    if d not in classes:
        raise ValueError(f"diagnosis {diagnosis!r} is not one of the classes {list(classes)}")
    t[list(classes).index(d)] = 1.0
    return t


def diagnosis_classes(diagnoses: Iterable[str | None]) -> tuple[str, ...]:
    """The cancer types of a cohort (sorted, upper case), leaving out negatives and missing values."""
    return tuple(sorted({str(d).upper() for d in diagnoses
                         if d is not None and str(d).upper() not in NEGATIVE_LABELS}))


def study_samples(suv: np.ndarray, seg: np.ndarray | None, affine: np.ndarray,
                  spacing_mm: Sequence[float], classes: Sequence[str] = TUMOUR_CLASSES,
                  diagnosis: str | None = None, name: str = "") -> list[MipSample]:
    """The two view samples of one labelled study (centres = ``find_lesions(seg)`` centres of mass)."""
    from wsseg_core.data import find_lesions

    mips, views = compute_mips(suv, affine, spacing_mm)
    lesions = find_lesions(seg) if seg is not None else []
    centres = np.array([les.centre_vox for les in lesions], dtype=float).reshape(-1, 3)
    target = study_target(len(lesions) > 0, diagnosis, classes)
    out = []
    for v in VIEWS:
        pts = project_points_mm(centres, views[v])
        out.append(MipSample(mips[v], target, distance_map_mm(pts, mips[v].shape), len(pts) > 0,
                             pts, v, name))
    return out


def samples_to_npz(path: str | os.PathLike, samples: Sequence[MipSample]) -> None:
    """Save one study's samples (atomically: wsseg_core.storage.write_npz)."""
    arrays: dict[str, np.ndarray] = {"n": np.array(len(samples))}
    for i, s in enumerate(samples):
        arrays.update({f"image{i}": s.image, f"target{i}": s.target, f"dist{i}": s.dist_mm,
                       f"has{i}": np.array(bool(s.has_points)), f"points{i}": s.points_mm,
                       f"view{i}": np.array(s.view), f"study{i}": np.array(s.study)})
    write_npz(path, **arrays)


def samples_from_npz(path: str | os.PathLike) -> list[MipSample]:
    with np.load(path) as z:
        return [MipSample(z[f"image{i}"], z[f"target{i}"], z[f"dist{i}"], bool(z[f"has{i}"]),
                          z[f"points{i}"], str(z[f"view{i}"]), str(z[f"study{i}"]))
                for i in range(int(z["n"]))]


def collate(samples: Sequence[MipSample], multiple: int = 16
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a list of samples (bottom/right, zeros) to one size divisible by ``multiple``.

    Padding only at the end keeps every pixel's coordinates. Returns x (B, 1, H, W), target (B, C),
    dist_mm (B, H, W), pixel_valid (B, H, W) bool (False on padding), has_points (B,) bool.
    """
    h = max(s.image.shape[0] for s in samples)
    w = max(s.image.shape[1] for s in samples)
    h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    b = len(samples)
    x = torch.zeros(b, 1, h, w)
    dist = torch.zeros(b, h, w)
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    for i, s in enumerate(samples):
        hh, ww = s.image.shape
        x[i, 0, :hh, :ww] = torch.from_numpy(np.asarray(s.image, dtype=np.float32))
        dist[i, :hh, :ww] = torch.from_numpy(np.asarray(s.dist_mm, dtype=np.float32))
        valid[i, :hh, :ww] = True
    target = torch.from_numpy(np.stack([np.asarray(s.target, dtype=np.float32) for s in samples]))
    has = torch.tensor([bool(s.has_points) for s in samples])
    return x, target, dist, valid, has


# --------------------------------------------------------------------------------------------------
# Network and CAM
# --------------------------------------------------------------------------------------------------

class MipCamCNN(nn.Module):
    """8 conv layers (4 stages x [conv3x3 -> norm -> ReLU] x 2, channels ``width * 2**stage``),
    max-pool 2x2 after the first ``n_pool`` stages, GAP, one linear layer to ``len(classes)`` logits.

    ``forward(x)`` takes (B, 1, H, W) with H, W divisible by ``2**n_pool`` and returns
    (logits (B, C), features (B, K, H / 2**n_pool, W / 2**n_pool)).
    """

    def __init__(self, width: int = 8, n_pool: int = 3, classes: Sequence[str] = TUMOUR_CLASSES,
                 norm: str = "group") -> None:
        super().__init__()
        if not 0 <= int(n_pool) <= 4:
            raise ValueError(f"n_pool must be in 0..4, got {n_pool!r}")
        if int(width) < 1 or not classes:
            raise ValueError("width must be >= 1 and classes non-empty")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.width, self.n_pool, self.classes = int(width), int(n_pool), tuple(str(c) for c in classes)
        self.norm = norm
        layers: list[nn.Module] = []
        c_in = 1
        for stage in range(4):
            c = self.width * 2 ** stage
            for _ in range(2):
                layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=norm == "none"))
                if norm == "batch":
                    layers.append(nn.BatchNorm2d(c))
                elif norm == "group":
                    layers.append(nn.GroupNorm(min(4, c), c))
                layers.append(nn.ReLU(inplace=True))
                c_in = c
            if stage < self.n_pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, len(self.classes))

    @property
    def stride(self) -> int:
        return 2 ** self.n_pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.fc(f.mean(dim=(2, 3))), f

    def extra_repr(self) -> str:
        return f"width={self.width}, n_pool={self.n_pool}, norm={self.norm}, classes={self.classes}"


def class_response(model: nn.Module, features: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
    """``W_c^T f`` per sample: (B, K, h, w) features, (B,) class indices -> (B, h, w) (no bias:
    the bias shifts every pixel alike and cancels in Eq. 1's arg-max)."""
    bare = getattr(model, "module", model)
    w = bare.fc.weight[class_idx]  # (B, K)
    return torch.einsum("bk,bkhw->bhw", w, features)


def normalise_cam(raw: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1 with ReLU: ``relu(raw) / max relu(raw)`` per sample over (valid) pixels; (B, H, W) in
    [0, 1]; an all-non-positive map stays 0 (the eps keeps it finite and differentiable)."""
    m = F.relu(raw)
    if valid is not None:
        m = m * valid.to(m.dtype)
    mx = m.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return m / (mx + _EPS)


def cams_for(model: nn.Module, x: torch.Tensor, class_idx: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + CAM on the input grid: (logits (B, C), cam (B, H, W) normalised, Eq. 1).

    ``class_idx`` None takes each sample's highest logit. ``W_c^T f`` is upsampled bilinearly
    (align_corners=False) to the input size before the ReLU and max normalisation.
    """
    logits, f = model(x)
    if class_idx is None:
        class_idx = logits.argmax(dim=1)
    raw = class_response(model, f, class_idx)
    raw = F.interpolate(raw[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                        align_corners=False)[:, 0]
    return logits, normalise_cam(raw, valid)


def minmax_cam(raw: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The distance loss's CAM weights: ``(raw - min) / (max - min + eps)`` per sample over valid
    pixels, (B, H, W) in [0, 1], 0 on padding.

    Eq. 1 with the minimum subtracted. Why not ``normalise_cam`` (Eq. 1 with ReLU): with it the
    network can zero the distance loss by making the class response negative everywhere (an
    all-zero CAM has no mass to be far away); measured on a 64x64x32 phantom, it did so within 30
    Adam steps. With min-max the peak always has weight 1, so the loss can only fall by moving
    the response toward the centre points.
    """
    if valid is None:
        valid = torch.ones_like(raw, dtype=torch.bool)
    big = torch.finfo(raw.dtype).max
    mn = raw.masked_fill(~valid, big).flatten(1).min(dim=1).values.view(-1, 1, 1)
    mx = raw.masked_fill(~valid, -big).flatten(1).max(dim=1).values.view(-1, 1, 1)
    return ((raw - mn) / (mx - mn + _EPS)) * valid.to(raw.dtype)


def distance_loss(cam: torch.Tensor, dist_mm: torch.Tensor, use: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """CAM-weighted mean distance (mm) to the nearest lesion centre, averaged over samples.

    Per sample ``L = sum_p M(p) d(p) / (sum_p M(p) + eps)`` over valid pixels p, with M the CAM
    weights (B, H, W) in [0, 1] (training uses ``minmax_cam``) and d = ``dist_mm`` (B, H, W)
    (``distance_map_mm``). ``use`` (B,) bool picks the samples that have centre points; the result
    is the mean over them (0 when none).
    """
    m = cam if valid is None else cam * valid.to(cam.dtype)
    per = (m * dist_mm).flatten(1).sum(1) / (m.flatten(1).sum(1) + _EPS)
    if use is None:
        return per.mean()
    use = use.to(per.device)
    if not bool(use.any()):
        return per.sum() * 0.0  # keeps the graph; no sample has a centre point
    return per[use].mean()


def cam_peak_distance_mm(cam: np.ndarray, points_mm: np.ndarray, iso_mm: float = ISO_MM) -> float:
    """Distance (mm) from the CAM's arg-max pixel centre to the nearest centre point (NaN: none)."""
    pts = np.asarray(points_mm, dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        return float("nan")
    r, c = np.unravel_index(int(np.argmax(cam)), np.shape(cam))
    p = (np.array([r, c]) + 0.5) * iso_mm
    return float(np.sqrt(((pts - p) ** 2).sum(1)).min())


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def build_mipcam(preset: str = "small", classes: Sequence[str] = TUMOUR_CLASSES,
                 width: int | None = None, n_pool: int | None = None, norm: str = "group"
                 ) -> MipCamCNN:
    """The CNN of a preset ("paper": width 32, CAM 1/16; "small": width 8, CAM 1/8)."""
    if preset not in MIPCAM_PRESETS:
        raise ValueError(f"unknown MIP-CAM preset {preset!r}; choose one of {sorted(MIPCAM_PRESETS)}")
    cfg = dict(MIPCAM_PRESETS[preset])
    return MipCamCNN(width=int(width or cfg["width"]),
                     n_pool=int(cfg["n_pool"] if n_pool is None else n_pool), classes=classes,
                     norm=norm)


def multitask_loss(model: nn.Module, batch: tuple, distance_weight: float
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE(logits, target) + distance_weight x distance_loss(CAM of the target class).

    The CAM is that of the ground-truth class (argmax of the one-hot target); samples without centre
    points (negatives) contribute only BCE. Returns (loss, {"bce", "dist_mm"}).
    """
    x, target, dist, valid, has = batch
    logits, f = model(x)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    # The distance term is computed at weight 0 too, so "CAMs alone" runs report it as well.
    raw = class_response(model, f, target.argmax(dim=1))
    raw = F.interpolate(raw[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                        align_corners=False)[:, 0]
    dist_term = distance_loss(minmax_cam(raw, valid), dist, has, valid)
    loss = bce + float(distance_weight) * dist_term if distance_weight > 0 else bce
    return loss, {"bce": float(bce.detach()), "dist_mm": float(dist_term.detach())}


def batches(samples: Sequence[MipSample], batch_size: int, generator: torch.Generator | None,
            multiple: int, shuffle: bool = True) -> Iterable[tuple]:
    order = (torch.randperm(len(samples), generator=generator).tolist() if shuffle
             else list(range(len(samples))))
    for i in range(0, len(order), int(batch_size)):
        yield collate([samples[j] for j in order[i:i + batch_size]], multiple)


def train_epoch(model: nn.Module, samples: Sequence[MipSample], optimizer: torch.optim.Optimizer,
                distance_weight: float, batch_size: int = PAPER_BATCH_SIZE,
                generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                index_batches: Iterable[Sequence[int]] | None = None) -> dict[str, float]:
    """One shuffled pass in batches of ``batch_size`` -> sample-weighted mean loss, bce, dist_mm.

    ``index_batches`` (e.g. a ``train.GlobalBatchSampler``: this worker's share of each global
    batch under DDP) replaces the shuffled pass: one step per list of sample indices."""
    bare = getattr(model, "module", model)
    model.train()
    tot = {"loss": 0.0, "bce": 0.0, "dist_mm": 0.0}
    n = 0
    it = (batches(samples, batch_size, generator, bare.stride) if index_batches is None
          else (collate([samples[j] for j in idx], bare.stride) for idx in index_batches))
    for batch in it:
        batch = tuple(t.to(device) for t in batch)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = multitask_loss(model, batch, distance_weight)
        loss.backward()
        optimizer.step()
        b = len(batch[0])
        tot["loss"] += float(loss.detach()) * b
        tot["bce"] += parts["bce"] * b
        tot["dist_mm"] += parts["dist_mm"] * b
        n += b
    return {k: v / n if n else float("nan") for k, v in tot.items()}


def evaluate(model: nn.Module, samples: Sequence[MipSample], distance_weight: float = 0.0,
             batch_size: int = PAPER_BATCH_SIZE, device: str | torch.device = "cpu"
             ) -> dict[str, float]:
    """Validation: mean BCE, distance loss (mm), total loss, accuracy (every logit's sign right)
    and mean CAM-peak distance (mm, views with centres, CAM of the target class)."""
    if not samples:
        nan = float("nan")
        return dict(loss=nan, bce=nan, dist_mm=nan, accuracy=nan, peak_mm=nan, n=0)
    bare = getattr(model, "module", model)
    was = bare.training
    bare.eval()
    bce = dist = correct = 0.0
    peaks: list[float] = []
    n = n_pts = 0
    try:
        with torch.no_grad():
            for i in range(0, len(samples), int(batch_size)):
                chunk = samples[i:i + batch_size]
                x, target, dmap, valid, has = (t.to(device) for t in collate(chunk, bare.stride))
                logits, f = bare(x)
                raw = class_response(bare, f, target.argmax(dim=1))
                raw = F.interpolate(raw[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                                    align_corners=False)[:, 0]
                cam = minmax_cam(raw, valid)
                bce += float(F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
                             ) / target.shape[1]
                correct += float(((logits > 0) == (target > 0.5)).all(dim=1).sum())
                if bool(has.any()):
                    dist += float(distance_loss(cam, dmap, has, valid)) * int(has.sum())
                    n_pts += int(has.sum())
                for s, m in zip(chunk, cam.cpu().numpy()):
                    if s.has_points:
                        h, w = s.image.shape
                        peaks.append(cam_peak_distance_mm(m[:h, :w], s.points_mm))
                n += len(chunk)
    finally:
        bare.train(was)
    d = dist / n_pts if n_pts else float("nan")
    return dict(bce=bce / n, dist_mm=d, loss=bce / n + distance_weight * (d if n_pts else 0.0),
                accuracy=correct / n, peak_mm=float(np.mean(peaks)) if peaks else float("nan"), n=n)


def fit(model: nn.Module, train: Sequence[MipSample], val: Sequence[MipSample], *, epochs: int,
        distance_weight: float, lr: float = DEFAULT_LR, batch_size: int = PAPER_BATCH_SIZE,
        seed: int = 0, on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Single-process reference loop (Adam); the Ray Train job runs the same steps per worker."""
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = []
    for epoch in range(int(epochs)):
        tr = train_epoch(model, train, opt, distance_weight, batch_size, gen)
        va = evaluate(model, val, distance_weight, batch_size)
        rec = {"epoch": epoch, **{f"train_{k}": v for k, v in tr.items()},
               **{f"val_{k}": v for k, v in va.items()}}
        hist.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)
    return hist


# --------------------------------------------------------------------------------------------------
# Inference and 3-D reconstruction
# --------------------------------------------------------------------------------------------------

def predict_view_cams(model: nn.Module, mips: Mapping[str, np.ndarray], device: str = "cpu"
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """CAMs (Eq. 1, on each MIP's grid) of the study's predicted class, and its class probabilities.

    The class is chosen once per study from the mean of the two views' logits, so both views show
    the same class's response. Returns ({view: float32 (H, W) in [0, 1]}, probs (C,) sigmoid).
    """
    bare = getattr(model, "module", model)
    names = [v for v in VIEWS if v in mips]
    samples = [MipSample(mips[v], np.zeros(len(bare.classes), np.float32),
                         np.zeros_like(mips[v]), False, np.zeros((0, 2))) for v in names]
    x, _, _, valid, _ = collate(samples, bare.stride)
    was = bare.training
    bare.eval()
    try:
        with torch.no_grad():
            x, valid = x.to(device), valid.to(device)
            logits, f = bare(x)
            c = int(logits.mean(dim=0).argmax())
            raw = class_response(bare, f, torch.full((len(names),), c, device=x.device))
            raw = F.interpolate(raw[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                                align_corners=False)[:, 0]
            cam = normalise_cam(raw, valid).cpu().numpy()
            probs = torch.sigmoid(logits.mean(dim=0)).cpu().numpy()
    finally:
        bare.train(was)
    return ({v: cam[i, :mips[v].shape[0], :mips[v].shape[1]].astype(np.float32)
             for i, v in enumerate(names)}, probs)


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


# --------------------------------------------------------------------------------------------------
# Checkpoints and the scorer's loader
# --------------------------------------------------------------------------------------------------

def save_mipcam(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any] | None = None
                ) -> None:
    """Write {format, version, state_dict, config, meta} atomically (temp + ``os.replace``);
    ``meta`` must be JSON-able so the file loads with ``torch.load(weights_only=True)``."""
    bare = getattr(model, "module", model)
    if not isinstance(bare, MipCamCNN):
        raise TypeError(f"expected a MipCamCNN, got {type(bare).__name__}")
    save_checkpoint(path, bare, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                    config={"width": bare.width, "n_pool": bare.n_pool, "classes": list(bare.classes),
                            "norm": bare.norm, "iso_mm": ISO_MM, "suv_clip": SUV_CLIP},
                    meta=meta)


def load_mipcam(path: str | os.PathLike) -> tuple[MipCamCNN, dict]:
    """Load a ``save_mipcam`` file -> (model in eval mode on CPU, meta). ValueError naming the path
    for a missing, unreadable or foreign file."""
    model, ckpt = load_checkpoint(
        path, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, what="MIP-CAM",
        build=lambda cfg: MipCamCNN(width=int(cfg["width"]), n_pool=int(cfg["n_pool"]),
                                    classes=cfg["classes"], norm=str(cfg.get("norm", "group"))))
    return model, dict(ckpt.get("meta") or {})


def study_flagged(probs: Sequence[float] | np.ndarray, gate_threshold: float = DEFAULT_GATE) -> bool:
    """Whether the CNN calls the study tumorous: its highest class probability >= ``gate_threshold``
    (``predict_view_cams``'s probs: one per class, sigmoid of the two views' mean logit)."""
    p = np.asarray(probs, dtype=float).ravel()
    return bool(p.size) and float(p.max()) >= float(gate_threshold)


def segment_study(model: nn.Module, suv: np.ndarray, affine: np.ndarray,
                  spacing_mm: Sequence[float], t: float, q: float, device: str = "cpu",
                  gate_threshold: float = DEFAULT_GATE) -> np.ndarray:
    """MIPs -> CAMs of the predicted class -> 3-D reconstruction. uint8 mask of ``suv.shape``;
    all zero when the CNN calls the study tumour-free (:func:`study_flagged`)."""
    mips, views = compute_mips(suv, affine, spacing_mm)
    cams, probs = predict_view_cams(model, mips, device)
    if not study_flagged(probs, gate_threshold):
        return np.zeros(np.shape(suv), dtype=np.uint8)
    return reconstruct(suv, cams, views, t, q)


def load_segmenter(path: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
                   device: str = "cpu", batch_size: int = 32) -> Callable[[Any], np.ndarray]:
    """A scorer's view of a saved MIP-CAM CNN: ``study -> uint8 mask`` on the SUV grid.

    ``params`` (thresholds.json entry): ``t`` CAM threshold in [0, 1], ``q`` % of the component's
    SUVmax (defaults ``DEFAULT_T``, ``DEFAULT_Q``), ``gate_threshold`` (default ``DEFAULT_GATE``;
    0 segments every study). ``batch_size`` is unused (two images a study).
    """
    model, _ = load_mipcam(path)
    model.to(device).eval()
    p = dict(params or {})
    t, q = float(p.get("t", DEFAULT_T)), float(p.get("q", DEFAULT_Q))
    gate = float(p.get("gate_threshold", DEFAULT_GATE))

    def segment(study: Any) -> np.ndarray:
        return segment_study(model, study.suv, study.affine, study.spacing_mm, t, q, device, gate)

    return segment
