"""wsseg_core.report.methods_table: every method's numbers beside the papers', from hand-made rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from wsseg_core.report import PAPER_RESULTS, format_methods_table, methods_table
from wsseg_core.stats import icc_table, summarize


def _rows() -> pd.DataFrame:
    rows = []
    # UNet: Dice 0.6, 0.8, 0.9 and one negative study (NaN Dice); MTV pred = true + 1, 2, 3, 0 ml.
    for i, (d, t, p) in enumerate([(0.6, 10.0, 11.0), (0.8, 20.0, 22.0), (0.9, 40.0, 43.0),
                                   (np.nan, 0.0, 0.0)]):
        rows.append({"patient_id": f"P{i}", "method": "UNet", "status": "ok", "dice": d,
                     "mtv_true_ml": t, "mtv_pred_ml": p, "tlg_true_g": 5 * t, "tlg_pred_g": 5 * p,
                     "n_ref_lesions": 2 if t else 0, "n_ref_detected": [1, 2, 2, 0][i],
                     "n_pred_lesions": 2, "n_pred_false": [0, 0, 1, 2][i]})
    # A method no paper reports, and a failed row that must not count.
    rows.append({**rows[0], "method": "Mine", "dice": 0.5})
    rows.append({**rows[1], "method": "UNet", "status": "failed", "dice": 0.0, "patient_id": "P9"})
    return pd.DataFrame(rows)


def test_methods_table_numbers_against_hand_computed_values():
    df = _rows()
    t = methods_table(summarize(df), icc_table(df))
    assert list(t["method"]) == ["UNet", "Mine"]
    u = t.iloc[0]
    assert u["n_dice"] == 3
    assert math.isclose(u["dice_median"], 0.8)
    assert math.isclose(u["dice_iqr"], 0.85 - 0.7)  # linear percentiles of 0.6, 0.8, 0.9
    assert math.isclose(u["abs_dmtv_median_ml"], 1.5)  # |dMTV| 1, 2, 3, 0 -> median 1.5
    assert math.isclose(u["detection_rate"], 5 / 6)  # pooled: 1 + 2 + 2 of 2 + 2 + 2
    assert math.isclose(u["false_lesions_per_study"], 0.75)
    # ICC(2,1) by hand (Shrout-Fleiss): targets t_i + p_i, raters true/pred.
    y = np.array([[10, 11], [20, 22], [40, 43], [0, 0]], float)
    n, k = y.shape
    gm = y.mean()
    msr = k * ((y.mean(1) - gm) ** 2).sum() / (n - 1)
    msc = n * ((y.mean(0) - gm) ** 2).sum() / (k - 1)
    sse = ((y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + gm) ** 2).sum()
    mse = sse / ((n - 1) * (k - 1))
    icc = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    assert math.isclose(u["icc_mtv"], icc, rel_tol=1e-9)
    assert u["icc_mtv_n"] == 4
    assert (u["paper_dice"], u["paper_dice_iqr"], u["paper_abs_dmtv_ml"], u["paper_icc_mtv"]) == (
        0.72, 0.36, 17.0, 0.94)  # Früh et al.: U-Net median Dice 0.72 (IQR 0.36), 17 ml, ICC 0.94
    mine = t.iloc[1]
    assert math.isnan(mine["paper_dice"]) and mine["paper_source"] == ""


def test_methods_table_picks_the_requested_icc_subset_and_formats():
    df = _rows()
    icc = icc_table(df)
    both = pd.concat([icc.assign(subset="all"), icc.assign(subset="tumour", icc=0.123)])
    t = methods_table(summarize(df), both, subset="tumour")
    assert math.isclose(t.iloc[0]["icc_mtv"], 0.123)
    md = format_methods_table(t).splitlines()
    assert len(md) == 2 + 2
    assert md[2].startswith("| UNet | 3 | 0.80 (0.15) | 0.72 (0.36) | 1.5 | 17 | 0.12 (4) | 0.94 | 83 % | 0.8 |")
    assert md[3].startswith("| Mine | 1 | 0.50 (0.00) | n/a | 1.0 | n/a |")


def test_paper_results_cover_all_eight_methods():
    from wsseg_core.stats import METHOD_ORDER

    assert set(PAPER_RESULTS) == set(METHOD_ORDER)
