"""The run folder as one object (wsseg_core.run_folder.RunFolder): a local folder used as it is, a
URI staged locally and mirrored file by file; atomic writes that leave no temp file on failure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest

from wsseg_core import storage
from wsseg_core.run_folder import RunFolder, StaleResultsError, study_key


def uri(path: Path) -> str:
    return "file://" + quote(str(path))


def files_under(folder: Path) -> list[str]:
    """Every file under `folder`, relative and posix, hidden ones (temp files) included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def staged(tmp_path, monkeypatch):
    """A RunFolder for a file:// URI of a folder with a space, staged under tmp_path/staging."""
    monkeypatch.setenv("WSSEG_STAGING", str(tmp_path / "staging"))
    dest = tmp_path / "run out"
    return RunFolder(uri(dest)), dest


def test_a_local_folder_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunFolder("runs/a")  # relative: made absolute, as every job passes it on to Ray workers
    assert run.out == tmp_path / "runs" / "a" and run.location == str(tmp_path / "runs" / "a")
    assert run.remote is None and run.staging is None
    assert run.where(run.metrics) == str(tmp_path / "runs" / "a" / "metrics")
    assert run.where("models/classifier.pt") == str(run.classifier) and run.where() == run.location
    run.write_json(run.run_json, {"b": 1, "a": [1.5]})
    assert json.loads(run.run_json.read_text()) == {"a": [1.5], "b": 1}
    run.fetch(run.run_json, refresh=True)  # nothing to fetch from: no-ops, the file stays
    run.mirror(run.out)
    run.discard_remote(run.out)
    assert files_under(run.out) == ["run.json"] and run.exists("run.json") and not run.exists("x")


def test_the_layout_is_the_output_contract(tmp_path):
    run = RunFolder(tmp_path)
    key = study_key("PETCT_1", "01-01 study")
    assert run.study_metrics("PETCT_1", "01-01 study") == tmp_path / "metrics" / f"{key}.parquet"
    assert run.study_slices("PETCT_1", "01-01 study") == tmp_path / "slices" / f"{key}.parquet"
    assert run.metrics_record == tmp_path / "metrics" / "_run.json"
    assert (run.cohort, run.thresholds, run.unet, run.tune_grid) == (
        tmp_path / "cohort.parquet", tmp_path / "thresholds.json", tmp_path / "models" / "unet.pt",
        tmp_path / "tune" / "grid.parquet")
    assert run.mask("GradCAM++", "p 1", "s/1").as_posix() == "masks/GradCAMpp/p_1/s_1.nii.gz"


def test_a_uri_is_staged_and_every_write_is_uploaded(staged, tmp_path):
    run, dest = staged
    digest = hashlib.sha256(run.location.encode()).hexdigest()[:12]
    assert run.out == tmp_path / "staging" / "wsseg-staging" / digest and run.staging == run.out
    assert run.where(run.metrics) == run.location + "/metrics"
    run.write_parquet(run.summary, pd.DataFrame({"a": [1, 2]}))
    run.write_json("tune/stage.json", {"digest": "x"})
    run.write_npz("tune/cache/s.npz", a=np.arange(3))
    run.write_json("local_only.json", {}, publish=False)
    assert files_under(dest) == ["summary.parquet", "tune/cache/s.npz", "tune/stage.json"]
    assert pd.read_parquet(dest / "summary.parquet")["a"].tolist() == [1, 2]
    assert files_under(run.out) == ["local_only.json", "summary.parquet", "tune/cache/s.npz",
                                    "tune/stage.json"]
    # publish takes absolute and relative paths, files and folders; absent ones are skipped
    (run.out / "masks" / "CAM").mkdir(parents=True)
    (run.out / "masks" / "CAM" / "m.nii.gz").write_bytes(b"mask")
    run.publish(run.out / "masks", "local_only.json", "absent.parquet")
    assert "masks/CAM/m.nii.gz" in files_under(dest) and "local_only.json" in files_under(dest)


def test_another_machine_fetches_and_mirrors_what_the_uri_holds(staged, tmp_path, monkeypatch):
    run, dest = staged
    run.write_json(run.thresholds, {"v": 1})
    run.write_parquet(run.study_metrics("p", "s"), pd.DataFrame({"x": [1]}))
    monkeypatch.setenv("WSSEG_STAGING", str(tmp_path / "staging2"))
    other = RunFolder(run.location)
    assert other.out != run.out and not other.thresholds.exists() and other.exists(other.thresholds)
    other.fetch(other.thresholds, "missing.json")
    assert json.loads(other.thresholds.read_text()) == {"v": 1}
    run.write_json(run.thresholds, {"v": 2})
    other.fetch(other.thresholds)  # present: kept ...
    assert json.loads(other.thresholds.read_text()) == {"v": 1}
    other.fetch(other.thresholds, refresh=True)  # ... unless refreshed
    assert json.loads(other.thresholds.read_text()) == {"v": 2}
    # mirror: exactly the URI's files, not what a dead writer left only here
    (other.metrics).mkdir(parents=True)
    (other.metrics / "not_uploaded.parquet").write_bytes(b"x")
    other.mirror(other.metrics)
    assert files_under(other.metrics) == [run.study_metrics("p", "s").name]
    other.discard_remote(other.metrics)
    assert not (dest / "metrics").exists() or files_under(dest / "metrics") == []
    assert (dest / "thresholds.json").is_file()


@pytest.mark.parametrize("where", ["local", "uri"])
def test_a_failure_mid_write_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch, where):
    monkeypatch.setenv("WSSEG_STAGING", str(tmp_path / "staging"))
    dest = tmp_path / "run out"
    run = RunFolder(dest if where == "local" else uri(dest))
    run.write_parquet("t.parquet", pd.DataFrame({"a": [1]}))
    run.write_npz("c.npz", ok=np.arange(3))
    before = {p: (run.out / p).read_bytes() for p in ("t.parquet", "c.npz")}
    with pytest.raises(Exception):  # pyarrow cannot store arbitrary objects: fails inside the writer
        run.write_parquet("t.parquet", pd.DataFrame({"a": [object()]}))
    unpicklable = np.empty(1, object)
    unpicklable[0] = lambda: 1
    with pytest.raises(Exception, match="pickle"):  # after ~8 KB of the file were written
        run.write_npz("c.npz", ok=np.arange(1000), bad=unpicklable)
    with pytest.raises(FileNotFoundError):
        run.copy_in(tmp_path / "no such file", "models/x.pt")
    for folder in {run.out, dest}:
        assert files_under(folder) == ["c.npz", "t.parquet"]  # no temp file, no partial target
        assert {p: (folder / p).read_bytes() for p in before} == before


def test_clean_temp_files_removes_only_the_writers_temp_files(tmp_path):
    run = RunFolder(tmp_path)
    tmp1 = storage.temp_name(run.study_metrics("p", "s"))
    tmp2 = storage.temp_name(run.out / run.mask("CAM", "p", "s"), ".nii.gz")
    keep = [run.study_metrics("p", "s"), run.metrics / ".hidden_notes",
            run.out / "tune" / f"x{storage.TMP_MARKER}"]
    for p in [tmp1, tmp2, *keep]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert run.clean_temp_files(run.metrics, "masks", run.slices) == 2
    assert not tmp1.exists() and not tmp2.exists() and all(p.exists() for p in keep)
    assert run.clean_temp_files(run.metrics, "masks") == 0


def test_claim_results_starts_fresh_resumes_or_refuses_stale_results(staged):
    run, dest = staged
    fp = {"methods": ["CAM"], "classifier_sha256": "aa"}
    run.claim_results(run.metrics, run.metrics_record, fp, overwrite=False)  # fresh: record written first
    assert json.loads((dest / "metrics" / "_run.json").read_text()) == fp  # and uploaded
    result = run.study_metrics("p", "s")
    result.write_bytes(b"rows")
    run.claim_results(run.metrics, run.metrics_record, dict(fp), overwrite=False)  # same: resumes
    assert result.exists()
    with pytest.raises(StaleResultsError, match=r"1 per-study result file\(s\).*differ in classifier_sha256"
                                                r".*--overwrite"):
        run.claim_results(run.metrics, run.metrics_record, {**fp, "classifier_sha256": "bb"}, overwrite=False)
    run.metrics_record.unlink()
    with pytest.raises(StaleResultsError, match=r"no record of how they were computed \(metrics/_run.json\)"):
        run.claim_results(run.metrics, run.metrics_record, fp, overwrite=False)
    run.claim_results(run.metrics, run.metrics_record, {**fp, "classifier_sha256": "bb"}, overwrite=True)
    assert files_under(run.metrics) == ["_run.json"]
    assert json.loads(run.metrics_record.read_text())["classifier_sha256"] == "bb"


def test_sha256_and_update_thresholds(staged):
    run, dest = staged
    data = bytes(range(256)) * 5000  # > 1 MiB: more than one chunk
    (run.out / "models").mkdir(parents=True)
    run.classifier.write_bytes(data)
    assert run.sha256(run.classifier) == hashlib.sha256(data).hexdigest()
    run.update_thresholds({"CAM": {"t": 0.3, "q": 31.0}}, flag_threshold=0.4)
    run.update_thresholds({"UNet": {"threshold": 0.5}})  # merged, not replaced
    got = json.loads((dest / "thresholds.json").read_text())
    assert got["methods"] == {"CAM": {"t": 0.3, "q": 31.0}, "UNet": {"threshold": 0.5}}
    assert got["flag_threshold"] == 0.4
