"""The whole study, one command: phantom (if no cohort) -> train -> tune -> score -> analyze.

    python -m jobs.pipeline --out runs/demo                       # small preset, synthetic cohort
    python -m jobs.pipeline --cohort /data/autoPET --out s3://... --preset paper --use-gpu --num-workers 8

Writes `<out>/metrics/` (Parquet, one row per study and method), `<out>/masks/`, `<out>/icc.parquet`,
`<out>/summary.parquet`, `<out>/thresholds.json`, `<out>/models/classifier.pt` and `<out>/run.json`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import os
import time
from typing import Any

from jobs.common import (PIPELINE_PRESETS, RunFolder, add_common_args, init_ray, input_record, labelled,
                         resolve_cohort, setup_logging, versions, write_manifest)
from jobs.telemetry import StageClock
from jobs.train_classifier import (HEAD_CHOICES, HEAD_HELP, MAP_STRIDE_HELP, NO_ATROUS_HELP,
                                   PIXEL_MM_HELP, WEIGHTS_HELP, resolve_weights, weights_arg)
from wsseg_core.models import MAP_STRIDES
from wsseg_core.thresholds import load_flag_rule, load_thresholds

LOG = logging.getLogger("wsseg.pipeline")


def build_parser() -> argparse.ArgumentParser:
    from jobs.score_cohort import ALL_METHODS, DEFAULT_METHODS

    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--phantom-n", type=int, default=None, help="studies in the synthetic cohort")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    p.add_argument("--epochs", type=int, default=None, help="classifier epochs (default: preset)")
    p.add_argument("--weights", default="imagenet", help=WEIGHTS_HELP)
    p.add_argument("--head", choices=HEAD_CHOICES, default="gap", help=HEAD_HELP)
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the preset's batch is the global batch, split across them")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--concurrency", type=int, default=None,
                   help="scoring actors (default: as many as the cluster's CPUs or GPUs hold)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--storage-path", default=None, help="Ray Train/Tune storage; default <out>/ray")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS,
                   help="add UNet to also train and score the supervised U-Net baseline "
                        "(small preset: ~10 min more on 2 CPUs); add MIP-CAM to train Amyar et al.'s "
                        "MIP CNN and search its distance weight, t and q (jobs.train_mipcam); add BoxFCN "
                        "for Afshari et al.'s box-supervised 3-D FCN (warm start + L_MDice + L_MS)")
    p.add_argument("--boxfcn-tune-samples", type=int, default=0,
                   help="with BoxFCN: Ray Tune trials over beta, lambda, omega1, omega2, alpha "
                        "(0: the paper's values, no search)")
    p.add_argument("--boxfcn-ms-form", choices=("eq5", "chan-vese", "both"), default="eq5",
                   help="with BoxFCN: L_MS as the paper's Eq. 5 (default), in Chan-Vese form, or both "
                        "networks trained and chosen between on validation (jobs.train_boxfcn --ms-form)")
    p.add_argument("--boxfcn-warm-epochs", type=int, default=None,
                   help="with BoxFCN: box-Dice warm-start epochs (default: the preset's, small 10)")
    p.add_argument("--boxfcn-patience", type=int, default=None,
                   help="with BoxFCN: stop each of its runs after this many epochs without a better "
                        "validation Dice (default: the preset's, small 3); more warm-start epochs "
                        "need a patience that lets them run")
    p.add_argument("--unet-members", type=int, default=1,
                   help="with UNet: train N networks (training seeds train-seed ... train-seed + N - 1) "
                        "and score the mean of their probabilities; costs N U-Net trainings (small preset "
                        "on the demo: ~5-8 min each on 2 CPUs). 3 members raised the test median Dice on "
                        "all five cohorts measured (docs/UNET_EXPERIMENTS.md, \"an ensemble of training draws\")")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of every network's training (initial weights, slice order, augmentation); "
                        "default: --seed. The split and the synthetic cohort follow --seed alone, so another "
                        "--train-seed is another training draw on the same patients: on the phantom "
                        "variants the draw alone moved the classifier's test slice AUC by up to 0.18 "
                        "(docs/EXPERIMENTS.md, \"Seed spread\")")
    p.add_argument("--tumour-weight", type=float, default=7.7, help="weighted cross-entropy w (paper: 7.7)")
    p.add_argument("--lr", type=float, default=None,
                   help="classifier learning rate (peak lr of a one-cycle schedule); default: the preset's")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="classifier optimizer (default: the preset's; small adamw, paper sgd)")
    p.add_argument("--input-size", type=int, default=None,
                   help="classifier input side in pixels, a multiple of 8; the last map (CAM grid) is "
                        "1/map-stride of it (default: the preset's; small 64 -> 16x16 at stride 4; paper 256 -> 32x32)")
    p.add_argument("--pixel-mm", type=float, default=None, help=PIXEL_MM_HELP)
    p.add_argument("--map-stride", type=int, choices=MAP_STRIDES, default=None, help=MAP_STRIDE_HELP)
    p.add_argument("--no-atrous", dest="atrous", action="store_false", default=None, help=NO_ATROUS_HELP)
    p.add_argument("--allow-weak-classifier", action="store_true",
                   help="go on to tuning and scoring even when the classifier fails the quality "
                        "gate (wsseg_core.gate); run.json records that it did")
    from jobs.tune_thresholds import add_grid_args
    add_grid_args(p)
    p.add_argument("--tune-loss-weight", action="store_true",
                   help="first search w in {1, 3.85, 7.7, 15.4} with Ray Tune (one Ray Train fit per value)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from nothing: discard this run folder's models, thresholds, results and "
                        "stored Ray runs (default: a rerun resumes what is current and redoes what changed)")
    return p


# Pipeline arguments that change where or how fast stages run, not what they compute.
_NOT_IN_STAGE_FINGERPRINT = {"address", "concurrency", "num_gpus_per_actor", "num_workers", "use_gpu",
                             "storage_path", "overwrite", "out"}
_RUN_OUTPUTS = ("models", "tune", "metrics", "masks", "slices", "figures", "thresholds.json",
                "run.json", "icc.parquet", "summary.parquet", "comparisons.parquet", "slice_auc.parquet",
                "report.html")


def discard_outputs(layout, storage_path: str | None, out: str) -> None:
    """`--overwrite`: remove what earlier runs left in the run folder and their stored Ray runs
    (all of `<out>/ray` by default; with a shared `--storage-path`, only the runs this folder's
    run.json names, so other runs kept there survive)."""
    import json
    import shutil

    from jobs.common import ray_storage_path
    from jobs.ray_train import discard_run

    storage = ray_storage_path(storage_path, out)
    if storage_path:
        try:
            old = json.loads(layout.run_json.read_text())
        except (OSError, ValueError):
            old = {}
        for rec in (old.get("training_runs") or {}).values():
            if rec and discard_run(storage, rec["run_name"]):
                LOG.info("--overwrite: discarded stored Ray run %s", rec["run_name"])
    elif layout.ray_storage.exists():
        shutil.rmtree(layout.ray_storage)
    for name in _RUN_OUTPUTS:
        p = layout.out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    LOG.info("--overwrite: removed earlier outputs of %s", layout.out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the preset's defaults resolved (recorded and fingerprinted so)."""
    from jobs.tune_thresholds import preset_flag_rule, preset_q_rule

    args = build_parser().parse_args(argv)
    args.q_rule = preset_q_rule(args)
    args.flag_rule = preset_flag_rule(args)
    if args.train_seed is None:  # resolved here, so `--train-seed <--seed>` is the same run as none
        args.train_seed = args.seed
    return args


def stage_fingerprint(args, refs: list, model_file) -> dict[str, Any]:
    """What the threshold search computes from: the classifier's sha256, its studies (ids, paths,
    sizes) and the pipeline's settings (less those that only place or pace the work)."""
    import hashlib
    import json

    from jobs.common import input_record, sha256_file

    fields = {"classifier_sha256": sha256_file(model_file), "studies": input_record(refs),
              "args": {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_IN_STAGE_FINGERPRINT}}
    blob = json.dumps(fields, sort_keys=True, default=str)
    return {"digest": hashlib.sha256(blob.encode()).hexdigest(), "fields": json.loads(blob)}


def stage_change(previous: dict | None, current: dict[str, Any], outputs_exist: bool) -> str | None:
    """None when a stage recorded as `previous` (a stage_fingerprint, or None) can be reused for
    `current`; else why not, naming the settings that changed (e.g. `tune_on: "val" -> "train+val"`)."""
    from jobs.ray_train import describe_change

    if not previous:
        return "no earlier search recorded"
    if previous.get("digest") == current["digest"]:
        return None if outputs_exist else "its outputs are missing"
    old, new = previous.get("fields", {}), current["fields"]
    # Name the pipeline arguments that changed, not just "args changed".
    parts = [describe_change(old.get("args") or {}, new.get("args") or {})] \
        if (old.get("args") or {}) != (new.get("args") or {}) else []
    rest = describe_change({k: v for k, v in old.items() if k != "args"},
                           {k: v for k, v in new.items() if k != "args"})
    if rest != "nothing recorded differs":
        parts.append(rest)
    return "; ".join(parts) or "the record's digest differs"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jobs import analyze as analyze_job
    from jobs import score_cohort, train_boxfcn, train_classifier, tune_thresholds
    from jobs.ray_train import training_run
    from wsseg_core.cohort import cohort_summary, format_cohort_summary

    setup_logging()
    args = parse_args(argv)
    preset = PIPELINE_PRESETS[args.preset]
    from wsseg_core.models import PretrainedWeightsUnavailable
    from wsseg_core.storage import join

    try:  # before anything is written or started: the paper preset never starts from random silently
        resolve_weights(weights_arg(args.weights), preset["model_preset"])
    except (PretrainedWeightsUnavailable, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None

    # `--out` may be a URI (s3://, file://): the run is staged locally and uploaded as it goes.
    run_folder = RunFolder(args.out)
    out = run_folder.location  # what every job is given
    run_folder.out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        discard_outputs(run_folder, args.storage_path, out)
    if run_folder.staging is not None:
        LOG.info("--out is a URI: staging in %s, outputs go to %s", run_folder.staging, args.out)
    # Wall seconds per pipeline stage, for run.json (a stage that raised is not timed).
    clock = StageClock()
    timings = clock.seconds
    t_all = time.perf_counter()

    with clock.stage("cohort_s"):
        cohort = args.cohort
        if cohort is None:
            from wsseg_core.phantom import write_phantom_cohort

            cohort = run_folder.out / "phantom"
            n, shape = args.phantom_n or preset["phantom_n"], tuple(args.phantom_shape or preset["phantom_shape"])
            LOG.info("no --cohort: writing a synthetic phantom cohort of %d studies %s to %s", n, shape, cohort)
            write_phantom_cohort(cohort, n=n, shape=shape, seed=args.seed)
        refs = resolve_cohort(cohort, seed=args.seed)
        write_manifest(refs, run_folder.cohort)
        run_folder.publish(run_folder.cohort)
        print(format_cohort_summary(cohort_summary(refs)), flush=True)

    with clock.stage("ray_start_s"):
        init_ray(args.address)

    # The split (above) follows --seed; the networks' training draws follow --train-seed.
    train = labelled(refs, "train")
    val = labelled(refs, "val")
    tune_refs = val  # the flag threshold, the classifier gate and BoxFCN's early stopping
    if not val:
        # Tiny cohorts can leave a split empty (splits are by patient hash, stable under growth).
        # Früh et al. chose their thresholds on training and validation data, so fall back to training.
        LOG.warning("no labeled validation study: validation AUC is undefined and thresholds are "
                    "tuned on the training studies")
        tune_refs = train
    # The (t, q) search: --tune-on train+val (default, the paper's) or val.
    search_refs = tune_thresholds.tuning_refs(train, val, args.tune_on)
    tumour_weight = args.tumour_weight
    if args.tune_loss_weight:
        from jobs.tune_loss_weight import search

        with clock.stage("loss_weight_search_s"):
            searched = search(train, val, out, storage_path=args.storage_path,
                              cam_batch_size=preset["cam_batch_size"],
                              model_preset=preset["model_preset"], epochs=args.epochs or preset["epochs"],
                              lr=preset["lr"],
                              batch_size=preset["batch_size"], negative_keep=preset["negative_keep"],
                              weights=weights_arg(args.weights),
                              num_workers=args.num_workers, use_gpu=args.use_gpu, seed=args.train_seed,
                              **train_classifier.classifier_recipe(preset, optimizer=args.optimizer, head=args.head,
                                                                map_stride=args.map_stride, atrous=args.atrous),
                              **({"pixel_mm": args.pixel_mm} if args.pixel_mm is not None else {}))
            tumour_weight = searched["tumour_weight"]

    with clock.stage("train_s"):
        fit = train_classifier.fit(
            train, val, out, model_preset=preset["model_preset"], epochs=args.epochs or preset["epochs"],
            batch_size=preset["batch_size"], lr=preset["lr"] if args.lr is None else args.lr,
            negative_keep=preset["negative_keep"], tumour_weight=tumour_weight,
            weights=weights_arg(args.weights), num_workers=args.num_workers,
            use_gpu=args.use_gpu, storage_path=args.storage_path, seed=args.train_seed,
            **{**train_classifier.classifier_recipe(preset, optimizer=args.optimizer, head=args.head,
                                                                map_stride=args.map_stride, atrous=args.atrous),
               **({"input_size": args.input_size} if args.input_size else {}),
               **({"pixel_mm": args.pixel_mm} if args.pixel_mm is not None else {})})

    # Quality gate (wsseg_core.gate) on the slices of the tuning studies: choose the flag
    # threshold, then stop here, before tuning and scoring, if the classifier did not learn.
    with clock.stage("classifier_check_s"):
        gate = tune_thresholds.check_classifier(tune_refs, out, cam_batch_size=preset["cam_batch_size"],
                                                flag_threshold=args.flag_threshold)
    gate_record = {**gate.to_dict(), "allowed_weak": bool(args.allow_weak_classifier and not gate.passed),
                   "on": "validation" if val else "training (no validation study)"}
    run_folder.update_thresholds({}, classifier_gate=gate_record)
    if not gate.passed:
        if not args.allow_weak_classifier:
            run_folder.write_json(run_folder.run_json, {
                "argv": sys.argv if argv is None else ["python", "-m", "jobs.pipeline", *argv],
                "status": "stopped: classifier failed the quality gate", "classifier_gate": gate_record,
                "classifier": {"best_epoch_metrics": fit["best"]}, "training_history": fit["history"],
                "timings": timings, "versions": versions()})
            bar = "=" * 78
            print(f"\n{bar}\n{gate.message()}\n{bar}", file=sys.stderr, flush=True)
            raise SystemExit(gate.message())
        LOG.warning("--allow-weak-classifier: going on with a classifier that failed the gate: %s",
                    "; ".join(gate.failures))

    unet_fit, unet_record = None, None
    if "UNet" in args.methods:
        from jobs.train_unet import fit_unet, preset_kwargs

        with clock.stage("train_unet_s"):
            unet_fit = fit_unet(train, val, out, **preset_kwargs(args.preset), num_workers=args.num_workers,
                                use_gpu=args.use_gpu, storage_path=args.storage_path, seed=args.train_seed,
                                members=args.unet_members)
            from jobs.train_unet import tune_threshold as unet_threshold

            unet_record = {**unet_fit["record"], "threshold": unet_threshold(tune_refs, out, train)}

    with clock.stage("tune_s"):
        from wsseg_core.segment import Q_GRID, T_GRID

        # The search is rerun only when what it computes from changed (a retrained classifier, other
        # studies or settings): a rerun after an interruption in scoring keeps the thresholds it had.
        tune_stage = stage_fingerprint(args, search_refs, run_folder.classifier)
        stage_file = run_folder.out / "tune" / "stage.json"
        try:
            import json as _json

            previous = _json.loads(stage_file.read_text())
        except (OSError, ValueError):
            previous = None
        change = stage_change(previous, tune_stage, run_folder.thresholds.exists())
        if change is None:
            LOG.info("tune: classifier, validation studies and settings unchanged: reusing %s",
                     run_folder.thresholds)
        else:
            if previous:
                LOG.info("tune: rerunning the threshold search (%s)", change)
            stage_file.unlink(missing_ok=True)  # until the new search has finished
            tune_thresholds.tune(search_refs, out, cam_batch_size=preset["cam_batch_size"],
                                 tune_on=args.tune_on, grow=args.grow, q_rule=args.q_rule,
                                 flag_rule=args.flag_rule, flag_lo=args.flag_lo,
                                 storage_path=args.storage_path, flag_threshold=gate.flag_threshold,
                                 t_grid=tune_thresholds.grid_from_args(args.t_grid, T_GRID),
                                 q_grid=tune_thresholds.grid_from_args(
                                     args.q_grid, tune_thresholds.grid_from_args(preset.get("q_grid"), Q_GRID)))
            run_folder.write_json(stage_file, tune_stage)

    mipcam_fit = None
    if "MIP-CAM" in args.methods:
        # After the slice-CAM search: both merge their own entries into thresholds.json.
        from jobs.train_mipcam import search as mipcam_search

        with clock.stage("train_mipcam_s"):
            # Ray storage stays in the staging folder for a URI run (unless --storage-path).
            mipcam_fit = mipcam_search(train, val, out, preset=args.preset,
                                       num_workers=args.num_workers, use_gpu=args.use_gpu,
                                       storage_path=args.storage_path, seed=args.train_seed)

    boxfcn_fit = None
    if "BoxFCN" in args.methods:
        with clock.stage("train_boxfcn_s"):
            # Validation boxes drive early stopping and the post-processing choice; tiny cohorts
            # without validation patients fall back to the training studies, as the thresholds do.
            boxfcn_fit = train_boxfcn.train_boxfcn(
                train, tune_refs, out, preset=args.preset, tune_samples=args.boxfcn_tune_samples,
                storage_path=args.storage_path, num_workers=args.num_workers, use_gpu=args.use_gpu,
                seed=args.train_seed, ms_forms=train_boxfcn.ms_forms_arg(args.boxfcn_ms_form),
                warm_epochs=args.boxfcn_warm_epochs, patience=args.boxfcn_patience)

    with clock.stage("score_s"):
        pause = float(os.environ.get("WSSEG_TEST_PAUSE_BEFORE_SCORING_S") or 0)
        if pause > 0:  # test hook only (tests/test_rerun.py): a fixed moment to send Ctrl-C at
            LOG.info("test hook: pausing %.0f s before scoring", pause)
            time.sleep(pause)
        thresholds = load_thresholds(run_folder.thresholds)
        score_kw = dict(methods=args.methods, concurrency=args.concurrency,
                        num_gpus_per_actor=args.num_gpus_per_actor, cam_batch_size=preset["cam_batch_size"],
                        # the search's rule (p >= gate.flag_threshold unless it chose hysteresis)
                        flag_threshold=load_flag_rule(run_folder.thresholds))
        try:  # resumes an interrupted scoring of this same classifier and thresholds
            scored = score_cohort.score(refs, out, thresholds, **score_kw)
        except score_cohort.StaleResultsError as e:
            # The pipeline has just (re)trained and (re)tuned: results of an older classifier or
            # other thresholds cannot be reused, and this run's own results replace them.
            LOG.warning("%s: replacing them with this run's results", e)
            scored = score_cohort.score(refs, out, thresholds, overwrite=True, **score_kw)

    with clock.stage("analyze_s"):
        analysis_split = "test" if any(r.split == "test" for r in refs) else "all"
        if analysis_split == "all":
            LOG.warning("no test patients: the analysis covers every study")
        analysis = analyze_job.analyze(out, split=analysis_split)
    timings["total_s"] = time.perf_counter() - t_all

    run = {
        "argv": sys.argv if argv is None else ["python", "-m", "jobs.pipeline", *argv],
        "config": {**vars(args), "preset_values": preset, "cohort_resolved": str(cohort)},
        "seed": args.seed,
        "train_seed": args.train_seed,
        "status": "ok" if gate.passed else "ok, classifier failed the gate (--allow-weak-classifier)",
        "classifier_gate": gate_record,
        "tumour_weight": tumour_weight,
        "flag_threshold": {"value": gate.flag_threshold,
                           "source": "fixed (--flag-threshold)" if args.flag_threshold is not None
                           else "validation slice F1"},
        "flag_rule": load_flag_rule(run_folder.thresholds).to_dict(),
        "thresholds": thresholds,
        # Each job's own entry (jobs.ray_train.training_record for the Ray Train networks).
        "classifier": fit["record"],
        "unet": unet_record,
        "mipcam": None if mipcam_fit is None else mipcam_fit["record"],
        "boxfcn": None if boxfcn_fit is None else boxfcn_fit["record"],
        # Every epoch of the classifier's run (the kept one marked), as in run.json["classifier"].
        "training_history": fit["record"]["history"],
        "training_runs": {"classifier": training_run(fit),
                          **(unet_fit["training_runs"] if unet_fit else {"unet": None}),
                          **(boxfcn_fit["training_runs"] if boxfcn_fit
                             else train_boxfcn.training_runs(None))},
        "tune_stage": tune_stage["digest"],
        "outputs": {"metrics": join(out, "metrics"), "icc": join(out, "icc.parquet"),
                    "summary": join(out, "summary.parquet"),
                    "comparisons": join(out, "comparisons.parquet"), "tune_grid": join(out, "tune/grid.parquet"),
                    "cohort": join(out, "cohort.parquet"),
                    "staging": None if run_folder.staging is None else str(run_folder.staging)},
        "studies": scored["record"],
        # Exact inputs: every study's file paths and byte sizes (volumes are not hashed: that would
        # cost as much I/O as scoring; the classifier, small and decisive, is hashed above).
        "inputs": {"cohort": str(cohort), "studies": input_record(refs)},
        "timings": timings,
        "versions": versions(),
    }
    run_folder.write_json(run_folder.run_json, run)
    print()
    print(analyze_job.format_gate(gate_record))
    if warn := analyze_job.format_not_learned(analysis["not_learned"]):
        print(warn)
    if notes := analyze_job.format_notes(analysis["notes"]):
        print(notes)
    print(analyze_job.format_report(analysis["icc"], analysis["summary"],
                                    comparisons=analysis["comparisons"]))
    print("\n" + analyze_job.format_papers(analysis["icc"], analysis["summary"], analysis_split))
    print(f"\nstudies scored: {scored['ok_studies']} ok, {scored['failed_studies']} failed; "
          f"total {timings['total_s']:.0f} s")
    print(f"metrics Parquet: {join(out, 'metrics')}\nICC: {join(out, 'icc.parquet')}\n"
          f"run record: {join(out, 'run.json')}")
    if run_folder.staging is not None:
        print(f"(a local copy of the tables is in {run_folder.staging})")
    print(f"read it:  python -c \"import pandas as pd; print(pd.read_parquet('{run_folder.metrics}').head())\"")
    return run


if __name__ == "__main__":
    main()
