"""Issue 20, target 1: every metrics column of one (study, method) row at autoPET size in <= 0.5 s.

One phantom study at 400 x 400 x 326 voxels, 2.04 x 2.04 x 3 mm (the autoPET grid), and the kinds
of masks scoring produces: whole-body Threshold masks (the largest box and surface there is),
lesion-sized masks with false positives, an empty mask. For each, `study_metrics(..., spacing_mm)`
(all columns: Dice, MTV, TLG, FPV, FNV, HD95, UDE, lesion counts) is timed

* before: the whole-volume implementation this issue replaced (kept verbatim in
  tests/test_metrics_box.py as the test's reference);
* after: wsseg_core.metrics with the reference as an array (a standalone call);
* after, shared reference: with the study's reference summarised once (MaskSummary), as scoring
  does for a study's several methods; the summary's own time is printed once.

Wall and CPU seconds (process time: less disturbed by other processes on a shared machine) are the
median of --repeats; the largest absolute difference between before and after over every column is
printed and must be 0 for counts and volumes, <= 1e-9 mm for HD95 / UDE.

    .venv/bin/python bench/bench_metrics.py                      # autoPET size
    .venv/bin/python bench/bench_metrics.py --shape 48 48 24 --repeats 1

With ``--baseline FILE`` (an earlier ``wsseg_core/metrics.py``, e.g. ``git show
232e06d:wsseg_core/metrics.py > /tmp/metrics_232e06d.py``) that version is also timed with the
shared reference, interleaved with the current one so both see the same load, and its values must
equal the current ones (the A/B of a change to the box implementation):

    .venv/bin/python bench/bench_metrics.py --no-old --repeats 5 --baseline /tmp/metrics_232e06d.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench._common import load_info, median  # noqa: E402

AUTOPET_SHAPE = (400, 400, 326)
AUTOPET_SPACING = (2.04, 2.04, 3.0)


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def masks_for(study) -> dict[str, np.ndarray]:
    """The masks scoring would produce for ``study``, by kind (uint8, the SUV grid)."""
    from scipy import ndimage

    from wsseg_core.segment import threshold_volume

    nz = study.suv.shape[2]
    flagged = np.arange(int(0.15 * nz), int(0.85 * nz))  # ~70 % flagged, as the demo classifier does
    seg = study.seg > 0
    hot = study.suv > 0.6 * float(study.suv.max())  # brain / bladder / heart: false positives
    return {
        "Threshold q=0.3 (whole body)": threshold_volume(study.suv, flagged, 0.3, reference="body", ct=study.ct),
        "Threshold q=0.5": threshold_volume(study.suv, flagged, 0.5, reference="body", ct=study.ct),
        "lesions dilated + hot spots": (ndimage.binary_dilation(seg, iterations=1) | hot).astype(np.uint8),
        "empty": np.zeros(seg.shape, np.uint8),
    }


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the columns (NaN == NaN and None == None count 0; a mismatch is inf)."""
    worst = 0.0
    for k, va in a.items():
        vb = b[k]
        if va is None or vb is None:
            worst = max(worst, 0.0 if va is vb else math.inf)
        elif math.isnan(va) or math.isnan(vb):
            worst = max(worst, 0.0 if math.isnan(va) and math.isnan(vb) else math.inf)
        else:
            worst = max(worst, abs(float(va) - float(vb)))
    return worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=AUTOPET_SHAPE, help="voxels (x y z)")
    ap.add_argument("--spacing", type=float, nargs=3, default=AUTOPET_SPACING, help="mm (x y z)")
    ap.add_argument("--seed", type=int, default=7, help="phantom seed (7: eight lesions)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-old", action="store_true", help="skip the (slow) before timings")
    ap.add_argument("--baseline", default=None,
                    help="an earlier wsseg_core/metrics.py to time against (shared reference)")
    args = ap.parse_args(argv)

    from wsseg_core.metrics import MaskSummary, study_metrics
    from wsseg_core.phantom import make_phantom_study

    print(load_info())
    t = time.perf_counter()
    st = make_phantom_study(args.seed, shape=args.shape, spacing_mm=args.spacing)
    print(f"phantom {tuple(args.shape)} at {tuple(args.spacing)} mm: {int(st.seg.sum())} lesion voxels, "
          f"{len(st.lesions)} lesions ({time.perf_counter() - t:.1f} s to make)")
    vox_ml = float(np.prod(args.spacing)) / 1000.0
    masks = masks_for(st)
    old_fn = None
    if not args.no_old:
        from tests.test_metrics_box import old_study_metrics as old_fn

    base = None
    if args.baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location("metrics_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
        base_ref = base.MaskSummary(st.seg)
    ref_t = [_timed(lambda: MaskSummary(st.seg))[:2] for _ in range(args.repeats)]
    ref_sum = MaskSummary(st.seg)
    print(f"reference summary (once per study): {median([w for w, _ in ref_t]):.3f} s wall, "
          f"{median([c for _, c in ref_t]):.3f} s CPU")
    print(f"{'mask':32s} {'voxels':>9s} | {'before s (CPU)':>15s} | {'after s (CPU)':>14s} | "
          f"{'shared ref s (CPU)':>18s} | max |diff|")
    results, worst_all, after_worst = {}, 0.0, 0.0
    for name, pred in masks.items():
        old_w, old_c, new_w, new_c, sh_w, sh_c, bs_w, bs_c = [], [], [], [], [], [], [], []
        diff = float("nan")
        for _ in range(args.repeats):
            w, c, b = _timed(lambda: study_metrics(pred, st.seg, st.suv, vox_ml, args.spacing))
            new_w.append(w), new_c.append(c)
            w, c, s = _timed(lambda: study_metrics(pred, ref_sum, st.suv, vox_ml, args.spacing))
            sh_w.append(w), sh_c.append(c)
            if max_abs_diff(b, s) != 0.0:
                raise AssertionError(f"{name}: shared-reference values differ from standalone ones")
            if base is not None:
                w, c, v = _timed(lambda: base.study_metrics(pred, base_ref, st.suv, vox_ml, args.spacing))
                bs_w.append(w), bs_c.append(c)
                if max_abs_diff(v, s) > 1e-9:
                    raise AssertionError(f"{name}: baseline values differ from the current ones")
            if old_fn is not None:
                w, c, a = _timed(lambda: old_fn(pred, st.seg, st.suv, vox_ml, args.spacing))
                old_w.append(w), old_c.append(c)
                diff = max_abs_diff(a, b)
                worst_all = max(worst_all, diff)
        before = f"{median(old_w):6.2f} ({median(old_c):5.2f})" if old_w else f"{'-':>15s}"
        after_worst = max(after_worst, median(new_w))
        print(f"{name:32s} {int(np.count_nonzero(pred)):9d} | {before:>15s} | "
              f"{median(new_w):6.3f} ({median(new_c):5.3f}) | {median(sh_w):8.3f} ({median(sh_c):5.3f})"
              f"     | {diff:.3g}")
        if bs_c:
            print(f"{'':32s} baseline, shared ref: {median(bs_w):.3f} s wall ({median(bs_c):.3f} CPU) "
                  f"-> current {median(sh_w):.3f} ({median(sh_c):.3f} CPU)")
        results[name] = {"before_s": median(old_w) if old_w else None, "after_s": median(new_w),
                         "after_cpu_s": median(new_c), "shared_ref_s": median(sh_w), "max_abs_diff": diff,
                         "baseline_shared_cpu_s": median(bs_c) if bs_c else None}
    if old_fn is not None:
        ok = worst_all <= 1e-9
        print(f"max abs difference before vs after, all columns, all masks: {worst_all:.3g} "
              f"-> {'OK' if ok else 'DIFFERENT'}")
    print(f"slowest mask after: {after_worst:.3f} s wall per (study, method) (target <= 0.5 s)")
    return results


if __name__ == "__main__":
    main()
