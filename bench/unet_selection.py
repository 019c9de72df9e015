"""Issue 23: which validation rule should choose the U-Net's checkpoint, threshold and
small-component filter? Compares rules on the probability volumes `bench.bench_unet --dump DIR` wrote.

    python -m bench.bench_unet COHORT --size 128 --crop 64 --dice 1 --steps 1000 --eval-every 100 \\
        --dump DIR --dump-from 500 --threads 1
    python -m bench.unet_selection DIR [DIR ...]

For every dumped check (a checkpoint) and every (threshold, component filter) cell, the validation
studies give three scores:
  * median: the median 3-D Dice of the validation studies with tumour (the rule before this change);
  * patient_mean: `wsseg_core.selection.patient_mean` (the project's rule; tumour-free studies NaN);
  * pooled: 2 sum|P & R| / (sum|P| + sum|R|) over ALL validation studies, tumour-free ones included
    (their false-positive voxels enlarge sum|P|).
Checkpoint rules: "pixel" (the one whose validation pixel Dice at argmax was highest: what the job
keeps), "last" (the final step), "joint" (the best score over checkpoints x cells, by the same
rule).
For each (checkpoint rule, score rule, filter set) the chosen model is scored on the test studies:
median 3-D Dice, lesions found, false lesions per study, ICC(MTV). Prints one table per DIR and
`RESULT {json}` lines.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from scipy import ndimage

from jobs.common import labelled, resolve_cohort
from jobs.train_classifier import load_readable
from wsseg_core.metrics import dice, lesion_detection, mtv_ml, voxel_volume_ml
from wsseg_core.selection import patient_mean
from wsseg_core.stats import icc_agreement
from wsseg_core.unet import THRESHOLD_GRID

FILTERS = {"none": 0.0, "vol>=0.1ml": 0.1, "vol>=0.3ml": 0.3}
_S26 = np.ones((3, 3, 3), bool)


def masks(q: np.ndarray, t: float, spacing: np.ndarray) -> dict[str, np.ndarray]:
    """{filter name: mask} of the uint8 probability q (p x 255) above t."""
    m = q > round(t * 255)
    out = {"none": m}
    vox_ml = float(np.prod(spacing)) / 1000.0
    lab, n = ndimage.label(m, structure=_S26)
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * vox_ml
    for name, v in FILTERS.items():
        if v > 0:
            keep = sizes >= v
            keep[0] = False
            out[name] = keep[lab]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    for d in args.dirs:
        meta = json.load(open(os.path.join(d, "meta.json")))
        a = meta["args"]
        refs = resolve_cohort(a["cohort"], seed=a["split_seed"])
        va = load_readable(labelled(refs, "val"))
        te = load_readable([r for r in refs if r.split == "test"])
        grid = list(THRESHOLD_GRID)
        fnames = list(FILTERS)
        checks = meta["checks"]
        # val[c][score rule] -> array (len(grid), len(fnames)); test[c][(ti, fi)] -> per-study rows
        val_scores, test_rows = [], []
        for c in checks:
            z = np.load(os.path.join(d, f"step{c['step']}.npz"))
            cells = (len(grid), len(fnames))
            per_study, I, P, R = [], np.zeros(cells), np.zeros(cells), 0
            for st in va:
                ref = st.seg > 0
                R += int(ref.sum())
                q = z[f"val/{st.ref.study_id}"]
                dmat = np.full((len(grid), len(fnames)), np.nan)
                for ti, t in enumerate(grid):
                    for fi, (fn, m) in enumerate(masks(q, t, st.spacing_mm).items()):
                        I[ti, fi] += int((m & ref).sum())
                        P[ti, fi] += int(m.sum())
                        if ref.any():
                            dmat[ti, fi] = dice(m, ref)
                per_study.append((st.ref.patient_id, dmat))
            with np.errstate(all="ignore"):
                pooled = 2 * I / (P + R)
            tumour = np.stack([m for _, m in per_study if np.isfinite(m).all()])
            val_scores.append({"median": np.median(tumour, axis=0),
                               "patient_mean": patient_mean(per_study, pooled.shape)[0],
                               "pooled": pooled})
            rows = {}
            for ti, t in enumerate(grid):
                for st in te:
                    q = z[f"test/{st.ref.study_id}"]
                    for fi, (fn, m) in enumerate(masks(q, t, st.spacing_mm).items()):
                        rows.setdefault((ti, fi), []).append(m)
            test_rows.append(rows)
        vml = [voxel_volume_ml(st.spacing_mm) for st in te]

        def score_test(ci: int, ti: int, fi: int) -> dict:
            ms = test_rows[ci][(ti, fi)]
            ds = [dice(m, st.seg) for m, st in zip(ms, te) if st.seg.any()]
            det = [lesion_detection(m, st.seg) for m, st in zip(ms, te)]
            mt = [mtv_ml(st.seg, v) for st, v in zip(te, vml)]
            mp = [mtv_ml(m, v) for m, v in zip(ms, vml)]
            icc = icc_agreement(mt, mp)["icc"]
            found = sum(x["n_ref_detected"] for x in det)
            nref = sum(x["n_ref_lesions"] for x in det)
            return dict(step=checks[ci]["step"], t=grid[ti], filter=fnames[fi],
                        median=round(float(np.median(ds)), 3), dice=[round(x, 2) for x in ds],
                        found=f"{found}/{nref}", found_pct=round(100 * found / max(nref, 1)),
                        false=round(float(np.mean([x["n_pred_false"] for x in det])), 1),
                        icc=round(icc, 2) if icc == icc else None,
                        mtv=[(round(x, 1), round(y, 1)) for x, y in zip(mt, mp)])

        pix = int(np.argmax([c["val_pixel_dice"] for c in checks]))
        last = len(checks) - 1
        print(f"== {d}: cohort {a['cohort']} split seed {a['split_seed']} "
              f"training seed {a['seed']}; "
              f"checks {[c['step'] for c in checks]}, pixel-Dice choice step {checks[pix]['step']}")
        for rule in ("median", "patient_mean", "pooled"):
            for fset in (["none"], fnames):
                fidx = [fnames.index(f) for f in fset]
                for crule in ("pixel", "last", "joint"):
                    if crule == "joint":
                        stack = np.stack([val_scores[c][rule][:, fidx] for c in range(len(checks))])
                        # ties: the later checkpoint (lower lr), then the threshold nearer 0.5
                        best, key = None, None
                        for c in range(len(checks)):
                            for ti in range(len(grid)):
                                for j in range(len(fidx)):
                                    v = stack[c, ti, j]
                                    if not np.isfinite(v):
                                        continue
                                    k = (round(float(v), 6), c, -abs(grid[ti] - 0.5), -j)
                                    if key is None or k > key:
                                        key, best = k, (c, ti, fidx[j])
                        ci, ti, fi = best
                    else:
                        ci = pix if crule == "pixel" else last
                        sub = val_scores[ci][rule][:, fidx]
                        # ties to the threshold nearest 0.5, then the lighter filter
                        order = sorted(((float(sub[ti, j]), -abs(grid[ti] - 0.5), -j, ti, fidx[j])
                                        for ti in range(len(grid)) for j in range(len(fidx))
                                        if np.isfinite(sub[ti, j])), reverse=True)
                        ti, fi = order[0][3], order[0][4]
                    vs = float(val_scores[ci][rule][ti, fi])
                    res = dict(dir=d, rule=rule, filters="+".join(fset), ckpt=crule,
                               val=round(vs, 3), **score_test(ci, ti, fi))
                    print("RESULT", json.dumps(res), flush=True)
        # the test's own best threshold at the last check (an oracle, for scale only)
        orc = max(((score_test(last, ti, 0)["median"], ti) for ti in range(len(grid))))
        print("ORACLE last-check best test threshold", grid[orc[1]], "median", orc[0], flush=True)


if __name__ == "__main__":
    main()
