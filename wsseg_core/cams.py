"""Class activation maps for a batch of slices: CAM, GradCAM, GradCAM++, ScoreCAM (Früh et al. 2021).

The design follows pytorch-grad-cam (one small ``*_weights`` function per method, a shared
:func:`combine`), but :class:`CamEngine` computes every requested map for a whole batch of slices
in one pass:

* one forward of the convolutional part gives ``A`` (B, K, h, w), the last conv ReLU output;
* CAM, GradCAM and GradCAM++ share that forward and ONE backward of the target score summed over
  the batch (each sample's score depends only on its own ``A``, so the summed backward yields the
  per-sample gradients);
* ScoreCAM scores all masked inputs of all slices in large chunks, and scores the blank input that
  every constant (typically dead, all-zero) channel produces only once;
* every forward runs a copy of the network with BatchNorm folded into the convolutions.

The model is duck-typed (see ``wsseg_core.models.SliceClassifier``)::

    model.forward_features(x) -> A (B, K, h, w)       # last conv ReLU output
    model.logits_from_features(A) -> logits (B, 2)    # global average pool + nn.Linear ``fc``
    model(x) == model.logits_from_features(model.forward_features(x))
    model.fc.weight (2, K)                            # only needed for CAM (Eq. 1)
    model.head == "gap"                               # optional; another head makes CAM undefined

Under the GAP + linear head the four maps are not independent.  The target logit is
``sum_k w_k mean(A_k) + b``, so ``dS/dA_k = w_k / (h w)`` everywhere: GradCAM's weights are CAM's
divided by ``h w``, and after min-max normalisation **GradCAM = normalised ReLU(CAM)**; GradCAM++'s
closed form reduces to CAM restricted to the channels with ``w_k > 0``.  The paper's contrast between
GradCAM and CAM therefore cannot appear under this head.  Früh et al.'s public code used VGG16's
fully connected head over the last conv map (``SliceClassifier(head="fc")``); there the gradients
vary over the map and GradCAM, GradCAM++ and ScoreCAM differ, while CAM (Eq. 1) is undefined:
asking for it raises :class:`CamUndefined` (use :func:`available_methods`).

Class index 1 = tumour.  Maps are returned at the feature resolution (h, w) = (S/stride, S/stride) (stride 8, or 4),
min-max normalised to [0, 1] per slice (a constant map becomes all zeros).

Target score (``score=``):

* ``"logit"`` (default): the raw tumour-class logit, as pytorch-grad-cam's
  ``ClassifierOutputTarget(1)``.  The softmax saturates on confidently classified slices - exactly
  the slices that get a CAM in Algorithm 1 - so probability gradients shrink by p(1-p) and lose
  precision, and for ScoreCAM probabilities in [0, 1] make the softmax over channels almost flat.
  The logit has neither problem and matches the reference library.
* ``"prob"``: the softmax probability of the tumour class (what Score-CAM's authors used).
  With two classes, d p1/dA = p1 p0 (w1 - w0)/(hw): the *difference* of the two class weights,
  not w1 as with the logit, so GradCAM maps differ in shape, not just scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsseg_core.methods import CAM_METHODS  # the names, defined once (torch-free)
from wsseg_core.models import fold_batch_norm

__all__ = [
    "CAM_METHODS",
    "SCORES",
    "CamUndefined",
    "available_methods",
    "CamResult",
    "CamEngine",
    "target_score",
    "cam_weights",
    "gradcam_weights",
    "gradcampp_weights",
    "scorecam_weights",
    "combine",
    "normalize_maps",
    "upsample_cam",
]

SCORES: tuple[str, ...] = ("logit", "prob")
_GRADIENT_METHODS = ("GradCAM", "GradCAM++")


class CamUndefined(ValueError):
    """A CAM method that the classifier's architecture does not define (CAM without a GAP head)."""


def cam_undefined_reason(model: nn.Module, method: str) -> str | None:
    """Why ``method`` is undefined for ``model``, or None when it is defined."""
    head = getattr(model, "head", "gap")
    if method == "CAM" and (head != "gap" or getattr(model, "fc", None) is None):
        return (f"CAM (Eq. 1) needs a global-average-pooling head followed by one linear layer; "
                f"this classifier has head {head!r} (GradCAM, GradCAM++ and ScoreCAM work with it)")
    return None


def available_methods(model: nn.Module, methods: Sequence[str] = CAM_METHODS) -> tuple[str, ...]:
    """The methods of ``methods`` that ``model``'s architecture defines (CAM needs the GAP head)."""
    return tuple(m for m in methods if cam_undefined_reason(model, m) is None)


@dataclass
class CamResult:
    """Output of :class:`CamEngine` for a batch of B slices.

    Attributes:
        probs: (B,) float32, softmax probability of the target (tumour) class.
        logits: (B, 2) float32, the classifier's logits.
        maps: method -> (B, h, w) float32 in [0, 1], min-max normalised per slice.
        raw: method -> (B, h, w) float32, the same maps before normalisation (CAM may be negative;
            the others are >= 0 after their ReLU).
    """

    probs: np.ndarray
    logits: np.ndarray
    maps: dict[str, np.ndarray]
    raw: dict[str, np.ndarray] = field(default_factory=dict)


def target_score(logits: torch.Tensor, target_class: int = 1, score: str = "logit") -> torch.Tensor:
    """Per-sample score of the target class.

    Args:
        logits: (B, C) classifier output.
        target_class: class index (1 = tumour).
        score: ``"logit"`` (raw logit) or ``"prob"`` (softmax probability over the C classes).

    Returns:
        (B,) scores.
    """
    if score == "logit":
        return logits[:, target_class]
    if score == "prob":
        return torch.softmax(logits, dim=1)[:, target_class]
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def cam_weights(fc_weight: torch.Tensor, target_class: int, batch_size: int) -> torch.Tensor:
    """CAM weights (Eq. 1): w_k^c = the linear layer's weight of class c for channel k.

    Args:
        fc_weight: (C, K) weight of the ``nn.Linear`` after global average pooling.
        target_class: class c.
        batch_size: B.

    Returns:
        (B, K) weights (the same row for every slice).
    """
    return fc_weight[target_class].detach().unsqueeze(0).expand(batch_size, -1)


def gradcam_weights(grads: torch.Tensor) -> torch.Tensor:
    """GradCAM weights (Eq. 2): delta_k = mean over (h, w) of dS/dA_k.

    Args:
        grads: (B, K, h, w) gradient of the target score with respect to A.

    Returns:
        (B, K) weights.
    """
    return grads.mean(dim=(2, 3))


def gradcampp_weights(
    activations: torch.Tensor, grads: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """GradCAM++ weights (Eq. 4-5) in the common closed form with an exponential score.

    Eq. 5 needs the 2nd and 3rd derivatives of the class output.  Following Chattopadhyay et al.
    (their Eq. 19), pytorch-grad-cam and the Früh public code, the output is taken as
    Y = exp(S) with S the target score.  S is (piecewise) linear in A - here exactly linear, GAP +
    linear layer - so with g = dS/dA: dY/dA = Y g, d2Y/dA2 = Y g^2, d3Y/dA3 = Y g^3, and Eq. 5
    becomes (Y cancels)::

        alpha_hw^k = g^2 / (2 g^2 + sum_ij A_ij^k g^3)      (0 where the denominator is 0)

    Eq. 4 gives the channel weight sum_hw alpha * ReLU(dY/dA) = Y * sum_hw alpha * ReLU(g); the
    per-slice factor Y > 0 is dropped (as pytorch-grad-cam does) since it cancels in the per-slice
    min-max normalisation.

    By default no eps is added to the denominator, so the weights are exact even for tiny gradients.
    pytorch-grad-cam 1.5.7 adds eps = 1e-6; behind a GAP head g = w_k / (h w) is often that small
    (about 1e-3 for the small preset), and then the eps dominates and alpha tends to g^2 / eps: its
    maps become a different weighting (per-slice r 0.88 against ours on a trained small classifier).
    ``eps=1e-6`` reproduces the library.  With ``score="prob"`` the same closed form is applied
    to the probability's gradient (the exponential assumption then holds only approximately, as in
    pytorch-grad-cam with a softmax target).

    Args:
        activations: (B, K, h, w) A.
        grads: (B, K, h, w) g = dS/dA.
        eps: added to the alpha denominator (0 = exact; 1e-6 = pytorch-grad-cam).

    Returns:
        (B, K) weights.
    """
    g2 = grads * grads
    g3 = g2 * grads
    sum_a = activations.sum(dim=(2, 3), keepdim=True)
    denom = 2.0 * g2 + sum_a * g3 + eps
    nonzero = (denom != 0) & (grads != 0)
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)
    return (alpha * grads.clamp_min(0.0)).sum(dim=(2, 3))


def _minmax_masks(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (H, W) map of (N, 1, H, W) to [0, 1]; a constant map becomes 0 (blank input)."""
    lo = maps.amin(dim=(2, 3), keepdim=True)
    rng = maps.amax(dim=(2, 3), keepdim=True) - lo
    ok = rng > 0
    return torch.where(ok, (maps - lo) / torch.where(ok, rng, torch.ones_like(rng)), 0.0)


@torch.inference_mode()
def scorecam_weights(
    model: nn.Module,
    x: torch.Tensor,
    activations: torch.Tensor,
    target_class: int = 1,
    score: str = "logit",
    batch_size: int = 512,
    top_k: int | None = None,
    align_corners: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ScoreCAM weights (Eq. 6, as the paper's text describes it).

    For each slice b and channel k: upsample A_bk bilinearly to the input size, min-max normalise it
    to [0, 1], multiply the input x_b by it, forward, and take the target score s_bk of that masked
    input; alpha_b = softmax over k of s_b.

    Baseline: Score-CAM subtracts the score of a blank input before weighting.  A softmax over
    channels is shift invariant, so subtracting any per-slice baseline changes nothing; no option.

    Exact speed-ups (no approximation):

    * masked inputs are built and scored in chunks of ``batch_size`` across slices AND channels
      (the public libraries loop image by image with chunks of 16-32);
    * a constant channel (typically dead, all zero after the ReLU - very common) has no min-max
      normalisation; it is defined as the all-zero mask, so every such channel of every slice gives
      the same blank input x * 0.  That input is scored once per call and the score reused.

    ``top_k`` (approximate, off by default): keep per slice only the k channels of highest
    activation variance; the others get weight 0 and the softmax runs over the kept ones.

    ``autocast_dtype`` (approximate): run the masked forwards under ``torch.autocast`` in that dtype
    (bfloat16 on a GPU halves their cost on tensor cores); the scores are cast back to float32
    before the softmax.

    Comparison with pytorch-grad-cam 1.5.7 ``ScoreCAM``: same definition (target = raw output of
    the class, softmax over channels), but it upsamples with ``UpsamplingBilinear2d``
    (align_corners=True) and adds 1e-8 to the min-max denominator; ``align_corners=True`` matches it.
    The default, align_corners=False, is torch's/Score-CAM's own bilinear convention.

    Args:
        model: full classifier, ``model(x) -> logits (N, C)``, in eval mode.
        x: (B, C_in, H, W) input slices.
        activations: (B, K, h, w) A of ``x``.
        target_class: class whose score is used.
        score: ``"logit"`` or ``"prob"`` (see :func:`target_score`).
        batch_size: masked inputs per forward.
        top_k: None (exact) or number of channels kept per slice (approximate).
        align_corners: bilinear upsampling convention of the masks.
        autocast_dtype: None (float32 forwards) or the autocast dtype of the masked forwards.

    Returns:
        (B, K) weights, each row summing to 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b, k = activations.shape[:2]
    size = tuple(x.shape[-2:])
    flat = activations.flatten(2)
    varying = flat.amax(dim=2) > flat.amin(dim=2)  # (B, K)
    if top_k is not None and top_k < k:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        idx = flat.var(dim=2, unbiased=False).topk(top_k, dim=1).indices
        kept = torch.zeros_like(varying).scatter_(1, idx, True)
    else:
        kept = torch.ones_like(varying)

    def scores_of(inputs: torch.Tensor) -> torch.Tensor:
        if autocast_dtype is None:
            return target_score(model(inputs), target_class, score).float()
        with torch.autocast(device_type=inputs.device.type, dtype=autocast_dtype):
            out = model(inputs)
        return target_score(out.float(), target_class, score)

    # -inf for excluded channels gives them softmax weight exactly 0.
    scores = torch.full((b, k), float("-inf"), dtype=torch.float32, device=activations.device)
    blank_slots = kept & ~varying
    if bool(blank_slots.any()):
        blank = torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        scores[blank_slots] = scores_of(blank)[0]

    jobs = (kept & varying).nonzero()  # (n, 2) rows (slice, channel)
    for start in range(0, jobs.shape[0], batch_size):
        bi, ki = jobs[start : start + batch_size].unbind(1)
        up = F.interpolate(
            activations[bi, ki].unsqueeze(1), size=size, mode="bilinear", align_corners=align_corners
        )
        scores[bi, ki] = scores_of(x[bi] * _minmax_masks(up))
    return torch.softmax(scores, dim=1)


def combine(weights: torch.Tensor, activations: torch.Tensor, relu: bool) -> torch.Tensor:
    """Weighted sum of activation maps, M_b = sum_k weights_bk A_bk, optionally ReLU'd.

    Args:
        weights: (B, K).
        activations: (B, K, h, w).
        relu: apply max(., 0) (GradCAM, GradCAM++, ScoreCAM; not CAM, Eq. 1).

    Returns:
        (B, h, w) maps.
    """
    cam = torch.einsum("bk,bkhw->bhw", weights.to(activations.dtype), activations)
    return cam.clamp_min(0.0) if relu else cam


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each slice of (B, h, w) to [0, 1]; a constant slice becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1)[:, None, None]
    rng = flat.amax(dim=1)[:, None, None] - lo
    ok = rng > 0
    return torch.where(ok, (maps - lo) / torch.where(ok, rng, torch.ones_like(rng)), 0.0)


def upsample_cam(
    cam: np.ndarray | torch.Tensor, size: int | tuple[int, int]
) -> np.ndarray | torch.Tensor:
    """Bilinear upsampling of low-resolution maps, for display.

    Half-pixel convention (align_corners=False), the same as cv2.resize's INTER_LINEAR used by
    pytorch-grad-cam.  Segmentation (Algorithm 1) uses nearest-neighbour instead, in segment.py.

    Args:
        cam: (B, h, w) maps, numpy or torch.
        size: S or (H, W).

    Returns:
        (B, H, W), float32 numpy if ``cam`` was numpy, else a tensor.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    t = torch.as_tensor(np.asarray(cam, dtype=np.float32)) if isinstance(cam, np.ndarray) else cam
    out = F.interpolate(t.unsqueeze(1).float(), size=hw, mode="bilinear", align_corners=False)[:, 0]
    return out.numpy() if isinstance(cam, np.ndarray) else out


class CamEngine:
    """All requested CAMs of a batch of slices in one pass.

    Args:
        model: classifier with ``forward_features``, ``logits_from_features``, ``fc`` (see module doc).
        target_class: explained class (1 = tumour).
        score: target score of GradCAM, GradCAM++ and ScoreCAM: ``"logit"`` (default, as
            pytorch-grad-cam) or ``"prob"``.  CAM uses ``fc.weight[target_class]`` either way.
        scorecam_batch_size: masked inputs per forward in ScoreCAM (chunks span slices and channels);
            never changes the result. None: 512 on a GPU (large chunks fill it), 32 on CPU, where
            chunks that fit the caches ran fastest (measured, all four maps of 16 slices of the
            small preset on 2 idle cores, channels-last: chunk 512 3.6 s, 128 2.3 s, 32 1.2 s).
        channels_last: run the network in channels-last memory format (NHWC), which oneDNN and
            cuDNN convolve faster; exact up to float rounding. None: on for CPU (measured about 2x
            for ScoreCAM on 2 cores), off on GPU until measured there. Converts ``model`` in place: the
            same weights, another memory layout.
        scorecam_top_k: None (exact, default) or keep only the k highest-variance channels per
            slice in ScoreCAM (approximate, faster).
        device: None = the device of the model's parameters; otherwise the model is moved there.
        scorecam_align_corners: bilinear convention of ScoreCAM's masks (False = torch default;
            True reproduces pytorch-grad-cam's ScoreCAM).
        fold_bn: run a copy of the model with every BatchNorm folded into its conv
            (:func:`wsseg_core.models.fold_batch_norm`): exact up to float rounding, one pass over
            the activations fewer per layer. The copy is rebuilt whenever the model's parameters or
            buffers change (in-place updates bump their version counters), so an engine never
            explains stale weights. Models without BatchNorm run as they are.
        gradcampp_eps: added to GradCAM++'s alpha denominator; 0 (default) is the exact closed
            form, 1e-6 reproduces pytorch-grad-cam (see :func:`gradcampp_weights`).
        scorecam_bf16: run ScoreCAM's masked forwards under bfloat16 autocast (approximate; the
            scores are float32 again before the softmax). None: on for CUDA, where tensor cores
            make it about twice as fast, off on CPU, where only newer cores compute bf16 natively.

    ``engine(x, methods)`` puts the model in eval mode for the call and restores its mode after;
    it never touches parameters' ``.grad`` or ``requires_grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_class: int = 1,
        score: str = "logit",
        scorecam_batch_size: int | None = None,
        scorecam_top_k: int | None = None,
        device: str | torch.device | None = None,
        scorecam_align_corners: bool = False,
        channels_last: bool | None = None,
        fold_bn: bool = True,
        gradcampp_eps: float = 0.0,
        scorecam_bf16: bool | None = None,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if scorecam_batch_size is not None and scorecam_batch_size < 1:
            raise ValueError(f"scorecam_batch_size must be >= 1, got {scorecam_batch_size}")
        if scorecam_top_k is not None and scorecam_top_k < 1:
            raise ValueError(f"scorecam_top_k must be >= 1 or None, got {scorecam_top_k}")
        if not gradcampp_eps >= 0:
            raise ValueError(f"gradcampp_eps must be >= 0, got {gradcampp_eps}")
        self.model = model
        self.target_class = int(target_class)
        self.score = score
        self.scorecam_top_k = scorecam_top_k
        self.scorecam_align_corners = bool(scorecam_align_corners)
        if device is not None:
            self.model.to(device)
        param = next(model.parameters(), None)
        self._dtype = param.dtype if param is not None else torch.float32
        self.device = torch.device(device) if device is not None else (
            param.device if param is not None else torch.device("cpu")
        )
        on_cpu = self.device.type == "cpu"
        self.scorecam_batch_size = int(scorecam_batch_size or (32 if on_cpu else 512))
        self.channels_last = on_cpu if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.fold_bn = bool(fold_bn)
        self.gradcampp_eps = float(gradcampp_eps)
        self.scorecam_bf16 = (not on_cpu) if scorecam_bf16 is None else bool(scorecam_bf16)
        self._net: nn.Module | None = None
        self._net_key: tuple | None = None

    def _weights_key(self) -> tuple | None:
        """Changes whenever a parameter or buffer of the model is replaced or updated in place;
        None (refold every call) for inference tensors, which keep no version counter."""
        tensors = (*self.model.parameters(), *self.model.buffers())
        if any(t.is_inference() for t in tensors):
            return None
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def network(self) -> nn.Module:
        """The network the engine runs: the model itself, or its BatchNorm-folded copy."""
        if not self.fold_bn or not any(isinstance(m, nn.BatchNorm2d) for m in self.model.modules()):
            return self.model
        key = self._weights_key()
        if self._net is None or key is None or key != self._net_key:
            net = fold_batch_norm(self.model)
            if self.channels_last:
                net.to(memory_format=torch.channels_last)
            self._net, self._net_key = net, key
        return self._net

    def __call__(
        self, x: torch.Tensor | np.ndarray, methods: Sequence[str] = CAM_METHODS
    ) -> CamResult:
        """Compute ``methods`` for a batch.

        Args:
            x: (B, 2, S, S) preprocessed slices.
            methods: subset of :data:`CAM_METHODS` (order irrelevant; may be empty for probs only).

        Returns:
            :class:`CamResult` with maps (B, h, w) at the last conv map's resolution, in [0, 1].
        """
        if isinstance(methods, str):
            methods = (methods,)
        methods = tuple(dict.fromkeys(methods))
        unknown = [m for m in methods if m not in CAM_METHODS]
        if unknown:
            raise ValueError(f"unknown CAM method(s) {unknown}; choose from {CAM_METHODS}")
        x = torch.as_tensor(x).to(device=self.device, dtype=self._dtype)
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        if self.channels_last:  # masked ScoreCAM inputs x * mask inherit the layout
            x = x.contiguous(memory_format=torch.channels_last)

        for m in methods:
            reason = cam_undefined_reason(self.model, m)
            if reason is not None:
                raise CamUndefined(reason)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._run(x, methods)
        finally:
            model.train(was_training)

    def _run(self, x: torch.Tensor, methods: tuple[str, ...]) -> CamResult:
        model, c = self.network(), self.target_class
        with torch.no_grad():
            acts = model.forward_features(x)

        grads = None
        if any(m in _GRADIENT_METHODS for m in methods):
            # dS/dA depends only on the head, so differentiate the head at a detached copy of A:
            # one backward through GAP + fc instead of the whole VGG, and parameters' .grad stay
            # untouched.  inference_mode(False) + clone let this work inside a caller's
            # torch.inference_mode() too.
            with torch.inference_mode(False), torch.enable_grad():
                leaf = acts.detach().clone().requires_grad_(True)
                logits = model.logits_from_features(leaf)
                (grads,) = torch.autograd.grad(target_score(logits, c, self.score).sum(), leaf)
            logits = logits.detach()
            acts = leaf.detach()
        else:
            with torch.no_grad():
                logits = model.logits_from_features(acts)

        weights: dict[str, torch.Tensor] = {}
        if "CAM" in methods:
            weights["CAM"] = cam_weights(model.fc.weight, c, acts.shape[0])
        if "GradCAM" in methods:
            weights["GradCAM"] = gradcam_weights(grads)
        if "GradCAM++" in methods:
            weights["GradCAM++"] = gradcampp_weights(acts, grads, self.gradcampp_eps)
        if "ScoreCAM" in methods:
            weights["ScoreCAM"] = scorecam_weights(
                model, x, acts, c, self.score, self.scorecam_batch_size, self.scorecam_top_k,
                self.scorecam_align_corners, torch.bfloat16 if self.scorecam_bf16 else None,
            )

        maps: dict[str, np.ndarray] = {}
        raw: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for m in methods:
                r = combine(weights[m], acts, relu=(m != "CAM"))
                raw[m] = r.float().cpu().numpy()
                maps[m] = normalize_maps(r).float().cpu().numpy()
            probs = torch.softmax(logits.float(), dim=1)[:, c]
        return CamResult(
            probs=probs.cpu().numpy().astype(np.float32),
            logits=logits.float().cpu().numpy(),
            maps=maps,
            raw=raw,
        )
