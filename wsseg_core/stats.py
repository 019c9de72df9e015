"""Cohort statistics of the metrics table: ICC(2,1) agreement and per-method median / IQR summaries.

Früh et al. 2.3.4: results as median and IQR; "intra-class correlations (two-way, agreement)" between
reference and prediction, i.e. Shrout-Fleiss ICC(2,1) = McGraw-Wong ICC(A,1): two-way random
effects, absolute agreement, single rater.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["METHOD_ORDER", "icc_agreement", "summarize", "icc_table"]

#: Display order of the methods; others follow alphabetically.
METHOD_ORDER = ("CAM", "GradCAM", "GradCAM++", "ScoreCAM", "Threshold", "UNet", "MIP-CAM", "BoxFCN")

# pingouin renamed its rows in 0.7 ("ICC2" -> "ICC(A,1)") and its CI column once ("CI95%" -> "CI95").
_ICC2_TYPES = ("ICC(A,1)", "ICC2")
_CI_COLUMNS = ("CI95", "CI95%")

_QUANTITIES = {"MTV": ("mtv_true_ml", "mtv_pred_ml"), "TLG": ("tlg_true_g", "tlg_pred_g")}


def _nan_icc(n: int) -> dict[str, float | int]:
    nan = float("nan")
    return {"icc": nan, "ci_low": nan, "ci_high": nan, "pval": nan, "n": int(n)}


def icc_agreement(
    y_true: Sequence[float] | np.ndarray, y_pred: Sequence[float] | np.ndarray
) -> dict[str, float | int]:
    """Shrout-Fleiss ICC(2,1) of prediction vs reference, via ``pingouin.intraclass_corr``.

    Two raters (reference, prediction), one rating each per study. Pairs with a NaN in either are
    dropped.

    Args:
        y_true, y_pred: ``(n,)`` paired values (e.g. MTV in ml or TLG in g).

    Returns:
        ``dict(icc, ci_low, ci_high, pval, n)``: the 95 % CI at full precision (pingouin rounds it to
        2 decimals by default), the p-value of the F test of H0 "ICC = 0" (F = MSR / MSE), and the
        number of pairs used. With fewer than 3 pairs or no variance at all (every value equal)
        the ICC is undefined: NaNs, with n still reported.
    """
    a = np.asarray(y_true, dtype=float).ravel()
    b = np.asarray(y_pred, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"y_true and y_pred differ in length: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < 3:
        return _nan_icc(n)
    both = np.concatenate([a, b])
    if np.ptp(both) == 0:
        return _nan_icc(n)

    import pingouin as pg

    long = pd.DataFrame(
        {
            "target": np.tile(np.arange(n), 2),
            "rater": np.repeat(["true", "pred"], n),
            "rating": both,
        }
    )
    saved = dict(pg.options)
    try:
        for key in _CI_COLUMNS:
            pg.options[f"round.column.{key}"] = None
        pg.options["round"] = None
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # Degenerate but non-constant data (e.g. one rater constant) give 0/0 in the CI terms.
            warnings.simplefilter("ignore", RuntimeWarning)
            # pingouin 0.7 calls a pandas API deprecated in pandas 3.1; not ours to act on.
            warnings.filterwarnings("ignore", message=".*inplace keyword.*")
            table = pg.intraclass_corr(data=long, targets="target", raters="rater", ratings="rating")
    finally:
        pg.options.clear()
        pg.options.update(saved)

    rows = table[table["Type"].isin(_ICC2_TYPES)]
    if rows.empty:
        raise RuntimeError(f"pingouin.intraclass_corr returned no ICC(2,1) row: {list(table['Type'])}")
    row = rows.iloc[0]
    ci_col = next((c for c in _CI_COLUMNS if c in table.columns), None)
    ci = np.asarray(row[ci_col], dtype=float) if ci_col else np.array([np.nan, np.nan])
    return {
        "icc": float(row["ICC"]),
        "ci_low": float(ci[0]),
        "ci_high": float(ci[1]),
        "pval": float(row["pval"]),
        "n": n,
    }


def _ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    missing = {"method", "status"} - set(df.columns)
    if missing:
        raise ValueError(f"metrics frame lacks columns {sorted(missing)}")
    return df[df["status"] == "ok"]


def _ordered_methods(present: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(present))
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(m for m in present if m not in METHOD_ORDER)


def _median_iqr(x: pd.Series | np.ndarray) -> tuple[float, float]:
    v = np.asarray(x, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return float(q50), float(q75 - q25)


def _numeric(g: pd.DataFrame, col: str) -> np.ndarray:
    """A column as float (nullable ints -> NaN), or all NaN when the frame lacks it (older runs)."""
    if col not in g.columns:
        return np.full(len(g), np.nan)
    return pd.to_numeric(g[col], errors="coerce").astype(float).to_numpy()


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Median and IQR (q75 - q25, linear percentiles) per method, over the ``status == "ok"`` rows.

    Args:
        df: metrics rows with at least ``method, status, dice, mtv_true_ml, mtv_pred_ml,
            tlg_true_g, tlg_pred_g``.

    Returns:
        One row per method (``METHOD_ORDER`` first): ``method, n`` (ok rows), ``n_dice`` (rows with
        a finite Dice), ``dice_median, dice_iqr``, ``abs_dmtv_median_ml, abs_dmtv_iqr_ml`` (|MTV
        pred - true|, ml), ``abs_dtlg_median_g, abs_dtlg_iqr_g`` (|TLG pred - true|, g). NaN
        values (no reference, empty reference for Dice) are left out of each statistic.
        Then, from the optional autoPET / lesion-wise columns (NaN where ``df`` lacks them):
        ``fpv_median_ml, fpv_iqr_ml, fnv_median_ml, fnv_iqr_ml`` (ml), ``hd95_median_mm,
        hd95_iqr_mm``, ``ude_median_mm, ude_iqr_mm`` (mm), ``detection_rate`` (reference lesions hit / reference lesions, pooled
        over studies) and ``false_lesions_per_study`` (mean predicted components hitting nothing).
    """
    ok = _ok_rows(df)
    columns = [
        "method", "n", "n_dice", "dice_median", "dice_iqr",
        "abs_dmtv_median_ml", "abs_dmtv_iqr_ml", "abs_dtlg_median_g", "abs_dtlg_iqr_g",
        "fpv_median_ml", "fpv_iqr_ml", "fnv_median_ml", "fnv_iqr_ml", "hd95_median_mm", "hd95_iqr_mm",
        "ude_median_mm", "ude_iqr_mm", "detection_rate", "false_lesions_per_study",
    ]
    rows = []
    for method in _ordered_methods(ok["method"].astype(str)):
        g = ok[ok["method"] == method]
        d = pd.to_numeric(g["dice"], errors="coerce")
        dmtv = (pd.to_numeric(g["mtv_pred_ml"]) - pd.to_numeric(g["mtv_true_ml"])).abs()
        dtlg = (pd.to_numeric(g["tlg_pred_g"]) - pd.to_numeric(g["tlg_true_g"])).abs()
        dm, di = _median_iqr(d)
        mm, mi = _median_iqr(dmtv)
        tm, ti = _median_iqr(dtlg)
        extra: list[float] = []
        for col in ("fpv_ml", "fnv_ml", "hd95_mm", "ude_mm"):
            extra.extend(_median_iqr(_numeric(g, col)))
        n_ref, n_hit = _numeric(g, "n_ref_lesions"), _numeric(g, "n_ref_detected")
        both = np.isfinite(n_ref) & np.isfinite(n_hit)
        # pooled, not a mean of per-study rates: a study with 20 lesions weighs more than one with 1
        extra.append(float(n_hit[both].sum() / n_ref[both].sum()) if n_ref[both].sum() > 0 else float("nan"))
        n_false = _numeric(g, "n_pred_false")
        n_false = n_false[np.isfinite(n_false)]
        extra.append(float(n_false.mean()) if n_false.size else float("nan"))
        rows.append([method, int(len(g)), int(np.isfinite(d.to_numpy(float)).sum()),
                     dm, di, mm, mi, tm, ti, *extra])
    return pd.DataFrame(rows, columns=columns)


def icc_table(df: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """ICC(2,1) of MTV and TLG, reference vs prediction, per method (``status == "ok"`` rows).

    Args:
        df: metrics rows (``method, status, mtv_true_ml, mtv_pred_ml, tlg_true_g, tlg_pred_g``).
        methods: methods to report, in this order; None: every method present.

    Returns:
        Rows ``method, quantity`` (``"MTV"`` or ``"TLG"``), ``icc, ci_low, ci_high, pval, n``.
        A requested method without rows gets NaNs with n = 0.
    """
    ok = _ok_rows(df)
    if methods is None:
        methods = _ordered_methods(ok["method"].astype(str))
    rows = []
    for method in methods:
        g = ok[ok["method"] == method]
        for quantity, (true_col, pred_col) in _QUANTITIES.items():
            r = icc_agreement(pd.to_numeric(g[true_col]).to_numpy(float),
                              pd.to_numeric(g[pred_col]).to_numpy(float))
            rows.append({"method": method, "quantity": quantity, **r})
    return pd.DataFrame(rows, columns=["method", "quantity", "icc", "ci_low", "ci_high", "pval", "n"])
