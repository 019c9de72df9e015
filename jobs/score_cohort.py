"""Ray Data: score every study of a cohort with every method; masks as NIfTI, rows as Parquet.

Paths stream through a pool of actors (one GPU each on a cluster, CPU here), each holding the
classifier once. Per study: classify every axial slice, compute the four CAMs of the flagged slices
in one pass, segment with Algorithm 1 (tuned t_m/q_m) and the Threshold baseline, write one uint8
mask per method on the SUV grid, and emit one row per (study, method). A study that cannot be read
becomes `status = "failed"` rows naming the file and the problem; the rest of the cohort goes on.

    python -m jobs.score_cohort --cohort runs/demo/cohort.parquet --out runs/demo
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from jobs.common import (PIPELINE_PRESETS, RunLayout, add_common_args, init_ray, resolve_cohort,
                         setup_logging, torch_threads_for)

LOG = logging.getLogger("wsseg.score_cohort")
CAM_METHOD_NAMES = ("CAM", "GradCAM", "GradCAM++", "ScoreCAM")
DEFAULT_METHODS = CAM_METHOD_NAMES + ("Threshold",)

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
])
# <out>/slices/<patient>__<study>__<hash8>.parquet: every axial slice's classifier probability and
# reference label, so analyze can pool a slice-level AUC per split (one file per study, written by
# the actor that scored it; label null for unlabeled studies).
SLICE_SCHEMA = pa.schema([
    ("patient_id", pa.string()), ("study_id", pa.string()), ("split", pa.string()),
    ("z", pa.int64()), ("prob", pa.float64()), ("label", pa.bool_()),
])
REF_FIELDS = ("patient_id", "study_id", "suv_path", "ct_path", "seg_path", "split", "diagnosis")


def _none_if_missing(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def slice_table_path(out: str | Path, patient_id: str, study_id: str) -> Path:
    """`<out>/slices/<patient>__<study>__<hash8>.parquet`; the hash keeps sanitised ids distinct."""
    import hashlib

    from jobs.common import safe_name

    def part(identifier: str) -> str:
        try:
            return safe_name(identifier)
        except ValueError:  # an id with no safe form (e.g. "..") keeps only the hash
            return "id"

    digest = hashlib.sha256(f"{patient_id}\x00{study_id}".encode()).hexdigest()[:8]
    return Path(out) / "slices" / f"{part(patient_id)}__{part(study_id)}__{digest}.parquet"


def write_slice_table(path: Path, patient_id: str, study_id: str, split: str | None,
                      probs: np.ndarray, labels: np.ndarray | None) -> None:
    """One study's per-slice tumour probabilities and labels, written atomically (hidden temp name,
    which Parquet readers skip, then `os.replace`)."""
    import os

    import pyarrow.parquet as pq

    n = len(probs)
    table = pa.Table.from_pydict({
        "patient_id": [patient_id] * n, "study_id": [study_id] * n, "split": [split] * n,
        "z": np.arange(n, dtype=np.int64), "prob": np.asarray(probs, dtype=np.float64),
        "label": [None] * n if labels is None else np.asarray(labels, dtype=bool),
    }, schema=SLICE_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StudyScorer:
    """A Ray Data actor: loads the classifier once, then scores one study per call."""

    def __init__(self, classifier_path: str, thresholds: dict[str, dict], out: str,
                 methods: Sequence[str], cam_batch_size: int = 64, num_cpus: float = 1.0) -> None:
        import torch

        from wsseg_core.cams import CamEngine
        from wsseg_core.models import load_classifier

        setup_logging()
        torch_threads_for(num_cpus)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.pre, _ = load_classifier(classifier_path)
        self.model.to(self.device).eval()
        self.engine = CamEngine(self.model)
        self.thresholds = thresholds
        self.layout = RunLayout(Path(out))
        self.methods = list(methods)
        self.cam_batch_size = cam_batch_size

    def __call__(self, batch: "pd.DataFrame") -> pa.Table:  # noqa: F821
        rows: list[dict] = []
        for rec in batch.to_dict("records"):
            rows.extend(self.score(**{k: _none_if_missing(rec.get(k)) for k in REF_FIELDS}))
        return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)

    def score(self, **ref_fields: Any) -> list[dict]:
        from wsseg_core.data import StudyRef

        ref = StudyRef(**ref_fields)
        t0 = time.perf_counter()
        base = {"patient_id": ref.patient_id, "study_id": ref.study_id, "split": ref.split,
                "suv_path": ref.suv_path, "seg_path": ref.seg_path}
        try:
            rows = self._score_ok(ref, base)
        except Exception as e:  # noqa: BLE001 - a bad study must become a row, not stop the cohort
            error = str(e) if type(e).__name__ == "StudyError" else f"{ref.suv_path}: {type(e).__name__}: {e}"
            LOG.warning("FAILED %s/%s: %s", ref.patient_id, ref.study_id, error)
            rows = [{**base, "method": m, "status": "failed", "error": error} for m in self.methods]
        seconds = time.perf_counter() - t0
        for r in rows:
            r["seconds"] = seconds
        return rows

    def _score_ok(self, ref, base: dict) -> list[dict]:
        from wsseg_core.data import load_study, slice_labels, write_mask
        from wsseg_core.inference import classify_volume, flagged_slices, volume_cams
        from wsseg_core.metrics import study_metrics
        from wsseg_core.segment import segment_volume, threshold_volume
        from wsseg_core.train import roc_auc

        study = load_study(ref)
        probs = classify_volume(self.model, self.pre, study.suv, study.ct, self.cam_batch_size)
        z = flagged_slices(probs)
        labels = None if study.seg is None else slice_labels(study.seg)
        auc = float("nan") if labels is None else roc_auc(probs, labels)  # NaN: one class only
        write_slice_table(slice_table_path(self.layout.out, ref.patient_id, ref.study_id),
                          ref.patient_id, ref.study_id, ref.split, probs, labels)
        cam_methods = [m for m in self.methods if m in CAM_METHOD_NAMES]
        maps = volume_cams(self.engine, self.pre, study.suv, study.ct, z, cam_methods,
                           self.cam_batch_size)
        rows, dices = [], []
        for m in self.methods:
            th = self.thresholds[m]
            if m == "Threshold":
                mask = threshold_volume(study.suv, z, th["q"], reference=th.get("reference", "body"),
                                        ct=study.ct)
            else:
                mask = segment_volume(study.suv, z, maps[m], th["t"], th["q"])
            rel = self.layout.mask(m, ref.patient_id, ref.study_id)
            write_mask(self.layout.out / rel, mask, study.affine)
            vals = study_metrics(mask, study.seg, study.suv, study.voxel_volume_ml,
                                 spacing_mm=study.spacing_mm)
            dices.append(f"{m} {vals['dice']:.2f}")
            rows.append({**base, "method": m, "status": "ok", "error": None, **vals,
                         "voxel_volume_ml": study.voxel_volume_ml, "mask_path": rel.as_posix(),
                         "t_m": th.get("t"), "q_m": th["q"], "n_slices": int(study.suv.shape[2]),
                         "n_flagged_slices": int(len(z)), "max_slice_prob": float(probs.max()),
                         "slice_auc": auc})
        LOG.info("scored %s/%s: %d/%d slices flagged; Dice %s", ref.patient_id, ref.study_id,
                 len(z), study.suv.shape[2], ", ".join(dices))
        return rows


def score(refs: list, out: str | Path, thresholds: dict[str, dict], *,
          methods: Sequence[str] = DEFAULT_METHODS, concurrency: int | None = None,
          num_gpus_per_actor: float = 0.0, num_cpus_per_actor: float = 1.0,
          cam_batch_size: int = 64) -> dict[str, Any]:
    """Score `refs` with a Ray Data actor pool; `<out>/metrics/` appears only when complete."""
    import pandas as pd
    import ray

    from jobs.common import auto_parallelism

    layout = RunLayout(Path(out).absolute())
    if concurrency is None:  # one actor per GPU, or per `num_cpus_per_actor` CPUs
        concurrency = auto_parallelism(num_cpus_per_actor, num_gpus_per_actor)
    missing = [m for m in methods if m not in thresholds]
    if missing:
        raise ValueError(f"no thresholds for methods {missing}")
    ds = ray.data.from_items([r.to_dict() for r in refs], override_num_blocks=max(1, len(refs)))
    scored = ds.map_batches(
        StudyScorer,
        fn_constructor_kwargs=dict(classifier_path=str(layout.classifier), thresholds=thresholds,
                                   out=str(layout.out), methods=list(methods),
                                   cam_batch_size=cam_batch_size, num_cpus=num_cpus_per_actor),
        batch_size=1, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
    )
    # Written under a temporary name and renamed when complete: readers never see half a run.
    tmp = layout.out / f".metrics-{uuid.uuid4().hex[:8]}"
    scored.write_parquet(str(tmp))
    if layout.metrics.exists():
        shutil.rmtree(layout.metrics)
    tmp.rename(layout.metrics)
    df = pd.read_parquet(layout.metrics)
    counts = df.drop_duplicates(["patient_id", "study_id"])["status"].value_counts().to_dict()
    LOG.info("scored %d studies: %d ok, %d failed -> %s", df[["patient_id", "study_id"]].drop_duplicates().shape[0],
             counts.get("ok", 0), counts.get("failed", 0), layout.metrics)
    return {"metrics": str(layout.metrics), "n_rows": len(df), "ok_studies": counts.get("ok", 0),
            "failed_studies": counts.get("failed", 0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.score_cohort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=DEFAULT_METHODS)
    p.add_argument("--concurrency", type=int, default=None,
                   help="scoring actors (default: as many as the cluster's CPUs or GPUs hold)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 if any study failed (default: failed studies are rows, exit 0)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jobs.tune_thresholds import load_thresholds

    setup_logging()
    args = build_parser().parse_args(argv)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    init_ray(args.address)
    res = score(refs, args.out, load_thresholds(RunLayout(Path(args.out)).thresholds),
                methods=args.methods, concurrency=args.concurrency,
                num_gpus_per_actor=args.num_gpus_per_actor, num_cpus_per_actor=args.num_cpus_per_actor,
                cam_batch_size=PIPELINE_PRESETS[args.preset]["cam_batch_size"])
    print(f"metrics: {res['metrics']}  ({res['ok_studies']} studies ok, {res['failed_studies']} failed)")
    if args.fail_on_error and res["failed_studies"]:
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
