"""Issue 16: where Algorithm 1 loses Dice against the Threshold baseline, per study and per lesion.

For every labelled study of the chosen splits of a finished ``jobs.pipeline`` run, with the run's
classifier, flag threshold and thresholds.json (t, q), each reference (tumour) voxel is put in
exactly one of

    TP        in the mask
    unflag    its slice was not flagged (shared by every slice method, Threshold included)
    region    flagged slice, outside the CAM region ``up(cam) >= t`` (t too high, CAM coarse or
              off-centre)
    pct       inside the region, below t_q (the region's SUV percentile; with q_rule "max",
              q % of the region's SUVmax)
    (Threshold: ``below`` = flagged slice, below q % of the slice SUVmax)

and each false-positive voxel in one of ``fp_touch`` (its per-slice connected component of the
mask also holds tumour: a boundary error) or ``fp_away`` (a component with no tumour: another
structure). Per lesion (3-D connected component of the reference): its size, SUVmax, the share of
its voxels in each category per method.

``--grow`` adds the rows of the hysteresis-grown mask (``wsseg_core.segment`` ``grow="slice"``)
at the same (t, q), to see which losses it recovers; ``--retune`` chooses (t, q, grow, q_rule)
afresh on the run's tuning studies (thresholds.json ``tune_on``, ``t_grid``, ``q_grid``) with the
library's selection rule (patient mean, wsseg_core.selection.best_cell, the paper's variant first)
and scores the chosen split with the joint choice and with each variant at its own best cell,
without retraining (the CAMs are recomputed from the run's classifier and cached under
``--cache``). With the paper's variant it reproduces the run's own (t, q).

    OMP_NUM_THREADS=1 python -m bench.cam_losses /tmp/cls/out_hot15_final [--splits test]
        [--methods CAM GradCAM++ ScoreCAM] [--grow] [--retune]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from wsseg_core.cams import CamEngine  # noqa: E402
from wsseg_core.data import StudyRef, load_study  # noqa: E402
from wsseg_core.gate import FlagRule  # noqa: E402
from wsseg_core.inference import classify_volume, flagged_slices, volume_cams  # noqa: E402
from wsseg_core.thresholds import load_flag_rule  # noqa: E402
from wsseg_core.models import load_classifier  # noqa: E402
from wsseg_core.segment import (THRESHOLD_REFERENCE, cam_region, segment_volume,  # noqa: E402
                                threshold_volume)
from jobs.common import labelled, resolve_cohort  # noqa: E402

CATS = ("TP", "unflag", "region", "pct")


def _study_refs(run: str, splits: list[str]) -> list[tuple[str, StudyRef]]:
    """(split, ref) of the run's labelled studies in `splits`, as the run split them."""
    refs = resolve_cohort(os.path.join(run, "cohort.parquet"))  # the manifest's splits are kept
    return [(sp, r) for sp in splits for r in labelled(refs, sp)]


def study_inputs(run: str, ref: StudyRef, methods: list[str], flag: "float | FlagRule", cache_dir: str):
    """(study, flagged z, {method: cams}, cam_index) with the run's classifier; CAMs cached."""
    st = load_study(ref)
    flag = FlagRule.from_record(flag)
    tag = flag.threshold if flag.kind == "threshold" else flag.name  # threshold rules keep old keys
    key = hashlib.sha1(f"{os.path.abspath(run)}|{ref.suv_path}|{tag}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{key}.npz")
    have = {}
    if os.path.exists(path):
        with np.load(path) as c:
            have = {k: np.asarray(c[k]) for k in c.files}
    missing = [m for m in methods if f"cam_{m}" not in have]
    model, pre, _ = load_classifier(os.path.join(run, "models", "classifier.pt"))
    geo = pre.geometry(st.suv, st.ct, st.spacing_mm)
    if "z" not in have:
        have["z"] = flagged_slices(classify_volume(model, pre, st.suv, st.ct, geometry=geo), flag)
    if missing:
        maps = volume_cams(CamEngine(model), pre, st.suv, st.ct, have["z"], missing, geometry=geo)
        have.update({f"cam_{m}": maps[m] for m in missing})
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path, **have)
    cams = {m: have[f"cam_{m}"] for m in methods}
    h, w = cams[methods[0]].shape[1:] if len(have["z"]) else (1, 1)
    return st, np.asarray(have["z"], dtype=np.int64), cams, geo.cam_index(h, w)


def _fp_split(mask: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """False-positive voxels in per-slice components that also hold tumour / that hold none."""
    touch = away = 0
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        lab, n = ndimage.label(mask[:, :, z])
        if n == 0:
            continue
        fp = np.bincount(lab[mask[:, :, z] & ~ref[:, :, z]], minlength=n + 1)
        hit = np.bincount(lab[mask[:, :, z] & ref[:, :, z]], minlength=n + 1) > 0
        touch += int(fp[hit].sum())
        away += int(fp[~hit].sum())
    return touch, away


def categorise(suv, ref, z, cams, cam_index, t, q, grow="none", q_rule="percentile"):
    """int8 (X, Y, Z) category of every reference voxel (index into CATS, -1 elsewhere) and the
    Algorithm-1 mask (with ``grow``)."""
    mask = segment_volume(suv, z, cams, t, q, cam_index=cam_index, grow=grow,
                          q_rule=q_rule).astype(bool)
    cat = np.full(suv.shape, -1, dtype=np.int8)
    cat[ref] = CATS.index("unflag")
    region = np.zeros(suv.shape, dtype=bool)
    for zi, cam in zip(z, cams):
        region[:, :, zi] = cam_region(cam, t, suv.shape[:2], cam_index)
    flagged = np.zeros(suv.shape[2], dtype=bool)
    flagged[z] = True
    in_flag = ref & flagged[None, None, :]
    cat[in_flag & ~region] = CATS.index("region")
    cat[in_flag & region] = CATS.index("pct")
    cat[ref & mask] = CATS.index("TP")
    return cat, mask


def threshold_categorise(suv, ref, z, q, ct):
    mask = threshold_volume(suv, z, q, ct=ct).astype(bool)
    cat = np.full(suv.shape, -1, dtype=np.int8)
    cat[ref] = CATS.index("unflag")
    flagged = np.zeros(suv.shape[2], dtype=bool)
    flagged[z] = True
    cat[ref & flagged[None, None, :]] = CATS.index("pct")  # "below" q % of SUVmax
    cat[ref & mask] = CATS.index("TP")
    return cat, mask


def diagnose(run: str, splits: list[str], methods: list[str], cache_dir: str, grow: bool,
             params: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    th = json.load(open(os.path.join(run, "thresholds.json")))
    flag = load_flag_rule(os.path.join(run, "thresholds.json"))  # the run's step-1 rule
    params = params or {m: th["methods"][m] for m in [*methods, "Threshold"]}
    rows, lesions = [], []
    for split, ref in _study_refs(run, splits):
        st, z, cams, idx = study_inputs(run, ref, methods, flag, cache_dir)
        seg = np.asarray(st.seg) > 0
        if not seg.any():
            continue
        les, n_les = ndimage.label(seg)
        variants = [(m, params[m].get("grow", "none")) for m in methods]
        if grow:
            variants += [(m, "slice") for m in methods if params[m].get("grow", "none") != "slice"]
        out = {}
        for m, g in variants:
            qr = params[m].get("q_rule", "percentile")
            out[(m, g + ("/max" if qr == "max" else ""))] = categorise(
                st.suv, seg, z, cams[m], idx, params[m]["t"], params[m]["q"], grow=g, q_rule=qr)
        out[("Threshold", "")] = threshold_categorise(st.suv, seg, z, params["Threshold"]["q"], st.ct)
        for (m, g), (cat, mask) in out.items():
            counts = np.bincount(cat[seg], minlength=len(CATS))
            fpt, fpa = _fp_split(mask, seg)
            tp = int(counts[0])
            rows.append({"split": split, "study": ref.study_id[-14:], "method": m + (f"+{g}" if g not in ("", "none") else ""),
                         "t": params[m].get("t", np.nan), "q": params[m]["q"], "n_ref": int(seg.sum()),
                         "dice": 2 * tp / (int(mask.sum()) + int(seg.sum())),
                         **{c: int(v) for c, v in zip(CATS, counts)}, "fp_touch": fpt, "fp_away": fpa})
            for li in range(1, n_les + 1):
                lm = les == li
                c = np.bincount(cat[lm], minlength=len(CATS)) / lm.sum()
                lesions.append({"split": split, "study": ref.study_id[-14:], "lesion": li,
                                "voxels": int(lm.sum()), "slices": int(lm.any(axis=(0, 1)).sum()),
                                "suvmax": float(st.suv[lm].max()),
                                "method": m + (f"+{g}" if g not in ("", "none") else ""),
                                **{c_: round(float(v), 2) for c_, v in zip(CATS, c)}})
    return pd.DataFrame(rows), pd.DataFrame(lesions)


VARIANTS = [("none", "percentile"), ("slice", "percentile"), ("none", "max"), ("slice", "max")]


def retune(run: str, methods: list[str], cache_dir: str, variants: list[tuple[str, str]]) -> dict:
    """(t, q, grow) per CAM method chosen on the run's tuning studies, as jobs.tune_thresholds
    chooses (patient mean of per-study Dice, wsseg_core.selection.best_cell), and Threshold's q."""
    from wsseg_core.segment import dice_grid_counts, threshold_dice_grid_counts
    from wsseg_core.metrics import dice_from_counts
    from wsseg_core.selection import best_cell, patient_mean

    th = json.load(open(os.path.join(run, "thresholds.json")))
    flag = load_flag_rule(os.path.join(run, "thresholds.json"))  # the run's step-1 rule
    t_grid, q_grid = np.asarray(th["t_grid"]), np.asarray(th["q_grid"])
    splits = ["val"] if th.get("tune_on") == "val" else ["train", "val"]
    scores = {m: [] for m in methods}
    thr_scores = []
    for _, ref in _study_refs(run, splits):
        st, z, cams, idx = study_inputs(run, ref, methods, flag, cache_dir)
        if not np.asarray(st.seg).any():
            continue
        for m in methods:
            d = np.stack([dice_from_counts(*dice_grid_counts(st.suv, st.seg, z, cams[m], t_grid, q_grid,
                                                             idx, grow=g, q_rule=r)) for g, r in variants])
            scores[m].append((ref.patient_id, d))
        thr_scores.append((ref.patient_id, dice_from_counts(*threshold_dice_grid_counts(
            st.suv, st.seg, z, q_grid, THRESHOLD_REFERENCE, st.ct))))
    chosen = {}
    for m in methods:
        mean, _ = patient_mean(scores[m], (len(variants), t_grid.size, q_grid.size))
        gi, ti, qi = best_cell(mean)
        chosen[m] = {"t": float(t_grid[ti]), "q": float(q_grid[qi]), "grow": variants[gi][0],
                     "q_rule": variants[gi][1], "val_dice": float(mean[gi, ti, qi]),
                     "by_variant": {"/".join(v): round(float(np.nanmax(mean[k])), 4)
                                    for k, v in enumerate(variants)}}
        for k, v in enumerate(variants):  # each variant's own best cell, to score on test too
            a, b = np.unravel_index(np.nanargmax(mean[k]), mean[k].shape)
            chosen[f"{m}:{'/'.join(v)}"] = {"t": float(t_grid[a]), "q": float(q_grid[b]), "grow": v[0],
                                           "q_rule": v[1], "val_dice": float(mean[k, a, b])}
    mean, _ = patient_mean(thr_scores, (q_grid.size,))
    (qi,) = best_cell(mean)
    chosen["Threshold"] = {"q": float(q_grid[qi]), "val_dice": float(mean[qi])}
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished jobs.pipeline run folder")
    p.add_argument("--splits", nargs="+", default=["test"])
    p.add_argument("--methods", nargs="+", default=["CAM", "GradCAM++", "ScoreCAM"])
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "wsseg_cam_losses"),
                   help="where the CAMs of each study are cached between runs (default: %(default)s)")
    p.add_argument("--grow", action="store_true", help="also the grow='slice' mask at the same (t, q)")
    p.add_argument("--retune", action="store_true",
                   help="choose (t, q, grow in none/slice) on the tuning studies and score with it")
    p.add_argument("--lesions", action="store_true", help="print the per-lesion table")
    p.add_argument("--no-grow-variants", action="store_true",
                   help="--retune over q_rule only (grow 'slice' costs ~50x the counts)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    pd.set_option("display.width", 250)
    df, les = diagnose(args.run, args.splits, args.methods, args.cache, args.grow)
    print(f"== {args.run}: run's thresholds.json, splits {args.splits}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    med = df.groupby("method", sort=False)["dice"].median()
    print("median Dice:", "  ".join(f"{k} {v:.3f}" for k, v in med.items()))
    tot = df.groupby("method", sort=False)[["n_ref", *CATS, "fp_touch", "fp_away"]].sum()
    print("voxels summed over studies:\n" + tot.to_string())
    if args.lesions:
        print(les.to_string(index=False))
    if args.retune:
        variants = [v for v in VARIANTS if not (args.no_grow_variants and v[0] == "slice")]
        ch = retune(args.run, args.methods, args.cache, variants)
        print("== retuned on the tuning studies (grow x q_rule):")
        for m, e in ch.items():
            print(f"  {m}: {e}")
        df2, les2 = diagnose(args.run, args.splits, args.methods, args.cache, False, params=ch)
        # each variant at its own tuned cell, on the same split
        for m in args.methods:
            for v in variants:
                key = f"{m}:{'/'.join(v)}"
                d, _ = diagnose(args.run, args.splits, [m], args.cache, False,
                                params={m: ch[key], "Threshold": ch["Threshold"]})
                d = d[d.method != "Threshold"]
                print(f"  {key:28s} t={ch[key]['t']:.2f} q={ch[key]['q']:.0f} tune {ch[key]['val_dice']:.3f}"
                      f"  test median {d.dice.median():.3f}  per study {np.round(d.dice.values, 3).tolist()}")
        print(df2.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        med = df2.groupby("method", sort=False)["dice"].median()
        print("median Dice (retuned):", "  ".join(f"{k} {v:.3f}" for k, v in med.items()))
        if args.lesions:
            print(les2.to_string(index=False))
    print(f"wall {time.perf_counter() - t0:.1f} s, CPU {time.process_time() - c0:.1f} s")


if __name__ == "__main__":
    main()
