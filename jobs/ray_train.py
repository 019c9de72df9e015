"""What every Ray Train job of wsseg shares: resume inside the worker, one checkpoint per epoch, and
the driver side that runs a `TorchTrainer` and keeps the best epoch's network in `<out>/models/`.

Each network job (classifier, U-Net, ...) supplies only its own train loop and save/load functions.

Two records travel inside every epoch checkpoint, written by rank 0 (:class:`EpochKeeper`):
`kept.json` (every epoch's metrics since the run began, the epoch kept and by which metric) and
`best_<ckpt_file>` (that epoch's network). The driver reads both from the run's latest checkpoint,
so the network it keeps never depends on which reports Ray still lists: a restored run that reports
nothing new, a metric that is NaN in every epoch (no validation study with both classes) and
`num_to_keep` pruning all give the same answer as the uninterrupted run.

Ray Train restores a run by name (RAY_NOTES: a changed configuration under the same name silently
continues the old run), so :func:`fit_best` names each run `<name>-<fingerprint>`, the fingerprint
covering the configuration, the studies (ids, paths, byte sizes), files the run starts from and the
code version. The same command resumes; a changed one trains a new run and the log names what changed.
"""

from __future__ import annotations

import faulthandler
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from jobs.common import (RunFolder, auto_parallelism, fit_keeping_ctrl_c, input_record, ray_storage_path,
                         sha256_file)
from jobs.telemetry import record_epoch
from wsseg_core.storage import copy_file, exists, join, read_bytes, write_bytes

LOG = logging.getLogger("wsseg.ray_train")
STATE_FILE = "train_state.pt"
# Seconds without a reported epoch before a worker warns (config "watchdog_s" overrides).
WATCHDOG_ENV = "WSSEG_TRAIN_WATCHDOG_S"
DEFAULT_WATCHDOG_S = 1800.0
_WATCHDOG: "Watchdog | None" = None
KEPT_FILE = "kept.json"
# Written into a run's storage folder once `trainer.fit` has returned: which checkpoint the finished
# run ended on. A rerun with the same fingerprint then reads the kept network from it without
# starting Ray Train (a controller, a worker group and a restore only to train no epoch: 20-50 s).
FINISHED_FILE = "wsseg-finished.json"
# Settings that change where or how fast a run trains, not what it computes: a rerun on a bigger
# cluster resumes the same run; the watchdog only warns. Test hooks (fail_*) only kill a worker.
UNFINGERPRINTED = frozenset({"cpus_per_worker", "num_workers", "use_gpu", "watchdog_s"})


def best_file(ckpt_file: str) -> str:
    """Name of the kept (best) network's copy inside each checkpoint."""
    return f"best_{ckpt_file}"


class EpochKeeper:
    """Per worker: every epoch's metrics and the best network so far, carried from checkpoint to
    checkpoint.

    `metric`/`mode` rank epochs ("max" or "min"); an epoch whose metric is not finite never beats a
    finite one. Until some epoch has a finite value the latest epoch is kept and `fallback` is set,
    so a run without a usable validation metric still keeps a network (its last) and says so.
    """

    def __init__(self, metric: str | None = None, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.history: list[dict[str, Any]] = []
        self.kept_epoch: int | None = None
        self.kept_value: float | None = None
        self.extra: dict[str, Any] = {}  # the loop's own state at the checkpoint resumed from
        self._best_dir = Path(tempfile.mkdtemp(prefix="wsseg-kept-"))

    @property
    def fallback(self) -> bool:
        return self.kept_value is None

    def _beats(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.kept_value is None:
            return True
        return value > self.kept_value if self.mode == "max" else value < self.kept_value

    def record(self, metrics: dict[str, Any], epoch: int) -> bool:
        """Add one epoch; True when its network becomes the kept one."""
        # A restarted worker restores the keeper from its checkpoint, so epochs are never redone
        # on top of their own record; drop a stale entry anyway rather than list an epoch twice.
        self.history = [h for h in self.history if int(h.get("epoch", -1)) != epoch]
        self.history.append({**metrics, "epoch": epoch})
        value = float(metrics.get(self.metric, float("nan"))) if self.metric else float("nan")
        if self._beats(value):
            self.kept_epoch, self.kept_value = epoch, value
            return True
        if self.kept_value is None:
            self.kept_epoch = epoch
            return True
        return False

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "kept_epoch": self.kept_epoch,
                "kept_value": self.kept_value, "fallback": self.fallback, "history": self.history}

    def write(self, d: Path, ckpt_file: str, improved: bool) -> None:
        """Into checkpoint folder `d` (which holds this epoch's `ckpt_file`): the kept network and
        kept.json."""
        kept = self._best_dir / ckpt_file
        if improved or not kept.exists():
            shutil.copyfile(d / ckpt_file, kept)
        shutil.copyfile(kept, d / best_file(ckpt_file))
        (d / KEPT_FILE).write_text(json.dumps(self.state(), default=float))

    def restore(self, d: Path, ckpt_file: str) -> None:
        """From a checkpoint folder written by :meth:`write` (older checkpoints have no record: the
        run then continues with an empty history)."""
        rec = d / KEPT_FILE
        if not rec.exists():
            return
        state = json.loads(rec.read_text())
        self.history = list(state.get("history", []))
        self.kept_epoch = state.get("kept_epoch")
        self.kept_value = state.get("kept_value")
        if (d / best_file(ckpt_file)).exists():
            shutil.copyfile(d / best_file(ckpt_file), self._best_dir / ckpt_file)


_KEEPER: EpochKeeper | None = None


def _keeper() -> EpochKeeper:
    global _KEEPER
    if _KEEPER is None:  # a loop run outside fit_best keeps the latest epoch
        _KEEPER = EpochKeeper()
    return _KEEPER


def _run_keeping(train_loop: Callable[[dict], None], metric: str, mode: str, config: dict) -> None:
    """What each worker runs: `train_loop` with a fresh EpochKeeper ranking by `metric`."""
    global _KEEPER
    _KEEPER = EpochKeeper(metric, mode)
    train_loop(config)


def resume_from_checkpoint(ckpt_file: str, load: Callable[[Path], tuple]) -> tuple[tuple, int, dict] | None:
    """Inside a train loop: the latest checkpoint Ray Train hands this worker, if any.

    Returns (what `load(<checkpoint dir>/ckpt_file)` returns, the epoch to start at, the optimizer
    state), or None on a fresh start; the `extra_state` reported with that epoch is
    `resumed_extra_state()`. After a worker failure or a rerun of the same command, Ray gives the last
    checkpoint it registered (see README, "When things go wrong"); the epoch record restarts from it.
    """
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        loaded = load(Path(d) / ckpt_file)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        _keeper().restore(Path(d), ckpt_file)
    _keeper().extra = dict(state.get("extra") or {})
    start_epoch = int(state["epoch"]) + 1
    if ray.train.get_context().get_world_rank() == 0:
        LOG.info("resuming from checkpoint after epoch %d", start_epoch - 1)
    return loaded, start_epoch, state["optimizer"]


def resumed_extra_state() -> dict[str, Any]:
    """The `extra_state` reported with the epoch this worker resumed from ({} on a fresh start)."""
    return dict(_keeper().extra)


def report_epoch(metrics: dict[str, Any], epoch: int, optimizer, ckpt_file: str,
                 save: Callable[[Path], None], extra_state: dict[str, Any] | None = None) -> None:
    """Report one epoch's metrics; rank 0 also writes the epoch's checkpoint: the network
    (`save(path)`), the optimizer state and `extra_state` (e.g. early-stopping counters), the
    best network so far and the record of every epoch (:class:`EpochKeeper`).

    Every rank must call this once per epoch: `ray.train.report` is a barrier across ranks.
    """
    import ray.train
    import torch

    keeper = _keeper()
    improved = keeper.record(metrics, epoch)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save(Path(d) / ckpt_file)
            torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "extra": extra_state or {}},
                       Path(d) / STATE_FILE)
            keeper.write(Path(d), ckpt_file, improved)
            checkpoint = ray.train.Checkpoint.from_directory(d)
            # Dashboard gauges (epoch, losses, validation AUC/Dice), tagged by the network's file
            # stem ("classifier", "unet", ...): rank 0 only, every rank reports the same values.
            record_epoch(Path(ckpt_file).stem, metrics)
        ray.train.report(metrics, checkpoint=checkpoint)
    beat_watchdog()


def beat_watchdog() -> None:
    """Tell this worker's watchdog (if started) that an epoch was just reported."""
    if _WATCHDOG is not None:
        _WATCHDOG.beat()


# --------------------------------------------------------------------------------------------------
# Worker-side helpers of every network job's train loop (classifier, U-Net, BoxFCN).


def load_readable(refs: list) -> list:
    """Load the studies that can be read; a bad file is logged and left out of training."""
    from wsseg_core.data import StudyError, load_study

    studies = []
    for r in refs:
        try:
            studies.append(load_study(r))
        except StudyError as e:
            LOG.warning("training skips %s/%s: %s", r.patient_id, r.study_id, e)
    return studies


def maybe_die(config: dict[str, Any], epoch: int, rank: int) -> None:
    """Test hook only: config `fail_after_epoch` (int), `fail_marker` (path), `fail_delay_s`.

    Rank 0 SIGKILLs its own process once (the marker file makes it fire once per run), midway
    through epoch `fail_after_epoch + 1` - after training, before reporting - as a lost node would.
    It first waits `fail_delay_s`: Ray Train registers a reported checkpoint only when the
    controller next polls the worker (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a worker
    lost within that window after `report` loses that epoch's checkpoint and the restart redoes
    one epoch. Real epochs last minutes; tiny test epochs do not, hence the delay.
    """
    after = config.get("fail_after_epoch")
    if after is None or rank != 0 or epoch != after + 1:
        return
    try:
        fd = os.open(config["fail_marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    time.sleep(float(config.get("fail_delay_s", 0.0)))
    LOG.warning("test hook: killing train worker pid %d during epoch %d", os.getpid(), epoch)
    os.kill(os.getpid(), signal.SIGKILL)


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


def _file_digest(path: str) -> str | None:
    """sha256 of a local file a run starts from (warm start, weights), None if it is no local file."""
    if not isinstance(path, str) or "://" in path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_fingerprint(config: dict[str, Any], *, metric: str, mode: str) -> dict[str, Any]:
    """What a training run computes from: its configuration (less UNFINGERPRINTED and test hooks),
    the byte size of every study file (`*_refs` lists), the sha256 of local files it starts from
    (`init_from`, `weights`), the ranking metric and the code version.

    Returns dict(digest (hex), fields (the comparable values, for naming what changed)).
    """
    import wsseg_core

    fields: dict[str, Any] = {}
    for k, v in sorted(config.items()):
        if k in UNFINGERPRINTED or k.startswith("fail_"):
            continue
        if k.endswith("_refs") and isinstance(v, list):
            from wsseg_core.data import StudyRef

            refs = [StudyRef(**r) if isinstance(r, dict) else r for r in v]
            fields[k] = input_record(refs)
        elif k in ("init_from", "weights") and _file_digest(v):
            fields[k] = {"path": v, "sha256": _file_digest(v)}
        else:
            fields[k] = v
    fields["_keep"] = f"{mode} {metric}"
    fields["_code"] = wsseg_core.__version__
    blob = json.dumps(fields, sort_keys=True, default=str)
    return {"digest": hashlib.sha256(blob.encode()).hexdigest(), "fields": json.loads(blob)}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """One line naming what differs between two fingerprints' fields (values shown when short)."""
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k.endswith("_refs"):
            ids_a = {(r["patient_id"], r["study_id"]) for r in a or []}
            ids_b = {(r["patient_id"], r["study_id"]) for r in b or []}
            what = (f"{len(ids_b - ids_a)} studies added, {len(ids_a - ids_b)} removed"
                    if ids_a != ids_b else "paths or file sizes changed")
            parts.append(f"{k}: {what}")
        else:
            sa, sb = json.dumps(a, default=str), json.dumps(b, default=str)
            parts.append(f"{k}: {sa} -> {sb}" if len(sa) + len(sb) < 80 else f"{k} changed")
    return "; ".join(parts) or "nothing recorded differs"


def _last_run_record(storage_path: str, name: str) -> str:
    from wsseg_core.storage import join

    return join(storage_path, f"{name}.last-run.json")


def _note_run(storage_path: str, name: str, run_name: str, fingerprint: dict[str, Any]) -> None:
    """Log whether `run_name` resumes the last run under `name` or replaces it, and why; record it."""
    from wsseg_core.storage import exists, join, read_bytes, write_bytes

    record = _last_run_record(storage_path, name)
    try:
        last = json.loads(read_bytes(record))
    except (FileNotFoundError, OSError, ValueError):
        last = None
    if last is None:
        LOG.info("%s: new training run %s", name, run_name)
    elif last.get("run_name") == run_name:
        LOG.info("%s: same settings and data as run %s: resuming it (a finished run is reused)",
                 name, run_name)
    else:
        change = describe_change(last.get("fields", {}), fingerprint["fields"])
        if exists(join(storage_path, run_name)):  # e.g. back to an earlier setting
            LOG.warning("%s: settings or data changed since run %s (%s): run %s was trained with "
                        "these settings before: resuming it (a finished run is reused)",
                        name, last.get("run_name"), change, run_name)
        else:
            LOG.warning("%s: settings or data changed since run %s (%s): training a new run %s",
                        name, last.get("run_name"), change, run_name)
    write_bytes(record, json.dumps({"run_name": run_name, "digest": fingerprint["digest"],
                                    "fields": fingerprint["fields"]}, default=str).encode())


def discard_run(storage_path: str, run_name: str) -> bool:
    """Delete Ray's stored state of one training run (for a forced fresh start); True if it existed."""
    import pyarrow.fs as pafs

    from wsseg_core.storage import filesystem_and_path, join

    fs, path = filesystem_and_path(join(storage_path, run_name))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    fs.delete_dir(path)
    return True


def fit_best(train_loop: Callable[[dict], None], config: dict[str, Any], *, dest: str | Path,
             ckpt_file: str, metric: str, name: str, storage_path: str, mode: str = "max",
             num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float | None = None,
             max_failures: int = 3, callbacks: list | None = None,
             fresh: bool = False) -> dict[str, Any]:
    """Run `train_loop` on `num_workers` Ray Train workers (DDP) and copy the best epoch's
    `ckpt_file` (by `metric`, `mode` "max" or "min"; the last epoch, with a warning, when the
    metric is never finite) to the local file `dest` (temp name, then rename, so trials writing side
    by side never see each other's half-copied files).

    The Ray run is `<name>-<fingerprint>` under `storage_path` (see :func:`run_fingerprint`): the
    same configuration and data resume an interrupted run or reuse a finished one; anything else
    trains a new run. `fresh` discards a stored run of the same fingerprint first. `cpus_per_worker`
    None shares the cluster's CPUs among the workers on CPU (torch threads follow it via
    `config["cpus_per_worker"]`).

    Returns dict(checkpoint (`dest`), ray_checkpoint, run_name, fingerprint (hex), history (every
    epoch's metrics, in epoch order), best (the kept epoch's metrics), kept_epoch, kept_by (e.g.
    "max val_auc", or "last epoch (val_auc never finite)")).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if use_gpu else float(auto_parallelism() // num_workers or 1)
    fingerprint = run_fingerprint(config, metric=metric, mode=mode)
    run_name = f"{name}-{fingerprint['digest'][:12]}"
    if fresh and discard_run(storage_path, run_name):
        LOG.info("%s: discarded the stored run %s (fresh start asked for)", name, run_name)
    _note_run(storage_path, name, run_name, fingerprint)
    finished = _finished_checkpoint(storage_path, run_name)
    if finished is not None:
        LOG.info("%s: run %s had finished: its kept network is read from %s (Ray Train not started)",
                 name, run_name, finished["location"])
        state = json.loads(read_bytes(join(finished["location"], KEPT_FILE)))
        write_bytes(dest, read_bytes(join(finished["location"], best_file(ckpt_file))))
        return _kept_result(state, dest=dest, ray_checkpoint=finished["ray_checkpoint"], run_name=run_name,
                            fingerprint=fingerprint, metric=metric, mode=mode)
    trainer = TorchTrainer(
        functools.partial(_run_keeping, train_loop, metric, mode),
        train_loop_config={**config, "cpus_per_worker": cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker,
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # The latest two: the keeper carries the best network inside each of them.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = fit_keeping_ctrl_c(trainer)
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"{run_name}: training finished without a checkpoint")
    with latest.as_directory() as d:
        state = json.loads((Path(d) / KEPT_FILE).read_text())
        copy_file(Path(d) / best_file(ckpt_file), dest)
    # Only now, after the kept network is out: an interrupted run never looks finished.
    write_bytes(join(storage_path, run_name, FINISHED_FILE),
                json.dumps({"checkpoint": Path(latest.path).name, "ray_checkpoint": latest.path}).encode())
    return _kept_result(state, dest=dest, ray_checkpoint=latest.path, run_name=run_name,
                        fingerprint=fingerprint, metric=metric, mode=mode)


def _finished_checkpoint(storage_path: str, run_name: str) -> dict[str, str] | None:
    """Where the finished run `run_name` ended (dict(location, ray_checkpoint)), or None when it is
    new, interrupted (no FINISHED_FILE yet) or its checkpoint is gone."""
    try:
        record = json.loads(read_bytes(join(storage_path, run_name, FINISHED_FILE)))
        location = join(storage_path, run_name, record["checkpoint"])
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None
    if not exists(join(location, KEPT_FILE)):
        return None
    return {"location": location, "ray_checkpoint": record.get("ray_checkpoint", location)}


def _kept_result(state: dict[str, Any], *, dest: str | Path, ray_checkpoint: str, run_name: str,
                 fingerprint: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """:func:`fit_best`'s return value from the keeper's state in the run's last checkpoint."""
    history = sorted(state["history"], key=lambda h: int(h.get("epoch", 0)))
    kept_epoch = state["kept_epoch"]
    if state["fallback"]:
        kept_by = f"last epoch ({metric} never finite)"
        LOG.warning("%s: %s was not finite in any epoch (e.g. no validation study, or one class "
                    "only), so the last epoch (%s) is kept", run_name, metric, kept_epoch)
    else:
        kept_by = f"{mode} {metric}"
    best = next((h for h in history if h.get("epoch") == kept_epoch), {})
    LOG.info("%s: kept epoch %s of %d (%s)", run_name, kept_epoch, len(history), kept_by)
    return {"checkpoint": str(dest), "ray_checkpoint": ray_checkpoint, "run_name": run_name,
            "fingerprint": fingerprint["digest"], "history": history, "best": best,
            "kept_epoch": kept_epoch, "kept_by": kept_by}


def fit_and_keep_best(train_loop: Callable[[dict], None], config: dict[str, Any], *, out: str | Path,
                      ckpt_file: str, metric: str, name: str, mode: str = "max",
                      model_file: str | None = None, storage_path: str | None = None,
                      **fit_kwargs: Any) -> dict[str, Any]:
    """:func:`fit_best` into a run folder: the best epoch's network lands in
    `<out>/models/<model_file or ckpt_file>` (uploaded when `out` is a URI), and Ray's checkpoints
    under `--storage-path` (default `<out>/ray`). `fit_kwargs`: num_workers, use_gpu,
    cpus_per_worker, max_failures, callbacks, fresh (see :func:`fit_best`).

    Returns :func:`fit_best`'s dict plus `record`, the network's run.json entry
    (:func:`training_record`, its path the public one: the URI's when `out` is a URI).
    """
    run = RunFolder(out)
    dest = run.model(model_file or ckpt_file)
    res = fit_best(train_loop, config, dest=dest, ckpt_file=ckpt_file, metric=metric, name=name,
                   storage_path=ray_storage_path(storage_path, out), mode=mode, **fit_kwargs)
    run.publish(dest)
    res["record"] = training_record(res, run.where(dest), dest)
    return res


def training_record(fit: dict[str, Any] | None, path: str, local_file: str | Path) -> dict[str, Any] | None:
    """run.json's entry for one network trained by :func:`fit_best` (None for None): where it is
    (`path`), its sha256 (of `local_file`), which Ray run and epoch it came from and why that epoch,
    and every epoch's metrics (the kept one marked)."""
    if fit is None:
        return None
    return {"path": path, "sha256": sha256_file(local_file), "run_name": fit.get("run_name"),
            "fingerprint": fit.get("fingerprint"), "kept_epoch": fit.get("kept_epoch"),
            "kept_by": fit.get("kept_by"), "best_epoch_metrics": fit["best"],
            "history": [{**h, "kept": h.get("epoch") == fit.get("kept_epoch")} for h in fit["history"]]}


def training_run(fit: dict[str, Any] | None) -> dict[str, Any] | None:
    """run.json's "training_runs" entry of one :func:`fit_best` result: the stored Ray run's name and
    fingerprint (what `jobs.pipeline --overwrite` discards), None for None."""
    return None if fit is None else {"run_name": fit.get("run_name"), "fingerprint": fit.get("fingerprint")}
