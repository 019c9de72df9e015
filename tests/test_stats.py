"""ICC(2,1) against pingouin's documented example and an independent mean-squares implementation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats as sps

from wsseg_core.stats import icc_agreement, icc_table, summarize


def _icc21_by_hand(x: np.ndarray) -> tuple[float, float, float]:
    """Shrout & Fleiss (1979) ICC(2,1) of an (n targets, k raters) table, with McGraw & Wong's CI.

    Two-way ANOVA without replication: MSR (targets), MSC (raters), MSE (residual).
    ICC = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n).
    """
    n, k = x.shape
    g = x.mean()
    ss_r = k * ((x.mean(axis=1) - g) ** 2).sum()
    ss_c = n * ((x.mean(axis=0) - g) ** 2).sum()
    ss_e = ((x - g) ** 2).sum() - ss_r - ss_c
    msr, msc, mse = ss_r / (n - 1), ss_c / (k - 1), ss_e / ((n - 1) * (k - 1))
    icc = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    # McGraw & Wong (1996), case 2A: Satterthwaite df for the CI of ICC(A,1).
    a, b = k * icc / (n * (1 - icc)), 1 + k * icc * (n - 1) / (n * (1 - icc))
    v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1)))
    fs, fi = sps.f.ppf(0.975, n - 1, v), sps.f.ppf(0.975, v, n - 1)
    low = n * (msr - fs * mse) / (fs * (k * msc + (k * n - k - n) * mse) + n * msr)
    high = n * (fi * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fi * msr)
    return icc, low, high


def test_hand_formula_reproduces_shrout_fleiss_1979():
    # Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; published ICC(2,1) = 0.29.
    sf = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert round(_icc21_by_hand(sf)[0], 2) == 0.29


@pytest.mark.filterwarnings("ignore:.*inplace keyword")
def test_pingouin_documented_wine_example():
    # Ships offline with pingouin; its docstring documents ICC(A,1) = 0.728, CI [0.43, 0.93].
    assert "ICC(A,1)  0.728" in pg.intraclass_corr.__doc__
    data = pg.read_dataset("icc")
    table = pg.intraclass_corr(data=data, targets="Wine", raters="Judge", ratings="Scores")
    row = table.set_index("Type").loc["ICC(A,1)"]
    assert round(row["ICC"], 3) == 0.728
    wide = data.pivot_table(index="Wine", columns="Judge", values="Scores").to_numpy(float)
    icc, low, high = _icc21_by_hand(wide)
    assert icc == pytest.approx(row["ICC"], abs=1e-12)
    assert (round(low, 2), round(high, 2)) == (0.43, 0.93)


def test_icc_agreement_two_raters_matches_hand_formula():
    rng = np.random.default_rng(0)
    true = rng.gamma(2.0, 30.0, 25)
    pred = 0.8 * true + 10 + rng.normal(0, 8, 25)  # bias on purpose: agreement < consistency
    r = icc_agreement(true, pred)
    icc, low, high = _icc21_by_hand(np.column_stack([true, pred]))
    assert r["n"] == 25
    assert r["icc"] == pytest.approx(icc, abs=1e-10)
    # full precision, not pingouin's 2-decimal display rounding
    assert r["ci_low"] == pytest.approx(low, abs=1e-10) and r["ci_high"] == pytest.approx(high, abs=1e-10)
    assert r["ci_low"] < r["icc"] < r["ci_high"]
    assert 0 <= r["pval"] < 1e-6
    assert pg.options["round.column.CI95"] == 2  # global options restored


def test_icc_agreement_nan_handling():
    true = np.array([10.0, 20.0, np.nan, 40.0, 55.0, 60.0])
    pred = np.array([12.0, 18.0, 30.0, np.nan, 50.0, 66.0])
    r = icc_agreement(true, pred)
    ref = icc_agreement(true[[0, 1, 4, 5]], pred[[0, 1, 4, 5]])
    assert r["n"] == 4 and r["icc"] == pytest.approx(ref["icc"])
    small = icc_agreement([1.0, 2.0, np.nan], [1.0, 2.5, 3.0])
    assert small["n"] == 2 and all(math.isnan(small[k]) for k in ("icc", "ci_low", "ci_high", "pval"))
    flat = icc_agreement([5.0] * 4, [5.0] * 4)
    assert flat["n"] == 4 and math.isnan(flat["icc"])
    with pytest.raises(ValueError):
        icc_agreement([1.0, 2.0], [1.0])


def _frame() -> pd.DataFrame:
    rows = [
        # method, status, dice, mtv_true, mtv_pred, tlg_true, tlg_pred
        ("CAM", "ok", 0.2, 10.0, 12.0, 100.0, 90.0),
        ("CAM", "ok", 0.8, 30.0, 40.0, 300.0, 330.0),
        ("CAM", "ok", 0.4, 20.0, 15.0, 200.0, 220.0),
        ("CAM", "ok", np.nan, 0.0, 3.0, 0.0, 6.0),  # tumour-free study: no Dice, still a |dMTV|
        ("CAM", "failed", np.nan, np.nan, np.nan, np.nan, np.nan),
        ("Threshold", "ok", 0.1, 10.0, 50.0, 100.0, 400.0),
        ("Threshold", "ok", 0.3, 30.0, 20.0, 300.0, 250.0),
        ("Threshold", "ok", 0.2, 20.0, 60.0, 200.0, 100.0),
        ("Threshold", "ok", 0.5, 40.0, 45.0, 400.0, 420.0),
        ("Threshold", "ok", np.nan, np.nan, 7.0, np.nan, 21.0),  # unlabeled study
    ]
    cols = ["method", "status", "dice", "mtv_true_ml", "mtv_pred_ml", "tlg_true_g", "tlg_pred_g"]
    return pd.DataFrame(rows, columns=cols)


def test_summarize_by_hand():
    s = summarize(_frame()).set_index("method")
    assert list(s.index) == ["CAM", "Threshold"]
    cam = s.loc["CAM"]
    assert cam["n"] == 4 and cam["n_dice"] == 3
    # Dice 0.2, 0.4, 0.8: median 0.4; q25 = 0.3, q75 = 0.6 -> IQR 0.3
    assert cam["dice_median"] == pytest.approx(0.4) and cam["dice_iqr"] == pytest.approx(0.3)
    # |dMTV| 2, 10, 5, 3 -> sorted 2, 3, 5, 10: median 4; q25 = 2.75, q75 = 6.25 -> IQR 3.5
    assert cam["abs_dmtv_median_ml"] == pytest.approx(4.0) and cam["abs_dmtv_iqr_ml"] == pytest.approx(3.5)
    # |dTLG| 10, 30, 20, 6 -> 6, 10, 20, 30: median 15; q25 = 9, q75 = 22.5 -> IQR 13.5
    assert cam["abs_dtlg_median_g"] == pytest.approx(15.0) and cam["abs_dtlg_iqr_g"] == pytest.approx(13.5)
    thr = s.loc["Threshold"]
    assert thr["n"] == 5 and thr["n_dice"] == 4
    # Dice 0.1, 0.2, 0.3, 0.5: median 0.25; q25 0.175, q75 0.35 -> IQR 0.175
    assert thr["dice_median"] == pytest.approx(0.25) and thr["dice_iqr"] == pytest.approx(0.175)
    # |dMTV| 40, 10, 40, 5 (unlabeled row dropped) -> 5, 10, 40, 40: median 25
    assert thr["abs_dmtv_median_ml"] == pytest.approx(25.0)


def test_summarize_counts_empty_predictions_that_the_distance_medians_leave_out():
    """Issue 18 item 10: an empty prediction has NaN UDE/HD95, so the medians skip it; the summary
    counts such rows instead of letting a method that predicts nothing look precise."""
    df = pd.DataFrame({
        "method": ["A"] * 4, "status": ["ok", "ok", "ok", "failed"],
        "dice": [0.5, 0.0, 0.6, np.nan], "mtv_true_ml": [10.0, 8.0, 5.0, np.nan],
        "mtv_pred_ml": [12.0, 0.0, 4.0, np.nan], "tlg_true_g": [1.0, 1.0, 1.0, np.nan],
        "tlg_pred_g": [1.0, 0.0, 1.0, np.nan], "ude_mm": [4.0, np.nan, 2.0, np.nan]})
    a = summarize(df).set_index("method").loc["A"]
    assert a["n_empty_pred"] == 1  # the failed row is not counted
    assert a["ude_median_mm"] == pytest.approx(3.0)  # over 4 and 2 only
    assert summarize(_frame()).set_index("method").loc["CAM", "n_empty_pred"] == 0


def test_icc_table():
    df = _frame()
    t = icc_table(df)
    assert list(t.columns) == ["method", "quantity", "icc", "ci_low", "ci_high", "pval", "n"]
    assert list(zip(t["method"], t["quantity"])) == [
        ("CAM", "MTV"), ("CAM", "TLG"), ("Threshold", "MTV"), ("Threshold", "TLG")]
    ok = df[(df["status"] == "ok") & (df["method"] == "Threshold")]
    expected = icc_agreement(ok["mtv_true_ml"], ok["mtv_pred_ml"])
    row = t[(t["method"] == "Threshold") & (t["quantity"] == "MTV")].iloc[0]
    assert row["n"] == 4 and row["icc"] == pytest.approx(expected["icc"])
    only = icc_table(df, methods=["UNet"])
    assert len(only) == 2 and (only["n"] == 0).all() and only["icc"].isna().all()


# --- subsets (issue 18 item 2) and paired comparisons between methods (item 6) -------------------

def test_select_subset_keeps_reference_mtv_above_zero():
    from wsseg_core.stats import select_subset

    df = _frame()
    tumour = select_subset(df, "tumour")
    # tumour-free (MTV 0), unlabeled (NaN) and failed (NaN) rows go; the 7 rows with tumour stay
    assert len(tumour) == 7 and (tumour["mtv_true_ml"] > 0).all()
    assert select_subset(df, "all") is df
    with pytest.raises(ValueError, match="subset"):
        select_subset(df, "none")
    # the summary over the tumour subset drops CAM's tumour-free |dMTV| of 3: 2, 5, 10 -> median 5
    s = summarize(tumour).set_index("method")
    assert s.loc["CAM", "n"] == 3 and s.loc["CAM", "abs_dmtv_median_ml"] == pytest.approx(5.0)
    assert s.loc["CAM", "dice_median"] == pytest.approx(0.4)  # Dice is the same in both subsets


def test_holm_by_hand_and_against_pingouin():
    from wsseg_core.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): x4 0.02, x3 0.03, x2 0.06, x1 0.04 -> running max
    # 0.02, 0.03, 0.06, 0.06; back in the input order:
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm(p), pg.multicomp(p, method="holm")[1])
    # NaN is outside the family (m = 2) and stays NaN; the cap at 1
    got = holm([0.01, np.nan, 0.03])
    np.testing.assert_allclose(got, [0.02, np.nan, 0.03])
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])
    rng = np.random.default_rng(3)
    q = rng.uniform(0, 0.2, 12)
    np.testing.assert_allclose(holm(q), pg.multicomp(q, method="holm")[1], rtol=0, atol=1e-15)
    assert holm([]).size == 0


def test_wilcoxon_paired_by_hand_and_against_scipy():
    from wsseg_core.stats import wilcoxon_paired

    a = np.array([0.5, 0.3, 0.6, 0.9, 0.8, np.nan])
    b = np.array([0.2, 0.4, 0.4, 0.5, 0.3, 0.1])
    r = wilcoxon_paired(a, b)
    # differences 0.3, -0.1, 0.2, 0.4, 0.5 (the NaN pair dropped): |d| ranks 3, 1, 2, 4, 5;
    # W- = 1 = the statistic; exact null: 2 of the 32 sign patterns give W- <= 1 -> p = 2 x 2/32
    assert r["n"] == 5 and r["n_nonzero"] == 5
    assert r["statistic"] == 1.0 and r["pval"] == pytest.approx(0.125, abs=1e-12)
    assert r["median_diff"] == pytest.approx(0.3) and r["median_a"] == pytest.approx(0.6)
    assert r["median_b"] == pytest.approx(0.4)
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.5, 0.2, 30), rng.normal(0.4, 0.2, 30)
    ref = sps.wilcoxon(x, y)
    got = wilcoxon_paired(x, y)
    assert got["pval"] == pytest.approx(ref.pvalue, rel=1e-12) and got["statistic"] == ref.statistic
    same = wilcoxon_paired([0.2, 0.3, 0.4], [0.2, 0.3, 0.4])  # identical methods: no evidence
    assert same["pval"] == 1.0 and same["n_nonzero"] == 0 and same["median_diff"] == 0.0
    empty = wilcoxon_paired([np.nan], [0.1])
    assert empty["n"] == 0 and math.isnan(empty["pval"])


def test_paired_comparisons_per_patient_with_holm():
    from wsseg_core.stats import holm, paired_comparisons

    rows = []
    # 6 patients; ScoreCAM beats GradCAM on every patient; CAM equals ScoreCAM except on P5.
    dice = {"GradCAM": [0.1, 0.2, 0.15, 0.3, 0.05, 0.2], "ScoreCAM": [0.4, 0.5, 0.35, 0.6, 0.45, 0.5],
            "CAM": [0.4, 0.5, 0.35, 0.6, 0.25, 0.5]}
    for m, values in dice.items():
        for i, d in enumerate(values):
            rows.append({"patient_id": f"P{i}", "method": m, "status": "ok", "dice": d,
                         "mtv_true_ml": 10.0, "mtv_pred_ml": 10.0 + 10 * (1 - d)})
    # a second study of P0 for ScoreCAM: the patient's Dice is the mean (0.4 + 0.2) / 2 = 0.3
    rows.append({"patient_id": "P0", "method": "ScoreCAM", "status": "ok", "dice": 0.2,
                 "mtv_true_ml": 10.0, "mtv_pred_ml": 18.0})
    rows.append({"patient_id": "P1", "method": "GradCAM", "status": "failed", "dice": np.nan,
                 "mtv_true_ml": np.nan, "mtv_pred_ml": np.nan})
    c = paired_comparisons(pd.DataFrame(rows))
    assert list(zip(c["metric"], c["method_a"], c["method_b"]))[:3] == [
        ("dice", "CAM", "GradCAM"), ("dice", "CAM", "ScoreCAM"), ("dice", "GradCAM", "ScoreCAM")]
    d = c[c["metric"] == "dice"].set_index(["method_a", "method_b"])
    g_s = d.loc[("GradCAM", "ScoreCAM")]
    # per patient GradCAM - ScoreCAM: -0.2 (P0: 0.1 - 0.3), -0.3, -0.2, -0.3, -0.4, -0.3
    assert g_s["n"] == 6 and g_s["median_diff"] == pytest.approx(-0.3) and g_s["better"] == "ScoreCAM"
    ref = sps.wilcoxon([0.1, 0.2, 0.15, 0.3, 0.05, 0.2], [0.3, 0.5, 0.35, 0.6, 0.45, 0.5])
    assert g_s["pval"] == pytest.approx(ref.pvalue)
    # CAM vs ScoreCAM: P0 0.4 - 0.3 = +0.1, P4 0.25 - 0.45 = -0.2, 4 zero differences (dropped)
    c_s = d.loc[("CAM", "ScoreCAM")]
    assert c_s["n"] == 6 and c_s["n_nonzero"] == 2 and c_s["median_diff"] == 0.0
    assert pd.isna(c_s["better"])  # a median difference of 0 favours neither
    np.testing.assert_allclose(d["pval_holm"], holm(d["pval"].to_numpy()))
    assert (d["significant"] == (d["pval_holm"] < 0.05)).all()
    # |dMTV| = 10 (1 - Dice): lower is better, so ScoreCAM again; its own Holm family
    m = c[c["metric"] == "abs_dmtv_ml"].set_index(["method_a", "method_b"])
    assert m.loc[("GradCAM", "ScoreCAM"), "better"] == "ScoreCAM"
    assert m.loc[("GradCAM", "ScoreCAM"), "median_diff"] == pytest.approx(3.0)
    np.testing.assert_allclose(m["pval_holm"], holm(m["pval"].to_numpy()))
    one = paired_comparisons(pd.DataFrame(rows[:6]))  # one method: no pair
    assert one.empty and "pval_holm" in one.columns
