"""Run a trained slice classifier and the CAM engine over a whole volume, slice batch by slice batch."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from wsseg_core.cams import CAM_METHODS, CamEngine
from wsseg_core.gate import FlagRule
from wsseg_core.geometry import SliceGeometry
from wsseg_core.models import SliceClassifier, SlicePreprocessor, volume_to_batch


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _geometry(pre: SlicePreprocessor, suv: np.ndarray, ct: np.ndarray,
              spacing_mm: Sequence[float] | np.ndarray | None,
              geometry: SliceGeometry | None) -> SliceGeometry:
    """The study's geometry once (it scans the volume for the body), not once per batch."""
    return geometry if geometry is not None else pre.geometry(suv, ct, spacing_mm)


def classify_volume(model: SliceClassifier, pre: SlicePreprocessor, suv: np.ndarray, ct: np.ndarray,
                    batch_size: int = 64, spacing_mm: Sequence[float] | np.ndarray | None = None,
                    geometry: SliceGeometry | None = None) -> np.ndarray:
    """Tumour probability of every axial slice, shape (Z,), float32.

    Slices are built batch by batch so a 400x400x326 study never exists as one input tensor.
    ``spacing_mm`` (the study's voxel size, mm) or its ``geometry`` (``pre.geometry``) is needed
    when ``pre.mode`` is "resample_mm".
    """
    geometry = _geometry(pre, suv, ct, spacing_mm, geometry)
    device = model_device(model)
    model.eval()
    out = np.empty(suv.shape[2], dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, suv.shape[2], batch_size):
            z = np.arange(start, min(start + batch_size, suv.shape[2]))
            logits = model(volume_to_batch(suv, ct, z, pre, geometry=geometry).to(device))
            out[z] = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
    return out


def flagged_slices(probs: np.ndarray, threshold: "float | FlagRule | dict" = 0.5) -> np.ndarray:
    """Indices of slices the classifier calls tumorous (Algorithm 1, step 1): p >= ``threshold``,
    or, given a :class:`wsseg_core.gate.FlagRule` (or its thresholds.json dict), that rule's flags
    (e.g. hysteresis along z)."""
    if isinstance(threshold, (int, float, np.floating)):
        return np.flatnonzero(np.asarray(probs) >= threshold)
    return np.flatnonzero(FlagRule.from_record(threshold).flags(probs))


def volume_cams(engine: CamEngine, pre: SlicePreprocessor, suv: np.ndarray, ct: np.ndarray,
                z_indices: Sequence[int], methods: Sequence[str] = CAM_METHODS,
                batch_size: int = 64, spacing_mm: Sequence[float] | np.ndarray | None = None,
                geometry: SliceGeometry | None = None) -> dict[str, np.ndarray]:
    """CAMs of the given slices for every method, each (n, h, w) float32 in [0, 1], on the
    network's input canvas: ``geometry.cam_index(h, w)`` maps them to the study's voxels
    (``wsseg_core.segment``'s ``cam_index``). ``spacing_mm`` / ``geometry`` as for
    :func:`classify_volume`."""
    z_indices = np.asarray(z_indices, dtype=int)
    geometry = _geometry(pre, suv, ct, spacing_mm, geometry) if len(z_indices) else geometry
    device = model_device(engine.model)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for start in range(0, len(z_indices), batch_size):
        x = volume_to_batch(suv, ct, z_indices[start:start + batch_size], pre,
                            geometry=geometry).to(device)
        res = engine(x, methods=methods)
        for m in methods:
            parts[m].append(res.maps[m])
    if len(z_indices) == 0:
        h = pre.input_size // getattr(engine.model, "map_stride", 8)
        return {m: np.zeros((0, h, h), dtype=np.float32) for m in methods}
    return {m: np.concatenate(parts[m], axis=0) for m in methods}
