"""Issue 7, targets 3-4: jobs.score_cohort.score end to end vs the bare in-process compute, and the
scoring actor's peak memory for a small vs a 4x larger cohort.

* end to end: `score(refs, out, thresholds)` with one actor holding both CPUs (the same resources as
  the bare loop), Ray start-up (ray.init) timed and reported separately; with --split, scoring
  split into a masking stage and a CPU stage (issue 20), the bare loop unchanged;
* bare: a plain loop doing what each study needs (load_study, classify_volume, volume_cams,
  segment, metrics, write_mask) in this process with the same methods and thresholds;
* memory: our own Ray Data actor wrapping jobs.score_cohort.StudyScorer reports its
  ru_maxrss after every study (the job's schema is untouched); peak for --n vs --n-large studies.

    .venv/bin/python bench/bench_score_cohort.py [--classifier models/classifier.pt] [--n 12] [--n-large 48]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench._common import SHAPE, get_classifier, load_info, median, save_model  # noqa: E402
from jobs.score_cohort import DEFAULT_METHODS, StudyScorer, score  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class RssStudyScorer(StudyScorer):
    """StudyScorer that adds its process's peak RSS (MiB) to each status row (benchmark only), and
    the peak before its first study (libraries, model, engine: the part no cohort size changes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._base_rss = _peak_rss_mb()

    def __call__(self, batch):
        t = super().__call__(batch)
        n = t.num_rows
        t = t.append_column("peak_rss_mb", pa.array([_peak_rss_mb()] * n, pa.float64()))
        return t.append_column("base_rss_mb", pa.array([self._base_rss] * n, pa.float64()))


def bare(refs, out: Path, classifier: Path, thresholds: dict, methods, threads: int) -> None:
    """The same per-study work as the scoring actor, as a plain loop in this process."""
    import torch

    from jobs.common import RunLayout
    from wsseg_core.cams import CamEngine
    from wsseg_core.data import load_study, write_mask
    from wsseg_core.inference import classify_volume, flagged_slices, volume_cams
    from wsseg_core.methods import METHODS, StudyContext
    from wsseg_core.metrics import MaskSummary, study_metrics
    from wsseg_core.models import load_classifier

    torch.set_num_threads(threads)
    model, pre, _ = load_classifier(classifier)
    model.eval()
    engine = CamEngine(model)
    layout = RunLayout(out)
    cams = [m for m in methods if METHODS[m].is_cam]
    for ref in refs:
        st = load_study(ref)
        geo = pre.geometry(st.suv, st.ct, st.spacing_mm)  # the checkpoint's preprocessing
        probs = classify_volume(model, pre, st.suv, st.ct, 64, geometry=geo)
        z = flagged_slices(probs)
        maps = volume_cams(engine, pre, st.suv, st.ct, z, cams, 64, geometry=geo)
        reference = None if st.seg is None else MaskSummary(st.seg)  # as the scorer: once per study
        ctx = StudyContext(flagged_z=z, thresholds=thresholds, cams=maps, geometry=geo)
        for m in methods:
            mask = METHODS[m].segment(st, ctx)  # as the scorer segments
            write_mask(out / layout.mask(m, ref.patient_id, ref.study_id), mask, st.affine)
            study_metrics(mask, reference, st.suv, st.voxel_volume_ml, spacing_mm=st.spacing_mm)


def studies_seconds(out: Path) -> float:
    """Sum over studies of the scoring actor's own per-study time (the `seconds` column)."""
    import pandas as pd

    df = pd.read_parquet(out / "metrics", columns=["patient_id", "study_id", "seconds"])
    return float(df.groupby(["patient_id", "study_id"])["seconds"].first().sum())


def actor_peak_rss(refs, out: Path, thresholds: dict, methods,
                   threads: int) -> tuple[float, float, float]:
    """Run the scoring actor (one, as in the timing run) over ``refs``; its peak RSS (MiB) before
    the first study, after the first study (peaks only grow: the smallest a row reports), and at
    the end."""
    import ray

    ds = ray.data.from_items([r.to_dict() for r in refs], override_num_blocks=len(refs))
    rows = ds.map_batches(
        RssStudyScorer,
        fn_constructor_kwargs=dict(thresholds=thresholds, out=str(out), methods=list(methods),
                                   cam_batch_size=64, num_cpus=threads),
        batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=threads,
    ).take_all()
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"][:2]
    peaks = [r["peak_rss_mb"] for r in rows]
    return min(r["base_rss_mb"] for r in rows), min(peaks), max(peaks)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None)
    p.add_argument("--n", type=int, default=12, help="studies for the timing and the small memory run")
    p.add_argument("--n-large", type=int, default=48, help="studies for the large memory run (0 = skip)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (0 = memory runs only)")
    p.add_argument("--threads", type=int, default=2, help="CPUs: ray.init(num_cpus=...), torch threads")
    p.add_argument("--workdir", default=None)
    p.add_argument("--split", action="store_true",
                   help="score with split_cpu_stage=True: one masking actor with --threads CPUs and "
                        "one CPU-stage actor; Ray gets one logical CPU more than --threads so both "
                        "can be placed (the CPU stage mostly waits for masks; the OS shares the cores)")
    p.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), metavar=("X", "Y", "Z"),
                   help=f"phantom volume size in voxels (default {SHAPE}); larger shows the "
                        "per-study working set above the fixed start-up cost")
    args = p.parse_args(argv)

    import ray

    from wsseg_core.thresholds import load_thresholds
    from wsseg_core.phantom import write_phantom_cohort

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsseg-bench-"))
    model, pre = get_classifier(args.classifier)
    n_all = max(args.n, args.n_large)
    shape = tuple(args.shape)
    all_refs = write_phantom_cohort(work / "cohort", n=n_all, shape=shape, seed=0)
    refs = all_refs[: args.n]
    thresholds = load_thresholds(None)
    methods = list(DEFAULT_METHODS)
    outs = {}
    for name in ("ray", "bare", "mem_small", "mem_large"):
        outs[name] = work / name
        save_model(model, pre, outs[name] / "models" / "classifier.pt")
    print(f"{args.n} phantom studies {shape}, methods {methods}; "
          f"{'split: masking actor + CPU-stage actor' if args.split else 'one scoring actor'}; "
          f"machine: {load_info()}")

    t_init0 = time.perf_counter()
    ray.init(num_cpus=args.threads + int(args.split), include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t_init0
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        t_ray, t_bare, t_studies = [], [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            res = score(refs, outs["ray"], thresholds, methods=methods, concurrency=1,
                        num_cpus_per_actor=args.threads, overwrite=True, split_cpu_stage=args.split,
                        cpu_stage_concurrency=1)
            t_ray.append(time.perf_counter() - t0)
            assert res["ok_studies"] == len(refs), res
            t_studies.append(studies_seconds(outs["ray"]))
            t0 = time.perf_counter()
            bare(refs, outs["bare"], outs["bare"] / "models" / "classifier.pt", thresholds, methods,
                 args.threads)
            t_bare.append(time.perf_counter() - t0)
            print(f"  repeat {rep}: score_cohort {t_ray[-1]:.2f} s (inside studies {t_studies[-1]:.2f} s), "
                  f"bare {t_bare[-1]:.2f} s (ratio {t_ray[-1] / t_bare[-1]:.2f}) [{load_info()}]")
        print(f"ray.init (start-up, excluded): {t_init:.2f} s")
        if args.repeats:
            r, b, st = median(t_ray), median(t_bare), median(t_studies)
            outside = median([a - c for a, c in zip(t_ray, t_studies)])
            print(f"score_cohort end to end: median {r:.2f} s; bare in-process: median {b:.2f} s; "
                  f"ratio {r / b:.2f} (target <= 1.3); per study {r / len(refs):.2f} vs "
                  f"{b / len(refs):.2f} s")
            print(f"  of which inside the actor's studies {st:.2f} s ({st / b:.2f}x bare) and outside them "
                  f"{outside:.2f} s: actor start (imports, model load), scheduling, result records")
        if args.n_large:
            base_s, first_s, small = actor_peak_rss(all_refs[: args.n], outs["mem_small"], thresholds,
                                                    methods, args.threads)
            base_l, first_l, large = actor_peak_rss(all_refs[: args.n_large], outs["mem_large"],
                                                    thresholds, methods, args.threads)
            one = sum(os.path.getsize(x) for x in (all_refs[0].suv_path, all_refs[0].ct_path))
            study_mb = 3 * 4 * int(np.prod(shape)) / 2**20  # SUV, CT, SEG as float32
            print(f"scoring actor peak RSS: {args.n} studies {small:.0f} MiB, {args.n_large} studies "
                  f"{large:.0f} MiB -> {100 * (large / small - 1):+.1f}% (target within 10%)")
            print(f"  before its first study (libraries, model): {base_s:.0f} / {base_l:.0f} MiB; after "
                  f"the first study {first_s:.0f} / {first_l:.0f} MiB (lazy imports, allocator pools, "
                  f"the study's working set); all later studies added {small - first_s:.0f} / "
                  f"{large - first_l:.0f} MiB")
            print(f"  working set above start-up: {small - base_s:.0f} / {large - base_l:.0f} MiB = "
                  f"{(small - base_s) / study_mb:.1f} / {(large - base_l) / study_mb:.1f} x one study in "
                  f"memory (SUV+CT+SEG float32 {study_mb:.1f} MiB; {one / 2**20:.2f} MiB on disk)")
    finally:
        ray.shutdown()
    print(f"[{load_info()}] workdir {work}")


if __name__ == "__main__":
    main()
