"""MIP-CAM network: per-view samples, the MIP CNN and its CAMs (Eq. 1), the distance loss, training,
and the CAMs of a study's two MIPs at inference.

Part of MIP-CAM (:mod:`wsseg_core.mipcam`, whose docstring describes the method, steps 2-4);
re-exported there. Never imports ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsseg_core.mipcam_geometry import (ISO_MM, VIEWS, compute_mips, distance_map_mm,
                                        project_points_mm)
from wsseg_core.storage import write_npz

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
_EPS = 1e-6
NORMS = ("group", "batch", "none")


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
# Inference: the CAMs of a study's two MIPs
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
