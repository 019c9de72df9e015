"""What every Ray Train job of wsseg shares: resume inside the worker, one checkpoint per epoch, and
the driver side that runs a `TorchTrainer` and keeps the best epoch's network in `<out>/models/`.

Each network job (classifier, U-Net, ...) supplies only its own train loop and save/load functions.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from jobs.common import auto_parallelism, open_run, publish, ray_storage_path

LOG = logging.getLogger("wsseg.ray_train")
STATE_FILE = "train_state.pt"


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
