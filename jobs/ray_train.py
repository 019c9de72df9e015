"""What every Ray Train job of wsseg shares: resume inside the worker, one checkpoint per epoch, and
the driver side that runs a `TorchTrainer` and keeps the best epoch's network in `<out>/models/`.

Each network job (classifier, U-Net, ...) supplies only its own train loop and save/load functions.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from jobs.common import auto_parallelism, open_run, publish, ray_storage_path

LOG = logging.getLogger("wsseg.ray_train")
STATE_FILE = "train_state.pt"
# Seconds without a reported epoch before a worker warns (config "watchdog_s" overrides).
WATCHDOG_ENV = "WSSEG_TRAIN_WATCHDOG_S"
DEFAULT_WATCHDOG_S = 1800.0
_WATCHDOG: "Watchdog | None" = None


def resume_from_checkpoint(ckpt_file: str, load: Callable[[Path], tuple]) -> tuple[tuple, int, dict] | None:
    """Inside a train loop: the latest checkpoint Ray Train hands this worker, if any.

    Returns (what `load(<checkpoint dir>/ckpt_file)` returns, the epoch to start at, the optimizer
    state), or None on a fresh start. After a worker failure or a resubmitted run, Ray gives the
    last checkpoint it registered (see README, "When things go wrong").
    """
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        loaded = load(Path(d) / ckpt_file)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    start_epoch = int(state["epoch"]) + 1
    if ray.train.get_context().get_world_rank() == 0:
        LOG.info("resuming from checkpoint after epoch %d", start_epoch - 1)
    return loaded, start_epoch, state["optimizer"]


def report_epoch(metrics: dict[str, Any], epoch: int, optimizer, ckpt_file: str,
                 save: Callable[[Path], None]) -> None:
    """Report one epoch's metrics; rank 0 also writes the network (`save(path)`) and the optimizer
    state as the epoch's checkpoint (one copy of the weights; the other ranks report metrics only)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save(Path(d) / ckpt_file)
            torch.save({"epoch": epoch, "optimizer": optimizer.state_dict()}, Path(d) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
    beat_watchdog()


def beat_watchdog() -> None:
    """Tell this worker's watchdog (if started) that an epoch was just reported."""
    if _WATCHDOG is not None:
        _WATCHDOG.beat()


# --------------------------------------------------------------------------------------------------
# Data-parallel helpers: every rank must take part in the same collectives in the same order.


def share_cpus(free: float, workers: int) -> float:
    """CPUs per Train worker when `workers` share `free` CPUs: whole CPUs when there are enough,
    else an equal fraction (a 2-CPU machine still fits 2 workers next to a Tune trial; asking 1 CPU
    each would leave the workers waiting for resources for ever). Torch threads: max(1, int(.))."""
    workers = max(1, int(workers))
    if free >= workers:
        return float(int(free // workers))
    return max(0.01, float(free) / workers)


def world_info() -> tuple[int, int]:
    """(rank, world size) of this Ray Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def prepare_ddp_model(model, *, sync_batchnorm: bool = True):
    """`ray.train.torch.prepare_model`, with BatchNorm turned into SyncBatchNorm first when more than
    one worker trains on GPUs: the batch statistics are then those of the GLOBAL batch, as on one
    worker. PyTorch's SyncBatchNorm runs on GPUs only, so CPU (gloo) workers keep per-worker batch
    statistics (a small deviation from one-worker training, logged once by rank 0)."""
    import ray.train.torch
    import torch

    rank, world = world_info()
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world > 1 and has_bn and sync_batchnorm:
        if ray.train.torch.get_device().type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif rank == 0:
            LOG.info("%d CPU workers: BatchNorm statistics are per worker (SyncBatchNorm needs GPUs)",
                     world)
    return ray.train.torch.prepare_model(model)


def on_rank0(fn: Callable[[], Any]) -> Any:
    """`fn()` computed on rank 0 only and handed to every rank (one broadcast): validation runs once
    and every rank reports the same metrics."""
    import torch.distributed as dist

    rank, world = world_info()
    if world == 1 or not dist.is_initialized():
        return fn()
    box = [fn() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank float over all ranks (e.g. each rank's training loss of its share)."""
    import torch
    import torch.distributed as dist

    _, world = world_info()
    if world == 1 or not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world


class Watchdog:
    """Warns when no epoch has been reported for `seconds`: a deadlocked DDP job (ranks out of step,
    a lost peer) otherwise just sits there silently. The warning names the rank and dumps every
    thread's stack to stderr (which Ray forwards to the driver), showing where the worker waits.
    Warns again every `seconds` while nothing is reported; `beat()` after each report."""

    def __init__(self, seconds: float, label: str = "", log: logging.Logger = LOG,
                 poll_s: float | None = None) -> None:
        self.seconds, self.label, self.log = float(seconds), label, log
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.warnings = 0
        poll = poll_s if poll_s is not None else min(30.0, max(0.05, self.seconds / 4))
        self._thread = threading.Thread(target=self._run, args=(poll,), daemon=True,
                                        name="wsseg-train-watchdog")

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, poll: float) -> None:
        warned_at = None
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle < self.seconds:
                warned_at = None
                continue
            if warned_at is not None and time.monotonic() - warned_at < self.seconds:
                continue
            warned_at = time.monotonic()
            self.warnings += 1
            self.log.warning("%sno epoch reported for %.0f s (limit %.0f s, %s): training is stuck "
                             "or an epoch is far slower than expected; with several workers, check "
                             "that every rank runs the same number of steps (stacks follow)",
                             f"{self.label}: " if self.label else "", idle, self.seconds, WATCHDOG_ENV)
            try:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            except Exception:  # noqa: BLE001 - no usable stderr: the warning alone must do
                pass


def start_watchdog(config: dict[str, Any]) -> Watchdog:
    """Inside a train loop: start this worker's :class:`Watchdog` (seconds from config "watchdog_s",
    else $WSSEG_TRAIN_WATCHDOG_S, else 1800); :func:`report_epoch` beats it."""
    global _WATCHDOG
    seconds = float(config.get("watchdog_s") or os.environ.get(WATCHDOG_ENV) or DEFAULT_WATCHDOG_S)
    if _WATCHDOG is not None:
        _WATCHDOG.stop()
    rank, world = world_info()
    _WATCHDOG = Watchdog(seconds, label=f"train worker rank {rank}/{world}").start()
    return _WATCHDOG


def fit_best(train_loop: Callable[[dict], None], config: dict[str, Any], *, dest: str | Path,
             ckpt_file: str, metric: str, name: str, storage_path: str, mode: str = "max",
             num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float | None = None,
             max_failures: int = 3, callbacks: list | None = None) -> dict[str, Any]:
    """Run `train_loop` on `num_workers` Ray Train workers (DDP) and copy the best epoch's
    `ckpt_file` (by `metric`, `mode` "max" or "min") to the local file `dest` (temp name, then
    rename, so trials writing side by side never see each other's half-copied files).

    Checkpoints and run state go to `storage_path` under `name`: the same name and storage resume an
    interrupted run. `cpus_per_worker` None shares the cluster's CPUs among the workers on CPU
    (torch threads follow it via `config["cpus_per_worker"]`).

    Returns dict(checkpoint (`dest`), ray_checkpoint, history (per-epoch metrics Ray kept, in epoch
    order), best (metrics of the last reported epoch, as Ray's `Result.metrics`)).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if use_gpu else float(auto_parallelism() // num_workers or 1)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**config, "cpus_per_worker": cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker,
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order=mode),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric=metric, mode=mode) or result.checkpoint
    if best is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with best.as_directory() as d:
        shutil.copyfile(Path(d) / ckpt_file, tmp)
    os.replace(tmp, dest)
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    # Ray lists the kept reports in checkpoint-score order; a history reads in epoch order.
    history.sort(key=lambda h: (h.get("epoch", 0), h.get("start_epoch", 0)))
    return {"checkpoint": str(dest), "ray_checkpoint": best.path, "history": history,
            "best": dict(result.metrics or {})}


def fit_and_keep_best(train_loop: Callable[[dict], None], config: dict[str, Any], *, out: str | Path,
                      ckpt_file: str, metric: str, name: str, mode: str = "max",
                      model_file: str | None = None, storage_path: str | None = None,
                      **fit_kwargs: Any) -> dict[str, Any]:
    """:func:`fit_best` into a run folder: the best epoch's network lands in
    `<out>/models/<model_file or ckpt_file>` (uploaded when `out` is a URI), and Ray's checkpoints
    under `--storage-path` (default `<out>/ray`). `fit_kwargs`: num_workers, use_gpu,
    cpus_per_worker, max_failures, callbacks (see :func:`fit_best`).
    """
    layout, remote = open_run(out)
    dest = layout.model(model_file or ckpt_file)
    res = fit_best(train_loop, config, dest=dest, ckpt_file=ckpt_file, metric=metric, name=name,
                   storage_path=ray_storage_path(storage_path, out), mode=mode, **fit_kwargs)
    publish(layout, remote, dest)
    return res
