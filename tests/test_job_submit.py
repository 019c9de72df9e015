"""The README's cluster path for real: `ray start --head`, `ray job submit`, the job API, `ray stop`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _ray_cli() -> str:
    cli = Path(sys.executable).with_name("ray")
    return str(cli) if cli.exists() else shutil.which("ray")


def test_submitted_pipeline_succeeds_and_writes_parquet(stop_ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    import tempfile

    ray_cli = _ray_cli()
    # Short on purpose: Ray's socket paths live under the temp dir and AF_UNIX caps them at 107 bytes.
    tmp_path = Path(tempfile.mkdtemp(prefix="wsj", dir="/tmp"))
    # Its own ports and temp dir, so it never collides with the session cluster of other tests.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # As the README's `source .venv/bin/activate`: the job's `python` must be this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dash = 8365
    start = [ray_cli, "start", "--head", "--num-cpus", "2", "--port", "6391",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--temp-dir", str(tmp_path / "ray"),
             # Own agent ports: another local cluster (e.g. the test session's) holds the defaults.
             "--dashboard-agent-listen-port", "52391", "--dashboard-agent-grpc-port", "52392",
             "--metrics-export-port", "52393"]
    subprocess.run(start, check=True, env=env, cwd=REPO, timeout=180)
    try:
        address = f"http://127.0.0.1:{dash}"
        out = tmp_path / "out"
        submit = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO),
                  "--no-wait", "--submission-id", "wsseg-test", "--",
                  # A small job: this tests the submission, not the pipeline (test_pipeline does),
                  # but still the normal path: 5 patients split 3/1/1, so one validation study.
                  # One epoch need not clear the classifier gate (tests/test_pipeline_gate.py
                  # tests the gate).
                  "python", "-m", "jobs.pipeline", "--out", str(out), "--phantom-n", "5",
                  "--phantom-shape", "48", "48", "24", "--epochs", "1",
                  "--methods", "CAM", "Threshold", "--allow-weak-classifier"]
        # The job agent comes up a little after `ray start` returns ("No available agent to submit
        # job"): retry for a while, as a user would.
        for _ in range(30):
            done = subprocess.run(submit, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
            if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout + done.stderr
        os.environ["RAY_AUTH_MODE"] = "token"
        client = JobSubmissionClient(address)
        deadline = time.time() + 600
        status = client.get_job_status("wsseg-test")
        while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
            time.sleep(3)
            status = client.get_job_status("wsseg-test")
        logs = client.get_job_logs("wsseg-test")
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "metrics Parquet" in logs
        df = pd.read_parquet(out / "metrics")
        assert set(df["method"]) == {"CAM", "Threshold"} and len(df) == 2 * 5
        assert (df["status"] == "ok").all()
        assert (out / "icc.parquet").exists() and (out / "run.json").exists()
        cohort = pd.read_parquet(out / "cohort.parquet")
        assert sorted(cohort["split"]) == ["test", "train", "train", "train", "val"]
        rec = json.loads((out / "run.json").read_text())
        assert math.isfinite(rec["classifier"]["best_epoch_metrics"]["val_auc"])
        assert json.loads((out / "thresholds.json").read_text())["n_val_studies"] == 1
    finally:
        stop_ray_head(tmp_path / "ray", wait_s=20, gcs_port=6391)
        shutil.rmtree(tmp_path, ignore_errors=True)

