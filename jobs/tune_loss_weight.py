"""Ray Tune over the classifier's tumour-class weight w of the weighted cross-entropy.

Each trial is a Ray Train fit (Train V2: `TorchTrainer.fit()` inside a Tune function trainable, with
Train's per-epoch metrics forwarded to Tune by `TuneReportCallback`). A trial is ranked by its best
validation AUC and, as a tie-breaker and for the record, by the best validation Dice that tuned CAM
thresholds reach with that classifier (its validation CAMs computed once, every (t_m, q_m) scored).

    python -m jobs.tune_loss_weight --cohort runs/demo/cohort.parquet --out runs/demo --grid 1 3.85 7.7 15.4
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jobs.common import (PIPELINE_PRESETS, RunFolder, add_common_args, auto_parallelism,
                         fit_keeping_ctrl_c, init_ray, labelled, ray_storage_path, resolve_cohort,
                         safe_name, setup_logging)
from jobs.telemetry import tune_callback
from jobs.ray_train import share_cpus
from jobs.train_classifier import WEIGHTS_HELP, weights_arg

LOG = logging.getLogger("wsseg.tune_loss_weight")
PAPER_WEIGHT_GRID = (1.0, 3.85, 7.7, 15.4)


def best_val_dice(cache_files: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, float]:
    """Best validation Dice per CAM method over the full (t_m, q_m) grid, averaged per patient and
    then over patients: the selection rule of every search (wsseg_core.selection), through the
    threshold search's `tune_thresholds.evaluate_cell`, so a weight is judged by the Dice the
    pipeline would tune for it. `methods`:
    the CAM methods the classifier defines (default all four)."""
    from jobs.tune_thresholds import evaluate_cell
    from wsseg_core.cams import CAM_METHODS
    from wsseg_core.segment import Q_GRID, T_GRID

    q_grid = [float(q) for q in Q_GRID]
    best = {}
    for m in (CAM_METHODS if methods is None else methods):
        res = evaluate_cell({"cell": {"method": m, "ts": [float(t) for t in T_GRID]}}, list(cache_files),
                            q_grid)
        best[m] = res["mean_dice"] if res["n_patients"] else float("nan")
    return best


def trial(config: dict[str, Any], train_refs: list, val_refs: list, out: str, fit_kwargs: dict,
          cam_batch_size: int = 64) -> dict:
    """One Tune trial: a Ray Train fit at weight w, then the Dice its CAMs reach on validation."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train_classifier import fit
    from jobs.tune_thresholds import cache_study_cams
    from wsseg_core.cams import available_methods
    from wsseg_core.models import load_classifier

    w = float(config["tumour_weight"])
    trial_out = Path(out) / "loss_weight" / safe_name(f"w{w:g}")
    res = fit(train_refs, val_refs, trial_out, tumour_weight=w, name=f"classifier_w{w:g}",
              callbacks=[TuneReportCallback()], **fit_kwargs)
    # That fit's classifier is <trial_out>/models/classifier.pt; its CAMs go to <trial_out>/tune/cache.
    files = [f for f in (cache_study_cams(r.to_dict(), str(trial_out), cam_batch_size) for r in val_refs)
             if f]
    dice = best_val_dice(files, available_methods(load_classifier(RunFolder(trial_out).classifier)[0]))
    return {"val_auc": float(res["best"].get("val_auc", float("nan"))),
            "best_cam_dice": float(np.nanmax(list(dice.values()))) if dice else float("nan"),
            **{f"dice_{m}": v for m, v in dice.items()}, "checkpoint": res["checkpoint"]}


def search(train_refs: list, val_refs: list, out: str | Path, grid: Sequence[float] = PAPER_WEIGHT_GRID,
           *, storage_path: str | None = None, max_concurrent_trials: int = 1, cam_batch_size: int = 64,
           **fit_kwargs) -> dict[str, Any]:
    """Run the search; write `<out>/loss_weight/results.parquet` and return the chosen weight.
    `cam_batch_size`: slices per CAM batch when caching each trial's validation CAMs (the preset's)."""
    from ray import tune

    run = RunFolder(out)
    storage = ray_storage_path(storage_path, out)
    fit_kwargs = {**fit_kwargs, "storage_path": storage}
    # The trial only waits on its Train run, which holds the real CPUs. Ray 2.60 refuses an empty
    # resource request ({"cpu": 0}), so the trial takes a sliver and the Train workers leave it room.
    trial_cpu = 0.01
    if not fit_kwargs.get("use_gpu") and fit_kwargs.get("cpus_per_worker") is None:
        workers = int(fit_kwargs.get("num_workers", 1))
        fit_kwargs["cpus_per_worker"] = share_cpus((auto_parallelism() - trial_cpu * max_concurrent_trials)
                                                   / max_concurrent_trials, workers)
    tuner = tune.Tuner(
        # The trial itself only waits on its Train run; the Train workers hold the real resources.
        tune.with_resources(tune.with_parameters(trial, train_refs=train_refs, val_refs=val_refs,
                                                 out=str(run.out), fit_kwargs=fit_kwargs,
                                                 cam_batch_size=cam_batch_size), {"cpu": trial_cpu}),
        param_space={"tumour_weight": tune.grid_search([float(w) for w in grid])},
        tune_config=tune.TuneConfig(metric="val_auc", mode="max", max_concurrent_trials=max_concurrent_trials),
        run_config=tune.RunConfig(name="loss_weight", storage_path=storage, verbose=1,
                                  callbacks=[tune_callback("loss_weight", "val_auc", "max")]),
    )
    results = fit_keeping_ctrl_c(tuner)
    df = results.get_dataframe()
    errors = [str(r.error) for r in results if r.error]
    if errors:
        raise RuntimeError(f"loss-weight trials failed: {errors}")
    df = df.rename(columns={"config/tumour_weight": "tumour_weight"})
    keep = ["tumour_weight", "val_auc", "best_cam_dice"] + [c for c in df.columns if c.startswith("dice_")] + ["checkpoint"]
    table = df[keep].sort_values(["val_auc", "best_cam_dice"], ascending=False).reset_index(drop=True)
    path = run.write_parquet("loss_weight/results.parquet", table)
    chosen = float(table.loc[0, "tumour_weight"])
    run.write_json("loss_weight/chosen.json",
                   {"tumour_weight": chosen, "ranked_by": ["val_auc", "best_cam_dice"]})
    LOG.info("loss-weight search:\n%s", table.drop(columns=["checkpoint"]).to_string(index=False))
    return {"tumour_weight": chosen, "results": str(path), "table": table}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tune_loss_weight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--grid", type=float, nargs="+", default=list(PAPER_WEIGHT_GRID),
                   help="tumour-class weights to try (paper: 7.7)")
    p.add_argument("--weights", default="imagenet", help=WEIGHTS_HELP)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the batch is the global batch, split across them")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--max-concurrent-trials", type=int, default=1)
    p.add_argument("--storage-path", default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    from jobs.train_classifier import classifier_recipe

    preset = PIPELINE_PRESETS[args.preset]
    refs = resolve_cohort(args.cohort, seed=args.seed)
    init_ray(args.address)
    res = search(labelled(refs, "train"),
                 labelled(refs, "val"), args.out, args.grid,
                 storage_path=args.storage_path, max_concurrent_trials=args.max_concurrent_trials,
                 cam_batch_size=preset["cam_batch_size"], model_preset=preset["model_preset"], epochs=args.epochs or preset["epochs"],
                 batch_size=preset["batch_size"], lr=preset["lr"], negative_keep=preset["negative_keep"],
                 weights=weights_arg(args.weights), num_workers=args.num_workers, use_gpu=args.use_gpu, seed=args.seed,
                 **classifier_recipe(preset))
    print(f"chosen tumour-class weight: {res['tumour_weight']:g}  (table: {res['results']})")
    return res


if __name__ == "__main__":
    main()
