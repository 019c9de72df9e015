"""The thresholds.json format (wsseg_core.thresholds): merging searches' entries, the paper's
fallback and the flag threshold."""

from __future__ import annotations

import json

from wsseg_core.thresholds import (PAPER_THRESHOLDS, THRESHOLD_REFERENCE, load_flag_threshold,
                                   load_thresholds, update_thresholds)


def test_each_search_keeps_the_entries_of_the_others(tmp_path):
    path = tmp_path / "run" / "thresholds.json"
    update_thresholds(path, {"CAM": {"t": 0.5, "q": 40.0}}, tune_on="val", n_tune_studies=3)
    update_thresholds(path, {"MIP-CAM": {"t": 0.4, "q": 30.0}}, gate_threshold=0.5)
    update_thresholds(path, {"CAM": {"t": 0.6, "q": 41.0}})  # a rerun replaces its own entry only
    rec = json.loads(path.read_text())
    assert rec["methods"] == {"CAM": {"t": 0.6, "q": 41.0}, "MIP-CAM": {"t": 0.4, "q": 30.0}}
    assert (rec["source"], rec["tune_on"], rec["n_tune_studies"], rec["gate_threshold"]) == (
        "tuned", "val", 3, 0.5)
    assert [p.name for p in path.parent.iterdir()] == ["thresholds.json"]  # no temp file left
    got = load_thresholds(path)
    assert got["CAM"] == {"t": 0.6, "q": 41.0, "source": "tuned"}
    assert got["MIP-CAM"]["source"] == "tuned"
    assert got["GradCAM"] == {"t": 0.2, "q": 35.0, "source": "paper"}  # never tuned: the paper's


def test_untuned_threshold_baseline_uses_the_pipelines_reference(tmp_path):
    from wsseg_core import segment

    got = load_thresholds(tmp_path / "absent.json")
    assert got["Threshold"] == {"q": 31.0, "reference": "max", "source": "default"}
    assert THRESHOLD_REFERENCE == "max"
    # one definition: the segmenters' module re-exports it, it does not define another
    assert segment.THRESHOLD_REFERENCE is THRESHOLD_REFERENCE
    assert segment.PAPER_THRESHOLDS is PAPER_THRESHOLDS
    assert {m: (e["t"], e["q"]) for m, e in got.items() if m != "Threshold"} == PAPER_THRESHOLDS


def test_flag_threshold_from_the_file_else_the_papers(tmp_path):
    path = tmp_path / "thresholds.json"
    assert load_flag_threshold(None) == 0.5
    assert load_flag_threshold(path) == 0.5
    update_thresholds(path, {})
    assert load_flag_threshold(path) == 0.5
    update_thresholds(path, {}, flag_threshold=0.37)
    assert load_flag_threshold(path) == 0.37
