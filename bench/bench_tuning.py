"""Issue 7, target 5: the (t_m, q_m) search computes every validation study's CAMs once.
Issue 20, item 3: the cache holds only what the grid needs (wsseg_core.gridcache), not the volumes.

Runs the two halves of jobs.tune_thresholds in this process (no Ray, so nothing but the work is
timed): cache_study_cams once per validation study, then evaluate_cell for every grid cell (4 CAM
methods x len(T_GRID) values of t, plus the Threshold baseline; each cell scores every q of Q_GRID
from the cache).  Prints the engine passes counted per study and both times.

Then the cache against the volumes it replaces: its bytes on disk against the SUV + CT + SEG bytes
the cache stored until issue 20 (per study and in all); what a sparse cache of every voxel a grid
point can select would take (the regions at min(T_GRID) of the four CAMs and the Threshold mask at
min(Q_GRID), 9 bytes a voxel: index, SUV, SEG bit), the design the counts replaced; the time the
grid's counts add to caching; and the same trials the old way (the volumes in an uncompressed npz,
read and scored by segment.dice_grid / threshold_dice_grid on the full volumes), timed, with every
per-study grid compared bit for bit (--no-old skips the old trials).

    .venv/bin/python bench/bench_tuning.py [--classifier models/classifier.pt] [--n 6]
    .venv/bin/python bench/bench_tuning.py --n 2 --shape 400 400 326 --spacing 2.04 2.04 3  # autoPET
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
import torch  # noqa: E402

from bench._common import SHAPE, get_classifier, load_info, save_model  # noqa: E402
from jobs.tune_thresholds import cache_study_cams, evaluate_cell  # noqa: E402
from wsseg_core.cams import CAM_METHODS, CamEngine  # noqa: E402
from wsseg_core.data import load_study  # noqa: E402
from wsseg_core.gridcache import (GridCache, build_grid_cache, cache_dice_grid,  # noqa: E402
                                  cache_threshold_dice_grid)
from wsseg_core.phantom import write_phantom_cohort  # noqa: E402
from wsseg_core.segment import (Q_GRID, T_GRID, THRESHOLD_REFERENCE, cam_region,  # noqa: E402
                                dice_grid, threshold_dice_grid, threshold_slice)


def _superset_voxels(suv: np.ndarray, flagged_z: np.ndarray, cams: dict[str, np.ndarray]) -> int:
    """Voxels some grid point can select: per flagged slice the union of the CAM regions at
    min(T_GRID) (regions shrink as t grows) and the Threshold mask at min(Q_GRID) (masks shrink
    as q grows)."""
    n = 0
    for i, z in enumerate(flagged_z):
        s = suv[:, :, z]
        keep = threshold_slice(s, float(np.min(Q_GRID)), THRESHOLD_REFERENCE)
        for c in cams.values():
            keep |= cam_region(c[i], float(np.min(T_GRID)), s.shape)
        n += int(keep.sum())
    return n


def _old_trial(method: str, ts: list[float], old_files: list[Path], q_grid: list[float]) -> list[np.ndarray]:
    """One trial as evaluate_cell ran it before issue 20: every study's volumes read from an
    uncompressed npz, its grid computed on the full volumes."""
    grids = []
    for f in old_files:
        with np.load(f) as c:
            if method == "Threshold":
                grids.append(threshold_dice_grid(c["suv"], c["seg"], c["flagged_z"], q_grid,
                                                 reference=THRESHOLD_REFERENCE, ct=c["ct"]))
            else:
                grids.append(dice_grid(c["suv"], c["seg"], c["flagged_z"], c[f"cam_{method}"], ts, q_grid))
    return grids


def compare_with_volumes(refs, files: list[str], trials: list[dict], q_grid: list[float], work: Path,
                         old: bool = True) -> dict:
    """Cache bytes against volume bytes; with `old`, the old trials' time and bit-identical grids."""
    vol_bytes, cache_bytes, sparse_bytes, flagged, old_files = [], [], [], [], []
    t_counts = t_old_write = 0.0
    for i, (r, f) in enumerate(zip(refs, files)):
        st = load_study(r)
        vol_bytes.append(st.suv.nbytes + st.ct.nbytes + st.seg.nbytes)
        cache_bytes.append(os.path.getsize(f))
        with np.load(f) as c:
            z = c["flagged_z"]
            cams = {k[4:]: c[k] for k in c.keys() if k.startswith("cam_")}
            patient = c["patient_id"]
        flagged.append(int(z.size))
        sparse_bytes.append(9 * _superset_voxels(st.suv, z, cams))
        t0 = time.perf_counter()  # the work cache_study_cams now does besides the CAMs
        build_grid_cache(st.suv, st.seg, z, cams, T_GRID, Q_GRID, THRESHOLD_REFERENCE, st.ct)
        t_counts += time.perf_counter() - t0
        if old:  # the pre-issue-20 cache file of this study
            old_files.append(work / "old_cache" / f"{i}.npz")
            old_files[-1].parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            np.savez(old_files[-1], suv=st.suv, ct=st.ct, seg=st.seg, flagged_z=z, patient_id=patient,
                     **{f"cam_{m}": v for m, v in cams.items()})
            t_old_write += time.perf_counter() - t0
        print(f"  study {i}: {st.suv.shape}, {flagged[-1]} flagged slices: cache {cache_bytes[-1] / 2**20:.2f} MiB"
              f" vs volumes {vol_bytes[-1] / 2**20:.1f} MiB ({100 * cache_bytes[-1] / vol_bytes[-1]:.2f} %); "
              f"sparse superset {sparse_bytes[-1] / 2**20:.1f} MiB ({100 * sparse_bytes[-1] / vol_bytes[-1]:.1f} %)")
    pct = 100 * sum(cache_bytes) / sum(vol_bytes)
    print(f"cache bytes vs volume bytes: {sum(cache_bytes) / 2**20:.2f} MiB vs {sum(vol_bytes) / 2**20:.1f} MiB "
          f"= {pct:.2f} % (target <= 5 %)")
    print(f"a sparse cache of the voxels any grid point can select would be {sum(sparse_bytes) / 2**20:.1f} MiB "
          f"= {100 * sum(sparse_bytes) / sum(vol_bytes):.1f} %")
    print(f"caching: the grid's counts take {t_counts:.1f} s for {len(files)} studies (the trials' work, done "
          f"once)" + (f"; writing the old volume npz took {t_old_write:.1f} s" if old else ""))
    res = {"cache_bytes": sum(cache_bytes), "volume_bytes": sum(vol_bytes), "percent": pct,
           "sparse_bytes": sum(sparse_bytes), "t_counts": t_counts}
    if not old:
        return res
    t0 = time.perf_counter()
    old_grids = {c["method"]: _old_trial(c["method"], c["ts"], old_files, q_grid) for c in trials}
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in trials:
        evaluate_cell({"cell": c}, files, q_grid)
    t_new = time.perf_counter() - t0
    n_same = n_all = 0
    for f_i, f in enumerate(files):
        with np.load(f) as a:
            cache = GridCache.from_arrays(a)
        for c in trials:
            new = (cache_threshold_dice_grid(cache, q_grid) if c["method"] == "Threshold"
                   else cache_dice_grid(cache, c["method"], c["ts"], q_grid))
            n_all += 1
            n_same += np.asarray(new, np.float64).tobytes() == np.asarray(old_grids[c["method"]][f_i],
                                                                          np.float64).tobytes()
    print(f"trials ({len(trials)}, every study each): old (volumes) {t_old:.2f} s, new (cache) {t_new:.3f} s"
          f" = {t_old / max(t_new, 1e-9):.0f}x")
    print(f"grids old vs new, (study, trial) pairs with identical bits: {n_same}/{n_all} -> "
          f"{'OK' if n_same == n_all else 'DIFFERENT'}")
    return {**res, "t_old": t_old, "t_new": t_new, "identical": n_same == n_all}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None)
    p.add_argument("--n", type=int, default=6, help="validation studies")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), metavar=("X", "Y", "Z"),
                   help="phantom volume size; autoPET: 400 400 326")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (default the phantom's); autoPET: 2.04 2.04 3")
    p.add_argument("--flag-threshold", type=float, default=0.5,
                   help="slices with p >= this get CAMs and enter the cache (0: every slice)")
    p.add_argument("--no-old", action="store_true", help="skip the old (full-volume) trials")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsseg-bench-tuning-"))
    model, pre = get_classifier(args.classifier)
    save_model(model, pre, work / "run" / "models" / "classifier.pt")
    shape = tuple(args.shape)
    kw = {} if args.spacing is None else {"spacing_mm": tuple(args.spacing)}
    refs = write_phantom_cohort(work / "cohort", n=args.n, shape=shape, seed=7, **kw)
    print(f"{args.n} validation studies {shape}; machine: {load_info()}, torch threads {args.threads}")

    slices: list[int] = []
    real_call = CamEngine.__call__

    def counting_call(self, x, methods=CAM_METHODS):
        slices.append(int(x.shape[0]))
        return real_call(self, x, methods)

    CamEngine.__call__ = counting_call  # count the engine's passes; restored below
    try:
        t0 = time.perf_counter()
        pairs = [(r, cache_study_cams(r.to_dict(), str(work / "run"), 64, args.threads,
                                      args.flag_threshold)) for r in refs]
        used, files = [r for r, f in pairs if f], [f for _, f in pairs if f]
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
    trials = [{"method": m, "ts": [float(t) for t in T_GRID]} for m in CAM_METHODS]
    trials.append({"method": "Threshold", "ts": [float("nan")]})
    res = compare_with_volumes(used, files, trials, q_grid, work, old=not args.no_old)
    print(f"[{load_info()}] workdir {work}")
    return res


if __name__ == "__main__":
    main()
