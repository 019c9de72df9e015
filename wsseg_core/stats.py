"""Cohort statistics of the metrics table: ICC(2,1) agreement, per-method median / IQR summaries and
paired comparisons between methods.

Früh et al. 2.3.4: results as median and IQR; "intra-class correlations (two-way, agreement)" between
reference and prediction, i.e. Shrout-Fleiss ICC(2,1) = McGraw-Wong ICC(A,1): two-way random
effects, absolute agreement, single rater; "a global significance level of 0.05". Their results
compare methods ("GradCAM ... showed significantly worse results"): :func:`paired_comparisons`
makes those claims numbers (Wilcoxon signed-rank per patient, Holm-corrected).

Subsets (:data:`SUBSETS`): ``tumour`` keeps the studies whose reference MTV > 0, the patients the
paper's agreement is over (its cohort is patients with cancer); ``all`` keeps every study, so
tumour-free studies (reference MTV 0) add pairs near the origin, which move an ICC or a median
|ΔMTV| without saying anything about how well tumour is measured. Dice is undefined (NaN) for
tumour-free studies, so it is the same in both subsets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["METHOD_ORDER", "SUBSETS", "ALPHA", "icc_agreement", "summarize", "icc_table",
           "select_subset", "holm", "wilcoxon_paired", "per_patient_values", "paired_comparisons"]

#: Display order of the methods; others follow alphabetically.
METHOD_ORDER = ("CAM", "GradCAM", "GradCAM++", "ScoreCAM", "Threshold", "UNet", "MIP-CAM", "BoxFCN")

# pingouin renamed its rows in 0.7 ("ICC2" -> "ICC(A,1)") and its CI column once ("CI95%" -> "CI95").
_ICC2_TYPES = ("ICC(A,1)", "ICC2")
_CI_COLUMNS = ("CI95", "CI95%")

#: Study subsets of every table: tumour-bearing studies (reference MTV > 0; the default shown) and all.
SUBSETS = ("tumour", "all")
#: Früh et al.'s global significance level (2.3.4), applied to the Holm-adjusted p-values.
ALPHA = 0.05

_QUANTITIES = {"MTV": ("mtv_true_ml", "mtv_pred_ml"), "TLG": ("tlg_true_g", "tlg_pred_g")}


def _finite_pairs(a, b, names: str) -> tuple[np.ndarray, np.ndarray]:
    """Two paired 1-D float arrays with every pair holding a NaN/inf dropped; ValueError naming
    them (`names`) when their lengths differ."""
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{names} differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


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
    a, b = _finite_pairs(y_true, y_pred, "y_true and y_pred")
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
        Last ``n_empty_pred``: ok rows whose predicted mask is empty (``mtv_pred_ml == 0``). Their
        HD95 and UDE are NaN (no surface) and so left out of those medians, which would otherwise
        flatter a method that predicts nothing; the count says how many rows the medians miss.
    """
    ok = _ok_rows(df)
    columns = [
        "method", "n", "n_dice", "dice_median", "dice_iqr",
        "abs_dmtv_median_ml", "abs_dmtv_iqr_ml", "abs_dtlg_median_g", "abs_dtlg_iqr_g",
        "fpv_median_ml", "fpv_iqr_ml", "fnv_median_ml", "fnv_iqr_ml", "hd95_median_mm", "hd95_iqr_mm",
        "ude_median_mm", "ude_iqr_mm", "detection_rate", "false_lesions_per_study", "n_empty_pred",
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
        extra.append(int((pd.to_numeric(g["mtv_pred_ml"], errors="coerce") == 0).sum()))
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


def select_subset(df: pd.DataFrame, subset: str) -> pd.DataFrame:
    """The rows of one :data:`SUBSETS` entry: ``"tumour"`` keeps rows whose reference MTV
    (``mtv_true_ml``) is > 0 (unlabelled studies, NaN, and tumour-free ones, 0, go); ``"all"``
    keeps every row."""
    if subset == "all":
        return df
    if subset == "tumour":
        return df[pd.to_numeric(df["mtv_true_ml"], errors="coerce") > 0]
    raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")


def holm(pvals: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaNs are left out of the family and stay NaN.

    Sorted ascending p_(1) <= ... <= p_(m) of the m finite values:
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), returned in the input order. Rejecting
    adj < alpha controls the family-wise error rate at alpha under any dependence between the tests.
    """
    p = np.asarray(pvals, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def wilcoxon_paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray
                    ) -> dict[str, float | int]:
    """Two-sided Wilcoxon signed-rank test of the paired differences a - b (``scipy.stats.wilcoxon``,
    its defaults: zero differences dropped (Wilcoxon's own rule), exact distribution for small n
    without ties, normal approximation otherwise).

    Pairs with a NaN in either are dropped. Returns ``dict(n, n_nonzero, median_a, median_b,
    median_diff, statistic, pval)``: ``median_diff`` is the median of the per-pair differences a - b
    (not the difference of the medians). No pair: NaNs. No pair differs (every difference 0):
    p = 1 and statistic 0, as scipy gives, without calling it (nothing contradicts "no difference").
    """
    from scipy import stats as sps

    x, y = _finite_pairs(a, b, "a and b")
    d = x - y
    nan = float("nan")
    res: dict[str, float | int] = {"n": int(d.size), "n_nonzero": int(np.count_nonzero(d)),
                                   "median_a": nan, "median_b": nan, "median_diff": nan,
                                   "statistic": nan, "pval": nan}
    if d.size == 0:
        return res
    res.update(median_a=float(np.median(x)), median_b=float(np.median(y)), median_diff=float(np.median(d)))
    if not np.any(d):
        res.update(statistic=0.0, pval=1.0)
        return res
    r = sps.wilcoxon(x, y)
    res.update(statistic=float(r.statistic), pval=float(r.pvalue))
    return res


#: Metrics compared between methods: name -> (how a study's value is computed, higher is better).
_COMPARED = ("dice", "abs_dmtv_ml")


def per_patient_values(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per (method, patient): the mean over the patient's ok studies with a finite value.

    ``metric``: ``"dice"`` or ``"abs_dmtv_ml"`` (|MTV pred - true|, ml). Per patient because a
    patient's studies are not independent, and the signed-rank test needs independent pairs (Früh et
    al. also report Dice per subject). Returns a frame indexed by patient_id, one column per method.
    """
    ok = _ok_rows(df)
    if metric == "dice":
        v = pd.to_numeric(ok["dice"], errors="coerce")
    elif metric == "abs_dmtv_ml":
        v = (pd.to_numeric(ok["mtv_pred_ml"], errors="coerce")
             - pd.to_numeric(ok["mtv_true_ml"], errors="coerce")).abs()
    else:
        raise ValueError(f"metric must be one of {_COMPARED}, got {metric!r}")
    long = pd.DataFrame({"method": ok["method"].astype(str).to_numpy(),
                         "patient_id": ok["patient_id"].astype(str).to_numpy(),
                         "value": v.astype(float).to_numpy()}).dropna(subset=["value"])
    wide = long.groupby(["patient_id", "method"])["value"].mean().unstack("method")
    return wide.reindex(columns=_ordered_methods(ok["method"].astype(str)))


def paired_comparisons(df: pd.DataFrame, metrics: Sequence[str] = _COMPARED,
                       alpha: float = ALPHA) -> pd.DataFrame:
    """Every pair of methods compared patient by patient, per metric, Holm-corrected.

    For each metric (Dice; |ΔMTV| in ml) and each pair (A, B) of methods (A before B in
    ``METHOD_ORDER``), the patients with a value for both (:func:`per_patient_values`) are compared
    with :func:`wilcoxon_paired`. The Holm family is one metric's pairs: each metric asks its own
    question (which method segments better; which measures volume better), and within it every pair
    is a claim the report could make.

    Returns rows ``metric, method_a, method_b, n`` (patients paired), ``n_nonzero, median_a,
    median_b, median_diff`` (median over patients of A - B), ``statistic`` (W), ``pval,
    pval_holm``, ``better`` (the method the median difference favours: higher Dice, lower |ΔMTV|;
    None on a tie or without pairs) and ``significant`` (``pval_holm < alpha``).
    """
    columns = ["metric", "method_a", "method_b", "n", "n_nonzero", "median_a", "median_b",
               "median_diff", "statistic", "pval", "pval_holm", "better", "significant"]
    blocks = []
    for metric in metrics:
        wide = per_patient_values(df, metric)
        methods = list(wide.columns)
        rows = []
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                r = wilcoxon_paired(wide[a].to_numpy(float), wide[b].to_numpy(float))
                md = r["median_diff"]
                sign = md if metric == "dice" else -md  # > 0: A is better
                better = None if not np.isfinite(sign) or sign == 0 else (a if sign > 0 else b)
                rows.append({"metric": metric, "method_a": a, "method_b": b, **r, "better": better})
        block = pd.DataFrame(rows, columns=[c for c in columns if c not in ("pval_holm", "significant")])
        block["pval_holm"] = holm(block["pval"].to_numpy(float)) if len(block) else []
        block["significant"] = block["pval_holm"] < alpha
        blocks.append(block)
    if not blocks:
        return pd.DataFrame(columns=columns)
    out = pd.concat(blocks, ignore_index=True)[columns]
    return out.astype({"n": int, "n_nonzero": int, "significant": bool})
