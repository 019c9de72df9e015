"""The project's metrics reach Prometheus: a head started with `--metrics-export-port`, a tiny cohort
(one good study, one truncated) scored by `python -m jobs.score_cohort` against it, and the node's
metrics endpoint read over HTTP until the counters match the rows written."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from jobs.telemetry import FLAGGED_BUCKETS, FRACTION_BUCKETS, SECONDS_BUCKETS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: Path) -> None:
    """Stop this head only (`ray stop` would stop every cluster on the machine): every process it
    started carries its temp dir on the command line. SIGTERM, then SIGKILL what is left."""
    def pids() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(10):
            if not pids():
                return
            time.sleep(0.5)


@pytest.fixture
def metrics_head():
    """A Ray head (2 CPUs, no dashboard UI) exporting Prometheus metrics on a free port; its own
    ports and temp dir so it never meets the test session's cluster. Yields (gcs address, metrics
    URL, env for drivers); always stopped at the end."""
    # Short: Ray's socket paths live under the temp dir and AF_UNIX caps them at 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="wsm", dir="/tmp"))
    gcs, mport = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO),
           # Workers push their metrics every second instead of every 10 s: a shorter test.
           "RAY_metrics_report_interval_ms": "1000", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    start = [ray_cli, "start", "--head", "--num-cpus", "2", "--port", str(gcs),
             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(tmp / "ray"),
             "--metrics-export-port", str(mport), "--ray-client-server-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()),
             "--dashboard-agent-grpc-port", str(_free_port())]
    try:
        subprocess.run(start, check=True, env=env, cwd=REPO, timeout=180, capture_output=True)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{mport}/metrics", env
    finally:
        _kill_cluster(tmp / "ray")
        shutil.rmtree(tmp, ignore_errors=True)


def _samples(url: str) -> list:
    """Every sample the node exports now (prometheus_client's parser, which Ray itself ships with)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _total(samples: list, name: str, **labels: str) -> float:
    """Sum over every series (one per worker process) of `name` whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _cumulative(samples: list, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts {upper bound: count}, summed over series."""
    out: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            le = float(s.labels["le"])
            out[le] = out.get(le, 0.0) + s.value
    return out


def test_scored_and_failed_counters_equal_the_rows_written(metrics_head, scoring_layout, tmp_path):
    address, url, env = metrics_head
    layout, ref = scoring_layout
    bad = tmp_path / "bad" / "study 1"
    bad.mkdir(parents=True)
    for f in ("SUV", "CTres", "SEG"):
        shutil.copyfile(getattr(ref, {"SUV": "suv_path", "CTres": "ct_path", "SEG": "seg_path"}[f]),
                        bad / f"{f}.nii.gz")
    raw = (bad / "SUV.nii.gz").read_bytes()
    (bad / "SUV.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated: a failed study
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame([{**ref.to_dict(), "split": "test"},
                  {**ref.to_dict(), "patient_id": "bad", "study_id": "study 1", "split": "test",
                   "suv_path": str(bad / "SUV.nii.gz"), "ct_path": str(bad / "CTres.nii.gz"),
                   "seg_path": str(bad / "SEG.nii.gz")}]).to_csv(manifest, index=False)

    job = subprocess.run([sys.executable, "-m", "jobs.score_cohort", "--cohort", str(manifest),
                          "--out", str(layout.out), "--address", address, "--methods", "CAM", "Threshold",
                          "--concurrency", "1"],
                         env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert job.returncode == 0, job.stdout + job.stderr[-4000:]
    # The job log says where the run is: done, failed, rate and ETA.
    assert "progress: 2/2 studies (100.0%), 1 failed," in job.stderr

    rows = pd.read_parquet(layout.metrics)
    ok = rows[rows.status == "ok"]
    failed = rows[rows.status == "failed"]
    assert len(ok) == 2 and len(failed) == 2  # one study x two methods each

    deadline = time.monotonic() + 60  # metrics reach the endpoint every second or two
    while True:
        samples = _samples(url)
        scored = _total(samples, "ray_wsseg_studies_scored_total")
        n_failed = _total(samples, "ray_wsseg_studies_failed_total")
        if (scored, n_failed) == (len(ok), len(failed)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (scored, n_failed) == (len(ok), len(failed)), sorted({s.name for s in samples})
    for m in ("CAM", "Threshold"):
        assert _total(samples, "ray_wsseg_studies_scored_total", method=m, split="test") == 1
        assert _total(samples, "ray_wsseg_studies_failed_total", method=m, split="test",
                      error_kind="unreadable") == 1

    # Once the last counter is in, every histogram of the same actor has been pushed with it.
    assert _total(samples, "ray_wsseg_study_seconds_count", status="ok") == 1
    assert _total(samples, "ray_wsseg_study_seconds_count", status="failed") == 1
    # Ray 2.60 exports a histogram's _sum from bucket midpoints, not the values: check the buckets,
    # each study's value in the cumulative count of every bound at or above it.
    seconds = rows.groupby(["patient_id", "study_id"])["seconds"].first()
    assert _cumulative(samples, "ray_wsseg_study_seconds") == {
        b: int((seconds <= b).sum()) for b in SECONDS_BUCKETS + [float("inf")]}
    # the good study passes every stage; the truncated one fails in `read` and only writes its rows
    for stage in ("read", "classify", "cams", "segment", "metrics"):
        assert _total(samples, "ray_wsseg_stage_seconds_count", stage=stage) == 1, stage
    assert _total(samples, "ray_wsseg_stage_seconds_count", stage="write") == 2
    assert _total(samples, "ray_wsseg_flagged_slices_count") == 1
    flagged, n_slices = int(ok["n_flagged_slices"].iloc[0]), int(ok["n_slices"].iloc[0])
    assert _cumulative(samples, "ray_wsseg_flagged_slices") == {
        b: int(flagged <= b) for b in FLAGGED_BUCKETS + [float("inf")]}
    assert _cumulative(samples, "ray_wsseg_flagged_slice_fraction") == {
        b: int(flagged / n_slices <= b) for b in FRACTION_BUCKETS + [float("inf")]}
