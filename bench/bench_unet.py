"""Issue 23: the U-Net alone on a phantom cohort's splits, one setting per run -> test metrics.

    python -m bench.bench_unet COHORT --size 128 --crop 64 --dice 1.0 --steps 1000 --eval-every 200

The same steps as `wsseg_core.unet.fit_unet_slices` (paired augmentation, `crop_pair` windows,
weighted CE [+ soft Dice], Adam, cosine lr per step), one torch thread; the model of the best
validation check (pooled pixel Dice at the argmax, every --eval-every steps) is kept, its
probability threshold chosen on the validation studies (`choose_threshold`'s default rule, the
pooled 3-D Dice, since issue 23's second round; the median before), then every test study is
scored: 3-D Dice, lesions found (18-connected), false lesions, MTV and ICC(MTV). Prints one
`RESULT {json}` line. `--dump DIR` also writes the probability volumes for `bench.unet_selection`.
The "U-Net: why it undertrained" tables of docs/UNET_EXPERIMENTS.md come from this script, and the fourth round's
(issue 23): `--lesion-report` (per reference lesion of the training and test studies: voxels, mean
SUV, ring SUV, recall at the chosen threshold), `--context` (2.5-D input), `--uptake-aug` and
`--paste` (lesion augmentations, applied to the cropped windows as the job does), `--grid`.
The fifth round's (issue 23: why the job scored below the bench): `--order job` replays
`jobs.train_unet`'s training in process (its batch order, per-epoch cosine, whole epochs, generator
seeds, a check after every epoch), `--keep` chooses the kept model among the checks (the bench's
pixel rule, the job's `val_best_dice`, or the last) and the other rules are scored on the same run,
`--swa-from` also scores the weight average of the last checks, `--max-checks` stops early.
"""
import argparse, copy, json, math, os, time
import numpy as np
import torch

from jobs.common import resolve_cohort, labelled
from jobs.train_classifier import load_readable
from wsseg_core import unet as U
from wsseg_core.train import make_loss
from wsseg_core.metrics import dice, lesion_detection, voxel_volume_ml, mtv_ml
from wsseg_core.stats import icc_agreement
from wsseg_core.storage import atomic_path, write_json

ap = argparse.ArgumentParser()
ap.add_argument("cohort")
ap.add_argument("--size", type=int, default=64)
ap.add_argument("--crop", type=int, default=0)
ap.add_argument("--base", type=int, default=8)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--eval-every", type=int, default=50)
ap.add_argument("--neg", type=float, default=0.2)
ap.add_argument("--w", type=float, default=7.7)
ap.add_argument("--dice", type=float, default=0.0)
ap.add_argument("--noaug", action="store_true")
ap.add_argument("--sched", default="cosine")
ap.add_argument("--lesion-frac", type=float, default=0.5)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--split-seed", type=int, default=0)
ap.add_argument("--suvmax", type=float, default=20.0)
ap.add_argument("--pet-log", type=float, default=0.0,
                help="k of unet.pet_log_transform on the PET channel inside the network (0: linear)")
ap.add_argument("--no-gamma", action="store_true", help="augmentation without the PET gamma")
ap.add_argument("--ct-soft", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                help="HU window of an extra soft-tissue CT channel inside the network")
ap.add_argument("--context", type=int, default=0,
                help="PET slices on each side of the segmented one as extra input channels (2.5-D, "
                     "unet.slice_batch)")
ap.add_argument("--uptake-aug", type=float, nargs=2, default=None, metavar=("FRACTION", "LOW"),
                help="lesion-uptake augmentation (unet.scale_lesion_uptake) on the training windows")
ap.add_argument("--paste", type=float, default=None, metavar="FRACTION",
                help="lesion copy-paste augmentation (unet.paste_lesions) on the training windows")
ap.add_argument("--grid", type=float, nargs="+", default=None,
                help="probability thresholds searched on validation (default unet.THRESHOLD_GRID)")
ap.add_argument("--dump", default=None,
                help="folder: at every validation check from --dump-from on, write the tumour "
                     "probability of every validation and test study (uint8, p x 255) to "
                     "DIR/step<N>.npz, and DIR/meta.json, for bench.unet_selection")
ap.add_argument("--dump-from", type=int, default=500)
ap.add_argument("--order", choices=("bench", "job"), default="bench",
                help="job: replay jobs.train_unet's training in process (issue 23, fifth round): "
                     "train.GlobalBatchSampler's order, the cosine lr per epoch (unet.epoch_lr), "
                     "whole epochs (jobs.train_unet.unet_epochs), the job's generator seeds, a "
                     "validation check after every epoch; the kept model is chosen by --keep")
ap.add_argument("--keep", choices=("pixel", "best", "last"), default="pixel",
                help="the model kept among the checks: pixel (pooled pixel Dice at the argmax, the "
                     "bench's rule), best (pooled Dice at its best threshold of unet.THRESHOLD_GRID, "
                     "the job's KEEP_METRIC) or last; the other two are scored too (paired)")
ap.add_argument("--max-checks", type=int, default=0,
                help="stop training after this many validation checks (0: never); with --order job "
                     "a quick check that the replay reproduces a job's first epochs' metrics")
ap.add_argument("--swa-from", type=float, default=0.75,
                help="also score (paired) the weight average of every check after this fraction of "
                     "the steps (BatchNorm running statistics averaged too); 0: off")
ap.add_argument("--train-patients", type=int, default=None,
                help="train on this many of the split's training patients (nested, stratified by "
                     "tumour, seeded by --split-seed: bench.classifier_errors.train_patient_subset); "
                     "validation and test unchanged: a learning curve on fixed test studies")
ap.add_argument("--lesion-report", action="store_true",
                help="also print, per reference lesion (18-connected) of the training and test "
                     "studies, its voxels, mean SUV, mean SUV of a 2-voxel ring around it and the "
                     "share of its voxels above the chosen threshold (the misses' diagnosis)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
t0 = time.time()
refs = resolve_cohort(a.cohort, seed=a.split_seed)
if a.train_patients:
    from bench.classifier_errors import train_patient_subset
    from wsseg_core.data import seg_has_tumour
    refs = train_patient_subset(refs, {r.patient_id for r in refs if r.seg_path and seg_has_tumour(r)},
                                a.train_patients, a.split_seed)
print("patients", {s: len({r.patient_id for r in refs if r.split == s}) for s in ("train", "val", "test")},
      "studies", {s: sum(r.split == s for r in refs) for s in ("train", "val", "test")}, flush=True)
tr, va = load_readable(labelled(refs, "train")), load_readable(labelled(refs, "val"))
te = load_readable([r for r in refs if r.split == "test"])
model, pre = U.build_unet("small", base=a.base, input_size=a.size, pet_log=a.pet_log,
                          ct_soft_hu=a.ct_soft, context=a.context)
pre.suv_max = a.suvmax
# --order job: the job's generators (jobs.train_unet.train_loop_per_worker, rank 0)
g = torch.Generator().manual_seed(a.seed * 1000 if a.order == "job" else a.seed)
xtr, ytr = U.masks_from_studies(tr, pre, negative_keep=a.neg, generator=g, context=a.context)
xva, yva = U.masks_from_studies(va, pre, context=a.context)
print(f"data {len(ytr)} train slices ({int((ytr.flatten(1).any(1)).sum())} pos), {len(yva)} val; "
      f"load {time.time()-t0:.1f}s", flush=True)
loss_fn = make_loss(a.w)
opt = U.make_unet_optimizer(model, lr=a.lr)
aug_g = torch.Generator().manual_seed(a.seed * 1000 + 1 if a.order == "job" else a.seed + 1)
best = (-1.0, None, -1)
keeps = {"pixel": (-1.0, None, -1), "best": (-1.0, None, -1), "last": (-1.0, None, -1)}
checks: list[dict] = []


def dump_probs(step: int, ev: dict) -> None:
    """Probabilities of the validation and test studies at this check, quantised to uint8
    (p x 255, rounded: a threshold t of the 0.1 grid is then compared within 1/510)."""
    os.makedirs(a.dump, exist_ok=True)
    arrs = {}
    for split, sts in (("val", va), ("test", te)):
        for st in sts:
            p = U.predict_volume_unet(model, pre, st.suv, st.ct)
            arrs[f"{split}/{st.ref.study_id}"] = np.round(p * 255).astype(np.uint8)
    with atomic_path(os.path.join(a.dump, f"step{step}.npz")) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrs)  # a file object: savez adds no ".npz" to the temp name
    checks.append(dict(step=step, val_pixel_dice=ev["dice"], n_pred_pixels=ev["n_pred_pixels"]))
    meta = dict(args=vars(a), checks=checks)
    write_json(os.path.join(a.dump, "meta.json"), meta)
step = 0
hist = []
t1 = time.time()
c1 = time.process_time()  # CPU seconds of this process (one torch thread): less sensitive to load


def batches():
    """(indices, lr or None, check after this step) of every optimizer step."""
    if a.order == "job":
        from jobs.train_unet import unet_epochs
        from wsseg_core.train import GlobalBatchSampler
        sampler = GlobalBatchSampler(len(ytr), a.batch, 0, 1, seed=a.seed)
        n_ep = unet_epochs(None, a.steps, len(sampler))
        for ep in range(n_ep):
            sampler.set_epoch(ep)
            bl = list(sampler)
            for j, b in enumerate(bl):
                yield torch.as_tensor(b), U.epoch_lr(a.lr, ep, n_ep, a.sched), j == len(bl) - 1
        return
    k = 0
    while k < a.steps:
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm) - a.batch + 1, a.batch):
            if k >= a.steps:
                return
            lr = a.lr * 0.5 * (1 + math.cos(math.pi * k / a.steps)) if a.sched == "cosine" else None
            k += 1
            yield perm[i:i + a.batch], lr, k % a.eval_every == 0 or k == a.steps


if a.order == "job":
    from jobs.train_unet import unet_epochs
    from wsseg_core.train import GlobalBatchSampler
    _spe = len(GlobalBatchSampler(len(ytr), a.batch, 0, 1, seed=a.seed))
    n_total = unet_epochs(None, a.steps, _spe) * _spe
else:
    n_total = a.steps
swa_sum, swa_n = None, 0

for idx, lr, check in batches():
    if lr is not None:
        U.set_lr(opt, lr)
    xb, yb = xtr[idx], ytr[idx]
    if not a.noaug:
        xb, yb = U.augment_pair(xb, yb, aug_g, pet_gamma=not a.no_gamma)
    if a.crop:
        xb, yb = U.crop_pair(xb, yb, a.crop, aug_g, lesion_fraction=a.lesion_frac)
    if a.paste and not a.noaug:
        xb, yb = U.paste_lesions(xb, yb, aug_g, a.paste)
    if a.uptake_aug and not a.noaug:
        xb = U.scale_lesion_uptake(xb, yb, aug_g, *a.uptake_aug)
    model.train()
    opt.zero_grad()
    logits = model(xb)
    loss = loss_fn(logits, yb)
    if a.dice:
        p = torch.softmax(logits, 1)[:, 1]
        r = (yb == 1).float()
        loss = loss + a.dice * (1 - (2 * (p * r).sum() + 1) / (p.sum() + r.sum() + 1))
    loss.backward()
    opt.step()
    step += 1
    if check:
        ev = U.evaluate_unet(model, xva, yva, loss_fn, batch_size=32,
                             thresholds=U.THRESHOLD_GRID)
        hist.append((step, round(float(loss.detach()), 4), round(ev["dice"], 3), round(ev["best_dice"], 3)))
        print(f"step {step} loss {float(loss.detach()):.4f} val_dice {ev['dice']:.3f} best_dice {ev['best_dice']:.3f} pred {ev['n_pred_pixels']} ref {ev['n_pos_pixels']} t {time.time()-t1:.0f}s", flush=True)
        for rule, v in (("pixel", ev["dice"]), ("best", ev["best_dice"]), ("last", float(step))):
            if v == v and v > keeps[rule][0]:
                keeps[rule] = (v, copy.deepcopy(model.state_dict()), step)
        best = keeps[a.keep]
        if a.swa_from and step >= a.swa_from * n_total:
            sd = model.state_dict()
            if swa_sum is None:
                swa_sum = {k: v.detach().clone().double() for k, v in sd.items()}
            else:
                for k, v in sd.items():
                    swa_sum[k] += v.detach().double()
            swa_n += 1
        if a.dump and step >= a.dump_from:
            dump_probs(step, ev)
        if a.max_checks and len(hist) >= a.max_checks:
            break
if swa_n:
    sd = model.state_dict()
    keeps["swa"] = (0.0, {k: (swa_sum[k] / swa_n).to(sd[k].dtype) if sd[k].is_floating_point()
                          else sd[k].clone() for k in sd}, -swa_n)
train_s = time.time() - t1
train_cpu_s = time.process_time() - c1  # includes the validation checks


def test_metrics(state):
    """Threshold chosen on validation, then the test studies' metrics, of one kept state."""
    model.load_state_dict(state)
    thr = U.choose_threshold(model, pre, va, **({"grid": a.grid} if a.grid else {}))
    rows = []
    for st in te:
        prob = U.predict_volume_unet(model, pre, st.suv, st.ct)
        m = prob > thr["threshold"]
        vml = voxel_volume_ml(st.spacing_mm)
        ld = lesion_detection(m, st.seg)
        d = dice(m, st.seg) if st.seg.any() else float("nan")
        rows.append(dict(dice=d, mtv_t=mtv_ml(st.seg, vml), mtv_p=mtv_ml(m, vml), **ld))
    return thr, rows


others = {}
for rule, (_, state, kstep) in keeps.items():
    if rule != a.keep and state is not None and kstep != best[2]:
        thr_o, rows_o = test_metrics(state)
        d_o = [r["dice"] for r in rows_o if r["dice"] == r["dice"]]
        icc_o = icc_agreement([r["mtv_t"] for r in rows_o], [r["mtv_p"] for r in rows_o])["icc"]
        others[rule] = dict(step=kstep, thr=thr_o["threshold"], val=round(thr_o["val_dice"], 3),
                            test_dice=[round(x, 3) for x in d_o],
                            median=round(float(np.median(d_o)), 3) if d_o else None,
                            found=f'{sum(r["n_ref_detected"] for r in rows_o)}/{sum(r["n_ref_lesions"] for r in rows_o)}',
                            false_per_study=float(np.mean([r["n_pred_false"] for r in rows_o])),
                            icc=round(icc_o, 3) if icc_o == icc_o else None)
    elif rule != a.keep:
        others[rule] = dict(step=kstep, same_as_kept=True)
thr, rows = test_metrics(best[1])
print("threshold", thr["threshold"], thr["rule"], "val Dice", round(thr["val_dice"], 3), thr["by_threshold"])
dices = [r["dice"] for r in rows if r["dice"] == r["dice"]]
found = sum(r["n_ref_detected"] for r in rows); nref = sum(r["n_ref_lesions"] for r in rows)
icc = icc_agreement([r["mtv_t"] for r in rows], [r["mtv_p"] for r in rows])
lesion_rows = []
if a.lesion_report:
    from scipy import ndimage as ndi
    st18 = ndi.generate_binary_structure(3, 2)
    for split, sts in (("train", tr), ("test", te)):
        for st in sts:
            seg = np.asarray(st.seg) > 0
            if not seg.any():
                continue
            prob = U.predict_volume_unet(model, pre, st.suv, st.ct)
            lab, n = ndi.label(seg, st18)
            for k in range(1, n + 1):
                m = lab == k
                ring = ndi.binary_dilation(m, st18, iterations=2) & ~seg
                lesion_rows.append(dict(split=split, study=st.ref.study_id[-4:], vox=int(m.sum()),
                                        suv=round(float(st.suv[m].mean()), 2),
                                        ring=round(float(st.suv[ring].mean()), 2),
                                        recall=round(float((prob[m] > thr["threshold"]).mean()), 2),
                                        p=round(float(prob[m].mean()), 2)))
    for split in ("train", "test"):
        rs = [r for r in lesion_rows if r["split"] == split]
        print(f"LESIONS {split}: {sum(r['recall'] > 0 for r in rs)}/{len(rs)} hit; recall < 0.5:",
              flush=True)
        for r in rs:
            if r["recall"] < 0.5:
                print("  ", r, flush=True)
res = dict(args=vars(a), best_step=best[2], best_val=round(best[0], 3), thr=thr["threshold"],
           test_dice=[round(x, 3) for x in dices], median=round(float(np.median(dices)), 3) if dices else None,
           found=f"{found}/{nref}", false_per_study=np.mean([r["n_pred_false"] for r in rows]),
           icc=round(icc["icc"], 3) if icc["icc"] == icc["icc"] else None, n_test=len(rows),
           mtv=[(round(r["mtv_t"], 1), round(r["mtv_p"], 1)) for r in rows], train_s=round(train_s),
           train_cpu_s=round(train_cpu_s, 1), total_s=round(time.time() - t0),
           lesions=lesion_rows or None, val_thr=round(thr["val_dice"], 3), others=others or None)
print("RESULT", json.dumps(res), flush=True)
