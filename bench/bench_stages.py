"""Issue 20, target 4: one study's scoring path stage by stage at autoPET size, the process's peak
memory per stage, and studies/hour per GPU.

The stages are the scoring actor's own calls, in its order, on phantom studies written as NIfTI at
400 x 400 x 326 voxels, 2.04 x 2.04 x 3 mm (the autoPET grid):

    read      load_study (SUV, CT, SEG from .nii.gz)                           GPU actor (CPU work)
    classify  classify_volume: every axial slice                               GPU actor
    CAMs      volume_cams: the four CAMs of the flagged slices                 GPU actor
    segment   wsseg_core.methods.segment_study, every method: uint8 masks      GPU actor
    metrics   study_metrics (all columns), the reference summarised once       CPU stage
    write     write_mask per method (.nii.gz) + the slice table               CPU stage

The right-hand column is where jobs.score_cohort runs each stage once the GPU work is split from the
CPU work (issue 20, item 2): the GPU actor's time per study bounds a GPU's throughput, the CPU
stage's time says how many CPU cores per GPU keep up with it.

Memory: a thread samples the process's resident set (/proc/self/statm) every 5 ms; the table gives
the peak during each stage (the first study's, which includes one-off costs, and the median over
all), and the resident set after start-up. With --device cuda also torch's peak GPU memory.

    .venv/bin/python bench/bench_stages.py                              # CPU, demo-size classifier
    .venv/bin/python bench/bench_stages.py --device cuda --preset paper --n 4 --flagged-fraction 0.65

(the second is the command for a GPU node: studies/hour per GPU for the full per-study path; with
--classifier PATH a trained classifier's own flagged slices are used).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import default_device, get_classifier, load_info, median  # noqa: E402

AUTOPET_SHAPE = (400, 400, 326)
AUTOPET_SPACING = (2.04, 2.04, 3.0)
STAGES = ("read", "classify", "CAMs", "segment", "metrics", "write")
GPU_ACTOR = ("read", "classify", "CAMs", "segment")
CPU_STAGE = ("metrics", "write")
_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_MIB


class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread; ``peak()`` returns and resets
    the highest value seen since the last call (so each stage gets its own peak)."""

    def __init__(self, interval: float = 0.005) -> None:
        self._peak = _rss_mib()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            v = _rss_mib()
            with self._lock:
                self._peak = max(self._peak, v)

    def peak(self) -> float:
        v = _rss_mib()
        with self._lock:
            p, self._peak = max(self._peak, v), v
        return p

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def score_study_by_stage(ref, model, pre, engine, thresholds: dict, methods: list[str], out: Path,
                         device: str, batch_size: int, flagged_fraction: float | None,
                         sampler: RssSampler) -> tuple[dict, dict, dict, int]:
    """One study through every stage; returns (wall s, CPU s, peak RSS MiB) per stage and the
    number of flagged slices."""
    from jobs.score_cohort import slice_table_path, write_slice_table
    from wsseg_core.methods import CAM_METHODS
    from wsseg_core.data import load_study, slice_labels, write_mask
    from wsseg_core.inference import classify_volume, flagged_slices, volume_cams
    from wsseg_core.methods import StudyContext, segment_study
    from wsseg_core.metrics import MaskSummary, study_metrics

    wall, cpu, rss = {}, {}, {}
    state: dict = {}

    def stage(name, fn):
        sampler.peak()  # reset: this stage's peak only
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        rss[name] = sampler.peak()

    def read():
        state["st"] = load_study(ref)

    def classify():
        st = state["st"]
        # the checkpoint's preprocessing: resize, or resample to its pixel_mm (paper preset)
        state["geo"] = pre.geometry(st.suv, st.ct, st.spacing_mm)
        probs = classify_volume(model, pre, st.suv, st.ct, batch_size, geometry=state["geo"])
        z = flagged_slices(probs)
        if flagged_fraction is not None:  # a fixed CAM workload: the most probable slices
            k = int(round(flagged_fraction * len(probs)))
            z = np.sort(np.argsort(-probs, kind="stable")[:k])
        state["probs"], state["z"] = probs, z

    def cams():
        st = state["st"]
        state["maps"] = volume_cams(engine, pre, st.suv, st.ct, state["z"],
                                    [m for m in methods if m in CAM_METHODS], batch_size,
                                    geometry=state["geo"])

    def segment():  # as the scorer segments: the method registry
        ctx = StudyContext(flagged_z=state["z"], thresholds=thresholds, cams=state["maps"],
                           geometry=state["geo"])
        state["masks"] = segment_study(state["st"], ctx, methods)

    def metrics():
        st = state["st"]
        ref_mask = None if st.seg is None else MaskSummary(st.seg)
        state["rows"] = [study_metrics(mask, ref_mask, st.suv, st.voxel_volume_ml,
                                       spacing_mm=st.spacing_mm) for mask in state["masks"].values()]

    def write():
        st = state["st"]
        for m, mask in state["masks"].items():
            write_mask(out / "masks" / m / f"{ref.patient_id}__{ref.study_id}.nii.gz", mask, st.affine)
        labels = None if st.seg is None else slice_labels(st.seg)
        write_slice_table(slice_table_path(out, ref.patient_id, ref.study_id), ref.patient_id,
                          ref.study_id, ref.split, state["probs"], labels)

    for name, fn in zip(STAGES, (read, classify, cams, segment, metrics, write)):
        stage(name, fn)
    return wall, cpu, rss, len(state["z"])


def build_model(args):
    """The classifier under test: ``--classifier`` if given, else ``--preset`` (small: trained 2
    epochs on phantoms as the other benchmarks do; paper: the paper's VGG16 width, untrained - its
    speed is a trained one's, and ``--flagged-fraction`` stands in for what it would flag)."""
    from wsseg_core.models import build_slice_classifier

    if args.classifier or args.preset == "small":
        model, pre = get_classifier(args.classifier)
    else:
        torch.manual_seed(0)
        model, pre = build_slice_classifier(args.preset)
    return model.to(args.device).eval(), pre


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", default=None, help="a saved classifier (else --preset)")
    ap.add_argument("--preset", default="small", choices=("small", "paper"))
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--n", type=int, default=2, help="studies")
    ap.add_argument("--shape", type=int, nargs=3, default=AUTOPET_SHAPE, metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=AUTOPET_SPACING)
    ap.add_argument("--flagged-fraction", type=float, default=None,
                    help="flag this fraction of the slices (the most probable ones) instead of "
                         "those with p >= 0.5, for a fixed CAM workload (an untrained network flags "
                         "few); the issue's demo classifier flagged 209-230 of 326 (0.64-0.71)")
    ap.add_argument("--batch-size", type=int, default=64, help="slices per forward (the scorer's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    from jobs.score_cohort import DEFAULT_METHODS
    from wsseg_core.thresholds import load_thresholds
    from wsseg_core.cams import CamEngine
    from wsseg_core.phantom import write_phantom_cohort

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsseg-stages-"))
    print(f"machine: {load_info()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    t0 = time.perf_counter()
    refs = write_phantom_cohort(work / "cohort", n=args.n, shape=args.shape, seed=0,
                                negative_fraction=0.0, spacing_mm=args.spacing)
    print(f"{args.n} phantom studies {tuple(args.shape)} at {tuple(args.spacing)} mm written in "
          f"{time.perf_counter() - t0:.1f} s (not timed below)")
    model, pre = build_model(args)
    engine = CamEngine(model)
    methods, thresholds = list(DEFAULT_METHODS), load_thresholds(None)
    sampler = RssSampler()
    # Warm-up (not timed): CUDA context, cuDNN plans, lazy imports, allocator pools.
    from wsseg_core.inference import classify_volume, volume_cams
    from wsseg_core.phantom import make_phantom_study

    warm = make_phantom_study(999, shape=(48, 48, 24), spacing_mm=args.spacing)
    classify_volume(model, pre, warm.suv, warm.ct, args.batch_size, spacing_mm=warm.spacing_mm)
    volume_cams(engine, pre, warm.suv, warm.ct, np.arange(min(args.batch_size, 24)),
                [m for m in methods if m != "Threshold"], args.batch_size, spacing_mm=warm.spacing_mm)
    _sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = sampler.peak()  # resident now; ru_maxrss would include writing the phantoms
    print(f"start-up (libraries, model, warm-up): RSS {base_rss:.0f} MiB; methods {methods}")

    walls, cpus, rsss, flagged = [], [], [], []
    for i, ref in enumerate(refs):
        w, c, r, nf = score_study_by_stage(ref, model, pre, engine, thresholds, methods, work / "out",
                                           args.device, args.batch_size, args.flagged_fraction, sampler)
        walls.append(w), cpus.append(c), rsss.append(r), flagged.append(nf)
        print(f"  study {i}: {nf}/{args.shape[2]} slices flagged; "
              + ", ".join(f"{s} {w[s]:.2f} s" for s in STAGES) + f" [{load_info()}]")
    sampler.close()

    med = {s: median([w[s] for w in walls]) for s in STAGES}
    med_cpu = {s: median([c[s] for c in cpus]) for s in STAGES}
    total = sum(med.values())
    print(f"\nper study, median of {len(refs)} (flagged slices {min(flagged)}-{max(flagged)} of "
          f"{args.shape[2]}; device {args.device}):")
    print(f"{'stage':9s} {'where':11s} {'wall s':>8s} {'CPU s':>8s} {'share':>6s} "
          f"{'peak RSS MiB (first / median)':>30s}")
    for s in STAGES:
        where = "GPU actor" if s in GPU_ACTOR else "CPU stage"
        print(f"{s:9s} {where:11s} {med[s]:8.2f} {med_cpu[s]:8.2f} {100 * med[s] / total:5.1f}% "
              f"{rsss[0][s]:14.0f} / {median([r[s] for r in rsss]):6.0f}")
    gpu_s = sum(med[s] for s in GPU_ACTOR)
    cpu_s = sum(med[s] for s in CPU_STAGE)
    print(f"{'total':21s} {total:8.2f} {sum(med_cpu.values()):8.2f}")
    print(f"GPU actor (read, classify, CAMs, segment): {gpu_s:.2f} s per study; "
          f"of it on the accelerator (classify, CAMs): {med['classify'] + med['CAMs']:.2f} s")
    print(f"CPU stage (metrics, write): {cpu_s:.2f} s per study = {cpu_s / gpu_s:.2f} CPU cores per "
          f"GPU actor to keep up")
    print(f"studies/hour per GPU ({args.device}), GPU actor with the CPU stage beside it: "
          f"{3600 / gpu_s:.0f}; the whole path in one process: {3600 / total:.0f}")
    gpu_peak = max(max(r[s] for s in GPU_ACTOR) for r in rsss)
    cpu_peak = max(max(r[s] for s in CPU_STAGE) for r in rsss)
    print(f"process RSS: {base_rss:.0f} MiB after start-up; peak during the GPU actor's stages "
          f"{gpu_peak:.0f} MiB (+{gpu_peak - base_rss:.0f}), during the CPU stage's {cpu_peak:.0f} MiB "
          f"(+{cpu_peak - base_rss:.0f}; in one process it also holds the study the GPU half read)")
    if args.device.startswith("cuda"):
        print(f"GPU peak memory allocated by torch: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"[{load_info()}] workdir {work}")
    return {"median_s": med, "median_cpu_s": med_cpu, "studies_per_hour_gpu": 3600 / gpu_s,
            "studies_per_hour_serial": 3600 / total, "peak_rss_mib": max(gpu_peak, cpu_peak)}


if __name__ == "__main__":
    main()
