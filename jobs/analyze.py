"""Agreement of MTV and TLG with the manual reference, and the per-method summary.

Reads `<out>/metrics/`, writes `<out>/icc.parquet` (per subset, method and quantity: ICC(2,1), 95%
CI, p-value, n; test split by default), `<out>/summary.parquet` (per subset and method: median/IQR
of Dice, |dMTV|, |dTLG|, and of the autoPET FPV/FNV, HD95 and lesion detection where the rows have
them) and `<out>/comparisons.parquet` (per subset, metric and pair of methods: paired Wilcoxon
signed-rank over patients, Holm-corrected). Subset `tumour` (studies with reference MTV > 0, as the
paper) is what the one-screen summary and the report show; `all` is in the tables. It pools the
per-slice classifier predictions of `<out>/slices/` into a slice-level AUC per split
(`<out>/slice_auc.parquet`), and prints it all as one table. Unless `--no-figures`, it also draws
`<out>/figures/*.png` (Früh et al. Figs. 4-7 and Table 1) and `<out>/report.html`, which opens
from file:// with no server. Runs in one process (pandas + pingouin + matplotlib); no Ray needed.

    python -m jobs.analyze --out runs/demo
    python -m jobs.analyze --out runs/demo --no-figures
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobs.common import RunFolder, RunLayout, safe_name, setup_logging

LOG = logging.getLogger("wsseg.analyze")
#: Columns the scorer added after the SPEC's (autoPET / lesion-wise); older runs lack them.
EXTRA_COLUMNS = ("fpv_ml", "fnv_ml", "hd95_mm", "ude_mm", "n_ref_lesions", "n_ref_detected", "n_pred_lesions",
                 "n_pred_false")
SPLITS = ("train", "val", "test")
N_CAM_STUDIES = 3


def analyze(out: str | Path, split: str = "test", figures: bool = True) -> dict[str, Any]:
    """ICC table, summary and pooled slice AUC for one split ('all' for every study).

    With ``figures``, also the PNGs under ``<out>/figures/`` and ``<out>/report.html``
    (see :func:`write_figures`). Returns ``dict(icc, summary, slice_auc, n_studies, figures, report)``.
    ``out`` may be a URI: what analysis reads is fetched into the staging folder first and what it
    writes is uploaded.
    """
    from wsseg_core.stats import SUBSETS, icc_table, paired_comparisons, select_subset, summarize

    run = RunFolder(out)
    run.mirror(run.metrics, run.slices)  # URI: exactly what it holds, the results of every node
    run.fetch(run.classifier, run.cohort, run.thresholds, refresh=True)
    everything = pd.read_parquet(run.metrics)
    df = everything if split == "all" else everything[everything["split"] == split]
    missing = [c for c in EXTRA_COLUMNS if c not in df.columns]
    if missing:
        LOG.info("metrics lack %s (scored before those columns existed): FPV/FNV, HD95 and lesion "
                 "detection are left out", ", ".join(missing))
    tables: dict[str, list[pd.DataFrame]] = {"icc": [], "summary": [], "comparisons": []}
    methods = list(summarize(df)["method"])  # every method of the split, also in a subset without rows
    for subset in SUBSETS:
        rows = select_subset(df, subset)
        for name, t in (("icc", icc_table(rows, methods)), ("summary", summarize(rows)),
                        ("comparisons", paired_comparisons(rows))):
            t.insert(0, "subset", subset)
            t.insert(0, "split", split)
            tables[name].append(t)
    icc, summary, comparisons = (pd.concat(tables[k], ignore_index=True)
                                 for k in ("icc", "summary", "comparisons"))
    run.write_parquet(run.icc, icc)
    run.write_parquet(run.summary, summary)
    run.write_parquet("comparisons.parquet", comparisons)
    slice_auc = pooled_slice_auc(run.out, everything)
    if slice_auc is not None:
        run.write_parquet("slice_auc.parquet", slice_auc)
    res: dict[str, Any] = {
        "icc": icc, "summary": summary, "comparisons": comparisons, "slice_auc": slice_auc,
        "n_studies": int(df[["patient_id", "study_id"]].drop_duplicates().shape[0]),
        "figures": [], "report": None, "classifier_gate": read_gate(run.thresholds),
        "not_learned": read_not_learned(run.thresholds), "notes": read_notes(run.thresholds),
    }
    if figures:
        res["figures"], res["report"] = write_figures(run.out, df, icc, summary, slice_auc, split,
                                                      gate=res["classifier_gate"], comparisons=comparisons,
                                                      not_learned=res["not_learned"], notes=res["notes"])
    run.publish(*(res["figures"] or []), *([res["report"]] if res["report"] else []))
    return res


def pooled_slice_auc(out: str | Path, metrics: pd.DataFrame) -> pd.DataFrame | None:
    """Slice-level classifier ROC AUC per split, pooled over every labeled slice of the split.

    Reads the scorer's `<out>/slices/*.parquet` (patient_id, study_id, split, z, prob, label) and keeps
    the studies present in ``metrics`` (stale files of studies no longer in the run are ignored),
    with the split the metrics rows give them. Returns rows ``split`` (train, val, test, all),
    ``n_studies, n_slices, n_tumour_slices, auc, score, auc_zctx``, or None (logged) when the run
    has no slice files. ``auc`` is the AUC of the classifier's slice probability p (``score``
    names it); ``auc_zctx`` that of the z-context score (p + max(p[z-1..z+1])) / 2 a "zctx" flag
    rule flags on (wsseg_core.gate.z_context_score; issue 16).
    """
    from wsseg_core.gate import z_context_score
    from wsseg_core.metrics import roc_auc

    folder = Path(out) / "slices"
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    files = [f for f in files if not f.name.startswith(".")]  # hidden: a writer's temp file
    if not files:
        LOG.info("no per-slice predictions under %s (scored before they existed): slice AUC skipped", folder)
        return None
    slices = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    studies = metrics[["patient_id", "study_id", "split"]].drop_duplicates(["patient_id", "study_id"])
    slices = slices.drop(columns=["split"]).merge(studies, on=["patient_id", "study_id"], how="inner")
    slices = slices.sort_values(["patient_id", "study_id", "z"], kind="stable")
    slices["p_zctx"] = np.concatenate([z_context_score(g["prob"].to_numpy(float)) for _, g in
                                       slices.groupby(["patient_id", "study_id"], sort=False)]) \
        if len(slices) else np.zeros(0)
    slices = slices[slices["label"].notna()]
    rows = []
    for name in (*SPLITS, "all"):
        g = slices if name == "all" else slices[slices["split"] == name]
        labels = g["label"].astype(bool).to_numpy()
        rows.append({"split": name, "n_studies": int(g[["patient_id", "study_id"]].drop_duplicates().shape[0]),
                     "n_slices": int(len(g)), "n_tumour_slices": int(labels.sum()),
                     "auc": roc_auc(g["prob"].to_numpy(float), labels) if len(g) else float("nan"),
                     "score": "p",
                     "auc_zctx": roc_auc(g["p_zctx"].to_numpy(float), labels) if len(g) else float("nan")})
    return pd.DataFrame(rows)


def cam_overlays(out: str | Path, df: pd.DataFrame, n: int = N_CAM_STUDIES) -> list[Path]:
    """Früh et al. Fig. 4 for ``n`` studies of ``df`` with tumour (largest reference MTV first, one
    study per patient): on the flagged slice holding the most tumour, PET with the reference
    contour, the four CAMs over PET, their Algorithm 1 masks (run thresholds), and CT.

    The classifier and CAMs are recomputed in this process (a few slices: cheap). Returns the PNGs
    written; none (logged) when the run has no classifier or no cohort manifest.
    """
    from wsseg_core.thresholds import load_flag_rule, load_thresholds
    from wsseg_core.cams import CamEngine, available_methods
    from wsseg_core.data import StudyRef, load_study
    from wsseg_core.inference import classify_volume, flagged_slices, volume_cams
    from wsseg_core.methods import METHODS, StudyContext
    from wsseg_core.models import load_classifier
    from wsseg_core.report import cam_figure

    layout = RunLayout(Path(out))
    if not layout.classifier.exists():
        LOG.info("no classifier at %s: CAM overlay figures skipped", layout.classifier)
        return []
    if not layout.cohort.exists():
        LOG.info("no cohort manifest at %s (CT paths unknown): CAM overlay figures skipped", layout.cohort)
        return []
    ok = df[df["status"] == "ok"]
    ok = ok[pd.to_numeric(ok["mtv_true_ml"], errors="coerce") > 0]
    picks = (ok.sort_values(["mtv_true_ml", "patient_id", "study_id"], ascending=[False, True, True])
               .drop_duplicates("patient_id").head(n))
    if picks.empty:
        LOG.info("no study with tumour in this split: CAM overlay figures skipped")
        return []
    cohort = pd.read_parquet(layout.cohort)
    model, pre, _ = load_classifier(layout.classifier)
    model.eval()
    engine = CamEngine(model)
    thresholds = load_thresholds(layout.thresholds)
    # The run's flag threshold (chosen on validation), not the paper's 0.5: the figure shows a
    # slice the scored method segmented, so it must flag as scoring did.
    flag_rule = load_flag_rule(layout.thresholds)
    flag_threshold = flag_rule.threshold
    methods = [m for m in available_methods(model) if m in thresholds]  # no CAM under head "fc"
    written = []
    for row in picks.itertuples():
        match = cohort[(cohort["patient_id"] == row.patient_id) & (cohort["study_id"] == row.study_id)]
        if match.empty:
            LOG.info("%s/%s is not in %s: no CAM figure", row.patient_id, row.study_id, layout.cohort)
            continue
        rec = {k: (None if pd.isna(v) else v) for k, v in match.iloc[0].to_dict().items()}
        ref = StudyRef(**{k: rec.get(k) for k in StudyRef.__dataclass_fields__})
        study = load_study(ref)
        geo = pre.geometry(study.suv, study.ct, study.spacing_mm)
        probs = classify_volume(model, pre, study.suv, study.ct, geometry=geo)
        tumour = study.seg.reshape(-1, study.seg.shape[2]).sum(axis=0).astype(np.int64)  # signed: -1 below
        flagged = np.zeros(len(probs), dtype=bool)
        flagged[flagged_slices(probs, flag_rule)] = True  # as scoring flags (Algorithm 1 step 1)
        # The paper shows slices the method actually segments: the flagged slice with most tumour;
        # if the classifier flags none of the tumour slices, the tumour's largest slice (CAMs exist
        # for any slice) and the title says so.
        cand = np.where(flagged & (tumour > 0), tumour, -1)
        z = int(np.argmax(cand)) if cand.max() > 0 else int(np.argmax(tumour))
        maps = volume_cams(engine, pre, study.suv, study.ct, [z], methods, batch_size=1, geometry=geo)
        # Each method's mask of slice z exactly as scoring segments it (the method registry, its
        # run thresholds, the CAM mapped to voxels by the study's geometry).
        ctx = StudyContext(flagged_z=np.array([z]), thresholds=thresholds, cams=maps, geometry=geo)
        masks = {m: METHODS[m].segment(study, ctx)[:, :, z].astype(bool) for m in methods}
        cams = {m: maps[m][0] for m in methods}
        if pre.mode != "resize":
            # The canvas is not the slice: show each CAM on the slice's own grid, NaN (not drawn)
            # where the network did not see the slice.
            cams = {m: geo.cam_to_native(c) for m, c in cams.items()}
        name = f"cam_{safe_name(row.patient_id)}_{safe_name(row.study_id)}_z{z}.png"
        title = (f"{row.patient_id} / {row.study_id}, slice z={z}, p(tumour)={probs[z]:.2f}"
                 + (f" (flag threshold {flag_threshold:.2f})" if flag_rule.kind == "threshold"
                    else f" (flag rule {flag_rule.name})")
                 + ("" if flagged[z] else " (not flagged by the classifier)"))
        written.append(cam_figure(study.suv[:, :, z], study.ct[:, :, z], study.seg[:, :, z], cams, masks,
                                  layout.out / "figures" / name, title=title))
    return written


def read_gate(thresholds_path: str | Path) -> dict | None:
    """The classifier quality gate's record in thresholds.json (jobs.tune_thresholds.check_classifier),
    or None for a run made before the gate existed."""
    import json

    p = Path(thresholds_path)
    if not p.exists():
        return None
    return json.loads(p.read_text()).get("classifier_gate")


def read_entry_texts(thresholds_path: str | Path, key: str) -> dict[str, str]:
    """{method: text} of the thresholds.json entries that carry a non-empty `key` ({} without the
    file)."""
    import json

    p = Path(thresholds_path)
    if not p.exists():
        return {}
    entries = json.loads(p.read_text()).get("methods", {})
    return {m: e[key] for m, e in entries.items() if isinstance(e, dict) and e.get(key)}


def read_not_learned(thresholds_path: str | Path) -> dict[str, str]:
    """{method: why} for the networks thresholds.json records as not having learned (`not_learned`:
    BoxFCN, the U-Net, MIP-CAM; e.g. jobs.train_boxfcn.not_learned_reason)."""
    return read_entry_texts(thresholds_path, "not_learned")


def read_notes(thresholds_path: str | Path) -> dict[str, str]:
    """{method: note} for the methods whose thresholds.json entry carries a validation `note` (a
    warning short of "did not learn", e.g. MIP-CAM's study gate passing every tumour-free study)."""
    return read_entry_texts(thresholds_path, "note")


def format_notes(notes: dict[str, str]) -> str:
    """The one-screen summary's lines for the methods' validation notes ('' when none)."""
    return "\n".join(f"NOTE {m}: {why}" for m, why in notes.items())


def format_not_learned(not_learned: dict[str, str]) -> str:
    """The one-screen summary's warning lines for networks that did not learn ('' when none)."""
    return "\n".join(f"WARNING {m}: {why}" for m, why in not_learned.items())


def format_gate(gate: dict | None) -> str:
    """One line for the one-screen summary: the gate's verdict and what it measured."""
    if not gate:
        return "classifier gate: not measured in this run"

    def f(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    verdict = "PASSED" if gate.get("passed") else (
        "FAILED (went on: --allow-weak-classifier)" if gate.get("allowed_weak") else "FAILED")
    line = (f"classifier gate {verdict}: validation slice AUC {f(gate.get('auc'), '.3f')}, "
            f"p std {f(gate.get('p_std'), '.3f')} IQR {f(gate.get('p_iqr'), '.3f')}, flag threshold "
            f"{f(gate.get('flag_threshold'), '.3f')}: {f(gate.get('sensitivity'), '.0%')} of tumour "
            f"slices, {f(gate.get('tumour_free_flagged'), '.0%')} of "
            f"{gate.get('tumour_free_flagged_source', 'tumour-free slices')} flagged")
    if gate.get("failures"):
        line += "\n  failed: " + "; ".join(gate["failures"])
    return line


#: The subset the one-screen summary and report.html show (wsseg_core.stats.SUBSETS): the paper's
#: agreement is over patients with tumour.
DEFAULT_SUBSET = "tumour"


def subset_of(table: pd.DataFrame | None, subset: str = DEFAULT_SUBSET) -> pd.DataFrame | None:
    """The rows of one subset of an icc / summary / comparisons table (a table from before the
    `subset` column existed is returned whole)."""
    if table is None or "subset" not in table.columns:
        return table
    return table[table["subset"] == subset].reset_index(drop=True)


def write_figures(out: str | Path, df: pd.DataFrame, icc: pd.DataFrame, summary: pd.DataFrame,
                  slice_auc: pd.DataFrame | None, split: str,
                  gate: dict | None = None,
                  comparisons: pd.DataFrame | None = None,
                  not_learned: dict[str, str] | None = None,
                  notes: dict[str, str] | None = None) -> tuple[list[Path], Path]:
    """`<out>/figures/*.png` and `<out>/report.html` for the rows ``df`` of one split.

    Figures: dice_boxplot.png (Fig. 5), mtv_scatter.png / tlg_scatter.png (Figs. 6-7),
    mtv_bland_altman.png / tlg_bland_altman.png, table1.png (ICC table) and cam_*.png (Fig. 4).
    The agreement figures and Table 1 show the tumour-bearing studies (``DEFAULT_SUBSET``); the
    page adds Table 1 over all studies and the paired comparisons between methods.
    A figure with nothing to draw is left out (logged). `not_learned` ({method: why},
    :func:`read_not_learned`) opens the page as a warning, `notes` (:func:`read_notes`) follow it.
    Returns (PNG paths, report path).
    """
    import html

    from wsseg_core import report
    from wsseg_core.stats import select_subset

    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    shown = select_subset(df, DEFAULT_SUBSET)
    icc_shown = subset_of(icc)
    made: dict[str, Path | None] = {
        "dice": report.dice_boxplot(df, fig_dir / "dice_boxplot.png", title=f"Per-patient Dice ({split})"),
        "mtv": report.agreement_scatter(shown, "MTV", fig_dir / "mtv_scatter.png", icc=icc_shown),
        "tlg": report.agreement_scatter(shown, "TLG", fig_dir / "tlg_scatter.png", icc=icc_shown),
        "mtv_ba": report.bland_altman(shown, "MTV", fig_dir / "mtv_bland_altman.png"),
        "tlg_ba": report.bland_altman(shown, "TLG", fig_dir / "tlg_bland_altman.png"),
    }
    for k, v in made.items():
        if v is None:
            LOG.info("figure %s skipped: nothing to plot in split %s", k, split)
    table1 = report.table1_frame(subset_of(summary), icc_shown)
    table1_all = report.table1_frame(subset_of(summary, "all"), subset_of(icc, "all"))
    made["table1"] = report.table_figure(
        table1, fig_dir / "table1.png",
        title=f"Table 1: median (IQR) and ICC(2,1), split {split}, studies with tumour")
    cams = cam_overlays(out, df)

    def fig(key: str, caption: str) -> str:
        p = made.get(key)
        return "" if p is None else report.html_figure(p.relative_to(out).as_posix(), caption)

    n_studies = df[["patient_id", "study_id"]].drop_duplicates().shape[0]
    n_patients = df["patient_id"].nunique()
    meta = html.escape(f"run {out} · split {split}: {n_studies} studies of {n_patients} patients · "
                       f"written {pd.Timestamp.now().strftime('%Y-%m-%d %H:%M')}")
    sections = [
        *([("Networks that did not learn", report.warnings_html(not_learned))] if not_learned else []),
        *([("Notes from validation", report.warnings_html(notes))] if notes else []),
        ("Classifier quality gate (validation)", report.gate_html(gate)),
        ("Table 1: segmentation and agreement, studies with tumour",
         report.html_table(table1)
         + "<p class='note'>Studies whose reference MTV &gt; 0, as the paper's agreement. Median (IQR) "
           "over studies; Dice per study; ICC(2,1): two-way random, absolute agreement, single "
           "rater.</p>"
         + fig("table1", "Table 1 as an image")),
        ("Table 1 over all studies (tumour-free included)",
         report.html_table(table1_all)
         + "<p class='note'>Tumour-free studies (reference MTV 0) add |ΔMTV| and |ΔTLG| values and "
           "ICC pairs; Dice is undefined for them and left out.</p>"),
        ("Paired comparisons between methods, studies with tumour",
         report.comparisons_html(subset_of(comparisons)) if comparisons is not None
         else "<p class='note'>Not computed.</p>"),
        ("Dice per patient (Fig. 5)", fig("dice", "Per-patient Dice per method (mean over a patient's studies)")),
        ("MTV: reference vs estimate (Fig. 6)",
         fig("mtv", "MTV (ml), reference vs estimate; dashed: identity")
         + fig("mtv_ba", "MTV Bland-Altman: bias and 95% limits of agreement")),
        ("TLG: reference vs estimate (Fig. 7)",
         fig("tlg", "TLG (g), reference vs estimate; dashed: identity")
         + fig("tlg_ba", "TLG Bland-Altman: bias and 95% limits of agreement")),
    ]
    autopet = subset_of(summary)[["method", "fpv_median_ml", "fpv_iqr_ml", "fnv_median_ml", "fnv_iqr_ml",
                                  "hd95_median_mm", "hd95_iqr_mm", "ude_median_mm", "ude_iqr_mm",
                                  "detection_rate", "false_lesions_per_study"]
                               + (["n_empty_pred"] if "n_empty_pred" in summary.columns else [])]
    if autopet.drop(columns=["method", "n_empty_pred"], errors="ignore").notna().any().any():
        sections.append(("autoPET metrics and lesion-wise detection, studies with tumour", report.html_table(
            autopet.rename(columns={"fpv_median_ml": "FPV ml median", "fpv_iqr_ml": "FPV IQR",
                                    "fnv_median_ml": "FNV ml median", "fnv_iqr_ml": "FNV IQR",
                                    "hd95_median_mm": "HD95 mm median", "hd95_iqr_mm": "HD95 IQR",
                                    "ude_median_mm": "UDE mm median", "ude_iqr_mm": "UDE IQR",
                                    "detection_rate": "lesions detected",
                                    "false_lesions_per_study": "false lesions / study",
                                    "n_empty_pred": "empty predictions"}), float_digits=2)
            + "<p class='note'>18-connected components. FPV: predicted components touching no "
              "reference voxel; FNV: reference components the prediction misses (undefined for "
              "negative studies). UDE: mean symmetric surface distance (Afshari et al.). Detection rate pooled over lesions. "
              "Empty predictions have no surface: their HD95 and UDE are undefined and left out of "
              "those medians, so the count of such rows is shown beside them. "
              "With the tumour-free studies (their FPV is all false volume): summary.parquet, subset all.</p>"))
    else:
        sections.append(("autoPET metrics and lesion-wise detection",
                         "<p class='note'>Not in this run's metrics (scored before those columns existed).</p>"))
    if slice_auc is not None:
        sections.append(("Slice-level classifier AUC", report.html_table(slice_auc)
                         + "<p class='note'>ROC AUC of the slice classifier's tumour probability, "
                           "pooled over all labeled slices of each split.</p>"))
    else:
        sections.append(("Slice-level classifier AUC",
                         "<p class='note'>No per-slice predictions in this run.</p>"))
    sections.append(("CAM overlays (Fig. 4)",
                     "".join(report.html_figure(p.relative_to(out).as_posix(),
                                                f"{p.stem}: PET + reference (red), CAMs, masks, CT")
                             for p in cams)
                     or "<p class='note'>No CAM overlays (no classifier, cohort manifest or tumour study).</p>"))
    page = report.write_html_report(out / "report.html", "wsseg results", sections, meta=meta)
    pngs = [p for p in made.values() if p is not None] + cams
    LOG.info("wrote %d figures to %s and %s", len(pngs), fig_dir, page)
    return pngs, page


def format_comparisons(comparisons: pd.DataFrame | None) -> list[str]:
    """The paired comparisons of one subset as lines: per pair of methods, the median per-patient
    difference of Dice and of |dMTV| (A - B) with the Wilcoxon p and the Holm-adjusted p."""
    if comparisons is None or comparisons.empty:
        return []

    def p(v: float) -> str:
        return "n/a" if pd.isna(v) else ("<0.001" if v < 0.001 else f"{v:.3f}")

    by = {(r.metric, r.method_a, r.method_b): r for r in comparisons.itertuples()}
    pairs = list(dict.fromkeys((r.method_a, r.method_b) for r in comparisons.itertuples()))
    lines = ["", "methods compared per patient (A - B), Wilcoxon signed-rank, Holm over each metric's "
                 "pairs; * p_holm < 0.05:",
             f"{'A vs B':<24} {'n':>3} {'median dDice':>13} {'p':>7} {'p_holm':>8} "
             f"{'median d|dMTV| ml':>18} {'p':>7} {'p_holm':>8}"]
    for a, b in pairs:
        n, cells = 0, []
        for metric, digits, width in (("dice", 3, 13), ("abs_dmtv_ml", 1, 18)):
            r = by.get((metric, a, b))
            if r is None:
                cells.append(f"{'n/a':>{width}} {'':>7} {'':>8}")
                continue
            n = max(n, int(r.n))
            md = "n/a" if pd.isna(r.median_diff) else f"{r.median_diff:+.{digits}f}"
            cells.append(f"{md:>{width}} {p(r.pval):>7} {p(r.pval_holm):>7}{'*' if r.significant else ' '}")
        lines.append(f"{f'{a} vs {b}':<24} {n:>3} {cells[0]} {cells[1]}")
    return lines


def format_report(icc: pd.DataFrame, summary: pd.DataFrame, slice_auc: pd.DataFrame | None = None,
                  comparisons: pd.DataFrame | None = None, subset: str = DEFAULT_SUBSET) -> str:
    """The paper-style table: median (IQR) per method, ICC [95% CI] p for MTV and TLG, over the
    studies of ``subset`` (default: with tumour, as the paper); then, where the summary has them,
    the autoPET FPV/FNV (ml), HD95 (mm) and lesion detection per method, the paired comparisons
    between methods, and the pooled slice-level classifier AUC per split."""
    icc, summary, comparisons = subset_of(icc, subset), subset_of(summary, subset), subset_of(comparisons, subset)
    what = {"tumour": "studies with tumour (reference MTV > 0)", "all": "all studies"}.get(subset, subset)
    lines = [f"{what}; the other subset is in icc.parquet / summary.parquet (column subset)",
             f"{'method':<10} {'n':>3}  {'Dice median (IQR)':<19} {'|dMTV| ml (IQR)':<19} "
             f"{'|dTLG| g (IQR)':<19} {'ICC MTV [95% CI]':<22} {'ICC TLG [95% CI]':<22}"]
    by = {(r.method, r.quantity): r for r in icc.itertuples()}

    def icc_cell(method: str, q: str) -> str:
        r = by.get((method, q))
        if r is None or pd.isna(r.icc):
            return "n/a"
        p = "<0.001" if r.pval < 0.001 else f"{r.pval:.3f}"
        return f"{r.icc:.2f} [{r.ci_low:.2f},{r.ci_high:.2f}] p{p if p.startswith('<') else '=' + p}"

    for r in summary.itertuples():
        lines.append(
            f"{r.method:<10} {int(r.n):>3}  {r.dice_median:>6.2f} ({r.dice_iqr:.2f}){'':<7} "
            f"{r.abs_dmtv_median_ml:>7.1f} ({r.abs_dmtv_iqr_ml:.1f}){'':<4} "
            f"{r.abs_dtlg_median_g:>7.1f} ({r.abs_dtlg_iqr_g:.1f}){'':<3} "
            f"{icc_cell(r.method, 'MTV'):<22} {icc_cell(r.method, 'TLG'):<22}")
    extra = [c for c in ("fpv_median_ml", "fnv_median_ml", "hd95_median_mm", "detection_rate")
             if c in summary.columns and summary[c].notna().any()]
    if extra:
        def med(v: float, iqr: float, digits: int) -> str:
            return "n/a" if pd.isna(v) else f"{v:.{digits}f} ({iqr:.{digits}f})"

        lines += ["", f"{'method':<10} {'FPV ml (IQR)':<17} {'FNV ml (IQR)':<17} {'HD95 mm (IQR)':<17} "
                      f"{'UDE mm (IQR)':<17} "
                      f"{'lesions hit':<12} {'false/study':<11} {'empty pred':<10}"]
        for r in summary.itertuples():
            det = "n/a" if pd.isna(r.detection_rate) else f"{r.detection_rate:.0%}"
            fls = "n/a" if pd.isna(r.false_lesions_per_study) else f"{r.false_lesions_per_study:.1f}"
            # rows whose empty mask has no surface: left out of the HD95 / UDE medians (issue 18)
            empty = getattr(r, "n_empty_pred", float("nan"))
            empty = "n/a" if pd.isna(empty) else f"{int(empty)}"
            lines.append(f"{r.method:<10} {med(r.fpv_median_ml, r.fpv_iqr_ml, 1):<17} "
                         f"{med(r.fnv_median_ml, r.fnv_iqr_ml, 1):<17} "
                         f"{med(r.hd95_median_mm, r.hd95_iqr_mm, 1):<17} "
                         f"{med(getattr(r, 'ude_median_mm', float('nan')), getattr(r, 'ude_iqr_mm', float('nan')), 1):<17} "
                         f"{det:<12} {fls:<11} {empty:<10}")
    lines += format_comparisons(comparisons)
    if slice_auc is not None:
        cells = [f"{r.split} {r.auc:.3f} ({r.n_slices} slices)" for r in slice_auc.itertuples()
                 if r.split != "all" and r.n_slices and not pd.isna(r.auc)]
        if cells:
            lines += ["", "slice-level classifier AUC: " + ", ".join(cells)]
    return "\n".join(lines)


def format_papers(icc: pd.DataFrame, summary: pd.DataFrame, split: str) -> str:
    """Every method of the run beside the papers' numbers, as markdown (`make demo-all` prints it)."""
    from wsseg_core.report import format_methods_table, methods_table

    # The papers' agreement is over patients with tumour: the `tumour` subset (issue 18).
    return (f"ours ({split} split, tumour-bearing studies) beside the papers' (paper values in the "
            f"'paper' columns):\n" + format_methods_table(methods_table(summary, icc, subset="tumour")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder holding metrics/")
    p.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    p.add_argument("--no-figures", action="store_true",
                   help="skip figures/*.png and report.html (tables only)")
    p.add_argument("--papers", action="store_true",
                   help="also print every method beside the papers' numbers (wsseg_core.report.methods_table)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    res = analyze(args.out, args.split, figures=not args.no_figures)
    print(f"split={args.split}: {res['n_studies']} studies")
    print(format_gate(res["classifier_gate"]))
    if warn := format_not_learned(res["not_learned"]):
        print(warn)
    if notes := format_notes(res["notes"]):
        print(notes)
    print(format_report(res["icc"], res["summary"], res["slice_auc"], res["comparisons"]))
    if args.papers:
        print("\n" + format_papers(res["icc"], res["summary"], args.split))
    if res["report"] is not None:
        print(f"report: {res['report']}  ({len(res['figures'])} figures in {Path(args.out) / 'figures'})")
    return res


if __name__ == "__main__":
    main()
