"""What every Ray entry point shares: presets, logging, Ray start-up, the run folder layout."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The run folder and the atomic writers live in the library; re-exported under the names the
# jobs have used (RunLayout: the run folder's layout, now the RunFolder that also fetches/publishes).
from wsseg_core.run_folder import RunFolder, safe_name, sha256_file, study_key  # noqa: F401
from wsseg_core.run_folder import RunFolder as RunLayout  # noqa: F401
from wsseg_core.storage import write_json, write_parquet  # noqa: F401
from wsseg_core.storage import write_text as atomic_write_text  # noqa: F401

if TYPE_CHECKING:
    from wsseg_core.storage import RemoteDir

LOG = logging.getLogger("wsseg")

# Pipeline presets. "small" runs the whole pipeline on a 2-core CPU in minutes; "paper" is
# Früh et al.'s setting (VGG16 at 256x256 from ImageNet weights, lr 1e-3, 50 epochs, batch 64).
# The small preset's width-reduced VGG has no pretrained weights and trains at a larger peak rate
# (3e-3): at 1e-3 its loss fell as far, but its CAMs localised less and the best CAM Dice fell by up to
# 0.24 end to end, although 1e-3 rescued training draws the gate stops (docs/EXPERIMENTS.md, "Seed spread").
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # small: a randomly initialised BN network on CPU. AdamW + one-cycle (warm-up from lr/25, peak
    # 3e-3, cosine anneal) instead of SGD at a fixed 0.01: a fixed large step from a random init
    # with a 7.7-weighted loss drove the net to a constant output on unseen cohorts (docs/EXPERIMENTS.md,
    # "Früh method"). Every tumour-free slice kept: subsampling them doubles the prior shift the
    # weighted loss already causes. Up to 20 epochs, stopped 6 epochs after the best validation
    # AUC, the patience counting, and the checkpoint chosen, only from the epoch where the
    # one-cycle lr has annealed to half its peak
    # (patience_start "half_lr": epoch 13 of 20, so at 20 epochs a run stops at most one epoch
    # early; the rule matters with --epochs > 20). At the high lr the validation AUC jumps between
    # epochs, and counting there stopped hot15 at epoch 7 with epoch 0 kept (test AUC 0.69 against
    # 0.92 with the rule); end to end hot15 0.937 -> 0.958, demo 0.953 -> 0.970. 30 epochs were measured and not adopted
    # (hot15 0.94, hot30 and demo no better, demo CAM Dice 0.52 -> 0.38; docs/EXPERIMENTS.md, issue 16). Input stays 64: at 128 an epoch of a 15-study cohort took 43-78 s on the shared 2 cores
    # against ~2 s at 64, which the 10-minute demo cannot hold; the model preset's map stride 4
    # (dilated last block) gives 16x16 CAMs at 64 instead.
    # q_grid: the SUV percentile inside the CAM region, searched up to 99 (the paper: 20-50). The
    # paper's regions come from 32x32 maps of 256^2 slices; an 8x8 cell of the former small preset covered
    # 16x16 voxels of a 128^2 slice, so a lesion fills a far smaller share of its region and the
    # best percentile lies above 50: on the demo every method's tuned q sat on the paper grid's
    # edge (50) with test Dice 0.02; searched to 98 it chose 98 and reached 0.35 (docs/EXPERIMENTS.md).
    "small": dict(model_preset="small", epochs=20, batch_size=32, lr=3e-3, negative_keep=1.0,
                  optimizer="adamw", schedule="onecycle", patience=6, patience_start="half_lr",
                  weight_decay=1e-4,
                  input_size=None, q_grid=(20.0, 99.0, 80),
                  phantom_n=24, phantom_shape=(128, 128, 96), cam_batch_size=64),
    # paper: Früh et al. 2.3.3 as published (SGD momentum 0.9, lr 1e-3, batch 64, 50 epochs).
    # q_rule "percentile": Algorithm 1's step 5 as published (the small preset's "auto" may choose q %
    # of the region's SUVmax on the tuning studies; jobs.tune_thresholds).
    "paper": dict(model_preset="paper", epochs=50, batch_size=64, lr=1e-3, negative_keep=1.0,
                  optimizer="sgd", schedule="constant", patience=None, q_rule="percentile",
                  phantom_n=100, phantom_shape=(256, 256, 326), cam_batch_size=32),
}


def mark_learned(entry: dict[str, Any], reason: str | None, log: logging.Logger = LOG) -> dict[str, Any]:
    """Record a network's verdict in its thresholds.json `entry`: `learned`, and when it did not
    learn (`reason`, e.g. jobs.train_unet.not_learned_reason) `not_learned` with a banner in the log;
    jobs.analyze shows it first in the summary and report.html. Returns `entry`."""
    entry["learned"] = reason is None
    if reason is not None:
        entry["not_learned"] = reason
        log.warning("%s\n%s\n%s", "=" * 78, reason, "=" * 78)
    return entry


def setup_logging(level: int = logging.INFO) -> None:
    """One readable line per event, on stderr (Ray forwards it into the job log)."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to, or start a local one.

    Under `ray job submit`, RAY_ADDRESS is set and `ray.init()` attaches to that cluster.
    """
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)
    LOG.info("Ray resources: %s", ray.cluster_resources())


def fit_keeping_ctrl_c(runner: Any) -> Any:
    """`runner.fit()` (a Ray Tune `Tuner` or Train `TorchTrainer`) with the caller's SIGINT handler
    restored afterwards.

    Ray Tune installs its own handler ("Stop signal received ..., ending Ray Tune run") and leaves
    it in place after the search: a Ctrl-C during the pipeline's later stages (scoring) was then
    swallowed and the run went on to the end.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return runner.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return runner.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def auto_parallelism(per_unit_cpus: float = 1.0, per_unit_gpus: float = 0.0) -> int:
    """How many actors/workers of this size the cluster holds right now (at least 1)."""
    import ray

    res = ray.cluster_resources()
    if per_unit_gpus > 0:
        return max(1, int(res.get("GPU", 0) // per_unit_gpus))
    return max(1, int(res.get("CPU", 1) // per_unit_cpus))


def torch_threads_for(num_cpus: float) -> None:
    """Give torch as many threads as Ray gave CPUs, so actors do not oversubscribe the node."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def input_record(refs: list) -> list[dict[str, Any]]:
    """The exact inputs of a run: per study its ids, split and each file's path and size in bytes.

    Sizes, not hashes: hashing hundreds of GB of volumes would cost as much as scoring them, while a
    size change still flags a replaced or truncated file. `None` where a file does not exist.
    """
    def size(path: str | None) -> int | None:
        if not path or "://" in path:
            return None
        try:
            return os.path.getsize(path)
        except OSError:
            return None

    return [{"patient_id": r.patient_id, "study_id": r.study_id, "split": r.split,
             "suv_path": r.suv_path, "suv_bytes": size(r.suv_path),
             "ct_path": r.ct_path, "ct_bytes": size(r.ct_path),
             "seg_path": r.seg_path, "seg_bytes": size(r.seg_path)} for r in refs]


def open_run(out: str | os.PathLike) -> tuple[RunFolder, "RemoteDir | None"]:
    """The run folder for `--out` (`RunFolder`) and its mirror at the URI (None for a local path):
    the pair earlier callers unpack. Jobs hold the `RunFolder` and let it fetch and publish."""
    run = RunFolder(out)
    return run, run.remote


def ray_storage_path(storage_path: str | None, out: str | os.PathLike) -> str:
    """Where Ray Train/Tune keep checkpoints and trial state: `--storage-path`, else `<out>/ray`.

    URIs stay URIs (Ray reads and writes them through pyarrow); local paths become absolute.
    """
    from wsseg_core.storage import is_uri, join

    if storage_path:
        return storage_path if is_uri(storage_path) else str(Path(storage_path).absolute())
    out = os.fspath(out)
    return join(out, "ray") if is_uri(out) else str(Path(out).absolute() / "ray")


def versions() -> dict[str, str]:
    import numpy
    import pandas
    import torch

    import wsseg_core

    out = {"python": sys.version.split()[0], "wsseg": wsseg_core.__version__,
           "torch": torch.__version__, "numpy": numpy.__version__, "pandas": pandas.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # the library half can run without Ray
        pass
    return out


def load_labelled_study(ref: Any, purpose: str, log: logging.Logger = LOG) -> tuple[Any, Any] | None:
    """(StudyRef, loaded Study) of a study with a reference mask, or None - logged as "<purpose>
    skips <patient>/<study>: <error>" - when its files cannot be read, or silently when it has no
    SEG. The one rule for every stage that learns or tunes from labelled studies: a bad study is
    left out, never fatal. `ref`: a StudyRef or its dict (as Ray tasks receive it)."""
    from wsseg_core.data import StudyError, StudyRef, load_study

    ref = StudyRef(**ref) if isinstance(ref, dict) else ref
    try:
        study = load_study(ref)
    except StudyError as e:
        log.warning("%s skips %s/%s: %s", purpose, ref.patient_id, ref.study_id, e)
        return None
    return None if study.seg is None else (ref, study)


def labelled(refs: list, split: str) -> list:
    """The studies of `split` ("train", "val" or "test") that have a reference mask (SEG): the
    only ones a network can learn from or be validated on."""
    return [r for r in refs if r.split == split and r.seg_path]


def resolve_cohort(source: str | os.PathLike, seed: int = 0) -> list:
    """Studies of a cohort folder or manifest, each with its subject-level split."""
    from wsseg_core.cohort import assign_splits, load_cohort

    return assign_splits(load_cohort(source), seed=seed)


def write_manifest(refs: list, path: str | os.PathLike) -> Path:
    """The resolved cohort (absolute paths + split) as a Parquet manifest, written atomically."""
    import pandas as pd

    path = Path(path)
    write_parquet(path, pd.DataFrame([r.to_dict() for r in refs]))
    return path


def add_common_args(parser, *, cohort_required: bool = False) -> None:
    parser.add_argument("--cohort", required=cohort_required,
                        help="autoPET-layout folder or manifest (CSV/Parquet)")
    parser.add_argument("--out", required=True, help="run folder (outputs, models, masks)")
    parser.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default="small",
                        help="small: CPU minutes; paper: Früh et al. settings for GPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None,
                        help="Ray address; default: RAY_ADDRESS (set by `ray job submit`) or a local cluster")
