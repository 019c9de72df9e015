"""Reliability on a real local Ray cluster: bad studies, resume, killed workers, safe paths.

One module-scoped run scores a cohort that mixes good phantom studies with every kind of bad input
(plus a valid {0, 255} float SEG and a manifest id `../../x`); the other tests reuse its output.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

SHAPE = (48, 48, 24)
# ScoreCAM left out: ~11 s per study on one CPU; the other CAMs exercise the same code paths.
METHODS = ("CAM", "GradCAM", "GradCAM++", "Threshold")
# Columns that differ between two runs of the same study by design: timing and which process scored it.
RUN_DEPENDENT = ["seconds", "worker"]
# patient id -> (file the error must name, words the error must contain)
BAD = {
    "bad_truncated": ("SUV.nii.gz", "truncated"),
    "bad_not_nifti": ("SUV.nii.gz", "not a readable NIfTI"),
    "bad_seg_grid": ("SEG.nii.gz", "not on the SUV grid"),
    "bad_nan_suv": ("SUV.nii.gz", "non-finite"),
    "bad_4d": ("SUV.nii.gz", "3-D"),
    "bad_no_ct": ("CTres.nii.gz", "not found"),
    "bad_empty_folder": ("SUV.nii.gz", "not found"),
    "bad_manifest_path": ("does_not_exist", "not found"),
}


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def _bad_cohort(root: Path) -> Path:
    """Good phantom studies + one study per bad case; returns a CSV manifest of all of them."""
    from wsseg_core.phantom import write_phantom_cohort

    good = write_phantom_cohort(root / "good", n=4, shape=SHAPE, seed=1)
    src = good[0]
    suv_img = nib.load(src.suv_path)
    suv = np.asarray(suv_img.dataobj, dtype=np.float32)
    aff = suv_img.affine
    seg = np.asarray(nib.load(src.seg_path).dataobj)

    def study(pid: str) -> Path:
        d = root / "bad" / pid / "study 1"
        d.mkdir(parents=True)
        for name in ("SUV", "CTres", "SEG"):
            shutil.copyfile(getattr(src, {"SUV": "suv_path", "CTres": "ct_path", "SEG": "seg_path"}[name]),
                            d / f"{name}.nii.gz")
        return d

    d = study("bad_truncated")
    raw = (d / "SUV.nii.gz").read_bytes()
    (d / "SUV.nii.gz").write_bytes(raw[: len(raw) // 2])
    (study("bad_not_nifti") / "SUV.nii.gz").write_bytes(gzip.compress(b"patient,study\n1,2\n"))
    _save(study("bad_seg_grid") / "SEG.nii.gz", seg[:, :, :20], aff)
    bad_suv = suv.copy()
    bad_suv[10, 10, 10], bad_suv[11, 11, 11] = np.nan, np.inf
    _save(study("bad_nan_suv") / "SUV.nii.gz", bad_suv, aff)
    _save(study("bad_4d") / "SUV.nii.gz", np.stack([suv, suv], axis=-1), aff)
    (study("bad_no_ct") / "CTres.nii.gz").unlink()
    (root / "bad" / "bad_empty_folder" / "study 1").mkdir(parents=True)
    # Valid: SEG stored as float {0, 255} is binarised.
    _save(study("ok_seg_float255") / "SEG.nii.gz", (seg > 0).astype(np.float32) * 255.0, aff)

    from wsseg_core.cohort import discover_cohort

    rows = [r.to_dict() for r in good + discover_cohort(root / "bad")]
    rows.append({**good[1].to_dict(), "patient_id": "bad_manifest_path", "study_id": "s1",
                 "suv_path": str(root / "does_not_exist" / "SUV.nii.gz")})
    # A hostile id must not steer any output outside <out>.
    rows.append({**good[2].to_dict(), "patient_id": "../../x", "study_id": "../../../etc/y"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).drop(columns=["split"]).to_csv(manifest, index=False)
    return manifest


def _classifier(out: Path) -> None:
    import torch

    from wsseg_core.models import build_slice_classifier, save_classifier

    torch.manual_seed(0)
    model, pre = build_slice_classifier("small")
    with torch.no_grad():  # untrained, but biased to "tumour": every slice gets all four CAMs
        model.fc.bias.copy_(torch.tensor([0.0, 10.0]))
    save_classifier(out / "models" / "classifier.pt", model, pre)


def _table(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "metrics")
    return df.sort_values(["patient_id", "study_id", "method"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_cluster):
    """The bad-input cohort scored once from scratch; returns (root, out, refs, result, seconds)."""
    import time

    from jobs.common import resolve_cohort
    from jobs.score_cohort import score
    from wsseg_core.thresholds import load_thresholds

    root = tmp_path_factory.mktemp("rel")
    refs = resolve_cohort(_bad_cohort(root / "cohort"))
    out = root / "out"
    _classifier(out)
    t0 = time.perf_counter()
    res = score(refs, out, load_thresholds(None), methods=METHODS, concurrency=2, cam_batch_size=64)
    return root, out, refs, res, time.perf_counter() - t0


def test_bad_studies_become_failed_rows_and_the_rest_goes_on(scored):
    _, out, refs, res, seconds = scored
    df = _table(out)
    n = len(refs)
    assert n == 4 + len(BAD) + 2  # good, bad, {0,255} SEG, hostile id
    assert len(df) == n * len(METHODS)
    assert not df.duplicated(["patient_id", "study_id", "method"]).any()
    failed = df[df.status == "failed"]
    assert set(failed.patient_id) == set(BAD)
    for pid, (fname, problem) in BAD.items():
        errors = set(failed.loc[failed.patient_id == pid, "error"])
        assert len(errors) == 1, errors
        (error,) = errors
        assert fname in error and problem in error, (pid, error)
    ok = df[df.status == "ok"]
    assert ok.groupby(["patient_id", "study_id"]).size().eq(len(METHODS)).all()
    assert "ok_seg_float255" in set(ok.patient_id)
    assert res["ok_studies"] == 6 and res["failed_studies"] == len(BAD)
    assert res["scored_now"] == n and res["resumed"] == 0 and res["n_rows"] == len(df)
    assert {f["patient_id"] for f in res["failed"]} == set(BAD)
    print(f"scored {n} studies ({res['ok_studies']} ok, {res['failed_studies']} failed) in {seconds:.1f} s")


def test_hostile_ids_stay_inside_out(scored):
    _, out, _, _, _ = scored
    df = _table(out)
    row = df[(df.patient_id == "../../x") & (df.method == "CAM")].iloc[0]
    assert row.status == "ok"
    mask = (out / row.mask_path).resolve()
    assert mask.is_file() and mask.is_relative_to(out.resolve())
    assert ".." not in row.mask_path
    for p in (out / "metrics").iterdir():
        assert p.parent == out / "metrics" and ".." not in p.name
    assert not (out.parent / "x").exists() and not (out.parent.parent / "x").exists()


def test_metrics_folder_reads_in_pandas_and_ignores_run_record_and_temp_files(scored, tmp_path):
    _, out, _, _, _ = scored
    metrics = tmp_path / "metrics"
    shutil.copytree(out / "metrics", metrics)
    assert (metrics / "_run.json").is_file()
    # pyarrow's dataset discovery skips names starting with '_' or '.': verify, not assume.
    (metrics / ".xyz.tmp-123.parquet").write_bytes(b"PAR1 half a file")
    (metrics / "_scratch.parquet").write_bytes(b"not parquet at all")
    assert len(pd.read_parquet(metrics)) == len(pd.read_parquet(out / "metrics"))


def test_interrupted_run_resumes_only_the_missing_studies(scored, tmp_path, caplog):
    from jobs.score_cohort import score
    from wsseg_core.thresholds import load_thresholds

    _, out, refs, _, _ = scored
    before = _table(out)
    run2 = tmp_path / "out"
    shutil.copytree(out, run2)
    files = sorted((run2 / "metrics").glob("*.parquet"))
    # Interrupted: three studies never got their file (one good, one failed, the hostile id),
    # and a writer died between write and rename.
    gone = [f for f in files if f.name.startswith(("PETCT", "bad_4d", "x__"))][:3]
    assert len(gone) == 3
    for f in gone:
        f.unlink()
    tmp = run2 / "metrics" / ".xyz.tmp-123.parquet"
    tmp.write_bytes(b"PAR1 half")
    with caplog.at_level(logging.INFO, logger="wsseg.score_cohort"):
        res = score(refs, run2, load_thresholds(None), methods=METHODS, concurrency=2)
    assert f"resuming: {len(refs) - 3} of {len(refs)} studies already scored, scoring 3" in caplog.text
    assert res["scored_now"] == 3 and res["resumed"] == len(refs) - 3
    assert not tmp.exists()
    after = _table(run2)
    pd.testing.assert_frame_equal(after.drop(columns=RUN_DEPENDENT), before.drop(columns=RUN_DEPENDENT))
    # Nothing to do on a third run: the same command is idempotent.
    res = score(refs, run2, load_thresholds(None), methods=METHODS, concurrency=2)
    assert res["scored_now"] == 0 and res["resumed"] == len(refs)
    assert len(_table(run2)) == len(before)


def test_stale_results_are_refused_unless_overwrite(scored, tmp_path):
    from jobs.score_cohort import StaleResultsError, score
    from wsseg_core.thresholds import load_thresholds

    _, out, refs, _, _ = scored
    run2 = tmp_path / "out"
    shutil.copytree(out, run2)
    other = load_thresholds(None)
    other["CAM"] = {**other["CAM"], "t": 0.5}
    with pytest.raises(StaleResultsError, match="thresholds.*--overwrite"):
        score(refs, run2, other, methods=METHODS, concurrency=1)
    one = [r for r in refs if r.patient_id.startswith("PETCT")][:1]
    res = score(one, run2, other, methods=METHODS, concurrency=1, overwrite=True)
    assert res["scored_now"] == 1 and res["resumed"] == 0
    df = _table(run2)
    assert len(df) == len(METHODS) and set(df.patient_id) == {one[0].patient_id}
    assert json.loads((run2 / "metrics" / "_run.json").read_text())["thresholds"]["CAM"]["t"] == 0.5


def test_killed_scoring_actor_is_restarted_and_its_study_retried(scored, tmp_path):
    import time

    from jobs.score_cohort import score
    from wsseg_core.thresholds import load_thresholds

    _, out, refs, _, _ = scored
    good = [r for r in refs if r.patient_id.startswith("PETCT")]
    run2 = tmp_path / "out"
    _classifier(run2)  # same seed: the same weights as the first run
    victim = good[1]
    marker = tmp_path / "killed.pid"
    t0 = time.perf_counter()
    res = score(good, run2, load_thresholds(None), methods=METHODS, concurrency=2,
                kill_once={"patient_id": victim.patient_id, "study_id": victim.study_id,
                           "marker": str(marker)})
    seconds = time.perf_counter() - t0
    assert marker.is_file()  # the actor really was killed, once
    assert res["ok_studies"] == len(good) and res["failed_studies"] == 0
    df = _table(run2)
    assert len(df) == len(good) * len(METHODS)
    assert not df.duplicated(["patient_id", "study_id", "method"]).any()
    assert (df.status == "ok").all()
    ref = _table(out)
    ref = ref[ref.patient_id.isin({r.patient_id for r in good})].reset_index(drop=True)
    # check_dtype: the first run's table also held failed rows (nulls make its int columns float)
    pd.testing.assert_frame_equal(df.drop(columns=RUN_DEPENDENT), ref.drop(columns=RUN_DEPENDENT),
                                  check_dtype=False)
    print(f"run with one killed actor: {len(good)} studies in {seconds:.1f} s")


def test_colliding_ids_are_refused(tmp_path, scored):
    from jobs.score_cohort import score
    from wsseg_core.thresholds import load_thresholds

    _, _, refs, _, _ = scored
    a = next(r for r in refs if r.patient_id.startswith("PETCT"))
    b = type(a)(**{**a.to_dict(), "patient_id": a.patient_id + " "})  # sanitises alike
    with pytest.raises(ValueError, match="same output files"):
        score([a, b], tmp_path / "out", load_thresholds(None), methods=METHODS)


class _ReportLog:
    """Ray Train callback (runs in the controller): every report of every rank, appended to a JSON
    lines file, one line per report round: [rank 0's metrics, rank 1's, ...]."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


@pytest.mark.parametrize("num_workers", [1, 2])
def test_killed_train_worker_resumes_from_the_last_checkpoint(tmp_path, ray_cluster, num_workers):
    """Rank 0 is SIGKILLed once during epoch 2 (test hook); Ray Train restarts the worker group,
    which starts again at epoch 2 from the epoch-1 checkpoint. Every epoch, 0 included, is
    reported exactly once, by every rank, with the same metrics on every rank."""
    import sys
    import time

    import ray.cloudpickle
    import ray.train

    from jobs.train_classifier import fit
    from wsseg_core.phantom import write_phantom_cohort

    # The callback class lives in this test module, which the controller cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    log = tmp_path / "reports.jsonl"
    callback = type("ReportLog", (_ReportLog, ray.train.UserCallback), {})(str(log))

    refs = write_phantom_cohort(tmp_path / "cohort", n=4, shape=SHAPE, seed=2)
    # A labeled positive validation study: with one slice class only, val_auc is NaN and the
    # checkpoint ranking by val_auc (NaN scores) made the restart resume from an older checkpoint.
    val = [r for r in refs if r.diagnosis != "NEGATIVE"][-1:]
    train = [r for r in refs if r not in val]
    marker = tmp_path / "train_killed"
    t0 = time.perf_counter()
    res = fit(train, val, tmp_path / "out", model_preset="small", epochs=3, batch_size=16,
              lr=0.01, weights=None, num_workers=num_workers, cpus_per_worker=1.0, max_failures=2,
              callbacks=[callback],
              test_hooks={"fail_after_epoch": 1, "fail_marker": str(marker), "fail_delay_s": 8.0})
    seconds = time.perf_counter() - t0
    assert marker.is_file()  # the worker really was killed
    rounds = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [int(r[0]["epoch"]) for r in rounds]
    starts = {int(r[0]["epoch"]): int(r[0]["start_epoch"]) for r in rounds}
    print(f"train ({num_workers} workers) with one killed worker: {seconds:.1f} s; reported epochs "
          f"{epochs}, starts {starts}")
    # The restart began at epoch 2 from the epoch-1 checkpoint (the last one reported before the
    # kill) and redid nothing: every epoch is reported once, the last by the restarted workers.
    assert epochs == [0, 1, 2]
    assert starts == {0: 0, 1: 0, 2: 2}
    for r in rounds:  # every rank reported, and the same metrics (validation computed once)
        assert len(r) == num_workers and all(m == r[0] for m in r)
        assert int(r[0]["workers"]) == num_workers
    assert Path(res["checkpoint"]).is_file()


def test_split_cpu_stage_gives_the_same_rows_and_survives_a_killed_finisher(scored, tmp_path):
    """Issue 20: masks built in one Ray Data stage, metrics and writes in a second (CPU) stage,
    the masks passed packed between them. Same rows as the one-actor run (failed rows and their
    errors included), a CPU-stage actor killed mid-study is restarted and the study retried, and
    a rerun resumes with nothing to do."""
    from jobs.score_cohort import score
    from wsseg_core.thresholds import load_thresholds

    _, out, refs, _, _ = scored
    run2 = tmp_path / "out"
    _classifier(run2)
    victim = next(r for r in refs if r.patient_id.startswith("PETCT"))
    marker = tmp_path / "killed.pid"
    res = score(refs, run2, load_thresholds(None), methods=METHODS, concurrency=1,
                split_cpu_stage=True, cpu_stage_concurrency=1,
                kill_once={"patient_id": victim.patient_id, "study_id": victim.study_id,
                           "marker": str(marker)})
    assert marker.is_file()  # the finisher really was killed, once
    before = _table(out)
    assert res["failed_studies"] == (before.groupby(["patient_id", "study_id"]).status.first() != "ok").sum()
    pd.testing.assert_frame_equal(_table(run2).drop(columns=RUN_DEPENDENT), before.drop(columns=RUN_DEPENDENT))
    for f in ("masks", "slices"):  # the same files, written by the CPU stage
        assert sorted(p.relative_to(run2 / f) for p in (run2 / f).rglob("*.*")) == \
            sorted(p.relative_to(out / f) for p in (out / f).rglob("*.*"))
    res = score(refs, run2, load_thresholds(None), methods=METHODS, concurrency=1,
                split_cpu_stage=True, cpu_stage_concurrency=1)
    assert res["scored_now"] == 0 and res["resumed"] == len(refs)
