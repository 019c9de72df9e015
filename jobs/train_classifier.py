"""Ray Train: fit the VGG16 slice classifier (Früh et al.) with DDP, checkpoints and resume.

    python -m jobs.train_classifier --cohort runs/demo/cohort.parquet --out runs/demo
    ray job submit --working-dir . -- python -m jobs.train_classifier --cohort ... --use-gpu --num-workers 4

With N workers the batch size stays the GLOBAL batch (the preset's 64 is 16 slices per worker at
N = 4): each step every worker takes its share of one global batch drawn from a shared seeded
order, so all workers run the same number of steps and the result does not depend on N (issue 17).

Resume after a failure: run the same command again (same --out / --storage-path / --name); each
worker picks up the latest checkpoint (Ray Train V2 semantics). Within one run, a worker that dies
(up to --max-failures times) makes Ray Train restart the worker group, which resumes from the
latest checkpoint as well: each reported epoch carries `start_epoch`, the epoch that attempt began at.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from jobs.common import (PIPELINE_PRESETS, add_common_args, init_ray, labelled, resolve_cohort,
                         setup_logging)
from jobs.ray_train import (fit_and_keep_best, load_readable, maybe_die, mean_over_ranks, on_rank0,
                            prepare_ddp_model, report_epoch, resume_from_checkpoint,
                            resumed_extra_state, start_watchdog, world_info)
from wsseg_core.models import MAP_STRIDES, PRESETS as MODEL_PRESETS, default_atrous

LOG = logging.getLogger("wsseg.train_classifier")
CKPT_FILE = "classifier.pt"
#: The keeping metric when the run has a patience_start: its validation AUC from that epoch on,
#: NaN before (so no network of the high-lr epochs is kept; wsseg_core.train.early_stop_start).
ELIGIBLE_METRIC = "val_auc_eligible"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: builds the training slices, trains on its share of each GLOBAL batch
    (`config["batch_size"]` split across the workers), reports and checkpoints per epoch."""
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from wsseg_core.data import StudyRef
    from wsseg_core.models import build_slice_classifier, load_classifier, save_classifier
    from wsseg_core.train import (EarlyStopping, GlobalBatchSampler, GlobalMeanCrossEntropy,
                                  early_stop_start, evaluate, make_loss, make_optimizer, make_scheduler,
                                  slices_from_studies, train_one_epoch)

    rank, world = world_info()
    start_watchdog(config)
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    # Same seed on every rank: DDP broadcasts rank 0's weights anyway, and the negative-slice
    # subsampling below must pick the same training set on every rank (one shared order).
    torch.manual_seed(config["seed"])
    data_gen = torch.Generator().manual_seed(config["seed"] * 1000)
    aug_gen = torch.Generator().manual_seed(config["seed"] * 1000 + 1 + rank)

    train_refs = [StudyRef(**r) for r in config["train_refs"]]
    val_refs = [StudyRef(**r) for r in config["val_refs"]]
    model, pre = build_slice_classifier(config["model_preset"], width=config.get("width"),
                                        input_size=config.get("input_size"),
                                        weights=config.get("weights"), head=config.get("head", "gap"),
                                        pixel_mm=config.get("pixel_mm"),
                                        map_stride=config.get("map_stride"),
                                        atrous=config.get("atrous"))
    if rank == 0:
        LOG.info("slice preprocessing: %s", pre.describe())
    # Every rank holds the whole training set and takes its share of each global batch from one
    # shared seeded order, so all ranks run the same number of steps (issue 17).
    x_tr, y_tr = slices_from_studies(load_readable(train_refs), pre,
                                     negative_keep=config["negative_keep"], generator=data_gen)
    # Validation runs on rank 0 only (see on_rank0 below).
    x_va, y_va = slices_from_studies(load_readable(val_refs), pre) if rank == 0 else (None, None)
    sampler = GlobalBatchSampler(len(y_tr), config["batch_size"], rank, world, seed=config["seed"],
                                 shuffle=config.get("shuffle", True))

    start_epoch, optimizer_state = 0, None
    resumed = resume_from_checkpoint(CKPT_FILE, load_classifier)
    if resumed is not None:
        (model, pre, _), start_epoch, optimizer_state = resumed

    model = prepare_ddp_model(model)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(model, lr=config["lr"], momentum=config["momentum"],
                               weight_decay=config.get("weight_decay", 0.0),
                               kind=config.get("optimizer", "sgd"))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn = make_loss(config["tumour_weight"]).to(device)
    # The gradient of the weighted mean over the GLOBAL batch, whatever its split into ranks.
    train_loss_fn = GlobalMeanCrossEntropy(loss_fn.weight, world).to(device)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_sampler=sampler)
    scheduler = make_scheduler(optimizer, config.get("schedule", "constant"), config["lr"],
                               config["epochs"], len(sampler), start_epoch=start_epoch)
    # Validation metrics come from rank 0 (on_rank0), so every rank stops at the same epoch. The
    # stopper's counts travel in the checkpoint: a rerun of a run that stopped early stops again
    # at once instead of training `patience` more epochs.
    # patience_start also says from which epoch a network may be kept: the epochs before it
    # report val_auc_eligible NaN, which never beats a finite value (fit's `metric`).
    first_eligible = early_stop_start(config.get("patience_start"), config.get("schedule", "constant"),
                                      config["epochs"])
    stopper = EarlyStopping(config.get("patience"), start=first_eligible)
    if resumed is not None:
        stopper.restore(resumed_extra_state().get("early_stopping"))
        if stopper.stopped:
            if rank == 0:
                LOG.info("run had stopped early after epoch %d: nothing to train", start_epoch)
            return

    bare = model.module if hasattr(model, "module") else model
    for epoch in range(start_epoch, config["epochs"]):
        sampler.set_epoch(epoch)
        # Seeded per epoch (not once per run), so a run resumed from epoch k's checkpoint draws
        # the same augmentations as the uninterrupted run.
        aug_gen.manual_seed(config["seed"] * 1000 + 1 + rank + 7919 * (epoch + 1))
        t0 = time.perf_counter()
        train_loss = mean_over_ranks(train_one_epoch(model, loader, optimizer, train_loss_fn,
                                                     device=device, augment=config["augment"],
                                                     generator=aug_gen, scheduler=scheduler))
        train_s = time.perf_counter() - t0
        maybe_die(config, epoch, rank)
        val = on_rank0(lambda: evaluate(bare, x_va, y_va, loss_fn, device=device))
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "val_loss": float(val["loss"]),
                   "val_auc": float(val["auc"]), "val_accuracy": float(val["accuracy"]),
                   "start_epoch": start_epoch, "workers": world, "steps": len(sampler),
                   # rank 0's wall time of the epoch's training steps (bench/bench_ddp.py)
                   "train_s": on_rank0(lambda: train_s)}
        if config.get("patience_start"):
            metrics[ELIGIBLE_METRIC] = float(val["auc"]) if epoch >= first_eligible else float("nan")
        if rank == 0:
            LOG.info("epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.3f", epoch + 1,
                     config["epochs"], train_loss, val["loss"], val["auc"])
        stop = stopper.update(float(val["auc"]))
        report_epoch(metrics, epoch, optimizer, CKPT_FILE,
                     lambda path: save_classifier(path, bare, pre, meta=metrics),
                     extra_state={"early_stopping": stopper.state()})
        if stop:
            if rank == 0:
                LOG.info("early stop after epoch %d: no better validation AUC for %d epochs "
                         "(best %.3f)", epoch + 1, stopper.patience, stopper.best)
            break


def weights_arg(value: str) -> str | None:
    """`--weights` as the library takes it: "random" (or "none") -> None, "imagenet", or a path."""
    return None if value.lower() in ("random", "none") else value


WEIGHTS_HELP = ("'imagenet' (default: ImageNet VGG16 via torchvision; the paper preset stops with a "
                "message saying how to supply them when they cannot be fetched; the width-reduced small "
                "preset has no pretrained weights and starts from random), 'random' (or 'none'), or a "
                "local torchvision VGG16 state_dict file (e.g. vgg16-397923af.pth)")
HEAD_CHOICES = ("gap", "fc")
HEAD_HELP = ("classifier head: 'gap' (default; global average pooling + one linear layer, the "
             "architecture classic CAM needs; under it GradCAM = ReLU(CAM)) or 'fc' (VGG16's fully "
             "connected head over the last conv map, as in Früh et al.'s public code; CAM rows are "
             "then 'skipped')")


def resolve_weights(weights: str | None, model_preset: str, width: float | None = None) -> str | None:
    """What the workers build the classifier from, checked in the driver before any worker starts.

    "imagenet" at a width-reduced preset -> None (logged: ImageNet weights need width 1.0);
    "imagenet" at full width -> fetched now (raises PretrainedWeightsUnavailable, whose message says
    how to supply a local file or choose random init); a file -> must exist.
    """
    from wsseg_core.models import PRESETS, require_imagenet_weights

    if weights is None:
        return None
    full_width = (width or PRESETS[model_preset]["width"]) == 1.0
    if weights == "imagenet":
        if not full_width:
            LOG.info("width-reduced preset %r: random initialisation (ImageNet weights need width "
                     "1.0)", model_preset)
            return None
        require_imagenet_weights()
        return weights
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: weights file not found (--weights takes 'imagenet', "
                                f"'random' or a torchvision VGG16 state_dict file)")
    return str(Path(weights).absolute())


def fit(train_refs: list, val_refs: list, out: str | Path, *, model_preset: str = "small",
        epochs: int = 8, batch_size: int = 64, lr: float = 1e-3, momentum: float = 0.9,
        tumour_weight: float = 7.7, negative_keep: float = 1.0, augment: bool = True,
        weights: str | None = "imagenet", width: float | None = None,
        input_size: int | None = None, num_workers: int = 1, use_gpu: bool = False,
        cpus_per_worker: float | None = None,
        storage_path: str | None = None, name: str = "classifier", max_failures: int = 3,
        seed: int = 0, callbacks: list | None = None,
        optimizer: str = "sgd", schedule: str = "constant", patience: int | None = None,
        patience_start: str | None = None, weight_decay: float = 0.0, head: str = "gap", pixel_mm: float | None = None,
        map_stride: int | None = None, atrous: bool | None = None,
        test_hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the classifier with Ray Train; copy the best checkpoint (by validation AUC) into the run.

    `batch_size` is the GLOBAL batch (slices per optimiser step), split across the `num_workers`
    DDP workers: the learning dynamics do not change with the number of workers (the learning rate is
    not scaled). It must be at least `num_workers`. Every worker holds the whole training set.
    `optimizer` / `schedule`: wsseg_core.train.make_optimizer / make_scheduler (`lr` is the peak of
    a one-cycle schedule); `patience`: early stop after that many epochs without a better
    validation AUC (None: run every epoch); `patience_start`: from which epoch it counts
    (wsseg_core.train.early_stop_start; None: "first", every epoch); with it set, only networks
    from that epoch on can be kept (metric `val_auc_eligible`). `head`: "gap" (GAP + linear, CAM's architecture) or
    "fc" (VGG16's fully connected head, as in Früh et al.'s code; no CAM), see wsseg_core.models.
    `pixel_mm`: slices resampled in-plane to that many mm a pixel and padded / cropped to the input
    size (None: the model preset's, paper 2 mm, small resize; 0: resize); the checkpoint records it.
    `map_stride`: 8 (the paper's last map, input/8) or 4 (CAMs twice as fine per side; None: the
    model preset's, small 4, paper 8); the checkpoint records it, and tuning and scoring follow the checkpoint.
    `atrous`: at stride 4, dilate the convs after the removed pool (None: True at stride 4; see
    wsseg_core.models.SliceClassifier).

    Returns the checkpoint path in the run folder and the per-epoch history. `test_hooks` is for
    tests only (`fail_after_epoch`, `fail_marker`: see `jobs.ray_train.maybe_die`; `shuffle` False keeps the
    slice order; `watchdog_s`: see `jobs.ray_train.start_watchdog`).
    """
    from wsseg_core.train import check_global_batch

    check_global_batch(batch_size, num_workers)
    if pixel_mm is not None and not pixel_mm >= 0:  # here, not in every worker
        raise ValueError(f"--pixel-mm must be >= 0 (0: resize), got {pixel_mm!r}")

    weights = resolve_weights(weights, model_preset, width)
    config = dict(train_refs=[r.to_dict() for r in train_refs], val_refs=[r.to_dict() for r in val_refs],
                  model_preset=model_preset, epochs=epochs, batch_size=batch_size, lr=lr,
                  momentum=momentum, tumour_weight=tumour_weight, negative_keep=negative_keep,
                  augment=augment, weights=weights, width=width, input_size=input_size, seed=seed,
                  optimizer=optimizer, schedule=schedule, patience=patience,
                  weight_decay=weight_decay, head=head,
                  # only when set: a run stored before the option keeps its fingerprint
                  **({"pixel_mm": float(pixel_mm)} if pixel_mm is not None else {}),
                  **({"patience_start": str(patience_start)} if patience_start is not None else {}),
                  **({"map_stride": int(map_stride)} if map_stride is not None else {}),
                  **({"atrous": bool(atrous)} if atrous is not None else {}),
                  **(test_hooks or {}))
    return fit_and_keep_best(train_loop_per_worker, config, out=out, ckpt_file=CKPT_FILE,
                             metric=ELIGIBLE_METRIC if patience_start is not None else "val_auc", name=name, num_workers=num_workers, use_gpu=use_gpu,
                             cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                             max_failures=max_failures, callbacks=callbacks)


def classifier_recipe(preset: dict[str, Any], optimizer: str | None = None,
                      head: str = "gap", map_stride: int | None = None,
                      atrous: bool | None = None) -> dict[str, Any]:
    """The preset's optimizer, schedule, early-stopping patience (and from which epoch it counts),
    weight decay and input size,
    the classifier head and the CAM map stride, as `fit` keywords; `optimizer` overrides the
    preset's (with SGD the schedule is constant, as in the paper). `map_stride` overrides the
    preset's (the job preset's, else its model preset's: small 4, paper unset = 8); at stride 4 the recipe also says whether the convs after the removed pool are
    dilated (`atrous`, default True), so a changed stride or dilation is a changed fit config and
    retrains. Neither key is written when neither the preset nor the caller sets a stride: a run
    stored before the options keeps its fingerprint."""
    stride = map_stride if map_stride is not None else preset.get(
        "map_stride", MODEL_PRESETS.get(preset.get("model_preset"), {}).get("map_stride"))
    stride_keys: dict[str, Any] = {} if stride is None else {"map_stride": int(stride)}
    if stride is not None and int(stride) == 4:
        stride_keys["atrous"] = default_atrous(stride) if atrous is None else bool(atrous)
    elif atrous:
        raise ValueError(f"atrous needs map stride 4, got {stride or 8}")
    opt = optimizer or preset.get("optimizer", "sgd")
    # patience_start only when the preset sets one: a run stored before the option keeps its
    # fingerprint, and one of the small preset's runs trained before it ("first") retrains.
    start_keys = {"patience_start": preset["patience_start"]} if preset.get("patience_start") else {}
    return dict(optimizer=opt,
                schedule=preset.get("schedule", "constant") if opt == preset.get("optimizer", "sgd") else "constant",
                patience=preset.get("patience"), weight_decay=preset.get("weight_decay", 0.0),
                input_size=preset.get("input_size"), head=head, **start_keys, **stride_keys)


PIXEL_MM_HELP = ("in-plane pixel size in mm: each slice is resampled to it (bilinear, with the study's "
                 "voxel spacing) and padded / cropped to the input size around the body, as Früh et "
                 "al. (2 mm, 256x256); 0 resizes each slice to the input instead. Default: the "
                 "preset's (paper 2, small 0: resize, for CPU minutes). The checkpoint records it "
                 "and tuning and scoring apply the same.")


MAP_STRIDE_HELP = ("the classifier's last feature map is input/STRIDE per side: 8 is Früh et al.'s (32x32 "
                   "CAMs at 256x256), 4 also drops the pool before the "
                   "last VGG block (CAMs twice as fine) and dilates the last block so its receptive field stays "
                   "that of stride 8. Default: the preset's (small 4: 16x16 CAMs; paper 8: 32x32). "
                   "The checkpoint records it; tuning and scoring follow it.")
NO_ATROUS_HELP = ("at map stride 4, drop the pool without dilating the last block's convs (by default "
                  "they are dilated by 2, keeping the receptive field of stride 8; the plain variant "
                  "measured worse: README, 'CAM resolution')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch, split across --num-workers (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="default: the preset's")
    p.add_argument("--tumour-weight", type=float, default=7.7, help="weighted cross-entropy w (paper: 7.7)")
    p.add_argument("--head", choices=HEAD_CHOICES, default="gap", help=HEAD_HELP)
    p.add_argument("--pixel-mm", type=float, default=None, help=PIXEL_MM_HELP)
    p.add_argument("--map-stride", type=int, choices=MAP_STRIDES, default=None, help=MAP_STRIDE_HELP)
    p.add_argument("--no-atrous", dest="atrous", action="store_false", default=None, help=NO_ATROUS_HELP)
    p.add_argument("--weights", default="imagenet", help=WEIGHTS_HELP)
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the batch is the global batch, split across them")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--storage-path", default=None, help="Ray Train storage (shared on a cluster); default <out>/ray")
    p.add_argument("--max-failures", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    preset = PIPELINE_PRESETS[args.preset]
    refs = resolve_cohort(args.cohort, seed=args.seed)
    train = labelled(refs, "train")
    val = labelled(refs, "val")
    init_ray(args.address)
    res = fit(train, val, args.out, model_preset=preset["model_preset"],
              epochs=args.epochs or preset["epochs"], batch_size=args.batch_size or preset["batch_size"],
              lr=args.lr or preset["lr"], tumour_weight=args.tumour_weight, negative_keep=preset["negative_keep"],
              **classifier_recipe(preset, optimizer=args.optimizer, head=args.head, map_stride=args.map_stride,
                                  atrous=args.atrous),
              weights=weights_arg(args.weights), num_workers=args.num_workers,
              use_gpu=args.use_gpu, storage_path=args.storage_path, max_failures=args.max_failures,
              seed=args.seed, pixel_mm=args.pixel_mm)
    print(f"classifier checkpoint: {res['checkpoint']}  (val AUC {res['best'].get('val_auc', float('nan')):.3f})")
    return res


if __name__ == "__main__":
    main()
