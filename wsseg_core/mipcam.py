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

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from wsseg_core.checkpoint import load_checkpoint, save_checkpoint
# The method lives in three modules along its seams; every public name stays importable from here
# (the jobs, methods.py and the tests use `wsseg_core.mipcam`): see __all__.
from wsseg_core.mipcam_geometry import (ISO_MM, SUV_CLIP, VIEWS, MipView,
                                        anatomical_axes, compute_mip, compute_mips,
                                        distance_map_mm, iso_index, iso_size, mip_views,
                                        native_index, project_points_mm)
from wsseg_core.mipcam_net import (DEFAULT_LR, MIPCAM_PRESETS, NEGATIVE_LABELS,
                                   NORMS, PAPER_BATCH_SIZE, TUMOUR_CLASSES, MipCamCNN, MipSample,
                                   batches, build_mipcam, cam_peak_distance_mm, cams_for,
                                   class_response, collate, diagnosis_classes, distance_loss,
                                   evaluate, fit, minmax_cam, multitask_loss, normalise_cam,
                                   predict_view_cams, samples_from_npz, samples_to_npz,
                                   study_samples, study_target, train_epoch)
from wsseg_core.mipcam_reconstruct import (back_project, candidate_region,
                                           component_suvmax, dice_grid, reconstruct,
                                           segment_region)

__all__ = [
    # mipcam_geometry
    "ISO_MM", "SUV_CLIP", "VIEWS", "MipView", "anatomical_axes", "mip_views", "iso_size",
    "iso_index", "native_index", "compute_mip", "compute_mips", "project_points_mm",
    "distance_map_mm",
    # mipcam_net
    "TUMOUR_CLASSES", "NEGATIVE_LABELS", "MIPCAM_PRESETS", "PAPER_BATCH_SIZE", "DEFAULT_LR",
    "NORMS", "MipSample", "study_target", "diagnosis_classes", "study_samples", "samples_to_npz",
    "samples_from_npz", "collate", "MipCamCNN", "class_response", "normalise_cam", "cams_for",
    "minmax_cam", "distance_loss", "cam_peak_distance_mm", "build_mipcam", "multitask_loss",
    "batches", "train_epoch", "evaluate", "fit", "predict_view_cams",
    # mipcam_reconstruct
    "back_project", "candidate_region", "component_suvmax", "segment_region", "reconstruct",
    "dice_grid",
    # this module: the search grids, checkpoints, the scorer's segmenter
    "DEFAULT_T", "DEFAULT_Q", "DEFAULT_GATE", "T_GRID", "Q_GRID", "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION", "save_mipcam", "load_mipcam", "study_flagged", "gate_separation",
    "segment_study", "load_segmenter",
]

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


def gate_separation(probs: Sequence[float], has_tumour: Sequence[bool],
                    gate_threshold: float = DEFAULT_GATE) -> dict[str, Any]:
    """How well the study gate (:func:`study_flagged`) separates labelled studies, e.g. validation.

    Args:
        probs: each study's highest class probability (``max(predict_view_cams(...)[1])``).
        has_tumour: whether each study's SEG holds tumour.
    Returns:
        dict(n_tumour, n_free (tumour-free studies), auc (study-level ROC AUC of ``probs``,
        ``metrics.roc_auc``; NaN when either kind is missing), tumour_p / free_p ([min, max] of
        each kind's probabilities, empty lists when none), free_passed (tumour-free studies the gate
        lets through, i.e. will be segmented), tumour_gated (studies with tumour it empties), and
        passes_every_free_study (True when there are tumour-free studies and the gate passes them
        all: it then removes nothing a user would want removed)).
    Why: trained with the paper's unweighted BCE on cohorts where most studies hold tumour, the CNN's
    probabilities sit above 0.5 for every study (demo: 0.64-0.71, tumour-free 0.64-0.68), so a
    ranking that separates the studies can still gate none of them.
    """
    from wsseg_core.metrics import roc_auc

    p = np.asarray(probs, dtype=float).reshape(-1)
    y = np.asarray(has_tumour, dtype=bool).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities for {y.size} studies")
    passed = p >= float(gate_threshold)
    span = (lambda v: [float(v.min()), float(v.max())] if v.size else [])
    n_free = int((~y).sum())
    free_passed = int((passed & ~y).sum())
    return {"n_tumour": int(y.sum()), "n_free": n_free, "auc": roc_auc(p, y),
            "tumour_p": span(p[y]), "free_p": span(p[~y]), "free_passed": free_passed,
            "tumour_gated": int((~passed & y).sum()), "gate_threshold": float(gate_threshold),
            "passes_every_free_study": bool(n_free and free_passed == n_free)}


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
