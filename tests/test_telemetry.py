"""jobs.telemetry: the progress arithmetic, error kinds and stage clock (pure), and recording that
never raises. The metrics' way to Prometheus is tested in tests/test_metrics_export.py."""

from __future__ import annotations

import gzip
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest

from jobs.telemetry import (METRICS, BestSoFar, ProgressLog, StageClock, error_kind,
                            format_duration, progress_line, record, record_epoch)


def test_format_duration_by_hand():
    assert format_duration(0) == "0 s"
    assert format_duration(59.4) == "59 s"
    assert format_duration(60) == "1 min 00 s"
    assert format_duration(3599) == "59 min 59 s"
    assert format_duration(3600 + 7 * 60 + 29) == "1 h 07 min"
    assert format_duration(float("nan")) == "?"
    assert format_duration(float("inf")) == "?"
    assert format_duration(-1) == "?"


def test_progress_line_rate_and_eta_by_hand():
    # 120 of 1000 studies in 1200 s: 0.1 studies/s = 6.0/min; 880 left / 0.1 = 8800 s = 2 h 26 min 40 s
    assert progress_line(120, 3, 1000, 1200.0) == (
        "progress: 120/1000 studies (12.0%), 3 failed, 6.0 studies/min, elapsed 20 min 00 s, "
        "ETA 2 h 26 min")
    # 5 of 8 in 50 s: 6 studies/min, 3 left at 0.1/s = 30 s
    assert progress_line(5, 0, 8, 50.0) == (
        "progress: 5/8 studies (62.5%), 0 failed, 6.0 studies/min, elapsed 50 s, ETA 30 s")
    # nothing back yet: no rate, no ETA
    assert progress_line(0, 0, 10, 0.0) == (
        "progress: 0/10 studies (0.0%), 0 failed, ? studies/min, elapsed 0 s, ETA ?")
    assert progress_line(0, 0, 10, 30.0).endswith("0.0 studies/min, elapsed 30 s, ETA ?")
    assert progress_line(4, 1, 4, 8.0).endswith("elapsed 8 s, ETA 0 s")


def test_progress_log_every_n_studies_or_every_minute(caplog):
    t = iter([0.0, 1.0, 2.0, 3.0, 70.0, 71.0, 75.0])
    log = logging.getLogger("test.progress")
    p = ProgressLog(6, every_n=3, every_s=60.0, log=log, now=lambda: next(t))
    with caplog.at_level(logging.INFO, logger="test.progress"):
        assert p.add("ok") is None          # t=1: 1 study
        assert p.add("failed") is None      # t=2: 2 studies
        line3 = p.add("ok")                 # t=3: 3 studies since the start -> a line
        line4 = p.add("ok")                 # t=70: 67 s since the last line -> a line
        assert p.add("ok") is None          # t=71: 1 study, 1 s
        last = p.finish()                   # t=75: 5 of 6, not logged yet -> a line
    assert line3 == progress_line(3, 1, 6, 3.0)
    assert line4 == progress_line(4, 1, 6, 70.0)
    assert last == progress_line(5, 1, 6, 75.0)
    assert [r.getMessage() for r in caplog.records] == [line3, line4, last]
    assert p.finish() is None  # nothing new since the last line


def test_stage_clock_sums_a_stage_and_skips_one_that_raised():
    t = iter([0.0, 1.5, 2.0, 2.25, 3.0, 3.5, 10.0, 99.0])
    clock = StageClock(now=lambda: next(t))
    with clock.stage("read"):            # 0.0 -> 1.5
        pass
    with clock.stage("metrics"):         # 2.0 -> 2.25
        pass
    with clock.stage("metrics"):         # 3.0 -> 3.5: summed with the first
        pass
    with pytest.raises(RuntimeError):
        with clock.stage("write"):       # 10.0 -> raised: not timed
            raise RuntimeError("bad study")
    assert clock.flush() == {"read": 1.5, "metrics": 0.75}
    assert clock.flush() == {}  # one value per stage per study: flushed means started over


def test_best_so_far():
    b = BestSoFar("max")
    assert [b.update(v) for v in (0.2, float("nan"), 0.1, None, 0.5, True)] == [
        True, False, False, False, True, False]
    assert b.best == 0.5
    m = BestSoFar("min")
    assert [m.update(v) for v in (3.0, 4.0, 1.0)] == [True, False, True] and m.best == 1.0
    with pytest.raises(ValueError):
        BestSoFar("median")


def test_error_kind_of_the_loaders_own_messages(scoring_study, tmp_path):
    """Every kind from a real StudyError of wsseg_core.data.load_study, not from copied texts."""
    from wsseg_core.data import StudyError, StudyRef, load_study

    ref, _ = scoring_study

    def fails(**change) -> str:
        with pytest.raises(StudyError) as e:
            load_study(StudyRef(**{**ref.to_dict(), **change}))
        return str(e.value)

    def copy(name: str, src: str) -> str:
        p = tmp_path / name
        shutil.copyfile(src, p)
        return str(p)

    suv_img = nib.load(ref.suv_path)
    suv = np.asarray(suv_img.dataobj, dtype=np.float32)
    truncated = tmp_path / "trunc.nii.gz"
    raw = open(ref.suv_path, "rb").read()
    truncated.write_bytes(raw[: len(raw) // 2])
    not_nifti = tmp_path / "csv.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"a,b\n1,2\n"))
    nan_suv = suv.copy()
    nan_suv[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan_suv, suv_img.affine), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([suv, suv], -1), suv_img.affine), tmp_path / "4d.nii.gz")
    seg = np.asarray(nib.load(ref.seg_path).dataobj)
    nib.save(nib.Nifti1Image(seg[:, :, :10], suv_img.affine), tmp_path / "seg.nii.gz")

    assert error_kind(fails(suv_path=str(tmp_path / "absent.nii.gz"))) == "missing_file"
    assert error_kind(fails(ct_path=str(tmp_path / "absent.nii.gz"))) == "missing_file"
    assert error_kind(fails(suv_path=str(truncated))) == "unreadable"
    assert error_kind(fails(suv_path=str(not_nifti))) == "unreadable"
    assert error_kind(fails(suv_path=str(tmp_path / "nan.nii.gz"))) == "invalid_values"
    assert error_kind(fails(suv_path=str(tmp_path / "4d.nii.gz"))) == "invalid_geometry"
    assert error_kind(fails(seg_path=str(tmp_path / "seg.nii.gz"))) == "grid_mismatch"
    assert error_kind(f"{copy('x', ref.suv_path)}: RuntimeError: CUDA out of memory") == "other"
    assert error_kind(None) == "other"


def test_recording_never_raises_and_warns_once(caplog):
    """A metric error (here a tag the metric does not have: ray.util.metrics raises ValueError) is
    logged once per metric and never reaches the caller."""
    with caplog.at_level(logging.WARNING, logger="wsseg.telemetry"):
        assert record("wsseg_studies_scored", 1, method="CAM") is False  # `split` missing
        assert record("wsseg_studies_scored", 1, method="CAM") is False
    warnings = [r for r in caplog.records if "wsseg_studies_scored" in r.getMessage()]
    assert len(warnings) == 1 and "split" in warnings[0].getMessage()
    # values that cannot be recorded are skipped, not errors
    assert record("wsseg_studies_failed", float("nan"), method="CAM", split="test", error_kind="x") is False
    assert record("wsseg_studies_failed", 0, method="CAM", split="test", error_kind="x") is False
    assert record("wsseg_studies_failed", 1, method="CAM", split=None, error_kind="x") is True
    assert record("wsseg_stage_seconds", 0.5, stage="read") is True
    record_epoch("classifier", {"epoch": 2, "train_loss": 0.3, "val_auc": float("nan"),
                                "val_dice": 0.0, "val_dice_defined": False})  # must not raise


def test_metric_names_are_valid_and_counters_do_not_end_in_total():
    """Ray appends `_total` to a counter's Prometheus name; `ray_` + name must be a valid name."""
    import re

    for name, spec in METRICS.items():
        assert re.fullmatch(r"wsseg_[a-z_]+", name), name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert not (spec.kind == "counter" and name.endswith("_total")), name
        assert list(spec.boundaries) == sorted(spec.boundaries)
        assert (spec.kind == "histogram") == bool(spec.boundaries), name


def test_grafana_dashboard_plots_every_metric_under_its_exported_name():
    """docs/grafana_wsseg.json queries the names Ray exports (`ray_` + name, `_total` for counters,
    `_bucket` for histograms) of metrics that exist, and plots every one of them."""
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[1] / "docs" / "grafana_wsseg.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bray_wsseg_[a-z_]+", e)}
    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}
    exported = {f"ray_{name}{suffix[spec.kind]}" for name, spec in METRICS.items()}
    assert used == exported
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("env, seconds", [(None, 5.0), ("1000", 0.5), ("200", 0.5), ("30000", 15.0),
                                          ("junk", 5.0)])
def test_gauges_are_refreshed_every_half_export_interval(monkeypatch, env, seconds):
    """Ray exports every max(RAY_metrics_report_interval_ms, 1000) ms (10 s by default) and evicts a
    gauge after two exports without it: re-set at half that interval."""
    from jobs.telemetry import gauge_refresh_s

    if env is None:
        monkeypatch.delenv("RAY_metrics_report_interval_ms", raising=False)
    else:
        monkeypatch.setenv("RAY_metrics_report_interval_ms", env)
    assert gauge_refresh_s() == seconds
