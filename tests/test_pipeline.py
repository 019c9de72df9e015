"""End to end on a tiny phantom cohort with a real local Ray cluster: the SPEC's output contract.

Every number in the outputs is recomputed here from the written masks and the source NIfTI files
(Dice, MTV, TLG) and from the rows (ICC), with code independent of wsseg_core.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pingouin as pg
import pytest

pytestmark = pytest.mark.slow

SPEC_COLUMNS = ["patient_id", "study_id", "split", "method", "status", "error", "dice", "mtv_true_ml",
                "mtv_pred_ml", "tlg_true_g", "tlg_pred_g", "voxel_volume_ml", "suv_path", "seg_path",
                "mask_path"]
METHODS = {"CAM", "GradCAM", "GradCAM++", "ScoreCAM", "Threshold"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_cluster):
    """Run the pipeline once on 12 tiny phantom studies (10 patients) plus one corrupt study.

    The corrupt study has no SEG: an unlabelled patient, with its own split quota, so the 10
    labelled patients split 6/2/2 with a tumour patient in validation (asserted below) and the
    normal path runs: checkpoint kept on validation AUC, thresholds tuned on training + validation
    (--tune-on's default, the paper's)."""
    from jobs import pipeline
    from wsseg_core.phantom import write_phantom_cohort

    root = tmp_path_factory.mktemp("run")
    cohort = root / "cohort"
    write_phantom_cohort(cohort, n=12, shape=(64, 64, 40), seed=3)
    # A study whose SUV is a truncated gzip: it must become failed rows, and nothing else fails.
    bad = cohort / "PETCT_bad" / "01-01-2000-NA-PET-CT broken"
    bad.mkdir(parents=True)
    good = next(cohort.glob("*/*/SUV.nii.gz"))
    data = good.read_bytes()
    (bad / "SUV.nii.gz").write_bytes(data[: len(data) // 2])
    (bad / "CTres.nii.gz").write_bytes((good.parent / "CTres.nii.gz").read_bytes())
    out = root / "out"
    # --concurrency 2: the scoring must spread over two actors (checked from the `worker` column).
    # The output contract holds whatever 3 epochs on 12 tiny studies learned: go on past the
    # classifier gate (tests/test_pipeline_gate.py tests the gate itself).
    # --train-seed 7: the networks' draw apart from the split's seed (0), checked below.
    run = pipeline.main(["--cohort", str(cohort), "--out", str(out), "--epochs", "3",
                         "--concurrency", "2", "--allow-weak-classifier", "--train-seed", "7"])
    return out, run


def test_validation_split_is_used(finished_run):
    """The normal path, not the no-validation fallback: a labelled tumour study in validation, the
    classifier's checkpoint chosen on a finite validation AUC, thresholds tuned on the training and
    validation studies (--tune-on train+val, the default)."""
    out, _ = finished_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    patients = cohort.groupby("patient_id")["split"].nunique()
    assert (patients == 1).all()  # no patient straddles splits
    labelled = cohort[cohort["seg_path"].notna()]
    per_split = labelled.drop_duplicates("patient_id")["split"].value_counts()
    assert (per_split["train"], per_split["val"], per_split["test"]) == (6, 2, 2)
    val = labelled[labelled["split"] == "val"]
    val_tumour = [p for p in val["seg_path"] if (np.asarray(nib.load(p).dataobj) > 0).any()]
    assert len(val_tumour) >= 1
    rec = json.loads((out / "run.json").read_text())
    best = rec["classifier"]["best_epoch_metrics"]
    assert np.isfinite(best["val_auc"])
    aucs = [h["val_auc"] for h in rec["training_history"]]
    # (the history does not always hold every epoch, e.g. epoch 0: jobs/ray_train's business; the
    # kept checkpoint must still be at least as good as every epoch recorded that may be kept:
    # the small preset keeps from the one-cycle half-lr epoch on, val_auc_eligible, issue 16)
    eligible = [h["val_auc"] for h in rec["training_history"]
                if h.get("val_auc_eligible", h["val_auc"]) is not None
                and np.isfinite(h.get("val_auc_eligible", h["val_auc"]))]
    assert len(aucs) >= 1 and all(np.isfinite(aucs)) and eligible
    assert best["val_auc"] >= max(eligible) - 1e-12
    thresholds = json.loads((out / "thresholds.json").read_text())
    train = labelled[labelled["split"] == "train"]
    assert thresholds["tune_on"] == "train+val"
    assert (thresholds["n_train_studies"], thresholds["n_val_studies"]) == (len(train), len(val))
    tuned = pd.concat([train, val])
    tumour_patients = {pid for pid, seg in zip(tuned["patient_id"], tuned["seg_path"])
                       if (np.asarray(nib.load(seg).dataobj) > 0).any()}
    grid = pd.read_parquet(out / "tune" / "grid.parquet")
    assert (grid["n_patients"] == len(tumour_patients)).all()  # tumour-bearing train + val patients
    # the flag threshold and the gate stay on validation
    assert thresholds["classifier_gate"]["n_studies"] == len(val)


def test_train_seed_draws_the_network_not_the_split(finished_run):
    """--train-seed reaches the classifier's training (its Ray run's recorded settings) and leaves
    the patient split to --seed: the split is the one resolve_cohort draws with seed 0."""
    from jobs.common import resolve_cohort

    out, _ = finished_run
    rec = json.loads((out / "run.json").read_text())
    assert (rec["seed"], rec["train_seed"]) == (0, 7)
    last = json.loads((out / "ray" / "classifier.last-run.json").read_text())
    assert last["run_name"] == rec["classifier"]["run_name"] and last["fields"]["seed"] == 7
    written = pd.read_parquet(out / "cohort.parquet").set_index(["patient_id", "study_id"])["split"]
    drawn = {(r.patient_id, r.study_id): r.split for r in resolve_cohort(out.parent / "cohort", seed=0)}
    assert written.to_dict() == drawn


def test_scoring_spread_over_two_actors(finished_run):
    out, _ = finished_run
    df = pd.read_parquet(out / "metrics")
    # every study is scored by one process; with --concurrency 2 the studies spread over two
    assert df.groupby(["patient_id", "study_id"])["worker"].nunique().eq(1).all()
    assert df["worker"].nunique() >= 2, df["worker"].unique()


def test_metrics_follow_the_contract(finished_run):
    out, _ = finished_run
    df = pd.read_parquet(out / "metrics")
    assert list(df.columns[: len(SPEC_COLUMNS)]) == SPEC_COLUMNS
    assert set(df["method"]) == METHODS
    n_studies = df[["patient_id", "study_id"]].drop_duplicates().shape[0]
    assert n_studies == 13 and len(df) == 13 * len(METHODS)
    assert not df.duplicated(["patient_id", "study_id", "method"]).any()
    failed = df[df["status"] == "failed"]
    assert set(failed["patient_id"]) == {"PETCT_bad"} and len(failed) == len(METHODS)
    assert failed["error"].str.contains("SUV.nii.gz").all()
    ok = df[df["status"] == "ok"]
    assert ok["error"].isna().all() and ok["mask_path"].notna().all()
    assert set(ok["split"]) <= {"train", "val", "test"}


def test_numbers_recompute_from_masks_and_sources(finished_run):
    out, _ = finished_run
    df = pd.read_parquet(out / "metrics")
    ok = df[df["status"] == "ok"]
    for row in ok.itertuples():
        suv_img = nib.load(row.suv_path)
        mask_img = nib.load(out / row.mask_path)
        assert mask_img.get_data_dtype() == np.uint8
        assert mask_img.shape == suv_img.shape
        np.testing.assert_allclose(mask_img.affine, suv_img.affine, atol=1e-5)
        pred = np.asarray(mask_img.dataobj) > 0
        suv = np.asarray(suv_img.dataobj, dtype=np.float64)
        ref = np.asarray(nib.load(row.seg_path).dataobj) > 0
        voxel_ml = float(np.prod(suv_img.header.get_zooms()[:3])) / 1000.0
        assert row.voxel_volume_ml == pytest.approx(voxel_ml)
        assert row.mtv_pred_ml == pytest.approx(pred.sum() * voxel_ml)
        assert row.mtv_true_ml == pytest.approx(ref.sum() * voxel_ml)
        assert row.tlg_pred_g == pytest.approx(suv[pred].sum() * voxel_ml, rel=1e-5, abs=1e-6)
        assert row.tlg_true_g == pytest.approx(suv[ref].sum() * voxel_ml, rel=1e-5, abs=1e-6)
        if ref.sum() == 0:
            assert np.isnan(row.dice)
        else:
            assert row.dice == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


def test_icc_recomputes_from_rows(finished_run):
    out, _ = finished_run
    icc = pd.read_parquet(out / "icc.parquet")
    df = pd.read_parquet(out / "metrics")
    test = df[(df["status"] == "ok") & (df["split"] == "test")]
    # every subset x method x quantity has a row; every "all" row is compared (no skipping: with
    # n < 3 or a NaN ICC the comparison below would have nothing to check), and a "tumour" row
    # (reference MTV > 0) is compared too when it has 3 pairs, else its ICC must be NaN
    assert sorted(zip(icc["subset"], icc["method"], icc["quantity"])) == sorted(
        (sub, m, q) for sub in ("tumour", "all") for m in METHODS for q in ("MTV", "TLG"))
    compared = 0
    for row in icc.itertuples():
        col_true, col_pred = {"MTV": ("mtv_true_ml", "mtv_pred_ml"), "TLG": ("tlg_true_g", "tlg_pred_g")}[row.quantity]
        sub = test[test["method"] == row.method].dropna(subset=[col_true, col_pred])
        if row.subset == "tumour":
            sub = sub[sub["mtv_true_ml"] > 0]
            if len(sub) < 3:
                assert row.n == len(sub) and np.isnan(row.icc)
                continue
        assert row.n == len(sub) >= 3
        long = pd.concat([
            pd.DataFrame({"target": range(len(sub)), "rater": "true", "y": sub[col_true].to_numpy()}),
            pd.DataFrame({"target": range(len(sub)), "rater": "pred", "y": sub[col_pred].to_numpy()})])
        ref = pg.intraclass_corr(long, targets="target", raters="rater", ratings="y").set_index("Type")
        # pingouin < 0.7 calls the Shrout-Fleiss ICC(2,1) row "ICC2", 0.7 calls it "ICC(A,1)".
        key = "ICC(A,1)" if "ICC(A,1)" in ref.index else "ICC2"
        assert row.icc == pytest.approx(ref.loc[key, "ICC"], abs=1e-9, nan_ok=True)
        compared += 1
    assert compared >= 2 * len(METHODS) and len(icc) == 4 * len(METHODS)


def test_comparisons_recompute_from_rows(finished_run):
    """comparisons.parquet: every pair of methods per metric and subset; Dice p-values recomputed
    here from the rows with scipy (per patient means), Holm by the step-down rule written out."""
    from itertools import combinations

    from scipy import stats as sps

    out, _ = finished_run
    comp = pd.read_parquet(out / "comparisons.parquet")
    df = pd.read_parquet(out / "metrics")
    test = df[(df["status"] == "ok") & (df["split"] == "test")]
    order = ["CAM", "GradCAM", "GradCAM++", "ScoreCAM", "Threshold"]
    for subset in ("tumour", "all"):
        c = comp[(comp["subset"] == subset) & (comp["metric"] == "dice")]
        assert list(zip(c["method_a"], c["method_b"])) == list(combinations(order, 2))
        per_patient = test.groupby(["method", "patient_id"])["dice"].mean().unstack("method")
        for r in c.itertuples():
            pair = per_patient[[r.method_a, r.method_b]].dropna()
            assert r.n == len(pair)
            d = pair[r.method_a] - pair[r.method_b]
            if (d != 0).any():
                assert r.pval == pytest.approx(sps.wilcoxon(pair[r.method_a], pair[r.method_b]).pvalue)
            else:
                assert r.pval == 1.0
        p = c["pval"].to_numpy(float)
        k = np.argsort(p)
        adj = np.maximum.accumulate(np.minimum(1, (len(p) - np.arange(len(p))) * p[k]))
        np.testing.assert_allclose(c["pval_holm"].to_numpy(float)[k], adj)


def test_run_json_records_the_run(finished_run):
    out, run = finished_run
    rec = json.loads((out / "run.json").read_text())
    assert rec["seed"] == 0
    assert set(rec["thresholds"]) >= METHODS
    assert len(rec["classifier"]["sha256"]) == 64 and Path(rec["classifier"]["path"]).exists()
    assert {"torch", "ray", "numpy"} <= set(rec["versions"])
    assert rec["studies"] == {"total": 13, "ok": 12, "failed": 1}
    # one timed block per stage the run went through; the stages do not overlap
    stages = {k: v for k, v in rec["timings"].items() if k != "total_s"}
    assert set(stages) == {"cohort_s", "ray_start_s", "train_s", "classifier_check_s", "tune_s",
                           "score_s", "analyze_s"}
    assert all(v > 0 for v in stages.values())
    assert sum(stages.values()) <= rec["timings"]["total_s"]
    grid = pd.read_parquet(out / "tune" / "grid.parquet")
    # The paper's 10 t values x the small preset's q grid (20..99, 80 values; the paper's is 20..50).
    th = json.loads((out / "thresholds.json").read_text())
    assert np.allclose(th["q_grid"], np.linspace(20, 99, 80)) and len(th["t_grid"]) == 10
    # ... per Algorithm-1 variant searched (default: the paper's percentile and the max rule)
    assert th["cam_variants"] == [["none", "percentile"], ["none", "max"]]
    assert len(grid[grid["method"] == "CAM"]) == 10 * 80 * 2
    cam = th["methods"]["CAM"]
    assert [cam["grow"], cam["q_rule"]] in th["cam_variants"]
    assert cam["val_dice"] == pytest.approx(max(cam["val_dice_by_variant"].values()))
