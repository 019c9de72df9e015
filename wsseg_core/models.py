"""VGG16 slice classifier (Früh et al. 2021, Sec. 2.2) and its input preprocessing.

The network is torchvision's VGG16 convolutional stack with two changes from the paper: the first
max-pool is removed and the features are cut before the last max-pool, so the last conv map is 1/8 of
the input (32x32x512 at 256x256). PET (SUV) and CT are the two input channels. Two heads over that
last conv map A, both giving two classes (0 = no tumour, 1 = tumour):

* ``"gap"`` (default): global average pooling plus one linear layer, exactly the architecture classic
  CAM (Eq. 1, ``M = sum_k w_k A_k``) requires. Under it GradCAM's weights are ``w_k / (h w)``, so the
  GradCAM map is ReLU(CAM) up to normalisation (see ``wsseg_core.cams``).
* ``"fc"``: the head of the authors' public code (``VggGrad32`` in b4shy/weaklySupervisedSegmentation):
  VGG16's own classifier over the last conv map: 2x2 max-pool, adaptive average pool to 7x7, then
  Linear(49 K, 4096) - ReLU - Dropout - Linear(4096, 4096) - ReLU - Dropout - Linear(4096, 2)
  (4096 scaled by the width). The gradients then vary over the map, so GradCAM, GradCAM++ and
  ScoreCAM differ from each other as in the paper; classic CAM is undefined (no GAP + linear head).

A width multiplier scales every channel count, so the same code gives the paper network and a small
CPU preset.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from wsseg_core.checkpoint import load_checkpoint, save_checkpoint
from wsseg_core.geometry import (PREPROCESSING_MODES, SliceGeometry, body_centre, resample_geometry,
                                 resize_geometry)

LOG = logging.getLogger(__name__)

# torchvision's VGG16 ("D") config with the first and the last "M" removed (Früh et al.): three
# pools remain, hence a last map of input_size / 8.
VGG16_CFG: tuple[int | str, ...] = (64, 64, 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512)
#: Last-map strides a SliceClassifier can have: 8 (the paper's three pools) or 4 (the pool before
#: the last block also removed: a CAM twice as fine for ~1.3x the FLOPs, since only the last block,
#: ~10 % of VGG16's work at stride 8, runs at the finer grid).
MAP_STRIDES = (4, 8)
N_VGG16_CONVS = 13


def default_atrous(map_stride: int) -> bool:
    """Whether a network of this map stride dilates its last block when the caller does not say:
    at stride 4 yes (the plain pool removal measured worse; docs/EXPERIMENTS.md, "CAM resolution"), at 8 there
    is nothing to dilate."""
    return int(map_stride) == 4
#: Classifier heads: "gap" (GAP + one linear layer, CAM's architecture) and "fc" (VGG16's fully
#: connected classifier over the last conv map, as in the authors' public code).
HEADS = ("gap", "fc")
#: VGG16's adaptive pool output (torchvision ``avgpool``) and hidden width of its classifier.
FC_POOL = 7
FC_HIDDEN = 4096

PRESETS: dict[str, dict[str, Any]] = {
    # pixel_mm: slices resampled in-plane to 2 mm pixels and padded / cropped to 256x256 around the
    # body (Früh et al. 2.1: 2x2x3 mm, 256x256), not resized whatever their FOV (wsseg_core.geometry).
    "paper": dict(width=1.0, input_size=256, batch_norm=False, pixel_mm=2.0),
    # CPU preset: 1/8 of the channels and 64x64 slices, last conv map 16x16 with 64 channels. It has
    # no pretrained weights, and a 13-conv plain VGG trained from random init barely learns in the
    # few epochs a CPU demo affords; batch norm after each conv makes it train in minutes.
    # map_stride 4, atrous: 16x16 CAMs at 64x64 (issue 16 item 4: at 8x8 a CAM cell covered 16x16
    # voxels of a 128^2 slice), the last block dilated so its receptive field stays stride 8's.
    # Measured end to end (docs/EXPERIMENTS.md, "CAM resolution"): demo test AUC 0.966 -> 0.953, CAM test Dice
    # 0.35 -> 0.52, tuned t off the grid's edge; the plain pool removal lost AUC and localisation
    # on a 12-patient cohort, the dilated one did not.
    # No pixel_mm: slices are resized to 64x64 (the whole FOV in view; at 2 mm a 64-pixel canvas
    # would see 128 mm, and a canvas covering the FOV at 2 mm costs the CPU minutes the small
    # preset exists to save); build_slice_classifier(pixel_mm=...) opts in.
    "small": dict(width=0.125, input_size=64, batch_norm=True, map_stride=4),
}

CHECKPOINT_FORMAT = "wsseg.SliceClassifier"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------

@dataclass
class SlicePreprocessor:
    """Maps raw axial slices (SUV, CT in HU) to the classifier input ``(B, 2, S, S)`` float32.

    Both channels are scaled to [0, 1] with the *background* at 0: SUV 0 -> 0 and air
    (``ct_min`` = -1000 HU) -> 0. Augmentation pads rotated/translated slices with 0, which then
    means "no uptake, air" in both channels, the true content outside a patient, and so does the
    canvas padding of mode "resample_mm".

    Attributes:
        input_size: S, side of the square network input (the canvas) in pixels.
        suv_max: SUV clipped to [0, suv_max] (g/ml), then divided by suv_max.
        ct_min, ct_max: CT window in HU; clipped, then mapped linearly to [0, 1].
        mode: "resize" (each slice resized to S x S) or "resample_mm" (resampled in-plane to
            ``pixel_mm`` pixels with the study's spacing, bilinear, then padded / cropped to S x S
            around the body); see ``wsseg_core.geometry``. A checkpoint from before the field
            reads as "resize", which is what it did.
        pixel_mm: canvas pixel size in mm under "resample_mm"; None under "resize".
    """

    input_size: int
    suv_max: float = 20.0
    ct_min: float = -1000.0
    ct_max: float = 1000.0
    mode: str = "resize"
    pixel_mm: float | None = None

    def __post_init__(self) -> None:
        if int(self.input_size) != self.input_size or self.input_size < 8 or self.input_size % 8:
            raise ValueError(f"input_size must be a positive multiple of 8, got {self.input_size!r}")
        if self.mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {self.mode!r}")
        if self.mode == "resample_mm":
            if self.pixel_mm is None or not float(self.pixel_mm) > 0 or not np.isfinite(self.pixel_mm):
                raise ValueError(f"mode 'resample_mm' needs pixel_mm > 0, got {self.pixel_mm!r}")
            self.pixel_mm = float(self.pixel_mm)
        elif self.pixel_mm is not None:
            raise ValueError(f"pixel_mm ({self.pixel_mm!r}) is for mode 'resample_mm', not {self.mode!r}")
        if not self.suv_max > 0:
            raise ValueError(f"suv_max must be > 0, got {self.suv_max!r}")
        if not self.ct_max > self.ct_min:
            raise ValueError(f"ct_max ({self.ct_max}) must exceed ct_min ({self.ct_min})")
        self.input_size = int(self.input_size)

    def describe(self) -> str:
        """One line for logs and the README: what a slice goes through."""
        s = self.input_size
        if self.mode == "resize":
            return f"resize: every slice resized to {s}x{s}"
        return (f"resample_mm: {self.pixel_mm:g} mm pixels (bilinear), padded / cropped to {s}x{s} "
                f"({s * self.pixel_mm:g} mm) around the body")

    def geometry(self, suv: np.ndarray, ct: np.ndarray | None = None,
                 spacing_mm: Sequence[float] | np.ndarray | None = None) -> SliceGeometry:
        """Where the study's ``(X, Y, Z)`` slices lie on the input (one map for all its slices).

        ``spacing_mm`` (x, y[, z]) in mm is required under "resample_mm"; the canvas is centred on
        the body of the whole volume (``wsseg_core.geometry.body_centre``).
        """
        shape = np.shape(suv)
        if len(shape) != 3:
            raise ValueError(f"expected an (X, Y, Z) volume, got shape {shape}")
        if self.mode == "resize":
            return resize_geometry(shape[:2], self.input_size)
        if spacing_mm is None:
            raise ValueError(f"preprocessing {self.describe()!r} needs the study's voxel spacing "
                             "(spacing_mm)")
        return resample_geometry(shape[:2], spacing_mm, self.pixel_mm, self.input_size,
                                 centre=body_centre(suv, ct))

    def _resample(self, x: torch.Tensor, geo: SliceGeometry) -> torch.Tensor:
        """(B, 2, X, Y) -> (B, 2, S, S) by ``geo``: bilinear to ``pixel_mm`` pixels (antialiased on
        an axis that shrinks, as ``_resize``), then the canvas window, zeros where no FOV."""
        if tuple(x.shape[-2:]) != geo.native_shape:
            raise ValueError(f"slices of shape {tuple(x.shape[-2:])} do not match the geometry's "
                             f"{geo.native_shape}")
        if geo.scale != (1.0, 1.0):
            x = F.interpolate(x, scale_factor=geo.scale, mode="bilinear", align_corners=False,
                              antialias=min(geo.scale) < 1.0, recompute_scale_factor=False)
        if tuple(x.shape[-2:]) != geo.resampled_shape:  # geometry.py predicts torch's floor
            raise RuntimeError(f"resampled to {tuple(x.shape[-2:])}, expected {geo.resampled_shape}")
        s = geo.size
        out = x.new_zeros(x.shape[:2] + (s, s))
        (kx, ky), (nx, ny) = geo.offset, geo.resampled_shape
        ux0, ux1 = max(0, -kx), min(s, nx - kx)
        uy0, uy1 = max(0, -ky), min(s, ny - ky)
        if ux1 > ux0 and uy1 > uy0:
            out[:, :, ux0:ux1, uy0:uy1] = x[:, :, ux0 + kx:ux1 + kx, uy0 + ky:uy1 + ky]
        return out

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, X, Y) -> (B, 2, S, S); antialiased when shrinking so small hot lesions are averaged
        into the output pixel rather than aliased away or kept by chance."""
        s = self.input_size
        if tuple(x.shape[-2:]) == (s, s):
            return x
        shrinking = x.shape[-2] > s or x.shape[-1] > s
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                             antialias=shrinking)

    def __call__(self, suv_slices: np.ndarray | torch.Tensor,
                 ct_slices: np.ndarray | torch.Tensor,
                 geometry: SliceGeometry | None = None) -> torch.Tensor:
        """Preprocess a batch of axial slices.

        Args:
            suv_slices: (B, X, Y) SUV (g/ml), or (X, Y) for a single slice.
            ct_slices: (B, X, Y) CT in HU on the same grid.
            geometry: the study's :meth:`geometry`; required under "resample_mm" (the spacing and
                body centre are the study's, not the slices'), ignored under "resize".
        Returns:
            float32 tensor (B, 2, S, S) in [0, 1]; channel 0 PET, channel 1 CT; on the input's
            device when tensors are given, else on CPU.
        """
        suv = torch.as_tensor(np.asarray(suv_slices) if not torch.is_tensor(suv_slices) else suv_slices)
        ct = torch.as_tensor(np.asarray(ct_slices) if not torch.is_tensor(ct_slices) else ct_slices)
        if suv.ndim == 2:
            suv, ct = suv[None], ct[None]
        if suv.ndim != 3 or suv.shape != ct.shape:
            raise ValueError(f"expected SUV and CT slices of equal shape (B, X, Y), got "
                             f"{tuple(suv.shape)} and {tuple(ct.shape)}")
        suv = suv.to(torch.float32)
        ct = ct.to(device=suv.device, dtype=torch.float32)
        # nan_to_num: a NaN voxel would otherwise spread through the resize and the whole network.
        p = torch.nan_to_num(suv, nan=0.0).clamp(0.0, self.suv_max) / self.suv_max
        c = (torch.nan_to_num(ct, nan=self.ct_min).clamp(self.ct_min, self.ct_max) - self.ct_min) \
            / (self.ct_max - self.ct_min)
        # Clip before resizing so an extreme voxel cannot bleed into its neighbours; the bilinear
        # (triangle) filter has non-negative weights, so the output stays in [0, 1].
        x = torch.stack([p, c], dim=1)
        if self.mode == "resize":
            x = self._resize(x)
        else:
            if geometry is None or geometry.mode != "resample_mm":
                raise ValueError(f"preprocessing {self.describe()!r} needs the study's geometry "
                                 "(SlicePreprocessor.geometry(suv, ct, spacing_mm))")
            x = self._resample(x, geometry)
        return x.contiguous()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able and weights_only-safe dict (saved inside the model checkpoint): the numbers,
        and ``mode`` / ``pixel_mm`` (None under "resize") so scoring resamples as training did."""
        d = dataclasses.asdict(self)
        return {"input_size": int(d["input_size"]), "suv_max": float(d["suv_max"]),
                "ct_min": float(d["ct_min"]), "ct_max": float(d["ct_max"]), "mode": str(d["mode"]),
                "pixel_mm": None if d["pixel_mm"] is None else float(d["pixel_mm"])}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SlicePreprocessor":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SlicePreprocessor fields: {sorted(unknown)}")
        # A record without "mode" predates it: those checkpoints resized (the dataclass default).
        return cls(**dict(d))


def volume_to_batch(suv: np.ndarray, ct: np.ndarray, z_indices: Sequence[int] | np.ndarray,
                    pre: SlicePreprocessor, spacing_mm: Sequence[float] | np.ndarray | None = None,
                    geometry: SliceGeometry | None = None) -> torch.Tensor:
    """Axial slices ``vol[:, :, z]`` of an (X, Y, Z) SUV / CT pair as a classifier batch.

    ``geometry``: the study's ``pre.geometry(suv, ct, spacing_mm)`` (pass it when calling batch by
    batch: it scans the volume for the body); None: computed here from ``spacing_mm``, which
    "resample_mm" then needs.

    Returns:
        float32 tensor (len(z_indices), 2, S, S) on CPU.
    """
    if suv.shape != ct.shape or len(suv.shape) != 3:
        raise ValueError(f"expected SUV and CT volumes of equal shape (X, Y, Z), got "
                         f"{suv.shape} and {ct.shape}")
    z = np.asarray(z_indices, dtype=np.int64).reshape(-1)
    s = pre.input_size
    if z.size == 0:
        return torch.zeros((0, 2, s, s), dtype=torch.float32)
    # (X, Y, n) -> (n, X, Y); fancy indexing copies only the requested slices.
    if geometry is None and pre.mode != "resize":
        geometry = pre.geometry(suv, ct, spacing_mm)
    suv_s = np.moveaxis(np.asarray(suv)[:, :, z], -1, 0)
    ct_s = np.moveaxis(np.asarray(ct)[:, :, z], -1, 0)
    return pre(np.ascontiguousarray(suv_s), np.ascontiguousarray(ct_s), geometry)


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------

def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class SliceClassifier(nn.Module):
    """Modified VGG16 (no BN) with a GAP + linear head (or VGG16's fc head); class 1 = tumour.

    Args:
        width: channel multiplier (1.0 = VGG16).
        input_size: nominal input side S (the network is fully convolutional; S only documents the
            expected input and the CAM size S/8).
        in_channels: 2 (PET, CT).
        batch_norm: BatchNorm after every conv (as torchvision's vgg16_bn); off for the paper's VGG16.
        map_stride: 8 (the paper's: last map S/8) or 4 (the pool before the last block removed too:
            last map S/4). ImageNet weights fit either (the pools have no weights).
        atrous: with map_stride 4, the convs after the removed pool are dilated by 2 (as DeepLab
            keeps its receptive field at a finer output stride), so every conv sees the context,
            in input pixels, it sees at stride 8. Without it the last block's receptive field is
            halved; measured, that cost test AUC and CAM Dice on a 12-patient cohort (docs/EXPERIMENTS.md,
            "CAM resolution"). Must be False at stride 8.
        head: "gap" (default; GAP + ``fc``) or "fc" (VGG16's classifier; see the module doc).
    Attributes:
        features: nn.Sequential of conv/ReLU/max-pool; its output is the last conv's ReLU,
            (B, K, S/map_stride, S/map_stride).
        fc: nn.Linear(K, 2) under the "gap" head; None under "fc".
        classifier: None under "gap"; under "fc" nn.Sequential(Linear(49 K, H), ReLU, Dropout,
            Linear(H, H), ReLU, Dropout, Linear(H, 2)), H = 4096 x width.
        width, input_size, num_channels_last (K), head.
    """

    def __init__(self, width: float = 1.0, input_size: int = 256, in_channels: int = 2,
                 batch_norm: bool = False, map_stride: int = 8, head: str = "gap",
                 atrous: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if map_stride not in MAP_STRIDES:
            raise ValueError(f"map_stride must be one of {MAP_STRIDES}, got {map_stride!r}")
        if atrous and map_stride != 4:
            raise ValueError(f"atrous needs map_stride 4 (it dilates the convs after the pool "
                             f"stride 4 removes), got map_stride {map_stride!r}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        if int(input_size) != input_size or input_size < 8 or input_size % 8:
            raise ValueError(f"input_size must be a positive multiple of 8, got {input_size!r}")
        self.width = float(width)
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)
        self.batch_norm = bool(batch_norm)
        self.map_stride = int(map_stride)
        self.head = str(head)
        self.atrous = bool(atrous)
        cfg = list(VGG16_CFG)
        dilate_from = len(cfg)  # index in cfg from which convs are dilated (none by default)
        if self.map_stride == 4:  # drop the last pool (before the last block)
            dilate_from = len(cfg) - 1 - cfg[::-1].index("M")
            del cfg[dilate_from]
            if not self.atrous:
                dilate_from = len(cfg)
        layers: list[nn.Module] = []
        c_in = self.in_channels
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                c_out = _scaled(int(v), self.width)
                d = 2 if i >= dilate_from else 1
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=d, dilation=d))
                if self.batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                # Not in-place: CAM code hooks these outputs and their gradients, which in-place
                # ops would invalidate.
                layers.append(nn.ReLU(inplace=False))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_channels_last = c_in
        self.fc: nn.Linear | None = None
        self.classifier: nn.Sequential | None = None
        if self.head == "gap":
            self.fc = nn.Linear(self.num_channels_last, 2)
        else:
            hidden = _scaled(FC_HIDDEN, self.width)
            self.classifier = nn.Sequential(
                nn.Linear(self.num_channels_last * FC_POOL * FC_POOL, hidden), nn.ReLU(inplace=False),
                nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=False), nn.Dropout(0.5),
                nn.Linear(hidden, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as torchvision VGG: kaiming (fan_out) convs, N(0, 0.01) linear, zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def conv_layers(self) -> list[nn.Conv2d]:
        """The 13 conv layers in order."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 2, S, S) -> A (B, K, S/map_stride, S/map_stride), the last conv's ReLU output."""
        return self.features(x)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        """A (B, K, h, w) -> logits (B, 2): global average pooling and ``fc`` ("gap" head), or
        VGG16's 2x2 max-pool, 7x7 adaptive average pool and ``classifier`` ("fc" head)."""
        if self.classifier is None:
            return self.fc(a.mean(dim=(2, 3)))
        # The authors' VggGrad32 takes A before VGG's last max-pool and applies that pool in the head.
        pooled = F.adaptive_avg_pool2d(F.max_pool2d(a, 2, 2), FC_POOL)
        return self.classifier(torch.flatten(pooled, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 2, S, S) -> logits (B, 2); softmax(.)[:, 1] is the tumour probability."""
        return self.logits_from_features(self.forward_features(x))

    def extra_repr(self) -> str:
        return (f"width={self.width}, input_size={self.input_size}, K={self.num_channels_last}, "
                f"batch_norm={self.batch_norm}, map_stride={self.map_stride}, atrous={self.atrous}, "
                f"head={self.head}")


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm2d that directly follows a Conv2d in an
    ``nn.Sequential`` folded into that convolution; the original is left untouched.

    In eval mode batch norm is a per-channel affine map of the conv's output, so conv-then-BN is one
    conv with scaled weights and a shifted bias: the same function up to float rounding, minus one
    full pass over every activation map, which costs much next to the small preset's narrow convs
    (ScoreCAM measured 1.1-1.35x faster folded). The paper network has no BN and is returned as a
    copy. The folded BN is replaced by ``nn.Identity`` so module indices (``features[-1]``) still
    name the same layers.

    Args:
        model: any module (eval or train mode; the copy uses the running statistics).

    Returns:
        The folded copy, in eval mode, on the same device and dtype.
    """
    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.running_mean is not None and bn.running_var is not None):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
    return folded


# --------------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------------

def _fetch_imagenet_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's own download/cache mechanism (``$TORCH_HOME/hub/checkpoints``)."""
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)


def _vgg_conv_weights(state: Mapping[str, Any], source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 13 (weight, bias) pairs of a torchvision vgg16 state dict, in layer order.

    torchvision numbers ``features.N`` by module index, pools included; our first pool is gone, so
    indices differ. Taking the 4-D ``features.N.weight`` tensors sorted by N maps conv to conv.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: not a state dict (got {type(state).__name__})")
    convs: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for key, w in state.items():
        parts = str(key).split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[2] == "weight" and parts[1].isdigit():
            if not torch.is_tensor(w) or w.ndim != 4:
                continue
            b = state.get(f"features.{parts[1]}.bias")
            if not torch.is_tensor(b):
                raise ValueError(f"{source}: features.{parts[1]}.bias missing")
            convs.append((int(parts[1]), w, b))
    convs.sort(key=lambda t: t[0])
    if len(convs) != N_VGG16_CONVS:
        raise ValueError(f"{source}: not a torchvision VGG16 state dict (found {len(convs)} "
                         f"'features.N.weight' conv tensors, expected {N_VGG16_CONVS})")
    return [(w, b) for _, w, b in convs]


def load_vgg16_weights(model: SliceClassifier, state: Mapping[str, Any], source: str = "state dict") -> None:
    """Copy torchvision VGG16 conv weights into ``model`` (width 1.0 only); ``fc`` stays random.
    Under the "fc" head the first two classifier layers (``classifier.0``, ``classifier.3``) are
    copied too, as the authors' code kept them; the last (1000 ImageNet classes) stays random.

    The RGB first conv (64, 3, 3, 3) becomes (64, 2, 3, 3) with both PET and CT channels set to
    the mean over RGB. Why the mean: PET and CT are single-intensity images, like a grey image
    (R = G = B); the RGB mean keeps every pretrained filter's spatial pattern and keeps the
    per-channel weight scale that ImageNet training settled on (a sum would triple it), with no
    arbitrary preference for one colour channel.
    """
    pairs = _vgg_conv_weights(state, source)
    convs = model.conv_layers()
    with torch.no_grad():
        for i, (conv, (w, b)) in enumerate(zip(convs, pairs)):
            w = w.detach().to(torch.float32)
            if i == 0 and w.shape[1] != conv.in_channels:
                w = w.mean(dim=1, keepdim=True).expand(-1, conv.in_channels, -1, -1)
            if tuple(w.shape) != tuple(conv.weight.shape) or tuple(b.shape) != tuple(conv.bias.shape):
                raise ValueError(f"{source}: conv {i} has shape {tuple(w.shape)}, model expects "
                                 f"{tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            conv.bias.copy_(b.to(torch.float32))
        if model.classifier is not None:
            for ours, theirs in ((model.classifier[0], "classifier.0"), (model.classifier[3], "classifier.3")):
                w, b = state.get(f"{theirs}.weight"), state.get(f"{theirs}.bias")
                if not (torch.is_tensor(w) and torch.is_tensor(b)):
                    raise ValueError(f"{source}: {theirs}.weight/.bias missing (needed by the fc head)")
                if tuple(w.shape) != tuple(ours.weight.shape):
                    raise ValueError(f"{source}: {theirs} has shape {tuple(w.shape)}, the fc head "
                                     f"expects {tuple(ours.weight.shape)}")
                ours.weight.copy_(w.detach().to(torch.float32))
                ours.bias.copy_(b.detach().to(torch.float32))


def _load_state_file(path: Path) -> Mapping[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a state dict"
        raise ValueError(f"{path}: cannot be read as a torch state dict "
                         f"({type(e).__name__}: {_one_line(e)})") from e
    # Tolerate the common {"state_dict": {...}} wrapper.
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return obj


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


IMAGENET_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet VGG16 weights were asked for and cannot be had; the message says how to supply them."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            f"ImageNet VGG16 weights could not be fetched ({cause}). Früh et al. start from ImageNet "
            f"weights, so wsseg does not silently start from random ones. Either supply them as a "
            f"local file: download {IMAGENET_VGG16_FILE} (torchvision's VGG16_Weights.IMAGENET1K_V1, "
            f"https://download.pytorch.org/models/{IMAGENET_VGG16_FILE}) on a machine that can, then "
            f"pass --weights /path/to/{IMAGENET_VGG16_FILE} (or copy it into "
            f"$TORCH_HOME/hub/checkpoints/ on every node); or pass --weights random to train from "
            f"random initialisation on purpose.")


def require_imagenet_weights() -> None:
    """Fetch (or find in torchvision's cache) the ImageNet VGG16 weights now, so a job fails before
    it starts workers rather than in each of them. Raises PretrainedWeightsUnavailable."""
    try:
        _fetch_imagenet_vgg16_state_dict()
    except Exception as e:  # noqa: BLE001 - offline, proxy, corrupt cache, hash mismatch
        raise PretrainedWeightsUnavailable(f"{type(e).__name__}: {_one_line(e)}") from e


def build_slice_classifier(preset: str = "paper", width: float | None = None,
                           input_size: int | None = None,
                           weights: str | os.PathLike | None = None, head: str = "gap",
                           pixel_mm: float | None = None, map_stride: int | None = None,
                           atrous: bool | None = None,
                           ) -> tuple[SliceClassifier, SlicePreprocessor]:
    """Build the classifier and its matching preprocessor.

    Args:
        preset: a key of ``PRESETS`` ("paper": width 1, 256x256; "small": width 1/8, 64x64).
        width, input_size: override the preset's values.
        pixel_mm: in-plane pixel size in mm: the preprocessor resamples to it and pads / crops to
            input_size (mode "resample_mm"); None: the preset's (paper 2.0, small: resize);
            0: resize whatever the preset.
        head: "gap" (GAP + linear, CAM's architecture; default) or "fc" (VGG16's classifier, as in
            the authors' code; CAM undefined).
        map_stride: 8 (last map = input/8, the paper's) or 4 (CAMs twice as fine per side);
            None: the preset's.
        atrous: dilate the convs after the removed pool (``SliceClassifier``); None: True at
            stride 4 (the variant measured better), False at 8.
        weights: None (random init); "imagenet" (torchvision VGG16 IMAGENET1K_V1 via torchvision's
            download or cache); or a path to a torchvision vgg16 state dict file. Pretrained
            weights need width 1.0.
    Returns:
        (model in train mode on CPU, its SlicePreprocessor).
    Raises:
        ValueError: unknown preset, pixel_mm < 0, pretrained weights at width != 1, or a weights file that is
            missing or not a VGG16 state dict.
        PretrainedWeightsUnavailable: "imagenet" asked for and not available (offline); its
            message says how to supply a local file or choose random initialisation.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if width is not None:
        cfg["width"] = float(width)
    if input_size is not None:
        cfg["input_size"] = int(input_size)
    if map_stride is not None:
        cfg["map_stride"] = int(map_stride)
    stride = int(cfg.get("map_stride", 8))
    model = SliceClassifier(width=cfg["width"], input_size=cfg["input_size"],
                            batch_norm=cfg.get("batch_norm", False), map_stride=stride,
                            head=head, atrous=default_atrous(stride) if atrous is None else bool(atrous))
    mm = cfg.get("pixel_mm") if pixel_mm is None else float(pixel_mm)
    if mm is not None and mm < 0:
        raise ValueError(f"pixel_mm must be >= 0 (0: resize), got {pixel_mm!r}")
    pre = (SlicePreprocessor(input_size=cfg["input_size"]) if not mm else
           SlicePreprocessor(input_size=cfg["input_size"], mode="resample_mm", pixel_mm=mm))
    if weights is None:
        return model, pre
    if model.width != 1.0:
        raise ValueError(f"pretrained weights ({weights!s}) only fit width 1.0, but width is "
                         f"{model.width} (preset {preset!r}); use weights=None for a scaled network")
    if model.batch_norm:
        raise ValueError(f"pretrained VGG16 weights ({weights!s}) have no batch norm; preset "
                         f"{preset!r} uses batch norm: use weights=None")
    if isinstance(weights, str) and weights.lower() == "imagenet":
        try:
            state = _fetch_imagenet_vgg16_state_dict()
        except Exception as e:  # offline, proxy, corrupt cache, hash mismatch
            # Never a silent random start: the paper's numbers assume ImageNet features.
            raise PretrainedWeightsUnavailable(f"{type(e).__name__}: {_one_line(e)}") from e
        load_vgg16_weights(model, state, source="torchvision VGG16_Weights.IMAGENET1K_V1")
        LOG.info("loaded ImageNet VGG16 weights into the slice classifier")
        return model, pre
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found (weights must be None, 'imagenet' or a "
                         f"torchvision vgg16 state dict file)")
    load_vgg16_weights(model, _load_state_file(path), source=str(path))
    LOG.info("loaded VGG16 weights from %s", path)
    return model, pre


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def save_classifier(path: str | os.PathLike, model: nn.Module, pre: SlicePreprocessor,
                    meta: Mapping[str, Any] | None = None) -> None:
    """Write one torch file {format, version, state_dict, config, preprocessor, meta}, atomically.

    ``model`` may be wrapped (DDP's ``.module``); the bare module's weights are saved, on CPU.
    ``meta`` must be JSON-able (it is round-tripped through JSON so the file stays loadable with
    ``weights_only=True``).
    """
    bare = getattr(model, "module", model)
    if not isinstance(bare, SliceClassifier):
        raise TypeError(f"expected a SliceClassifier, got {type(bare).__name__}")
    save_checkpoint(path, bare, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                    config={"width": float(bare.width), "input_size": int(bare.input_size),
                            "in_channels": int(bare.in_channels), "batch_norm": bool(bare.batch_norm),
                            "map_stride": int(bare.map_stride), "atrous": bool(bare.atrous),
                            "head": bare.head},
                    meta=meta, preprocessor=pre.to_dict())


def load_classifier(path: str | os.PathLike) -> tuple[SliceClassifier, SlicePreprocessor, dict]:
    """Load a ``save_classifier`` file -> (model in eval mode on CPU, preprocessor, meta dict)."""
    model, ckpt = load_checkpoint(
        path, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, what="classifier",
        build=lambda cfg: SliceClassifier(width=float(cfg["width"]), input_size=int(cfg["input_size"]),
                                          in_channels=int(cfg.get("in_channels", 2)),
                                          batch_norm=bool(cfg.get("batch_norm", False)),
                                          # checkpoints written before the option: the paper's 8
                                          map_stride=int(cfg.get("map_stride", 8)),
                                          # written before the option: plain pool removal
                                          atrous=bool(cfg.get("atrous", False)),
                                          head=str(cfg.get("head", "gap"))))
    return model, SlicePreprocessor.from_dict(ckpt["preprocessor"]), dict(ckpt.get("meta") or {})
