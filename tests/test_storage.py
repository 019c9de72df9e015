"""Inputs and outputs behind URIs (issue 9): `file://` URIs and paths with spaces, through the same
pyarrow filesystem code that serves `s3://` and `gs://` on a cluster."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wsseg_core import storage
from wsseg_core.data import StudyError, discover_cohort, load_study, read_manifest
from wsseg_core.phantom import write_phantom_cohort

SHAPE = (40, 40, 20)


def uri(path: Path, encode: bool = True) -> str:
    """`file://` URI of a local path; percent-encoded as URIs are, or raw as people paste them."""
    return "file://" + (quote(str(path)) if encode else str(path))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "my cohort"  # a space, as in real folder names
    refs = write_phantom_cohort(root, n=2, shape=SHAPE, seed=3, negative_fraction=0.0)
    return root, refs


@pytest.mark.parametrize("encode", [True, False])
def test_file_uri_with_spaces_reads_lists_and_tests(tmp_path, encode):
    d = tmp_path / "a folder"
    (d / "sub dir").mkdir(parents=True)
    (d / "x.txt").write_bytes(b"hello")
    u = uri(d, encode)
    assert storage.is_uri(u) and not storage.is_uri(str(d))
    assert storage.read_bytes(storage.join(u, "x.txt")) == b"hello"
    assert storage.exists(u) and storage.is_dir(u) and not storage.is_dir(storage.join(u, "x.txt"))
    assert storage.list_dir(u) == [("sub dir", True), ("x.txt", False)]
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(storage.join(u, "missing.txt"))


def test_remote_dir_round_trip_leaves_no_temp_files(tmp_path):
    staging, dest = tmp_path / "staging", tmp_path / "run out"
    (staging / "masks" / "CAM").mkdir(parents=True)
    (staging / "masks" / "CAM" / "s 1.nii.gz").write_bytes(b"\x1f\x8b mask")
    (staging / "metrics").mkdir()
    (staging / "metrics" / "a.parquet").write_bytes(b"rows")
    (staging / "metrics" / ".a.parquet.tmp-1").write_bytes(b"half")  # a writer's temp: not uploaded
    remote = storage.RemoteDir(uri(dest))
    remote.upload(staging, "masks")
    remote.upload(staging, Path("metrics"))
    assert sorted(remote.files()) == ["masks/CAM/s 1.nii.gz", "metrics/a.parquet"]
    assert (dest / "masks" / "CAM" / "s 1.nii.gz").read_bytes() == b"\x1f\x8b mask"
    assert not [p for p in dest.rglob("*") if p.name.startswith(".")]
    back = tmp_path / "back"
    assert remote.download("metrics", back) == 1 and (back / "metrics" / "a.parquet").read_bytes() == b"rows"
    assert remote.download("masks/CAM/s 1.nii.gz", back) == 1
    assert not [p for p in back.rglob("*") if p.name.startswith(".")]


def test_study_loads_the_same_from_a_uri(cohort):
    root, refs = cohort
    ref = refs[0]
    via = type(ref)(**{**ref.to_dict(), **{k: uri(Path(getattr(ref, k)))
                                          for k in ("suv_path", "ct_path", "seg_path")}})
    a, b = load_study(ref), load_study(via)
    for name in ("suv", "ct", "seg", "affine", "spacing_mm"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_bad_volume_behind_a_uri_names_the_uri(tmp_path, cohort):
    _, refs = cohort
    raw = Path(refs[0].suv_path).read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.nii.gz").write_bytes(b"not a volume")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "plain.nii")
    for name, problem in (("trunc.nii.gz", "corrupt or truncated"), ("text.nii.gz", "not a readable NIfTI"),
                          ("missing.nii.gz", "file not found")):
        ref = type(refs[0])(**{**refs[0].to_dict(), "suv_path": uri(tmp_path / name)})
        with pytest.raises(StudyError, match=problem) as e:
            load_study(ref)
        assert str(tmp_path / name) in str(e.value) or quote(str(tmp_path / name)) in str(e.value)
    img = nib.load(tmp_path / "plain.nii")  # uncompressed .nii reads too
    from wsseg_core.data import _nifti_from_uri

    assert _nifti_from_uri(uri(tmp_path / "plain.nii"), "SUV").shape == img.shape


def test_cohort_discovery_and_manifest_through_uris(cohort, tmp_path):
    root, refs = cohort
    found = discover_cohort(uri(root))
    assert [(r.patient_id, r.study_id) for r in found] == [(r.patient_id, r.study_id) for r in refs]
    assert all(r.suv_path.startswith("file://") for r in found)
    assert load_study(found[1]).suv.shape == SHAPE
    # A manifest with paths relative to its own folder, itself read through a URI.
    rows = [{"patient_id": r.patient_id, "study_id": r.study_id,
             "suv_path": str(Path(r.suv_path).relative_to(root)), "ct_path": str(Path(r.ct_path).relative_to(root)),
             "seg_path": str(Path(r.seg_path).relative_to(root))} for r in refs]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    listed = read_manifest(uri(root / "manifest.csv", encode=False))
    assert [r.study_id for r in listed] == [r.study_id for r in refs]
    np.testing.assert_array_equal(load_study(listed[0]).seg, load_study(refs[0]).seg)
    with pytest.raises(StudyError, match="manifest file not found"):
        read_manifest(uri(tmp_path / "nope.csv"))


@pytest.mark.slow
def test_jobs_write_to_and_resume_from_a_file_uri(cohort, tmp_path, ray_cluster, monkeypatch):
    """Train (Ray Train checkpoints at <out>/ray), score (Ray Data actors upload per study) and
    analyze with `--out` a file:// URI of a folder with a space; a rerun resumes from the URI."""
    from jobs import analyze, score_cohort, train_classifier
    from jobs.common import open_run
    from wsseg_core.thresholds import load_thresholds

    monkeypatch.setenv("WSSEG_STAGING", str(tmp_path / "staging"))
    root, refs = cohort
    refs = discover_cohort(uri(root))
    refs = [type(r)(**{**r.to_dict(), "split": s}) for r, s in zip(refs, ("train", "test"))]
    dest = tmp_path / "run out"
    out = uri(dest)

    fit = train_classifier.fit(refs[:1], refs[:1], out, model_preset="small", epochs=1, batch_size=16,
                               lr=0.01, weights=None, num_workers=1, cpus_per_worker=1.0)
    assert (dest / "models" / "classifier.pt").is_file()  # published to the URI
    # Ray Train storage under the URI, the run named by its fingerprint, plus the last-run record
    assert any((dest / "ray" / fit["run_name"]).glob("checkpoint_*"))
    assert fit["run_name"].startswith("classifier-") and (dest / "ray" / "classifier.last-run.json").is_file()
    assert fit["history"]

    methods = ["CAM", "Threshold"]
    res = score_cohort.score(refs, out, load_thresholds(None), methods=methods, concurrency=1)
    assert res["ok_studies"] == 2 and res["scored_now"] == 2 and res["metrics"] == out + "/metrics"
    df = pd.read_parquet(dest / "metrics")
    assert len(df) == 4 and set(df["status"]) == {"ok"}
    for p in df["mask_path"]:
        assert (dest / p).is_file()  # every mask uploaded next to its row
    assert len(list((dest / "slices").glob("*.parquet"))) == 2

    # A fresh staging folder (another machine) resumes from what the URI holds: nothing to redo.
    monkeypatch.setenv("WSSEG_STAGING", str(tmp_path / "staging2"))
    again = score_cohort.score(refs, out, load_thresholds(None), methods=methods, concurrency=1)
    assert again["scored_now"] == 0 and again["resumed"] == 2

    result = analyze.analyze(out, split="all", figures=False)
    assert result["n_studies"] == 2
    assert (dest / "icc.parquet").is_file() and (dest / "summary.parquet").is_file()
    assert open_run(out)[0].out.is_relative_to(tmp_path / "staging2")
