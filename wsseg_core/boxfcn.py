"""Box-supervised 3-D FCN (Afshari et al. 2019, ``BoxFCN``): weak labels, network, training, inference.

Weak labels: one axis-aligned 3-D bounding box per connected lesion of SEG
(``data.find_lesions``, 26-connected, inclusive bounds), optionally loosened by a margin given in mm
(converted per axis with the voxel spacing, rounded up) or in voxels; the label volume is the union
of the boxes, clipped to the grid (:func:`box_labels`).

Network (paper Sec. 3.4): a 3-D U-Net with a quarter of the usual feature maps - U-Net's 64..1024
channels / 4, i.e. ``base`` 16 at 4 levels (16, 32, 64, 128; bottleneck 256) - SELU after every conv
(no batch norm: SELU is self-normalising; LeCun-normal init), a 1x1x1 conv and a sigmoid giving the
foreground probability per voxel. Input: the PET (SUV) volume only, z-scored per volume (zero mean,
unit variance over all its voxels); the paper segments "only from PET", so there is no CT channel.

Training (Sec. 4.1, 4.3): SGD (momentum 0.9, weight decay 1e-6, lr 1e-5), batch 1, at most 100
epochs, early stopping after 20 epochs without a better validation loss, augmentation by random
left-right and superior-inferior flips and additive Gaussian noise (the paper gives no sigma: we
use 0.1 z-score units), the weights warm-started from the same network trained with the plain box
Dice. Loss: ``wsseg_core.losses.boxfcn_loss``.

Input size (Sec. 3.4: "the size of the input image, the output segmentation mask, and the ground
truth mask is set to 160x160x128"; Sec. 4.1: the head-and-neck volumes were cut below the neck "such
that we could process the entire volumes"). A whole-body autoPET volume (400x400x326 at
2.04x2.04x3 mm) is far larger, so the ``paper`` preset trains on a 160x160x128 crop per step
(:func:`body_crop`; ``PAPER_CROP``): in-plane centred on the body (the centroid of the PET/CT body
mask, CT > -500 HU and SUV > 0.1), shifted as little as needed to hold the lesion boxes; axially a
random window that holds every lesion box when they fit in 128 slices together, else one random
lesion's box. Image, box label and reference are cut with the same window; a volume smaller than
the crop is padded at the far end (image with its minimum, labels with 0). Every crop holds a box,
so the Dice terms always have a gradient (unlike random patches, below). Inference (and the
validation loss) is one fully convolutional pass over the whole volume (:func:`predict_volume`):
the network has no fully connected layer, so any size divisible by ``2**levels`` goes; the cost is
memory (docs/EXPERIMENTS.md, "BoxFCN memory"; ``bench/bench_boxfcn_memory.py``).

CPU preset ("small") deviations, each because the paper's value cannot train on 2 cores in minutes:
``base`` 4 at 3 levels (4..16, bottleneck 32; 88 k parameters); Adam lr 1e-3 for the box-Dice warm
start from random init (SGD at 1e-5 does not move a random-init net in minutes), its output bias
starting at the box prior (:func:`init_head_to_prior`), and SGD (momentum
0.9, wd 1e-6) at lr 1e-4 instead of 1e-5 for the fine-tuning phases; a few epochs with patience 3.
No crop: it trains on the whole (phantom) volume, padded to a multiple of 8, batch 1 (~4 s a step
for 128x128x96 on one core; phantoms are smaller than 160x160x128 anyway).
Patches (``patch=``, random crops, half centred on a lesion box) are supported, but measured on the
phantoms they train worse: a crop without a box has a constant Dice loss (no gradient), so
physiological uptake is rarely penalised, and with Adam 3e-3 on 64x64x32 patches the warm start
collapsed to an all-background prediction within 4 epochs (validation Dice 0.07 -> 0.00). Inference always runs on the whole volume (fully convolutional, padded
to a multiple of 2**levels).

Post-processing (the paper's "+M": "dilation and erosion ... separating boundaries of touching lesions
and removing small sized false positive predictions"): a binary opening (erosion then dilation,
6-connected, ``opening_vox`` iterations) and removal of 26-connected components below
``min_volume_ml`` (:func:`postprocess`).

Pure PyTorch / numpy / scipy; ``jobs/train_boxfcn.py`` wraps the loop in Ray Train and Tune.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsseg_core.checkpoint import load_checkpoint, save_checkpoint
from wsseg_core.losses import boxfcn_loss

LOG = logging.getLogger(__name__)

#: Afshari et al. Sec. 3.4: input, output and ground-truth size (voxels, X Y Z).
PAPER_CROP = (160, 160, 128)

BOXFCN_PRESETS: dict[str, dict[str, Any]] = {
    # Afshari et al.: U-Net's feature maps / 4 (base 16, 4 levels), 160x160x128 inputs (a body-centred
    # crop holding the lesion boxes, see body_crop), batch 1; inference on the whole volume.
    "paper": dict(base=16, levels=4, patch=None, crop=PAPER_CROP, batch_size=1),
    # CPU preset: base 4, 3 levels, whole volumes (no crop), batch 1 (see the module docstring).
    "small": dict(base=4, levels=3, patch=None, crop=None, batch_size=1),
}
CHECKPOINT_FORMAT = "wsseg.BoxFCN3D"
CHECKPOINT_VERSION = 1

# Afshari et al. Sec. 4.3.
PAPER_LR = 1e-5
PAPER_MOMENTUM = 0.9
PAPER_WEIGHT_DECAY = 1e-6
PAPER_MAX_EPOCHS = 100
PAPER_PATIENCE = 20
NOISE_STD = 0.1  # z-score units; the paper says "additional Gaussian noise" without a sigma

#: Default post-processing: one opening iteration, components below 0.1 ml removed.
DEFAULT_POSTPROCESS: dict[str, float] = {"opening_vox": 1, "min_volume_ml": 0.1}


# --------------------------------------------------------------------------------------------------
# Weak labels and input
# --------------------------------------------------------------------------------------------------

def box_labels(seg: np.ndarray, spacing_mm: Sequence[float] | None = None, margin_mm: float = 0.0,
               margin_vox: int = 0) -> np.ndarray:
    """The box weak label of a SEG volume: union of one bounding box per connected lesion.

    Args:
        seg: (X, Y, Z) reference mask (``> 0`` is tumour).
        spacing_mm: (3,) voxel size in mm; needed when ``margin_mm > 0``.
        margin_mm: loosen each box by this many mm on every side (per axis ``ceil(margin_mm /
            spacing)`` voxels), as an annotator's coarse box would.
        margin_vox: loosen each box by this many further voxels on every side.
    Returns:
        uint8 (X, Y, Z) {0, 1}; boxes are clipped to the grid; all zero for a lesion-free SEG.
    """
    seg = np.asarray(seg)
    out = np.zeros(seg.shape, dtype=np.uint8)
    for lo, hi in lesion_boxes(seg, spacing_mm, margin_mm, margin_vox):
        out[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 1
    return out


def lesion_boxes(seg: np.ndarray, spacing_mm: Sequence[float] | None = None, margin_mm: float = 0.0,
                 margin_vox: int = 0) -> np.ndarray:
    """(n, 2, 3) int64 inclusive (lo, hi) voxel bounds of the boxes :func:`box_labels` draws, one
    per 26-connected lesion, loosened by the margins and clipped to the grid."""
    from wsseg_core.data import find_lesions

    seg = np.asarray(seg)
    if margin_mm < 0 or margin_vox < 0:
        raise ValueError(f"margins must be >= 0, got {margin_mm!r} mm and {margin_vox!r} voxels")
    pad = np.full(3, int(margin_vox), dtype=np.int64)
    if margin_mm > 0:
        if spacing_mm is None:
            raise ValueError("margin_mm needs spacing_mm")
        sp = np.asarray(spacing_mm, dtype=float).ravel()
        pad = pad + np.ceil(margin_mm / sp - 1e-9).astype(np.int64)
    hi_lim = np.asarray(seg.shape) - 1
    lesions = find_lesions(seg)
    out = np.zeros((len(lesions), 2, 3), np.int64)
    for k, les in enumerate(lesions):
        out[k] = (np.maximum(les.bbox_min - pad, 0), np.minimum(les.bbox_max + pad, hi_lim))
    return out


def zscore(volume: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over all voxels (float32); a constant volume becomes all zeros."""
    v = np.asarray(volume, dtype=np.float64)
    mu, sd = float(v.mean()), float(v.std())
    return ((v - mu) / (sd if sd > 0 else 1.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------

class DoubleConv3d(nn.Sequential):
    """(conv3x3x3, padding 1 -> SELU) x 2; keeps the spatial size."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv3d(c_in, c_out, 3, padding=1), nn.SELU(inplace=True),
                         nn.Conv3d(c_out, c_out, 3, padding=1), nn.SELU(inplace=True))


class BoxFCN3D(nn.Module):
    """3-D U-Net (``levels`` encoder levels, bottleneck, decoder with skips), SELU, sigmoid output.

    Args:
        base: channels of the first level (paper 16 = U-Net's 64 / 4); level i has ``base * 2**i``,
            the bottleneck ``base * 2**levels``.
        levels: encoder/decoder levels (paper 4); inputs must be divisible by ``2**levels``.
        in_channels: 1 (z-scored PET).
    Forward: x (B, 1, X, Y, Z) -> foreground probability (B, 1, X, Y, Z) in (0, 1).
    """

    def __init__(self, base: int = 16, levels: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        if int(base) != base or base < 1 or int(levels) != levels or levels < 1:
            raise ValueError(f"base and levels must be positive integers, got {base!r}, {levels!r}")
        self.base, self.levels, self.in_channels = int(base), int(levels), int(in_channels)
        chans = [self.base * 2 ** i for i in range(self.levels)]
        self.down = nn.ModuleList()
        c_in = self.in_channels
        for c in chans:
            self.down.append(DoubleConv3d(c_in, c))
            c_in = c
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = DoubleConv3d(c_in, self.base * 2 ** self.levels)
        c_in = self.base * 2 ** self.levels
        self.upconv, self.up = nn.ModuleList(), nn.ModuleList()
        for c in reversed(chans):
            self.upconv.append(nn.ConvTranspose3d(c_in, c, kernel_size=2, stride=2))
            self.up.append(DoubleConv3d(2 * c, c))
            c_in = c
        self.head = nn.Conv3d(c_in, 1, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LeCun-normal (std 1/sqrt(fan_in)), the initialisation SELU's self-normalisation assumes.
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    @property
    def multiple(self) -> int:
        return 2 ** self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.multiple for s in x.shape[-3:]):
            raise ValueError(f"BoxFCN input sizes must be divisible by {self.multiple}, got "
                             f"{tuple(x.shape)}")
        skips = []
        for enc in self.down:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upconv, dec, skip in zip(self.upconv, self.up, reversed(skips)):
            x = dec(torch.cat([upconv(x), skip], dim=1))
        return torch.sigmoid(self.head(x))

    def extra_repr(self) -> str:
        return f"base={self.base}, levels={self.levels}, in_channels={self.in_channels}"


def init_head_to_prior(model: BoxFCN3D, foreground_fraction: float) -> float:
    """Set the output bias so that an untrained network predicts ``foreground_fraction`` everywhere
    (bias = logit(fraction), Lin et al. 2017's prior initialisation); returns the bias.

    Why: from a zero bias the first prediction is p = 0.5 over the whole volume, so the Dice loss's
    denominator is ~N/2 voxels against a few hundred box voxels and its gradient pushes every voxel
    down at once; a large first step drives the logits so far negative that the sigmoid saturates
    and the loss sits at 1.0 with no gradient (the small preset's warm start on coarse30,
    docs/EXPERIMENTS.md). Starting at the box prior, foreground and background terms are balanced.
    """
    frac = float(foreground_fraction)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"foreground_fraction must lie in (0, 1), got {foreground_fraction!r}")
    bias = math.log(frac / (1.0 - frac))
    with torch.no_grad():
        model.head.bias.fill_(bias)
    return bias


#: A box-Dice epoch with a mean training loss above this predicted background inside every box:
#: soft Dice < 1e-4, where an untrained network at the box prior already scores about the prior
#: (~0.002 on the phantoms, loss ~0.998). The sigmoid is then saturated and the loss has no
#: gradient left to climb back with (:func:`box_dice_collapsed`).
COLLAPSED_BOX_DICE_LOSS = 0.9999


def box_dice_collapsed(train_loss: float) -> bool:
    """Whether a box-Dice epoch's mean training loss (Eq. 2, in [0, 1]) says the network collapsed
    to all background (> :data:`COLLAPSED_BOX_DICE_LOSS`); a NaN loss counts as collapsed."""
    loss = float(train_loss)
    return not loss <= COLLAPSED_BOX_DICE_LOSS


def build_boxfcn(preset: str = "paper", base: int | None = None, levels: int | None = None) -> BoxFCN3D:
    """The network of a ``BOXFCN_PRESETS`` entry (base/levels overridable), in train mode on CPU."""
    if preset not in BOXFCN_PRESETS:
        raise ValueError(f"unknown BoxFCN preset {preset!r}; choose one of {sorted(BOXFCN_PRESETS)}")
    cfg = BOXFCN_PRESETS[preset]
    return BoxFCN3D(base=int(base or cfg["base"]), levels=int(levels or cfg["levels"]))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def save_boxfcn(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any] | None = None) -> None:
    """Write {format, version, state_dict, config, meta} atomically (temp + ``os.replace``).

    ``model`` may be DDP-wrapped; ``meta`` must be JSON-able (loads with ``weights_only=True``).
    """
    bare = getattr(model, "module", model)
    if not isinstance(bare, BoxFCN3D):
        raise TypeError(f"expected a BoxFCN3D, got {type(bare).__name__}")
    save_checkpoint(path, bare, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                    config={"base": bare.base, "levels": bare.levels, "in_channels": bare.in_channels},
                    meta=meta)


def load_boxfcn(path: str | os.PathLike) -> tuple[BoxFCN3D, dict]:
    """Load a ``save_boxfcn`` file -> (model in eval mode on CPU, meta). ValueError names the path."""
    model, ckpt = load_checkpoint(
        path, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, what="BoxFCN",
        build=lambda cfg: BoxFCN3D(base=int(cfg["base"]), levels=int(cfg["levels"]),
                                   in_channels=int(cfg.get("in_channels", 1))))
    return model, dict(ckpt.get("meta") or {})


# --------------------------------------------------------------------------------------------------
# Inference and post-processing
# --------------------------------------------------------------------------------------------------

def predict_volume(model: BoxFCN3D, suv: np.ndarray, normalised: bool = False) -> np.ndarray:
    """Foreground probability (X, Y, Z) float32 of a whole SUV volume, in one forward pass.

    The volume is z-scored (unless ``normalised``: already z-scored), padded at the far end of each
    axis to a multiple of ``2**levels`` with its minimum (background), run under ``inference_mode``
    in eval mode (the model's mode is restored) and cropped back.
    """
    suv = np.asarray(suv, dtype=np.float32)
    if suv.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) SUV volume, got shape {suv.shape}")
    bare = getattr(model, "module", model)
    k = bare.multiple
    x = suv if normalised else zscore(suv)
    fill = float(x.min())
    pads = [(-s) % k for s in suv.shape]
    t = torch.from_numpy(x)[None, None]
    if any(pads):
        t = F.pad(t, (0, pads[2], 0, pads[1], 0, pads[0]), value=fill)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            p = model(t.to(device))[0, 0].float().cpu().numpy()
    finally:
        model.train(was)
    return np.ascontiguousarray(p[:suv.shape[0], :suv.shape[1], :suv.shape[2]])


def postprocess(mask: np.ndarray, spacing_mm: Sequence[float], opening_vox: int = 1,
                min_volume_ml: float = 0.1) -> np.ndarray:
    """The paper's morphological post-processing: opening, then small-component removal.

    Args:
        mask: (X, Y, Z) prediction (``> 0`` foreground).
        spacing_mm: (3,) voxel size in mm (for the component volume).
        opening_vox: iterations of the 6-connected erosion, then as many dilations (0: none);
            splits lesions touching by thin bridges and removes specks thinner than the element.
        min_volume_ml: 26-connected components smaller than this (ml) are removed (0: none).
    Returns:
        uint8 (X, Y, Z) {0, 1}.
    """
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if opening_vox > 0:
        m = ndimage.binary_opening(m, iterations=int(opening_vox))
    if min_volume_ml > 0 and m.any():
        vox_ml = float(np.prod(np.asarray(spacing_mm, dtype=float))) / 1000.0
        lab, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * vox_ml
        keep = sizes >= min_volume_ml
        keep[0] = False
        m = keep[lab]
    return m.astype(np.uint8)


def segment_volume_boxfcn(model: BoxFCN3D, suv: np.ndarray, spacing_mm: Sequence[float],
                          threshold: float = 0.5,
                          post: Mapping[str, float] | None = None) -> np.ndarray:
    """uint8 mask of ``predict_volume > threshold``, post-processed when ``post`` is given
    (the :func:`postprocess` keyword arguments)."""
    mask = (predict_volume(model, suv) > threshold).astype(np.uint8)
    if post:
        mask = postprocess(mask, spacing_mm, **dict(post))
    return mask


def load_segmenter(path: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
                   device: str = "cpu", batch_size: int = 32) -> Callable[[Any], np.ndarray]:
    """A scorer's view of a saved BoxFCN: ``study -> uint8 mask`` on the SUV grid.

    ``params`` (the BoxFCN entry of thresholds.json) may hold ``threshold`` (probability, default
    0.5) and ``postprocess``: a dict of :func:`postprocess` arguments, ``true`` for the defaults, or
    ``false``. Without it, the checkpoint's ``meta["postprocess"]`` decides; by default the method
    is the paper's full one, L_MDice + L_MS + M (post-processed). ``batch_size`` is unused (whole
    volumes).
    """
    model, meta = load_boxfcn(path)
    model.to(device).eval()
    params = dict(params or {})
    threshold = float(params.get("threshold", 0.5))
    post = params.get("postprocess", meta.get("postprocess", True))
    if post is True:
        post = dict(DEFAULT_POSTPROCESS)
    elif not post:
        post = None

    def segment(study: Any) -> np.ndarray:
        return segment_volume_boxfcn(model, study.suv, study.spacing_mm, threshold, post)

    return segment


# --------------------------------------------------------------------------------------------------
# Training data, augmentation, loops
# --------------------------------------------------------------------------------------------------

@dataclass
class BoxVolume:
    """One training/validation volume: z-scored PET, box label, reference (for Dice only), boxes."""

    x: np.ndarray  # (X, Y, Z) float32 z-scored SUV
    box: np.ndarray  # (X, Y, Z) uint8 weak label
    seg: np.ndarray | None  # (X, Y, Z) uint8 reference, never used by the loss
    centres: np.ndarray  # (n, 3) int64 box centres (voxels), for patch sampling
    spacing_mm: np.ndarray
    patient_id: str = ""
    boxes: np.ndarray | None = None  # (n, 2, 3) int64 inclusive (lo, hi) voxel bounds of the boxes
    body_centre: np.ndarray | None = None  # (3,) float64 centroid (voxels) of the body mask


def body_centroid(suv: np.ndarray, ct: np.ndarray | None = None) -> np.ndarray:
    """Centroid (3,) in voxels of the body: ``SUV > BODY_SUV_FLOOR`` and, with CT, ``CT > BODY_CT_HU``.

    Both, because each alone takes in something else: CT the scanner table (SUV ~0 there), PET the
    reconstruction noise in air (-1000 HU there). The volume's centre when nothing is body.
    """
    from wsseg_core.segment import BODY_CT_HU, BODY_SUV_FLOOR

    body = np.asarray(suv) > BODY_SUV_FLOOR
    if ct is not None:
        body &= np.asarray(ct) > BODY_CT_HU
    if not body.any():
        return (np.asarray(body.shape, dtype=float) - 1) / 2
    # Per-axis projections: the same mean as over the voxel list, without materialising it.
    return np.array([np.average(np.arange(n), weights=body.sum(axis=tuple(a for a in range(3) if a != ax)))
                     for ax, n in enumerate(body.shape)])


def box_volumes(studies: Sequence[Any], margin_mm: float = 0.0, margin_vox: int = 0) -> list[BoxVolume]:
    """``Study`` objects -> BoxVolumes (studies without SEG are skipped)."""
    from wsseg_core.data import find_lesions

    out = []
    for st in studies:
        if getattr(st, "seg", None) is None:
            continue
        seg = (np.asarray(st.seg) > 0).astype(np.uint8)
        lesions = find_lesions(seg)
        centres = (np.array([(l.bbox_min + l.bbox_max) // 2 for l in lesions], dtype=np.int64)
                   if lesions else np.zeros((0, 3), np.int64))
        box = box_labels(seg, st.spacing_mm, margin_mm, margin_vox)
        # The crop keeps whole boxes: each lesion's box as box_labels draws it (margins, clipping).
        boxes = lesion_boxes(seg, st.spacing_mm, margin_mm, margin_vox)
        out.append(BoxVolume(zscore(st.suv), box, seg, centres, np.asarray(st.spacing_mm, float),
                             getattr(getattr(st, "ref", None), "patient_id", ""), boxes,
                             body_centroid(st.suv, getattr(st, "ct", None))))
    return out


def crop_start(shape: Sequence[int], size: Sequence[int], centre: Sequence[float],
               boxes: np.ndarray | None = None, rng: np.random.Generator | None = None,
               random_axes: Sequence[int] = (2,)) -> np.ndarray:
    """First voxel (3,) of a ``size`` window: centred on ``centre``, moved as little as needed to hold
    ``boxes`` ((n, 2, 3) inclusive bounds), inside the grid.

    The boxes held: all of them when their union fits in ``size``, else one (drawn with ``rng``, or
    the largest without). On the ``random_axes`` (default: z) the start is drawn uniformly from all
    starts that hold those boxes when ``rng`` is given (a different axial context each epoch).
    An axis shorter than the window starts at 0 (the caller pads); a box longer than the window
    gets a window centred on it.
    """
    shape, size = np.asarray(shape, np.int64), np.asarray(size, np.int64)
    lo = np.rint(np.asarray(centre, float) - size / 2).astype(np.int64)
    keep = None
    if boxes is not None and len(boxes):
        boxes = np.asarray(boxes, np.int64)
        u_lo, u_hi = boxes[:, 0].min(0), boxes[:, 1].max(0)
        if np.all(u_hi - u_lo + 1 <= size):
            keep = (u_lo, u_hi)
        else:
            k = (int(rng.integers(len(boxes))) if rng is not None
                 else int(np.argmax(np.prod(boxes[:, 1] - boxes[:, 0] + 1, axis=1))))
            keep = (boxes[k, 0], boxes[k, 1])
    out = np.zeros(3, np.int64)
    for a in range(3):
        last = int(shape[a] - size[a])  # the largest start inside the grid
        if last <= 0:
            continue
        first_ok, last_ok = 0, last
        if keep is not None:
            b_lo, b_hi = int(keep[0][a]), int(keep[1][a])
            if b_hi - b_lo + 1 <= size[a]:
                first_ok, last_ok = max(0, b_hi - int(size[a]) + 1), min(last, b_lo)
            else:  # the box does not fit: centre on it
                first_ok = last_ok = int(np.clip((b_lo + b_hi) // 2 - size[a] // 2, 0, last))
        if rng is not None and a in random_axes:
            out[a] = int(rng.integers(first_ok, last_ok + 1))
        else:
            out[a] = int(np.clip(lo[a], first_ok, last_ok))
    return out


def body_crop(vol: BoxVolume, size: Sequence[int], rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The paper preset's training input: a ``size`` window of (x, box, seg) from :func:`crop_start`
    (in-plane on the body centroid, holding the lesion boxes; z drawn with ``rng``), the same window
    for all three, padded at the far end where the volume is smaller (x with its minimum, labels 0).

    Returns (x, box, seg or None, start (3,) voxel index of the window in the volume).
    """
    size = np.asarray(size, np.int64)
    centre = vol.body_centre if vol.body_centre is not None else (np.asarray(vol.x.shape) - 1) / 2
    start = crop_start(vol.x.shape, size, centre, vol.boxes, rng)
    sl = tuple(slice(int(a), int(a + z)) for a, z in zip(start, size))
    pad = [(0, int(z - min(z, n - a))) for a, z, n in zip(start, size, vol.x.shape)]
    x = np.pad(vol.x[sl], pad, constant_values=float(vol.x.min()))
    b = np.pad(vol.box[sl], pad)
    seg = None if vol.seg is None else np.pad(vol.seg[sl], pad)
    return x, b, seg, start


def sample_patch(vol: BoxVolume, size: Sequence[int], rng: np.random.Generator,
                 p_lesion: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A (size) crop of (x, box): centred on a random lesion box (jittered by up to a quarter of the
    patch) with probability ``p_lesion``, elsewhere uniformly. A volume smaller than the patch is
    padded with its minimum (x) and 0 (box)."""
    shape = np.asarray(vol.x.shape)
    size = np.asarray(size, dtype=np.int64)
    if len(vol.centres) and rng.random() < p_lesion:
        c = vol.centres[rng.integers(len(vol.centres))] + rng.integers(-(size // 4), size // 4 + 1)
        lo = c - size // 2
    else:
        lo = np.array([rng.integers(0, max(1, s - z + 1)) for s, z in zip(shape, size)])
    lo = np.clip(lo, 0, np.maximum(shape - size, 0))
    sl = tuple(slice(a, a + z) for a, z in zip(lo, size))
    x, b = vol.x[sl], vol.box[sl]
    if x.shape != tuple(size):
        pad = [(0, int(z - s)) for s, z in zip(x.shape, size)]
        x = np.pad(x, pad, constant_values=float(vol.x.min()))
        b = np.pad(b, pad)
    return x, b


def augment(x: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None,
            noise_std: float = NOISE_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's augmentation on (B, 1, X, Y, Z) image and box: random left-right (X) and
    superior-inferior (Z) flips, the same for both, and additive N(0, noise_std^2) noise on x."""
    x, b = x.clone(), b.clone()
    flips = torch.rand((x.shape[0], 2), generator=generator) < 0.5
    for i in range(x.shape[0]):
        dims = [d for d, f in zip((-3, -1), flips[i].tolist()) if f]
        if dims:
            x[i] = torch.flip(x[i], dims)
            b[i] = torch.flip(b[i], dims)
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return x, b


def make_optimizer(model: nn.Module, optimizer: str = "sgd", lr: float = PAPER_LR,
                   momentum: float = PAPER_MOMENTUM,
                   weight_decay: float = PAPER_WEIGHT_DECAY) -> torch.optim.Optimizer:
    """SGD (paper: lr 1e-5, momentum 0.9, weight decay 1e-6) or Adam (the CPU preset's warm start)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")


def train_epoch(model: nn.Module, volumes: Sequence[BoxVolume], optimizer: torch.optim.Optimizer,
                loss_kw: Mapping[str, Any], *, patch: Sequence[int] | None, batch_size: int,
                steps: int, rng: np.random.Generator, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu", augment_data: bool = True,
                pick_rng: np.random.Generator | None = None, rank: int = 0, world: int = 1,
                crop: Sequence[int] | None = None) -> float:
    """``steps`` optimiser steps on random patches (or whole volumes when ``patch`` is None, then
    batch 1; or, with ``crop``, one :func:`body_crop` of that size per volume, batch 1, the paper
    preset) -> mean training loss. ``loss_kw`` are :func:`losses.boxfcn_loss` keywords (kind, beta,
    lam, alpha, omega1, omega2, ...); the Mumford-Shah image is the (augmented) network input.

    Data-parallel (DDP, ``world`` > 1): give every rank the same ``volumes`` and a ``pick_rng``
    seeded alike on every rank. Each step then draws ONE global batch (``batch_size`` patches, or
    ``world`` whole volumes, one per rank) from ``pick_rng`` and this rank trains on its share
    (``train.rank_share``); ``rng`` (patch positions) and ``generator`` (augmentation) stay per rank.
    """
    from wsseg_core.train import check_global_batch, rank_share

    model.train()
    if not volumes:
        return float("nan")
    draw = pick_rng if pick_rng is not None else rng
    n_global = batch_size if patch else 1
    if world > 1:
        n_global = batch_size if patch else world
        check_global_batch(n_global, world)
    total = 0.0
    for _ in range(int(steps)):
        globl = [int(draw.integers(len(volumes))) for _ in range(n_global)]
        picks = [volumes[j] for j in globl[rank_share(n_global, rank, world)]]
        if patch:
            xs, bs = zip(*(sample_patch(v, patch, rng) for v in picks))
        elif crop:
            cx, cb, _, _ = body_crop(picks[0], crop, rng)  # one window for image and box
            xs, bs = [cx], [cb]
        else:
            xs, bs = [picks[0].x], [picks[0].box]
        x = torch.from_numpy(np.stack(xs))[:, None].float()
        b = torch.from_numpy(np.stack(bs))[:, None].float()
        if not patch:  # whole volume or crop: pad to the network's multiple (as predict_volume does)
            k = getattr(model, "module", model).multiple
            pads = [(-s) % k for s in x.shape[-3:]]
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), value=float(x.min()))
            b = F.pad(b, (0, pads[2], 0, pads[1], 0, pads[0]))
        if augment_data:
            x, b = augment(x, b, generator)
        x, b = x.to(device), b.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = boxfcn_loss(model(x), x, b, **dict(loss_kw))
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / int(steps) if steps else float("nan")


def evaluate(model: BoxFCN3D, volumes: Sequence[BoxVolume], loss_kw: Mapping[str, Any],
             post: Mapping[str, float] | None = None) -> dict[str, float]:
    """Whole-volume validation: the training loss against the boxes (what early stopping watches;
    it needs no delineation) and the Dice of the thresholded (0.5) prediction against SEG.

    Returns dict(loss (mean over volumes), dice (mean over volumes with tumour; NaN if none),
    dice_median (their median, as ``jobs.train_boxfcn.select_variant`` ranks variants; NaN if none), n).
    """
    from wsseg_core.metrics import dice as dice_fn

    losses, dices = [], []
    for v in volumes:
        bare = getattr(model, "module", model)
        prob = predict_volume(bare, v.x, normalised=True)
        p = torch.from_numpy(prob)[None, None]
        losses.append(float(boxfcn_loss(p, torch.from_numpy(v.x)[None, None],
                                         torch.from_numpy(v.box)[None, None].float(), **dict(loss_kw))))
        mask = (prob > 0.5).astype(np.uint8)
        if post:
            mask = postprocess(mask, v.spacing_mm, **dict(post))
        if v.seg is not None and v.seg.any():
            dices.append(dice_fn(mask, v.seg))
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "dice": float(np.mean(dices)) if dices else float("nan"),
            "dice_median": float(np.median(dices)) if dices else float("nan"), "n": len(volumes)}


def fit_boxfcn_volumes(model: BoxFCN3D, train: Sequence[BoxVolume], val: Sequence[BoxVolume],
                       loss_kw: Mapping[str, Any], *, epochs: int = PAPER_MAX_EPOCHS,
                       patience: int = PAPER_PATIENCE, steps_per_epoch: int = 10,
                       patch: Sequence[int] | None = None, batch_size: int = 1,
                       optimizer: str = "sgd", lr: float = PAPER_LR, seed: int = 0,
                       crop: Sequence[int] | None = None,
                       on_epoch: Callable[[int, dict, nn.Module], None] | None = None
                       ) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Single-process reference loop (the Ray Train job runs the same steps per worker).

    Trains until ``epochs`` or ``patience`` epochs without a lower validation loss (early stopping).
    Returns (history: one dict per epoch with epoch, train_loss, val_loss, val_dice; the state_dict
    of the best-validation-loss epoch).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, optimizer, lr)
    history: list[dict[str, float]] = []
    best, best_state, bad = math.inf, {k: v.clone() for k, v in model.state_dict().items()}, 0
    for epoch in range(int(epochs)):
        tl = train_epoch(model, train, opt, loss_kw, patch=patch, batch_size=batch_size,
                         steps=steps_per_epoch, rng=rng, generator=gen, crop=crop)
        ev = evaluate(model, val, loss_kw)
        rec = {"epoch": epoch, "train_loss": tl, "val_loss": ev["loss"], "val_dice": ev["dice"]}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec, model)
        if ev["loss"] < best:
            best, bad = ev["loss"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    return history, best_state
