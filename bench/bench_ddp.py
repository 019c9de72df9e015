"""Issue 17: the classifier's training epoch at 1 and 2 Ray Train workers (DDP, gloo on CPU).

Runs jobs.train_classifier.fit on a phantom cohort with the same GLOBAL batch at each worker count
(so the same steps per epoch and the same learning dynamics) and prints, per worker count, the
median training time of an epoch (rank 0's wall time of its steps, as the job reports it in
`train_s`), the steps per epoch, and the whole fit's wall time (start-up, validation and
checkpoints included). On a 2-core machine expect little gain: 2 workers split the same 2 cores.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_ddp.py [--n 6] [--epochs 3] [--batch 32] [--workers 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import SHAPE, load_info  # noqa: E402


def main(argv=None) -> dict[int, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6, help="training studies (phantoms, 64x64x40)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="GLOBAL batch (split across the workers)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=float, default=None,
                   help="CPUs per worker (default: the cluster's CPUs shared among the workers)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (median reported)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--preset", default="small", help="classifier preset (small or paper)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import ray

    from jobs.train_classifier import fit
    from wsseg_core.phantom import write_phantom_cohort

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsseg-bench-ddp-"))
    refs = write_phantom_cohort(work / "cohort", n=args.n + 1, shape=SHAPE, seed=11,
                                negative_fraction=0.0)
    train, val = refs[:-1], refs[-1:]
    if not ray.is_initialized():
        # On a cluster (RAY_ADDRESS set, or under `ray job submit`) this joins it.
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else
                    dict(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)))
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
    # Interleaved repeats (1, 2, 1, 2, ...): on a shared machine the load drifts within minutes.
    for rep in range(args.repeats):
        for n in args.workers:
            t0 = time.perf_counter()
            res = fit(train, val, work / f"w{n}_r{rep}", model_preset=args.preset, epochs=args.epochs,
                      batch_size=args.batch, lr=0.01, weights=None, num_workers=n,
                      use_gpu=args.use_gpu, cpus_per_worker=args.cpus, max_failures=0,
                      name=f"bench_w{n}_r{rep}")
            wall = time.perf_counter() - t0
            hist = res["history"]
            epoch_s = statistics.median(float(h["train_s"]) for h in hist)
            runs[n].append({"epoch_s": epoch_s, "fit_s": wall, "steps": int(hist[-1]["steps"])})
            print(f"repeat {rep}: {n} worker(s): training epoch {epoch_s:.2f} s (median of "
                  f"{len(hist)} reported epochs), {runs[n][-1]['steps']} steps of global batch "
                  f"{args.batch}; whole fit {wall:.1f} s [{load_info()}]", flush=True)
    out = {n: {k: statistics.median(r[k] for r in rs) for k in ("epoch_s", "fit_s", "steps")}
           for n, rs in runs.items()}
    for n, r in out.items():
        print(f"median over {args.repeats} repeat(s): {n} worker(s): epoch {r['epoch_s']:.2f} s, "
              f"fit {r['fit_s']:.1f} s")
    if 1 in out:
        for n, r in out.items():
            if n != 1:
                print(f"speed-up of an epoch at {n} workers: {out[1]['epoch_s'] / r['epoch_s']:.2f}x")
    return out


if __name__ == "__main__":
    main()
