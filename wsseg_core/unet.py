"""Supervised 2-D U-Net baseline (Früh et al. 2021, Sec. 2.3.2-2.3.3): network, training, inference.

Architecture (Ronneberger et al.'s U-Net, as the paper describes it: "four double convolution layers
in both the encoder and decoder with skip connections between all levels"):

* encoder: 4 levels, each a double conv (conv3x3 -> BN -> ReLU, twice) at ``base * 2**i`` channels
  (i = 0..3), followed by a 2x2 max-pool;
* bottleneck: a double conv at ``base * 16`` channels, at S/16;
* decoder: 4 levels, each a 2x2 transposed conv (halving channels, doubling resolution), the
  encoder feature map of the same level concatenated (skip connection), then a double conv;
* head: a 1x1 conv to 2 logits per pixel (class 1 = tumour).

The paper does not say whether the convs use batch norm. We use it: from random initialisation a
plain U-Net at lr 5e-5 needs many epochs to leave the "all background" solution, and BN makes the
width-reduced CPU preset train within minutes. Padding 1 keeps every map exactly S / 2**i, so the
output is (B, 2, S, S); S must be a multiple of 16.

Input is the classifier's: ``SlicePreprocessor`` maps (SUV, CT) axial slices to (B, 2, S, S) in
[0, 1] (channel 0 PET, channel 1 CT). Masks are brought to S x S with nearest-neighbour sampling
(pixel centres, ``nearest-exact``) for training. At inference the tumour *probability* map (S x S)
is upsampled bilinearly to the slice grid (X, Y) and thresholded at 0.5: smoother boundaries than
upsampling the argmax with nearest, and identical to the argmax wherever no interpolation happens.

Training defaults are the paper's: weighted cross-entropy (tumour weight 7.7, ``train.make_loss``;
``nn.CrossEntropyLoss`` takes (B, 2, H, W) logits and (B, H, W) targets), Adam (betas 0.9/0.999),
lr 5e-5, batch 64, 200 epochs, the classifier's augmentation (scale, rotation, translation, PET
contrast) with the same warp applied to the mask (``augment_pair``).

The CPU preset (``jobs.train_unet`` "small", issue 23) departs from the paper where CPU minutes
require it: slices at their own resolution (``native_input_size``) trained on 64x64 windows
(``crop_pair``), weighted CE plus a soft Dice term (``CEDiceLoss``), Adam lr 2e-3 with a cosine decay
and a fixed budget of optimizer steps.

Pure PyTorch; ``jobs/train_unet.py`` wraps the loop in Ray Train. This module never imports ray.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wsseg_core.checkpoint import load_checkpoint, save_checkpoint
from wsseg_core.models import SlicePreprocessor, volume_to_batch
from wsseg_core.train import (PET_GAMMA_RANGE, GlobalMeanCrossEntropy, augment_with_grid, make_loss,
                              sample_slices)

LOG = logging.getLogger(__name__)

N_LEVELS = 4  # encoder and decoder levels (each a double conv); the bottleneck is extra

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Früh et al.: 64 base channels (64..512 in the encoder, 1024 in the bottleneck), 256x256 slices.
    "paper": dict(base=64, input_size=256),
    # CPU preset: 8 base channels (8..64, bottleneck 128), 64x64 slices (~0.12 M parameters).
    "small": dict(base=8, input_size=64),
}

CHECKPOINT_FORMAT = "wsseg.UNet2D"
#: 2: a file may hold a ``UNetEnsemble`` (config ``{"members": [...]}``); a single network is
#: still written as version 1, so older code keeps reading those.
CHECKPOINT_VERSION = 2

# Paper training hyper-parameters (Sec. 2.3.3).
PAPER_LR = 5e-5
PAPER_BETAS = (0.9, 0.999)
PAPER_EPOCHS = 200
PAPER_BATCH_SIZE = 64

_CHUNK = 64  # slices preprocessed per chunk in masks_from_studies


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------

class DoubleConv(nn.Sequential):
    """(conv3x3, padding 1 -> BatchNorm -> ReLU) x 2; keeps the spatial size."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool = True) -> None:
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers.append(nn.Conv2d(c, c_out, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet2D(nn.Module):
    """2-D U-Net: 4 encoder levels, bottleneck, 4 decoder levels with skips; 2 logits per pixel.

    Args:
        base: channels of the first level (paper 64); level i has ``base * 2**i``, the bottleneck
            ``base * 16``.
        input_size: nominal S (documents the expected input; the network is fully convolutional and
            takes any H, W divisible by 16).
        in_channels: 2 (PET, CT). num_classes: 2 (0 background, 1 tumour).
        batch_norm: BN after every conv (default; see the module docstring).
    Attributes:
        down: ModuleList of the 4 encoder DoubleConvs; bottleneck: DoubleConv;
        upconv: ModuleList of 4 ConvTranspose2d (deepest first); up: ModuleList of 4 decoder
        DoubleConvs (deepest first), each taking the upsampled map concatenated with the skip;
        head: 1x1 conv to ``num_classes``.
    """

    def __init__(self, base: int = 64, input_size: int = 256, in_channels: int = 2,
                 num_classes: int = 2, batch_norm: bool = True, pet_log: float = 0.0,
                 ct_soft: Sequence[float] | None = None, context: int = 0) -> None:
        super().__init__()
        if int(base) != base or base < 1:
            raise ValueError(f"base must be a positive integer, got {base!r}")
        if not (math.isfinite(pet_log) and pet_log >= 0):
            raise ValueError(f"pet_log must be a finite number >= 0, got {pet_log!r}")
        if int(context) != context or context < 0:
            raise ValueError(f"context must be an integer >= 0, got {context!r}")
        if ct_soft is not None and not (len(ct_soft) == 2 and float(ct_soft[1]) > float(ct_soft[0])):
            raise ValueError(f"ct_soft must be (lo, hi) with hi > lo, got {ct_soft!r}")
        if int(input_size) != input_size or input_size < 16 or input_size % 16:
            raise ValueError(f"input_size must be a positive multiple of 16 (4 poolings), got "
                             f"{input_size!r}")
        self.base = int(base)
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.batch_norm = bool(batch_norm)
        self.pet_log = float(pet_log)
        self.ct_soft = None if ct_soft is None else (float(ct_soft[0]), float(ct_soft[1]))
        self.context = int(context)
        chans = [self.base * 2 ** i for i in range(N_LEVELS)]
        self.down = nn.ModuleList()
        # + 2 * context neighbouring PET slices (``slice_batch``) + the soft-tissue CT channel
        c_in = self.in_channels + 2 * self.context + (self.ct_soft is not None)
        for c in chans:
            self.down.append(DoubleConv(c_in, c, self.batch_norm))
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c_in, self.base * 2 ** N_LEVELS, self.batch_norm)
        c_in = self.base * 2 ** N_LEVELS
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for c in reversed(chans):
            self.upconv.append(nn.ConvTranspose2d(c_in, c, kernel_size=2, stride=2))
            self.up.append(DoubleConv(2 * c, c, self.batch_norm))  # upsampled + skip
            c_in = c
        self.head = nn.Conv2d(c_in, self.num_classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 2 + 2 context, H, W), H and W divisible by 16 -> logits (B, 2, H, W)."""
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"U-Net input height and width must be divisible by 16, got "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels + 2 * self.context:
            raise ValueError(f"expected {self.in_channels + 2 * self.context} input channels "
                             f"(context {self.context}), got {tuple(x.shape)}")
        if self.pet_log > 0:  # every PET channel: 0 and the context slices 2, 3, ...
            x = torch.cat([pet_log_transform(x[:, :1], self.pet_log), x[:, 1:2],
                           pet_log_transform(x[:, 2:], self.pet_log)], dim=1)
        if self.ct_soft is not None:
            lo, hi = self.ct_soft
            x = torch.cat([x, ((x[:, 1:2] - lo) / (hi - lo)).clamp(0.0, 1.0)], dim=1)
        skips = []
        for enc in self.down:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upconv, dec, skip in zip(self.upconv, self.up, reversed(skips)):
            x = dec(torch.cat([upconv(x), skip], dim=1))
        return self.head(x)

    def extra_repr(self) -> str:
        return (f"base={self.base}, input_size={self.input_size}, levels={N_LEVELS}, "
                f"batch_norm={self.batch_norm}, pet_log={self.pet_log:g}, ct_soft={self.ct_soft}, "
                f"context={self.context}")


class UNetEnsemble(nn.Module):
    """U-Nets of the same configuration trained from different seeds, used as one network.

    ``forward`` returns ``log`` of the members' mean softmax, so ``softmax(forward(x))`` is their
    mean tumour probability: every consumer of a U-Net's logits (``predict_volume_unet``,
    ``choose_threshold``, the scorer) averages the members without knowing it.

    Why (issue 23): one training draw of the small preset moved the test median Dice by up to 0.13
    on the same split (demo 0.62-0.74, hot30 0.38-0.51), more than any training change measured.
    Averaging three draws' probabilities was at or above the mean of the three single networks on
    all five cohorts measured (docs/UNET_EXPERIMENTS.md, "U-Net: an ensemble of training draws").

    Args:
        members: one or more ``UNet2D`` of equal ``in_channels``, ``num_classes`` and ``context``.
    """

    def __init__(self, members: Sequence[UNet2D]) -> None:
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, UNet2D) for m in members):
            raise ValueError(f"an ensemble needs one or more UNet2D members, got {members!r}")
        for key in ("in_channels", "num_classes", "context"):
            vals = {getattr(m, key) for m in members}
            if len(vals) > 1:
                raise ValueError(f"ensemble members differ in {key}: {sorted(vals)}")
        self.members = nn.ModuleList(members)
        self.context = members[0].context
        self.in_channels = members[0].in_channels
        self.num_classes = members[0].num_classes
        self.input_size = members[0].input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x as ``UNet2D.forward`` -> (B, num_classes, H, W) log mean probability."""
        prob = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(prob.clamp_min(1e-12))

    def extra_repr(self) -> str:
        return f"members={len(self.members)}"


def pet_log_transform(pet: torch.Tensor, k: float) -> torch.Tensor:
    """``log(1 + k p) / log(1 + k)`` of the PET channel p in [0, 1] (``k`` > 0): 0 -> 0, 1 -> 1,
    monotone, and with p = SUV / suv_max and k = suv_max it is ``log(1 + SUV) / log(1 + suv_max)``.

    Why it was tried (issue 23, third round): on the linear scale the small preset's U-Net missed
    the large low-contrast lesions (SUV ~2-4 over a background of ~0.8, i.e. 0.11 vs 0.04 of the
    channel, where hot lesions span 0.2-1) whatever the threshold; the log spreads the range in
    which physiological uptake and faint lesions lie. Measured on the demo's split 1 it did not
    find them (test median Dice 0.456 vs 0.460), so no preset uses it (``pet_log`` 0); it stays
    an option of ``UNet2D`` / ``bench.bench_unet --pet-log`` (docs/UNET_EXPERIMENTS.md, "U-Net: third round")."""
    return torch.log1p(pet.clamp(min=0.0) * float(k)) / math.log1p(float(k))


#: ``input_size`` value meaning "the slices' own resolution" (``native_input_size``).
NATIVE = "native"


def native_input_size(slice_shapes: Iterable[Sequence[int]]) -> int:
    """The network input side S for training at the slices' own resolution: the largest in-plane
    side (X or Y, pixels) over ``slice_shapes`` rounded up to a multiple of 16 (the four poolings).

    Why (issue 23): the small preset's 64x64 halves a 128-pixel phantom slice, so a 15-voxel lesion
    becomes 1-2 pixels; at the native grid the same U-Net found 14 of 16 test lesions on the demo
    cohort instead of 12 (docs/UNET_EXPERIMENTS.md, "U-Net: why it undertrained"). Training cost stays that of 64x64
    through ``crop_pair`` windows; only validation and inference run on whole native slices.
    """
    sides = [int(v) for sh in slice_shapes for v in tuple(sh)[:2]]
    if not sides or min(sides) < 1:
        raise ValueError(f"need at least one slice shape with positive sides, got {sides}")
    return 16 * math.ceil(max(sides) / 16)


def build_unet(preset: str = "paper", base: int | None = None, input_size: int | None = None,
               pet_log: float | None = None, ct_soft_hu: Sequence[float] | None = None,
               context: int | None = None) -> tuple[UNet2D, SlicePreprocessor]:
    """Build the U-Net and its preprocessor (the classifier's ``SlicePreprocessor``).

    Args:
        preset: a key of ``UNET_PRESETS`` ("paper": base 64, 256x256; "small": base 8, 64x64).
        base, input_size: override the preset's values (input_size a multiple of 16).
        pet_log: ``pet_log_transform``'s k applied to the PET channel inside the network (0: the
            linear channel; a preset without the key has 0).
        ct_soft_hu: (lo, hi) HU of a soft-tissue window the network adds as a third input channel,
            computed from the CT channel with the preprocessor's CT window (None: no extra channel).
        context: PET slices taken on each side of the segmented one as extra input channels
            (2.5-D, ``slice_batch``; 0 or a preset without the key: the slice alone).
    Returns:
        (model in train mode on CPU, SlicePreprocessor(input_size)).
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    cfg = dict(UNET_PRESETS[preset])
    if base is not None:
        cfg["base"] = int(base)
    if input_size is not None:
        cfg["input_size"] = int(input_size)
    if pet_log is not None:
        cfg["pet_log"] = float(pet_log)
    pre = SlicePreprocessor(input_size=cfg["input_size"])
    if ct_soft_hu is not None:
        cfg["ct_soft_hu"] = tuple(ct_soft_hu)
    soft = cfg.get("ct_soft_hu")
    if soft is not None:  # HU -> the CT channel's [0, 1] (ct_min -> 0, ct_max -> 1)
        soft = tuple((float(h) - pre.ct_min) / (pre.ct_max - pre.ct_min) for h in soft)
    if context is not None:
        cfg["context"] = int(context)
    model = UNet2D(base=cfg["base"], input_size=cfg["input_size"], pet_log=cfg.get("pet_log", 0.0),
                   ct_soft=soft, context=cfg.get("context", 0))
    return model, pre


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def _unet_config(net: UNet2D) -> dict[str, Any]:
    return {"base": int(net.base), "input_size": int(net.input_size),
            "in_channels": int(net.in_channels), "num_classes": int(net.num_classes),
            "batch_norm": bool(net.batch_norm), "pet_log": float(net.pet_log),
            "ct_soft": None if net.ct_soft is None else list(net.ct_soft),
            "context": int(net.context)}


def _build_from_config(cfg: Mapping[str, Any]) -> nn.Module:
    if "members" in cfg:
        return UNetEnsemble([_build_from_config(c) for c in cfg["members"]])
    return UNet2D(base=int(cfg["base"]), input_size=int(cfg["input_size"]),
                  in_channels=int(cfg.get("in_channels", 2)), num_classes=int(cfg.get("num_classes", 2)),
                  batch_norm=bool(cfg.get("batch_norm", True)), pet_log=float(cfg.get("pet_log", 0.0)),
                  ct_soft=cfg.get("ct_soft"), context=int(cfg.get("context", 0)))


def save_unet(path: str | os.PathLike, model: nn.Module, pre: SlicePreprocessor,
              meta: Mapping[str, Any] | None = None) -> None:
    """Write {format, version, state_dict, config, preprocessor, meta} atomically (temp + replace).

    ``model`` is a ``UNet2D`` (written as version 1) or a ``UNetEnsemble`` (version 2, config
    ``{"members": [config, ...]}``); it may be DDP-wrapped (its ``.module`` is saved), weights go
    to CPU; ``meta`` must be JSON-able so the file loads with ``torch.load(weights_only=True)``.
    """
    bare = getattr(model, "module", model)
    if isinstance(bare, UNetEnsemble):
        config, version = {"members": [_unet_config(m) for m in bare.members]}, CHECKPOINT_VERSION
    elif isinstance(bare, UNet2D):
        config, version = _unet_config(bare), 1
    else:
        raise TypeError(f"expected a UNet2D or UNetEnsemble, got {type(bare).__name__}")
    save_checkpoint(path, bare, fmt=CHECKPOINT_FORMAT, version=version, config=config,
                    meta=meta, preprocessor=pre.to_dict())


def load_unet(path: str | os.PathLike) -> tuple[nn.Module, SlicePreprocessor, dict]:
    """Load a ``save_unet`` file -> (``UNet2D`` or ``UNetEnsemble`` in eval mode on CPU,
    preprocessor, meta dict).

    Raises ValueError (naming the path) for a missing, unreadable or foreign file.
    """
    model, ckpt = load_checkpoint(path, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                                  what="U-Net", build=_build_from_config)
    return model, SlicePreprocessor.from_dict(ckpt["preprocessor"]), dict(ckpt.get("meta") or {})


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------

def slice_batch(suv: np.ndarray, ct: np.ndarray, z_indices: Sequence[int] | np.ndarray,
                pre: SlicePreprocessor, context: int = 0) -> torch.Tensor:
    """The U-Net's input for axial slices ``z_indices`` of an (X, Y, Z) SUV / CT pair:
    (n, 2 + 2 context, S, S) float32.

    Channels 0, 1: the slice's PET and CT (``models.volume_to_batch``, as the classifier's).
    With ``context`` k > 0 (2.5-D input), channels 2 ... 2 + 2k - 1 are the PET of slices
    z - k, ..., z - 1, z + 1, ..., z + k, each preprocessed like channel 0; a neighbour outside
    the volume repeats the edge slice (index clamped to 0 ... Z - 1).

    Why it was tried (issue 23, fourth round): 3-D context could tell a lesion from an organ of
    the same uptake. Measured (docs/UNET_EXPERIMENTS.md, "U-Net: fourth round"): with context 1 the small preset's
    test median Dice fell on demo split 1 (0.427 -> 0.407) and v2b (0.467 -> 0.371), the same
    lesions missed, so no preset uses it (``context`` 0).
    """
    z = np.asarray(z_indices, dtype=np.int64).reshape(-1)
    x = volume_to_batch(suv, ct, z, pre)
    if context <= 0 or z.size == 0:
        return x
    nz = np.asarray(suv).shape[2]
    pets = [volume_to_batch(suv, ct, np.clip(z + o, 0, nz - 1), pre)[:, :1]
            for o in [*range(-int(context), 0), *range(1, int(context) + 1)]]
    return torch.cat([x, *pets], dim=1)


def predict_volume_unet(model: nn.Module, pre: SlicePreprocessor, suv: np.ndarray, ct: np.ndarray,
                        batch_size: int = 32) -> np.ndarray:
    """Tumour probability of every voxel of a (X, Y, Z) SUV/CT volume, slice-batch by slice-batch.

    Each batch of axial slices is preprocessed to (B, 2, S, S), run on the model's device under
    ``torch.inference_mode`` in eval mode (the model's mode is restored afterwards), and the tumour
    probability softmax[:, 1] is upsampled bilinearly (align_corners=False) to (X, Y).

    Returns:
        float32 array of shape ``suv.shape``, values in [0, 1].
    """
    suv = np.asarray(suv)
    ct = np.asarray(ct)
    if suv.ndim != 3 or suv.shape != ct.shape:
        raise ValueError(f"expected SUV and CT volumes of equal shape (X, Y, Z), got "
                         f"{suv.shape} and {ct.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    nx, ny, nz = suv.shape
    out = np.zeros(suv.shape, dtype=np.float32)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    context = int(getattr(getattr(model, "module", model), "context", 0))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, nz, int(batch_size)):
                z = np.arange(start, min(nz, start + int(batch_size)))
                x = slice_batch(suv, ct, z, pre, context).to(device)
                prob = torch.softmax(model(x).float(), dim=1)[:, 1:2]
                if tuple(prob.shape[-2:]) != (nx, ny):
                    prob = F.interpolate(prob, size=(nx, ny), mode="bilinear", align_corners=False)
                out[:, :, z] = np.moveaxis(prob[:, 0].cpu().numpy(), 0, -1)
    finally:
        model.train(was_training)
    return out


def segment_volume_unet(model: nn.Module, pre: SlicePreprocessor, suv: np.ndarray, ct: np.ndarray,
                        batch_size: int = 32, threshold: float = 0.5) -> np.ndarray:
    """uint8 {0, 1} mask (shape ``suv.shape``): ``predict_volume_unet > threshold``."""
    return (predict_volume_unet(model, pre, suv, ct, batch_size) > threshold).astype(np.uint8)


#: Probability thresholds searched on validation (``choose_threshold``, and the job's per-epoch
#: ``evaluate_unet(thresholds=...)``). Issue 23, fourth round: 0.02, 0.05, 0.95 and 0.98 were
#: added to 0.1 ... 0.9 because the validation choice sat on the grid's end in 9 of 12 bench runs
#: (0.1 where the network under-segments, 0.9 where it over-segments). Measured on the same
#: networks (docs/UNET_EXPERIMENTS.md, "U-Net: fourth round"): demo split 0 chose 0.95 (test median Dice 0.706 ->
#: 0.729, ICC 0.93 -> 0.95, lesions 14 -> 13 of 16), v2b 0.05 (0.467 -> 0.482, ICC 0.46 -> 0.52),
#: demo split 1 kept 0.1 (unchanged).
THRESHOLD_GRID: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                     0.95, 0.98)


#: Validation rules ``choose_threshold`` knows: "pooled" (the default, issue 23) and "median".
THRESHOLD_RULES: tuple[str, ...] = ("pooled", "median")


def choose_threshold(model: nn.Module, pre: SlicePreprocessor, studies: Sequence[Any],
                     grid: Sequence[float] = THRESHOLD_GRID, batch_size: int = 32,
                     rule: str = "pooled") -> dict[str, Any]:
    """The probability threshold with the highest validation Dice, by ``rule``.

    Why a search: the weighted cross-entropy (tumour weight w) shifts the softmax's calibration (at
    w = 7.7 a pixel is called tumour above posterior ~1 / (1 + 7.7)), and how far depends on the
    preset, the epochs and the cohort; the scored Dice is the 3-D Dice of each study, which the
    training loop's pooled pixel Dice at S x S does not measure. Each study's probability volume
    is computed once.

    Rules:
        "pooled" (default): ``selection.pooled_dice`` over every labelled validation study,
            ``2 sum|P & R| / (sum|P| + sum|R|)``; a tumour-free study's false positives count.
        "median": the median of the per-study 3-D Dice of the studies with tumour (the rule before
            issue 23's second round); tumour-free studies do not vote.
    Why "pooled", not the median nor the project's patient mean (``selection.patient_mean``, which
    also leaves tumour-free studies out): neither of those sees the false positives of a
    tumour-free study, and with 4-6 validation studies the median went to the grid's ends (0.1 on
    the demo's seed-1 split, where the job then painted 19.8 ml on a tumour-free test study).
    Measured (docs/UNET_EXPERIMENTS.md, "U-Net: a steadier validation choice"; the same networks, only the rule
    differs): demo split 0, test median Dice pooled 0.79 / 0.73 vs median 0.73 / 0.72 (two
    checkpoints), patient mean 0.79 / 0.74; demo split 1, pooled 0.47 vs median 0.38; phantom
    v2b, pooled 0.44 / 0.45 vs median 0.39 / 0.43, patient mean 0.44 / 0.45.

    Args:
        studies: loaded ``Study`` objects (``.suv``, ``.ct``, ``.seg``); those without SEG are
            skipped (unlabelled); an empty SEG (a tumour-free study) counts under "pooled" only.
        grid: thresholds in (0, 1).
        rule: one of ``THRESHOLD_RULES``.
    Returns:
        dict(threshold, val_dice (the rule's score there), rule, n (studies with tumour),
        by_threshold {str(t): the rule's score}, median_by_threshold {str(t): median Dice}).
        Equal scores go to the threshold closest to 0.5; with no study with tumour the threshold
        is 0.5 and val_dice NaN.
    """
    from wsseg_core.metrics import dice
    from wsseg_core.selection import pooled_dice

    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    grid = [float(t) for t in grid]
    if not grid or any(not 0.0 < t < 1.0 for t in grid):
        raise ValueError(f"thresholds must lie in (0, 1), got {grid}")
    scores: dict[float, list[float]] = {t: [] for t in grid}
    counts: list[tuple[np.ndarray, np.ndarray, int]] = []
    for st in studies:
        seg = getattr(st, "seg", None)
        if seg is None:
            continue
        ref = np.asarray(seg) > 0
        prob = predict_volume_unet(model, pre, st.suv, st.ct, batch_size)
        masks = [prob > t for t in grid]
        counts.append((np.array([np.count_nonzero(m & ref) for m in masks]),
                       np.array([np.count_nonzero(m) for m in masks]), int(ref.sum())))
        if ref.any():
            for t, m in zip(grid, masks):
                scores[t].append(dice(m, ref))
    n = len(scores[grid[0]])
    if n == 0:
        return {"threshold": 0.5, "val_dice": float("nan"), "rule": rule, "n": 0,
                "by_threshold": {}, "median_by_threshold": {}}
    med = {t: float(np.median(v)) for t, v in scores.items()}
    pooled = dict(zip(grid, (float(v) for v in pooled_dice(counts, (len(grid),))[0])))
    by = pooled if rule == "pooled" else med
    best = max(grid, key=lambda t: (by[t], -abs(t - 0.5)))
    return {"threshold": best, "val_dice": by[best], "rule": rule, "n": n,
            "by_threshold": {f"{t:g}": by[t] for t in grid},
            "median_by_threshold": {f"{t:g}": med[t] for t in grid}}


def load_segmenter(path: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
                   device: str = "cpu", batch_size: int = 32) -> Callable[[Any], np.ndarray]:
    """A scorer's view of a saved U-Net: `study -> uint8 mask` (the `ModelMethod` loader protocol).

    `params` may hold `threshold` (tumour probability, default 0.5); the study needs `.suv`, `.ct`.
    """
    model, pre, _ = load_unet(path)
    model.to(device).eval()
    threshold = float((params or {}).get("threshold", 0.5))

    def segment(study: Any) -> np.ndarray:
        return segment_volume_unet(model, pre, study.suv, study.ct, batch_size=batch_size,
                                   threshold=threshold)

    return segment


# --------------------------------------------------------------------------------------------------
# Training data and augmentation
# --------------------------------------------------------------------------------------------------

def resize_masks(masks: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(B, X, Y) {0,1} masks -> (B, S, S) int64 by nearest-neighbour at pixel centres
    (``nearest-exact``, the same pixel-centre convention as the preprocessor's bilinear resize)."""
    m = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
    if m.ndim != 3:
        raise ValueError(f"expected masks (B, X, Y), got {tuple(m.shape)}")
    if tuple(m.shape[-2:]) != (size, size):
        m = F.interpolate(m[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
    return (m > 0.5).to(torch.int64) if m.is_floating_point() else (m > 0).to(torch.int64)


def masks_from_studies(studies: Sequence[Any], pre: SlicePreprocessor, negative_keep: float = 1.0,
                       generator: torch.Generator | None = None, context: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """All axial slices of labelled studies with their pixel masks, as U-Net training data.

    Args:
        studies: loaded ``Study`` objects (``.suv``, ``.ct``, ``.seg`` (X, Y, Z)); ``seg is None``
            ones are skipped.
        pre: the preprocessor (sets S).
        negative_keep: fraction in (0, 1] of tumour-free slices kept (random per slice); slices
            with any tumour voxel are always kept (``train.sample_slices``, the classifier's sampler).
        generator: CPU generator for the subsampling.
        context: neighbouring PET slices on each side as extra channels (``slice_batch``).
    Returns:
        x float32 (N, 2 + 2 context, S, S) on CPU; y int64 (N, S, S) in {0, 1} (SEG resized by
        nearest).
    """
    s = pre.input_size
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for st, chunks, _ in sample_slices(studies, negative_keep, generator, _CHUNK):
        seg = np.asarray(st.seg)
        for z in chunks:
            xs.append(slice_batch(st.suv, st.ct, z, pre, context))
            ys.append(resize_masks(np.ascontiguousarray(np.moveaxis(seg[:, :, z], -1, 0)), s))
    if not xs:
        return (torch.zeros((0, 2 + 2 * int(context), s, s), dtype=torch.float32),
                torch.zeros((0, s, s), dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def augment_pair(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                 fill: Sequence[float] = (0.0, 0.0), pet_gamma: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's augmentation (``train.augment_batch`` ranges) applied to image and mask.

    One random affine per sample (scale, rotation, translation) warps the image bilinearly and the
    mask with nearest neighbour, so they stay aligned; the PET gamma (contrast) touches only image
    channel 0. Pixels warped in from outside become ``fill`` (image) and 0 (mask).

    ``pet_gamma`` False: the same draws and warp, without the PET gamma. Why it was tried (issue
    23, third round): SUV is a calibrated unit, and a gamma of 0.7-1.4 moves a faint lesion's SUV
    ~2.5 (0.12 of the channel) between 0.05 and 0.23, across the levels of the liver and bowel.
    Measured (docs/UNET_EXPERIMENTS.md, "U-Net: third round"): without it the small preset's U-Net found more test
    lesions on phantom v2b (17 vs 14 of 19; median Dice 0.51 vs 0.41) and on the demo's split 1
    (16 vs 14 of 18; Dice 0.455 vs 0.460) but over-segmented the demo's split 0 (median 0.67 vs
    0.73), so no preset turns it off.

    Args:
        x: (B, C, S, S) float, channel 0 PET in [0, 1], channel 1 CT, channels 2, ... (if any)
            neighbouring PET slices (``slice_batch``), which get channel 0's gamma.
        generator: CPU generator; parameters are drawn on CPU whatever the device.
    Returns:
        (x', y') new tensors with the input shapes, dtypes and devices.
    """
    if x.ndim != 4 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[-2:] != y.shape[-2:]:
        raise ValueError(f"expected x (B, C, H, W) and y (B, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] == 0:
        return x.clone(), y.clone()
    # Channels 2, 3, ... are neighbouring PET slices (``slice_batch``, 2.5-D): they get channel 0's
    # gamma. augment_with_grid draws its (B, 5) uniforms first, the gamma from the 5th: replay them.
    state = (generator if generator is not None else torch.default_generator).get_state()
    xo, grid = augment_with_grid(x, generator, fill)
    if pet_gamma and x.shape[1] > 2:
        replay = torch.Generator().manual_seed(0)
        replay.set_state(state)
        u = torch.rand((x.shape[0], 5), generator=replay, dtype=torch.float64)
        lg0, lg1 = math.log(PET_GAMMA_RANGE[0]), math.log(PET_GAMMA_RANGE[1])
        g = torch.exp(lg0 + (lg1 - lg0) * u[:, 4]).to(device=x.device, dtype=x.dtype)
        xo[:, 2:] = xo[:, 2:].clamp(0.0, 1.0).pow(g.view(-1, 1, 1, 1))
    if not pet_gamma:
        # The same warp without the PET gamma: the draws (and so every later one) are unchanged.
        f = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        f[: min(x.shape[1], len(fill))] = torch.as_tensor(list(fill)[: x.shape[1]], dtype=x.dtype)
        f = f.view(1, -1, 1, 1)
        xo = F.grid_sample(x - f, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False) + f
    yo = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", padding_mode="zeros",
                       align_corners=False)[:, 0]
    return xo, yo.round().to(y.dtype)


# --------------------------------------------------------------------------------------------------
# Training / evaluation loops
# --------------------------------------------------------------------------------------------------

def make_unet_optimizer(model: nn.Module, lr: float = PAPER_LR,
                        betas: tuple[float, float] = PAPER_BETAS) -> torch.optim.Adam:
    """Adam over the trainable parameters (paper: lr 5e-5, betas (0.9, 0.999))."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas)


def scale_lesion_uptake(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                        fraction: float = 0.5, low: float = 0.5, halo: int = 2,
                        ring: int = 4) -> torch.Tensor:
    """Lesion-uptake augmentation: lower the PET contrast of the tumour in some samples.

    For each sample whose mask has tumour, with probability ``fraction``, a factor ``a`` is drawn
    uniformly from [``low``, 1] and the PET channel (0) becomes ``pet - (1 - a) w relu(pet - b)``:
    the uptake above the local background ``b`` is scaled by ``a`` where ``w`` = 1 and left alone
    where ``w`` = 0. ``b``: the median PET over a ring around the tumour (pixels within ``halo`` +
    ``ring`` of it but farther than ``halo``); ``w``: 1 on the tumour and its ``halo``-pixel
    neighbourhood (the scanner's blur spills the lesion's uptake there), then a
    (2 ``halo`` + 1)-wide box blur so the edit has no step. Other channels are unchanged; the mask
    too (a lesion with half its contrast is still the lesion). A sample without tumour or without
    ring pixels is returned as it came.

    Why (issue 23, fourth round): the small preset's U-Net missed whole large lesions of low
    contrast (mean SUV 2.1-2.4 over 0.8-0.9) with p ~ 0.02 while fitting every large training
    lesion (recall 0.72-0.98 on the training lesions of mean SUV 2.45-3.0): it generalised poorly
    from the handful of faint lesions a training split holds. Lesion avidity varies in patients
    (tumour type, uptake time), so fainter copies of every training lesion are a generic way to
    show the network more of them. Measured (docs/UNET_EXPERIMENTS.md, "U-Net: fourth round"; fraction 0.5, low
    0.5): it did not find those lesions and over-segmented the demo's own split (test median Dice
    0.706 -> 0.640), so no preset uses it.

    Args:
        x: (B, C, H, W), channel 0 PET in [0, 1]; y: (B, H, W) {0, 1}.
        generator: CPU generator (two uniforms per sample, drawn for every sample).
    Returns:
        a new x (y is not changed).
    """
    if not 0.0 <= fraction <= 1.0 or not 0.0 <= low <= 1.0:
        raise ValueError(f"fraction and low must lie in [0, 1], got {fraction!r}, {low!r}")
    b = x.shape[0]
    u = torch.rand((b, 2), generator=generator)
    xo = x.clone()
    if b == 0 or fraction == 0.0:
        return xo
    m = (y > 0).to(x.dtype)[:, None]
    near = F.max_pool2d(m, 2 * halo + 1, stride=1, padding=halo)
    far = F.max_pool2d(m, 2 * (halo + ring) + 1, stride=1, padding=halo + ring)
    w = F.avg_pool2d(near, 2 * halo + 1, stride=1, padding=halo, count_include_pad=False)[:, 0]
    ring_m = (far - near)[:, 0] > 0
    for i in range(b):
        if not (u[i, 0] < fraction and bool(m[i].any()) and bool(ring_m[i].any())):
            continue
        a = float(low + (1.0 - low) * u[i, 1])
        pet = x[i, 0]
        bg = pet[ring_m[i]].median()
        xo[i, 0] = pet - (1.0 - a) * w[i] * (pet - bg).clamp(min=0.0)
    return xo


def _lesion_excess(pet: torch.Tensor, m: torch.Tensor, halo: int = 2, ring: int = 4
                   ) -> torch.Tensor | None:
    """(H, W) PET and {0, 1} float mask -> the lesion's uptake above the ring background, weighted
    as in ``scale_lesion_uptake`` (``w relu(pet - b)``); None without ring pixels."""
    mm = m[None, None]
    near = F.max_pool2d(mm, 2 * halo + 1, stride=1, padding=halo)
    far = F.max_pool2d(mm, 2 * (halo + ring) + 1, stride=1, padding=halo + ring)
    w = F.avg_pool2d(near, 2 * halo + 1, stride=1, padding=halo, count_include_pad=False)[0, 0]
    ring_m = (far - near)[0, 0] > 0
    if not bool(ring_m.any()):
        return None
    return w * (pet - pet[ring_m].median()).clamp(min=0.0)


def _shift2d(t: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """(..., H, W) shifted by (dr, dc) pixels, zeros where nothing moves in (no wrap-around)."""
    h, w = t.shape[-2:]
    out = torch.zeros_like(t)
    if abs(dr) >= h or abs(dc) >= w:
        return out
    out[..., max(dr, 0):h + min(dr, 0), max(dc, 0):w + min(dc, 0)] = \
        t[..., max(-dr, 0):h - max(dr, 0), max(-dc, 0):w - max(dc, 0)]
    return out


#: The CT channel's value above which a pixel counts as body (not air or lung) for
#: ``paste_lesions``: -400 HU on the preprocessor's -1000 ... 1000 HU window.
PASTE_MIN_CT = 0.3


def paste_lesions(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                  fraction: float = 0.5, min_ct: float = PASTE_MIN_CT) -> tuple[torch.Tensor, torch.Tensor]:
    """Lesion copy-paste augmentation: move a lesion of one training window into another one.

    For each sample, with probability ``fraction`` (and when another sample of the batch, the
    donor, holds tumour), the donor's tumour uptake above its ring background (``w relu(pet - b)``
    as in ``scale_lesion_uptake``) is ADDED to this sample's PET channel, shifted so that the
    donor mask's centre lands on a random body pixel of this sample (CT channel > ``min_ct``, not
    already tumour), and the shifted donor mask is added to this sample's mask. CT and the other
    channels are not changed (the pasted lesion is PET-only). Draws: 3 uniforms per sample, always.

    Why (issue 23, fourth round): the small preset's U-Net missed whole large lesions in places
    where its training split held none (demo split 1: two low-contrast lesions at the same
    abdominal spot in two test studies, one next to the spine; phantom v2b: a hot lesion inside
    the liver), while it fitted every large training lesion; a training split holds ~50 lesions
    at ~50 places. Pasting them elsewhere shows each lesion against many backgrounds (the
    "copy-paste" augmentation of instance segmentation; additive, as uptake adds up in PET).
    Measured (docs/UNET_EXPERIMENTS.md, "U-Net: fourth round"): at fraction 0.5 v2b's test median Dice rose 0.467 ->
    0.568 but the network learnt that any local excess is tumour (demo split 0 0.706 -> 0.563, 15.9
    ml on a tumour-free study); at 0.2 demo split 0 still fell to 0.633. No preset uses it.

    Args:
        x: (B, C, H, W), channel 0 PET in [0, 1], channel 1 CT in [0, 1]; y: (B, H, W) {0, 1}.
        generator: CPU generator.
    Returns:
        new (x, y).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    b, _, h, w = x.shape
    u = torch.rand((b, 3), generator=generator)
    xo, yo = x.clone(), y.clone()
    donors = [j for j in range(b) if bool((y[j] > 0).any())]
    for i in range(b):
        cands = [j for j in donors if j != i]
        if not (u[i, 0] < fraction and cands):
            continue
        j = cands[int(u[i, 1] * len(cands)) % len(cands)]
        m = (y[j] > 0).to(x.dtype)
        exc = _lesion_excess(x[j, 0], m)
        body = (x[i, 1] > min_ct) & (yo[i] == 0)
        if exc is None or not bool(body.any()):
            continue
        idx = body.flatten().nonzero()[:, 0]
        k = int(idx[int(u[i, 2] * len(idx)) % len(idx)])
        rr, cc = m.nonzero(as_tuple=True)
        dr, dc = k // w - int(rr.float().mean().round()), k % w - int(cc.float().mean().round())
        xo[i, 0] = (xo[i, 0] + _shift2d(exc, dr, dc)).clamp(max=1.0)
        yo[i] = torch.maximum(yo[i], _shift2d(m, dr, dc).to(y.dtype))
    return xo, yo


def crop_pair(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None = None,
              lesion_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``size`` x ``size`` window per sample, the same for image and mask.

    Why: the network is fully convolutional, so it can learn at the full slice resolution (small
    lesions keep their pixels) from windows that cost what a whole slice at ``size`` costs, and
    segment whole slices at inference. With probability ``lesion_fraction`` (per sample, when its
    mask has tumour) the window is centred, up to a random shift of a quarter window, on a random
    tumour pixel, so the rare tumour pixels are seen often; otherwise it is placed uniformly.

    Args:
        x: (B, C, S, S); y: (B, S, S); size <= S, a multiple of 16.
        generator: CPU generator (all draws on CPU whatever the device).
    Returns:
        (x', y') of shapes (B, C, size, size) and (B, size, size).
    """
    b, _, h, w = x.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds the slice {h}x{w}")
    if size == h == w:
        return x, y
    u = torch.rand((b, 4), generator=generator)
    r0 = (u[:, 0] * (h - size + 1)).long().clamp(max=h - size)
    c0 = (u[:, 1] * (w - size + 1)).long().clamp(max=w - size)
    pos = (y > 0).flatten(1).cpu()
    for i in range(b):
        if u[i, 2] < lesion_fraction and pos[i].any():
            idx = pos[i].nonzero()[:, 0]
            k = idx[int(u[i, 3] * len(idx)) % len(idx)]
            shift = torch.randint(-(size // 4), size // 4 + 1, (2,), generator=generator)
            r0[i] = int((k // w) - size // 2 + shift[0])
            c0[i] = int((k % w) - size // 2 + shift[1])
    r0 = r0.clamp(0, h - size)
    c0 = c0.clamp(0, w - size)
    xs = torch.stack([x[i, :, r0[i]:r0[i] + size, c0[i]:c0[i] + size] for i in range(b)])
    ys = torch.stack([y[i, r0[i]:r0[i] + size, c0[i]:c0[i] + size] for i in range(b)])
    return xs, ys


class CEDiceLoss(nn.Module):
    """Weighted cross-entropy plus ``dice_weight`` x the soft Dice loss of the tumour class, both over
    the GLOBAL batch when DDP splits it over ``world`` ranks.

    ``loss = CE_w + dice_weight * (1 - (2 sum p r + s) / (sum p + sum r + s))`` with p the tumour
    softmax, r the {0, 1} reference and the sums over every pixel of the batch (pooled, not per
    slice: most slices hold no tumour, and a per-slice Dice of an empty slice is all-or-nothing);
    s = ``smooth`` (1 pixel) keeps an all-background batch defined (its Dice loss is then
    ``1 - 1 / (sum p + 1)``, which pushes the predicted area down).

    Why the Dice term (issue 23): the weighted CE alone is a per-pixel loss; with well under 1 % of
    the pixels tumour it left ~0 slowly. On 32x32 slices with small discs (0.7 % of the pixels) the
    weighted CE alone stayed at validation Dice 0.01-0.04 for 160 steps, CE + Dice reached 0.61
    (``tests/test_unet_threshold.py``); on the demo cohort at 64x64 CE + Dice reached a validation
    pixel Dice of 0.50 in 400 steps and 0.72 in 1000, where docs/UNET_EXPERIMENTS.md records 0.24 after ~180 steps
    and 0.59 after ~870 for the weighted CE alone (docs/UNET_EXPERIMENTS.md, "U-Net: why it undertrained").

    DDP: the CE is ``train.GlobalMeanCrossEntropy``'s global weighted mean. For the Dice, the three
    sums are all-reduced (without gradient) and each rank returns the global Dice loss plus
    ``world x`` a surrogate whose gradient is its own pixels' share of the global Dice's gradient
    (``-2 r_i / D + (2 I + s) / D**2`` for D = global sum p + sum r + s, I the global intersection),
    so DDP's mean over ranks is the single-process gradient of the whole batch. With ``world == 1``
    it is exactly the formula above.
    """

    def __init__(self, weight: torch.Tensor | None = None, dice_weight: float = 1.0, world: int = 1,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if not dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight!r}")
        self.ce = GlobalMeanCrossEntropy(weight, world)
        self.dice_weight = float(dice_weight)
        self.world = int(world)
        self.smooth = float(smooth)

    @property
    def weight(self) -> torch.Tensor | None:
        """The CE class weights (``evaluate_unet`` reads them for the validation loss)."""
        return self.ce.weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        if self.dice_weight == 0:
            return loss
        p = torch.softmax(logits.float(), dim=1)[:, 1]
        r = (target == 1).to(p.dtype)
        inter, psum, rsum = (p * r).sum(), p.sum(), r.sum()
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            g = torch.stack([inter, psum, rsum]).detach().clone()
            torch.distributed.all_reduce(g)
            gi, gd = g[0], g[1] + g[2] + self.smooth
            value = 1.0 - (2.0 * gi + self.smooth) / gd
            surrogate = -2.0 * inter / gd + (2.0 * gi + self.smooth) * psum / gd ** 2
            dice_loss = value + self.world * (surrogate - surrogate.detach())
        else:
            dice_loss = 1.0 - (2.0 * inter + self.smooth) / (psum + rsum + self.smooth)
        return loss + self.dice_weight * dice_loss


def epoch_lr(base_lr: float, epoch: int, epochs: int, schedule: str = "constant") -> float:
    """Learning rate of 0-based ``epoch`` of ``epochs``: "constant" (the paper's) or "cosine"
    (``base_lr * (1 + cos(pi * epoch / epochs)) / 2``, from base_lr down towards 0). A function of
    the epoch alone, so a resumed run continues the schedule without saved scheduler state.

    Why cosine on the CPU preset: at a constant lr 1e-3 the validation Dice of the last epochs
    jumped between 0.13 and 0.44 from one epoch to the next (demo cohort, batch 16); the decay lets
    the last epochs settle."""
    if schedule == "constant":
        return float(base_lr)
    if schedule == "cosine":
        return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, int(epochs))))
    raise ValueError(f"unknown schedule {schedule!r}; choose 'constant' or 'cosine'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for g in optimizer.param_groups:
        g["lr"] = float(lr)


def train_unet_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                     loss_fn: nn.Module, device: str | torch.device = "cpu", augment: bool = True,
                     generator: torch.Generator | None = None, crop: int | None = None,
                     pet_gamma: bool = True,
                     lesion_uptake: Sequence[float] | None = None,
                     lesion_paste: float | None = None) -> float:
    """One pass over ``loader`` (batches ``(x (B,2,S,S), y (B,S,S))``) -> sample-weighted mean
    training loss (NaN for an empty loader). ``crop``: train on ``crop_pair`` windows of that size
    (after augmentation, so rotations never pull the padding into the window's centre).
    ``pet_gamma``: whether the augmentation changes the PET contrast (``augment_pair``).
    ``lesion_uptake``: (fraction, low) of ``scale_lesion_uptake``, applied to the (cropped)
    training samples when ``augment``; None: not applied. ``lesion_paste``: ``paste_lesions``'
    fraction, applied (when ``augment``) to the cropped samples before ``lesion_uptake``."""
    model.train()
    loss_fn = loss_fn.to(device)
    total, n = 0.0, 0
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True).long()
        if augment:
            xb, yb = augment_pair(xb, yb, generator, pet_gamma=pet_gamma)
        if crop:
            xb, yb = crop_pair(xb, yb, int(crop), generator)
        if augment and lesion_paste:
            xb, yb = paste_lesions(xb, yb, generator, float(lesion_paste))
        if augment and lesion_uptake:
            xb = scale_lesion_uptake(xb, yb, generator, float(lesion_uptake[0]),
                                     float(lesion_uptake[1]))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(yb)
        n += len(yb)
    return total / n if n else float("nan")


def evaluate_unet(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                  batch_size: int = 64, device: str | torch.device = "cpu",
                  thresholds: Sequence[float] = ()) -> dict[str, Any]:
    """Weighted-CE loss and pooled pixel Dice (argmax at S x S) over validation slices.

    Dice = 2|P & R| / (|P| + |R|) over all pixels of all slices together; NaN when the reference
    has no tumour pixel. The loss is the per-pixel weighted mean over the whole set (batch losses
    recombined with their weight sums). The model's train/eval mode is restored.

    ``thresholds``: also the pooled Dice of ``tumour probability > t`` for each t (the same
    pixels), returned as ``dice_by_threshold`` {str(t): Dice} and their maximum as ``best_dice``
    (NaN without thresholds): the job keeps the epoch with the highest ``best_dice`` (issue 23),
    so the checkpoint is judged at its own best threshold, not at the argmax's 0.5.

    Returns:
        dict(loss, dice, n (slices), n_pos_pixels, n_pred_pixels, dice_by_threshold, best_dice).
    """
    from wsseg_core.metrics import dice_from_counts

    y = torch.as_tensor(y).long()
    n = int(len(y))
    ts = [float(t) for t in thresholds]
    if n == 0:
        return dict(loss=float("nan"), dice=float("nan"), n=0, n_pos_pixels=0, n_pred_pixels=0,
                    dice_by_threshold={f"{t:g}": float("nan") for t in ts}, best_dice=float("nan"))
    loss_fn = loss_fn.to(device)
    w = getattr(loss_fn, "weight", None)
    w = w.detach().to(device) if w is not None else None
    was_training = model.training
    model.eval()
    loss_num = loss_den = 0.0
    inter = pred_sum = ref_sum = 0
    t_inter, t_pred = [0] * len(ts), [0] * len(ts)
    try:
        with torch.inference_mode():
            for start in range(0, n, int(batch_size)):
                xb = x[start:start + batch_size].to(device)
                yb = y[start:start + batch_size].to(device)
                logits = model(xb).float()
                per_pixel = F.cross_entropy(logits, yb, weight=w, reduction="sum")
                loss_num += float(per_pixel)
                loss_den += float(w[yb].sum()) if w is not None else float(yb.numel())
                pred = logits.argmax(dim=1) == 1
                ref = yb == 1
                inter += int((pred & ref).sum())
                pred_sum += int(pred.sum())
                ref_sum += int(ref.sum())
                if ts:
                    prob = torch.softmax(logits, dim=1)[:, 1]
                    for k, t in enumerate(ts):
                        above = prob > t
                        t_inter[k] += int((above & ref).sum())
                        t_pred[k] += int(above.sum())
    finally:
        model.train(was_training)
    dice = dice_from_counts(inter, pred_sum, ref_sum)  # NaN without tumour pixels
    by_t = {f"{t:g}": float(dice_from_counts(i, p, ref_sum)) for t, i, p in zip(ts, t_inter, t_pred)}
    finite = [v for v in by_t.values() if math.isfinite(v)]
    return dict(loss=loss_num / loss_den if loss_den else float("nan"), dice=float(dice), n=n,
                n_pos_pixels=ref_sum, n_pred_pixels=pred_sum, dice_by_threshold=by_t,
                best_dice=max(finite) if finite else float("nan"))


def fit_unet_slices(model: nn.Module, train_xy: tuple[torch.Tensor, torch.Tensor],
                    val_xy: tuple[torch.Tensor, torch.Tensor], epochs: int = PAPER_EPOCHS,
                    batch_size: int = PAPER_BATCH_SIZE, lr: float = PAPER_LR,
                    tumour_weight: float = 7.7, seed: int = 0,
                    on_epoch: Callable[[int, dict[str, float], nn.Module], None] | None = None,
                    *, device: str | torch.device | None = None,
                    augment: bool = True, crop: int | None = None,
                    schedule: str = "constant", dice_weight: float = 0.0,
                    pet_gamma: bool = True,
                    lesion_uptake: Sequence[float] | None = None,
                    lesion_paste: float | None = None) -> list[dict[str, float]]:
    """Single-process reference loop (the Ray Train job runs the same steps per worker).

    ``dice_weight``: weight of the soft Dice term added to the weighted CE (``CEDiceLoss``; 0 is
    the paper's loss, the job's small preset uses 1). Returns one dict per epoch: epoch,
    train_loss, val_loss (weighted CE alone), val_dice.
    """
    if device is None:
        device = next(model.parameters()).device
    model.to(device)
    x_tr, y_tr = train_xy
    x_va, y_va = val_xy
    shuffle_gen = torch.Generator().manual_seed(int(seed))
    aug_gen = torch.Generator().manual_seed(int(seed) + 1)
    loader = DataLoader(TensorDataset(x_tr, torch.as_tensor(y_tr).long()), batch_size=batch_size,
                        shuffle=True, generator=shuffle_gen, drop_last=len(y_tr) > batch_size)
    loss_fn = make_loss(tumour_weight).to(device)
    train_loss_fn = CEDiceLoss(loss_fn.weight, dice_weight=dice_weight).to(device)
    optimizer = make_unet_optimizer(model, lr=lr)
    history: list[dict[str, float]] = []
    for epoch in range(int(epochs)):
        set_lr(optimizer, epoch_lr(lr, epoch, epochs, schedule))
        train_loss = train_unet_epoch(model, loader, optimizer, train_loss_fn, device=device,
                                      augment=augment, generator=aug_gen, crop=crop,
                                      pet_gamma=pet_gamma, lesion_uptake=lesion_uptake,
                                      lesion_paste=lesion_paste)
        val = evaluate_unet(model, x_va, y_va, loss_fn, batch_size=batch_size, device=device)
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "val_loss": val["loss"],
                   "val_dice": val["dice"]}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, model)
    return history
