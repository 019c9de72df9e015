"""Issue 7, target 5: the (t_m, q_m) search computes every validation study's CAMs once.

Runs the two halves of jobs.tune_thresholds in this process (no Ray, so nothing but the work is
timed): cache_study_cams once per validation study, then evaluate_cell for every grid cell (4 CAM
methods x len(T_GRID) values of t, plus the Threshold baseline; each cell scores every q of Q_GRID
from the cache).  Prints the engine passes counted per study and both times.

    .venv/bin/python bench/bench_tuning.py [--classifier models/classifier.pt] [--n 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._common import SHAPE, get_classifier, load_info, save_model  # noqa: E402
from jobs.tune_thresholds import cache_study_cams, evaluate_cell  # noqa: E402
from wsseg_core.cams import CAM_METHODS, CamEngine  # noqa: E402
from wsseg_core.phantom import write_phantom_cohort  # noqa: E402
from wsseg_core.segment import Q_GRID, T_GRID  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None)
    p.add_argument("--n", type=int, default=6, help="validation studies")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsseg-bench-tuning-"))
    model, pre = get_classifier(args.classifier)
    save_model(model, pre, work / "run" / "models" / "classifier.pt")
    refs = write_phantom_cohort(work / "cohort", n=args.n, shape=SHAPE, seed=7)
    print(f"{args.n} validation studies {SHAPE}; machine: {load_info()}, torch threads {args.threads}")

    slices: list[int] = []
    real_call = CamEngine.__call__

    def counting_call(self, x, methods=CAM_METHODS):
        slices.append(int(x.shape[0]))
        return real_call(self, x, methods)

    CamEngine.__call__ = counting_call  # count the engine's passes; restored below
    try:
        t0 = time.perf_counter()
        files = [f for f in (cache_study_cams(r.to_dict(), str(work / "run"), 64, args.threads)
                             for r in refs) if f]
        t_cache = time.perf_counter() - t0
        passes_after_cache = len(slices)
        q_grid = [float(q) for q in Q_GRID]
        cells = [{"method": m, "t": float(t)} for m in CAM_METHODS for t in T_GRID]
        cells.append({"method": "Threshold", "t": float("nan")})
        t0 = time.perf_counter()
        for cell in cells:
            evaluate_cell({"cell": cell}, files, q_grid)
        t_grid = time.perf_counter() - t0
    finally:
        CamEngine.__call__ = real_call
    assert len(slices) == passes_after_cache, "a grid cell recomputed CAMs"
    cam_cells = len(cells) - 1
    print(f"CAM caching: {len(files)} studies, {passes_after_cache} engine passes over {sum(slices)} "
          f"flagged slices (each slice once, all four methods per pass), {t_cache:.1f} s")
    print(f"grid: {len(cells)} cells x {len(q_grid)} q = {len(cells) * len(q_grid)} points from the cache, "
          f"{t_grid:.1f} s, 0 further engine passes")
    print(f"for scale: one more CAM pass over the validation studies costs {t_cache:.1f} s, and the "
          f"grid has {cam_cells} (method, t) cells")
    print(f"[{load_info()}] workdir {work}")


if __name__ == "__main__":
    main()
