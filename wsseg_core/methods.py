"""The eight methods the pipeline scores, by name: which are slice CAMs, which is the threshold
baseline, and which segment with a network of their own (and how that network is loaded).

Importing this module is cheap (no torch): the Ray driver builds its argument parser and checks a
run's models from it; a network's module is imported only when its loader is called, on the actor
that scores.

    CAM methods (Früh et al., Algorithm 1 on the slice classifier's maps)  CAM_METHODS
    the global-threshold baseline                                         THRESHOLD
    network methods (a checkpoint under <out>/models/)                    MODEL_METHODS
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["CAM_METHODS", "THRESHOLD", "DEFAULT_METHODS", "ModelMethod", "MODEL_METHODS", "ALL_METHODS"]

#: The slice-CAM methods (wsseg_core.cams computes them; its CAM_METHODS is this tuple).
CAM_METHODS: tuple[str, ...] = ("CAM", "GradCAM", "GradCAM++", "ScoreCAM")
#: The global-threshold baseline (wsseg_core.segment.threshold_volume).
THRESHOLD = "Threshold"
#: What the scorer scores unless told otherwise: they need only the slice classifier.
DEFAULT_METHODS: tuple[str, ...] = CAM_METHODS + (THRESHOLD,)

#: `load(checkpoint path, params, device=, batch_size=) -> (study -> uint8 mask on the SUV grid)`.
Loader = Callable[..., Callable[[Any], np.ndarray]]


def _unet_loader(path: str | os.PathLike, params: Mapping[str, Any], *, device: str,
                 batch_size: int) -> Callable[[Any], np.ndarray]:
    from wsseg_core.unet import load_segmenter

    return load_segmenter(path, params, device=device, batch_size=batch_size)


def _mipcam_loader(path: str | os.PathLike, params: Mapping[str, Any], *, device: str,
                   batch_size: int) -> Callable[[Any], np.ndarray]:
    from wsseg_core.mipcam import load_segmenter

    return load_segmenter(path, params, device=device, batch_size=batch_size)


def _boxfcn_loader(path: str | os.PathLike, params: Mapping[str, Any], *, device: str,
                   batch_size: int) -> Callable[[Any], np.ndarray]:
    from wsseg_core.boxfcn import load_segmenter

    return load_segmenter(path, params, device=device, batch_size=batch_size)


@dataclass(frozen=True)
class ModelMethod:
    """A method that segments a study with its own trained network rather than the slice CAMs.

    `loader` is called once per scoring actor as `loader(checkpoint_path, params, device=...,
    batch_size=...)` and returns a callable `Study -> uint8 mask` on the SUV grid. `params` is the
    method's entry of thresholds.json (`{}` when it has none). Scored whenever
    `<out>/models/<checkpoint>` exists; `needs_thresholds`: it cannot be scored without its entry.
    """

    checkpoint: str
    loader: Loader
    needs_thresholds: bool = False

    def load(self, path: str | os.PathLike, params: Mapping[str, Any], *, device: str,
             batch_size: int) -> Callable[[Any], np.ndarray]:
        return self.loader(path, params, device=device, batch_size=batch_size)


# One entry per network-based method: adding a method means one line here and one loader.
MODEL_METHODS: dict[str, ModelMethod] = {
    # The supervised upper baseline (Früh et al. Sec. 2.3.2): no thresholds to tune.
    "UNet": ModelMethod("unet.pt", _unet_loader),
    # Amyar et al.'s MIP class response: t (CAM) and q (% of SUVmax) tuned by jobs.train_mipcam.
    "MIP-CAM": ModelMethod("mipcam.pt", _mipcam_loader, needs_thresholds=True),
    # Afshari et al.'s box-supervised 3-D FCN; thresholds.json may set threshold / postprocess.
    "BoxFCN": ModelMethod("boxfcn.pt", _boxfcn_loader),
}
#: Every method, in the order of the tables.
ALL_METHODS: tuple[str, ...] = DEFAULT_METHODS + tuple(MODEL_METHODS)
