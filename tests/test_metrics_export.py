"""The project's metrics reach Prometheus: a head started with `--metrics-export-port`, a tiny cohort
(one good study, one truncated) scored by `python -m jobs.score_cohort` against it, and the node's
metrics endpoint read over HTTP until the counters match the rows written; then a toy Ray Train run
(through `jobs.ray_train.fit_best`) and a toy Tune search on the same head, and their gauges and
counters read back the same way."""

from __future__ import annotations

import os
import shutil
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



@pytest.fixture(scope="module")
def metrics_head(stop_ray_head):
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
        stop_ray_head(tmp / "ray", wait_s=5, gcs_port=gcs)
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


# Ray evicts a gauge from the endpoint ~2 report intervals after its process stops reporting (a
# finished Train worker, an exited driver), so each phase waits for the test's go-ahead (a file)
# before it lets its process end: the test reads the gauges while they are live, as a person would.
TRAIN_AND_TUNE = """
import sys
import time
from pathlib import Path

import ray
import torch
from ray import tune

from jobs.ray_train import fit_best, report_epoch
from jobs.telemetry import tune_callback

ray.init(address=sys.argv[1])
out = Path(sys.argv[2])


def wait_for(name):
    deadline = time.monotonic() + 120
    while not (out / name).exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def loop(config):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        report_epoch({"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_auc": 0.5 + 0.1 * epoch},
                     epoch, opt, "toy.pt", lambda p: torch.save(model.state_dict(), p))
    wait_for("train_read")


fit_best(loop, {"epochs": 3}, dest=out / "toy.pt", ckpt_file="toy.pt", metric="val_auc", name="toy",
         storage_path=str(out / "ray"), num_workers=1, cpus_per_worker=1.0)


def trial(config):
    return {"score": config["x"]}


tune.Tuner(trial, param_space={"x": tune.grid_search([0.2, 0.9, 0.5])},
           tune_config=tune.TuneConfig(metric="score", mode="max"),
           run_config=tune.RunConfig(name="toy_search", storage_path=str(out / "ray"),
                                     callbacks=[tune_callback("toy_search", "score", "max")])).fit()
wait_for("tune_read")
"""


def _wait_for_values(url: str, want: dict, proc: subprocess.Popen, timeout_s: float = 90) -> dict:
    """Poll the endpoint until every (metric, label, value) key sums to its wanted value, the
    driver exits or `timeout_s` passes; returns what it saw last."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _samples(url)
        seen = {k: _total(samples, k[0], **{k[1]: k[2]}) for k in want}
        if (all(seen[k] == pytest.approx(v) for k, v in want.items()) or proc.poll() is not None
                or time.monotonic() > deadline):
            return seen
        time.sleep(1)


def test_train_and_tune_metrics_reach_prometheus(metrics_head, tmp_path):
    """report_epoch sets the epoch gauges (rank 0), the Tune callback counts trials and keeps the
    best score; each read back from the node's endpoint while its process is alive."""
    address, url, env = metrics_head
    script = tmp_path / "train_and_tune.py"
    script.write_text(TRAIN_AND_TUNE)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), address, str(tmp_path)], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        train = {("ray_wsseg_train_epoch", "model", "toy"): 2.0,
                 ("ray_wsseg_train_loss", "model", "toy"): 1.0 / 3,
                 ("ray_wsseg_train_val_auc", "model", "toy"): 0.7}
        seen = _wait_for_values(url, train, proc)
        (tmp_path / "train_read").touch()
        assert seen == pytest.approx(train), (tmp_path / "driver.log").read_text()[-4000:]
        tune = {("ray_wsseg_tune_best_score", "search", "toy_search"): 0.9,
                ("ray_wsseg_tune_trials_done_total", "search", "toy_search"): 3.0}
        seen = _wait_for_values(url, tune, proc)
        (tmp_path / "tune_read").touch()
        assert seen == pytest.approx(tune), (tmp_path / "driver.log").read_text()[-4000:]
        assert proc.wait(timeout=120) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
