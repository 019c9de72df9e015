"""wsseg's own metrics for the Ray dashboard and Prometheus, and the job log's progress lines.

Every metric of the project is defined here, once (`METRICS`), and recorded through the small
functions below; the jobs never touch `ray.util.metrics` themselves. Ray exports each metric on
every node's metrics port (`ray start --metrics-export-port`) with the prefix `ray_`: the counter
`wsseg_studies_scored` is scraped as `ray_wsseg_studies_scored_total`, a histogram `wsseg_x` as
`ray_wsseg_x_bucket` / `_sum` / `_count`, a gauge under its own name. Ray adds the labels
`SessionName`, `NodeAddress`, `WorkerId`, `Component` and `Version`; each scoring actor is its own
series, so dashboards sum over them (docs/grafana_wsseg.json).

Rules:
- Recording never makes a study (or an epoch, or a trial) fail: an error of the metrics system is
  logged once per metric and process, and the job goes on.
- Cheap: the metric objects are built once per process, on first use; one record costs a few
  microseconds (measured: about 2 us per `Histogram.observe` on this machine), against seconds per
  study.
- Label values stay few (method, split, stage, error kind, model, search): never a study id.
- Outside a Ray worker (a unit test calling a scorer in-process) recording does nothing harmful:
  Ray keeps the values in the process and exports nothing.
- A gauge stays on the endpoint while its process lives (`_keep_gauges_alive`): Ray 2.60 itself
  drops a gauge ~2 report intervals after it was set.
- Ray 2.60 exports a histogram's `_sum` from bucket midpoints: use the buckets (`histogram_quantile`).

The progress line of `score_cohort`'s driver (`progress_line`, `ProgressLog`) is pure arithmetic
on counts and seconds, kept here beside the metrics it mirrors.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

LOG = logging.getLogger("wsseg.telemetry")

# Seconds per study or stage: a small phantom takes well under a second per stage on a CPU, a
# full-size autoPET study (400x400x326) tens of seconds to minutes (ScoreCAM on a CPU).
SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]
# Flagged slices per study: a whole-body study has ~326 axial slices.
FLAGGED_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 400.0, 800.0]
# Share of a study's slices the classifier flags: a tumour occupies a few percent of a body's
# slices, so values near 1 mean the classifier flags (nearly) everything.
FRACTION_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99]
# The stages of scoring one study, in order (`StageClock`).
STAGES = ("read", "classify", "cams", "segment", "metrics", "write")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: kind ("counter", "gauge" or "histogram"), help text, tag keys, bucket bounds."""

    kind: str
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


# Python name -> spec. Prometheus names: `ray_` + name (+ `_total` for counters).
METRICS: dict[str, MetricSpec] = {
    "wsseg_studies_scored": MetricSpec(
        "counter", "Studies scored, one per study and method (status ok); equals the ok rows written",
        ("method", "split")),
    "wsseg_studies_failed": MetricSpec(
        "counter", "Studies that failed, one per study and method; equals the failed rows written",
        ("method", "split", "error_kind")),
    "wsseg_study_seconds": MetricSpec(
        "histogram", "Seconds to score one study with every method (all stages)", ("split", "status"),
        tuple(SECONDS_BUCKETS)),
    "wsseg_stage_seconds": MetricSpec(
        "histogram", "Seconds one study spends in one stage of scoring "
        "(read, classify, cams, segment, metrics, write)", ("stage",), tuple(SECONDS_BUCKETS)),
    "wsseg_flagged_slices": MetricSpec(
        "histogram", "Slices per study the classifier flags as tumorous (they get CAMs)", ("split",),
        tuple(FLAGGED_BUCKETS)),
    "wsseg_flagged_slice_fraction": MetricSpec(
        "histogram", "Share of a study's axial slices the classifier flags (0-1)", ("split",),
        tuple(FRACTION_BUCKETS)),
    "wsseg_train_epoch": MetricSpec(
        "gauge", "Last epoch reported by a Ray Train run (0-based)", ("model",)),
    "wsseg_train_loss": MetricSpec(
        "gauge", "Training loss of the last reported epoch", ("model",)),
    "wsseg_train_val_loss": MetricSpec(
        "gauge", "Validation loss of the last reported epoch", ("model",)),
    "wsseg_train_val_auc": MetricSpec(
        "gauge", "Validation slice AUC of the last reported epoch (classifier)", ("model",)),
    "wsseg_train_val_dice": MetricSpec(
        "gauge", "Validation Dice of the last reported epoch (segmentation networks)", ("model",)),
    "wsseg_tune_trials_done": MetricSpec(
        "counter", "Ray Tune trials finished (completed or errored)", ("search", "status")),
    "wsseg_tune_best_score": MetricSpec(
        "gauge", "Best value of the search's metric over every result reported so far",
        ("search", "metric")),
}

_OBJECTS: dict[str, Any] = {}  # name -> ray.util.metrics object, built on first use per process
_WARNED: set[str] = set()
# Ray 2.60 exports a gauge value once after it is set and evicts it from the node's endpoint ~2
# report intervals later, even while its process lives (measured: a gauge set once by a live driver
# was gone 2 s later with RAY_metrics_report_interval_ms=1000, a counter stayed). An epoch or a Tune
# trial takes far longer than that, so each process re-sets its gauges' last values every half
# interval from a daemon thread (`_keep_gauges_alive`); they vanish when the process ends.
_GAUGE_LAST: dict[tuple[str, tuple], tuple[float, dict[str, str]]] = {}
_GAUGE_LOCK = threading.Lock()
_GAUGE_THREAD: threading.Thread | None = None


def _metric(name: str) -> Any:
    obj = _OBJECTS.get(name)
    if obj is None:
        from ray.util import metrics as rm

        spec = METRICS[name]
        if spec.kind == "counter":
            obj = rm.Counter(name, spec.description, tag_keys=spec.tags)
        elif spec.kind == "gauge":
            obj = rm.Gauge(name, spec.description, tag_keys=spec.tags)
        else:
            obj = rm.Histogram(name, spec.description, boundaries=list(spec.boundaries),
                               tag_keys=spec.tags)
        _OBJECTS[name] = obj
    return obj


def record(name: str, value: float, **tags: Any) -> bool:
    """Add `value` to a counter, set a gauge or observe a histogram value; never raises.

    Tag values are turned into strings (None becomes "none"). Returns False when nothing was
    recorded (a non-finite value, a zero counter increment, or an error, logged once per metric).
    """
    try:
        value = float(value)
        if not math.isfinite(value):
            return False
        spec = METRICS[name]
        if spec.kind == "counter" and value <= 0:
            return False
        str_tags = {k: "none" if v is None else str(v) for k, v in tags.items()}
        m = _metric(name)
        if spec.kind == "counter":
            m.inc(value, tags=str_tags)
        elif spec.kind == "gauge":
            m.set(value, tags=str_tags)
            _remember_gauge(name, value, str_tags)
        else:
            m.observe(value, tags=str_tags)
        return True
    except Exception as e:  # noqa: BLE001 - a metric must never stop the work it measures
        if name not in _WARNED:
            _WARNED.add(name)
            LOG.warning("metric %s not recorded (%s: %s); further errors of it are not logged",
                        name, type(e).__name__, e)
        return False


def gauge_refresh_s() -> float:
    """Seconds between re-sets of a live gauge: half of Ray's export interval
    (`RAY_metrics_report_interval_ms`, 10 s by default, never under 1 s), so every export carries it."""
    try:
        ms = float(os.environ.get("RAY_metrics_report_interval_ms", "10000"))
    except ValueError:
        ms = 10000.0
    return max(ms, 1000.0) / 2000.0


def _remember_gauge(name: str, value: float, tags: dict[str, str]) -> None:
    global _GAUGE_THREAD
    with _GAUGE_LOCK:
        _GAUGE_LAST[(name, tuple(sorted(tags.items())))] = (value, tags)
        if _GAUGE_THREAD is None or not _GAUGE_THREAD.is_alive():
            _GAUGE_THREAD = threading.Thread(target=_keep_gauges_alive, name="wsseg-gauges", daemon=True)
            _GAUGE_THREAD.start()


def _keep_gauges_alive() -> None:
    """Daemon loop: re-set every gauge's last value (see `_GAUGE_LAST`); errors logged once."""
    while True:
        time.sleep(gauge_refresh_s())
        with _GAUGE_LOCK:
            last = list(_GAUGE_LAST.items())
        for (name, _), (value, tags) in last:
            try:
                _metric(name).set(value, tags=tags)
            except Exception as e:  # noqa: BLE001 - never let the keeper die on a metric error
                if name not in _WARNED:
                    _WARNED.add(name)
                    LOG.warning("metric %s not refreshed (%s: %s)", name, type(e).__name__, e)


# ------------------------------------------------------------------------------------------------
# Scoring


# (substring of a StudyError's problem, error kind): the first match wins. The texts are those of
# wsseg_core.data's checks; anything else (a bug, an unsafe id, out of memory) is "other".
ERROR_KINDS: tuple[tuple[str, str], ...] = (
    ("file not found", "missing_file"),
    ("corrupt or truncated", "unreadable"),
    ("not a readable nifti", "unreadable"),
    ("not a nifti", "unreadable"),
    ("cannot be read", "unreadable"),
    ("non-finite voxel", "invalid_values"),
    # before "affine": the grid messages quote both volumes' shapes and affines
    ("not on the suv grid", "grid_mismatch"),
    ("does not overlap", "grid_mismatch"),
    ("must be a 3-d volume", "invalid_geometry"),
    ("empty dimension", "invalid_geometry"),
    ("affine", "invalid_geometry"),
    ("voxel spacing", "invalid_geometry"),
)


def error_kind(error: str | None) -> str:
    """A failed row's `error` text as one of a few kinds (a Prometheus label must stay low-cardinality):
    missing_file, unreadable, invalid_values, invalid_geometry, grid_mismatch or other."""
    text = (error or "").lower()
    return next((kind for key, kind in ERROR_KINDS if key in text), "other")


def record_study(rows: list[dict]) -> None:
    """One study's rows have been written: count each (study, method) as scored or failed, and the
    study's seconds (`seconds` of its rows: every stage, both halves when scoring is split).
    `skipped` rows (a method the classifier's head does not define) are neither."""
    for r in rows:
        if r.get("status") == "ok":
            record("wsseg_studies_scored", 1, method=r.get("method"), split=r.get("split"))
        elif r.get("status") == "failed":
            record("wsseg_studies_failed", 1, method=r.get("method"), split=r.get("split"),
                   error_kind=error_kind(r.get("error")))
    if rows:
        failed = any(r.get("status") == "failed" for r in rows)
        record("wsseg_study_seconds", rows[0].get("seconds") or 0.0, split=rows[0].get("split"),
               status="failed" if failed else "ok")


def record_flagged(n_flagged: int, n_slices: int, split: str | None) -> None:
    """Slices of one study the classifier flagged, as a count and as a share of its slices."""
    record("wsseg_flagged_slices", n_flagged, split=split)
    if n_slices > 0:
        record("wsseg_flagged_slice_fraction", n_flagged / n_slices, split=split)


@dataclass
class StageClock:
    """Seconds per stage of one study (or of the pipeline: jobs.pipeline's run.json timings),
    summed over every entry to a stage, recorded once per study.

    `with clock.stage("read"): ...` adds the block's wall time to "read" when it ends normally (a
    stage that raised is not timed: the study failed there). `flush()` observes each stage's total
    in `wsseg_stage_seconds` and starts over, so a stage entered once per method (metrics, write)
    is still one value per study. `now` is the clock (seconds), replaceable in tests.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    now: Callable[[], float] = time.perf_counter

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = self.now()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + (self.now() - t0)

    def flush(self) -> dict[str, float]:
        """Record every stage timed since the last flush; returns what was recorded."""
        done, self.seconds = self.seconds, {}
        for name, s in done.items():
            record("wsseg_stage_seconds", s, stage=name)
        return done


# ------------------------------------------------------------------------------------------------
# Ray Train and Ray Tune

# report_epoch's metric key -> gauge
EPOCH_GAUGES = {"epoch": "wsseg_train_epoch", "train_loss": "wsseg_train_loss",
                "val_loss": "wsseg_train_val_loss", "val_auc": "wsseg_train_val_auc",
                "val_dice": "wsseg_train_val_dice"}


def record_epoch(model: str, metrics: dict[str, Any]) -> None:
    """One reported epoch of a Train run (call on rank 0 only: every rank reports the same values).

    A metric the loop does not report, or one that is not a finite number, leaves its gauge as it
    was. `val_dice` is skipped where the loop says it is undefined (`val_dice_defined` False)."""
    for key, gauge in EPOCH_GAUGES.items():
        v = metrics.get(key)
        if key == "val_dice" and metrics.get("val_dice_defined") is False:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            record(gauge, v, model=model)


class BestSoFar:
    """The best value of one metric over every result seen (`mode` "max" or "min"); non-finite and
    missing values are ignored. Pure: the Tune callback feeds it and sets the gauge."""

    def __init__(self, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.mode = mode
        self.best: float | None = None

    def update(self, value: Any) -> bool:
        """Take one value; True when it is the new best."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = float(value)
            return True
        return False


_TUNE_CALLBACK_CLASS: type | None = None


def tune_callback(search: str, metric: str, mode: str = "max") -> Any:
    """A `ray.tune.Callback` for `RunConfig(callbacks=[...])` that counts finished trials
    (`wsseg_tune_trials_done`) and sets `wsseg_tune_best_score` to the best `metric` reported so far.

    Runs in the driver (Tune's controller), so its metrics come from the job's own process. The
    class is built on first call so that importing this module never imports Ray Tune (scoring
    actors import it too).
    """
    global _TUNE_CALLBACK_CLASS
    if _TUNE_CALLBACK_CLASS is None:
        from ray.tune.callback import Callback

        class WssegTuneTelemetry(Callback):
            def __init__(self, search: str, metric: str, mode: str) -> None:
                self.search, self.metric = search, metric
                self.best = BestSoFar(mode)

            def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
                if self.best.update(result.get(self.metric)):
                    record("wsseg_tune_best_score", self.best.best, search=self.search,
                           metric=self.metric)

            def on_trial_complete(self, iteration, trials, trial, **info) -> None:
                record("wsseg_tune_trials_done", 1, search=self.search, status="completed")

            def on_trial_error(self, iteration, trials, trial, **info) -> None:
                record("wsseg_tune_trials_done", 1, search=self.search, status="error")

        _TUNE_CALLBACK_CLASS = WssegTuneTelemetry
    return _TUNE_CALLBACK_CLASS(search, metric, mode)


# ------------------------------------------------------------------------------------------------
# Progress in the job log


def format_duration(seconds: float) -> str:
    """`seconds` as a person reads it: '45 s', '12 min 05 s', '3 h 07 min'; '?' if unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def progress_line(done: int, failed: int, total: int, elapsed_s: float) -> str:
    """One progress line for the job log.

    `done` studies of `total` have come back (`failed` of them failed) after `elapsed_s` seconds.
    Rate = done / elapsed (studies per minute); ETA = (total - done) / rate, '?' before the first
    study. E.g. `progress: 120/1000 studies (12.0%), 3 failed, 6.0 studies/min, elapsed 20 min 00 s,
    ETA 2 h 26 min`.
    """
    rate = done / elapsed_s if elapsed_s > 0 else float("nan")  # studies per second
    eta = (total - done) / rate if done > 0 and rate > 0 else float("nan")
    pct = 100.0 * done / total if total else 100.0
    per_min = f"{rate * 60:.1f}" if math.isfinite(rate) else "?"
    return (f"progress: {done}/{total} studies ({pct:.1f}%), {failed} failed, {per_min} studies/min, "
            f"elapsed {format_duration(elapsed_s)}, ETA {format_duration(eta)}")


class ProgressLog:
    """Logs `progress_line` every `every_n` studies or every `every_s` seconds, whichever comes first,
    and once more at the end (`finish`). `now` is the clock (seconds), replaceable in tests."""

    def __init__(self, total: int, *, every_n: int = 10, every_s: float = 60.0,
                 log: logging.Logger = LOG, now: Callable[[], float] = time.monotonic) -> None:
        self.total, self.every_n, self.every_s = total, max(1, every_n), every_s
        self.log, self.now = log, now
        self.done = self.failed = 0
        self.t0 = self.last_t = now()
        self.last_done = 0

    def add(self, status: str) -> str | None:
        """One study came back with `status` ("ok" or "failed"); returns the line if one was logged."""
        self.done += 1
        self.failed += status != "ok"
        t = self.now()
        if self.done - self.last_done >= self.every_n or t - self.last_t >= self.every_s:
            return self._emit(t)
        return None

    def finish(self) -> str | None:
        """The final line, unless the last study already produced one."""
        return self._emit(self.now()) if self.done != self.last_done else None

    def _emit(self, t: float) -> str:
        self.last_done, self.last_t = self.done, t
        line = progress_line(self.done, self.failed, self.total, t - self.t0)
        self.log.info("%s", line)
        return line
