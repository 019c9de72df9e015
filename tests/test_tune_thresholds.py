"""The (t, q) search's two halves, run in-process (no Ray): caching and one grid trial.

Issue 7, target 5: every validation study's CAMs are computed once - one engine pass per flagged
slice - and every (method, t, q) of the grid is then scored from that cache, without the classifier.
The trial's mean Dice is checked against masks built by segment_volume / threshold_volume and scored
with metrics.dice, a different code path from the count-based dice_grid the trial uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs.tune_thresholds import cache_study_cams, evaluate_cell
from wsseg_core.thresholds import THRESHOLD_REFERENCE
from wsseg_core.cams import CAM_METHODS, CamEngine
from wsseg_core.data import load_study
from wsseg_core.metrics import dice
from wsseg_core.models import build_slice_classifier, save_classifier
from wsseg_core.phantom import write_phantom_cohort
from wsseg_core.segment import segment_volume, threshold_volume


def test_cams_cached_once_then_every_grid_cell_scored_from_the_cache(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small")
    with torch.no_grad():  # favour "tumour" so every slice is flagged and gets CAMs
        model.fc.bias.copy_(torch.tensor([0.0, 1.0]))
    out = tmp_path / "run"
    save_classifier(out / "models" / "classifier.pt", model, pre)
    refs = write_phantom_cohort(tmp_path / "cohort", n=3, shape=(64, 64, 12), seed=3,
                                negative_fraction=0.0)

    seen: list[int] = []
    real_call = CamEngine.__call__

    def counting_call(self, x, methods=CAM_METHODS):
        seen.append(int(x.shape[0]))
        return real_call(self, x, methods)

    monkeypatch.setattr(CamEngine, "__call__", counting_call)
    q_grid = [20.0, 45.0, 70.0]
    ts = [0.2, 0.3, 0.6]
    files = [cache_study_cams(r.to_dict(), str(out), cam_batch_size=64, t_grid=ts, q_grid=q_grid)
             for r in refs]
    caches = [dict(np.load(f)) for f in files]
    # The cache holds no volume (issue 20): the reference masks below come from the studies' files.
    assert not {"suv", "ct", "seg"} & set().union(*caches)
    studies = [load_study(r) for r in refs]
    n_flagged = [len(c["flagged_z"]) for c in caches]
    assert all(n == 12 for n in n_flagged)
    assert seen == n_flagged  # one pass per study, each flagged slice once, all methods together
    for c in caches:
        assert all(c[f"cam_{m}"].shape == (12, 16, 16) for m in CAM_METHODS)  # 64 / map stride 4

    (out / "models" / "classifier.pt").unlink()  # trials must not need the model
    cells = [{"method": m, "t": 0.3} for m in CAM_METHODS] + [{"method": "Threshold", "t": float("nan")}]
    for cell in cells:
        res = evaluate_cell({"cell": cell}, files, q_grid)
        by_patient: dict[str, list[list[float]]] = {}
        for c, st in zip(caches, studies):
            z = c["flagged_z"]
            per_q = []
            for q in q_grid:
                if cell["method"] == "Threshold":
                    mask = threshold_volume(st.suv, z, q, reference=THRESHOLD_REFERENCE, ct=st.ct)
                else:
                    mask = segment_volume(st.suv, z, c[f"cam_{cell['method']}"], cell["t"], q)
                per_q.append(dice(mask, st.seg))
            by_patient.setdefault(str(c["patient_id"]), []).append(per_q)
        expect = np.nanmean([np.nanmean(v, axis=0) for v in by_patient.values()], axis=0)
        assert np.isfinite(expect).all() and np.ptp(expect) > 0, (cell, expect)  # q matters
        np.testing.assert_allclose(res["dice_by_q"], expect, atol=1e-9, err_msg=str(cell))
        assert res["q"] == q_grid[int(np.nanargmax(expect))]
        assert res["n_patients"] == len(by_patient)
    # The search runs one trial per method over its whole t grid: each row equals its own cell.
    for m in CAM_METHODS:
        whole = evaluate_cell({"cell": {"method": m, "ts": ts}}, files, q_grid)
        rows = [evaluate_cell({"cell": {"method": m, "t": t}}, files, q_grid)["dice_by_q"] for t in ts]
        np.testing.assert_allclose(whole["dice_by_tq"], rows, atol=1e-12, err_msg=m)
        ti, qi = np.unravel_index(int(np.nanargmax(rows)), (len(ts), len(q_grid)))
        assert (whole["t"], whole["q"]) == (ts[ti], q_grid[qi])
        assert whole["mean_dice"] == max(max(r) for r in rows)
    assert seen == n_flagged  # no CAM was computed again by any trial


def test_cache_files_are_distinct_for_ids_that_sanitise_alike(tmp_path) -> None:
    """"a b" and "a_b" become the same safe name; their cached CAMs must not share a file, or the
    search would score one study twice and never the other (issue 19)."""
    from wsseg_core.data import StudyRef

    refs = write_phantom_cohort(tmp_path / "cohort", n=1, shape=(32, 32, 8), seed=1)
    out = tmp_path / "out"
    model, pre = build_slice_classifier("small", weights=None)
    save_classifier(out / "models" / "classifier.pt", model, pre)
    r = refs[0]
    twins = [StudyRef(**{**r.to_dict(), "patient_id": pid, "seg_path": r.seg_path})
             for pid in ("pat a", "pat_a")]
    files = [cache_study_cams(t.to_dict(), str(out), cam_batch_size=8, flag_threshold=0.0)
             for t in twins]
    assert len(set(files)) == 2 and all(Path(f).is_file() for f in files)
    assert {str(np.load(f)["patient_id"]) for f in files} == {"pat a", "pat_a"}


def test_grid_spec_and_edges() -> None:
    from jobs.tune_thresholds import grid_edges, grid_from_args
    from wsseg_core.segment import Q_GRID, T_GRID

    np.testing.assert_allclose(grid_from_args([10, 60, 26], Q_GRID), np.arange(10, 61, 2.0))
    np.testing.assert_array_equal(grid_from_args(None, T_GRID), T_GRID)
    for bad in ([10, 60], [60, 10, 5], [10, 60, 2.5], [10, 60, 0]):
        try:
            grid_from_args(bad, Q_GRID)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
    # the demo's symptom: q at the paper grid's maximum 50
    assert grid_edges(0.72, 50.0, T_GRID, Q_GRID) == ["q max"]
    assert grid_edges(float(T_GRID[0]), float(Q_GRID[3]), T_GRID, Q_GRID) == ["t min"]
    assert grid_edges(0.9, 20.0, T_GRID, Q_GRID) == ["t max", "q min"]
    assert grid_edges(None, 35.0, T_GRID, Q_GRID) == []


def _refs(split: str, n: int) -> list:
    from wsseg_core.data import StudyRef

    return [StudyRef(patient_id=f"{split}{i}", study_id="s", suv_path=f"/x/{split}{i}/SUV.nii.gz",
                     ct_path=None, seg_path=f"/x/{split}{i}/SEG.nii.gz", split=split) for i in range(n)]


def test_tune_on_chooses_the_studies_searched() -> None:
    """Issue 18 item 5: the (t, q) search scores training + validation (the paper's) or validation."""
    import pytest

    from jobs.tune_thresholds import DEFAULT_TUNE_ON, build_parser, tuning_refs

    train, val = _refs("train", 3), _refs("val", 2)
    assert DEFAULT_TUNE_ON == "train+val"
    assert tuning_refs(train, val) == [*train, *val]
    assert tuning_refs(train, val, "val") == val
    assert tuning_refs(train, [], "val") == train  # no validation study: the training studies
    with pytest.raises(ValueError, match="tune_on"):
        tuning_refs(train, val, "test")
    args = build_parser().parse_args(["--cohort", "c", "--out", "o"])
    assert args.tune_on == "train+val"
    assert build_parser().parse_args(["--cohort", "c", "--out", "o", "--tune-on", "val"]).tune_on == "val"


def test_changed_tune_on_reruns_the_search(tmp_path) -> None:
    """--tune-on is part of the tuning stage's fingerprint: a rerun with another value re-tunes and
    the log names the change; the same value reuses thresholds.json."""
    from jobs.pipeline import build_parser, stage_change, stage_fingerprint
    from jobs.tune_thresholds import tuning_refs

    model = tmp_path / "classifier.pt"
    model.write_bytes(b"weights")
    train, val = _refs("train", 3), _refs("val", 2)

    def stage(*extra: str) -> dict:
        args = build_parser().parse_args(["--out", str(tmp_path), *extra])
        return stage_fingerprint(args, tuning_refs(train, val, args.tune_on), model)

    default, again, held_out = stage(), stage(), stage("--tune-on", "val")
    assert default["fields"]["args"]["tune_on"] == "train+val"
    assert stage_change(default, again, outputs_exist=True) is None
    assert stage_change(default, again, outputs_exist=False) == "its outputs are missing"
    why = stage_change(default, held_out, outputs_exist=True)
    assert why is not None and 'tune_on: "train+val" -> "val"' in why and "studies" in why
    # only where the work runs: not a reason to re-tune
    assert stage_change(default, stage("--concurrency", "4"), outputs_exist=True) is None
