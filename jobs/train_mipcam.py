"""Ray Train + Ray Tune: fit the MIP-CAM CNN (Amyar et al.) and search its distance-loss weight,
CAM threshold t and SUV threshold q on validation Dice.

    python -m jobs.train_mipcam --cohort runs/demo/cohort.parquet --out runs/demo
    python -m jobs.train_mipcam ... --weights 0 0.01 --classes diagnosis
    ray job submit --working-dir . -- python -m jobs.train_mipcam --cohort ... --preset paper --use-gpu

Steps: (1) each labelled train/val study's two MIPs, targets and centre-point distance maps are
computed once (Ray tasks) into `<out>/mipcam/samples/*.npz`; (2) Ray Tune runs one trial per
distance weight; a trial is a Ray Train fit (DDP, checkpoints every epoch, resume by rerunning with
the same --out/--name, `FailureConfig(max_failures)`), then the CAMs of every validation study are
computed ONCE and the whole (t, q) grid is scored from them (3-D Dice per study, averaged per
patient, then over patients, like `jobs.tune_thresholds`); (3) the trial with the best validation
Dice wins: its checkpoint is copied to `<out>/models/mipcam.pt` and `{"MIP-CAM": {t, q,
distance_weight, val_dice, gate_threshold, ...}}` is merged into `<out>/thresholds.json`. The whole
grid goes to `<out>/tune/mipcam_grid.parquet`, one row per (weight, t, q); the search's result per
weight to `<out>/tune/mipcam_search.parquet`, where w = 0 is always a row of its own, `variant`
"CAMs alone" (Amyar et al.'s ablation: the CNN trained on BCE only), beside "CAMs + distance loss".
The validation Dice applies the study gate the scorer applies (`wsseg_core.mipcam.study_flagged`:
a study the CNN calls tumour-free gets an empty mask, Dice 0 where it has tumour).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jobs.common import (RunFolder, add_common_args, fit_keeping_ctrl_c, init_ray, labelled,
                         mark_learned, ray_storage_path, resolve_cohort, safe_name, setup_logging,
                         study_key, torch_threads_for)
from jobs.ray_train import share_cpus
from jobs.telemetry import tune_callback
from wsseg_core.selection import MIN_LEARNED_VAL_DICE
from wsseg_core.storage import write_npz

LOG = logging.getLogger("wsseg.train_mipcam")
CKPT_FILE = "mipcam.pt"
# Distance-loss weights searched, in 1/mm (the paper gives none). 0 is "CAMs alone" (the paper's
# ablation). The distance term is tens of mm at the start, so 0.03/mm already outweighs the BCE
# (~0.7); measured on a 64x64x32 phantom, 0.05/mm kept the BCE at 0.69 (no classification learnt)
# while pulling the CAM to the lesions.
DISTANCE_WEIGHT_GRID = (0.0, 0.003, 0.01, 0.03)
CAMS_ALONE = "CAMs alone"  # the search table's name for w = 0 (Amyar et al.'s Tables 1-2)
WITH_DISTANCE = "CAMs + distance loss"

MIPCAM_JOB_PRESETS: dict[str, dict[str, Any]] = {
    # CPU: width 8, CAM at 1/8; ~30 train images of ~130x150 px, batch 8 (the paper's), Adam 1e-3.
    "small": dict(model_preset="small", epochs=40, batch_size=8, lr=1e-3),
    # Paper: width 32, CAM at 1/16, batch 8; the paper trained "2 days" and gives no epoch count.
    "paper": dict(model_preset="paper", epochs=200, batch_size=8, lr=1e-3),
}


def mipcam_path(out: str | Path) -> Path:
    """Where the chosen MIP-CAM CNN of a run lives: `<out>/models/mipcam.pt`."""
    return Path(out) / "models" / CKPT_FILE


# --------------------------------------------------------------------------------------------------
# Samples: computed once per study


def prepare_study(ref: dict, cache_dir: str, classes: Sequence[str]) -> str | None:
    """Load one study, write its two view samples (npz); None for an unreadable or unlabelled one."""
    from jobs.common import load_labelled_study
    from wsseg_core.mipcam import samples_to_npz, study_samples

    got = load_labelled_study(ref, "MIP-CAM", LOG)
    if got is None:
        return None
    r, st = got
    path = Path(cache_dir) / f"{study_key(r.patient_id, r.study_id)}.npz"
    try:
        samples = study_samples(st.suv, st.seg, st.affine, st.spacing_mm, classes, r.diagnosis,
                                name=f"{r.patient_id}/{r.study_id}")
    except ValueError as e:  # e.g. a cancer type the training studies do not have
        LOG.warning("MIP-CAM skips %s/%s: %s", r.patient_id, r.study_id, e)
        return None
    samples_to_npz(path, samples)
    return str(path)


def prepare_samples(refs: list, cache_dir: str | Path, classes: Sequence[str],
                    num_cpus: float = 1.0) -> list[str]:
    """Every usable study's sample file, computed by Ray tasks (one per study)."""
    import ray

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=num_cpus)(prepare_study)
    return [f for f in ray.get([task.remote(r.to_dict(), str(Path(cache_dir).absolute()),
                                            list(classes)) for r in refs]) if f]


def _load_samples(files: Sequence[str]) -> list:
    from wsseg_core.mipcam import samples_from_npz

    return [s for f in files for s in samples_from_npz(f)]


# --------------------------------------------------------------------------------------------------
# Ray Train


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: its share of each GLOBAL batch (`config["batch_size"]` split across the
    workers) of one shared seeded order; reports and checkpoints every epoch."""
    import ray.train.torch
    import torch

    from jobs.ray_train import (mean_over_ranks, on_rank0, prepare_ddp_model, report_epoch,
                                resume_from_checkpoint, start_watchdog, world_info)
    from wsseg_core.mipcam import build_mipcam, evaluate, load_mipcam, save_mipcam, train_epoch
    from wsseg_core.train import GlobalBatchSampler

    rank, world = world_info()
    start_watchdog(config)
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    torch.manual_seed(config["seed"])
    # Every rank holds all training samples and takes its share of each global batch of one shared
    # seeded order: equal steps on every rank (issue 17). Validation runs on rank 0 only.
    train = _load_samples(config["train_files"])
    val = _load_samples(config["val_files"]) if rank == 0 else []
    sampler = GlobalBatchSampler(len(train), config["batch_size"], rank, world, seed=config["seed"])
    w = float(config["distance_weight"])

    model = build_mipcam(config["model_preset"], classes=config["classes"])
    start_epoch, optimizer_state = 0, None
    resumed = resume_from_checkpoint(CKPT_FILE, load_mipcam)
    if resumed is not None:
        (model, _), start_epoch, optimizer_state = resumed
        model.train()
    model = prepare_ddp_model(model)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    bare = model.module if hasattr(model, "module") else model
    for epoch in range(start_epoch, config["epochs"]):
        sampler.set_epoch(epoch)
        tr = train_epoch(model, train, optimizer, w, config["batch_size"], device=device,
                         index_batches=sampler)
        tr = {k: mean_over_ranks(v) for k, v in tr.items()}
        va = on_rank0(lambda: evaluate(bare, val, w, config["batch_size"], device))
        metrics = {"epoch": epoch, "train_loss": tr["loss"], "train_bce": tr["bce"],
                   "train_dist_mm": tr["dist_mm"], "val_loss": va["loss"], "val_bce": va["bce"],
                   "val_dist_mm": va["dist_mm"], "val_accuracy": va["accuracy"],
                   "val_peak_mm": va["peak_mm"], "distance_weight": w, "start_epoch": start_epoch,
                   "workers": world, "steps": len(sampler)}
        # NaN (no labelled validation sample) would break the checkpoint ranking.
        metrics = {k: (v if not isinstance(v, float) or math.isfinite(v) else 1e9)
                   for k, v in metrics.items()}
        if rank == 0:
            LOG.info("w=%g epoch %d/%d loss %.3f (bce %.3f, dist %.1f mm) val bce %.3f dist "
                     "%.1f mm peak %.1f mm acc %.2f", w, epoch + 1, config["epochs"], tr["loss"],
                     tr["bce"], tr["dist_mm"], va["bce"], va["dist_mm"], va["peak_mm"],
                     va["accuracy"])
        report_epoch(metrics, epoch, optimizer, CKPT_FILE,
                     lambda path, metrics=metrics: save_mipcam(path, bare, meta=metrics))


def fit_mipcam(train_files: list[str], val_files: list[str], dest: str | Path, *,
               distance_weight: float, classes: Sequence[str] = ("tumour",),
               model_preset: str = "small", epochs: int = 40, batch_size: int = 8,
               lr: float = 1e-3, storage_path: str | Path, name: str, seed: int = 0,
               **fit_kwargs: Any) -> dict:
    """Ray Train fit at one distance weight; the best epoch (lowest validation loss at this weight)
    is copied to `dest`. `fit_kwargs`: num_workers, use_gpu, cpus_per_worker, max_failures,
    callbacks (see :func:`jobs.ray_train.fit_best`). Returns dict(checkpoint, history, best).
    `batch_size` is the GLOBAL batch, split across the workers (at least num_workers)."""
    from jobs.ray_train import fit_best
    from wsseg_core.train import check_global_batch

    check_global_batch(int(batch_size), int(fit_kwargs.get("num_workers", 1)))

    config = dict(train_files=list(train_files), val_files=list(val_files or train_files),
                  distance_weight=float(distance_weight), classes=list(classes),
                  model_preset=model_preset, epochs=int(epochs), batch_size=int(batch_size),
                  lr=float(lr), seed=int(seed))
    return fit_best(train_loop_per_worker, config, dest=dest, ckpt_file=CKPT_FILE, metric="val_loss",
                    mode="min", name=name, storage_path=ray_storage_path(str(storage_path), dest),
                    **fit_kwargs)


# --------------------------------------------------------------------------------------------------
# Validation CAMs (once per study) and the (t, q) grid


def cache_val_cams(checkpoint: str, refs: list, cache_dir: str | Path) -> list[str]:
    """Each labelled validation study's SUV, SEG, geometry and both view CAMs, saved once (npz)."""
    from wsseg_core.data import StudyError, load_study
    from wsseg_core.mipcam import compute_mips, load_mipcam, predict_view_cams

    model, _ = load_mipcam(checkpoint)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for r in refs:
        try:
            st = load_study(r)
        except StudyError as e:
            LOG.warning("tuning skips %s/%s: %s", r.patient_id, r.study_id, e)
            continue
        if st.seg is None:
            continue
        mips, _ = compute_mips(st.suv, st.affine, st.spacing_mm)
        cams, probs = predict_view_cams(model, mips)
        path = cache_dir / f"{study_key(r.patient_id, r.study_id)}.npz"
        write_npz(path, suv=st.suv, seg=st.seg, affine=st.affine, spacing_mm=st.spacing_mm,
                  patient_id=np.array(r.patient_id), probs=probs,
                  **{f"cam_{v}": c for v, c in cams.items()})
        files.append(str(path))
    return files


def grid_dice(cache_files: Sequence[str], t_grid: Sequence[float], q_grid: Sequence[float],
              gate_threshold: float | None = None) -> tuple[np.ndarray, int, int]:
    """Mean validation Dice (T, Q): per study, averaged per patient, then over patients; the
    number of patients with a defined Dice; and the number of studies with tumour the gate
    empties. A study the CNN calls tumour-free (``study_flagged``; ``gate_threshold`` default
    ``DEFAULT_GATE``) gets the scorer's empty mask: Dice 0 at every (t, q) where it has tumour."""
    from wsseg_core.mipcam import DEFAULT_GATE, VIEWS, dice_grid, mip_views, study_flagged
    from wsseg_core.selection import patient_mean

    gate = DEFAULT_GATE if gate_threshold is None else float(gate_threshold)
    scores = []
    n_gated = 0
    for f in cache_files:
        with np.load(f) as c:
            if "probs" in c and not study_flagged(c["probs"], gate):
                g = np.full((len(t_grid), len(q_grid)), 0.0 if np.asarray(c["seg"]).any() else np.nan)
                n_gated += int(np.asarray(c["seg"]).any())
            else:
                views = mip_views(c["suv"].shape, c["affine"], c["spacing_mm"])
                g = dice_grid(c["suv"], c["seg"], {v: c[f"cam_{v}"] for v in VIEWS}, views, t_grid,
                              q_grid)
            scores.append((str(c["patient_id"]), g))
    mean, n = patient_mean(scores, (len(t_grid), len(q_grid)))
    return mean, n, n_gated


# --------------------------------------------------------------------------------------------------
# Ray Tune over the distance weight


def trial(config: dict[str, Any], train_files: list[str], val_files: list[str], val_refs: list,
          out: str, fit_kwargs: dict) -> dict:
    """One Tune trial: Train fit at weight w, validation CAMs once, the whole (t, q) grid."""
    from wsseg_core.mipcam import Q_GRID, T_GRID
    from wsseg_core.selection import best_cell

    torch_threads_for(1)
    w = float(config["distance_weight"])
    trial_dir = Path(out) / "mipcam" / safe_name(f"w{w:g}")
    # No TuneReportCallback: the trial's metric (val_dice) exists only after the fit, and Tune's
    # strict metric check rejects the per-epoch reports that lack it. The epochs are in the Train
    # run's own results (<storage>/mipcam_w<w>/) and the log.
    res = fit_mipcam(train_files, val_files, trial_dir / CKPT_FILE, distance_weight=w,
                     name=f"mipcam_w{w:g}", **fit_kwargs)
    files = cache_val_cams(res["checkpoint"], val_refs, trial_dir / "cams")
    mean, n, n_gated = grid_dice(files, T_GRID, Q_GRID)
    if (cell := best_cell(mean)) is not None:
        i, j = cell
        best = {"val_dice": float(mean[i, j]), "t": float(T_GRID[i]), "q": float(Q_GRID[j])}
    else:
        best = {"val_dice": 0.0, "t": float("nan"), "q": float("nan")}
    gate = gate_check(files)
    return {**best, "n_patients": n, "n_gated": n_gated, "checkpoint": res["checkpoint"],
            "val_peak_mm": float(res["best"].get("val_peak_mm", float("nan"))),
            "dice_grid": [[float(v) for v in row] for row in mean],
            # flat keys: a Tune result's nested dicts are not kept alike by every reader
            **{f"gate_{k}": v for k, v in gate.items()}}


def gate_check(cache_files: Sequence[str], gate_threshold: float | None = None) -> dict[str, Any]:
    """`wsseg_core.mipcam.gate_separation` of the cached validation studies (`cache_val_cams`):
    how the study gate treats the studies with tumour and the tumour-free ones."""
    from wsseg_core.mipcam import DEFAULT_GATE, gate_separation

    probs, has_tumour = [], []
    for f in cache_files:
        with np.load(f) as c:
            if "probs" in c:
                probs.append(float(np.max(c["probs"])))
                has_tumour.append(bool(np.asarray(c["seg"]).any()))
    return gate_separation(probs, has_tumour, DEFAULT_GATE if gate_threshold is None else gate_threshold)


def gate_note(gate: dict[str, Any]) -> str | None:
    """A warning when the study gate passes every tumour-free validation study (it will segment
    tumour-free studies too); None otherwise."""
    if not gate.get("passes_every_free_study"):
        return None
    span = (lambda v: "none" if not v else f"{v[0]:.2f}" if round(v[0], 2) == round(v[1], 2)
            else f"{v[0]:.2f}-{v[1]:.2f}")
    auc = gate.get("auc")
    auc_text = f"; study AUC {auc:.2f}" if auc is not None and auc == auc else ""  # NaN / null: none
    return (f"MIP-CAM's study gate (p >= {gate['gate_threshold']:g}) passed all {gate['n_free']} "
            f"tumour-free validation studies (p {span(gate['free_p'])}; studies with tumour "
            f"{span(gate['tumour_p'])}{auc_text}): expect it to segment tumour-free studies as well (false positive volume). Its CNN is "
            f"trained with the paper's unweighted BCE on studies most of which hold tumour, so its "
            f"probabilities sit above 0.5 (docs/EXPERIMENTS.md, \"MIP-CAM\").")


def not_learned_reason(entry: dict[str, Any], bar: float = MIN_LEARNED_VAL_DICE) -> str | None:
    """Why the chosen MIP-CAM has not learned: its validation Dice (mean over patients at the best
    (t, q)) is under ``bar``; None when it has."""
    dice = float(entry["val_dice"])
    if dice == dice and dice >= bar:
        return None
    return (f"MIP-CAM did not learn: the chosen distance weight {entry['distance_weight']:g}/mm at t "
            f"{entry['t']:.2f}, q {entry['q']:.1f} % has validation Dice {dice:.3f} < {bar:g} "
            f"({entry['n_val_patients']} patients; CAMs alone {entry['cams_alone_val_dice']:.3f}); its "
            f"masks are scored but are not a segmentation. tune/mipcam_search.parquet has every weight's "
            f"score. What to try: another training draw (jobs.pipeline --train-seed N), more epochs "
            f"(jobs.train_mipcam --epochs N) or other weights (--weights).")


def search(train_refs: list, val_refs: list, out: str | Path,
           weights: Sequence[float] = DISTANCE_WEIGHT_GRID, *, classes: str = "tumour",
           preset: str = "small", epochs: int | None = None, num_workers: int = 1,
           use_gpu: bool = False, storage_path: str | None = None, max_concurrent_trials: int = 1,
           seed: int = 0) -> dict[str, Any]:
    """The whole MIP-CAM job: samples, one Tune trial per weight, the winner's checkpoint and
    thresholds. `classes`: "tumour" (tumour vs none) or "diagnosis" (cancer type from the manifest).
    w = 0 ("CAMs alone", the paper's baseline) is always searched, added when `weights` lacks it,
    so the search table always says what the distance loss adds. `out` may be a URI: the job works
    in its staging folder (Ray storage there too, by default) and uploads its outputs.
    Returns dict(checkpoint, distance_weight, t, q, val_dice, table (DataFrame), grid (path),
    search (path), record (run.json's "mipcam" entry))."""
    import pandas as pd
    import ray
    from ray import tune

    from wsseg_core.mipcam import Q_GRID, T_GRID, TUMOUR_CLASSES, diagnosis_classes

    run = RunFolder(out)
    storage = ray_storage_path(storage_path, run.out)
    weights = searched_weights(weights)
    if classes == "tumour":
        class_names = TUMOUR_CLASSES
    elif classes == "diagnosis":
        class_names = diagnosis_classes(r.diagnosis for r in train_refs)
        if not class_names:
            raise ValueError("--classes diagnosis: the training studies carry no cancer type")
    else:
        raise ValueError(f"classes must be 'tumour' or 'diagnosis', got {classes!r}")
    if not val_refs:
        LOG.warning("no labelled validation study: MIP-CAM is tuned on the training studies")
        val_refs = train_refs
    sample_dir = run.out / "mipcam" / "samples"
    train_files = prepare_samples(train_refs, sample_dir, class_names)
    val_files = prepare_samples(val_refs, sample_dir, class_names)
    if not train_files:
        raise RuntimeError("no usable labelled training study for MIP-CAM")
    jp = MIPCAM_JOB_PRESETS[preset]
    # A trial holds 1 CPU (it computes the validation CAMs and the grid; Tune refuses a trial with
    # no resources at all) and its Train workers share what the other CPUs leave, whole CPUs each.
    total = int(ray.cluster_resources().get("CPU", 1))
    cpus_per_worker = 1.0 if use_gpu else share_cpus(
        (total - max_concurrent_trials) / max_concurrent_trials, num_workers)
    fit_kwargs = dict(classes=list(class_names), model_preset=jp["model_preset"],
                      epochs=int(epochs or jp["epochs"]), batch_size=jp["batch_size"], lr=jp["lr"],
                      num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                      storage_path=storage, seed=seed)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, train_files=train_files, val_files=val_files,
                                                 val_refs=val_refs, out=str(run.out),
                                                 fit_kwargs=fit_kwargs), {"cpu": 1}),
        param_space={"distance_weight": tune.grid_search([float(w) for w in weights])},
        tune_config=tune.TuneConfig(metric="val_dice", mode="max",
                                    max_concurrent_trials=max_concurrent_trials),
        run_config=tune.RunConfig(name="mipcam", storage_path=storage, verbose=1,
                                  callbacks=[tune_callback("mipcam", "val_dice", "max")]),
    )
    results = fit_keeping_ctrl_c(tuner)
    errors = [str(r.error) for r in results if r.error]
    if errors:
        raise RuntimeError(f"MIP-CAM trials failed: {errors}")
    rows, grid_rows = [], []
    for r in results:
        m, w = r.metrics, float(r.config["distance_weight"])
        rows.append({"variant": CAMS_ALONE if w == 0 else WITH_DISTANCE, "distance_weight": w,
                     "val_dice": m["val_dice"], "t": m["t"], "q": m["q"],
                     "n_patients": m["n_patients"], "n_gated": m["n_gated"],
                     "val_peak_mm": m["val_peak_mm"], "val_study_auc": m["gate_auc"],
                     "val_free_passed": m["gate_free_passed"], "val_n_free": m["gate_n_free"],
                     "checkpoint": m["checkpoint"],
                     "gate": {k[len("gate_"):]: v for k, v in m.items() if k.startswith("gate_")}})
        for i, t in enumerate(T_GRID):
            for j, q in enumerate(Q_GRID):
                grid_rows.append({"method": "MIP-CAM", "distance_weight": w, "t": float(t),
                                  "q": float(q), "mean_dice": m["dice_grid"][i][j],
                                  "n_patients": m["n_patients"]})
    table = pd.DataFrame(rows).sort_values(["val_dice", "distance_weight"], ascending=[False, True])
    table = table.reset_index(drop=True)
    grid_path = run.write_parquet("tune/mipcam_grid.parquet", pd.DataFrame(grid_rows))
    search_path = run.write_parquet("tune/mipcam_search.parquet", table.drop(columns=["checkpoint", "gate"]))
    win = table.iloc[0]
    dest = run.copy_in(win["checkpoint"], mipcam_path(run.out))
    from wsseg_core.mipcam import DEFAULT_GATE

    alone = table[table["distance_weight"] == 0].iloc[0]
    entry = {"t": float(win["t"]), "q": float(win["q"]), "val_dice": float(win["val_dice"]),
             "distance_weight": float(win["distance_weight"]), "reference": "component_max",
             "gate_threshold": DEFAULT_GATE, "cams_alone_val_dice": float(alone["val_dice"]),
             "classes": list(class_names), "n_val_patients": int(win["n_patients"]),
             # NaN (an AUC with one kind of study missing) as null: thresholds.json stays strict JSON
             "gate_check": {k: (None if isinstance(v, float) and v != v else v)
                            for k, v in dict(win["gate"]).items()}}
    mark_learned(entry, not_learned_reason(entry), LOG)
    if (note := gate_note(entry["gate_check"])) is not None:
        entry["note"] = note
        LOG.warning("%s", note)
    run.update_thresholds({"MIP-CAM": entry})
    run.write_json("mipcam/chosen.json", {**entry, "checkpoint": str(dest)})
    LOG.info("MIP-CAM search (%s: w = 0):\n%s", CAMS_ALONE,
             table.drop(columns=["checkpoint", "gate"]).to_string(index=False))
    LOG.info("MIP-CAM: %s validation Dice %.3f; chosen w = %g/mm: %.3f", CAMS_ALONE,
             entry["cams_alone_val_dice"], entry["distance_weight"], entry["val_dice"])
    record = {"path": str(dest), "sha256": run.sha256(dest), "distance_weight": entry["distance_weight"],
              "t": entry["t"], "q": entry["q"], "val_dice": entry["val_dice"], "classes": entry["classes"],
              "grid": str(grid_path), "gate_check": entry["gate_check"],
              "search": table.drop(columns=["checkpoint", "gate"]).to_dict("records")}
    return {"checkpoint": str(dest), **entry, "table": table, "grid": str(grid_path),
            "search": str(search_path), "record": record}


def searched_weights(weights: Sequence[float]) -> list[float]:
    """The distance weights to search: ``weights`` (sorted, duplicates dropped) with 0 added when
    missing, so "CAMs alone" is always a row of the search (logged when added)."""
    ws = sorted({float(w) for w in weights})
    if any(w < 0 for w in ws):
        raise ValueError(f"distance weights must be >= 0, got {list(weights)}")
    if 0.0 not in ws:
        LOG.info("MIP-CAM: adding w = 0 (%s) to the searched weights %s", CAMS_ALONE, ws)
        ws.insert(0, 0.0)
    return ws


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_mipcam", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--weights", type=float, nargs="+", default=list(DISTANCE_WEIGHT_GRID),
                   help="distance-loss weights to search, 1/mm (0 = CAMs alone, always searched)")
    p.add_argument("--classes", choices=("tumour", "diagnosis"), default="tumour",
                   help="what the CNN classifies: tumour vs none, or the manifest's cancer type")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's (small 40, paper 200)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the batch is the global batch, split across them")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--max-concurrent-trials", type=int, default=1)
    p.add_argument("--storage-path", default=None, help="Ray Train/Tune storage; default <out>/ray")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    train = labelled(refs, "train")
    val = labelled(refs, "val")
    if not train:
        raise SystemExit(f"{args.cohort}: no labelled training studies")
    init_ray(args.address)
    res = search(train, val, args.out, args.weights, classes=args.classes, preset=args.preset,
                 epochs=args.epochs, num_workers=args.num_workers, use_gpu=args.use_gpu,
                 storage_path=args.storage_path, max_concurrent_trials=args.max_concurrent_trials,
                 seed=args.seed)
    print(f"MIP-CAM checkpoint: {res['checkpoint']}  distance weight {res['distance_weight']:g}/mm, "
          f"t={res['t']:.2f}, q={res['q']:.1f}% of SUVmax, val Dice {res['val_dice']:.3f}")
    return res


if __name__ == "__main__":
    main()
