"""Ray Data: score every study of a cohort with every method; masks as NIfTI, rows as Parquet.

Paths stream through a pool of actors (one GPU each on a cluster, CPU here), each holding the
classifier once. Per study: classify every axial slice, compute the four CAMs of the flagged slices
in one pass, segment with Algorithm 1 (tuned t_m/q_m) and the Threshold baseline, write one uint8
mask per method on the SUV grid, and emit one row per (study, method). A study that cannot be read
becomes `status = "failed"` rows naming the file and the problem; the rest of the cohort goes on.

Results are kept per study: each actor writes `<out>/metrics/<patient>__<study>__<hash8>.parquet`
(temp name, then `os.replace`) and the Ray Data pipeline carries only small status rows. A rerun of
the same command therefore resumes: studies whose file exists are skipped, the rest are scored.
`<out>/metrics/_run.json` records what the rows were computed with (methods, thresholds, classifier
sha256, schema); results computed with anything else are stale and the run refuses unless
`--overwrite`. A scoring actor that dies is restarted by Ray and its study retried.

With `--split-cpu-stage` (the default when actors hold GPUs) the GPU actors only read, classify,
compute CAMs and build masks (`StudyMasker`); the masks travel packed (bounding box + bits) to a
second Ray Data stage of CPU actors (`StudyFinisher`) that computes the metrics and writes the
masks, slice table and result file, so a GPU never waits on CPU work.

    python -m jobs.score_cohort --cohort runs/demo/cohort.parquet --out runs/demo
    python -m jobs.score_cohort ... --overwrite      # discard earlier results, score everything
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from jobs.common import (PIPELINE_PRESETS, add_common_args, init_ray, resolve_cohort, setup_logging,
                         torch_threads_for)
from jobs.telemetry import ProgressLog, StageClock, record_flagged, record_study
# The methods by name, how each segments a study and what its rows record: one registry in the library.
from wsseg_core.methods import (ALL_METHODS, CAM_METHODS, DEFAULT_METHODS, METHODS,  # noqa: F401
                                MODEL_METHODS, StudyContext, segment_study)
# StaleResultsError: raised when `<out>/metrics/` holds results computed with other methods,
# thresholds or classifier (re-exported for callers that catch it from this job).
from wsseg_core.run_folder import RunFolder, StaleResultsError  # noqa: F401
from wsseg_core.storage import write_parquet

LOG = logging.getLogger("wsseg.score_cohort")

# Explicit schema: every Parquet file of a run has the same column types, whatever its rows
# (a file holding only failed rows would otherwise get null-typed float columns).
METRICS_SCHEMA = pa.schema([
    ("patient_id", pa.string()), ("study_id", pa.string()), ("split", pa.string()),
    ("method", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("dice", pa.float64()), ("mtv_true_ml", pa.float64()), ("mtv_pred_ml", pa.float64()),
    ("tlg_true_g", pa.float64()), ("tlg_pred_g", pa.float64()), ("voxel_volume_ml", pa.float64()),
    ("suv_path", pa.string()), ("seg_path", pa.string()), ("mask_path", pa.string()),
    ("t_m", pa.float64()), ("q_m", pa.float64()), ("n_slices", pa.int64()),
    ("n_flagged_slices", pa.int64()), ("max_slice_prob", pa.float64()), ("seconds", pa.float64()),
    # autoPET / lesion-wise metrics (wsseg_core.metrics.extra_metrics) and the study's slice AUC
    ("fpv_ml", pa.float64()), ("fnv_ml", pa.float64()), ("hd95_mm", pa.float64()),
    ("n_ref_lesions", pa.int64()), ("n_ref_detected", pa.int64()), ("n_pred_lesions", pa.int64()),
    ("n_pred_false", pa.int64()), ("slice_auc", pa.float64()),
    # Afshari et al.'s unsigned distance error: mean symmetric surface distance (mm)
    ("ude_mm", pa.float64()),
    # "hostname:pid" of the process that scored the study: shows how the work was spread
    ("worker", pa.string()),
])
# <out>/slices/<patient>__<study>__<hash8>.parquet: every axial slice's classifier probability and
# reference label, so analyze can pool a slice-level AUC per split (one file per study, written by
# the actor that scored it; label null for unlabeled studies).
SLICE_SCHEMA = pa.schema([
    ("patient_id", pa.string()), ("study_id", pa.string()), ("split", pa.string()),
    ("z", pa.int64()), ("prob", pa.float64()), ("label", pa.bool_()),
])
REF_FIELDS = ("patient_id", "study_id", "suv_path", "ct_path", "seg_path", "split", "diagnosis")
# What the Ray Data pipeline carries back to the driver: one small row per study (the metrics rows
# themselves go straight to the study's Parquet file, so the driver never holds a cohort's rows).
STATUS_SCHEMA = pa.schema([
    ("patient_id", pa.string()), ("study_id", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("n_rows", pa.int64()), ("seconds", pa.float64()), ("file", pa.string()),
])
# What the GPU half hands the CPU half when scoring is split: the ref, the packed StudyMasks (None
# for a failed study), the error, the GPU half's seconds and which process computed the masks.
MASKS_SCHEMA = pa.schema([(k, pa.string()) for k in REF_FIELDS] + [
    ("masks", pa.large_binary()), ("error", pa.string()), ("seconds", pa.float64()),
    ("worker", pa.string()),
])


def worker_id() -> str:
    """`hostname:pid` of this scoring process (the rows' `worker` column)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def write_study_table(table: pa.Table, path: Path) -> None:
    """Write one study's rows atomically: hidden temp name in the same folder, then `os.replace`.

    The temp name starts with '.', which pyarrow (and so `pd.read_parquet(folder)`) never reads,
    so a writer killed mid-write leaves nothing a reader or a resumed run would take for a result.
    """
    write_parquet(path, table)


def _none_if_missing(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def slice_table_path(out: str | Path, patient_id: str, study_id: str) -> Path:
    """`<out>/slices/<patient>__<study>__<hash8>.parquet` (the same key as the study's metrics)."""
    return RunFolder(out).study_slices(patient_id, study_id)


def write_slice_table(path: Path, patient_id: str, study_id: str, split: str | None,
                      probs: np.ndarray, labels: np.ndarray | None) -> None:
    """One study's per-slice tumour probabilities and labels, written atomically (`write_study_table`)."""
    n = len(probs)
    table = pa.Table.from_pydict({
        "patient_id": [patient_id] * n, "study_id": [study_id] * n, "split": [split] * n,
        "z": np.arange(n, dtype=np.int64), "prob": np.asarray(probs, dtype=np.float64),
        "label": [None] * n if labels is None else np.asarray(labels, dtype=bool),
    }, schema=SLICE_SCHEMA)
    write_study_table(table, path)


@dataclass
class StudyMasks:
    """One study's masks and what measuring and writing them needs: the hand-over from the GPU half
    of scoring (`StudyMasker`) to the CPU half (`StudyFinisher`).

    Arrays are on the SUV grid. In one process they are the study's own arrays; between processes
    `pack` sends each mask and the reference as bounding box + packed bits and the SUV only inside
    the box of all of them (the only voxels TLG sums), so `unpack` gives back equal masks and an SUV
    that is equal wherever the metrics read it (`wsseg_core.packing`).
    """

    suv: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    spacing_mm: np.ndarray
    probs: np.ndarray
    n_flagged: int
    masks: dict[str, np.ndarray]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def pack(self) -> bytes:
        """A compact pickle: packed masks and reference, the SUV cropped to their union's box."""
        import pickle

        from wsseg_core.packing import crop_volume, pack_mask, union_box

        masks = {m: pack_mask(v) for m, v in self.masks.items()}
        seg = None if self.seg is None else pack_mask(self.seg)
        box = union_box(list(masks.values()) + ([seg] if seg is not None else []))
        return pickle.dumps({"suv": crop_volume(self.suv, box), "seg": seg, "masks": masks,
                             "affine": self.affine, "spacing_mm": self.spacing_mm,
                             "probs": self.probs, "n_flagged": self.n_flagged},
                            protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def unpack(cls, blob: bytes) -> "StudyMasks":
        import pickle

        from wsseg_core.packing import uncrop_volume, unpack_mask

        d = pickle.loads(blob)  # written by StudyMasker.pack in this job: trusted
        return cls(suv=uncrop_volume(d["suv"]),
                   seg=None if d["seg"] is None else unpack_mask(d["seg"]),
                   affine=d["affine"], spacing_mm=d["spacing_mm"], probs=d["probs"],
                   n_flagged=d["n_flagged"], masks={m: unpack_mask(v) for m, v in d["masks"].items()})


def _failure_text(ref, e: Exception) -> str:
    """A failed row's `error`: a StudyError already names the file and the problem; anything else
    is unexpected, so it gets the study's SUV path and the exception's type."""
    from wsseg_core.data import StudyError

    return str(e) if isinstance(e, StudyError) else f"{ref.suv_path}: {type(e).__name__}: {e}"


def _base_row(ref) -> dict:
    return {"patient_id": ref.patient_id, "study_id": ref.study_id, "split": ref.split,
            "suv_path": ref.suv_path, "seg_path": ref.seg_path}


def _failed_rows(ref, methods: Sequence[str], error: str) -> list[dict]:
    LOG.warning("FAILED %s/%s: %s", ref.patient_id, ref.study_id, error)
    return [{**_base_row(ref), "method": m, "status": "failed", "error": error} for m in methods]


def _skipped_rows(ref, skipped: dict[str, str]) -> list[dict]:
    """Rows for methods the classifier's architecture does not define (CAM under the fc head):
    `status = "skipped"`, the reason in `error`; not failures, and not in any statistic."""
    return [{**_base_row(ref), "method": m, "status": "skipped", "error": why}
            for m, why in skipped.items()]


def undefined_methods(classifier_path: str | Path, methods: Sequence[str]) -> dict[str, str]:
    """{method: why} for the CAM methods of `methods` that the classifier cannot compute."""
    from wsseg_core.cams import cam_undefined_reason
    from wsseg_core.models import load_classifier

    if not any(m in CAM_METHODS for m in methods):
        return {}
    model, _, _ = load_classifier(classifier_path)
    return {m: why for m in methods if m in CAM_METHODS
            and (why := cam_undefined_reason(model, m)) is not None}


def _ref_of(rec: dict) -> tuple[dict, Any]:
    from wsseg_core.data import StudyRef

    fields = {k: _none_if_missing(rec.get(k)) for k in REF_FIELDS}
    return fields, StudyRef(**fields)


class StudyMasker:
    """The GPU half of scoring: loads the classifier (and network methods) once, then per study
    reads it, classifies every slice, computes the CAMs of the flagged ones and builds one mask per
    method. As a Ray Data actor it emits one row per study: the ref, the packed `StudyMasks`
    (`masks`, None if the study failed), `error` and its `seconds`."""

    def __init__(self, thresholds: dict[str, dict], out: str, methods: Sequence[str],
                 cam_batch_size: int = 64, num_cpus: float = 1.0,
                 flag_threshold: "float | FlagRule | dict" = 0.5) -> None:
        import torch

        from wsseg_core.cams import CamEngine
        from wsseg_core.models import load_classifier

        setup_logging()
        torch_threads_for(num_cpus)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.run = RunFolder(out)
        self.run.fetch(self.run.classifier,
                       *[self.run.model(MODEL_METHODS[m].checkpoint) for m in methods if m in MODEL_METHODS])
        self.model, self.pre, _ = load_classifier(self.run.classifier)
        self.model.to(self.device).eval()
        from wsseg_core.gate import FlagRule

        # Algorithm 1 step 1 (thresholds.json): p >= a threshold, or the search's flag rule
        self.flag_rule = FlagRule.from_record(flag_threshold)
        self.engine = CamEngine(self.model)
        self.thresholds = thresholds
        self.segmenters = {m: MODEL_METHODS[m].load(self.run.model(MODEL_METHODS[m].checkpoint),
                                                    thresholds.get(m) or {}, device=self.device,
                                                    batch_size=cam_batch_size)
                           for m in methods if m in MODEL_METHODS}
        self.methods = list(methods)
        self.cam_batch_size = cam_batch_size

    def __call__(self, batch: "pd.DataFrame") -> pa.Table:  # noqa: F821
        out: list[dict] = []
        for rec in batch.to_dict("records"):
            fields, ref = _ref_of(rec)
            t0 = time.perf_counter()
            blob, error = None, None
            try:
                blob = self.masks(ref).pack()
            except Exception as e:  # noqa: BLE001 - a bad study must become rows, not stop the cohort
                error = _failure_text(ref, e)
            out.append({**fields, "masks": blob, "error": error, "seconds": time.perf_counter() - t0,
                        "worker": worker_id()})
        return pa.Table.from_pylist(out, schema=MASKS_SCHEMA)

    def masks(self, ref) -> StudyMasks:
        """Read, classify, CAMs, one mask per method (raises on a bad study)."""
        from wsseg_core.data import load_study
        from wsseg_core.inference import classify_volume, flagged_slices, volume_cams

        clock = StageClock()  # seconds per stage, recorded once the study's masks exist
        with clock.stage("read"):
            study = load_study(ref)
        with clock.stage("classify"):
            # The checkpoint's preprocessing (resize, or resample to its pixel_mm), as trained.
            geo = self.pre.geometry(study.suv, study.ct, study.spacing_mm)
            probs = classify_volume(self.model, self.pre, study.suv, study.ct, self.cam_batch_size,
                                    geometry=geo)
            z = flagged_slices(probs, self.flag_rule)
        cam_methods = [m for m in self.methods if METHODS[m].is_cam]
        with clock.stage("cams"):
            maps = volume_cams(self.engine, self.pre, study.suv, study.ct, z, cam_methods,
                               self.cam_batch_size, geometry=geo)
        ctx = StudyContext(flagged_z=z, thresholds=self.thresholds, cams=maps, geometry=geo,
                           segmenters=self.segmenters)
        with clock.stage("segment"):
            masks = segment_study(study, ctx, self.methods)
        clock.flush()
        record_flagged(len(z), int(study.suv.shape[2]), ref.split)
        return StudyMasks(suv=study.suv, seg=study.seg, affine=study.affine,
                          spacing_mm=study.spacing_mm, probs=probs, n_flagged=int(len(z)), masks=masks)


class StudyFinisher:
    """The CPU half of scoring: per study, the metrics of every mask, the mask NIfTIs, the slice
    table, and last the study's result file (atomic: its rename marks the study done).

    As a Ray Data actor it takes `StudyMasker`'s rows and emits the small status rows.
    `kill_once` is a test hook only: {"patient_id", "study_id", "marker"}. The first actor to
    finish that study after computing its rows (masks written, Parquet not yet) creates the marker
    file and SIGKILLs its own process, as a lost node would; Ray restarts the actor and retries the
    study. Never set it in production."""

    def __init__(self, thresholds: dict[str, dict], out: str, methods: Sequence[str],
                 kill_once: dict[str, str] | None = None, skipped: dict[str, str] | None = None) -> None:
        """`methods`: the methods with masks; `skipped`: {method: why} for requested methods the
        classifier does not define (`undefined_methods`), written as `skipped` rows."""
        setup_logging()
        self.run = RunFolder(out)
        self.thresholds = thresholds
        self.methods = list(methods)
        self.kill_once = kill_once
        self.skipped = dict(skipped or {})
        self.clock = StageClock()  # this study's metrics and write seconds, recorded by commit

    def __call__(self, batch: "pd.DataFrame") -> pa.Table:  # noqa: F821
        status: list[dict] = []
        for rec in batch.to_dict("records"):
            fields, ref = _ref_of(rec)
            t0 = time.perf_counter()
            error = _none_if_missing(rec.get("error"))
            if error is not None:
                rows = _failed_rows(ref, self.methods, error) + _skipped_rows(ref, self.skipped)
            else:
                try:
                    rows = self.rows(ref, StudyMasks.unpack(rec["masks"]))
                except Exception as e:  # noqa: BLE001 - a bad study must become rows
                    rows = _failed_rows(ref, self.methods, _failure_text(ref, e)) \
                        + _skipped_rows(ref, self.skipped)
            seconds = float(rec["seconds"]) + time.perf_counter() - t0  # both halves
            for r in rows:
                r["seconds"] = seconds
                r["worker"] = rec.get("worker")  # the GPU actor that scored it
            status.append(self.commit(fields, rows))
        return pa.Table.from_pylist(status, schema=STATUS_SCHEMA)

    def rows(self, ref, sm: StudyMasks) -> list[dict]:
        """Write every mask and compute its row; write the slice table (raises on failure)."""
        from wsseg_core.data import slice_labels, write_mask
        from wsseg_core.metrics import MaskSummary, study_metrics
        from wsseg_core.metrics import roc_auc

        clock = self.clock
        with clock.stage("metrics"):
            labels = None if sm.seg is None else slice_labels(sm.seg)
            auc = float("nan") if labels is None else roc_auc(sm.probs, labels)  # NaN: one class only
        with clock.stage("write"):
            write_slice_table(self.run.study_slices(ref.patient_id, ref.study_id),
                              ref.patient_id, ref.study_id, ref.split, sm.probs, labels)
        with clock.stage("metrics"):
            reference = None if sm.seg is None else MaskSummary(sm.seg)  # labelled once for all methods
        base = _base_row(ref)
        rows, dices = [], []
        for m in self.methods:
            mask = sm.masks[m]
            rel = self.run.mask(m, ref.patient_id, ref.study_id)
            with clock.stage("write"):
                write_mask(self.run.out / rel, mask, sm.affine)
            with clock.stage("metrics"):
                vals = study_metrics(mask, reference, sm.suv, sm.voxel_volume_ml,
                                     spacing_mm=sm.spacing_mm)
            dices.append(f"{m} {vals['dice']:.2f}")
            rows.append({**base, "method": m, "status": "ok", "error": None, **vals,
                         "voxel_volume_ml": sm.voxel_volume_ml, "mask_path": rel.as_posix(),
                         **METHODS[m].row_fields(self.thresholds.get(m, {})),
                         "n_slices": int(sm.suv.shape[2]),
                         "n_flagged_slices": sm.n_flagged, "max_slice_prob": float(sm.probs.max()),
                         "slice_auc": auc})
        LOG.info("scored %s/%s: %d/%d slices flagged; Dice %s", ref.patient_id, ref.study_id,
                 sm.n_flagged, sm.suv.shape[2], ", ".join(dices))
        return rows + _skipped_rows(ref, self.skipped)

    def commit(self, ref: dict, rows: list[dict]) -> dict:
        """Write the study's rows (one rename), publish its files; its status row."""
        self._maybe_die(ref["patient_id"], ref["study_id"])
        path = self.run.study_metrics(ref["patient_id"], ref["study_id"])
        with self.clock.stage("write"):
            # The study's rows become visible in one rename: a resumed run sees all or nothing.
            write_study_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), path)
            self.run.publish(*[r["mask_path"] for r in rows if r.get("mask_path")],
                             self.run.study_slices(ref["patient_id"], ref["study_id"]), path)
        # Counted once the rows are on disk, so the counters equal the rows written.
        self.clock.flush()
        record_study(rows)
        failed = [r for r in rows if r["status"] == "failed"]
        return {"patient_id": ref["patient_id"], "study_id": ref["study_id"],
                "status": "failed" if failed else "ok",
                "error": failed[0]["error"] if failed else None, "n_rows": len(rows),
                "seconds": rows[0]["seconds"] if rows else 0.0, "file": path.name}

    def _maybe_die(self, patient_id: str, study_id: str) -> None:
        """The `kill_once` test hook (see the class)."""
        hook = self.kill_once
        if not hook or (hook["patient_id"], hook["study_id"]) != (patient_id, study_id):
            return
        try:  # O_EXCL: exactly one actor, exactly once, even if two race for it
            fd = os.open(hook["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        LOG.warning("test hook: killing scoring actor pid %d mid-study %s/%s", os.getpid(),
                    patient_id, study_id)
        os.kill(os.getpid(), signal.SIGKILL)


class StudyScorer:
    """Both halves in one Ray Data actor (the CPU-only default, and tests): loads the classifier
    once, then scores one study per call, its arrays never leaving the process."""

    def __init__(self, thresholds: dict[str, dict], out: str, methods: Sequence[str],
                 cam_batch_size: int = 64, num_cpus: float = 1.0,
                 kill_once: dict[str, str] | None = None, flag_threshold: "float | FlagRule | dict" = 0.5,
                 skipped: dict[str, str] | None = None) -> None:
        """`out` is the run folder, a local path or a URI: with a URI, the actor works in the node's
        staging folder (`wsseg_core.run_folder.RunFolder`), fetches the networks once and uploads
        each study's masks and rows as soon as they are written (the rows last: their file marks the
        study done). `kill_once`: the test hook of `StudyFinisher`; `skipped`: methods not computed (see
        `StudyFinisher`), not included in `methods`."""
        self.masker = StudyMasker(thresholds, out, methods, cam_batch_size, num_cpus, flag_threshold)
        self.finisher = StudyFinisher(thresholds, out, methods, kill_once, skipped)
        self.methods = list(methods)

    def __call__(self, batch: "pd.DataFrame") -> pa.Table:  # noqa: F821
        status: list[dict] = []
        for rec in batch.to_dict("records"):
            fields, _ = _ref_of(rec)
            status.append(self.finisher.commit(fields, self.score(**fields)))
        return pa.Table.from_pylist(status, schema=STATUS_SCHEMA)

    def score(self, **ref_fields: Any) -> list[dict]:
        from wsseg_core.data import StudyRef

        ref = StudyRef(**ref_fields)
        t0 = time.perf_counter()
        try:
            rows = self.finisher.rows(ref, self.masker.masks(ref))
        except Exception as e:  # noqa: BLE001 - a bad study must become a row, not stop the cohort
            rows = _failed_rows(ref, self.methods, _failure_text(ref, e)) \
                + _skipped_rows(ref, self.finisher.skipped)
        seconds = time.perf_counter() - t0
        worker = worker_id()
        for r in rows:
            r["seconds"] = seconds
            r["worker"] = worker
        return rows


def _flag_fingerprint(flag: "float | FlagRule | dict") -> dict:
    """The flag rule's part of the scoring fingerprint: a per-slice threshold as before (results
    of runs from before flag rules stay current), a hysteresis rule with its "flag_rule" too."""
    from wsseg_core.gate import FlagRule

    rule = FlagRule.from_record(flag)
    fp: dict = {"flag_threshold": float(rule.threshold)}
    if rule.kind != "threshold":
        fp["flag_rule"] = rule.to_dict()
    return fp


def _fingerprint(run: RunFolder, thresholds: dict[str, dict], methods: Sequence[str],
                 flag_threshold: "float | FlagRule | dict" = 0.5) -> dict:
    """What a study's rows depend on besides its input files: reused only if all of it matches.

    The schema is part of it: files written before a column was added would not share one schema,
    and `pd.read_parquet(<out>/metrics)` needs them to.
    """
    fp = {"methods": sorted(methods),
          "thresholds": {m: thresholds.get(m) for m in sorted(methods)},
          **_flag_fingerprint(flag_threshold),
          "classifier_sha256": run.sha256(run.classifier),
          "models_sha256": {m: run.sha256(run.model(MODEL_METHODS[m].checkpoint))
                            for m in sorted(methods) if m in MODEL_METHODS},
          "schema": [f"{f.name}:{f.type}" for f in METRICS_SCHEMA]}
    return json.loads(json.dumps(fp, sort_keys=True, default=str))  # as it reads back from disk


def score(refs: list, out: str | Path, thresholds: dict[str, dict], *,
          methods: Sequence[str] = DEFAULT_METHODS, concurrency: int | None = None,
          num_gpus_per_actor: float = 0.0, num_cpus_per_actor: float = 1.0,
          cam_batch_size: int = 64, overwrite: bool = False,
          kill_once: dict[str, str] | None = None, flag_threshold: "float | FlagRule | dict" = 0.5,
          split_cpu_stage: bool | None = None,
          cpu_stage_concurrency: int | None = None,
          num_cpus_per_finisher: float = 1.0) -> dict[str, Any]:
    """Score `refs` with a Ray Data actor pool, one Parquet file per study; resumes by default.

    With `split_cpu_stage` (the default when actors hold GPUs) scoring runs in two Ray Data stages:
    `StudyMasker` actors (`concurrency`, each `num_gpus_per_actor` GPUs and `num_cpus_per_actor`
    CPUs) read, classify, compute the CAMs and build the masks, so a GPU never waits on CPU work;
    `StudyFinisher` actors (`cpu_stage_concurrency`, default: the CPUs the first stage leaves,
    each `num_cpus_per_finisher`) compute the metrics and write the masks and result files. The
    masks pass between them packed (`StudyMasks.pack`). Without it (the default on CPU-only
    clusters, where both halves share the same cores anyway) one `StudyScorer` actor does both.

    Studies whose result file already exists in `<out>/metrics/` (computed with the same methods,
    thresholds and classifier, see `_fingerprint`) are not scored again; `overwrite=True` discards
    earlier results first. `kill_once` is a test hook (see `StudyScorer`).

    Returns counts over the whole cohort (`ok_studies`, `failed_studies`, `total_studies`), what
    this call did (`scored_now`, `resumed`), the failed studies with their errors and `record`
    (run.json's "studies" entry: total, ok, failed).

    Raises:
        StaleResultsError: earlier results were computed differently and `overwrite` is False.
        ValueError: a method without thresholds, or two studies whose ids map to the same files.
    """
    import pyarrow.parquet as pq
    import ray

    from jobs.common import auto_parallelism

    run = RunFolder(out)
    out_arg = run.location  # what every actor opens, on any node
    run.fetch(run.classifier,
              *[run.model(MODEL_METHODS[m].checkpoint) for m in methods if m in MODEL_METHODS])
    # A CAM method the classifier's head does not define (CAM under head "fc") gets "skipped" rows.
    # (Without a classifier file the checks below, and then each study, say what is missing.)
    skipped = undefined_methods(run.classifier, methods) if run.classifier.exists() else {}
    for m, why in skipped.items():
        LOG.warning("%s: not computed, rows marked skipped: %s", m, why)
    live = [m for m in methods if m not in skipped]
    missing = [m for m in live if m not in thresholds
               and (m not in MODEL_METHODS or MODEL_METHODS[m].needs_thresholds)]
    if missing:
        raise ValueError(f"no thresholds for methods {missing}")
    absent = [f"{m} ({run.model(MODEL_METHODS[m].checkpoint)})" for m in methods
              if m in MODEL_METHODS and not run.model(MODEL_METHODS[m].checkpoint).exists()]
    if absent:
        raise ValueError(f"no trained network for methods {absent}; train it first (see README)")
    # Masks are named by sanitised ids: two studies that sanitise alike would overwrite each
    # other's masks, so refuse before any work rather than lose one silently.
    seen: dict[Path, tuple] = {}
    for r in refs:
        try:
            key = run.mask("CAM", r.patient_id, r.study_id)
        except ValueError:  # no safe form at all: that study fails on its own, naming the id
            continue
        if key in seen and seen[key] != (r.patient_id, r.study_id):
            raise ValueError(f"studies {seen[key]} and {(r.patient_id, r.study_id)} map to the same "
                             f"output files; make their ids distinct")
        seen[key] = (r.patient_id, r.study_id)

    # With a URI, the URI is the record of what is done; the local folder becomes an exact mirror
    # of it (a result written locally by an actor that died before uploading does not count).
    if overwrite:
        run.discard_remote(run.metrics)
    run.mirror(run.metrics)
    # Raises StaleResultsError where earlier results were computed differently (or carry no record).
    run.claim_results(run.metrics, run.metrics_record,
                      _fingerprint(run, thresholds, methods, flag_threshold), overwrite)
    run.clean_temp_files(run.metrics, run.out / "masks", run.slices)
    done = {r for r in refs if run.study_metrics(r.patient_id, r.study_id).exists()}
    todo = [r for r in refs if r not in done]
    if done:
        LOG.info("resuming: %d of %d studies already scored, scoring %d", len(done), len(refs), len(todo))

    t0 = time.perf_counter()
    if todo:
        split = num_gpus_per_actor > 0 if split_cpu_stage is None else split_cpu_stage
        if concurrency is None:  # one actor per GPU, or per `num_cpus_per_actor` CPUs
            concurrency = auto_parallelism(num_cpus_per_actor, num_gpus_per_actor)
            if split and num_gpus_per_actor <= 0:  # leave the CPU stage a finisher's CPUs
                cpus = ray.cluster_resources().get("CPU", 1)
                concurrency = max(1, int((cpus - num_cpus_per_finisher) // num_cpus_per_actor))
        concurrency = max(1, min(concurrency, len(todo)))
        # One study per block, so a block that Ray drops or retries holds exactly one study.
        ds = ray.data.from_items([r.to_dict() for r in todo], override_num_blocks=len(todo))
        if not split:
            status_ds = ds.map_batches(
                StudyScorer,
                fn_constructor_kwargs=dict(thresholds=thresholds, out=out_arg, methods=live,
                                           cam_batch_size=cam_batch_size, num_cpus=num_cpus_per_actor,
                                           kill_once=kill_once, flag_threshold=flag_threshold,
                                           skipped=skipped),
                batch_size=1, batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
            )
        else:
            if cpu_stage_concurrency is None:  # the CPUs the masking actors leave
                cpus = ray.cluster_resources().get("CPU", 1)
                cpu_stage_concurrency = int((cpus - concurrency * num_cpus_per_actor)
                                            // num_cpus_per_finisher)
            cpu_stage_concurrency = max(1, min(cpu_stage_concurrency, len(todo)))
            LOG.info("split scoring: %d masking actor(s) (%g GPU, %g CPU each), %d CPU-stage actor(s) "
                     "(%g CPU each)", concurrency, num_gpus_per_actor, num_cpus_per_actor,
                     cpu_stage_concurrency, num_cpus_per_finisher)
            masked = ds.map_batches(
                StudyMasker,
                fn_constructor_kwargs=dict(thresholds=thresholds, out=out_arg, methods=live,
                                           cam_batch_size=cam_batch_size, num_cpus=num_cpus_per_actor,
                                           flag_threshold=flag_threshold),
                batch_size=1, batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
            )
            status_ds = masked.map_batches(
                StudyFinisher,
                fn_constructor_kwargs=dict(thresholds=thresholds, out=out_arg, methods=live,
                                           kill_once=kill_once, skipped=skipped),
                batch_size=1, batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=cpu_stage_concurrency),
                num_cpus=num_cpus_per_finisher,
            )
        # Status rows stream back as studies finish: a progress line every 5% of the studies or
        # every minute (studies done, failed, rate, ETA), so a long run's log says where it is.
        progress = ProgressLog(len(todo), every_n=max(1, len(todo) // 20), every_s=60.0, log=LOG)
        status = []
        for row in status_ds.iter_rows():
            status.append(row)
            progress.add(row["status"])
        progress.finish()
        LOG.info("scored %d studies in %.1f s", len(status), time.perf_counter() - t0)
        run.mirror(run.metrics)  # URI: actors on other nodes uploaded their rows; mirror them here

    # Counts over the whole cohort, from the files (the status rows cover only this call's studies).
    files = [str(run.study_metrics(r.patient_id, r.study_id)) for r in refs]
    absent = [f for f in files if not os.path.exists(f)]
    if absent:  # cannot happen unless a file was deleted meanwhile: say so rather than miscount
        raise RuntimeError(f"{len(absent)} studies have no result file after scoring, e.g. {absent[0]}")
    per_study = []
    for f in files:
        t = pq.read_table(f, columns=["patient_id", "study_id", "status", "error"]).to_pylist()
        bad = [r for r in t if r["status"] == "failed"]
        per_study.append(bad[0] if bad else t[0] if t else {"status": "failed", "error": "no rows"})
    failed = [r for r in per_study if r["status"] == "failed"]
    n_rows = sum(pq.read_metadata(f).num_rows for f in files)
    others = {p.name for p in run.metrics.glob("*.parquet")} - {Path(f).name for f in files}
    if others:
        LOG.warning("%s also holds %d result file(s) of studies not in this cohort; pandas will read "
                    "them too (use --overwrite for a folder with only this cohort)",
                    run.metrics, len(others))
    for r in failed[:20]:
        LOG.warning("failed study %s/%s: %s", r["patient_id"], r["study_id"], r["error"])
    where = run.where(run.metrics)
    LOG.info("summary: %d studies, %d ok, %d failed (%d scored now, %d already done) -> %s",
             len(refs), len(refs) - len(failed), len(failed), len(todo), len(done), where)
    return {"metrics": where, "n_rows": n_rows, "total_studies": len(refs),
            "ok_studies": len(refs) - len(failed), "failed_studies": len(failed),
            "scored_now": len(todo), "resumed": len(done),
            "failed": [{"patient_id": r["patient_id"], "study_id": r["study_id"], "error": r["error"]}
                       for r in failed],
            "record": {"total": len(refs), "ok": len(refs) - len(failed), "failed": len(failed)}}


def default_methods(out: str | Path) -> list[str]:
    """Every method that is trained in this run: the CAM methods and Threshold, plus each network
    method (`MODEL_METHODS`) whose checkpoint exists in `<out>/models/`."""
    run = RunFolder(out)
    return list(DEFAULT_METHODS) + [m for m, mm in MODEL_METHODS.items()
                                    if run.exists(run.model(mm.checkpoint))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.score_cohort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                   help="default: every CAM method and Threshold, plus each network method whose checkpoint "
                        "is in <out>/models/ (UNet: unet.pt, MIP-CAM: mipcam.pt, BoxFCN: boxfcn.pt)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="scoring actors (default: as many as the cluster's CPUs or GPUs hold)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--split-cpu-stage", action=argparse.BooleanOptionalAction, default=None,
                   help="metrics and writes in a separate CPU stage, so GPU actors only read, "
                        "classify, compute CAMs and build masks (default: on when actors hold GPUs)")
    p.add_argument("--cpu-stage-concurrency", type=int, default=None,
                   help="CPU-stage actors with --split-cpu-stage (default: the CPUs the GPU actors leave)")
    p.add_argument("--num-cpus-per-finisher", type=float, default=1.0)
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 if any study failed (default: failed studies are rows, exit 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard earlier results in <out>/metrics and score every study again "
                        "(default: resume, scoring only studies without a result file)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from wsseg_core.thresholds import load_flag_rule, load_thresholds

    setup_logging()
    args = build_parser().parse_args(argv)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    methods = args.methods or default_methods(args.out)
    init_ray(args.address)
    try:
        run = RunFolder(args.out)
        run.fetch(run.thresholds, refresh=True)
        res = score(refs, args.out, load_thresholds(run.thresholds),
                    methods=methods, concurrency=args.concurrency,
                    num_gpus_per_actor=args.num_gpus_per_actor,
                    num_cpus_per_actor=args.num_cpus_per_actor,
                    cam_batch_size=PIPELINE_PRESETS[args.preset]["cam_batch_size"],
                    overwrite=args.overwrite, flag_threshold=load_flag_rule(run.thresholds),
                    split_cpu_stage=args.split_cpu_stage,
                    cpu_stage_concurrency=args.cpu_stage_concurrency,
                    num_cpus_per_finisher=args.num_cpus_per_finisher)
    except StaleResultsError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"metrics: {res['metrics']}  ({res['ok_studies']} studies ok, {res['failed_studies']} failed; "
          f"{res['scored_now']} scored now, {res['resumed']} already done)")
    if args.fail_on_error and res["failed_studies"]:
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
