"""The pipeline stops before tuning and scoring when the classifier did not learn, says what it
measured, and goes on (recording it) with --allow-weak-classifier."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from wsseg_core.phantom import write_phantom_cohort

    root = tmp_path_factory.mktemp("gate")
    write_phantom_cohort(root / "cohort", n=6, shape=(48, 48, 24), seed=5)
    return root


def test_untrained_classifier_stops_the_pipeline_then_allow_goes_on(cohort, ray_cluster):
    from jobs import pipeline

    # lr 0: one epoch that leaves the random initialisation as it was (a classifier that did not
    # learn); BN running statistics still move, as they would in a collapsed run.
    common = ["--cohort", str(cohort / "cohort"), "--epochs", "1", "--lr", "0", "--methods", "CAM"]
    out = cohort / "stopped"
    with pytest.raises(SystemExit) as stop:
        pipeline.main([*common, "--out", str(out)])
    msg = str(stop.value)
    assert "CLASSIFIER GATE FAILED" in msg and "slice AUC" in msg and "Try:" in msg
    assert "--train-seed" in msg  # what to try names the options that exist
    assert "--allow-weak-classifier" in msg
    run = json.loads((out / "run.json").read_text())
    assert run["status"].startswith("stopped") and run["classifier_gate"]["passed"] is False
    assert not (out / "metrics").exists() and not (out / "tune").exists()  # nothing tuned or scored

    out2 = cohort / "allowed"
    run2 = pipeline.main([*common, "--out", str(out2), "--allow-weak-classifier"])
    assert run2["classifier_gate"]["passed"] is False and run2["classifier_gate"]["allowed_weak"] is True
    assert "allow-weak-classifier" in run2["status"]
    assert (out2 / "metrics").exists()
    assert "FAILED" in (out2 / "report.html").read_text()
