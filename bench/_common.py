"""Shared helpers of the benchmarks: a small-preset classifier and a batch of flagged phantom slices."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsseg_core.inference import classify_volume, flagged_slices
from wsseg_core.models import (build_slice_classifier, load_classifier, save_classifier,
                               volume_to_batch)
from wsseg_core.phantom import make_phantom_study

SHAPE = (64, 64, 40)


def load_info() -> str:
    """The machine's load, to print next to every timing (these are shared, noisy machines)."""
    la = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def get_classifier(path: str | None, epochs: int = 2, n_studies: int = 4, seed: int = 0):
    """Load ``path`` if given, else train the small preset ``epochs`` epochs on phantom studies
    (trained weights give realistic activation statistics, e.g. how many channels are dead)."""
    if path:
        model, pre, _ = load_classifier(path)
        return model.eval(), pre
    from wsseg_core.train import fit_classifier, slices_from_studies

    torch.manual_seed(seed)
    model, pre = build_slice_classifier("small")
    studies = [make_phantom_study(seed + i, shape=SHAPE) for i in range(n_studies)]
    x, y = slices_from_studies(studies, pre)
    t0 = time.perf_counter()
    fit_classifier(model, (x, y), (x[:64], y[:64]), epochs=epochs, batch_size=32, seed=seed)
    print(f"trained small classifier {epochs} epochs on {len(y)} phantom slices "
          f"in {time.perf_counter() - t0:.1f} s")
    return model.eval(), pre


def save_model(model, pre, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(path, model, pre)
    return path


def flagged_batch(model, pre, n: int = 32, seed: int = 100) -> torch.Tensor:
    """``n`` slices the classifier flags (p >= 0.5) from phantom studies; the most probable slices
    fill up the batch if too few are flagged (an untrained model flags few or none)."""
    chosen, spare = [], []
    s = seed
    while len(chosen) < n and s < seed + 200:
        st = make_phantom_study(s, shape=SHAPE)
        geo = pre.geometry(st.suv, st.ct, st.spacing_mm)  # the classifier's preprocessing
        probs = classify_volume(model, pre, st.suv, st.ct, geometry=geo)
        z = flagged_slices(probs)
        chosen.append(volume_to_batch(st.suv, st.ct, z, pre, geometry=geo))
        rest = np.setdiff1d(np.arange(len(probs)), z)
        spare.append((probs[rest], volume_to_batch(st.suv, st.ct, rest, pre, geometry=geo)))
        s += 1
        if sum(len(c) for c in chosen) >= n or (s - seed >= 12 and spare):
            break
    x = torch.cat(chosen)
    if len(x) < n:  # top up with the most probable unflagged slices
        p = np.concatenate([sp[0] for sp in spare])
        xs = torch.cat([sp[1] for sp in spare])
        x = torch.cat([x, xs[torch.as_tensor(np.argsort(-p)[: n - len(x)].copy())]])
    return x[:n].contiguous()


def default_device() -> str:
    """Where the CAM benchmarks run: the GPU if there is one (the paper-preset figures), else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of ``fn()``; CUDA work is waited for, so queued kernels are not left out."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def median(v: list[float]) -> float:
    return float(statistics.median(v))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
