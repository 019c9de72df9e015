"""Ray Train: fit the supervised 2-D U-Net baseline (Früh et al. 2.3.2-2.3.3) with DDP, checkpoints, resume.

    python -m jobs.train_unet --cohort runs/demo/cohort.parquet --out runs/demo --preset small
    ray job submit --working-dir . -- python -m jobs.train_unet --cohort ... --preset paper --use-gpu --num-workers 4

Writes `<out>/models/unet.pt` (the epoch with the best validation pooled Dice at its best
probability threshold, `KEEP_METRIC`, among the checked epochs; load it with
`wsseg_core.unet.load_unet`). Validation runs every ceil(`--check-steps` / steps per epoch) epochs
and at the last (default: every epoch, both presets); every epoch still checkpoints. Resume after a
failure: run the same command again (same --out / --storage-path / --name); each worker picks up
the latest checkpoint (Ray Train V2 semantics). A worker that dies (up to --max-failures times)
makes Ray Train restart the worker group from the latest checkpoint; each reported epoch carries
`start_epoch`, the epoch that attempt began at.

Then the probability threshold is chosen on the validation studies (`tune_threshold`: the 3-D
Dice pooled over all validation studies, tumour-free ones included,
`wsseg_core.unet.choose_threshold`) and written to thresholds.json's "UNet" entry, which the scorer
uses.

Presets (`UNET_JOB_PRESETS`): "paper" is Früh et al.'s setting (base 64, 256x256, weighted CE,
Adam lr 5e-5, batch 64, 200 epochs). "small" (base 8) is the CPU preset; since issue 23 it trains
at the slices' own resolution (`input_size` "native": the largest side rounded up to a multiple of
16) on 64x64 windows (`crop` 64, half centred near tumour), with weighted CE + soft Dice
(`wsseg_core.unet.CEDiceLoss`, dice_weight 1), Adam lr 2e-3 with a cosine decay, batch 16, a fifth
of the tumour-free slices, and a budget of 1000 optimizer steps (epochs = ceil(1000 / steps per
epoch)) rather than a number of epochs. Why, measured (docs/UNET_EXPERIMENTS.md, "U-Net: why it undertrained"): 40
epochs were ~1160 steps on the demo but ~520 on a 15-study cohort; at 64x64 a small lesion is 1-2
pixels; the weighted CE alone stayed near validation Dice 0 on small cohorts; lr 5e-5 does not move
in CPU minutes.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from jobs.common import add_common_args, init_ray, labelled, mark_learned, resolve_cohort, setup_logging
from jobs.ray_train import (fit_and_keep_best, mean_over_ranks, on_rank0, prepare_ddp_model,
                            report_epoch, resume_from_checkpoint, start_watchdog, training_run,
                            world_info)
from jobs.ray_train import load_readable, maybe_die  # shared with the other train loops
from wsseg_core.selection import MIN_LEARNED_VAL_DICE

LOG = logging.getLogger("wsseg.train_unet")
CKPT_FILE = "unet.pt"
#: The epoch kept is the one with the highest validation pooled Dice at its best threshold of
#: `wsseg_core.unet.THRESHOLD_GRID` (issue 23; was "val_dice", the pooled Dice at the argmax).
KEEP_METRIC = "val_best_dice"

UNET_JOB_PRESETS: dict[str, dict[str, Any]] = {
    # small: see the module docstring and docs/UNET_EXPERIMENTS.md ("U-Net: why it undertrained"): 15 epochs of
    # batch 64 were ~180 optimizer steps and the validation Dice was still rising at the last one.
    # Issue 23: CE + soft Dice (dice_weight 1) and a budget of optimizer steps rather than epochs
    # (epochs = ceil(steps / steps per epoch)), so a 15-study cohort trains as long as the demo.
    # And the slices' own resolution (input_size "native") trained on 64x64 windows (crop 64),
    # half of them centred near tumour: at 64x64 small lesions were 1-2 pixels.
    # Third round (docs/UNET_EXPERIMENTS.md, "U-Net: third round"): pet_gamma False (no PET gamma in the
    # augmentation, SUV being calibrated) raised phantom v2b's test median Dice 0.41 -> 0.51 but
    # lowered the demo's split 0 0.73 -> 0.67 (11 false lesions per study instead of 2.5), so the
    # small preset keeps the gamma; the key says so explicitly.
    # check_steps (issue 23, time): None = validate every epoch (35 checks on the demo, 84 on a
    # 15-study cohort). An interval (`--check-steps 50`: every ceil(50 / steps per epoch) epochs
    # and the last) cut the demo's job 39 -> 33 min but skipped its best epoch (an even one):
    # test median Dice 0.728 -> 0.667 on the same training (docs/UNET_EXPERIMENTS.md, "validation
    # every ~50 steps"), so neither preset sets one; it stays an option for large or slow cohorts.
    "small": dict(model_preset="small", epochs=None, steps=1000, batch_size=16, lr=2e-3,
                  schedule="cosine", negative_keep=0.2, dice_weight=1.0, input_size="native",
                  crop=64, pet_gamma=True, check_steps=None),
    "paper": dict(model_preset="paper", epochs=200, steps=None, batch_size=64, lr=5e-5,
                  schedule="constant", negative_keep=1.0, dice_weight=0.0, input_size=None,
                  crop=None, pet_gamma=True, check_steps=None),
}


def preset_kwargs(preset: str) -> dict[str, Any]:
    """`fit_unet` keyword arguments of a job preset (what the pipeline and this job's CLI pass)."""
    p = dict(UNET_JOB_PRESETS[preset])
    return {"model_preset": p.pop("model_preset"), **p}


def unet_path(out: str | Path) -> Path:
    """Where the trained U-Net of a run lives: `<out>/models/unet.pt`."""
    return Path(out) / "models" / CKPT_FILE


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: slices + masks of the training studies; trains on its share of each GLOBAL
    batch (`config["batch_size"]` split across the workers), reports and checkpoints per epoch."""
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from wsseg_core.data import StudyRef
    from wsseg_core.train import GlobalBatchSampler, make_loss
    from wsseg_core.unet import (NATIVE, THRESHOLD_GRID, CEDiceLoss, build_unet, epoch_lr,
                                 evaluate_unet, load_unet, make_unet_optimizer, masks_from_studies,
                                 native_input_size, save_unet, set_lr, train_unet_epoch)

    rank, world = world_info()
    start_watchdog(config)
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    # Same seed on every rank: the negative-slice subsampling must pick the same training set on
    # every rank (one shared order); DDP broadcasts rank 0's initial weights anyway.
    torch.manual_seed(config["seed"])
    data_gen = torch.Generator().manual_seed(config["seed"] * 1000)
    aug_gen = torch.Generator().manual_seed(config["seed"] * 1000 + 1 + rank)

    train_refs = [StudyRef(**r) for r in config["train_refs"]]
    val_refs = [StudyRef(**r) for r in config["val_refs"]]
    train_studies = load_readable(train_refs)
    input_size, crop = config.get("input_size"), config.get("crop")
    if input_size == NATIVE:
        # The slices' own grid (issue 23); windows of `crop` keep a step's cost that of crop x crop.
        input_size = native_input_size(st.suv.shape for st in train_studies)
    context = int(config.get("context", 0))  # 2.5-D: neighbouring PET slices as channels
    model, pre = build_unet(config["model_preset"], base=config.get("base"), input_size=input_size,
                            context=context)
    crop = min(int(crop), pre.input_size) if crop else None  # a window no larger than the slice
    # Every rank holds all training slices and takes its share of each global batch of one shared
    # seeded order: equal steps on every rank (issue 17). Validation runs on rank 0 only.
    x_tr, y_tr = masks_from_studies(train_studies, pre, negative_keep=config["negative_keep"],
                                    generator=data_gen, context=context)
    x_va, y_va = (masks_from_studies(load_readable(val_refs), pre, context=context) if rank == 0
                  else (None, None))
    sampler = GlobalBatchSampler(len(y_tr), config["batch_size"], rank, world, seed=config["seed"])
    if rank == 0:
        LOG.info("U-Net data: %d train slices, %d validation slices, %d validation tumour pixels; "
                 "global batch %d over %d worker(s), %d steps per epoch", len(y_tr), len(y_va),
                 int(y_va.sum()), config["batch_size"], world, len(sampler))
        if int(y_va.sum()) == 0:
            LOG.warning("validation slices hold no tumour pixel: val_dice is undefined (reported "
                        "as 0), so the kept 'best' checkpoint is not chosen by Dice")

    start_epoch, optimizer_state = 0, None
    resumed = resume_from_checkpoint(CKPT_FILE, load_unet)
    if resumed is not None:
        (model, pre, _), start_epoch, optimizer_state = resumed
        model.train()

    model = prepare_ddp_model(model)
    device = ray.train.torch.get_device()
    optimizer = make_unet_optimizer(model, lr=config["lr"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn = make_loss(config["tumour_weight"]).to(device)
    # The gradient of the weighted pixel mean (and of the pooled soft Dice) over the GLOBAL batch,
    # whatever its split into ranks.
    train_loss_fn = CEDiceLoss(loss_fn.weight, dice_weight=config.get("dice_weight", 0.0),
                               world=world).to(device)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_sampler=sampler)
    epochs = unet_epochs(config.get("epochs"), config.get("steps"), len(sampler))
    every = check_interval(config.get("check_steps"), len(sampler))
    if rank == 0:
        LOG.info("U-Net: input %dx%d, training windows %s, %d epochs of %d steps (%d optimizer "
                 "steps; dice_weight %g)", pre.input_size, pre.input_size, crop or "none", epochs,
                 len(sampler), epochs * len(sampler), config.get("dice_weight", 0.0))
        LOG.info("U-Net: checking validation every %d epoch(s) (~%d steps) and at the last epoch "
                 "(check_steps %s)", every, every * len(sampler), config.get("check_steps"))

    bare = model.module if hasattr(model, "module") else model
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        set_lr(optimizer, epoch_lr(config["lr"], epoch, epochs, config.get("schedule", "constant")))
        train_loss = mean_over_ranks(train_unet_epoch(model, loader, optimizer, train_loss_fn,
                                                      device=device, augment=config["augment"],
                                                      generator=aug_gen, crop=crop,
                                                      pet_gamma=config.get("pet_gamma", True),
                                                      lesion_uptake=config.get("lesion_uptake"),
                                                      lesion_paste=config.get("lesion_paste")))
        maybe_die(config, epoch, rank)
        metrics = {"epoch": epoch, "train_loss": float(train_loss), "checked": False,
                   "start_epoch": start_epoch, "workers": world, "steps": len(sampler)}
        if is_check_epoch(epoch, every, epochs):
            val = on_rank0(lambda: evaluate_unet(bare, x_va, y_va, loss_fn,
                                                 batch_size=config["batch_size"], device=device,
                                                 thresholds=config.get("threshold_grid",
                                                                       THRESHOLD_GRID)))
            dice, best_dice = float(val["dice"]), float(val["best_dice"])
            metrics.update({
                "checked": True, "val_loss": float(val["loss"]),
                # NaN (no tumour pixel in validation) would break the checkpoint ranking.
                "val_dice": dice if math.isfinite(dice) else 0.0,
                "val_dice_defined": math.isfinite(dice),
                # The kept epoch's metric (issue 23): the pooled Dice at the epoch's best
                # threshold of the grid the threshold search then uses, not at the argmax.
                "val_best_dice": best_dice if math.isfinite(best_dice) else 0.0})
            if rank == 0:
                LOG.info("epoch %d/%d train_loss %.4f val_loss %.4f val_dice %.3f (best over "
                         "thresholds %.3f)", epoch + 1, epochs, train_loss, val["loss"], dice,
                         best_dice)
        elif rank == 0:
            LOG.info("epoch %d/%d train_loss %.4f (not checked: validation every %d epochs)",
                     epoch + 1, epochs, train_loss, every)
        # Unchecked epochs still report a checkpoint (a restart loses at most one epoch, as
        # before), but without KEEP_METRIC: EpochKeeper never ranks such an epoch above a checked
        # one, and the last epoch is always checked, so the kept network is a checked epoch's.
        report_epoch(metrics, epoch, optimizer, CKPT_FILE,
                     lambda path: save_unet(path, bare, pre, meta=metrics))


def unet_epochs(epochs: int | None, steps: int | None, steps_per_epoch: int) -> int:
    """Epochs to run: ``epochs`` when given, else enough whole epochs for ``steps`` optimizer steps
    (``ceil(steps / steps_per_epoch)``, at least 1). Why a step budget: the small preset's 40 epochs
    were ~1160 steps on the 24-study demo but ~520 on a 15-study cohort, where the validation Dice
    had not left ~0 (docs/UNET_EXPERIMENTS.md, "U-Net: why it undertrained")."""
    if epochs:
        return int(epochs)
    if not steps or steps < 1:
        raise ValueError(f"give epochs or steps >= 1, got epochs={epochs!r}, steps={steps!r}")
    return max(1, math.ceil(int(steps) / max(1, int(steps_per_epoch))))


def check_interval(check_steps: int | None, steps_per_epoch: int) -> int:
    """Epochs between validation checks: ``ceil(check_steps / steps_per_epoch)``, at least 1
    (a check at the first epoch end after at least ``check_steps`` optimizer steps); ``check_steps``
    None (both presets) or < 1: every epoch. E.g. 50 steps: every 2nd epoch at 29 steps per
    epoch (the demo), every 5th at 12 (a 15-study cohort), every epoch at 50 or more."""
    if check_steps is None or int(check_steps) < 1:
        return 1
    return max(1, math.ceil(int(check_steps) / max(1, int(steps_per_epoch))))


def is_check_epoch(epoch: int, every: int, epochs: int) -> bool:
    """Whether 0-based ``epoch`` of ``epochs`` is validated: every ``every``-th epoch (epochs
    every-1, 2*every-1, ...) and always the last, so a run's kept network is never older than its
    last check and the final network is always ranked. Absolute epoch numbers: a resumed run keeps
    the same schedule."""
    return (epoch + 1) % max(1, int(every)) == 0 or epoch >= epochs - 1


def fit_unet(train_refs: list, val_refs: list, out: str | Path, *, model_preset: str = "small",
             epochs: int | None = None, steps: int | None = 1000, batch_size: int = 16,
             lr: float = 2e-3, tumour_weight: float = 7.7, dice_weight: float = 1.0,
             negative_keep: float = 0.2, augment: bool = True, base: int | None = None,
             input_size: int | str | None = "native", crop: int | None = 64,
             schedule: str = "cosine", pet_gamma: bool = True, context: int = 0,
             lesion_uptake: tuple[float, float] | list[float] | None = None,
             lesion_paste: float | None = None, check_steps: int | None = None, members: int = 1,
             num_workers: int = 1,
             use_gpu: bool = False,
             cpus_per_worker: float | None = None, storage_path: str | None = None,
             name: str = "unet", max_failures: int = 3, seed: int = 0,
             callbacks: list | None = None,
             test_hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the U-Net with Ray Train; copy the best checkpoint (by `KEEP_METRIC`) to `<out>/models/unet.pt`.

    Returns dict(checkpoint (path of unet.pt), ray_checkpoint, history (per-epoch metrics of the
    final attempt), best (metrics of the last reported epoch, as Ray's `Result.metrics`)).
    `test_hooks` as in `jobs.train_classifier.fit` (`fail_after_epoch`, `fail_marker`).
    `batch_size` is the GLOBAL batch, split across `num_workers` (at least `num_workers`; the
    learning rate is not scaled). `epochs` None: as many epochs as `steps` optimizer steps need
    (`unet_epochs`). `input_size` "native": the training slices' own side rounded up to a
    multiple of 16 (`wsseg_core.unet.native_input_size`), trained on `crop` x `crop` windows; None:
    the model preset's. `pet_gamma` False: augmentation without the PET gamma (both presets keep
    it); it is then a config key, so it enters the run's fingerprint (the default adds no key, so
    earlier runs' fingerprints stay valid). `context` k > 0: 2.5-D input, the PET of the k slices
    on each side as extra channels (`wsseg_core.unet.slice_batch`); a config key only when
    nonzero, so it enters the fingerprint the same way. `lesion_uptake` (fraction, low): the
    lesion-uptake augmentation (`wsseg_core.unet.scale_lesion_uptake`); a config key only when
    given. `lesion_paste`: the fraction of `wsseg_core.unet.paste_lesions` (lesion copy-paste);
    a config key only when given. `check_steps`: validate (and rank for keeping) every
    ``ceil(check_steps / steps per epoch)`` epochs and the last (`check_interval`); None: every
    epoch, as before (adds no config key, so such runs keep their fingerprints; a number is a key,
    since another interval can keep another epoch). The defaults are the small preset's.

    `members` N > 1: an ensemble of N networks (`wsseg_core.unet.UNetEnsemble`, the mean of their
    probabilities), each this configuration with training seed `seed + k` (k = 0 ... N - 1: another
    initialisation, batch order and augmentation draw on the same split), trained one after the
    other as Ray runs `name` (k = 0, the run a single network would be, so it is reused),
    `name_m1`, ...; each member's kept network is `<out>/models/unet_m<k>.pt` and `unet.pt` holds
    the ensemble. It costs N trainings. The returned dict then also has `members` (each member's
    `fit_and_keep_best` result) and `training_runs` (run.json's entries, one per member).
    """
    from wsseg_core.train import check_global_batch
    from wsseg_core.unet import THRESHOLD_GRID

    check_global_batch(batch_size, num_workers)
    config = dict(train_refs=[r.to_dict() for r in train_refs], val_refs=[r.to_dict() for r in val_refs],
                  model_preset=model_preset, epochs=epochs, steps=steps, batch_size=batch_size,
                  lr=lr, tumour_weight=tumour_weight, dice_weight=dice_weight,
                  negative_keep=negative_keep, augment=augment,
                  # the grid of the kept epoch's metric (KEEP_METRIC): a changed grid can keep
                  # another epoch, so it is part of the run's fingerprint (issue 23, fourth round)
                  threshold_grid=[float(t) for t in THRESHOLD_GRID],
                  base=base, input_size=input_size, crop=crop, schedule=schedule, seed=seed,
                  **({} if pet_gamma else {"pet_gamma": False}),
                  **({"context": int(context)} if context else {}),
                  **({"lesion_uptake": [float(v) for v in lesion_uptake]} if lesion_uptake else {}),
                  **({"lesion_paste": float(lesion_paste)} if lesion_paste else {}),
                  # which epochs are ranked decides the kept network: a fingerprint key, but
                  # only when set (None, every epoch, is what earlier runs did)
                  **({"check_steps": int(check_steps)} if check_steps is not None else {}),
                  **(test_hooks or {}))
    fit_kw = dict(out=out, ckpt_file=CKPT_FILE, metric=KEEP_METRIC, num_workers=num_workers,
                  use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                  max_failures=max_failures, callbacks=callbacks)
    if int(members) != members or members < 1:
        raise ValueError(f"members must be an integer >= 1, got {members!r}")
    if members == 1:
        fit = fit_and_keep_best(train_loop_per_worker, config, name=name, **fit_kw)
        fit["training_runs"] = {"unet": training_run(fit)}
        return fit
    fits = []
    for k in range(int(members)):
        LOG.info("U-Net ensemble: member %d of %d (training seed %d)", k + 1, members, seed + k)
        fits.append(fit_and_keep_best(train_loop_per_worker, {**config, "seed": seed + k},
                                      name=member_name(name, k), model_file=member_file(k), **fit_kw))
    return combine_members(fits, out)


def member_name(name: str, k: int) -> str:
    """Ray run name of ensemble member k: `name` itself for k = 0 (the single network's run)."""
    return name if k == 0 else f"{name}_m{k}"


def member_file(k: int) -> str:
    """Model file of ensemble member k under `<out>/models/`."""
    return f"unet_m{k}.pt"


def combine_members(fits: list[dict[str, Any]], out: str | Path) -> dict[str, Any]:
    """Write the members' kept networks as one `UNetEnsemble` to `<out>/models/unet.pt` and return
    `fit_unet`'s dict: the first member's history and metrics (as a single run's), `members`,
    `training_runs` and `record` (run.json's "unet" entry: the ensemble's path and sha256, the
    first member's history, and each member's own record under "members")."""
    from jobs.common import RunFolder, sha256_file
    from wsseg_core.unet import UNetEnsemble, load_unet, save_unet

    run = RunFolder(out)
    nets, pre = [], None
    for fit in fits:
        net, p, _ = load_unet(fit["checkpoint"])
        if pre is not None and p.to_dict() != pre.to_dict():
            raise ValueError(f"{fit['checkpoint']}: ensemble members were trained with different "
                             f"preprocessors ({p.to_dict()} vs {pre.to_dict()})")
        nets.append(net)
        pre = p
    dest = run.model(CKPT_FILE)
    save_unet(dest, UNetEnsemble(nets), pre,
              meta={"members": [{"run_name": f.get("run_name"), "kept_epoch": f.get("kept_epoch"),
                                 KEEP_METRIC: f["best"].get(KEEP_METRIC)} for f in fits]})
    run.publish(dest)
    first = fits[0]
    record = {**first["record"], "path": run.where(dest), "sha256": sha256_file(dest),
              "members": [f["record"] for f in fits]}
    return {**first, "checkpoint": str(dest), "members": fits, "record": record,
            "training_runs": {member_name("unet", k): training_run(f) for k, f in enumerate(fits)}}


def not_learned_reason(entry: dict[str, Any], bar: float = MIN_LEARNED_VAL_DICE) -> str | None:
    """Why the U-Net has not learned: its validation Dice at the chosen threshold (``entry`` is
    `tune_threshold`'s: `choose_threshold`'s result) is under ``bar``; None when it has, or when no
    study with tumour could say (n 0: nothing to measure, which the entry's `selected_on` shows)."""
    dice = float(entry["val_dice"])
    if not entry.get("n") or not math.isfinite(dice) or dice >= bar:
        return None
    return (f"UNet did not learn: its {entry['rule']} validation Dice at the chosen threshold "
            f"{entry['threshold']:g} (the grid's best) is {dice:.3f} < {bar:g} ({entry['n']} studies with "
            f"tumour); its masks are scored but are not a segmentation. "
            f"run.json's unet history has the validation Dice per epoch. What to try: another training "
            f"draw (jobs.pipeline --train-seed N; the split stays with --seed) or a larger step budget "
            f"(jobs.train_unet --steps N; the small preset's is {UNET_JOB_PRESETS['small'].get('steps')}).")


def tune_threshold(val_refs: list, out: str | Path, train_refs: list | None = None) -> dict[str, Any]:
    """Choose the U-Net's probability threshold on the validation studies (3-D Dice pooled over
    them, `wsseg_core.unet.choose_threshold`'s default rule) and write it to thresholds.json's
    "UNet" entry, which the scorer passes to `wsseg_core.unet.load_segmenter`. Without a validation
    study with tumour the training studies vote (as the CAM thresholds fall back to them). `out`
    may be a URI (thresholds.json is uploaded). Returns the entry."""
    from jobs.common import RunFolder
    from wsseg_core.unet import choose_threshold, load_unet

    run = RunFolder(out)
    run.fetch(run.unet)
    model, pre, _ = load_unet(run.unet)
    res = choose_threshold(model, pre, load_readable(val_refs))
    source = "validation"
    if res["n"] == 0 and train_refs:
        res = choose_threshold(model, pre, load_readable(train_refs))
        source = "training (no validation study with tumour)"
    entry = {**res, "selected_on": f"{res['rule']} 3-D Dice of the {source} studies ({res['n']} "
                                   f"with tumour)"}
    mark_learned(entry, not_learned_reason(entry), LOG)
    run.update_thresholds({"UNet": entry})
    LOG.info("U-Net threshold %.2f (%s %s Dice %.3f; by threshold %s)", res["threshold"], res["rule"], source,
             res["val_dice"], res["by_threshold"])
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_unet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cohort_required=True)
    p.add_argument("--epochs", type=int, default=None,
                   help="default: the preset's (small: as many as --steps need, paper 200)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer-step budget when --epochs is not given (small preset: 1000)")
    p.add_argument("--check-steps", type=int, default=None,
                   help="validate every ceil(N / steps per epoch) epochs and the last; 0: every "
                        "epoch (default: every epoch, both presets; 50 cost the demo's U-Net 0.06 test Dice)")
    p.add_argument("--members", type=int, default=1,
                   help="an ensemble of N networks (training seeds --seed ... --seed + N - 1; N trainings), "
                        "scored as the mean of their probabilities (default 1: one network)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch, split across --num-workers (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr; default: the preset's (small 2e-3, paper 5e-5)")
    p.add_argument("--tumour-weight", type=float, default=7.7, help="weighted cross-entropy w (paper: 7.7)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the batch is the global batch, split across them")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--storage-path", default=None, help="Ray Train storage (shared on a cluster); default <out>/ray")
    p.add_argument("--name", default="unet", help="Ray Train run name (same name + storage = resume)")
    p.add_argument("--max-failures", type=int, default=3)
    return p


def cli_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`fit_unet` keywords of the preset, overridden by the options given on the command line
    (`--check-steps 0`: every epoch, None)."""
    kw = preset_kwargs(args.preset)
    kw.update({k: v for k, v in (("epochs", args.epochs), ("steps", args.steps),
                                 ("batch_size", args.batch_size), ("lr", args.lr)) if v})
    if args.check_steps is not None:
        kw["check_steps"] = args.check_steps if args.check_steps > 0 else None
    return kw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    train = labelled(refs, "train")
    val = labelled(refs, "val")
    if not train:
        raise SystemExit(f"{args.cohort}: no labelled training studies")
    init_ray(args.address)
    res = fit_unet(train, val, args.out, **cli_kwargs(args), tumour_weight=args.tumour_weight,
                   num_workers=args.num_workers, use_gpu=args.use_gpu,
                   storage_path=args.storage_path, name=args.name,
                   max_failures=args.max_failures, seed=args.seed, members=args.members)
    dices = [h.get(KEEP_METRIC, float("nan")) for h in res["history"]]
    best = max((d for d in dices if d == d), default=float("nan"))
    res["threshold"] = tune_threshold(val, args.out, train)
    print(f"U-Net checkpoint: {res['checkpoint']}  (kept epoch {res.get('kept_epoch')}; best val "
          f"pooled Dice over thresholds {best:.3f}; threshold {res['threshold']['threshold']:g}, "
          f"{res['threshold']['rule']} val Dice "
          f"{res['threshold']['val_dice']:.3f})")
    return res


if __name__ == "__main__":
    main()
