"""Figures (PNG), drawn with matplotlib's Agg canvas: no display and no global backend switch.

Orientation: volumes are ``(X, Y, Z)`` in LAS, so the x index runs toward the patient's left, y toward
anterior and z toward the head. Figures use the radiological convention (patient's right on the
image's left, which is x index 0), head at the top of coronal views, anterior at the top of axial views.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _largest_lesion_slice(seg: np.ndarray) -> int:
    """Axial index through the centre of the largest connected SEG component (middle slice if empty)."""
    if not seg.any():
        return seg.shape[2] // 2
    from scipy import ndimage

    lab, n = ndimage.label(seg > 0)
    sizes = np.bincount(lab.ravel())[1:]
    zs = np.flatnonzero((lab == int(np.argmax(sizes)) + 1).any(axis=(0, 1)))
    return int(zs[len(zs) // 2])


def _save_atomic(fig, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from wsseg_core.storage import atomic_path

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def phantom_figure(
    suv: np.ndarray,
    ct: np.ndarray,
    seg: np.ndarray | None,
    spacing_mm: Sequence[float],
    path: str | os.PathLike,
    title: str | None = None,
    suv_max: float = 10.0,
    z: int | None = None,
) -> Path:
    """Three panels of one study, written atomically as a PNG; returns the path.

    1. coronal maximum-intensity projection of SUV (max over the anterior-posterior y axis), inverted
       grey scale 0..``suv_max`` SUV, with the SEG projection's outline in red;
    2. the axial PET slice through the largest lesion (middle slice if SEG is empty) with SEG outline;
    3. the same axial CT slice, soft-tissue window (-160..240 HU), with SEG outline.

    ``z`` overrides the axial slice index. Aspect ratios come from ``spacing_mm`` (mm), so anisotropic voxels are displayed true to size.
    """
    from matplotlib.figure import Figure

    suv = np.asarray(suv, dtype=np.float32)
    ct = np.asarray(ct, dtype=np.float32)
    seg = np.zeros(suv.shape, dtype=np.uint8) if seg is None else (np.asarray(seg) > 0)
    if suv.ndim != 3 or suv.shape != ct.shape or suv.shape != seg.shape:
        raise ValueError(f"suv, ct, seg must be 3D of one shape, got {suv.shape}, {ct.shape}, {seg.shape}")
    sx, sy, sz = (float(s) for s in spacing_mm)
    X, Y, Z = suv.shape
    z = _largest_lesion_slice(seg) if z is None else int(np.clip(z, 0, Z - 1))

    # extents in mm; origin="lower" puts high z (head) and high y (anterior) at the top
    cor_ext = (0.0, X * sx, 0.0, Z * sz)
    ax_ext = (0.0, X * sx, 0.0, Y * sy)
    fig = Figure(figsize=(13.0, 5.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [X * sx / (Z * sz), X * sx / (Y * sy), X * sx / (Y * sy)]})

    a0 = axes[0]
    a0.imshow(suv.max(axis=1).T, origin="lower", extent=cor_ext, cmap="gray_r", vmin=0.0, vmax=suv_max,
              interpolation="nearest")
    if seg.any():
        a0.contour(seg.max(axis=1).T.astype(float), levels=[0.5], colors="red", linewidths=0.8,
                   origin="lower", extent=cor_ext)
    a0.axhline((z + 0.5) * sz, color="tab:blue", lw=0.6, ls="--")
    a0.set_title(f"coronal SUV MIP (0-{suv_max:g})")

    for ax, img, kw, name in (
        (axes[1], suv[:, :, z], dict(cmap="gray_r", vmin=0.0, vmax=suv_max), "PET"),
        (axes[2], ct[:, :, z], dict(cmap="gray", vmin=-160.0, vmax=240.0), "CT"),
    ):
        ax.imshow(img.T, origin="lower", extent=ax_ext, interpolation="nearest", **kw)
        if seg[:, :, z].any():
            ax.contour(seg[:, :, z].T.astype(float), levels=[0.5], colors="red", linewidths=0.8,
                       origin="lower", extent=ax_ext)
        ax.set_title(f"axial {name}, slice z={z}")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_xlabel("R  <-  x  ->  L")
    axes[1].set_xlabel("R  <-  x  ->  L   (anterior up)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, out, dpi=110)
    return out


def cam_figure(
    suv_slice: np.ndarray,
    ct_slice: np.ndarray,
    seg_slice: np.ndarray | None,
    cams: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    path: str | os.PathLike,
    title: str | None = None,
    suv_max: float = 10.0,
) -> Path:
    """Früh et al. Fig. 4 for one axial slice: PET with the reference contour, each method's CAM
    (upsampled bilinearly to the slice, for display) over the PET, its Algorithm 1 mask, and CT.

    Args:
        suv_slice, ct_slice, seg_slice: (X, Y) SUV (g/ml), CT (HU), reference mask or None.
        cams: method -> (h, w) normalised CAM in [0, 1].
        masks: method -> (X, Y) boolean segmentation of that method.
    """
    import torch
    from matplotlib.figure import Figure

    suv_slice = np.asarray(suv_slice, dtype=np.float32)
    X, Y = suv_slice.shape
    seg = np.zeros((X, Y), bool) if seg_slice is None else np.asarray(seg_slice) > 0
    methods = list(cams)
    fig = Figure(figsize=(2.6 * (len(methods) + 2), 5.4))
    axes = fig.subplots(2, len(methods) + 2, squeeze=False)

    def show(ax, img, **kw):
        ax.imshow(np.asarray(img).T, origin="lower", interpolation="nearest", **kw)
        if seg.any():
            ax.contour(seg.T.astype(float), levels=[0.5], colors="red", linewidths=0.7, origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])

    show(axes[0, 0], suv_slice, cmap="gray_r", vmin=0, vmax=suv_max)
    axes[0, 0].set_title("PET + reference", fontsize=9)
    show(axes[1, 0], ct_slice, cmap="gray", vmin=-160, vmax=240)
    axes[1, 0].set_title("CT", fontsize=9)
    for i, m in enumerate(methods, start=1):
        up = torch.nn.functional.interpolate(torch.as_tensor(cams[m], dtype=torch.float32)[None, None],
                                             size=(X, Y), mode="bilinear", align_corners=False)[0, 0].numpy()
        show(axes[0, i], suv_slice, cmap="gray_r", vmin=0, vmax=suv_max)
        axes[0, i].imshow(up.T, origin="lower", cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[0, i].set_title(m, fontsize=9)
        show(axes[1, i], masks[m], cmap="Blues", vmin=0, vmax=1)
        axes[1, i].set_title(f"{m} mask", fontsize=9)
    axes[0, -1].axis("off")
    axes[1, -1].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, out, dpi=100)
    return out


# --- cohort figures (Früh et al. Figs. 5-7, Table 1) and the HTML report ---------------------------

_QUANTITY_COLUMNS = {"MTV": ("mtv_true_ml", "mtv_pred_ml", "ml"), "TLG": ("tlg_true_g", "tlg_pred_g", "g")}


def _methods_of(df) -> list[str]:
    from wsseg_core.stats import METHOD_ORDER

    present = list(dict.fromkeys(df["method"].astype(str)))
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def _ok(df):
    return df[df["status"] == "ok"] if "status" in df.columns else df


def _finish(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, out, dpi=dpi)
    return out


def per_patient_dice(df) -> "pd.DataFrame":  # noqa: F821
    """Mean Dice per (method, patient) over the patient's studies with a finite Dice.

    Früh et al. report per-patient Dice; a patient with several studies counts once.
    Returns columns ``method, patient_id, dice``.
    """
    import pandas as pd

    ok = _ok(df)
    d = ok.assign(dice=pd.to_numeric(ok["dice"], errors="coerce")).dropna(subset=["dice"])
    return d.groupby(["method", "patient_id"], as_index=False)["dice"].mean()


def dice_boxplot(df, path: str | os.PathLike, title: str | None = None) -> Path | None:
    """Box plot of per-patient Dice per method, with the patients as jittered points (Fig. 5).

    Returns the PNG path, or None when no method has a finite Dice (nothing to draw).
    """
    from matplotlib.figure import Figure

    pp = per_patient_dice(df)
    methods = [m for m in _methods_of(df) if (pp["method"] == m).any()]
    if not methods:
        return None
    data = [pp.loc[pp["method"] == m, "dice"].to_numpy(float) for m in methods]
    fig = Figure(figsize=(1.4 * len(methods) + 2.0, 4.2))
    ax = fig.subplots()
    ax.boxplot(data, showfliers=False, widths=0.55)
    ax.set_xticks(range(1, len(methods) + 1), labels=methods)
    rng = np.random.default_rng(0)  # fixed jitter: the same run gives the same picture
    for i, v in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=12, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per patient")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Per-patient Dice")
    return _finish(fig, path)


def _quantity_pairs(df, quantity: str):
    import pandas as pd

    true_col, pred_col, unit = _QUANTITY_COLUMNS[quantity]
    ok = _ok(df)
    for m in _methods_of(ok):
        g = ok[ok["method"] == m]
        t = pd.to_numeric(g[true_col], errors="coerce").to_numpy(float)
        p = pd.to_numeric(g[pred_col], errors="coerce").to_numpy(float)
        keep = np.isfinite(t) & np.isfinite(p)
        yield m, t[keep], p[keep], unit


def agreement_scatter(df, quantity: str, path: str | os.PathLike, icc=None) -> Path | None:
    """True vs estimated MTV (ml) or TLG (g), one panel per method, with the identity line (Figs. 6-7).

    Args:
        df: metrics rows; quantity: ``"MTV"`` or ``"TLG"``;
        icc: optional ``stats.icc_table`` frame; its ICC is printed in each panel's title.
    Returns the PNG path, or None when no method has a pair to plot.
    """
    from matplotlib.figure import Figure

    panels = [p for p in _quantity_pairs(df, quantity) if p[1].size]
    if not panels:
        return None
    fig = Figure(figsize=(3.3 * len(panels), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (m, t, p, unit) in zip(axes, panels):
        hi = float(max(t.max(), p.max(), 1e-6)) * 1.05
        ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="identity")
        ax.scatter(t, p, s=16, alpha=0.75, color="tab:blue")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"reference {quantity} ({unit})")
        ax.set_ylabel(f"estimated {quantity} ({unit})")
        label = m
        if icc is not None:
            r = icc[(icc["method"] == m) & (icc["quantity"] == quantity)]
            if len(r) and np.isfinite(r["icc"].iloc[0]):
                label += f"  ICC {r['icc'].iloc[0]:.2f}"
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{quantity}: reference vs estimate (n = studies)", fontsize=10)
    return _finish(fig, path)


def bland_altman(df, quantity: str, path: str | os.PathLike) -> Path | None:
    """Bland-Altman plots of MTV (ml) or TLG (g), one panel per method: mean of reference and
    estimate vs their difference (estimate - reference), with the bias and the 95 % limits of
    agreement (bias +- 1.96 SD). Returns the PNG path, or None when nothing can be plotted."""
    from matplotlib.figure import Figure

    panels = [p for p in _quantity_pairs(df, quantity) if p[1].size]
    if not panels:
        return None
    fig = Figure(figsize=(3.3 * len(panels), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (m, t, p, unit) in zip(axes, panels):
        mean, diff = (t + p) / 2.0, p - t
        bias = float(diff.mean())
        sd = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        ax.scatter(mean, diff, s=16, alpha=0.75, color="tab:blue")
        ax.axhline(bias, color="tab:red", lw=1, label=f"bias {bias:.1f}")
        for lim in (bias - 1.96 * sd, bias + 1.96 * sd):
            ax.axhline(lim, color="tab:red", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(f"mean {quantity} ({unit})")
        ax.set_ylabel(f"estimate - reference ({unit})")
        ax.set_title(f"{m}  bias {bias:.1f}, LoA ±{1.96 * sd:.1f}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{quantity}: Bland-Altman", fontsize=10)
    return _finish(fig, path)


def _fmt_med(med: float, iqr: float, digits: int) -> str:
    if not np.isfinite(med):
        return "n/a"
    return f"{med:.{digits}f} ({iqr:.{digits}f})"


def _fmt_icc(r) -> tuple[str, str]:
    if r is None or not np.isfinite(r["icc"]):
        return "n/a", "n/a"
    p = "<0.001" if r["pval"] < 0.001 else f"{r['pval']:.3f}"
    return f"{r['icc']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]", p


def table1_frame(summary, icc) -> "pd.DataFrame":  # noqa: F821
    """Früh et al. Table 1 as display strings: per method n, Dice, |dMTV|, |dTLG| as median (IQR),
    and the ICC(2,1) of MTV and TLG with 95 % CI and p-value."""
    import pandas as pd

    by = {(r["method"], r["quantity"]): r for _, r in icc.iterrows()}
    rows = []
    for _, s in summary.iterrows():
        mtv, p_mtv = _fmt_icc(by.get((s["method"], "MTV")))
        tlg, p_tlg = _fmt_icc(by.get((s["method"], "TLG")))
        rows.append({"method": s["method"], "n": int(s["n"]),
                     "Dice median (IQR)": _fmt_med(s["dice_median"], s["dice_iqr"], 2),
                     "|ΔMTV| ml median (IQR)": _fmt_med(s["abs_dmtv_median_ml"], s["abs_dmtv_iqr_ml"], 1),
                     "|ΔTLG| g median (IQR)": _fmt_med(s["abs_dtlg_median_g"], s["abs_dtlg_iqr_g"], 1),
                     "ICC MTV [95% CI]": mtv, "p (MTV)": p_mtv, "ICC TLG [95% CI]": tlg, "p (TLG)": p_tlg})
    return pd.DataFrame(rows)


def comparisons_html(comparisons) -> str:
    """``stats.paired_comparisons`` rows of one subset as an HTML table with a note on the test:
    per pair of methods and metric, the median per-patient difference (A - B), the Wilcoxon p, the
    Holm-adjusted p and which method the median favours."""
    import pandas as pd

    if comparisons is None or len(comparisons) == 0:
        return "<p class='note'>Fewer than two methods with rows: nothing to compare.</p>"

    def p(v) -> str:
        return "n/a" if pd.isna(v) else ("<0.001" if v < 0.001 else f"{v:.3f}")

    names = {"dice": "Dice", "abs_dmtv_ml": "|ΔMTV| ml"}
    rows = []
    for r in comparisons.itertuples():
        digits = 3 if r.metric == "dice" else 1
        rows.append({"metric": names.get(r.metric, r.metric), "A vs B": f"{r.method_a} vs {r.method_b}",
                     "patients": int(r.n), "median A": _fmt_num(r.median_a, digits),
                     "median B": _fmt_num(r.median_b, digits),
                     "median A − B": _fmt_num(r.median_diff, digits, sign=True),
                     "p": p(r.pval), "p (Holm)": p(r.pval_holm),
                     "better": ("—" if pd.isna(r.better) else r.better) + (" *" if r.significant else "")})
    return (html_table(pd.DataFrame(rows))
            + "<p class='note'>Per patient (mean over a patient's studies), paired over the patients "
              "both methods have; two-sided Wilcoxon signed-rank (zero differences dropped); Holm "
              "correction over the pairs of each metric. <i>better</i>: the method the median "
              "difference favours (higher Dice, lower |ΔMTV|); * adjusted p &lt; 0.05, the paper's "
              "significance level.</p>")


def _fmt_num(v: float, digits: int, sign: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def table_figure(table, path: str | os.PathLike, title: str | None = None) -> Path:
    """A frame of display strings drawn as a PNG table (e.g. :func:`table1_frame`)."""
    from matplotlib.figure import Figure

    n_rows, n_cols = table.shape
    fig = Figure(figsize=(max(6.0, 1.45 * n_cols), 0.45 * (n_rows + 1) + (0.5 if title else 0.2)))
    ax = fig.subplots()
    ax.axis("off")
    t = ax.table(cellText=table.astype(str).to_numpy(), colLabels=[str(c) for c in table.columns],
                 loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.auto_set_column_width(list(range(n_cols)))
    t.scale(1.0, 1.35)
    for (r, _), cell in t.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8edf3")
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path, dpi=110)


def html_table(table, float_digits: int = 3) -> str:
    """A frame as an HTML ``<table>`` (escaped; floats rounded, NaN shown as "n/a")."""
    import html

    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "n/a" if not np.isfinite(v) else f"{float(v):.{float_digits}f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in table.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1150px; color: #1d232b; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #d5dbe3; padding-bottom: 4px; }
.meta { color: #5a6573; font-size: 13px; } .note { color: #5a6573; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccd3dc; padding: 4px 9px; text-align: center; }
th { background: #e8edf3; } tr:nth-child(even) td { background: #f7f9fb; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #e1e6ec; }
figcaption { font-size: 13px; color: #5a6573; }
"""


_WARNING_STYLE = " style='border:3px solid #c00;padding:6px'"  # a failed gate, a network that did not learn


def warnings_html(warnings: dict[str, str]) -> str:
    """{method: text} (the networks that did not learn, the validation notes) as an escaped HTML
    warning block."""
    import html

    items = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(why)}</li>" for m, why in warnings.items())
    return f"<div{_WARNING_STYLE}><ul>{items}</ul></div>"


def gate_html(gate: dict | None) -> str:
    """The classifier quality gate's figures (``wsseg_core.gate``) as an escaped HTML block; a
    failed gate is shown as a warning."""
    import html

    if not gate:
        return "<p class='note'>Not measured in this run (made before the gate existed).</p>"

    def f(v, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    ok = bool(gate.get("passed"))
    verdict = "passed" if ok else ("FAILED — the run went on because of --allow-weak-classifier"
                                   if gate.get("allowed_weak") else "FAILED")
    rows = [("verdict", verdict), ("slice AUC", f(gate.get("auc"), ".3f")),
            ("spread of p (std / IQR)", f"{f(gate.get('p_std'), '.3f')} / {f(gate.get('p_iqr'), '.3f')}"),
            ("flag threshold", f(gate.get("flag_threshold"), ".3f")),
            ("tumour slices flagged", f(gate.get("sensitivity"), ".1%")),
            (f"{gate.get('tumour_free_flagged_source', 'tumour-free slices')} flagged",
             f(gate.get("tumour_free_flagged"), ".1%")),
            ("slices / tumour slices / studies",
             f"{gate.get('n_slices')} / {gate.get('n_tumour_slices')} / {gate.get('n_studies')}")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    fails = "".join(f"<li>{html.escape(x)}</li>" for x in gate.get("failures") or [])
    style = "" if ok else _WARNING_STYLE
    bars = html.escape(", ".join(f"{k} {v}" for k, v in (gate.get("bars") or {}).items()))
    return (f"<div{style}><table>{body}</table>" + (f"<ul>{fails}</ul>" if fails else "")
            + f"<p class='note'>Bars: {bars}.</p></div>")


def write_html_report(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]],
                      meta: str = "") -> Path:
    """A self-contained HTML page (CSS in the page, images by relative link): opens from file://.

    Args:
        path: where to write (atomically); title: page title;
        sections: ``(heading, html body)`` pairs, bodies already escaped (see :func:`html_table`,
            :func:`html_figure`); meta: escaped HTML shown under the title.
    """
    import html

    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<div class=\"meta\">{meta}</div>"]
    for heading, body in sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{body}</section>")
    parts.append("</body></html>\n")
    from wsseg_core.storage import write_text

    out = Path(path)
    write_text(out, "\n".join(parts))
    return out


def html_figure(rel_path: str, caption: str) -> str:
    """An ``<figure>`` with a relative image link (POSIX separators, URL-quoted) and an escaped caption."""
    import html
    from urllib.parse import quote

    src = quote(Path(rel_path).as_posix())
    return (f"<figure><img src=\"{html.escape(src)}\" alt=\"{html.escape(caption)}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# --- all methods beside the papers' numbers (`make demo-all`) ---------------------------------------

#: What the papers report for each method (None: not reported). Früh et al. 2021 (453 patients,
#: 90 test): median Dice (IQR), median |ΔMTV| ml (IQR) and ICC(2,1) of MTV (Table 1, Sec. 3.1).
#: Amyar et al.: MIP class response, mean ± sd Dice over 5 folds (oesophagus 0.73 ± 0.09, lung
#: 0.77 ± 0.07, Tables 1-2); the lung value is quoted, neither is a median. Afshari et al.: mean
#: Dice of L_MDice + L_MS + M, 0.68 (Sec. 4.4: 7 % below fully supervised, 30 % above box Dice).
PAPER_RESULTS: dict[str, dict] = {
    "CAM": dict(dice=0.46, dice_iqr=0.35, abs_dmtv_ml=26.0, icc_mtv=0.64, source="Früh 2021 (median)"),
    "GradCAM": dict(dice=0.12, dice_iqr=0.21, abs_dmtv_ml=30.0, icc_mtv=0.55, source="Früh 2021 (median)"),
    "GradCAM++": dict(dice=0.42, dice_iqr=0.30, abs_dmtv_ml=24.0, icc_mtv=0.64, source="Früh 2021 (median)"),
    "ScoreCAM": dict(dice=0.47, dice_iqr=0.35, abs_dmtv_ml=27.0, icc_mtv=0.64, source="Früh 2021 (median)"),
    "Threshold": dict(dice=0.29, dice_iqr=0.28, abs_dmtv_ml=44.0, icc_mtv=0.59, source="Früh 2021 (median)"),
    "UNet": dict(dice=0.72, dice_iqr=0.36, abs_dmtv_ml=17.0, icc_mtv=0.94, source="Früh 2021 (median)"),
    "MIP-CAM": dict(dice=0.77, dice_iqr=None, abs_dmtv_ml=None, icc_mtv=None,
                    source="Amyar (mean, lung; 0.73 oesophagus)"),
    "BoxFCN": dict(dice=0.68, dice_iqr=None, abs_dmtv_ml=None, icc_mtv=None, source="Afshari 2019 (mean)"),
}

METHODS_TABLE_COLUMNS = ("method", "n_dice", "dice_median", "dice_iqr", "abs_dmtv_median_ml", "icc_mtv",
                         "icc_mtv_n", "detection_rate", "false_lesions_per_study", "paper_dice",
                         "paper_dice_iqr", "paper_abs_dmtv_ml", "paper_icc_mtv", "paper_source")


def methods_table(summary, icc, papers: dict[str, dict] | None = None, subset: str = "all"
                  ) -> "pd.DataFrame":  # noqa: F821
    """One row per method of ``summary`` (its order): our numbers beside the papers'.

    Args:
        summary: ``wsseg_core.stats.summarize`` rows (``method, n_dice, dice_median, dice_iqr,
            abs_dmtv_median_ml, detection_rate, false_lesions_per_study``).
        icc: ``wsseg_core.stats.icc_table`` rows; the ``quantity == "MTV"`` row of each method is
            used (and, where the frames have a ``subset`` column, ``summary``'s and ``icc``'s
            ``subset`` rows).
        papers: method -> dict(dice, dice_iqr, abs_dmtv_ml, icc_mtv, source); default
            ``PAPER_RESULTS``. A method it lacks gets NaN / "".
    Returns:
        Columns ``METHODS_TABLE_COLUMNS``: Dice as a fraction, |ΔMTV| in ml, detection_rate a
        fraction of reference lesions, false lesions a mean count per study.
    """
    import pandas as pd

    papers = PAPER_RESULTS if papers is None else papers
    if "subset" in summary.columns:  # one row per method: the subset asked for
        summary = summary[summary["subset"] == subset]
    mtv = icc[icc["quantity"] == "MTV"]
    if "subset" in mtv.columns:
        mtv = mtv[mtv["subset"] == subset]
    by = {r["method"]: r for _, r in mtv.iterrows()}

    def num(v) -> float:
        return float("nan") if v is None else float(v)

    rows = []
    for _, s in summary.iterrows():
        m = str(s["method"])
        r = by.get(m)
        p = papers.get(m, {})
        rows.append({"method": m, "n_dice": int(s["n_dice"]), "dice_median": float(s["dice_median"]),
                     "dice_iqr": float(s["dice_iqr"]), "abs_dmtv_median_ml": float(s["abs_dmtv_median_ml"]),
                     "icc_mtv": num(None if r is None else r["icc"]),
                     "icc_mtv_n": 0 if r is None else int(r["n"]),
                     "detection_rate": num(s.get("detection_rate")),
                     "false_lesions_per_study": num(s.get("false_lesions_per_study")),
                     "paper_dice": num(p.get("dice")), "paper_dice_iqr": num(p.get("dice_iqr")),
                     "paper_abs_dmtv_ml": num(p.get("abs_dmtv_ml")), "paper_icc_mtv": num(p.get("icc_mtv")),
                     "paper_source": str(p.get("source", ""))})
    return pd.DataFrame(rows, columns=list(METHODS_TABLE_COLUMNS))


def format_methods_table(table) -> str:
    """``methods_table`` as GitHub markdown: ours, then the paper's value in brackets, "n/a" for NaN."""
    def f(v: float, fmt: str) -> str:
        return "n/a" if not np.isfinite(v) else format(v, fmt)

    def med(v: float, iqr: float, fmt: str) -> str:
        return f(v, fmt) + ("" if not np.isfinite(iqr) else f" ({format(iqr, fmt)})") if np.isfinite(v) else "n/a"

    lines = ["| method | n | Dice median (IQR) | paper Dice | abs. ΔMTV ml | paper | ICC MTV (n) | paper | "
             "lesions found | false lesions/study | paper source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.method} | {r.n_dice} | {med(r.dice_median, r.dice_iqr, '.2f')} | "
            f"{med(r.paper_dice, r.paper_dice_iqr, '.2f')} | {f(r.abs_dmtv_median_ml, '.1f')} | "
            f"{f(r.paper_abs_dmtv_ml, '.0f')} | {f(r.icc_mtv, '.2f')} ({r.icc_mtv_n}) | "
            f"{f(r.paper_icc_mtv, '.2f')} | {f(r.detection_rate * 100, '.0f') + ' %' if np.isfinite(r.detection_rate) else 'n/a'} | "
            f"{f(r.false_lesions_per_study, '.1f')} | {r.paper_source} |")
    return "\n".join(lines)
