"""Inputs and outputs behind URIs (issue 9): `file://` URIs and paths with spaces, through the same
pyarrow filesystem code that serves `s3://` and `gs://` on a cluster."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from wsseg_core import storage
from wsseg_core.cohort import discover_cohort, read_manifest
from wsseg_core.data import StudyError, load_study
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
    analyze with `--out` a file:// URI of a folder with a space; a rerun resumes from the URI.
    The classifier is trained with `map_stride=4` (`--map-stride 4`), so scoring takes the stride
    from the checkpoint (16x16 CAMs) rather than from the preset."""
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
                               lr=0.01, weights=None, num_workers=1, cpus_per_worker=1.0, map_stride=4)
    assert (dest / "models" / "classifier.pt").is_file()  # published to the URI
    assert torch.load(dest / "models" / "classifier.pt", weights_only=True)["config"]["map_stride"] == 4
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


# --------------------------------------------------------------------------------------------------
# The atomic writers (wsseg_core.storage): a failure mid-write leaves the target as it was and no
# temp file; a success leaves the target and nothing else.


class _Boom(Exception):
    pass


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("interrupt", [_Boom, KeyboardInterrupt])
def test_failure_mid_write_leaves_neither_a_partial_target_nor_a_temp_file(tmp_path, interrupt):
    target = tmp_path / "out" / "result.parquet"
    # No earlier file: the half-written bytes reach the temp file, never the target.
    with pytest.raises(interrupt):
        with storage.atomic_path(target) as tmp:
            tmp.write_bytes(b"PAR1 half a file")
            assert tmp.parent == target.parent and tmp.name.startswith(".")
            assert storage.TMP_MARKER in tmp.name
            raise interrupt()
    assert _listing(target.parent) == []
    # An earlier file survives a failed rewrite unchanged.
    storage.write_parquet(target, pd.DataFrame({"a": [1, 2]}))
    before = target.read_bytes()
    with pytest.raises(interrupt):
        with storage.atomic_path(target) as tmp:
            tmp.write_bytes(b"PAR1 half a file")
            raise interrupt()
    assert target.read_bytes() == before
    assert _listing(target.parent) == ["result.parquet"]


def test_a_writer_that_fails_inside_leaves_the_old_file(tmp_path):
    """The writers' own errors: np.savez fails while pickling its second array, after it has
    written ~8 KB of the file (a plain np.savez leaves those bytes as the target); pyarrow cannot
    store a column of arbitrary objects."""
    npz_path, pq_path = tmp_path / "c.npz", tmp_path / "t.parquet"
    storage.write_npz(npz_path, ok=np.arange(3))
    unpicklable = np.empty(1, object)
    unpicklable[0] = lambda: 1
    with pytest.raises(Exception, match="pickle"):
        storage.write_npz(npz_path, ok=np.arange(1000), bad=unpicklable)
    with np.load(npz_path) as z:
        assert z["ok"].tolist() == [0, 1, 2] and list(z.keys()) == ["ok"]
    storage.write_parquet(pq_path, pd.DataFrame({"a": [1]}))
    with pytest.raises(Exception):
        storage.write_parquet(pq_path, pd.DataFrame({"a": [object()]}))
    pd.testing.assert_frame_equal(pd.read_parquet(pq_path), pd.DataFrame({"a": [1]}))
    assert _listing(tmp_path) == ["c.npz", "t.parquet"]


def test_each_writer_round_trips_and_leaves_only_its_target(tmp_path):
    d = tmp_path / "a" / "b"  # folders are created
    storage.write_bytes(d / "x.bin", b"\x00\x01")
    storage.write_text(d / "x.txt", "Früh\n")
    storage.write_json(d / "x.json", {"b": 1, "a": Path("p")})
    table = pd.DataFrame({"m": ["CAM", "GradCAM"], "dice": [0.5, np.nan]})
    storage.write_parquet(d / "x.parquet", table)
    storage.write_npz(d / "x.npz", a=np.arange(3), pid=np.array("p 1"))
    img = nib.Nifti1Image(np.arange(8, dtype=np.uint8).reshape(2, 2, 2), np.diag([2.0, 2.0, 3.0, 1.0]))
    storage.write_nifti(d / "x.nii.gz", img)
    storage.copy_file(d / "x.bin", d / "y.bin")
    assert (d / "x.bin").read_bytes() == b"\x00\x01" == (d / "y.bin").read_bytes()
    assert (d / "x.txt").read_text(encoding="utf-8") == "Früh\n"
    assert (d / "x.json").read_text() == '{\n  "a": "p",\n  "b": 1\n}\n'
    pd.testing.assert_frame_equal(pd.read_parquet(d / "x.parquet"), table)
    with np.load(d / "x.npz") as z:
        assert z["a"].tolist() == [0, 1, 2] and str(z["pid"]) == "p 1"
    assert (d / "x.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzipped, as the name says
    back = nib.load(d / "x.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_array_equal(back.affine, img.affine)
    assert _listing(d) == sorted(["x.bin", "x.txt", "x.json", "x.parquet", "x.npz", "x.nii.gz", "y.bin"])


def test_write_bytes_to_a_uri_leaves_no_temp_file(tmp_path):
    storage.write_bytes(uri(tmp_path / "r r" / "run.json"), b"{}")
    assert (tmp_path / "r r" / "run.json").read_bytes() == b"{}"
    assert _listing(tmp_path / "r r") == ["run.json"]
