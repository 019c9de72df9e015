"""analyze's figures and HTML report on a hand-made run folder (no Ray), and the scorer's new columns."""

from __future__ import annotations

import logging
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("CAM", "Threshold")


def _metrics_frame(with_extra: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        for m in METHODS:
            true = 10.0 * (i + 1)
            pred = true * (1.2 if m == "CAM" else 0.9) + rng.normal(0, 2)
            row = {"patient_id": f"P{i}", "study_id": "s 1", "split": "test" if i < 4 else "train",
                   "method": m, "status": "ok", "error": None, "dice": 0.1 * (i + 1) if i else np.nan,
                   "mtv_true_ml": true if i else 0.0, "mtv_pred_ml": pred, "tlg_true_g": 5 * true,
                   "tlg_pred_g": 5 * pred, "voxel_volume_ml": 0.01, "suv_path": "x", "seg_path": "y",
                   "mask_path": "z"}
            if with_extra:
                row.update({"fpv_ml": float(i), "fnv_ml": np.nan if i == 0 else 2.0, "hd95_mm": 3.0 * i,
                            "ude_mm": np.nan if i == 0 else 1.0 * i,
                            "n_ref_lesions": 0 if i == 0 else 2, "n_ref_detected": 0 if i == 0 else 1,
                            "n_pred_lesions": 2, "n_pred_false": 1})
            rows.append(row)
    rows.append({**rows[-1], "patient_id": "P9", "status": "failed", "split": "test",
                 "mtv_pred_ml": np.nan, "dice": np.nan})
    return pd.DataFrame(rows)


def _fake_run(root: Path, with_extra: bool = True, slices: bool = True) -> Path:
    out = root / "run"
    (out / "metrics").mkdir(parents=True)
    df = _metrics_frame(with_extra)
    df.to_parquet(out / "metrics" / "part-0.parquet", index=False)
    if slices:
        (out / "slices").mkdir()
        # P1 (test): positives 0.9, 0.6; negatives 0.7, 0.1 -> 3 of 4 pairs ordered: AUC 0.75
        pd.DataFrame({"patient_id": "P1", "study_id": "s 1", "split": "test", "z": [0, 1, 2, 3],
                      "prob": [0.9, 0.6, 0.7, 0.1], "label": [True, True, False, False]}
                     ).to_parquet(out / "slices" / "P1.parquet")
        # P2 (test): one positive 0.8, one negative 0.2; and a stale study not in metrics
        pd.DataFrame({"patient_id": "P2", "study_id": "s 1", "split": "test", "z": [0, 1],
                      "prob": [0.8, 0.2], "label": [True, False]}).to_parquet(out / "slices" / "P2.parquet")
        pd.DataFrame({"patient_id": "gone", "study_id": "s", "split": "test", "z": [0, 1],
                      "prob": [0.0, 1.0], "label": [True, False]}).to_parquet(out / "slices" / "gone.parquet")
    return out


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "link":
            self.links.append(a.get("href", ""))


def _check_report(out: Path) -> list[str]:
    from urllib.parse import unquote

    page = (out / "report.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(page)
    assert not parser.links, "CSS must be inline: the page opens from file:// on its own"
    for src in parser.srcs:
        assert not src.startswith(("/", "http", "file:")), src  # relative links only
        f = out / unquote(src)
        assert f.is_file(), src
        assert f.read_bytes()[:8] == PNG_MAGIC
    return parser.srcs


def test_analyze_figures_and_report(tmp_path, caplog):
    from jobs import analyze

    out = _fake_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="wsseg.analyze"):
        res = analyze.analyze(out, split="test")
    assert "CAM overlay figures skipped" in caplog.text  # no classifier in this run
    names = {p.name for p in res["figures"]}
    assert names == {"dice_boxplot.png", "mtv_scatter.png", "tlg_scatter.png", "mtv_bland_altman.png",
                     "tlg_bland_altman.png", "table1.png"}
    for p in res["figures"]:
        assert p.parent == out / "figures" and p.read_bytes()[:8] == PNG_MAGIC
    srcs = _check_report(out)
    assert {Path(s).name for s in srcs} == names
    assert not list((out / "figures").glob(".*")), "no temp files left behind"
    # pooled slice AUC over P1 and P2 (stale 'gone' ignored): positives .9 .6 .8, negatives .7 .1 .2
    # -> pairs ordered: .9 > all 3, .6 > .1 .2, .8 > all 3 = 8 of 9
    auc = res["slice_auc"].set_index("split")
    assert auc.loc["test", "auc"] == pytest.approx(8 / 9)
    assert auc.loc["test", "n_slices"] == 6 and auc.loc["test", "n_tumour_slices"] == 3
    assert math.isnan(auc.loc["train", "auc"])
    assert pd.read_parquet(out / "slice_auc.parquet").shape[0] == 4
    s = res["summary"][res["summary"]["subset"] == "all"].set_index("method")
    # test rows P0..P3: FPV 0,1,2,3 -> median 1.5; FNV NaN,2,2,2 -> 2; lesions hit 3 of 6
    assert s.loc["CAM", "fpv_median_ml"] == pytest.approx(1.5)
    assert s.loc["CAM", "fnv_median_ml"] == pytest.approx(2.0)
    assert s.loc["CAM", "detection_rate"] == pytest.approx(0.5)
    assert s.loc["CAM", "false_lesions_per_study"] == pytest.approx(1.0)
    assert s.loc["CAM", "ude_median_mm"] == pytest.approx(2.0)  # test rows P1..P3: UDE 1, 2, 3
    # Subset "tumour" (issue 18 item 2): P0's reference MTV is 0, so P1..P3 only: FPV 1,2,3 -> 2
    t = res["summary"][res["summary"]["subset"] == "tumour"].set_index("method")
    assert t.loc["CAM", "n"] == 3 and s.loc["CAM", "n"] == 4
    assert t.loc["CAM", "fpv_median_ml"] == pytest.approx(2.0)
    icc = pd.read_parquet(out / "icc.parquet")
    assert list(icc.columns[:3]) == ["split", "subset", "method"]
    assert sorted(set(zip(icc["subset"], icc["method"], icc["quantity"]))) == sorted(
        (sub, m, q) for sub in ("tumour", "all") for m in METHODS for q in ("MTV", "TLG"))
    n = icc.set_index(["subset", "method", "quantity"])["n"]
    assert n[("tumour", "CAM", "MTV")] == 3 and n[("all", "CAM", "MTV")] == 4
    assert set(pd.read_parquet(out / "summary.parquet")["subset"]) == {"tumour", "all"}
    # Paired comparisons (item 6): CAM vs Threshold per patient, both subsets
    comp = pd.read_parquet(out / "comparisons.parquet")
    assert set(comp["subset"]) == {"tumour", "all"} and set(comp["metric"]) == {"dice", "abs_dmtv_ml"}
    row = comp[(comp["subset"] == "tumour") & (comp["metric"] == "dice")].iloc[0]
    assert (row["method_a"], row["method_b"], row["n"]) == ("CAM", "Threshold", 3)
    assert row["median_diff"] == 0.0  # the frame gives both methods the same Dice
    text = analyze.format_report(res["icc"], res["summary"], res["slice_auc"], res["comparisons"])
    assert "UDE mm" in text and "studies with tumour" in text
    assert "CAM vs Threshold" in text and "Holm" in text
    assert "FPV ml" in text and "slice-level classifier AUC: " in text and "test 0.889" in text
    # the one-screen table is the tumour subset's: CAM's n is 3, not 4
    cam_line = next(line for line in text.splitlines() if line.startswith("CAM "))
    assert cam_line.split()[1] == "3"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "studies with tumour" in page and "over all studies" in page
    assert "Paired comparisons between methods" in page and "CAM vs Threshold" in page
    # one row per method in the autoPET table (the shown subset), not one per subset
    autopet = page.split("autoPET metrics")[1].split("</table>")[0]
    assert autopet.count("<td>CAM</td>") == 1


def test_a_network_that_did_not_learn_opens_the_report(tmp_path):
    """thresholds.json's `not_learned` (jobs.train_boxfcn.not_learned_reason) heads report.html."""
    import json

    from jobs import analyze

    out = _fake_run(tmp_path)
    res = analyze.analyze(out, split="test")
    assert res["not_learned"] == {} and "did not learn" not in (out / "report.html").read_text()
    why = "BoxFCN did not learn: median validation Dice 0.048 < 0.1 <at 0.5>"
    (out / "thresholds.json").write_text(json.dumps({"methods": {"BoxFCN": {"not_learned": why}}}))
    res = analyze.analyze(out, split="test")
    assert res["not_learned"] == {"BoxFCN": why}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.index("Networks that did not learn") < page.index("Classifier quality gate")
    assert "0.048 &lt; 0.1 &lt;at 0.5&gt;" in page  # escaped
    # A validation note (MIP-CAM's gate passing every tumour-free study) follows the warnings.
    note = "MIP-CAM's study gate (p >= 0.5) passed all 1 tumour-free validation studies"
    (out / "thresholds.json").write_text(json.dumps(
        {"methods": {"BoxFCN": {"not_learned": why}, "MIP-CAM": {"note": note}}}))
    res = analyze.analyze(out, split="test")
    assert res["notes"] == {"MIP-CAM": note}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert (page.index("Networks that did not learn") < page.index("Notes from validation")
            < page.index("Classifier quality gate"))
    assert "p &gt;= 0.5" in page


def test_analyze_tolerates_old_metrics_and_no_figures(tmp_path, capsys):
    from jobs import analyze

    out = _fake_run(tmp_path, with_extra=False, slices=False)
    res = analyze.main(["--out", str(out), "--no-figures"])  # main sets up logging on stderr
    err = capsys.readouterr().err
    assert "metrics lack fpv_ml" in err and "slice AUC skipped" in err
    assert res["slice_auc"] is None and res["report"] is None and not (out / "figures").exists()
    assert res["summary"]["fpv_median_ml"].isna().all()
    assert "FPV" not in analyze.format_report(res["icc"], res["summary"], None)
    # figures still work without the optional columns
    res = analyze.analyze(out, split="test")
    assert len(res["figures"]) == 6
    assert "Not in this run" in (out / "report.html").read_text()
    _check_report(out)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """Two 64x64x32 phantom studies, a tiny untrained classifier, scored with the Ray Data actor's
    class called directly (no Ray)."""
    import torch

    from jobs.common import RunLayout, write_manifest
    from jobs.score_cohort import StudyScorer
    from wsseg_core.thresholds import load_thresholds
    from wsseg_core.models import build_slice_classifier, save_classifier
    from wsseg_core.phantom import write_phantom_cohort

    root = tmp_path_factory.mktemp("scored")
    refs = write_phantom_cohort(root / "cohort", n=2, shape=(64, 64, 32), seed=1, negative_fraction=0.5)
    refs = [type(r)(**{**r.to_dict(), "split": "test"}) for r in refs]
    out = root / "out"
    layout = RunLayout(out)
    write_manifest(refs, layout.cohort)
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small")
    with torch.no_grad():  # bias toward "tumour" so slices are flagged and CAMs get masks
        model.fc.bias.copy_(torch.tensor([-2.0, 2.0]))
    save_classifier(layout.classifier, model, pre)
    threads = torch.get_num_threads()
    try:
        scorer = StudyScorer(load_thresholds(None), str(out),
                             methods=["CAM", "Threshold"])  # ScoreCAM on every slice: slow
        rows = [r for ref in refs for r in scorer.score(**ref.to_dict())]
    finally:
        torch.set_num_threads(threads)
    return out, refs, rows


def test_scorer_writes_new_columns_and_slices(scored_run):
    import pyarrow as pa

    from jobs.score_cohort import METRICS_SCHEMA, slice_table_path

    out, refs, rows = scored_run
    table = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)  # the new columns fit the schema
    df = table.to_pandas()
    assert (df["status"] == "ok").all(), df["error"].tolist()
    names = METRICS_SCHEMA.names
    assert names[:15] == ["patient_id", "study_id", "split", "method", "status", "error", "dice",
                          "mtv_true_ml", "mtv_pred_ml", "tlg_true_g", "tlg_pred_g", "voxel_volume_ml",
                          "suv_path", "seg_path", "mask_path"]
    for col in ("fpv_ml", "fnv_ml", "hd95_mm", "ude_mm", "n_ref_lesions", "n_ref_detected", "n_pred_lesions",
                "n_pred_false", "slice_auc"):
        assert col in names
    neg = df[df["mtv_true_ml"] == 0]
    assert len(neg) and neg["fnv_ml"].isna().all() and (neg["n_ref_lesions"] == 0).all()
    assert np.allclose(neg["fpv_ml"], neg["mtv_pred_ml"])  # negative study: every prediction is false
    assert neg["slice_auc"].isna().all()  # one class only
    for ref in refs:
        sl = pd.read_parquet(slice_table_path(out, ref.patient_id, ref.study_id))
        assert list(sl.columns) == ["patient_id", "study_id", "split", "z", "prob", "label"]
        assert len(sl) == 32 and sl["prob"].between(0, 1).all()


def test_cam_overlays_with_a_real_classifier(scored_run, monkeypatch):
    """Also: the figure's masks come from the method registry as scoring's do, so on the figure's
    slice they equal the scored mask file."""
    import nibabel as nib

    from jobs import analyze
    from jobs.common import RunLayout
    from wsseg_core import report

    out, refs, rows = scored_run
    drawn = []
    real = report.cam_figure

    def recording_cam_figure(suv, ct, seg, cams, masks, path, **kw):
        drawn.append((masks, Path(path)))
        return real(suv, ct, seg, cams, masks, path, **kw)

    monkeypatch.setattr(report, "cam_figure", recording_cam_figure)
    df = pd.DataFrame(rows)
    written = analyze.cam_overlays(out, df)
    assert len(written) == 1  # one study has tumour (the other is a negative control)
    assert written[0].read_bytes()[:8] == PNG_MAGIC and written[0].parent == out / "figures"
    masks, path = drawn[0]
    z = int(path.stem.rsplit("_z", 1)[1])
    row = next(r for r in rows if r["method"] == "CAM" and r["mtv_true_ml"] > 0)
    assert path.stem.startswith("cam_" + row["patient_id"])
    scored = np.asarray(nib.load(RunLayout(out).out / row["mask_path"]).dataobj)[:, :, z] > 0
    assert masks["CAM"].dtype == bool and np.array_equal(masks["CAM"], scored)
    assert scored.any()  # not two empty slices


def test_cam_overlays_flag_slices_at_the_runs_flag_threshold(scored_run, monkeypatch, tmp_path):
    """The figure shows a slice as flagged when scoring flagged it: at the flag threshold chosen for
    the run (thresholds.json), not at the paper's 0.5. The biased classifier gives p ~ 0.98."""
    import shutil

    from jobs import analyze
    from jobs.common import RunLayout
    from wsseg_core import report
    from wsseg_core.thresholds import update_thresholds

    src, refs, rows = scored_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    titles = []
    real = report.cam_figure

    def recording_cam_figure(*args, title="", **kw):
        titles.append(title)
        return real(*args, title=title, **kw)

    monkeypatch.setattr(report, "cam_figure", recording_cam_figure)
    df = pd.DataFrame(rows)
    analyze.cam_overlays(out, df)  # no thresholds.json: the paper's 0.5 flags every slice
    update_thresholds(RunLayout(out).thresholds, {}, flag_threshold=0.999)
    analyze.cam_overlays(out, df)
    assert len(titles) == 2
    assert "not flagged" not in titles[0] and "flag threshold 0.50" in titles[0]
    assert "not flagged by the classifier" in titles[1] and "flag threshold 1.00" in titles[1]

