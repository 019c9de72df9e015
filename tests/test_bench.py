"""The issue-7 and issue-20 benchmark scripts still run (tiny sizes, one repeat). Their timings are
not checked here - speed belongs in the scripts' printed figures - only that they run end to end and
print the figures and agreement checks they promise."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    from bench._common import get_classifier, save_model

    model, pre = get_classifier(None, epochs=1, n_studies=2)
    return str(save_model(model, pre, tmp_path_factory.mktemp("bench") / "classifier.pt"))


def test_bench_cams_runs_and_agrees(classifier, capsys) -> None:
    from bench import bench_cams

    bench_cams.main(["--classifier", classifier, "--n", "3", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "forward passes per slice: grad-cam" in out
    assert "agreement: min r = " in out and "-> OK" in out  # grad-cam's conventions: same maps


def test_bench_scorecam_floor_runs(classifier, capsys) -> None:
    from bench import bench_scorecam_floor

    bench_scorecam_floor.main(["--classifier", classifier, "--n", "2", "--repeats", "1",
                               "--top-k", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    for line in ("engine defaults", "no tricks (plain NCHW)", "target 2: engine ScoreCAM / floor",
                 "bf16 autocast", "top-4 channels"):
        assert line in out, line


def test_bench_threads_times_each_setting_in_its_own_process(capsys) -> None:
    from bench import bench_threads

    rows = bench_threads.main(["--steps", "1", "--batch", "2", "--busy", "1", "--threads", "1",
                               "--policies", "unset", "PASSIVE"])
    assert [(r["threads"], r["policy"]) for r in rows] == [(1, "unset"), (1, "PASSIVE")]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    assert "1 of them held by a busy process" in capsys.readouterr().out


def test_bench_tuning_counts_one_pass_per_study(classifier, tmp_path, capsys) -> None:
    from bench import bench_tuning

    bench_tuning.main(["--classifier", classifier, "--n", "2", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "0 further engine passes" in out
    m = re.search(r"CAM caching: (\d+) studies, (\d+) engine passes", out)
    assert m and m.group(1) == m.group(2) == "2", out
    # issue 20 item 3: the cache against the volumes, and the old trials' grids bit for bit
    assert re.search(r"cache bytes vs volume bytes: [\d.]+ MiB vs [\d.]+ MiB = [\d.]+ %", out), out
    assert "identical bits: 10/10 -> OK" in out, out


def test_bench_tuning_cache_sizes_and_agrees(tmp_path, capsys) -> None:
    from bench import bench_tuning_cache

    res = bench_tuning_cache.main(["--shape", "40", "40", "12", "--flagged", "3", "--map-sizes", "4",
                                   "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "grids old vs new bit-identical: OK" in out, out
    # the file is the counts plus 4 methods x 4 x 4 float32 CAMs per flagged slice, no volume
    assert 0 < res["cache_bytes"][(4, 20)] < res["volume_bytes"] / 4


def test_bench_metrics_agrees_with_old(capsys) -> None:
    from bench import bench_metrics

    res = bench_metrics.main(["--shape", "40", "40", "24", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "all columns, all masks: 0 -> OK" in out, out
    assert set(res) == {"Threshold q=0.3 (whole body)", "Threshold q=0.5",
                        "lesions dilated + hot spots", "empty"}


def test_bench_stages_runs_every_stage(classifier, tmp_path, capsys) -> None:
    from bench import bench_stages

    res = bench_stages.main(["--classifier", classifier, "--shape", "40", "40", "20", "--n", "1",
                             "--device", "cpu", "--flagged-fraction", "0.1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "  study 0: 2/20 slices flagged" in out, out
    for stage in bench_stages.STAGES:
        assert re.search(rf"^{stage} +(GPU actor|CPU stage) +\d", out, re.M), stage
        assert res["median_s"][stage] > 0
    assert "studies/hour per GPU (cpu)" in out and "CPU cores per GPU actor" in out
    assert len(list((tmp_path / "out" / "masks").rglob("*.nii.gz"))) == 5  # one per method
