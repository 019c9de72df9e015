"""Ray Train / Tune: Afshari et al.'s box-supervised 3-D FCN (BoxFCN), its loss-weight search and ablation.

    python -m jobs.train_boxfcn --cohort runs/demo/cohort.parquet --out runs/demo             # train
    python -m jobs.train_boxfcn --cohort ... --out ... --tune --samples 4                     # + Ray Tune
    python -m jobs.train_boxfcn --cohort ... --out ... --ablation                             # Fig. 1 ablation
    ray job submit --working-dir . -- python -m jobs.train_boxfcn --cohort ... --preset paper --use-gpu

Training (Sec. 4.3) is two Ray Train runs: the warm start, the network trained with the plain box
Dice (`<out>/models/boxfcn_boxdice.pt`), then the same network fine-tuned from those weights with
L = beta L_MDice + lambda L_MS (`<out>/models/boxfcn.pt`, the one `score_cohort` scores as "BoxFCN").
Each run keeps the best epoch by the preset's `keep_by` and stops early after `patience` epochs
without a better one: "paper" the lowest validation loss (the weak loss against the validation
boxes: it needs no delineation), "small" the highest median validation Dice against SEG, the
measure the variant is then chosen by (issue 23: the loss did not track it; `keep_score`). Resume
after a failure: run the same command again (same --out / --storage-path); each Train run picks up
its latest checkpoint (Ray Train V2), early-stopping state included.

`--tune` searches beta, lambda, omega1, omega2 and alpha with Ray Tune (random search over a small
grid, the paper's values as the first trial), each trial one Ray Train fine-tuning from the same
warm start, ranked by the validation Dice (against SEG) of its kept checkpoint; the
best trial's weights become `boxfcn.pt`.

`--ablation` trains the paper's comparison on one cohort - box Dice only (L_Dice), L_MDice,
L_MDice + L_MS, and L_MDice + L_MS + morphological post-processing (M) - and writes per-study
Dice/UDE (`<out>/boxfcn/ablation_studies.parquet`) and the table of medians per variant and split
(`<out>/boxfcn/ablation.{parquet,md,png}`), printed at the end.

`--ms-form chan-vese` fine-tunes L_MDice + L_MS with the Chan-Vese form of L_MS
(`losses.mumford_shah_loss`, issue 18 item 9) instead of the paper's Eq. 5 as printed (`eq5`, the
default); `--ms-form both` trains both networks (`boxfcn_mdice_ms.pt`, `boxfcn_mdice_ms_cv.pt`), so
`--ablation --ms-form both` tables them side by side ("L_MDice+L_MS" and "L_MDice+L_MS(CV)"). The
form is in the run's config (its fingerprint: a changed form trains a new run, the warm start is
reused), in the checkpoint's `meta["loss"]["ms_form"]` and in thresholds.json's "BoxFCN" entry.

Either way `<out>/thresholds.json` gets a "BoxFCN" entry: the network, whether to post-process and
the probability threshold (the preset's `thresholds`: small 0.3/0.5/0.7/0.9, paper 0.5), chosen
together on the median validation Dice (`select_variant`: cells within 0.05 of the best are ties,
which go to the paper's full method and the threshold nearest 0.5); the loss weights used, the
validation Dice.

Presets (`BOXFCN_JOB_PRESETS`): "paper" is the paper's setting (base 16, 4 levels, 160x160x128
training crops - body-centred, holding the lesion boxes, `wsseg_core.boxfcn.body_crop` - and
whole-volume inference, batch 1, SGD lr 1e-5 momentum 0.9 wd 1e-6, <= 100 epochs, patience 20).
"small" (CPU, minutes; see `wsseg_core.boxfcn`): base 4, 3 levels, whole volumes, batch 1, one pass
over the training volumes per epoch; warm start with Adam lr 1e-3 (10 epochs, the output bias starting at the
boxes' voxel fraction), fine-tuning with SGD lr 1e-4 (4 epochs),
patience 3 (for the warm start counted only once its best median validation Dice reaches the
"did not learn" bar, 0.10), epochs kept by median validation Dice, the threshold chosen on validation, L_MDice's
Heaviside per box region (`losses.modified_dice_loss` per_box), L_MS on the box-scaled image
(`losses.mumford_shah_loss` image_scale "box"; docs/EXPERIMENTS.md, "BoxFCN as the pipeline
scores it"). Measured on the 128x128x96 phantoms (12 lesion-bearing train / 3 val volumes) with
64x64x32 patches: SGD at 1e-3 made L_MDice fine-tuning diverge (val Dice 0.11 -> 0.02 in 2 epochs,
train loss 8.6 -> 9.6 with beta 10), and at 3e-4 it collapsed to all background by epoch 3.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jobs.common import (RunFolder, RunLayout, add_common_args, fit_keeping_ctrl_c, init_ray, labelled,
                         mark_learned, ray_storage_path, resolve_cohort, safe_name, setup_logging)
from jobs.ray_train import (fit_and_keep_best, mean_over_ranks, on_rank0, prepare_ddp_model,
                            report_epoch, resume_from_checkpoint, resumed_extra_state,
                            start_watchdog, training_record, training_run, world_info)
from jobs.telemetry import tune_callback
from wsseg_core.selection import MIN_LEARNED_VAL_DICE  # re-exported: the bar every network's check uses
from jobs.ray_train import load_readable, maybe_die  # shared with the other train loops

LOG = logging.getLogger("wsseg.train_boxfcn")
CKPT_FILE = "boxfcn.pt"  # the scored model: a copy of the variant chosen on validation
WARM_FILE = "boxfcn_boxdice.pt"  # the box-Dice warm start
MDICE_FILE = "boxfcn_mdice.pt"  # L_MDice only, from the warm start
MDICE_MS_FILE = "boxfcn_mdice_ms.pt"  # L_MDice + L_MS, from the warm start (the paper's network)
MDICE_MS_CV_FILE = "boxfcn_mdice_ms_cv.pt"  # the same with L_MS in Chan-Vese form (issue 18 item 9)

#: L_MS's image scale on the small preset (losses.mumford_shah_loss image_scale): "box" bounds
#: |L_MS| by omega1 + omega2, so beta L_MDice (<= 10) is not outweighed by a term in z-score units.
MS_SCALE_SMALL = "box"

BOXFCN_JOB_PRESETS: dict[str, dict[str, Any]] = {
    # keep_by "val_dice" (issue 23): keep (and stop early on) the epoch with the best median
    # validation Dice against SEG, the measure select_variant chooses the variant by. Kept by the
    # validation loss, the demo's L_MDice + L_MS kept an epoch of validation Dice 0.02 (its best
    # was 0.05): with Eq. 5 the loss falls as the prediction grows (docs/EXPERIMENTS.md, "BoxFCN as the
    # pipeline scores it").
    # warm_epochs 10 (was 6, issue 23): on the demo the box-Dice warm start was still learning at
    # its 6th epoch (validation Dice 0.01 -> 0.08, predicted MTV ~350 ml against 12 ml), and on the
    # 64x64x48 seed-3 phantoms its best validation epoch was the 7th of 12.
    # warm_head_prior, warm_collapse_retries (issue 23): the warm start's output bias starts at the
    # training boxes' voxel fraction (p = prior, not 0.5, everywhere), and after an epoch that ends
    # all background (wsseg_core.boxfcn.box_dice_collapsed) it restarts from its first weights at
    # COLLAPSE_LR_FACTOR x the lr with its epoch budget again, at most 3 times. From a zero bias
    # the coarse30 variant's warm start went to all background by epoch 2 on two training seeds
    # (loss 1.0 for good). The prior alone gave best validation epochs of 0.11 and 0.60 there and
    # 0.26 on the demo (was 0.12), but one coarse30 seed still sat at loss 1.0 for five epochs
    # (docs/EXPERIMENTS.md, "The warm-start collapse").
    # warm_patience_from_dice (issue 23, hot30): the warm start's early stopping waits until its best
    # median validation Dice reaches the "did not learn" bar. Early stopping is there to stop
    # overfitting, not to end a network that has not started to learn: on hot30 patience 3 stopped
    # the warm start at its 5th epoch (best 0.073, training loss still falling) and BoxFCN did not
    # learn (test 0.05); run on, it reached 0.26 by its 10th epoch. The demo's, coarse30's and
    # torso30's warm starts never stopped below the bar, so their runs are as before
    # (docs/EXPERIMENTS.md, "BoxFCN on hot30").
    # mdice_per_box (issue 23): L_MDice's Heaviside per connected box region rather than over all
    # boxes of the volume (losses.modified_dice_loss per_box). Over the volume, one large lesion
    # more than alpha foreground released every box, so the small lesions' boxes could stay empty
    # at no cost: on torso30 (lesions 5-30 mm) the fine-tuned networks shrank to 0-4 ml against
    # 2-11 ml and scored test Dice 0.00-0.05; per box, validation 0.23 -> 0.42 (best cell) and
    # test 0.29 (docs/EXPERIMENTS.md, "L_MDice per box").
    "small": dict(model_preset="small", warm_epochs=10, epochs=4, patience=3, steps_per_epoch=None,
                  warm_optimizer="adam", warm_lr=1e-3, warm_head_prior=True,
                  warm_collapse_retries=3, mdice_per_box=True,
                  warm_patience_from_dice=MIN_LEARNED_VAL_DICE,
                  optimizer="sgd", lr=1e-4, keep_by="val_dice",
                  # The probability thresholds tried on validation (issue 23): a few epochs leave p
                  # unsaturated, and 0.5 is then an arbitrary cut; 0.5 wins ties.
                  thresholds=(0.5, 0.3, 0.7, 0.9), ms_scale=MS_SCALE_SMALL),
    # steps_per_epoch None: one pass over the (worker's) training volumes, batch 1.
    # The paper: early stopping on the validation loss (Sec. 4.3).
    "paper": dict(model_preset="paper", warm_epochs=100, epochs=100, patience=20, steps_per_epoch=None,
                  warm_optimizer="sgd", warm_lr=1e-5, optimizer="sgd", lr=1e-5, keep_by="val_loss",
                  thresholds=(0.5,), ms_scale="none"),
}
#: The warm start's lr is multiplied by this each time it restarts after a collapsed epoch
#: (`warm_collapse_retries`; wsseg_core.boxfcn.box_dice_collapsed).
COLLAPSE_LR_FACTOR = 0.3
#: keep_by -> the Ray Train keeper's mode: which epoch is kept and resets the early-stopping count.
KEEP_MODES: dict[str, str] = {"val_loss": "min", "val_dice": "max"}
#: Ray Tune space on the CPU preset: a small grid around the paper's values, sampled at random.
TUNE_SPACE: dict[str, list[float]] = {"beta": [1.0, 10.0, 30.0], "lam": [0.1, 1.0, 3.0],
                                      "omega1": [1.0, 3.0], "omega2": [1.0, 3.0],
                                      "alpha": [0.05, 0.1, 0.2]}
#: Trained networks (checkpoint roles) and their names in the paper's ablation (Fig. 1).
ROLE_NAMES: dict[str, str] = {"box_dice": "L_Dice (box)", "mdice": "L_MDice", "mdice_ms": "L_MDice+L_MS",
                              "mdice_ms_cv": "L_MDice+L_MS(CV)"}
#: L_MS form (``losses.MS_FORMS``) -> (checkpoint role, file) of its L_MDice + L_MS network:
#: "eq5" the paper's Eq. 5 as printed (the default), "chan-vese" the Chan-Vese fitting term.
MS_FORM_ROLES: dict[str, tuple[str, str]] = {"eq5": ("mdice_ms", MDICE_MS_FILE),
                                             "chan-vese": ("mdice_ms_cv", MDICE_MS_CV_FILE)}
#: Every scored variant: each network with and without the morphological post-processing M.
VARIANTS = tuple(v for name in ROLE_NAMES.values() for v in (name, name + "+M"))
#: Tie-break among validation medians within SELECTION_MARGIN of the best: the paper's full method first.
PREFERENCE = ("L_MDice+L_MS+M", "L_MDice+L_MS", "L_MDice+L_MS(CV)+M", "L_MDice+L_MS(CV)", "L_MDice+M",
              "L_MDice", "L_Dice (box)+M", "L_Dice (box)")


#: Validation medians within this Dice of the best are ties (`select_variant`). With 3-4
#: validation studies with tumour, one training draw and 24 (variant, threshold) cells, differences
#: under ~0.05 are noise (docs/EXPERIMENTS.md, BoxFCN): on coarse30 the highest cell (L_MDice+L_MS+M
#: at p >= 0.9, 0.396 against 0.375 at 0.5) was the one that carried least to the test studies.
SELECTION_MARGIN = 0.05


def select_variant(val_rows: "pd.DataFrame", margin: float = SELECTION_MARGIN) -> dict[str, Any]:  # noqa: F821
    """The variant (network and post-processing) and probability threshold chosen on validation:
    among the cells whose median validation Dice is within `margin` of the highest, the earliest
    variant of ``PREFERENCE`` (the paper's full method first) at the threshold nearest 0.5.

    Why not simply the highest: with a handful of validation studies the maximum over 24 cells
    picks noise, and the further a cell is from the paper's method at p = 0.5 the more it was
    chosen for the validation studies' own lesions. A variant that failed (the demo's L_MDice + L_MS
    at 0.017 against L_MDice's 0.255, 2026-12-01) is still left behind: it is not within `margin`.

    Args:
        val_rows: per-study rows with ``variant`` (a ``VARIANTS`` name), ``dice`` (NaN for a
            negative study, left out of the median) and optionally ``threshold`` (the probability
            cut of the mask; rows without it are at 0.5).
    Returns:
        dict(variant, role (a ``ROLE_NAMES`` key), postprocess (bool), threshold, val_dice (its
        median), best_val_dice (the highest cell's median), margin, medians (variant -> median
        validation Dice at threshold 0.5, NaN where no study had a finite Dice),
        medians_by_threshold (variant -> {threshold: median})).
        Equal distances from 0.5 go to the lower threshold.
    Raises:
        ValueError when no variant has a finite median (no tumour in the validation studies).
    """
    thr = (val_rows["threshold"].astype(float) if "threshold" in val_rows
           else np.full(len(val_rows), 0.5))
    by_t: dict[str, dict[float, float]] = {}
    for v in VARIANTS:
        sel = np.asarray(val_rows["variant"] == v)
        for t in sorted(set(np.asarray(thr)[sel].tolist())):
            d = np.asarray(val_rows.loc[sel & np.asarray(thr == t), "dice"], dtype=float)
            d = d[np.isfinite(d)]
            by_t.setdefault(v, {})[float(t)] = float(np.median(d)) if d.size else float("nan")
    medians = {v: ts.get(0.5, float("nan")) for v, ts in by_t.items()}
    ranked = [(v, t) for v in PREFERENCE if v in by_t for t, m in by_t[v].items() if math.isfinite(m)]
    if not ranked:
        raise ValueError(f"no BoxFCN variant has a finite validation Dice (medians {by_t})")
    top = max(by_t[v][t] for v, t in ranked)
    tied = [(v, t) for v, t in ranked if by_t[v][t] >= top - margin - 1e-12]
    best, t_best = min(tied, key=lambda vt: (PREFERENCE.index(vt[0]), round(abs(vt[1] - 0.5), 9), vt[1]))
    role = next(r for r, name in ROLE_NAMES.items() if best in (name, name + "+M"))
    return {"variant": best, "role": role, "postprocess": best.endswith("+M"), "threshold": t_best,
            "val_dice": by_t[best][t_best], "best_val_dice": top, "margin": float(margin),
            "medians": medians, "medians_by_threshold": by_t}




def not_learned_reason(choice: dict[str, Any], bar: float = MIN_LEARNED_VAL_DICE) -> str | None:
    """Why the variant `select_variant` chose has not learned (its median validation Dice is under
    `bar`), naming every variant's median; None when it has."""
    if choice["val_dice"] >= bar:
        return None
    medians = ", ".join(f"{k} {v:.3f}" for k, v in choice["medians"].items() if v == v)
    return (f"BoxFCN did not learn: the variant chosen on validation, {choice['variant']} at threshold "
            f"{choice['threshold']:g}, has median validation Dice {choice['val_dice']:.3f} < {bar:g} "
            f"(at 0.5: {medians}); its masks are scored but are not a segmentation. Check the validation "
            f"boxes, then run.json's boxfcn history of the box-Dice warm start. Where it stopped early "
            f"while still learning (few epochs, training loss still falling), give it more epochs and the "
            f"patience to use them: jobs.pipeline --boxfcn-warm-epochs 20 --boxfcn-patience 20 (the "
            f"small preset's warm start runs its whole budget while under {bar:g}; on the hot30 variant "
            f"20 epochs without early stop reached validation 0.38). Where it collapsed to all background (`restarts`), another training "
            f"draw: jobs.pipeline --train-seed N (the split stays with --seed). docs/EXPERIMENTS.md, "
            f"\"The warm-start collapse\" and \"BoxFCN on hot30\".")


def boxfcn_path(out: str | Path, filename: str = CKPT_FILE) -> Path:
    """Where a trained BoxFCN of a run lives: `<out>/models/<filename>`."""
    return RunLayout(Path(out)).model(filename)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: box labels of all training patients; each step it trains on its share of one
    global batch (patches: `batch_size` split across the workers; whole volumes: one per worker),
    reports and checkpoints every epoch, stops early when the validation loss has not improved for
    `patience` epochs (decided on rank 0's validation, so every rank stops at the same epoch)."""
    import ray.train
    import ray.train.torch
    import torch

    from wsseg_core.boxfcn import (BOXFCN_PRESETS, box_dice_collapsed, box_volumes, build_boxfcn,
                                   evaluate, init_head_to_prior, load_boxfcn, make_optimizer,
                                   save_boxfcn, train_epoch)
    from wsseg_core.data import StudyRef

    rank, world = world_info()
    start_watchdog(config)
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)  # augmentation, per rank
    rng = np.random.default_rng(config["seed"] * 1000 + rank)  # patch positions, per rank
    preset = BOXFCN_PRESETS[config["model_preset"]]

    train_refs = [StudyRef(**r) for r in config["train_refs"]]
    val_refs = [StudyRef(**r) for r in config["val_refs"]]
    margin = dict(margin_mm=config["margin_mm"], margin_vox=config["margin_vox"])
    # Only volumes with a lesion: against an empty box the Dice loss is constant (no gradient).
    # Every rank holds all of them: each step draws one global batch from a shared seeded stream and
    # every rank trains on its share, so all ranks run the same steps (issue 17).
    train = [v for v in box_volumes(load_readable(train_refs), **margin) if v.box.any()]
    val = box_volumes(load_readable(val_refs), **margin) if rank == 0 else []
    if rank == 0:
        LOG.info("BoxFCN %s: %d training volumes, %d validation volumes, %d worker(s)", config["kind"],
                 len(train), len(val), world)

    model = build_boxfcn(config["model_preset"], base=config.get("base"), levels=config.get("levels"))
    if config.get("init_from"):  # warm start (paper: the network trained on the box masks)
        warm, _ = load_boxfcn(config["init_from"])
        model.load_state_dict(warm.state_dict())
    elif config.get("head_prior"):
        frac = float(np.mean([v.box.mean() for v in train])) if train else 0.0
        if 0.0 < frac < 1.0:
            bias = init_head_to_prior(model, frac)
            if rank == 0:
                LOG.info("BoxFCN %s: output bias %.2f (box prior %.4f of the voxels)", config["kind"],
                         bias, frac)
    # What a collapsed warm-start epoch restarts from: these first weights (a function of the seed
    # and the training boxes, so the same after a resume).
    init_state = copy.deepcopy(model.state_dict())
    keep_by = config.get("keep_by", "val_loss")
    # best: the lowest validation loss, or (keep_by "val_dice") the highest keep_score.
    start_epoch, best, bad, optimizer_state = 0, (math.inf if keep_by == "val_loss" else -math.inf), 0, None
    restarts, extra_epochs = 0, 0  # restarts after a collapse (config "collapse_retries"), epochs they added
    resumed = resume_from_checkpoint(CKPT_FILE, load_boxfcn)
    if resumed is not None:
        (model, _), start_epoch, optimizer_state = resumed
        extra = resumed_extra_state()
        best, bad = float(extra.get("best", extra.get("best_val_loss"))), int(extra["bad_epochs"])
        restarts, extra_epochs = int(extra.get("restarts", 0)), int(extra.get("extra_epochs", 0))
    model.train()
    model = prepare_ddp_model(model)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(model, config["optimizer"], config["lr"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    patch = config.get("patch", preset["patch"])
    crop = config.get("crop")  # the paper preset's 160x160x128 body crop (fit_config), else None
    batch_size = int(config.get("batch_size") or preset["batch_size"])
    steps = int(config.get("steps_per_epoch") or max(1, len(train)))
    if not patch and world > 1:
        # Whole volumes: one per worker per step, so N workers see N volumes a step; the epoch keeps
        # (about) the volumes of one worker's epoch in 1/N of the steps.
        steps = max(1, math.ceil(steps / world))
    loss_kw = {"kind": config["kind"], **config["loss"]}
    bare = model.module if hasattr(model, "module") else model

    epoch = start_epoch - 1
    while (epoch := epoch + 1) < config["epochs"] + extra_epochs:
        if bad >= config["patience"]:  # a resumed run that had already stopped early
            break
        # The global picks of an epoch come from (seed, epoch) alone: the same on every rank and
        # after a resume.
        pick_rng = np.random.default_rng([config["seed"], epoch])
        train_loss = mean_over_ranks(train_epoch(
            model, train, optimizer, loss_kw, patch=patch, batch_size=batch_size, steps=steps,
            rng=rng, generator=gen, device=device, pick_rng=pick_rng, rank=rank, world=world,
            crop=crop))
        if (config["kind"] == "box_dice" and restarts < int(config.get("collapse_retries") or 0)
                and box_dice_collapsed(train_loss)):
            # All background, sigmoid saturated: no gradient leads back. Restart from the first
            # weights at a lower lr with fresh Adam moments and the whole epoch budget again; the
            # best epoch so far stays kept. Not back to the best epoch: on coarse30 that was
            # itself on the way down (validation Dice 0.006), and from it 3e-4 reached 0.03 in
            # the 6 epochs left. train_loss is the mean over ranks: every rank decides alike.
            restarts, extra_epochs, bad = restarts + 1, epoch + 1, 0
            lr_now = optimizer.param_groups[0]["lr"] * COLLAPSE_LR_FACTOR
            bare.load_state_dict(init_state)
            optimizer = make_optimizer(model, config["optimizer"], lr_now)
            if rank == 0:
                LOG.warning("%s epoch %d collapsed to all background (train loss %.5f): restarting "
                            "from the first weights at lr %.2g for %d more epochs (restart %d of %d)",
                            config["kind"], epoch + 1, train_loss, lr_now, config["epochs"], restarts,
                            config["collapse_retries"])
        maybe_die(config, epoch, rank)
        ev = on_rank0(lambda: evaluate(bare, val, loss_kw))
        dice = float(ev["dice"])
        score = keep_score(keep_by, float(ev["loss"]), float(ev["dice_median"]))
        improved = score < best if keep_by == "val_loss" else score > best
        best, bad = (score, 0) if improved else (best, bad + 1)
        floor = config.get("patience_from_dice")
        if floor is not None and math.isfinite(dice) and best < float(floor):
            bad = 0  # not learned yet (best median Dice under the bar): early stopping waits
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "val_loss": float(ev["loss"]),
                   # NaN (no tumour in validation) would break ranking by Dice.
                   "val_dice": dice if math.isfinite(dice) else 0.0, "val_dice_defined": math.isfinite(dice),
                   "val_dice_median": float(ev["dice_median"]),
                   "keep_score": score, "best": float(best), "bad_epochs": bad, "start_epoch": start_epoch,
                   "workers": world, "steps": steps, "restarts": restarts,
                   "epochs_planned": config["epochs"] + extra_epochs,
                   "lr": float(optimizer.param_groups[0]["lr"])}
        if keep_by == "val_loss":
            metrics["best_val_loss"] = float(best)
        if rank == 0:
            LOG.info("%s epoch %d/%d train_loss %.4f val_loss %.4f val_dice %.3f%s", config["kind"],
                     epoch + 1, config["epochs"] + extra_epochs, train_loss, ev["loss"], dice,
                     "" if bad < config["patience"] else "  (early stop)")
        report_epoch(metrics, epoch, optimizer, CKPT_FILE,
                     lambda path: save_boxfcn(path, bare, meta={**metrics, "kind": config["kind"],
                                                                "loss": config["loss"], **margin,
                                                                "crop": crop}),
                     extra_state={"best": best, "bad_epochs": bad, "restarts": restarts,
                                  "extra_epochs": extra_epochs})
        if bad >= config["patience"]:
            break


def keep_score(keep_by: str, val_loss: float, val_dice: float) -> float:
    """The number an epoch is kept by (and early stopping watches), per `keep_by`:

    * "val_loss": the validation loss against the boxes (lower is better; the paper's rule).
    * "val_dice": the median validation Dice against SEG (higher is better; `val_dice` is the
      median over the validation studies with tumour, as `select_variant` ranks the variants); when
      it is not defined (no validation study with tumour) -val_loss, so the
      rule falls back to the loss instead of keeping an arbitrary epoch. Every epoch of one run has
      the same validation studies, so a run never mixes the two.
    """
    if keep_by not in KEEP_MODES:
        raise ValueError(f"keep_by must be one of {tuple(KEEP_MODES)}, got {keep_by!r}")
    if keep_by == "val_loss":
        return float(val_loss)
    return float(val_dice) if math.isfinite(val_dice) else -float(val_loss)


def fit_config(train_refs: list, val_refs: list, *, kind: str = "mdice_ms",
               loss: dict[str, float] | None = None, init_from: str | Path | None = None,
               preset: str = "small", epochs: int | None = None, patience: int | None = None,
               optimizer: str | None = None, lr: float | None = None,
               steps_per_epoch: int | None = None, margin_mm: float = 0.0, margin_vox: int = 0,
               ms_form: str = "eq5", seed: int = 0, cpus_per_worker: float = 1.0,
               keep_by: str | None = None) -> dict[str, Any]:
    """The Ray Train config of one BoxFCN run (what its fingerprint covers); see :func:`fit_boxfcn`.

    `keep_by` ("val_loss" or "val_dice", default the job preset's; :func:`keep_score`) is the rule
    that keeps an epoch and stops early; it is in the config, so a changed rule trains a new run.

    `ms_form` ("eq5" or "chan-vese", `losses.MS_FORMS`) is L_MS's form for kind "mdice_ms"; it goes
    into the run's `loss` config only for that kind, so it enters that run's fingerprint (a changed
    form trains a new run) and the checkpoint's `meta["loss"]`, and leaves the warm start's alone.
    """
    from wsseg_core.losses import MS_FORMS, PAPER_LOSS

    if ms_form not in MS_FORMS:
        raise ValueError(f"ms_form must be one of {MS_FORMS}, got {ms_form!r}")
    from wsseg_core.boxfcn import BOXFCN_PRESETS

    jp = BOXFCN_JOB_PRESETS[preset]
    # per_box only where the preset sets it, so the paper preset's configs (fingerprints) stay as
    # they were; a `loss` that names it wins.
    per_box = {"per_box": True} if kind in ("mdice", "mdice_ms") and jp.get("mdice_per_box") else {}
    loss_cfg = {**PAPER_LOSS, **per_box, **(loss or {})}
    if kind == "mdice_ms":
        loss_cfg["ms_form"] = ms_form
        # L_MS's image scale (losses.mumford_shah_loss): only when not the paper's, so the paper
        # preset's configs (fingerprints) stay as they were.
        if jp.get("ms_scale", "none") != "none":
            loss_cfg.setdefault("ms_scale", jp["ms_scale"])
    warm = kind == "box_dice" and init_from is None
    keep_by_ = keep_by or jp.get("keep_by", "val_loss")
    if keep_by_ not in KEEP_MODES:
        raise ValueError(f"keep_by must be one of {tuple(KEEP_MODES)}, got {keep_by_!r}")
    # The training input crop (paper: 160x160x128, wsseg_core.boxfcn.body_crop); only when the
    # model preset has one, so the small preset's fingerprints (whole volumes) stay as they were.
    crop = BOXFCN_PRESETS[jp["model_preset"]].get("crop")
    extra = {"crop": [int(c) for c in crop]} if crop else {}
    # The warm start's output-bias prior (wsseg_core.boxfcn.init_head_to_prior): only where the
    # preset sets it, so the paper preset's configs (fingerprints) stay as they were.
    if warm and jp.get("warm_head_prior"):
        extra["head_prior"] = True
    if warm and jp.get("warm_collapse_retries"):
        extra["collapse_retries"] = int(jp["warm_collapse_retries"])
    if warm and jp.get("warm_patience_from_dice") is not None and keep_by_ == "val_dice":
        extra["patience_from_dice"] = float(jp["warm_patience_from_dice"])
    return dict(train_refs=[r.to_dict() for r in train_refs], val_refs=[r.to_dict() for r in val_refs],
                model_preset=jp["model_preset"], kind=kind, loss=loss_cfg,
                init_from=str(init_from) if init_from else None,
                epochs=int(epochs or (jp["warm_epochs"] if warm else jp["epochs"])),
                patience=int(patience or jp["patience"]),
                optimizer=optimizer or (jp["warm_optimizer"] if warm else jp["optimizer"]),
                lr=float(lr or (jp["warm_lr"] if warm else jp["lr"])),
                steps_per_epoch=steps_per_epoch or jp["steps_per_epoch"], margin_mm=float(margin_mm),
                margin_vox=int(margin_vox), seed=seed, cpus_per_worker=cpus_per_worker,
                keep_by=keep_by_, **extra)


def fit_boxfcn(train_refs: list, val_refs: list, out: str | Path, *, kind: str = "mdice_ms",
               loss: dict[str, float] | None = None, init_from: str | Path | None = None,
               filename: str = CKPT_FILE, preset: str = "small", epochs: int | None = None,
               patience: int | None = None, optimizer: str | None = None, lr: float | None = None,
               steps_per_epoch: int | None = None, margin_mm: float = 0.0, margin_vox: int = 0,
               ms_form: str = "eq5", num_workers: int = 1, use_gpu: bool = False,
               cpus_per_worker: float | None = None,
               storage_path: str | None = None, name: str | None = None, max_failures: int = 3,
               seed: int = 0, callbacks: list | None = None, keep_by: str | None = None,
               test_hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """One Ray Train run of one loss `kind` ("box_dice", "mdice", "mdice_ms"); the checkpoint of the
    best epoch by `keep_by` (default the preset's: "val_dice" for small, the paper's "val_loss";
    :func:`keep_score`) is copied to `<out>/models/<filename>`.

    `epochs`, `patience`, `optimizer`, `lr`, `steps_per_epoch` default to the job preset's values for
    the phase (warm start for "box_dice" without `init_from`, fine-tuning otherwise). `loss` holds the
    `losses.boxfcn_loss` weights (default the paper's); `ms_form` L_MS's form (:func:`fit_config`).
    Returns dict(checkpoint, ray_checkpoint, history, best (metrics of the kept epoch)).
    """
    from jobs.common import auto_parallelism

    from wsseg_core.boxfcn import BOXFCN_PRESETS
    from wsseg_core.train import check_global_batch

    jp = BOXFCN_JOB_PRESETS[preset]
    if BOXFCN_PRESETS[jp["model_preset"]]["patch"]:  # patches: the preset's batch is the global one
        check_global_batch(BOXFCN_PRESETS[jp["model_preset"]]["batch_size"], num_workers)
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if use_gpu else float(auto_parallelism() // num_workers or 1)
    config = fit_config(train_refs, val_refs, kind=kind, loss=loss, init_from=init_from, preset=preset,
                        epochs=epochs, patience=patience, optimizer=optimizer, lr=lr,
                        steps_per_epoch=steps_per_epoch, margin_mm=margin_mm, margin_vox=margin_vox,
                        ms_form=ms_form, seed=seed, cpus_per_worker=cpus_per_worker, keep_by=keep_by)
    config.update(test_hooks or {})
    metric = "val_loss" if config["keep_by"] == "val_loss" else "keep_score"
    res = fit_and_keep_best(train_loop_per_worker, config, out=out, ckpt_file=CKPT_FILE,
                            model_file=filename, metric=metric, mode=KEEP_MODES[config["keep_by"]],
                            name=name or f"boxfcn_{Path(filename).stem}", num_workers=num_workers,
                            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                            storage_path=storage_path, max_failures=max_failures, callbacks=callbacks)
    return res


# --------------------------------------------------------------------------------------------------
# Evaluation of trained variants (Ray tasks, one per study)
# --------------------------------------------------------------------------------------------------

def evaluate_study(ref: dict, models: dict[str, str], post: dict[str, float],
                   num_cpus: float = 1.0, thresholds: Sequence[float] = (0.5,)) -> list[dict[str, Any]]:
    """Dice and UDE of every variant on one study (a Ray task; returns rows).

    `models` maps checkpoint roles (keys of `ROLE_NAMES`) to paths; each role's probability map is
    cut at every one of `thresholds` and the mask scored as it is and post-processed with `post`
    ("+M"); rows carry their `threshold`. A study that cannot be read gives no rows.
    """
    from jobs.common import torch_threads_for
    from wsseg_core.boxfcn import load_boxfcn, postprocess, predict_volume
    from jobs.common import load_labelled_study
    from wsseg_core.metrics import dice, ude_mm

    torch_threads_for(num_cpus)
    got = load_labelled_study(ref, "ablation", LOG)
    if got is None:
        return []
    r, st = got
    masks = {}
    for role, path in models.items():
        model, _ = load_boxfcn(path)
        prob = predict_volume(model, st.suv)
        for t in thresholds:
            masks[ROLE_NAMES[role], float(t)] = m = (prob > t).astype(np.uint8)
            masks[ROLE_NAMES[role] + "+M", float(t)] = postprocess(m, st.spacing_mm, **post)
    return [{"patient_id": r.patient_id, "study_id": r.study_id, "split": r.split,
             "variant": name, "threshold": t, "dice": dice(m, st.seg),
             "ude_mm": ude_mm(m, st.seg, st.spacing_mm),
             "mtv_pred_ml": float(m.sum()) * st.voxel_volume_ml,
             "mtv_true_ml": float((st.seg > 0).sum()) * st.voxel_volume_ml}
            for t in map(float, thresholds) for (name, tt), m in masks.items() if tt == t]


def evaluate_variants(refs: Sequence, models: dict[str, str], post: dict[str, float],
                      cpus_per_task: float = 1.0,
                      thresholds: Sequence[float] = (0.5,)) -> "pd.DataFrame":  # noqa: F821
    """Per-study rows of every variant (at every threshold) over `refs` (labelled ones), one Ray
    task per study."""
    import pandas as pd
    import ray

    task = ray.remote(num_cpus=cpus_per_task)(evaluate_study)
    rows = ray.get([task.remote(r.to_dict(), models, post, cpus_per_task, tuple(thresholds))
                    for r in refs if r.seg_path])
    return pd.DataFrame([row for rs in rows for row in rs],
                        columns=["patient_id", "study_id", "split", "variant", "threshold", "dice",
                                 "ude_mm", "mtv_pred_ml", "mtv_true_ml"])


def ablation_table(per_study: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """Median Dice and UDE per variant and split (NaN Dice - negative studies - left out), at the
    paper's probability threshold 0.5 (rows at other thresholds are left out of this table).

    Columns: variant, then per split s in (val, test): `s_n` (studies with tumour), `s_dice_median`,
    `s_dice_iqr`, `s_ude_median_mm`, `s_mtv_median_ml` (predicted).
    """
    import pandas as pd

    from wsseg_core.stats import _median_iqr

    if "threshold" in per_study:
        per_study = per_study[per_study["threshold"].astype(float) == 0.5]
    rows = []
    for v in [v for v in VARIANTS if v in set(per_study["variant"])]:
        row: dict[str, Any] = {"variant": v}
        for split in ("val", "test"):
            g = per_study[(per_study["variant"] == v) & (per_study["split"] == split)]
            d = pd.to_numeric(g["dice"], errors="coerce").to_numpy(float)
            row[f"{split}_n"] = int(np.isfinite(d).sum())
            row[f"{split}_dice_median"], row[f"{split}_dice_iqr"] = _median_iqr(d)
            row[f"{split}_ude_median_mm"] = _median_iqr(pd.to_numeric(g["ude_mm"], errors="coerce"))[0]
            # over the studies with tumour, as the Dice
            row[f"{split}_mtv_median_ml"] = _median_iqr(
                pd.to_numeric(g["mtv_pred_ml"], errors="coerce").to_numpy(float)[np.isfinite(d)])[0]
        rows.append(row)
    return pd.DataFrame(rows)


def format_ablation(table: "pd.DataFrame") -> str:  # noqa: F821
    """The table as GitHub markdown (medians, IQR in brackets)."""
    def cell(m: float, iqr: float | None = None) -> str:
        if m != m:
            return "n/a"
        return f"{m:.3f}" + (f" ({iqr:.3f})" if iqr is not None and iqr == iqr else "")

    lines = ["| variant | val n | val Dice median (IQR) | val UDE mm | val MTV ml | test n | "
             "test Dice median (IQR) | test UDE mm | test MTV ml |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        mtv = {s: getattr(r, f"{s}_mtv_median_ml", float("nan")) for s in ("val", "test")}
        lines.append(f"| {r.variant} | {r.val_n} | {cell(r.val_dice_median, r.val_dice_iqr)} | "
                     f"{cell(r.val_ude_median_mm)} | {cell(mtv['val'])} | {r.test_n} | "
                     f"{cell(r.test_dice_median, r.test_dice_iqr)} | {cell(r.test_ude_median_mm)} | "
                     f"{cell(mtv['test'])} |")
    return "\n".join(lines)


def _write_ablation(out: Path, per_study, table) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsseg_core.storage import atomic_path, write_parquet, write_text

    d = out / "boxfcn"
    d.mkdir(parents=True, exist_ok=True)
    paths = {"per_study": d / "ablation_studies.parquet", "table": d / "ablation.parquet",
             "markdown": d / "ablation.md", "png": d / "ablation.png"}
    write_parquet(paths["per_study"], per_study)
    write_parquet(paths["table"], table)
    write_text(paths["markdown"], format_ablation(table) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(table))
    for k, split in enumerate(("val", "test")):
        ax.bar(x + (k - 0.5) * 0.38, table[f"{split}_dice_median"].fillna(0), 0.38, label=split)
    ax.set_xticks(x, table["variant"], fontsize=8)
    ax.set_ylabel("median Dice")
    ax.set_ylim(0, 1)
    ax.set_title("BoxFCN ablation (Afshari et al. Fig. 1)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(paths["png"], ".png") as tmp:  # the ending tells matplotlib the format
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------------------------------
# Ray Tune over the loss weights
# --------------------------------------------------------------------------------------------------

def tune_trial(config: dict[str, Any], train_refs: list, val_refs: list, out: str, warm: str,
               fit_kwargs: dict) -> dict[str, Any]:
    """One Tune trial: fine-tune the warm start with these loss weights (Ray Train), report the
    validation Dice of the kept (lowest validation loss) checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    loss = {k: float(config[k]) for k in ("beta", "lam", "omega1", "omega2", "alpha")}
    # The trial id keeps two draws of the same weights apart (same Train name = resume).
    tag = safe_name(f"{tune.get_context().get_trial_id()}_" + "_".join(f"{k}{v:g}" for k, v in loss.items()))
    res = fit_boxfcn(train_refs, val_refs, Path(out) / "boxfcn" / "tune" / tag, kind="mdice_ms",
                     loss=loss, init_from=warm, name=f"boxfcn_tune_{tag}",
                     callbacks=[TuneReportCallback()], **fit_kwargs)
    kept = float(res["best"].get("val_dice", float("nan")))
    # "val_dice" too: Tune checks its metric in every result, and Train's per-epoch reports carry
    # val_dice; this final result (the kept checkpoint's) is what Tune ranks the trial by.
    return {"val_dice": kept, "kept_val_dice": kept,
            "kept_val_loss": float(res["best"].get("val_loss", float("nan"))),
            "checkpoint": res["checkpoint"]}


def tune_loss(train_refs: list, val_refs: list, out: str | Path, warm: str | Path, *,
              samples: int = 4, space: dict[str, list[float]] | None = None,
              storage_path: str | None = None, seed: int = 0, **fit_kwargs) -> dict[str, Any]:
    """Random search over `space` (default `TUNE_SPACE`), the paper's values first; ranked by the
    kept checkpoint's validation Dice. Writes `<out>/boxfcn/tune.parquet`, returns the best weights
    and their checkpoint."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from wsseg_core.losses import PAPER_LOSS

    from jobs.common import auto_parallelism

    run = RunFolder(out)
    storage = ray_storage_path(storage_path, run.out)
    space = space or TUNE_SPACE
    # The trial only waits on its Train run, which holds the real CPUs. Ray 2.60 refuses an empty
    # resource request ({"cpu": 0}), so the trial takes a sliver, and the Train workers leave it room.
    trial_cpu = 0.01
    if not fit_kwargs.get("use_gpu") and fit_kwargs.get("cpus_per_worker") is None:
        workers = int(fit_kwargs.get("num_workers", 1))
        fit_kwargs["cpus_per_worker"] = float(max(1, (auto_parallelism() - 1) // workers))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, train_refs=train_refs, val_refs=val_refs,
                                                 out=str(run.out), warm=str(warm),
                                                 fit_kwargs={**fit_kwargs, "storage_path": storage,
                                                             "seed": seed}), {"cpu": trial_cpu}),
        param_space={k: tune.choice(v) for k, v in space.items()},
        tune_config=tune.TuneConfig(metric="val_dice", mode="max", num_samples=int(samples),
                                    max_concurrent_trials=1,
                                    search_alg=BasicVariantGenerator(
                                        points_to_evaluate=[{k: PAPER_LOSS[k] for k in space}],
                                        random_state=seed)),
        run_config=tune.RunConfig(name="boxfcn_loss", storage_path=storage, verbose=1,
                                  callbacks=[tune_callback("boxfcn_loss", "val_dice", "max")]),
    )
    results = fit_keeping_ctrl_c(tuner)
    errors = [str(r.error) for r in results if r.error]
    if errors:
        raise RuntimeError(f"BoxFCN tuning trials failed: {errors}")
    df = results.get_dataframe().rename(columns={f"config/{k}": k for k in space})
    table = df[list(space) + ["kept_val_dice", "kept_val_loss", "checkpoint"]].sort_values(
        "kept_val_dice", ascending=False).reset_index(drop=True)
    path = run.write_parquet("boxfcn/tune.parquet", table)
    LOG.info("BoxFCN loss search:\n%s", table.drop(columns=["checkpoint"]).to_string(index=False))
    best = table.iloc[0]
    return {"loss": {k: float(best[k]) for k in space}, "val_dice": float(best["kept_val_dice"]),
            "checkpoint": str(best["checkpoint"]), "results": str(path), "table": table}


# --------------------------------------------------------------------------------------------------
# The whole method: warm start, fine-tune (or search), choose post-processing, record
# --------------------------------------------------------------------------------------------------

def train_boxfcn(train_refs: list, val_refs: list, out: str | Path, *, preset: str = "small",
                 tune_samples: int = 0, margin_mm: float = 0.0, storage_path: str | None = None,
                 num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float | None = None,
                 seed: int = 0, with_mdice: bool = True, warm_epochs: int | None = None,
                 epochs: int | None = None, ms_forms: Sequence[str] = ("eq5",),
                 patience: int | None = None) -> dict[str, Any]:
    """Warm start (box Dice) -> fine-tune with L_MDice (`with_mdice`) and with L_MDice + L_MS (paper
    weights, or the best of a Ray Tune search with `tune_samples` > 0) -> score every network with
    and without the post-processing M on the validation studies -> the best variant
    (`select_variant`) is copied to `<out>/models/boxfcn.pt`, the one the pipeline scores; the
    choice and every variant's validation median go to thresholds.json's "BoxFCN" entry.

    `ms_forms`: the L_MS forms to fine-tune, one L_MDice + L_MS network each (`MS_FORM_ROLES`:
    "eq5" -> role "mdice_ms", the default; "chan-vese" -> role "mdice_ms_cv"); all take part in the
    choice. The Tune search (`tune_samples` > 0) runs for one form only.

    Why choose instead of always scoring L_MDice + L_MS + M: on the CPU preset the fine-tuning can
    end worse than its own warm start (docs/EXPERIMENTS.md, BoxFCN ablation on the demo cohort: test median Dice
    0.23 box Dice, 0.34 L_MDice, 0.04 L_MDice + L_MS + M), and only validation can tell which.
    `out` may be a URI: the networks are trained in its staging folder and the chosen one and
    thresholds.json are uploaded.

    Returns the fits, the chosen entry, the validation per-study rows of every variant, the
    model paths by role, `record` (run.json's "boxfcn" entry) and `training_runs` (run.json's
    "training_runs" entries of the BoxFCN networks, `training_runs`).
    """
    from wsseg_core.boxfcn import DEFAULT_POSTPROCESS
    from wsseg_core.losses import PAPER_LOSS

    ms_forms = list(dict.fromkeys(ms_forms))  # unique, in the given order
    unknown = [f for f in ms_forms if f not in MS_FORM_ROLES]
    if unknown or not ms_forms:
        raise ValueError(f"ms_forms must be a non-empty subset of {tuple(MS_FORM_ROLES)}, got {ms_forms!r}")
    if tune_samples > 0 and len(ms_forms) > 1:
        raise ValueError("the BoxFCN loss search (tune_samples > 0) runs for one L_MS form; "
                         f"got {ms_forms}")
    run = RunFolder(out)
    kw = dict(preset=preset, margin_mm=margin_mm, storage_path=storage_path, num_workers=num_workers,
              use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, seed=seed, patience=patience)
    fits: dict[str, Any] = {}
    # The networks train into the local (staging) folder: only the chosen one is uploaded, below.
    fits["box_dice"] = fit_boxfcn(train_refs, val_refs, run.out, kind="box_dice", filename=WARM_FILE,
                                  epochs=warm_epochs, **kw)
    kw["epochs"] = epochs
    warm = fits["box_dice"]["checkpoint"]
    if with_mdice:
        fits["mdice"] = fit_boxfcn(train_refs, val_refs, run.out, kind="mdice", init_from=warm,
                                   filename=MDICE_FILE, **kw)
    loss, searched = dict(PAPER_LOSS), None
    per_box = bool(BOXFCN_JOB_PRESETS[preset].get("mdice_per_box"))  # fit_config adds it to the runs
    losses_by_role: dict[str, dict[str, Any]] = {}
    for form in ms_forms:
        role, filename = MS_FORM_ROLES[form]
        if tune_samples > 0:
            searched = tune_loss(train_refs, val_refs, run.out, warm, samples=tune_samples,
                                 storage_path=storage_path, seed=seed, preset=preset, margin_mm=margin_mm,
                                 num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                                 epochs=epochs, ms_form=form)
            loss = {**loss, **searched["loss"]}
            dest = run.copy_in(searched["checkpoint"], run.model(filename), publish=False)  # as fitted ones
            fits[role] = {"checkpoint": str(dest), "best": {"val_dice": searched["val_dice"]},
                          "history": [], "searched": searched["results"]}
            fits[role]["record"] = training_record(fits[role], str(dest), dest)
        else:
            fits[role] = fit_boxfcn(train_refs, val_refs, run.out, kind="mdice_ms", loss=loss,
                                    init_from=warm, filename=filename, ms_form=form, **kw)
        losses_by_role[role] = {**loss, "ms_form": form,
                                "ms_scale": BOXFCN_JOB_PRESETS[preset].get("ms_scale", "none"),
                                "per_box": per_box}
    models = {role: f["checkpoint"] for role, f in fits.items()}
    thresholds = BOXFCN_JOB_PRESETS[preset].get("thresholds", (0.5,))
    val_rows = evaluate_variants(val_refs, models, DEFAULT_POSTPROCESS, thresholds=thresholds)
    choice = select_variant(val_rows)
    dest = run.copy_in(models[choice["role"]], run.model(CKPT_FILE))
    entry = {"threshold": choice["threshold"],
             "postprocess": dict(DEFAULT_POSTPROCESS) if choice["postprocess"] else False,
             "variant": choice["variant"], "network": choice["role"],
             "checkpoint": Path(models[choice["role"]]).name,
             "loss": losses_by_role.get(choice["role"]) or (
                 {"beta": loss["beta"], "alpha": loss["alpha"], "per_box": per_box}
                 if choice["role"] == "mdice" else {}),
             "ms_forms": ms_forms,
             "margin_mm": margin_mm, "val_dice": choice["val_dice"],
             "val_dice_by_variant": {k: (None if v != v else v) for k, v in choice["medians"].items()},
             # every (variant, threshold) tried; the keys are the thresholds as text (JSON)
             "val_dice_by_threshold": {k: {f"{t:g}": (None if m != m else m) for t, m in ts.items()}
                                       for k, ts in choice["medians_by_threshold"].items()},
             "thresholds_tried": [float(t) for t in thresholds],
             "val_dice_best": choice["best_val_dice"],
             "selected_on": (f"median validation Dice: of the cells within {choice['margin']:g} of the "
                             f"best, the paper's full method first, the threshold nearest 0.5"),
             "tuned_loss": searched is not None}
    mark_learned(entry, not_learned_reason(choice), LOG)
    run.update_thresholds({"BoxFCN": entry})
    LOG.info("BoxFCN: scoring %s at threshold %g (validation median Dice %s)", choice["variant"],
             choice["threshold"],
             ", ".join(f"{k} {v:.3f}" for k, v in choice["medians"].items()))
    # The scored BoxFCN is the variant chosen on validation (select_variant); every trained network
    # is recorded, keyed by its loss.
    record = {"path": str(dest), "sha256": run.sha256(dest), "selected_variant": entry["variant"],
              "val_dice_by_variant": entry["val_dice_by_variant"],
              "networks": {role: f["record"] for role, f in fits.items()}, "thresholds_entry": entry}
    return {"fits": fits, "entry": entry, "val_rows": val_rows, "models": models, "checkpoint": str(dest),
            "record": record, "training_runs": training_runs(fits)}


#: run.json's "training_runs" key of each BoxFCN network, by its role in `train_boxfcn`'s fits.
TRAINING_RUN_KEYS = {"mdice_ms": "boxfcn", "mdice_ms_cv": "boxfcn_chan_vese", "mdice": "boxfcn_mdice",
                     "box_dice": "boxfcn_warm_start"}


def training_runs(fits: dict[str, Any] | None) -> dict[str, dict | None]:
    """run.json's "training_runs" entries of the BoxFCN networks (`jobs.ray_train.training_run`),
    every key present, None for a network not trained (or no BoxFCN at all: `fits` None)."""
    fits = fits or {}
    return {key: training_run(fits.get(role)) for role, key in TRAINING_RUN_KEYS.items()}


def ablation(refs: list, out: str | Path, **kw: Any) -> dict[str, Any]:
    """The paper's Fig. 1 comparison on one cohort: trains box Dice, L_MDice and L_MDice + L_MS
    (both from the box-Dice warm start), scores them and L_MDice + L_MS + M on the validation and
    test studies, writes and returns the table."""
    from wsseg_core.boxfcn import DEFAULT_POSTPROCESS

    run = RunFolder(out)
    train = labelled(refs, "train")
    val = labelled(refs, "val")
    test = labelled(refs, "test")
    if not val:
        LOG.warning("no labelled validation study: early stopping and the table's val columns use the "
                    "training studies")
        val = train
    res = train_boxfcn(train, val, run.out, with_mdice=True, **kw)
    test_rows = evaluate_variants(test, res["models"], DEFAULT_POSTPROCESS,
                                  thresholds=res["entry"]["thresholds_tried"])
    import pandas as pd

    per_study = pd.concat([res["val_rows"], test_rows], ignore_index=True)
    table = ablation_table(per_study)
    paths = _write_ablation(run.out, per_study, table)
    return {**res, "per_study": per_study, "table": table, "paths": paths,
            "scored": scored_summary(per_study, res["entry"])}


def scored_summary(per_study: "pd.DataFrame", entry: dict[str, Any]) -> dict[str, Any]:  # noqa: F821
    """The BoxFCN the pipeline would score (thresholds.json entry: variant and threshold chosen on
    validation): its median Dice and predicted MTV (ml) per split over the studies with tumour."""
    t = float(entry["threshold"])
    thr = per_study["threshold"].to_numpy(float) if "threshold" in per_study else np.full(len(per_study), 0.5)
    g = per_study[(per_study["variant"] == entry["variant"]).to_numpy() & (thr == t)]
    out: dict[str, Any] = {"variant": entry["variant"], "threshold": t}
    for split in ("val", "test"):
        s = g[g["split"] == split]
        d = s["dice"].to_numpy(float)
        ok = np.isfinite(d)
        out[f"{split}_n"] = int(ok.sum())
        out[f"{split}_dice_median"] = float(np.median(d[ok])) if ok.any() else float("nan")
        out[f"{split}_mtv_median_ml"] = (float(np.median(s["mtv_pred_ml"].to_numpy(float)[ok]))
                                         if ok.any() else float("nan"))
    return out



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_boxfcn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--ablation", action="store_true",
                   help="train box Dice, L_MDice and L_MDice+L_MS, score them (+M) on val/test, write the table")
    p.add_argument("--tune", action="store_true", help="Ray Tune search over beta, lambda, omega1, omega2, alpha")
    p.add_argument("--samples", type=int, default=4, help="Tune trials (the paper's weights are the first)")
    p.add_argument("--ms-form", choices=("eq5", "chan-vese", "both"), default="eq5",
                   help="L_MS form of the L_MDice+L_MS network: eq5 (the paper's Eq. 5 as printed, "
                        "default), chan-vese (|I-C1|^2 H + |I-C2|^2 (1-H)), or both (two networks, "
                        "e.g. for --ablation)")
    p.add_argument("--margin-mm", type=float, default=0.0,
                   help="loosen every lesion box by this many mm per side (default 0: tight boxes)")
    p.add_argument("--warm-epochs", type=int, default=None,
                   help="box-Dice warm-start epochs (default: the preset's, small 10, paper 100)")
    p.add_argument("--epochs", type=int, default=None,
                   help="fine-tuning epochs (default: the preset's, small 4, paper 100)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop a run after this many epochs without a better validation score "
                        "(default: the preset's, small 3, paper 20); more --warm-epochs need a "
                        "patience that lets them run")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the batch is the global batch, split across them")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs (= torch threads) per Train worker; default: the cluster's CPUs / workers")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--storage-path", default=None, help="Ray Train/Tune storage; default <out>/ray")
    return p


def ms_forms_arg(value: str) -> tuple[str, ...]:
    """`--ms-form` (eq5, chan-vese or both) -> the `ms_forms` of :func:`train_boxfcn`."""
    return tuple(MS_FORM_ROLES) if value == "both" else (value,)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    train = labelled(refs, "train")
    if not train:
        raise SystemExit(f"{args.cohort}: no labelled training studies")
    init_ray(args.address)
    kw = dict(preset=args.preset, tune_samples=args.samples if args.tune else 0, margin_mm=args.margin_mm,
              storage_path=args.storage_path, num_workers=args.num_workers, use_gpu=args.use_gpu,
              cpus_per_worker=args.cpus_per_worker, seed=args.seed, warm_epochs=args.warm_epochs,
              epochs=args.epochs, ms_forms=ms_forms_arg(args.ms_form), patience=args.patience)
    if args.ablation:
        res = ablation(refs, args.out, **kw)
        print(format_ablation(res["table"]))
        sc = res["scored"]
        print(f"\nscored (chosen on validation): {sc['variant']} at threshold {sc['threshold']:g}: "
              f"val Dice {sc['val_dice_median']:.3f} (MTV {sc['val_mtv_median_ml']:.1f} ml, n {sc['val_n']}), "
              f"test Dice {sc['test_dice_median']:.3f} (MTV {sc['test_mtv_median_ml']:.1f} ml, n {sc['test_n']})")
        print(f"\ntable: {res['paths']['table']}  markdown: {res['paths']['markdown']}  "
              f"figure: {res['paths']['png']}")
        return res
    val = labelled(refs, "val")
    if not val:  # tiny cohorts: as the pipeline does, fall back to the training studies
        LOG.warning("no labelled validation study: early stopping and selection use the training studies")
        val = train
    res = train_boxfcn(train, val, args.out, **kw)
    print(f"BoxFCN checkpoint: {res['checkpoint']}  thresholds entry: {res['entry']}")
    return res


if __name__ == "__main__":
    main()
