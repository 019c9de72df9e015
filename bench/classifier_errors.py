"""Where a slice classifier loses its test AUC on a phantom cohort (issue 16).

Library-direct, one process: writes (or rewrites, deterministically) a phantom cohort, splits it as
the pipeline does (``jobs.common.resolve_cohort``, patient level, stratified, seeded), trains the
small preset's classifier with the pipeline's recipe (``jobs.common.PIPELINE_PRESETS`` +
``jobs.train_classifier.classifier_recipe``) through ``wsseg_core.train.fit_classifier``, keeps the
best-validation-AUC epoch, and breaks the test slices' errors down with the phantom's ground truth
(tumour voxels per slice, lesion SUV, organ labels, distance to the nearest tumour slice).

    python -m bench.classifier_errors --cohort /tmp/cls/hot30 --n 30 --shape 96 96 64 \
        --spacing 2.7 2.7 4 --organ-uptake-scale 1.8 --phantom-seed 12 --seed 12 --tag base

1 - AUC decomposes exactly over the positives (the mean share of negatives scored at or above each
positive, ties half) and over the negatives (the mean share of positives scored at or below each);
the tables report each group's share of that loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wsseg_core import phantom as ph
from wsseg_core.gate import choose_flag_threshold
from wsseg_core.metrics import roc_auc

HOT_ORGANS = {"brain": ph.BRAIN, "heart": (ph.MYOCARDIUM, ph.BLOOD), "kidney": ph.KIDNEY,
              "bladder": ph.BLADDER, "liver": ph.LIVER, "spleen": ph.SPLEEN, "bowel": ph.BOWEL}


def write_cohort(out: str, n: int, shape, spacing, seed: int, options: ph.PhantomOptions) -> dict:
    """Write the cohort; return {study folder: PhantomStudy without its images} for ground truth."""
    gt = {}
    for ref, st in ph._iter_cohort(out, n, shape, seed, 0.25, spacing, options):
        gt[str(Path(ref.suv_path).parent)] = st
    return gt


def cohort_ground_truth(out: str, n: int, shape, spacing, seed: int, options: ph.PhantomOptions) -> dict:
    """`write_cohort`'s ground truth without writing anything: the phantom studies regenerated from
    the same plan and seeds (``wsseg_core.phantom._iter_cohort``), keyed by the folder each was
    written to. ``main`` checks every loaded SEG against its regenerated one."""
    root = Path(out).expanduser().resolve()
    gt = {}
    for i, (patient, visit, negative, anat_seed, diag) in enumerate(ph._cohort_plan(n, seed, 0.25)):
        study_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        st = ph.make_phantom_study(study_seed, shape=shape, spacing_mm=spacing, negative=negative,
                                   anatomy_seed=anat_seed, diagnosis=None if negative else diag,
                                   options=options)
        date = f"01-01-{2000 + visit}" if visit == 0 else f"{1 + (i % 12):02d}-15-{2000 + visit}"
        folder = root / f"PETCT_{patient + 1:04d}" / f"{date}-NA-PET-CT Ganzkoerper phantom-{i + 1:04d}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not in the cohort; --no-write needs the cohort as "
                                    f"written with the same phantom options")
        gt[str(folder)] = st
    return gt


def slice_table(st, p: np.ndarray, split: str, key: str) -> pd.DataFrame:
    """One row per axial slice: label, p, tumour voxels, organs present, lesion SUV, z distance."""
    from scipy import ndimage

    seg = np.asarray(st.seg).astype(bool)
    org = np.asarray(st.organs)
    suv = np.asarray(st.suv)
    sx, sy, sz = st.spacing_mm
    Z = seg.shape[2]
    tum = seg.reshape(-1, Z).sum(0)
    pos_z = np.flatnonzero(tum > 0)
    rows = []
    hot_mask = np.isin(org, list(ph.PHYSIOLOGICAL))
    for z in range(Z):
        r = {"study": key, "split": split, "z": z, "y": int(tum[z] > 0), "p": float(p[z]),
             "tumour_vox": int(tum[z]), "tumour_ml": float(tum[z] * sx * sy * sz / 1000.0),
             "dz_tumour": int(np.min(np.abs(pos_z - z))) if len(pos_z) else 999,
             "suv_max_slice": float(suv[:, :, z].max())}
        for name, code in HOT_ORGANS.items():
            r[f"n_{name}"] = int(np.isin(org[:, :, z], np.atleast_1d(code)).sum())
        # the hottest non-tumour voxel (organs compete with lesions)
        nt = ~seg[:, :, z]
        r["suv_max_nontumour"] = float(suv[:, :, z][nt].max()) if nt.any() else 0.0
        if tum[z]:
            r["suv_max_tumour"] = float(suv[:, :, z][seg[:, :, z]].max())
            les = [l for l in st.lesions if l.z_range[0] <= z <= l.z_range[1]]
            r["lesion_suv"] = max((l.suv for l in les), default=float("nan"))
            r["lesion_d_mm"] = max((l.diameter_mm for l in les), default=float("nan"))
            r["lesion_sites"] = ",".join(sorted({l.site for l in les}))
            h = hot_mask[:, :, z]
            if h.any():
                d = ndimage.distance_transform_edt(~h, sampling=(sx, sy))
                r["dist_hot_mm"] = float(d[seg[:, :, z]].min())
            else:
                r["dist_hot_mm"] = float("inf")
        rows.append(r)
    return pd.DataFrame(rows)


def auc_loss_parts(df: pd.DataFrame) -> pd.DataFrame:
    """Per slice, its share of (1 - AUC): for a positive, the share of negatives scored >= it (ties
    half) / n_pos; for a negative, the share of positives scored <= it / n_neg. Each side sums to
    1 - AUC."""
    p, y = df["p"].to_numpy(), df["y"].to_numpy().astype(bool)
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    npos, nneg = len(pos), len(neg)
    loss = np.zeros(len(p))
    # positive i: negatives above + half ties
    above = nneg - np.searchsorted(neg, p[y], side="right")
    ties = np.searchsorted(neg, p[y], side="right") - np.searchsorted(neg, p[y], side="left")
    loss[y] = (above + 0.5 * ties) / (nneg * npos)
    below = np.searchsorted(pos, p[~y], side="left")
    ties_n = np.searchsorted(pos, p[~y], side="right") - below
    loss[~y] = (below + 0.5 * ties_n) / (nneg * npos)
    out = df.copy()
    out["auc_loss"] = loss
    return out


def neg_category(r) -> str:
    if r["dz_tumour"] <= 1:
        return "next to tumour slice (dz 1)"
    if r["dz_tumour"] == 2:
        return "dz 2 from tumour"
    for name in ("bladder", "kidney", "heart", "brain"):
        if r[f"n_{name}"] > 0:
            return name
    for name in ("liver", "spleen", "bowel"):
        if r[f"n_{name}"] > 0:
            return f"{name} (no hotter organ)"
    return "none of these organs"


def report(df: pd.DataFrame) -> str:
    lines = []
    te = auc_loss_parts(df)
    auc = roc_auc(te["p"].to_numpy(), te["y"].to_numpy())
    lines.append(f"test slices {len(te)}, positive {int(te.y.sum())}, AUC {auc:.4f}, 1-AUC {1 - auc:.4f}")
    pos = te[te.y == 1].copy()
    bins = [0, 5, 10, 20, 50, 100, 200, 10**9]
    pos["vox_bin"] = pd.cut(pos.tumour_vox, bins, right=False)
    g = pos.groupby("vox_bin", observed=True).agg(n=("p", "size"), median_p=("p", "median"),
                                                  loss=("auc_loss", "sum"))
    g["share_of_1-AUC"] = g["loss"] / (1 - auc)
    lines.append("positives by tumour voxels in the slice:\n" + g.round(4).to_string())
    for thr in (5, 10, 20, 50):
        keep = (te.y == 0) | (te.tumour_vox >= thr)
        lines.append(f"  AUC without positive slices of < {thr} tumour voxels: "
                     f"{roc_auc(te.p[keep].to_numpy(), te.y[keep].to_numpy()):.4f} "
                     f"({int((~keep).sum())} slices left out)")
    pos["hot_near"] = pd.cut(pos.dist_hot_mm, [-1, 10, 30, np.inf], labels=["<=10 mm", "10-30 mm", ">30 mm"])
    g = pos.groupby("hot_near", observed=True).agg(n=("p", "size"), median_p=("p", "median"),
                                                   loss=("auc_loss", "sum"))
    g["share_of_1-AUC"] = g["loss"] / (1 - auc)
    lines.append("positives by distance to a physiological hot organ:\n" + g.round(4).to_string())
    pos["suv_bin"] = pd.cut(pos.lesion_suv, [0, 4, 8, 100])
    g = pos.groupby("suv_bin", observed=True).agg(n=("p", "size"), median_p=("p", "median"),
                                                  loss=("auc_loss", "sum"))
    g["share_of_1-AUC"] = g["loss"] / (1 - auc)
    lines.append("positives by lesion SUV:\n" + g.round(4).to_string())
    neg = te[te.y == 0].copy()
    neg["cat"] = neg.apply(neg_category, axis=1)
    g = neg.groupby("cat").agg(n=("p", "size"), median_p=("p", "median"), p90=("p", lambda s: s.quantile(0.9)),
                               loss=("auc_loss", "sum"))
    g["share_of_1-AUC"] = g["loss"] / (1 - auc)
    lines.append("negatives by category:\n" + g.sort_values("loss", ascending=False).round(4).to_string())
    worst_pos = pos.sort_values("auc_loss", ascending=False).head(12)
    lines.append("worst positives:\n" + worst_pos[["study", "z", "p", "tumour_vox", "tumour_ml", "lesion_suv",
                                                   "lesion_d_mm", "lesion_sites", "dist_hot_mm",
                                                   "auc_loss"]].round(3).to_string())
    worst_neg = neg.sort_values("auc_loss", ascending=False).head(12)
    lines.append("worst negatives:\n" + worst_neg[["study", "z", "p", "cat", "dz_tumour", "n_heart", "n_kidney",
                                                   "n_bladder", "n_brain", "n_liver", "suv_max_slice",
                                                   "auc_loss"]].round(3).to_string())
    return "\n".join(lines)


def train_patient_subset(refs: list, tumour_patients: set[str], k: int, seed: int) -> list:
    """The training studies of ``k`` of the training patients; validation and test untouched.

    For a learning curve on one fixed validation / test set (issue 16: are the misses data-limited?).
    The training patients are ranked within each stratum (some tumour / tumour-free) by a seeded
    permutation of their sorted ids, and the first ``k - round(k * f)`` with tumour and
    ``round(k * f)`` tumour-free ones are kept, f being the tumour-free share of all training
    patients: both counts grow with ``k``, so a smaller subset is contained in every larger one
    (nested curves) and the tumour-free share stays that of the full split. A patient keeps all
    of its studies (visits). Returns the refs in input order.

    Raises:
        ValueError: ``k`` < 1 or more than the training patients.
    """
    pids = sorted({r.patient_id for r in refs if r.split == "train"})
    if not 1 <= k <= len(pids):
        raise ValueError(f"train patients k={k}: must be in [1, {len(pids)}]")
    free = [p for p in pids if p not in tumour_patients]
    sick = [p for p in pids if p in tumour_patients]
    rng = np.random.default_rng([int(seed), 16])
    free = [free[i] for i in rng.permutation(len(free))]
    sick = [sick[i] for i in rng.permutation(len(sick))]
    k_free = int(np.floor(k * len(free) / len(pids) + 0.5))
    k_free = min(k_free, len(free), k)
    k_sick = k - k_free
    if k_sick > len(sick):  # rounding can only be off by one: fill from the other stratum
        k_free, k_sick = k - len(sick), len(sick)
    keep = set(free[:k_free]) | set(sick[:k_sick])
    return [r for r in refs if r.split != "train" or r.patient_id in keep]


def flagged_share(df: pd.DataFrame, thr: float) -> list[float]:
    """Per tumour-free study, the share of its slices at p >= thr."""
    out = []
    for _, g in df.groupby("study"):
        if g.y.sum() == 0:
            out.append(float((g.p >= thr).mean()))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--shape", type=int, nargs=3, default=list(ph.DEFAULT_SHAPE))
    ap.add_argument("--spacing", type=float, nargs=3, default=list(ph.DEFAULT_SPACING_MM))
    ap.add_argument("--phantom-seed", type=int, default=0)
    ph.add_options_args(ap)
    ap.add_argument("--seed", type=int, default=0, help="the pipeline's --seed (split, init, order)")
    ap.add_argument("--init-seed", type=int, default=None,
                    help="seed of the weights, the sampling and the augmentation only, the split "
                         "staying --seed's (default: --seed); members of a seed ensemble differ here")
    ap.add_argument("--tag", default="base")
    ap.add_argument("--out", default=None, help="default: <cohort>_<tag>.*")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--patience-start", default=None, help="first | half_lr (default: the preset's)")
    ap.add_argument("--map-stride", type=int, default=None)
    ap.add_argument("--width", type=float, default=None,
                    help="channel multiplier of the VGG (default: the small preset's 0.125)")
    ap.add_argument("--ema-epochs", type=float, default=None,
                    help="validate and keep an EMA of the weights with this time constant in epochs "
                         "(wsseg_core.train.WeightEMA); 0: off; default: the preset's recipe")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW's (default: the preset's)")
    ap.add_argument("--pixel-mm", type=float, default=None)
    ap.add_argument("--train-patients", type=int, default=None,
                    help="train on this many of the split's training patients (nested, stratified "
                         "subsets: train_patient_subset); validation and test unchanged")
    ap.add_argument("--no-epoch-test", action="store_true",
                    help="skip the per-epoch test AUC (a diagnosis; the kept network is the same)")
    ap.add_argument("--no-write", action="store_true", help="cohort already written: regenerate ground truth only")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    from jobs.common import PIPELINE_PRESETS, resolve_cohort
    from jobs.train_classifier import classifier_recipe
    from wsseg_core.data import load_study
    from wsseg_core.models import build_slice_classifier
    from wsseg_core.train import fit_classifier, predict_proba, slices_from_studies, volume_to_batch

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    opts = ph.options_from_args(args)
    if args.no_write:
        gt = cohort_ground_truth(args.cohort, args.n, tuple(args.shape), tuple(args.spacing),
                                 args.phantom_seed, opts)
    else:
        gt = write_cohort(args.cohort, args.n, tuple(args.shape), tuple(args.spacing), args.phantom_seed, opts)
    refs = resolve_cohort(args.cohort, seed=args.seed)
    preset = PIPELINE_PRESETS["small"]
    recipe = classifier_recipe(preset)
    if args.input_size:
        recipe["input_size"] = args.input_size
    if args.patience:
        recipe["patience"] = args.patience
    if args.patience_start:
        recipe["patience_start"] = args.patience_start
    if args.map_stride:
        recipe["map_stride"] = args.map_stride
    if args.weight_decay is not None:
        recipe["weight_decay"] = args.weight_decay
    if args.ema_epochs is not None:
        recipe.pop("ema_epochs", None)
        if args.ema_epochs > 0:
            recipe["ema_epochs"] = args.ema_epochs
    epochs = args.epochs or preset["epochs"]
    lr = args.lr or preset["lr"]
    if args.train_patients:
        tumour_pids = {r.patient_id for r in refs
                       if np.asarray(gt[str(Path(r.suv_path).parent)].seg).any()}
        refs = train_patient_subset(refs, tumour_pids, args.train_patients, args.seed)
    by_split = {s: [r for r in refs if r.split == s] for s in ("train", "val", "test")}
    studies = {s: [load_study(r) for r in rs] for s, rs in by_split.items()}
    for s_, rs in by_split.items():  # the ground truth must be that of the files trained on
        for r, st in zip(rs, studies[s_]):
            if not np.array_equal(np.asarray(st.seg).astype(bool),
                                  np.asarray(gt[str(Path(r.suv_path).parent)].seg).astype(bool)):
                raise ValueError(f"{r.suv_path}: SEG differs from the regenerated phantom's "
                                 f"(phantom options or seed not those the cohort was written with)")
    print({s: len(v) for s, v in studies.items()}, "patients",
          {s: len({r.patient_id for r in v}) for s, v in by_split.items()}, "recipe", recipe, "epochs", epochs, flush=True)

    init_seed = args.seed if args.init_seed is None else args.init_seed
    torch.manual_seed(init_seed)
    model, pre = build_slice_classifier("small", width=args.width, input_size=recipe["input_size"],
                                        head=recipe["head"], map_stride=recipe.get("map_stride"), atrous=recipe.get("atrous"),
                                        pixel_mm=args.pixel_mm)
    print("preprocessing:", pre.describe(), flush=True)
    data_gen = torch.Generator().manual_seed(init_seed * 1000)
    tr = slices_from_studies(studies["train"], pre, negative_keep=preset["negative_keep"], generator=data_gen)
    va = slices_from_studies(studies["val"], pre)
    te = slices_from_studies(studies["test"], pre)  # per-epoch test AUC: diagnosis only, never selection
    best = {"auc": -1.0, "state": None, "epoch": -1}
    # With an EMA, the live network's trajectory is the one the run without it trains (the EMA
    # draws nothing from any generator), so keeping the live network by its own validation AUC
    # beside the EMA one gives the before/after of one run ("live": before, "plain": after).
    best_live = {"auc": -1.0, "state": None, "epoch": -1}
    cpu = {"live_diag": 0.0, "ema_update": 0.0}
    use_ema = bool(recipe.get("ema_epochs"))
    if use_ema:
        import wsseg_core.train as wt

        _update = wt.WeightEMA.update

        def timed_update(self, m):  # bench instrumentation: the EMA's own CPU cost
            c0 = time.process_time()
            _update(self, m)
            cpu["ema_update"] += time.process_time() - c0

        wt.WeightEMA.update = timed_update
    from wsseg_core.train import early_stop_start
    first_eligible = early_stop_start(recipe.get("patience_start"), recipe["schedule"], epochs)
    t_fit, c_fit = time.perf_counter(), time.process_time()

    def keep(epoch, m, net):
        # diagnosis only (never selection); --no-epoch-test saves its inference (~1/4 of an epoch
        # when the test split is as large as the training one) and changes no kept network
        m["test_auc"] = float("nan") if args.no_epoch_test else roc_auc(predict_proba(net, te[0]), te[1].numpy())
        live = ""
        if use_ema:
            c0 = time.process_time()
            m["live_val_auc"] = roc_auc(predict_proba(model, va[0]), va[1].numpy())
            m["live_test_auc"] = roc_auc(predict_proba(model, te[0]), te[1].numpy())
            if epoch >= first_eligible and m["live_val_auc"] > best_live["auc"]:
                best_live.update(auc=m["live_val_auc"], state=copy.deepcopy(model.state_dict()), epoch=epoch)
            cpu["live_diag"] += time.process_time() - c0
            live = f" | live val_auc {m['live_val_auc']:.4f} test_auc {m['live_test_auc']:.4f}"
        print(f"epoch {epoch} train_loss {m['train_loss']:.4f} val_auc {m['val_auc']:.4f} "
              f"test_auc {m['test_auc']:.4f}{live} ({time.perf_counter() - t_fit:.0f} s)", flush=True)
        if epoch >= first_eligible and m["val_auc"] > best["auc"]:
            best.update(auc=m["val_auc"], state=copy.deepcopy(net.state_dict()), epoch=epoch)

    hist = fit_classifier(model, tr, va, epochs=epochs, batch_size=preset["batch_size"], lr=lr,
                          seed=init_seed, on_epoch=keep, optimizer=recipe["optimizer"],
                          schedule=recipe["schedule"], patience=recipe["patience"],
                          patience_start=recipe.get("patience_start"),
                          weight_decay=recipe["weight_decay"], ema_epochs=recipe.get("ema_epochs"))
    fit_s = time.perf_counter() - t_fit
    fit_cpu_s = time.process_time() - c_fit

    def tables(state):
        model.load_state_dict(state)
        model.eval()
        frames, frames_tta = [], []
        for split in ("val", "test"):
            for r, st in zip(by_split[split], studies[split]):
                geo = pre.geometry(st.suv, st.ct, getattr(st, "spacing_mm", None))
                x = volume_to_batch(st.suv, st.ct, np.arange(st.suv.shape[2]), pre, geometry=geo)
                p = predict_proba(model, x)
                p_flip = predict_proba(model, torch.flip(x, dims=[-2]))  # left-right (x axis)
                key = str(Path(r.suv_path).parent)
                t = slice_table(gt[key], p, split, f"{r.patient_id}/{Path(key).name[-4:]}")
                frames.append(t)
                t2 = t.copy()
                t2["p"] = (p + p_flip) / 2
                frames_tta.append(t2)
        return pd.concat(frames, ignore_index=True), pd.concat(frames_tta, ignore_index=True)

    df, df_tta = tables(best["state"])
    out = Path(args.out or f"{args.cohort}_{args.tag}")
    res = {"cohort": args.cohort, "tag": args.tag, "seed": args.seed, "init_seed": init_seed, "recipe": recipe, "epochs": epochs,
           "lr": lr, "input_size": pre.input_size, "preprocessing": pre.describe(),
           "n": {s: len(v) for s, v in studies.items()},
           "patients": {s: len({r.patient_id for r in v}) for s, v in by_split.items()},
           "train_patients": sorted({r.patient_id for r in by_split["train"]}), "kept_epoch": best["epoch"],
           "epochs_run": len(hist), "history": hist, "best_val_auc": best["auc"], "fit_s": fit_s,
           # the fit's CPU without the bench's live-network diagnostics (they exist only with an EMA)
           "fit_cpu_s": fit_cpu_s - cpu["live_diag"], "ema_update_cpu_s": cpu["ema_update"],
           "live_diag_cpu_s": cpu["live_diag"]}
    variants = [("plain", df), ("flipTTA", df_tta)]
    if use_ema:
        df_live, _ = tables(best_live["state"])
        df_live.to_csv(f"{out}.slices_live.csv", index=False)
        variants.append(("live", df_live))
        res["live_kept_epoch"], res["live_best_val_auc"] = best_live["epoch"], best_live["auc"]
    for name, d in variants:
        va_d, te_d = d[d.split == "val"], d[d.split == "test"]
        thr = choose_flag_threshold(va_d.p.to_numpy(), va_d.y.to_numpy())
        res[name] = {"val_auc": roc_auc(va_d.p.to_numpy(), va_d.y.to_numpy()),
                     "test_auc": roc_auc(te_d.p.to_numpy(), te_d.y.to_numpy()),
                     "flag_threshold": thr,
                     "val_free_flagged": flagged_share(va_d, thr),
                     "test_free_flagged": flagged_share(te_d, thr),
                     "test_free_flagged_p05": flagged_share(te_d, 0.5)}
    res["wall_s"] = time.perf_counter() - t_wall
    res["cpu_s"] = time.process_time() - t_cpu
    df.to_csv(f"{out}.slices.csv", index=False)
    df_tta.to_csv(f"{out}.slices_tta.csv", index=False)
    txt = report(df[df.split == "test"])
    Path(f"{out}.report.txt").write_text(txt + "\n")
    Path(f"{out}.json").write_text(json.dumps(res, indent=1, default=float))
    print(txt)
    if use_ema:
        print("live network (kept by its own validation AUC):\n" + report(df_live[df_live.split == "test"]))
    print(json.dumps(res, indent=1, default=float))
    return res


if __name__ == "__main__":
    main()
