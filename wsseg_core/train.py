"""Slice sampling, augmentation and the training / evaluation loops for the slice classifier.

Plain PyTorch, one process: ``jobs/train_classifier.py`` wraps these functions in Ray Train (DDP).
Defaults are Früh et al. 2021, Sec. 2.3.3: weighted cross-entropy (tumour weight 7.7), SGD with
momentum 0.9, lr 1e-3, batch 64, augmentation by scaling, rotation, translation and contrast.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wsseg_core.metrics import roc_auc
from wsseg_core.models import SlicePreprocessor, volume_to_batch

# Augmentation ranges (per sample, uniform).
SCALE_RANGE = (0.9, 1.1)          # zoom factor
MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION = 0.10            # fraction of the image side
PET_GAMMA_RANGE = (0.7, 1.4)      # drawn log-uniform, so gamma and 1/gamma are equally likely

# Slices preprocessed per chunk in slices_from_studies: bounds the float64/float32 intermediates.
_CHUNK = 64


def sample_slices(studies: Sequence[Any], negative_keep: float = 1.0,
                  generator: torch.Generator | None = None, chunk: int = _CHUNK
                  ) -> Iterator[tuple[Any, list[np.ndarray], np.ndarray]]:
    """The axial slices a training set takes from labelled studies: the one slice sampler of the
    slice classifier (:func:`slices_from_studies`) and the U-Net (``unet.masks_from_studies``).

    Every slice with a tumour voxel is kept; each tumour-free slice with probability
    `negative_keep` (one ``torch.rand`` draw per slice of the study, from `generator`, so a seed
    fixes the sample). Studies with ``seg is None`` are skipped (no slice labels) and draw nothing.

    Args:
        studies: objects with ``.seg`` (X, Y, Z) (e.g. ``wsseg_core.data.Study``).
        negative_keep: fraction in (0, 1] of tumour-free slices kept.
        generator: CPU torch.Generator for the draws (None: torch's global one).
        chunk: at most this many slice indices per array (bounds the caller's per-batch memory).
    Yields:
        ``(study, [z (k,) int arrays of kept slices, ascending, at most `chunk` each], labels (Z,)
        bool: slice has any tumour voxel)`` per labelled study, in order.
    """
    if not 0.0 < negative_keep <= 1.0:
        raise ValueError(f"negative_keep must be in (0, 1], got {negative_keep!r}")
    for st in studies:
        if getattr(st, "seg", None) is None:
            continue
        seg = np.asarray(st.seg)
        labels = np.asarray(seg.reshape(-1, seg.shape[2]).any(axis=0))
        z_all = np.arange(seg.shape[2])
        if negative_keep < 1.0:
            draw = torch.rand(len(z_all), generator=generator).numpy()
            z_all = z_all[labels | (draw < negative_keep)]
        yield st, [z_all[i:i + chunk] for i in range(0, len(z_all), chunk)], labels


def slices_from_studies(studies: Sequence[Any], pre: SlicePreprocessor, negative_keep: float = 1.0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All axial slices of labelled studies as a classifier training set.

    Args:
        studies: loaded ``wsseg_core.data.Study`` objects (``.suv``, ``.ct``, ``.seg`` (X, Y, Z),
            ``.spacing_mm`` for a "resample_mm" preprocessor); studies with ``seg is None`` are
            skipped (no slice labels).
        pre: preprocessor (sets S and how slices get there).
        negative_keep: fraction in (0, 1] of tumour-free slices kept (random, per slice,
            :func:`sample_slices`); tumour slices are always kept. Cuts memory and epoch time where
            negatives dominate (~86% of slices in the paper's cohort).
        generator: CPU torch.Generator for the negative subsampling (reproducible).
    Returns:
        x: float32 (N, 2, S, S) on CPU; y: int64 (N,), 1 = slice has any tumour voxel.
    """
    s = pre.input_size
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for st, chunks, labels in sample_slices(studies, negative_keep, generator):
        # One geometry per study (its spacing and body centre; "resize" needs neither).
        geo = pre.geometry(st.suv, st.ct, getattr(st, "spacing_mm", None))
        for z in chunks:
            xs.append(volume_to_batch(st.suv, st.ct, z, pre, geometry=geo))
            ys.append(torch.from_numpy(labels[z].astype(np.int64)))
    if not xs:
        return torch.zeros((0, 2, s, s), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys)


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None,
                  fill: Sequence[float] = (0.0, 0.0)) -> torch.Tensor:
    """Random per-sample scale, rotation, translation (one affine warp) and PET contrast.

    Args:
        x: (B, C, S, S) float batch, channel 0 PET in [0, 1] (as SlicePreprocessor makes it).
        generator: CPU torch.Generator; the result is deterministic given its state (parameters are
            drawn on CPU whatever ``x.device`` is).
        fill: per-channel value for pixels warped in from outside the slice. SlicePreprocessor maps
            both "no uptake" (SUV 0) and air (-1000 HU) to 0, which is what lies outside a patient;
            pass other values if the channels are scaled differently.
    Returns:
        new tensor, same shape, dtype and device as ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        return x.clone()
    return augment_with_grid(x, generator, fill)[0]


def augment_with_grid(x: torch.Tensor, generator: torch.Generator | None = None,
                      fill: Sequence[float] = (0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment_batch` that also returns the sampling grid (B, S, S, 2) it used, so a label map can
    be warped with the very same affine (`unet.augment_pair`). Needs B >= 1."""
    b, c = x.shape[:2]
    u = torch.rand((b, 5), generator=generator, dtype=torch.float64)
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[:, 0]
    angle = math.radians(MAX_ROTATION_DEG) * (2 * u[:, 1] - 1)
    # affine_grid works in normalised coordinates spanning 2 units per side.
    tx = 2 * MAX_TRANSLATION * (2 * u[:, 2] - 1)
    ty = 2 * MAX_TRANSLATION * (2 * u[:, 3] - 1)
    lg0, lg1 = math.log(PET_GAMMA_RANGE[0]), math.log(PET_GAMMA_RANGE[1])
    gamma = torch.exp(lg0 + (lg1 - lg0) * u[:, 4])

    # theta maps output to input coordinates: zooming in by `scale` means sampling a 1/scale region.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill_t = torch.zeros(c, dtype=x.dtype, device=x.device)
    fill_t[: min(c, len(fill))] = torch.as_tensor(list(fill)[:c], dtype=x.dtype)
    fill_t = fill_t.view(1, c, 1, 1)
    # grid_sample pads with 0; shifting by the fill value makes the padding equal `fill` per channel.
    out = F.grid_sample(x - fill_t, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) + fill_t
    # Gamma on PET changes lesion-to-background contrast while keeping 0 and 1 fixed (like varying
    # uptake time / reconstruction); CT is in calibrated HU, so it is left alone.
    g = gamma.to(device=x.device, dtype=x.dtype).view(b, 1, 1)
    out[:, 0] = out[:, 0].clamp(0.0, 1.0).pow(g)
    return out, grid


def make_loss(tumour_weight: float = 7.7) -> nn.CrossEntropyLoss:
    """Weighted cross-entropy over (no tumour, tumour) with class weights [1, tumour_weight]."""
    return nn.CrossEntropyLoss(weight=torch.tensor([1.0, float(tumour_weight)]))


OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "onecycle")


def make_optimizer(model: nn.Module, lr: float = 1e-3, momentum: float = 0.9,
                   weight_decay: float = 0.0, kind: str = "sgd") -> torch.optim.Optimizer:
    """The optimizer over all trainable parameters.

    kind "sgd": SGD with momentum (paper: lr 1e-3, momentum 0.9). kind "adamw": AdamW
    (betas 0.9, 0.999; ``momentum`` unused), whose per-parameter step size does not depend on the
    gradient scale, so a randomly initialised BN network and a weighted loss do not need a
    hand-tuned lr (see ``fit_classifier``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, max_lr: float, epochs: int,
                   steps_per_epoch: int, start_epoch: int = 0):
    """Per-step lr schedule, or None for a constant lr.

    kind "onecycle": lr rises from max_lr/25 to max_lr over the first 30% of the steps (a warm-up,
    so the first updates of a random init cannot throw BN statistics and ReLUs into a dead state)
    and anneals (cosine) to max_lr/1e4 by the last step. ``start_epoch`` > 0 resumes it (the
    optimizer's state must already be loaded: it carries the schedule's initial_lr).
    """
    if kind == "constant":
        return None
    if kind != "onecycle":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    total = max(1, int(epochs) * max(1, int(steps_per_epoch)))
    last = int(start_epoch) * max(1, int(steps_per_epoch)) - 1
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total,
                                               last_epoch=last if last >= 0 else -1)


#: Under one-cycle, the share of the run after which the lr has annealed to half its peak
#: (warm-up to 30 % of the steps, then cosine: half the peak at 0.3 + 0.7 / 2 = 65 %).
ONECYCLE_HALF_LR_AT = 0.65


#: When early stopping's patience starts counting (``fit_classifier(patience_start=...)``):
#: "first" from the first epoch (the former behaviour), "half_lr" once the lr has annealed to
#: half its peak (:func:`early_stop_start`).
PATIENCE_STARTS: tuple[str, ...] = ("first", "half_lr")


def early_stop_start(patience_start: str | None, schedule: str, epochs: int) -> int:
    """The first epoch whose validation AUC may count toward early stopping's patience.

    ``patience_start`` "first" (or None): 0, every epoch counts. "half_lr": under a one-cycle
    schedule, the epoch by which the lr has annealed to half its peak (``ceil(0.65 * epochs)``);
    under a constant lr, 0; never past the last epoch. Before that a randomly initialised BN network at a high lr does not
    converge and its validation AUC jumps between epochs (hot15, 4 validation studies: 0.88, 0.61,
    0.88, 0.86, 0.87, 0.83, 0.87 over epochs 0-6), so "no better AUC for ``patience`` epochs"
    there is noise, not a plateau: a patience of 6 stopped such runs at epoch 7-14, before the
    anneal that gives most of the AUC, and a lucky early epoch won the checkpoint (hot15: epoch 0
    or 1 kept, test AUC 0.68-0.69; docs/EXPERIMENTS.md, "classifier recipe"). So those epochs neither count,
    nor set the best, nor can be kept (``jobs.train_classifier``'s ``val_auc_eligible``).
    """
    if patience_start in (None, "first"):
        return 0
    if patience_start != "half_lr":
        raise ValueError(f"patience_start must be one of {PATIENCE_STARTS}, got {patience_start!r}")
    if schedule == "onecycle":
        # at most the last epoch, so a short run (--epochs 1-2) still has one to keep
        return min(int(math.ceil(ONECYCLE_HALF_LR_AT * int(epochs))), max(0, int(epochs) - 1))
    if schedule == "constant":
        return 0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class EarlyStopping:
    """Stop when validation AUC has not improved for ``patience`` epochs (None: never stop).

    A NaN AUC (a validation set without both classes, or none) is no evidence either way: it
    neither improves nor counts toward the patience, so training without validation runs every epoch.
    ``start``: updates before the ``start``-th (0-based) are ignored: they neither set the best
    AUC nor count toward the patience (:func:`early_stop_start`: not while a one-cycle lr is still
    high; the caller keeps no checkpoint from them either, see ``jobs.train_classifier``).
    """

    def __init__(self, patience: int | None, start: int = 0) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience!r}")
        if int(start) < 0:
            raise ValueError(f"start must be >= 0, got {start!r}")
        self.patience = patience
        self.start = int(start)
        self.best = -math.inf
        self.since = 0
        self.seen = 0

    @property
    def stopped(self) -> bool:
        """True once `patience` epochs in a row brought no better AUC."""
        return self.patience is not None and self.since >= self.patience

    def update(self, auc: float) -> bool:
        """Record one epoch's AUC; True when training should stop now."""
        counts = self.seen >= self.start
        self.seen += 1
        if auc != auc or not counts:
            return False
        if auc > self.best:
            self.best, self.since = float(auc), 0
        else:
            self.since += 1
        return self.stopped

    def state(self) -> dict[str, float]:
        """What a checkpoint carries, so a resumed run counts on where it was (:meth:`restore`)."""
        return {"best": self.best, "since": self.since, "seen": self.seen}

    def restore(self, state: dict[str, float] | None) -> None:
        """Continue from :meth:`state` (None: a checkpoint written without one; start afresh).
        A state from before ``seen`` was recorded counts as past ``start`` (it counted every epoch)."""
        if state:
            self.best, self.since = float(state["best"]), int(state["since"])
            self.seen = int(state.get("seen", max(self.start, self.seen)))


class WeightEMA:
    """An exponential moving average of a network's weights, updated after every optimizer step:
    ``avg <- decay * avg + (1 - decay) * live`` for every parameter and every floating-point buffer
    (BatchNorm running mean / var, so the averaged weights are evaluated with statistics averaged the
    same way, as timm's ModelEmaV2 and ``AveragedModel(use_buffers=True)`` do); integer buffers
    (``num_batches_tracked``) are copied. ``module`` is the averaged network: a copy of the live one
    at construction (so the average starts at the initial weights), in eval mode, without gradients.

    Why (issue 16): with 9-18 training patients the live network's validation AUC moves by a few
    hundredths from one epoch to the next even in the one-cycle anneal, and on variants the kept
    network generalised worse than it trained (torso30: train 0.966, validation 0.868). The average
    of the recent iterates lies nearer the centre of the region SGD explores, which usually
    generalises better than any one iterate (Polyak averaging; Izmailov et al. 2018, SWA), at the
    cost of one multiply-add over the weights per step. It changes nothing in the live training.

    A DDP-wrapped network (``.module``) is averaged through its module.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(getattr(model, "module", model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average toward ``model``'s current weights and buffers."""
        live = getattr(model, "module", model).state_dict()
        for name, avg in self.module.state_dict().items():
            cur = live[name].detach().to(avg.device)
            if avg.dtype.is_floating_point:
                avg.mul_(self.decay).add_(cur.to(avg.dtype), alpha=1.0 - self.decay)
            else:
                avg.copy_(cur)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries to resume the average (:meth:`load_state_dict`)."""
        return {"decay": self.decay, "updates": self.updates,
                "module": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))


def ema_decay(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay of a :class:`WeightEMA` whose time constant is ``ema_epochs`` epochs of
    ``steps_per_epoch`` optimizer steps: ``exp(-1 / (ema_epochs * steps_per_epoch))``, so the steps
    of the last ``ema_epochs`` epochs carry 1 - 1/e (63 %) of the average whatever the cohort's
    size (a per-step decay such as 0.999 would average over 1 epoch of a large cohort and 50 of a
    small one)."""
    if not float(ema_epochs) > 0:
        raise ValueError(f"ema_epochs must be > 0, got {ema_epochs!r}")
    return math.exp(-1.0 / (float(ema_epochs) * max(1, int(steps_per_epoch))))


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, device: str | torch.device = "cpu", augment: bool = True,
                    generator: torch.Generator | None = None, scheduler=None,
                    ema: WeightEMA | None = None) -> float:
    """One pass over ``loader`` (batches ``(x (B,2,S,S), y (B,))``); returns the sample-weighted
    mean training loss (NaN for an empty loader). ``scheduler`` (per-step) is stepped after each
    optimizer step, and ``ema`` (a :class:`WeightEMA`) updated."""
    model.train()
    loss_fn = loss_fn.to(device)
    total, n = 0.0, 0
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True).long()
        if augment:
            xb = augment_batch(xb, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        total += float(loss.detach()) * len(yb)
        n += len(yb)
    return total / n if n else float("nan")


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int,
            device: str | torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                out.append(model(x[start:start + batch_size].to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Tumour probability softmax(logits)[:, 1] for x (N, 2, S, S) -> float32 (N,), eval mode,
    no autograd; the model's train/eval mode is restored afterwards."""
    return torch.softmax(_logits(model, x, batch_size, device), dim=1)[:, 1].numpy().astype(np.float32)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
             batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, float]:
    """Loss, ROC AUC and accuracy (argmax) of ``model`` on (x (N,2,S,S), y (N,)).

    Returns dict(loss, auc, accuracy, n, n_pos); the loss is ``loss_fn`` over the whole set at
    once (for weighted CE, the weighted mean over all samples, not a mean of batch means).
    """
    logits = _logits(model, x, batch_size, device)
    y = torch.as_tensor(y).long().cpu()
    n = int(len(y))
    if n == 0:
        return dict(loss=float("nan"), auc=float("nan"), accuracy=float("nan"), n=0, n_pos=0)
    loss_fn = loss_fn.to(device)
    with torch.no_grad():
        loss = float(loss_fn(logits.to(device), y.to(device)))
    prob = torch.softmax(logits, dim=1)[:, 1].numpy()
    acc = float((logits.argmax(dim=1) == y).float().mean())
    return dict(loss=loss, auc=roc_auc(prob, y.numpy()), accuracy=acc, n=n, n_pos=int(y.sum()))


def fit_classifier(model: nn.Module, train_xy: tuple[torch.Tensor, torch.Tensor],
                   val_xy: tuple[torch.Tensor, torch.Tensor], epochs: int, batch_size: int = 64,
                   lr: float = 1e-3, momentum: float = 0.9, tumour_weight: float = 7.7,
                   seed: int = 0,
                   on_epoch: Callable[[int, dict[str, float], nn.Module], None] | None = None,
                   *, device: str | torch.device | None = None, augment: bool = True,
                   weight_decay: float = 0.0, optimizer: str = "sgd", schedule: str = "constant",
                   patience: int | None = None,
                   patience_start: str | None = "first",
                   ema_epochs: float | None = None) -> list[dict[str, float]]:
    """Train for ``epochs`` and validate after each; the single-process reference loop.

    ``optimizer`` / ``schedule``: see ``make_optimizer`` / ``make_scheduler`` (``lr`` is the peak lr
    of a one-cycle schedule). ``patience``: stop early after that many epochs without a better
    validation AUC (the caller keeps the best epoch's weights through ``on_epoch``);
    ``patience_start``: from which epoch the patience counts (``early_stop_start``).
    ``ema_epochs``: when set, a :class:`WeightEMA` of the weights with that time constant in epochs
    (:func:`ema_decay`) is what is validated each epoch and handed to ``on_epoch`` (so the caller
    keeps the averaged network); the live network trains exactly as without it.

    Shuffling and augmentation draw from generators seeded by ``seed`` (the weight init is the
    caller's: seed torch before building the model). ``device`` defaults to the model's device.
    ``on_epoch(epoch, metrics, model)`` runs after each epoch (e.g. report / checkpoint).

    Returns:
        one dict per epoch: epoch, train_loss, val_loss, val_auc, val_accuracy.
    """
    if device is None:
        device = next(model.parameters()).device
    model.to(device)
    x_tr, y_tr = train_xy
    x_va, y_va = val_xy
    shuffle_gen = torch.Generator().manual_seed(int(seed))
    aug_gen = torch.Generator().manual_seed(int(seed) + 1)
    loader = DataLoader(TensorDataset(x_tr, torch.as_tensor(y_tr).long()), batch_size=batch_size,
                        shuffle=True, generator=shuffle_gen,
                        # a last batch of 1-2 slices gives a noisy step; drop it when possible
                        drop_last=len(y_tr) > batch_size)
    loss_fn = make_loss(tumour_weight).to(device)
    opt = make_optimizer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, kind=optimizer)
    sched = make_scheduler(opt, schedule, lr, epochs, len(loader))
    stopper = EarlyStopping(patience, start=early_stop_start(patience_start, schedule, epochs))
    ema = WeightEMA(model, ema_decay(ema_epochs, len(loader))) if ema_epochs else None
    validated = ema.module if ema is not None else model
    history: list[dict[str, float]] = []
    for epoch in range(int(epochs)):
        train_loss = train_one_epoch(model, loader, opt, loss_fn, device=device,
                                     augment=augment, generator=aug_gen, scheduler=sched, ema=ema)
        val = evaluate(validated, x_va, y_va, loss_fn, batch_size=max(256, batch_size), device=device)
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "val_loss": val["loss"],
                   "val_auc": val["auc"], "val_accuracy": val["accuracy"]}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, validated)
        if stopper.update(val["auc"]):
            break
    return history


# --------------------------------------------------------------------------------------------------
# Data-parallel training (DDP): one global batch, split across the workers


def rank_share(n: int, rank: int, world: int) -> slice:
    """The contiguous part of ``n`` items that worker ``rank`` of ``world`` takes: sizes differ by at
    most one, the first ``n % world`` ranks take one more (as ``numpy.array_split``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class GlobalBatchSampler:
    """Each worker's index batches of one shared, seeded order over the WHOLE training set.

    Every rank builds the same permutation of ``range(n)`` (seeded by ``seed`` and the epoch, so a
    resumed run sees the epoch's order it would have seen uninterrupted), cuts it into global batches
    of ``global_batch`` items, and yields its own :func:`rank_share` of each. Hence:

    * the global batch is ``global_batch`` whatever the number of workers (a preset's batch size
      means the same thing on 1 or 8 GPUs), and every sample is seen once per epoch by one rank;
    * every rank runs exactly ``len(self)`` steps per epoch. DDP needs that: a rank that runs out
      of batches first waits in ``ray.train.report`` while the others wait in a DDP collective, and
      nothing ever times out (issue 17).

    Like ``DataLoader(drop_last=True)`` the incomplete last global batch is dropped when there is
    more than one batch; a set no larger than ``global_batch`` is one global batch of all ``n``.

    Use as ``DataLoader(ds, batch_sampler=sampler)``; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        check_global_batch(global_batch, world)
        if n < world:
            raise ValueError(f"{n} training samples cannot feed {world} workers (each needs at least one)")
        self.n, self.global_batch, self.rank, self.world = int(n), int(global_batch), int(rank), int(world)
        self.seed, self.shuffle, self.epoch = int(seed), bool(shuffle), 0
        rank_share(1, self.rank, self.world)  # validates rank

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (the same on every rank)."""
        self.epoch = int(epoch)

    def global_order(self) -> list[int]:
        """This epoch's order of all ``n`` indices (identical on every rank)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (indices over the whole set), before the split into ranks."""
        order = self.global_order()
        if self.n <= self.global_batch:
            return [order]
        steps = self.n // self.global_batch
        return [order[i * self.global_batch:(i + 1) * self.global_batch] for i in range(steps)]

    def __iter__(self):
        for b in self.global_batches():
            yield b[rank_share(len(b), self.rank, self.world)]

    def __len__(self) -> int:
        """Steps per epoch (equal on every rank)."""
        return 1 if self.n <= self.global_batch else self.n // self.global_batch


def check_global_batch(global_batch: int, world: int) -> None:
    """Refuse a global batch that cannot give every one of ``world`` workers at least one sample."""
    if int(world) < 1:
        raise ValueError(f"need at least one worker, got {world}")
    if int(global_batch) < int(world):
        raise ValueError(f"batch size {global_batch} is the GLOBAL batch, split across the workers; "
                         f"it must be at least the number of workers ({world}): raise --batch-size "
                         f"or lower --num-workers")


class GlobalMeanCrossEntropy(nn.Module):
    """Weighted cross-entropy whose gradient, averaged by DDP over ``world`` ranks, is the gradient of
    the weighted mean over the GLOBAL batch.

    ``nn.CrossEntropyLoss(weight=w)`` divides by the sum of the weights of the LOCAL batch; DDP then
    averages ranks, which weights a rank with few tumour slices like one with many. Here each rank
    returns ``world * sum_i w_i l_i / sum_global w_i`` (the weight sum all-reduced over ranks, no
    gradient through it), so the DDP mean equals the single-process loss of the whole global batch.
    With ``world == 1`` (or no process group) it is exactly ``nn.CrossEntropyLoss(weight=w)``.
    Train-time only: every rank must call it the same number of times (it is a collective).
    """

    def __init__(self, weight: torch.Tensor | None = None, world: int = 1) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float())
        self.world = int(world)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = F.cross_entropy(logits, target, weight=self.weight, reduction="none")
        den = (self.weight[target] if self.weight is not None else torch.ones_like(per)).sum().detach()
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            den = den.clone()
            torch.distributed.all_reduce(den)
            return per.sum() * self.world / den
        return per.sum() / den
