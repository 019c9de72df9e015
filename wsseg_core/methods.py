"""The eight methods the pipeline scores: one registry, `METHODS`, of direct callables.

Each entry is a `Method`: `segment(study, context) -> uint8 mask (X, Y, Z)` on the study's SUV grid,
plus the fields its rows carry (`row_fields`). What a method needs besides the study comes in one
`StudyContext`, computed once per study and shared by every method: the slices the classifier
flagged, their CAMs and the study's geometry, the thresholds.json entries and the loaded networks.

Importing this module is cheap (no torch): the Ray driver builds its argument parser and checks a
run's models from it; a network's module is imported only when its loader is called, on the actor
that scores, and the segmentation module only when a method segments.

    CAM methods (Früh et al., Algorithm 1 on the slice classifier's maps)  CAM_METHODS
    the global-threshold baseline                                         THRESHOLD
    network methods (a checkpoint under <out>/models/)                    MODEL_METHODS
    all eight, in the order of the tables                                 METHODS, ALL_METHODS
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["CAM_METHODS", "THRESHOLD", "DEFAULT_METHODS", "ModelMethod", "MODEL_METHODS", "ALL_METHODS",
           "StudyContext", "Method", "METHODS", "segment_study"]

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


@dataclass(frozen=True)
class StudyContext:
    """What the methods need for one study besides the study itself (computed once, shared).

    Attributes:
        flagged_z: ``(n,)`` int, the axial slices the slice methods segment (the CAM methods and
            Threshold): those the classifier flags, ``p(tumour) >= flag threshold`` (Algorithm 1,
            step 1, ``wsseg_core.inference.flagged_slices``); every other slice stays empty.
        thresholds: method -> its thresholds.json entry (``wsseg_core.thresholds.load_thresholds``):
            ``t`` on the [0, 1] CAM, ``q`` in percent, Threshold's ``reference``, a network's own.
        cams: CAM method -> ``(n, h, w)`` float32 CAMs in [0, 1] of the ``flagged_z`` slices, on the
            classifier's input canvas (``wsseg_core.inference.volume_cams``). Only the CAM methods
            read it.
        geometry: the study's ``wsseg_core.geometry.SliceGeometry`` (``pre.geometry(suv, ct,
            spacing_mm)``): which voxels each CAM cell covers. Only the CAM methods read it.
        segmenters: network method -> its loaded segmenter (``ModelMethod.load``), ``Study -> uint8
            mask``. Only the network methods read it.
    """

    flagged_z: np.ndarray
    thresholds: Mapping[str, Mapping[str, Any]]
    cams: Mapping[str, np.ndarray] = field(default_factory=dict)
    geometry: Any = None
    segmenters: Mapping[str, Callable[[Any], np.ndarray]] = field(default_factory=dict)


#: `segment(study, context) -> uint8 (X, Y, Z) mask in {0, 1}` on the study's SUV grid.
Segment = Callable[[Any, StudyContext], np.ndarray]


def _cam_method(name: str) -> Segment:
    """Algorithm 1 with CAM method `name`'s maps and its (t_m, q_m) (``segment.segment_volume``)."""

    def segment(study: Any, ctx: StudyContext) -> np.ndarray:
        from wsseg_core.segment import segment_volume

        th = ctx.thresholds[name]
        cams = ctx.cams[name]
        # grow / q_rule: the Algorithm-1 variant tuning chose (absent in older thresholds.json:
        # the paper's).
        return segment_volume(study.suv, ctx.flagged_z, cams, th["t"], th["q"],
                              cam_index=ctx.geometry.cam_index(*cams.shape[1:]),
                              grow=th.get("grow", "none"), q_rule=th.get("q_rule", "percentile"))

    segment.__qualname__ = segment.__name__ = f"segment_{name}"
    return segment


def _threshold_method(study: Any, ctx: StudyContext) -> np.ndarray:
    """The global-threshold baseline on the flagged slices (``segment.threshold_volume``): q % of
    the entry's reference, the tuned reference, or `THRESHOLD_REFERENCE` for an entry naming none."""
    from wsseg_core.segment import threshold_volume
    from wsseg_core.thresholds import THRESHOLD_REFERENCE

    th = ctx.thresholds[THRESHOLD]
    return threshold_volume(study.suv, ctx.flagged_z, th["q"],
                            reference=th.get("reference", THRESHOLD_REFERENCE), ct=study.ct)


def _network_method(name: str) -> Segment:
    """The method's own network, loaded once per scorer (`ModelMethod.load`), on the whole study."""

    def segment(study: Any, ctx: StudyContext) -> np.ndarray:
        return ctx.segmenters[name](study)

    segment.__qualname__ = segment.__name__ = f"segment_{name}"
    return segment


@dataclass(frozen=True)
class Method:
    """One method: how it segments a study and what its rows record.

    `segment(study, context)`: its uint8 mask. `model`: the network it loads (None for the CAM
    methods and Threshold, which need only the slice classifier's outputs in the context).
    """

    name: str
    segment: Segment
    model: ModelMethod | None = None

    @property
    def is_cam(self) -> bool:
        """A slice-CAM method: the context must hold its CAMs of the flagged slices."""
        return self.name in CAM_METHODS

    @staticmethod
    def row_fields(params: Mapping[str, Any]) -> dict[str, Any]:
        """The Parquet row's method parameters from its thresholds.json entry: ``t_m`` (CAM
        threshold) and ``q_m`` (percent), None where the method has none (Threshold has no t; the
        U-Net and BoxFCN neither; MIP-CAM's are its own t and q)."""
        return {"t_m": params.get("t"), "q_m": params.get("q")}


#: All eight methods by name, in the order of the tables (`ALL_METHODS`).
METHODS: dict[str, Method] = {
    **{m: Method(m, _cam_method(m)) for m in CAM_METHODS},
    THRESHOLD: Method(THRESHOLD, _threshold_method),
    **{m: Method(m, _network_method(m), mm) for m, mm in MODEL_METHODS.items()},
}


def segment_study(study: Any, ctx: StudyContext, methods: Sequence[str]) -> dict[str, np.ndarray]:
    """``{method: uint8 mask}`` of `study` for each of `methods`, in their order."""
    return {m: METHODS[m].segment(study, ctx) for m in methods}
