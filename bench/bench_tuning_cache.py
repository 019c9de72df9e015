"""Issue 20, item 3, without a classifier: the tuning cache's bytes and the trials' time at autoPET size.

bench_tuning.py measures the same through cache_study_cams, whose CAMs (ScoreCAM's forward per
channel and slice) take most of its time on a CPU. The cache's size does not depend on the CAMs'
values: it is the grid's counts (fixed size) plus the CAMs at map resolution, 4 methods x h x w
float32 per flagged slice. So here one phantom study is made in memory, its `--flagged` most
tumour-bearing slices are flagged, and random CAMs of `--map-size` (8: the small preset's 64 / 8;
32: the paper's 256 / 8) stand in for the engine's. Printed: the cache file's bytes for the paper's
q grid and the small preset's (80 values) against the SUV + CT + SEG bytes the cache held until
issue 20, the bytes per further flagged slice, and the five trials (4 CAM methods + Threshold) the
old way (volumes in an uncompressed npz, dice_grid on the full volumes) against evaluate_cell on the
new cache, with the per-study grids compared bit for bit.

    .venv/bin/python bench/bench_tuning_cache.py                      # autoPET size, 8 flagged, 8x8 and 32x32
    .venv/bin/python bench/bench_tuning_cache.py --shape 48 48 24 --flagged 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench._common import load_info  # noqa: E402
from bench.bench_tuning import _old_trial  # noqa: E402
from jobs.tune_thresholds import evaluate_cell  # noqa: E402
from wsseg_core.cams import CAM_METHODS  # noqa: E402
from wsseg_core.gridcache import (GridCache, build_grid_cache, cache_dice_grid,  # noqa: E402
                                  cache_threshold_dice_grid)
from wsseg_core.phantom import make_phantom_study  # noqa: E402
from wsseg_core.segment import Q_GRID, T_GRID, THRESHOLD_REFERENCE  # noqa: E402

SMALL_Q_GRID = np.linspace(20, 99, 80)  # the small preset's (jobs.common.PIPELINE_PRESETS)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[400, 400, 326])
    p.add_argument("--spacing", type=float, nargs=3, default=[2.04, 2.04, 3.0])
    p.add_argument("--flagged", type=int, default=8, help="flagged slices (the most tumour-bearing)")
    p.add_argument("--map-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsseg-bench-tuning-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    st = make_phantom_study(7, shape=tuple(args.shape), spacing_mm=tuple(args.spacing))
    vol = st.suv.nbytes + st.ct.nbytes + st.seg.nbytes
    per_z = (st.seg > 0).sum(axis=(0, 1))
    z = np.sort(np.argsort(-per_z, kind="stable")[:args.flagged])
    rng = np.random.default_rng(0)
    print(f"study {st.suv.shape} ({vol} B as SUV + CT + SEG), {z.size} flagged slices; {load_info()}")
    res: dict = {"volume_bytes": vol, "cache_bytes": {}}
    t_grid = [float(t) for t in T_GRID]
    for hw in args.map_sizes:
        cams = {m: rng.random((z.size, hw, hw)).astype(np.float32) for m in CAM_METHODS}
        for name, q_grid in (("paper q grid (20)", Q_GRID), ("small q grid (80)", SMALL_Q_GRID)):
            t0 = time.process_time()
            cache = build_grid_cache(st.suv, st.seg, z, cams, t_grid, q_grid, THRESHOLD_REFERENCE, st.ct)
            t_counts = time.process_time() - t0
            f = work / f"cache_{hw}_{len(q_grid)}.npz"
            np.savez(f, patient_id=np.array("p"), **cache.to_arrays())
            b = os.path.getsize(f)
            res["cache_bytes"][(hw, len(q_grid))] = b
            print(f"  CAMs {hw}x{hw}, {name}: cache {b} B = {100 * b / vol:.4f} % of the volumes "
                  f"(+{4 * hw * hw * 4 + 8} B per further flagged slice); counts {t_counts:.2f} CPU s")
    # The trials, old vs new, on the last map size and the paper's q grid.
    q = [float(v) for v in Q_GRID]
    newf = work / f"cache_{args.map_sizes[-1]}_{len(q)}.npz"
    oldf = work / "old.npz"
    with np.load(newf) as a:
        cache = GridCache.from_arrays(a)
    np.savez(oldf, suv=st.suv, ct=st.ct, seg=st.seg, flagged_z=z, patient_id=np.array("p"),
             **{f"cam_{m}": c for m, c in cache.cams.items()})
    trials = [{"method": m, "ts": t_grid} for m in CAM_METHODS] + [{"method": "Threshold", "ts": [float("nan")]}]
    t0, c0 = time.perf_counter(), time.process_time()
    old = {tr["method"]: _old_trial(tr["method"], tr["ts"], [oldf], q)[0] for tr in trials}
    t_old, c_old = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for tr in trials:
        evaluate_cell({"cell": tr}, [str(newf)], q)
    t_new, c_new = time.perf_counter() - t0, time.process_time() - c0
    same = all(np.asarray(old[m], np.float64).tobytes() == np.asarray(
        cache_threshold_dice_grid(cache, q) if m == "Threshold" else cache_dice_grid(cache, m, t_grid, q),
        np.float64).tobytes() for m in old)
    print(f"5 trials: old (volumes, {os.path.getsize(oldf)} B file) {t_old:.2f} s wall / {c_old:.2f} CPU s, "
          f"new (cache) {t_new:.3f} s wall / {c_new:.3f} CPU s")
    print(f"grids old vs new bit-identical: {'OK' if same else 'DIFFERENT'}")
    print(f"[{load_info()}] workdir {work}")
    res.update(t_old=t_old, t_new=t_new, identical=same)
    return res


if __name__ == "__main__":
    main()
