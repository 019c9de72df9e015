"""Ray Tune: choose Algorithm 1's (t_m, q_m) per CAM method and the Threshold baseline's percentile.

Grid (Früh et al. 2.2.1): t in linspace(0.1, 0.9, 10), q in linspace(20, 50, 20); score = 3-D Dice
per study, averaged per patient, then over the tuning patients: `--tune-on train+val` (default:
the paper's hyperparameters "were determined empirically on the training and validation sets")
or `val` (held-out validation patients only). Each tuning study's CAMs are computed ONCE (Ray
tasks, one per study), and in the same task the voxel counts of every grid point; the cache keeps
those and the CAMs, not the volumes (wsseg_core.gridcache; issue 20), and the Tune trials turn the
counts into Dice. One trial is one method and reads its whole t x q grid from one read of the
cache, so the search runs as 5 trials: a trial per
(method, t) cell (41) spent most of its time in Tune's per-trial overhead and in reading the cache
again for every t.

Per CAM method the search also chooses Algorithm 1's step-5 rule and whether the mask grows
(`--q-rule`, `--grow`; wsseg_core.segment's `q_rule` and `grow`): every variant's counts come from
the same cached CAMs, and the best (variant, t, q) is kept, the paper's variant winning ties.
Default: q_rule "auto" (the paper's percentile or q % of the region's SUVmax), grow "none"; the
README's issue-16 section has the measurements behind that default.

Algorithm 1's step 1 may also be searched (`--flag-rule`, issue 16): besides the per-slice flag
threshold, hysteresis along z (seeds p >= the flag threshold grown through contiguous slices with
p >= lo) and a z-context slice score (wsseg_core.gate). The cache then holds every slice any
candidate flags, with per-slice counts, so every rule is scored from it; per rule each method's
(variant, t, q) is chosen as above, and the rule whose cells give the best pooled Dice on the
validation studies (tumour-free ones included) is kept, the per-slice rule winning ties.

    python -m jobs.tune_thresholds --cohort runs/demo/cohort.parquet --out runs/demo
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.common import (RunFolder, add_common_args, fit_keeping_ctrl_c, init_ray, labelled,
                         load_labelled_study, ray_storage_path, resolve_cohort, setup_logging, study_key,
                         torch_threads_for)
from jobs.telemetry import tune_callback
from wsseg_core.storage import join, read_bytes
# The thresholds.json format (q % of the slice SUVmax for Threshold, which scoring falls back to).
from wsseg_core.thresholds import THRESHOLD_REFERENCE, load_flag_threshold

LOG = logging.getLogger("wsseg.tune_thresholds")
#: Which labelled studies the (t, q) search scores: `--tune-on`.
TUNE_ON = ("train+val", "val")
#: Früh et al. 2.2.1: "Data-specific hyperparameters in the form of CAM-thresholds and intensity
#: percentiles were determined empirically on the training and validation sets" (their next
#: sentences place the grid on the training data and the pick on validation Dice; pooling both
#: is the reading that uses every patient the sentence names). It also scores 4x the patients of
#: validation alone at 60/20/20, steadier for two parameters per method; `val` keeps the choice on
#: patients the classifier never saw. The test split is never used by either.
DEFAULT_TUNE_ON = "train+val"
#: `--q-rule` / `--grow`: the Algorithm-1 variants the search may choose, per CAM method, jointly
#: with (t, q) (wsseg_core.segment: q_rule "percentile" is the paper's step 5, "max" takes q % of
#: the region's SUVmax; grow "none" is the paper's, "slice" grows the mask along SUV >= t_q).
#: "auto" searches both values; the paper's value comes first, so it wins ties.
Q_RULE_CHOICES = ("percentile", "max", "auto")
GROW_CHOICES = ("none", "slice", "auto")
DEFAULT_Q_RULE = "auto"
DEFAULT_GROW = "none"
#: `--flag-rule` (wsseg_core.gate.FLAG_RULE_CHOICES): Algorithm 1's step 1 per slice ("threshold"),
#: or rules that use the study's z-structure, chosen on pooled validation Dice: "hysteresis" (lo
#: from --flag-lo), "zctx" (the z-context score), "auto" (all, the per-slice rule winning ties).
#: Default "threshold": on the demo and three variants the validation choice did not carry to the
#: test studies (demo: every z-rule lower, tumour-free flagged 6 % -> 12-16 %); the README's
#: issue-16 section ("Flag rules along z") has the table.
DEFAULT_FLAG_RULE = "threshold"


def cam_variants(grow: str = DEFAULT_GROW, q_rule: str = DEFAULT_Q_RULE) -> list[tuple[str, str]]:
    """The (grow, q_rule) pairs the search scores, the paper's Algorithm 1 first when included."""
    from wsseg_core.segment import GROW_MODES, Q_RULES

    if grow not in GROW_CHOICES or q_rule not in Q_RULE_CHOICES:
        raise ValueError(f"grow must be one of {GROW_CHOICES} and q_rule one of {Q_RULE_CHOICES}, "
                         f"got {grow!r}, {q_rule!r}")
    grows = GROW_MODES if grow == "auto" else (grow,)
    rules = Q_RULES if q_rule == "auto" else (q_rule,)
    return [(g, r) for r in rules for g in grows]


def _classify_labelled_study(ref: dict, out: str, cam_batch_size: int, num_cpus: float, purpose: str):
    """Load one validation study and the run's classifier and classify every slice: (study, model,
    preprocessor, probs (Z,)), or None when the study is unlabeled or unreadable (logged with
    `purpose`, never fatal for the search)."""
    from wsseg_core.inference import classify_volume
    from wsseg_core.models import load_classifier

    torch_threads_for(num_cpus)
    got = load_labelled_study(ref, purpose, LOG)
    if got is None:
        return None
    _, study = got
    run = RunFolder(out)
    run.fetch(run.classifier)  # this task may run on a node that has no copy yet
    model, pre, _ = load_classifier(run.classifier)
    return study, model, pre, classify_volume(model, pre, study.suv, study.ct, batch_size=cam_batch_size,
                                              spacing_mm=study.spacing_mm)


def study_slice_probs(ref: dict, out: str, cam_batch_size: int,
                      num_cpus: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """(slice tumour probabilities (Z,), slice labels (Z,)) of one labelled validation study, or
    None when it is unlabeled or unreadable (logged)."""
    from wsseg_core.data import slice_labels

    got = _classify_labelled_study(ref, out, cam_batch_size, num_cpus, "classifier check")
    if got is None:
        return None
    study, _, _, probs = got
    return probs, np.asarray(slice_labels(study.seg)).astype(np.int8)


def check_classifier(val_refs: list, out: str | Path, *, cam_batch_size: int = 64,
                     flag_threshold: float | None = None, cpus_per_study: float = 1.0) -> Any:
    """Classify the validation studies, choose the flag threshold, run the quality gate.

    The flag threshold is `flag_threshold` when given (e.g. the paper's 0.5), else the one that
    maximises slice F1 on validation (wsseg_core.gate.choose_flag_threshold). Both, and the gate's
    figures, are written to thresholds.json ("flag_threshold", "flag_threshold_source",
    "classifier_gate"). Returns the wsseg_core.gate.GateResult (the caller decides to stop).
    """
    import ray

    from wsseg_core.gate import choose_flag_threshold, classifier_gate

    run = RunFolder(out)
    task = ray.remote(num_cpus=cpus_per_study)(study_slice_probs)
    got = [g for g in ray.get([task.remote(r.to_dict(), str(out), cam_batch_size, cpus_per_study)
                               for r in val_refs]) if g is not None]
    probs = [g[0] for g in got]
    labels = [g[1] for g in got]
    if flag_threshold is None:
        thr = choose_flag_threshold(np.concatenate(probs), np.concatenate(labels)) if got else 0.5
        source = "validation slice F1"
    else:
        thr, source = float(flag_threshold), "fixed"
    res = classifier_gate(probs, labels, thr)
    run.update_thresholds({}, flag_threshold=thr, flag_threshold_source=source,
                          classifier_gate=res.to_dict())
    (LOG.info if res.passed else LOG.error)("%s", res.message())
    return res


def z_context_flag_threshold(refs: list, out: str | Path, cam_batch_size: int = 64,
                             cpus_per_study: float = 1.0) -> float | None:
    """The z-context score's flag threshold (wsseg_core.gate.z_context_score): the maximum slice
    F1 on the validation studies among `refs` (all of them when none is a validation study), as the
    per-slice threshold is chosen. Classifies those studies once more (no CAMs). None when no
    study could be read."""
    import ray

    from wsseg_core.gate import choose_flag_threshold, z_context_score

    on = [r for r in refs if r.split == "val"] or list(refs)
    task = ray.remote(num_cpus=cpus_per_study)(study_slice_probs)
    got = [g for g in ray.get([task.remote(r.to_dict(), str(out), cam_batch_size, cpus_per_study)
                               for r in on]) if g is not None]
    if not got:
        return None
    thr = choose_flag_threshold(np.concatenate([z_context_score(p) for p, _ in got]),
                                np.concatenate([y for _, y in got]))
    LOG.info("z-context score: flag threshold %.3f (max slice F1 on %d studies)", thr, len(got))
    return float(thr)


def tuning_refs(train: list, val: list, tune_on: str = DEFAULT_TUNE_ON) -> list:
    """The studies the (t, q) search scores: validation (`"val"`) or training + validation
    (`"train+val"`); the training studies alone when there is no validation study (tiny cohorts),
    logged."""
    if tune_on not in TUNE_ON:
        raise ValueError(f"tune_on must be one of {TUNE_ON}, got {tune_on!r}")
    if not val:
        LOG.warning("no labelled validation study: thresholds are tuned on the training studies")
        return list(train)
    return list(val) if tune_on == "val" else [*train, *val]


def cache_study_cams(ref: dict, out: str, cam_batch_size: int, num_cpus: float = 1.0,
                     flag_threshold: float = 0.5, t_grid: list[float] | None = None,
                     q_grid: list[float] | None = None,
                     variants: list[tuple[str, str]] | None = None,
                     flag_rules: list[dict] | None = None) -> str | None:
    """Classify one validation study, compute its CAMs on flagged slices, save what the Dice grids
    need (a wsseg_core.gridcache.GridCache, npz: the voxel counts of every grid point, |ref|, the
    CAMs) under `<out>/tune/cache/` (uploaded when `out` is a URI, so a trial on any node can read
    it).

    `t_grid` / `q_grid`: the grid the trials will score (default the paper's T_GRID, Q_GRID); a
    trial asking for a value outside it fails. `variants`: the (grow, q_rule) of Algorithm 1 to
    count (default the paper's only). `flag_rules`: the candidate flag rules
    (wsseg_core.gate.FlagRule dicts; default p >= `flag_threshold` only): the CAMs and per-slice
    counts of every slice any of them flags are cached, with the study's slice probabilities, so
    each trial scores every rule from one cache (issue 16).

    Returns the cache file (path or URI), or None for a study that cannot be used (unlabeled or
    unreadable; logged, never fatal for the search).
    """
    from wsseg_core.cams import CamEngine, available_methods
    from wsseg_core.data import StudyRef
    from wsseg_core.gridcache import build_grid_cache
    from wsseg_core.inference import flagged_slices, volume_cams
    from wsseg_core.segment import Q_GRID, T_GRID

    cpu0 = time.process_time()
    got = _classify_labelled_study(ref, out, cam_batch_size, num_cpus, "tuning")
    if got is None:
        return None
    study, model, pre, probs = got
    ref = StudyRef(**ref)
    run = RunFolder(out)
    per_slice = bool(flag_rules)  # also counts |pred| of tumour-free studies (pooled validation Dice)
    if flag_rules:
        from wsseg_core.gate import FlagRule

        union = np.zeros(len(probs), dtype=bool)
        for fr in flag_rules:
            union |= FlagRule.from_record(fr).flags(probs)
        z = np.flatnonzero(union)
    else:
        z = flagged_slices(probs, flag_threshold)
    methods = available_methods(model)  # no CAM under the fc head
    # The checkpoint's preprocessing, as scoring applies it (resize, or resample to pixel_mm).
    geo = pre.geometry(study.suv, study.ct, study.spacing_mm)
    maps = volume_cams(CamEngine(model), pre, study.suv, study.ct, z, methods, cam_batch_size,
                       geometry=geo)
    # study_key, not safe_name(patient)__safe_name(study): that is not injective ("a b" and "a_b"),
    # and two studies sharing a cache file would let the search score one of them twice.
    path = run.out / "tune" / "cache" / f"{study_key(ref.patient_id, ref.study_id)}.npz"
    # Not the volumes (0.47 GB a study at autoPET size, read again by every trial): the grid's
    # counts, computed here while the volumes are in memory (wsseg_core.gridcache says why exact).
    cache = build_grid_cache(study.suv, study.seg, z, {m: maps[m] for m in methods},
                             T_GRID if t_grid is None else t_grid, Q_GRID if q_grid is None else q_grid,
                             reference=THRESHOLD_REFERENCE, ct=study.ct,
                             cam_index=geo.cam_index(*maps[methods[0]].shape[1:]) if methods else None,
                             variants=[tuple(v) for v in (variants or [("none", "percentile")])],
                             per_slice=per_slice, probs=probs)
    n_base = int((np.asarray(probs) >= flag_threshold).sum())
    # cpu_s / n_base: what the cache cost, and how many of its slices the per-slice rule flags
    run.write_npz(path, patient_id=np.array(ref.patient_id), cpu_s=np.float64(time.process_time() - cpu0),
                  n_base=np.int64(n_base), **cache.to_arrays())
    return run.where(path)


def evaluate_cell(config: dict[str, Any], cache_files: list[str], q_grid: list[float],
                  flag_rules: list[dict] | None = None, val_files: list[str] | None = None) -> dict:
    """One Tune trial: mean validation Dice over patients at every (t, q) of one method.

    `config["cell"]`: {"method", "ts": [t, ...]} (or "t": one t), and optionally "variants":
    [[grow, q_rule], ...] (default the paper's Algorithm 1 only); the Threshold baseline has no t
    (give [nan]) and no variant. Dice is averaged per patient, then over patients; the best
    (variant, t, q) is chosen jointly, earlier variants winning ties. Returns mean_dice, t, q, grow,
    q_rule (the best cell), dice_by_vtq (variants x ts x q_grid), dice_by_tq and dice_by_q (the
    best variant's table and the best t's row), variants and n_patients. The rule is
    wsseg_core.selection's, shared with the other searches.

    `flag_rules` (issue 16; wsseg_core.gate.FlagRule dicts, the caches built with all of them):
    every rule is scored from the same caches. The keys above then describe the first rule; added
    are "flag_rules", "dice_by_fvtq" (rules x variants x ts x q_grid, the same per-patient mean)
    and, over `val_files` (the validation studies' caches; default all), "val_counts_by_fvtq":
    [|pred ∩ ref|, |pred|, |ref|] summed over those studies, tumour-free ones included, for
    the pooled validation Dice that chooses the rule (:func:`choose_flag_rule`).
    """
    from wsseg_core.gridcache import PAPER_VARIANT, GridCache, cache_dice_grid, cache_threshold_dice_grid
    from wsseg_core.selection import best_cell, patient_mean

    cell = config["cell"]
    method = cell["method"]
    ts = [float(t) for t in cell.get("ts", [cell.get("t", float("nan"))])]
    variants = [tuple(v) for v in cell.get("variants", [PAPER_VARIANT])]
    if method == "Threshold":
        variants = [PAPER_VARIANT]
    if flag_rules:
        return _evaluate_flag_rules(method, ts, variants, cache_files, q_grid, flag_rules,
                                    cache_files if val_files is None else val_files)
    scores = []
    for f in cache_files:
        with np.load(io.BytesIO(read_bytes(f))) as c:
            cache, patient = GridCache.from_arrays(c), str(c["patient_id"])
        if method == "Threshold":
            d = np.asarray(cache_threshold_dice_grid(cache, q_grid),
                           dtype=float)[None, None, :].repeat(len(ts), axis=1)
        else:
            d = np.stack([np.asarray(cache_dice_grid(cache, method, ts, q_grid, v), dtype=float)
                          for v in variants])
        scores.append((patient, d))
    mean, n = patient_mean(scores, (len(variants), len(ts), len(q_grid)))
    return _cell_result(mean, n, ts, q_grid, variants)


def _cell_result(mean: np.ndarray, n: int, ts: list[float], q_grid: list[float],
                 variants: list[tuple[str, str]]) -> dict:
    """evaluate_cell's answer from the per-patient mean Dice (variants x ts x q_grid)."""
    from wsseg_core.selection import best_cell

    bv, bt, bq = best_cell(mean) or (0, 0, 0)  # nothing defined: the first cell, reported as Dice 0
    return {"mean_dice": float(mean[bv, bt, bq]) if np.isfinite(mean[bv, bt, bq]) else 0.0,
            "t": ts[bt], "q": float(q_grid[bq]), "grow": variants[bv][0], "q_rule": variants[bv][1],
            "variants": [list(v) for v in variants],
            "dice_by_vtq": [[[float(x) for x in row] for row in tab] for tab in mean],
            "dice_by_tq": [[float(v) for v in row] for row in mean[bv]],
            "dice_by_q": [float(v) for v in mean[bv, bt]], "n_patients": n}


def _evaluate_flag_rules(method: str, ts: list[float], variants: list[tuple[str, str]],
                         cache_files: list[str], q_grid: list[float], flag_rules: list[dict],
                         val_files: list[str]) -> dict:
    """evaluate_cell over several flag rules (its docstring)."""
    from wsseg_core.gate import FlagRule
    from wsseg_core.gridcache import GridCache, cache_grid_counts, cache_threshold_counts
    from wsseg_core.metrics import dice_from_counts
    from wsseg_core.selection import patient_mean

    rules = [FlagRule.from_record(r) for r in flag_rules]
    val_set = set(val_files)
    shape = (len(rules), len(variants), len(ts), len(q_grid))
    scores = []
    v_inter = np.zeros(shape, dtype=np.int64)
    v_pred = np.zeros(shape, dtype=np.int64)
    v_ref = 0
    for f in cache_files:
        with np.load(io.BytesIO(read_bytes(f))) as c:
            cache, patient = GridCache.from_arrays(c), str(c["patient_id"])
        if cache.probs is None:
            raise ValueError(f"{f}: the cache has no slice probabilities; rebuild it with flag_rules")
        inter = np.zeros(shape, dtype=np.int64)
        pred = np.zeros(shape, dtype=np.int64)
        for fi, rule in enumerate(rules):
            z = np.flatnonzero(rule.flags(cache.probs))
            if method == "Threshold":
                i, p, _ = cache_threshold_counts(cache, q_grid, z)
                inter[fi] = i[None, None, :]
                pred[fi] = p[None, None, :]
            else:
                for vi, v in enumerate(variants):
                    inter[fi, vi], pred[fi, vi], _ = cache_grid_counts(cache, method, ts, q_grid, v, z)
        scores.append((patient, np.asarray(dice_from_counts(inter, pred, cache.n_ref), dtype=float)))
        if f in val_set:
            v_inter += inter
            v_pred += pred
            v_ref += int(cache.n_ref)
    mean, n = patient_mean(scores, shape)
    res = _cell_result(mean[0], n, ts, q_grid, variants)
    res.update({"flag_rules": [r.to_dict() for r in rules], "dice_by_fvtq": mean.tolist(),
                "val_counts_by_fvtq": [v_inter.tolist(), v_pred.tolist(), v_ref]})
    return res


def choose_flag_rule(dice_by_method: dict[str, np.ndarray],
                     val_counts_by_method: dict[str, tuple[np.ndarray, np.ndarray, int]]
                     ) -> tuple[int, list[float], dict[str, list[tuple[int, ...]]]]:
    """The flag rule the search keeps (issue 16): per rule f, each CAM method's (variant, t, q) is
    the best on the tuning studies under f (per-patient mean Dice, as without rules); f's score is
    the mean over the CAM methods of the POOLED Dice of the validation studies at those cells
    (2 sum |P ∩ R| / (sum |P| + sum |R|), tumour-free studies included, so the false volume a rule
    adds in a tumour-free study counts; the per-patient mean leaves such studies out). The first
    rule of highest score wins (the per-slice rule comes first, so it wins ties).

    Args:
        dice_by_method: CAM method -> (F, V, T, Q) per-patient mean tuning Dice.
        val_counts_by_method: CAM method -> (inter (F, V, T, Q), pred (F, V, T, Q), ref): the
            validation studies' summed counts.
    Returns:
        (chosen rule's index, score per rule (NaN where undefined), method -> best cell per rule).
    """
    from wsseg_core.metrics import dice_from_counts
    from wsseg_core.selection import best_cell

    n_rules = len(next(iter(dice_by_method.values()))) if dice_by_method else 1
    per_rule: list[list[float]] = [[] for _ in range(n_rules)]
    cells: dict[str, list[tuple[int, ...]]] = {}
    for m, d in dice_by_method.items():
        d = np.asarray(d, dtype=float)
        inter, pred, ref = val_counts_by_method[m]
        pooled = np.asarray(dice_from_counts(np.asarray(inter), np.asarray(pred), int(ref)), dtype=float)
        cells[m] = []
        for fi in range(n_rules):
            cell = best_cell(d[fi]) or (0, 0, 0)
            cells[m].append(cell)
            per_rule[fi].append(float(pooled[(fi, *cell)]))
    scores = [float(np.mean(v)) if v and np.isfinite(v).all() else float("nan") for v in per_rule]
    finite = [s for s in scores if s == s]
    best = scores.index(max(finite)) if finite else 0
    return best, scores, cells


def grid_from_args(spec: list[float] | None, default: np.ndarray) -> np.ndarray:
    """`--t-grid` / `--q-grid` START STOP N -> linspace(START, STOP, N); None -> `default`."""
    if spec is None:
        return np.asarray(default, dtype=float)
    if len(spec) != 3 or int(spec[2]) != spec[2] or spec[2] < 1 or spec[1] < spec[0]:
        raise ValueError(f"a grid is START STOP N with START <= STOP and integer N >= 1, got {spec}")
    return np.linspace(float(spec[0]), float(spec[1]), int(spec[2]))


def grid_edges(t: float | None, q: float, t_grid: np.ndarray, q_grid: np.ndarray) -> list[str]:
    """Which of a chosen (t, q) lie on the edge of their grid: e.g. ["q max"]. A value on the edge
    may mean the optimum lies outside the grid (widen it with --t-grid / --q-grid)."""
    edges = []
    for name, v, g in (("t", t, t_grid), ("q", q, q_grid)):
        if v is None or len(g) < 2:
            continue
        if np.isclose(v, np.min(g)):
            edges.append(f"{name} min")
        elif np.isclose(v, np.max(g)):
            edges.append(f"{name} max")
    return edges


def chosen_entries(grid: Any, t_grid: np.ndarray, q_grid: np.ndarray) -> dict[str, dict[str, Any]]:
    """thresholds.json's entry per method from the search's grid (a DataFrame with columns method,
    grow, q_rule, t, q, mean_dice; rows of one method in search order, the paper's variant first):
    the first row of highest mean Dice, so ties go to the paper's Algorithm 1. A CAM method's entry
    records t, q, grow, q_rule, val_dice and the best tuning Dice of each variant searched; the
    Threshold baseline's q and reference. A value on the edge of its grid is logged and listed in
    "grid_edge"."""
    chosen: dict[str, dict[str, Any]] = {}
    for method, g in grid.groupby("method", sort=False):
        g = g.dropna(subset=["mean_dice"])
        if g.empty:
            continue
        if not (g["mean_dice"] > 0).any():
            # Nothing overlaps anywhere on the grid (e.g. no slice flagged): idxmax would keep the
            # first cell at Dice 0 as if it had been chosen. Say so; the record shows it.
            LOG.error("%s: validation Dice is 0 at every grid cell (flagged slices do not reach "
                      "the tumour); its (t, q) are not informative", method)
        best = g.loc[g["mean_dice"].idxmax()]  # first maximum: the paper's variant wins ties
        entry = {"q": float(best["q"]), "val_dice": float(best["mean_dice"])}
        if method == "Threshold":
            entry["reference"] = THRESHOLD_REFERENCE
            edges = grid_edges(None, entry["q"], t_grid, q_grid)
        else:
            entry["t"] = float(best["t"])
            entry["grow"], entry["q_rule"] = str(best["grow"]), str(best["q_rule"])
            # the best tuning Dice of each variant searched, to see what the choice was between
            entry["val_dice_by_variant"] = {f"{vg}/{vr}": float(gg["mean_dice"].max())
                                            for (vg, vr), gg in g.groupby(["grow", "q_rule"], sort=False)}
            edges = grid_edges(entry["t"], entry["q"], t_grid, q_grid)
        entry["grid_edge"] = edges
        if edges:
            LOG.warning("%s: tuned %s on the edge of the grid (%s); the optimum may lie outside: "
                        "widen it with --t-grid / --q-grid START STOP N", method,
                        ", ".join(f"{k}={entry[k]:.2f}" for k in ("t", "q") if k in entry), ", ".join(edges))
        chosen[str(method)] = entry
    return chosen


def tune(val_refs: list, out: str | Path, *, cam_batch_size: int = 64,
         storage_path: str | None = None, cpus_per_trial: float = 0.5,
         cpus_per_study: float = 1.0, flag_threshold: float | None = None,
         t_grid: np.ndarray | None = None, q_grid: np.ndarray | None = None,
         tune_on: str | None = None, grow: str = DEFAULT_GROW,
         q_rule: str = DEFAULT_Q_RULE, flag_rule: str = DEFAULT_FLAG_RULE,
         flag_lo: list[float] | tuple[float, ...] | None = None) -> dict[str, Any]:
    """Cache the tuning studies' CAMs, grid-search with Ray Tune, write the grid and the chosen values.

    `val_refs`: the studies scored (see :func:`tuning_refs`); `tune_on` names that choice in
    thresholds.json (with how many training and validation studies were used).
    `flag_threshold`: slices with p >= it get CAMs (default: thresholds.json's, see
    `check_classifier`, else 0.5). `t_grid` / `q_grid`: default the paper's (T_GRID, Q_GRID).
    A chosen value on the edge of its grid is logged and recorded ("grid_edge" in its entry).
    `grow` / `q_rule`: the Algorithm-1 variants searched per CAM method jointly with (t, q)
    (:func:`cam_variants`); each CAM entry records the chosen "grow" and "q_rule", and
    thresholds.json the searched "cam_variants".
    `flag_rule` / `flag_lo` (issue 16; wsseg_core.gate.flag_rule_candidates): "threshold" keeps
    Algorithm 1's per-slice flags (p >= the flag threshold); "hysteresis" / "auto" also score
    hysteresis along z down to each lo, from the same cache (it holds every slice any candidate
    flags), and keep the rule of best pooled validation Dice (:func:`choose_flag_rule`); the
    chosen rule is recorded as "flag_rule" (read by scoring), the candidates' scores as
    "flag_rule_scores".
    """
    import pandas as pd
    import ray
    from ray import tune as rtune

    from wsseg_core.cams import available_methods
    from wsseg_core.models import load_classifier
    from wsseg_core.segment import Q_GRID, T_GRID

    run = RunFolder(out)
    run.fetch(run.classifier)
    cam_methods = available_methods(load_classifier(run.classifier)[0])  # no CAM under head "fc"
    if flag_threshold is None:
        flag_threshold = load_flag_threshold(run.thresholds)
    t_grid = np.asarray(T_GRID if t_grid is None else t_grid, dtype=float)
    q_grid_arr = np.asarray(Q_GRID if q_grid is None else q_grid, dtype=float)
    variants = cam_variants(grow, q_rule)
    from wsseg_core.gate import DEFAULT_FLAG_LO, FlagRule, flag_rule_candidates

    ctx_threshold = None
    if flag_rule in ("zctx", "auto"):
        ctx_threshold = z_context_flag_threshold(val_refs, out, cam_batch_size, cpus_per_study)
    rules = flag_rule_candidates(flag_threshold, flag_rule, DEFAULT_FLAG_LO if flag_lo is None else flag_lo,
                                 ctx_threshold)
    # The per-slice rule alone: the search as before (no per-slice counts, no probabilities needed).
    searched = None if rules == [FlagRule("threshold", float(flag_threshold))] else [r.to_dict() for r in rules]
    cache_task = ray.remote(num_cpus=cpus_per_study)(cache_study_cams)
    LOG.info("computing CAMs of %d tuning studies (%s) once (slices with p >= %.3f%s)", len(val_refs),
             tune_on or "given", flag_threshold,
             "" if searched is None else f", or flagged by {', '.join(r.name for r in rules)}")
    t0 = time.perf_counter()
    cached = ray.get([cache_task.remote(r.to_dict(), str(out), cam_batch_size, cpus_per_study,
                                        flag_threshold, [float(t) for t in t_grid],
                                        [float(q) for q in q_grid_arr], variants, searched)
                      for r in val_refs])
    files = [f for f in cached if f]
    used_splits = [r.split for r, f in zip(val_refs, cached) if f]
    t_cache = time.perf_counter() - t0
    cpu_cache, n_cached, n_base = 0.0, 0, 0
    for f in files:
        with np.load(io.BytesIO(read_bytes(f))) as c:
            cpu_cache += float(c["cpu_s"]) if "cpu_s" in c.files else float("nan")
            n_cached += int(c["flagged_z"].size)
            n_base += int(c["n_base"]) if "n_base" in c.files else 0
    LOG.info("tuning cache: %d slices with CAMs (%d of them flagged at p >= %.3f), %.1f CPU s in the "
             "cache tasks", n_cached, n_base, flag_threshold, cpu_cache)
    # The flag rule is chosen on the validation studies (their classifier probabilities are those
    # of unseen patients; on training slices p is overconfident, so hysteresis would add little
    # there and say little about test studies); without any, on the tuning studies.
    val_files = [f for f, sp in zip(files, used_splits) if sp == "val"] or list(files)
    if not files:
        raise RuntimeError("no usable labeled tuning study: cannot tune thresholds")

    q_grid = [float(q) for q in q_grid_arr]
    cells = [{"method": m, "ts": [float(t) for t in t_grid], "variants": [list(v) for v in variants]}
             for m in cam_methods]
    cells.append({"method": "Threshold", "ts": [float("nan")]})
    trainable = rtune.with_resources(
        rtune.with_parameters(evaluate_cell, cache_files=files, q_grid=q_grid, flag_rules=searched,
                              val_files=val_files), {"cpu": cpus_per_trial})
    tuner = rtune.Tuner(
        trainable,
        param_space={"cell": rtune.grid_search(cells)},
        tune_config=rtune.TuneConfig(metric="mean_dice", mode="max"),
        # verbose=1: one status table now and then, not a table per trial.
        run_config=rtune.RunConfig(name="thresholds", verbose=1,
                                   storage_path=ray_storage_path(storage_path, out),
                                   callbacks=[tune_callback("thresholds", "mean_dice", "max")]),
    )
    t0 = time.perf_counter()
    results = fit_keeping_ctrl_c(tuner)
    LOG.info("CAMs of %d tuning studies computed once (%.1f s); "
             "%d (method, t) cells x %d q x %d flag rule(s) scored from that cache in %d trials "
             "(%.1f s)", len(files), t_cache,
             sum(len(c["ts"]) for c in cells), len(q_grid), len(rules), len(cells),
             time.perf_counter() - t0)
    rows = []
    dice_f: dict[str, np.ndarray] = {}
    val_f: dict[str, tuple] = {}
    for r in results:
        if r.error:
            raise RuntimeError(f"tuning trial {r.config} failed: {r.error}")
        cell = r.config["cell"]
        by_f = r.metrics.get("dice_by_fvtq") or [r.metrics["dice_by_vtq"]]
        if searched is not None and cell["method"] != "Threshold":
            dice_f[cell["method"]] = np.asarray(by_f, dtype=float)
            vi, vp, vr = r.metrics["val_counts_by_fvtq"]
            val_f[cell["method"]] = (np.asarray(vi), np.asarray(vp), int(vr))
        for fi, by_v in enumerate(by_f):
            for (g, qr), tab in zip(r.metrics["variants"], by_v):
                if cell["method"] == "Threshold":
                    g = qr = None  # no CAM region: the variants do not apply
                for t, dice_by_q in zip(cell["ts"], tab):
                    for q, d in zip(q_grid, dice_by_q):
                        rows.append({"method": cell["method"], "flag_rule": rules[fi].name, "grow": g,
                                     "q_rule": qr, "t": t, "q": q, "mean_dice": d,
                                     "n_patients": r.metrics["n_patients"]})
    grid = pd.DataFrame(rows)
    run.write_parquet(run.tune_grid, grid)

    flag_info: dict[str, Any] = {}
    chosen_rule = rules[0]
    if searched is not None:
        fi, scores, _ = choose_flag_rule(dice_f, val_f)
        chosen_rule = rules[fi]
        on = "val" if any(sp == "val" for sp in used_splits) else "tuning studies (no validation study)"
        flag_info = {"flag_rule_source": f"tuned: pooled {on} Dice, mean over the CAM methods",
                     "flag_rule_scores": {r.name: s for r, s in zip(rules, scores)},
                     "flag_rule_mode": flag_rule}
        LOG.info("flag rule: %s (pooled validation Dice, mean over CAM methods: %s)", chosen_rule.name,
                 ", ".join(f"{r.name} {s:.3f}" for r, s in zip(rules, scores)))
    else:
        flag_info = {"flag_rule_source": "per-slice threshold (--flag-rule threshold)",
                     "flag_rule_mode": flag_rule, "flag_rule_scores": None}
    chosen = chosen_entries(grid[grid["flag_rule"] == chosen_rule.name].drop(columns="flag_rule"),
                            t_grid, q_grid_arr)
    run.update_thresholds(chosen, tune_on=tune_on, n_tune_studies=len(files),
                          n_train_studies=used_splits.count("train"), n_val_studies=used_splits.count("val"),
                          t_grid=[float(v) for v in t_grid], q_grid=q_grid,
                          cam_flag_threshold=float(flag_threshold),
                          cam_variants=[list(v) for v in variants],
                          tune_cache={"slices": n_cached, "slices_at_flag_threshold": n_base,
                                      "cpu_s": cpu_cache, "wall_s": t_cache},
                          flag_rule=chosen_rule.to_dict(), **flag_info)
    for m, e in chosen.items():
        LOG.info("%-9s t=%s q=%.1f %s tuning Dice %.3f", m, f"{e['t']:.2f}" if "t" in e else "-",
                 e["q"], f"grow={e['grow']} q_rule={e['q_rule']}" if "grow" in e else "", e["val_dice"])
    return {"thresholds": chosen, "grid": str(run.tune_grid)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tune_thresholds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--storage-path", default=None)
    add_grid_args(p)
    return p


def preset_q_rule(args: argparse.Namespace) -> str:
    """--q-rule as given, else the preset's: the paper preset keeps Algorithm 1 as published."""
    from jobs.common import PIPELINE_PRESETS

    if args.q_rule is not None:
        return args.q_rule
    return PIPELINE_PRESETS[args.preset].get("q_rule", DEFAULT_Q_RULE)


def preset_flag_rule(args: argparse.Namespace) -> str:
    """--flag-rule as given, else the preset's (default "threshold": Algorithm 1's per-slice step 1)."""
    from jobs.common import PIPELINE_PRESETS

    if getattr(args, "flag_rule", None) is not None:
        return args.flag_rule
    return PIPELINE_PRESETS[args.preset].get("flag_rule", DEFAULT_FLAG_RULE)


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """--t-grid / --q-grid / --flag-threshold (shared with jobs.pipeline)."""
    p.add_argument("--t-grid", type=float, nargs=3, default=None, metavar=("START", "STOP", "N"),
                   help="CAM threshold grid (default the paper's 0.1 0.9 10)")
    p.add_argument("--q-grid", type=float, nargs=3, default=None, metavar=("START", "STOP", "N"),
                   help="SUV percentile grid (default: the preset's; paper 20 50 20 as Früh et al., "
                        "small 20 99 80), e.g. 10 60 26")
    p.add_argument("--flag-threshold", type=float, default=None,
                   help="flag slices with p >= this (0.5: the paper's Algorithm 1); default: "
                        "chosen on validation (max slice F1), see wsseg_core.gate")
    p.add_argument("--tune-on", choices=TUNE_ON, default=DEFAULT_TUNE_ON,
                   help="studies whose Dice the (t, q) search maximises: train+val (default, as "
                        "Früh et al.: 'determined empirically on the training and validation sets') "
                        "or val (held-out validation patients only). The flag threshold and the "
                        "classifier gate always use validation.")
    p.add_argument("--q-rule", choices=Q_RULE_CHOICES, default=None,
                   help="Algorithm 1's step 5, per CAM method: percentile (the paper's: the q-th "
                        "percentile of the CAM region's SUVs), max (q %% of the region's SUVmax), "
                        "or auto (chosen on the tuning studies with t, q). Default: the preset's "
                        f"(small {DEFAULT_Q_RULE}; paper percentile, as published)")
    p.add_argument("--grow", choices=GROW_CHOICES, default=DEFAULT_GROW,
                   help="none (the paper's: the mask stays inside the CAM region), slice (grown "
                        "within the slice along SUV >= t_q from Algorithm 1's mask), or auto "
                        f"(chosen on the tuning studies; costs more; default {DEFAULT_GROW})")
    from wsseg_core.gate import DEFAULT_FLAG_LO, FLAG_RULE_CHOICES

    p.add_argument("--flag-rule", choices=FLAG_RULE_CHOICES, default=None,
                   help="Algorithm 1's step 1: threshold (each slice on its own, p >= the flag "
                        "threshold), hysteresis (seeds p >= the flag threshold grown along z "
                        "through contiguous slices with p >= lo, lo chosen from --flag-lo), zctx "
                        "(the z-context score (p + max(p[z-1..z+1]))/2 at its validation-F1 "
                        "threshold), or auto (all; the rule of best pooled validation Dice is kept, "
                        "ties to threshold). "
                        f"Default: the preset's (small and paper: {DEFAULT_FLAG_RULE})")
    p.add_argument("--flag-lo", type=float, nargs="+", default=None, metavar="LO",
                   help="hysteresis lower thresholds searched (values >= the flag threshold are "
                        f"dropped; default {' '.join(str(v) for v in DEFAULT_FLAG_LO)})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jobs.common import PIPELINE_PRESETS

    setup_logging()
    args = build_parser().parse_args(argv)
    args.q_rule = preset_q_rule(args)
    args.flag_rule = preset_flag_rule(args)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    init_ray(args.address)
    from wsseg_core.segment import Q_GRID, T_GRID

    res = tune(tuning_refs(labelled(refs, "train"), labelled(refs, "val"), args.tune_on), args.out,
               tune_on=args.tune_on, grow=args.grow, q_rule=args.q_rule,
               flag_rule=args.flag_rule, flag_lo=args.flag_lo,
               cam_batch_size=PIPELINE_PRESETS[args.preset]["cam_batch_size"],
               storage_path=args.storage_path, flag_threshold=args.flag_threshold,
               t_grid=grid_from_args(args.t_grid, T_GRID),
               q_grid=grid_from_args(args.q_grid, grid_from_args(PIPELINE_PRESETS[args.preset].get("q_grid"),
                                                                 Q_GRID)))
    print(f"thresholds: {join(args.out, 'thresholds.json')}\ngrid: {res['grid']}")
    return res


if __name__ == "__main__":
    main()
