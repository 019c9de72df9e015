"""Figures (PNG), drawn with matplotlib's Agg canvas: no display and no global backend switch.

Orientation: volumes are ``(X, Y, Z)`` in LAS, so the x index runs toward the patient's left, y toward
anterior and z toward the head. Figures use the radiological convention (patient's right on the
image's left, which is x index 0), head at the top of coronal views, anterior at the top of axial views.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _largest_lesion_slice(seg: np.ndarray) -> int:
    """Axial index through the centre of the largest connected SEG component (middle slice if empty)."""
    if not seg.any():
        return seg.shape[2] // 2
    from scipy import ndimage

    lab, n = ndimage.label(seg > 0)
    sizes = np.bincount(lab.ravel())[1:]
    zs = np.flatnonzero((lab == int(np.argmax(sizes)) + 1).any(axis=(0, 1)))
    return int(zs[len(zs) // 2])


def _save_atomic(fig, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def phantom_figure(
    suv: np.ndarray,
    ct: np.ndarray,
    seg: np.ndarray | None,
    spacing_mm: Sequence[float],
    path: str | os.PathLike,
    title: str | None = None,
    suv_max: float = 10.0,
    z: int | None = None,
) -> Path:
    """Three panels of one study, written atomically as a PNG; returns the path.

    1. coronal maximum-intensity projection of SUV (max over the anterior-posterior y axis), inverted
       grey scale 0..``suv_max`` SUV, with the SEG projection's outline in red;
    2. the axial PET slice through the largest lesion (middle slice if SEG is empty) with SEG outline;
    3. the same axial CT slice, soft-tissue window (-160..240 HU), with SEG outline.

    ``z`` overrides the axial slice index. Aspect ratios come from ``spacing_mm`` (mm), so anisotropic voxels are displayed true to size.
    """
    from matplotlib.figure import Figure

    suv = np.asarray(suv, dtype=np.float32)
    ct = np.asarray(ct, dtype=np.float32)
    seg = np.zeros(suv.shape, dtype=np.uint8) if seg is None else (np.asarray(seg) > 0)
    if suv.ndim != 3 or suv.shape != ct.shape or suv.shape != seg.shape:
        raise ValueError(f"suv, ct, seg must be 3D of one shape, got {suv.shape}, {ct.shape}, {seg.shape}")
    sx, sy, sz = (float(s) for s in spacing_mm)
    X, Y, Z = suv.shape
    z = _largest_lesion_slice(seg) if z is None else int(np.clip(z, 0, Z - 1))

    # extents in mm; origin="lower" puts high z (head) and high y (anterior) at the top
    cor_ext = (0.0, X * sx, 0.0, Z * sz)
    ax_ext = (0.0, X * sx, 0.0, Y * sy)
    fig = Figure(figsize=(13.0, 5.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [X * sx / (Z * sz), X * sx / (Y * sy), X * sx / (Y * sy)]})

    a0 = axes[0]
    a0.imshow(suv.max(axis=1).T, origin="lower", extent=cor_ext, cmap="gray_r", vmin=0.0, vmax=suv_max,
              interpolation="nearest")
    if seg.any():
        a0.contour(seg.max(axis=1).T.astype(float), levels=[0.5], colors="red", linewidths=0.8,
                   origin="lower", extent=cor_ext)
    a0.axhline((z + 0.5) * sz, color="tab:blue", lw=0.6, ls="--")
    a0.set_title(f"coronal SUV MIP (0-{suv_max:g})")

    for ax, img, kw, name in (
        (axes[1], suv[:, :, z], dict(cmap="gray_r", vmin=0.0, vmax=suv_max), "PET"),
        (axes[2], ct[:, :, z], dict(cmap="gray", vmin=-160.0, vmax=240.0), "CT"),
    ):
        ax.imshow(img.T, origin="lower", extent=ax_ext, interpolation="nearest", **kw)
        if seg[:, :, z].any():
            ax.contour(seg[:, :, z].T.astype(float), levels=[0.5], colors="red", linewidths=0.8,
                       origin="lower", extent=ax_ext)
        ax.set_title(f"axial {name}, slice z={z}")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_xlabel("R  <-  x  ->  L")
    axes[1].set_xlabel("R  <-  x  ->  L   (anterior up)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, out, dpi=110)
    return out


def cam_figure(
    suv_slice: np.ndarray,
    ct_slice: np.ndarray,
    seg_slice: np.ndarray | None,
    cams: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    path: str | os.PathLike,
    title: str | None = None,
    suv_max: float = 10.0,
) -> Path:
    """Früh et al. Fig. 4 for one axial slice: PET with the reference contour, each method's CAM
    (upsampled bilinearly to the slice, for display) over the PET, its Algorithm 1 mask, and CT.

    Args:
        suv_slice, ct_slice, seg_slice: (X, Y) SUV (g/ml), CT (HU), reference mask or None.
        cams: method -> (h, w) normalised CAM in [0, 1].
        masks: method -> (X, Y) boolean segmentation of that method.
    """
    import torch
    from matplotlib.figure import Figure

    suv_slice = np.asarray(suv_slice, dtype=np.float32)
    X, Y = suv_slice.shape
    seg = np.zeros((X, Y), bool) if seg_slice is None else np.asarray(seg_slice) > 0
    methods = list(cams)
    fig = Figure(figsize=(2.6 * (len(methods) + 2), 5.4))
    axes = fig.subplots(2, len(methods) + 2, squeeze=False)

    def show(ax, img, **kw):
        ax.imshow(np.asarray(img).T, origin="lower", interpolation="nearest", **kw)
        if seg.any():
            ax.contour(seg.T.astype(float), levels=[0.5], colors="red", linewidths=0.7, origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])

    show(axes[0, 0], suv_slice, cmap="gray_r", vmin=0, vmax=suv_max)
    axes[0, 0].set_title("PET + reference", fontsize=9)
    show(axes[1, 0], ct_slice, cmap="gray", vmin=-160, vmax=240)
    axes[1, 0].set_title("CT", fontsize=9)
    for i, m in enumerate(methods, start=1):
        up = torch.nn.functional.interpolate(torch.as_tensor(cams[m], dtype=torch.float32)[None, None],
                                             size=(X, Y), mode="bilinear", align_corners=False)[0, 0].numpy()
        show(axes[0, i], suv_slice, cmap="gray_r", vmin=0, vmax=suv_max)
        axes[0, i].imshow(up.T, origin="lower", cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[0, i].set_title(m, fontsize=9)
        show(axes[1, i], masks[m], cmap="Blues", vmin=0, vmax=1)
        axes[1, i].set_title(f"{m} mask", fontsize=9)
    axes[0, -1].axis("off")
    axes[1, -1].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, out, dpi=100)
    return out
