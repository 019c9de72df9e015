"""jobs.ray_train: which epoch's network a run keeps, what it records, and how reruns find their run.

The train loop here is a real (tiny) torch model trained by Ray Train, so checkpoints, restore by
name and pruning (`num_to_keep=2`) are Ray's own; the metric it reports is scripted per epoch so
the kept epoch is known in advance.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import ray.cloudpickle as cloudpickle

import pytest
import torch

from jobs.ray_train import FINISHED_FILE, EpochKeeper, describe_change, fit_best, report_epoch, resume_from_checkpoint, run_fingerprint

pytestmark = pytest.mark.slow
# Ray workers cannot import tests/: ship this module's loop to them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _save(path: Path, model: torch.nn.Module, epoch: int) -> None:
    torch.save({"state": model.state_dict(), "epoch": epoch}, path)


def _load(path: Path) -> tuple:
    d = torch.load(path, weights_only=True)
    m = torch.nn.Linear(2, 1)
    m.load_state_dict(d["state"])
    return (m, d["epoch"])


def scripted_loop(config: dict) -> None:
    """Trains a Linear(2, 1) one step per epoch and reports config["scores"][epoch] as `score`."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0
    resumed = resume_from_checkpoint("net.pt", _load)
    if resumed is not None:
        (model, _), start, opt_state = resumed
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.load_state_dict(opt_state)
    for epoch in range(start, config["epochs"]):
        loss = model(torch.ones(4, 2)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        report_epoch({"score": config["scores"][epoch], "epoch": epoch}, epoch, opt, "net.pt",
                     lambda p, e=epoch: _save(p, model, e))


def test_keeper_ranks_finite_values_and_falls_back_to_the_last_epoch():
    k = EpochKeeper("auc", "max")
    assert k.record({"auc": float("nan")}, 0) and k.fallback and k.kept_epoch == 0
    assert k.record({"auc": float("nan")}, 1) and k.kept_epoch == 1  # still the latest
    assert k.record({"auc": 0.6}, 2) and not k.fallback and k.kept_epoch == 2
    assert not k.record({"auc": float("nan")}, 3) and k.kept_epoch == 2  # NaN never beats 0.6
    assert not k.record({"auc": 0.5}, 4) and k.record({"auc": 0.7}, 5) and k.kept_epoch == 5
    assert [h["epoch"] for h in k.history] == [0, 1, 2, 3, 4, 5]
    m = EpochKeeper("loss", "min")
    m.record({"loss": 2.0}, 0)
    assert m.record({"loss": 1.0}, 1) and not m.record({"loss": 1.5}, 2) and m.kept_epoch == 1


def test_fingerprint_names_what_changed(tmp_path):
    a = run_fingerprint({"lr": 0.1, "epochs": 3, "cpus_per_worker": 2, "fail_marker": "x"},
                        metric="auc", mode="max")
    b = run_fingerprint({"lr": 0.1, "epochs": 3, "cpus_per_worker": 1}, metric="auc", mode="max")
    c = run_fingerprint({"lr": 0.2, "epochs": 3}, metric="auc", mode="max")
    assert a["digest"] == b["digest"]  # placement and test hooks do not change what is computed
    assert a["digest"] != c["digest"]
    assert describe_change(a["fields"], c["fields"]) == "lr: 0.1 -> 0.2"
    w = tmp_path / "w.pt"
    w.write_bytes(b"one")
    d1 = run_fingerprint({"init_from": str(w)}, metric="auc", mode="max")
    w.write_bytes(b"two")  # same path, new contents (a retrained warm start)
    assert run_fingerprint({"init_from": str(w)}, metric="auc", mode="max")["digest"] != d1["digest"]


def test_kept_epoch_history_and_reruns(tmp_path, ray_cluster, caplog):
    caplog.set_level(logging.INFO, logger="wsseg.ray_train")
    storage = str(tmp_path / "ray")
    kw = dict(ckpt_file="net.pt", metric="score", name="toy", storage_path=storage, cpus_per_worker=1)
    # Best epoch 1 of 5: Ray keeps only the last two checkpoints (3 and 4), so the kept network
    # must come from the keeper's copy, and the history from its record.
    cfg = {"epochs": 5, "scores": [0.2, 0.9, 0.5, 0.4, 0.3]}
    res = fit_best(scripted_loop, cfg, dest=tmp_path / "a.pt", **kw)
    assert res["kept_epoch"] == 1 and res["kept_by"] == "max score"
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2, 3, 4]
    assert res["best"]["score"] == 0.9
    assert torch.load(tmp_path / "a.pt", weights_only=True)["epoch"] == 1

    # The same command again: the finished run is reused (no epoch reported), same answer.
    caplog.clear()
    again = fit_best(scripted_loop, cfg, dest=tmp_path / "b.pt", **kw)
    assert again["run_name"] == res["run_name"] and again["kept_epoch"] == 1
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2, 3, 4]
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert "resuming it" in caplog.text
    # ... read from the finished run's last checkpoint, without a Ray Train controller and workers.
    assert "Ray Train not started" in caplog.text and again["ray_checkpoint"] == res["ray_checkpoint"]
    assert again["best"] == res["best"] and again["kept_by"] == res["kept_by"]

    # A run finished before the record existed (or whose record is lost) goes through Ray Train's
    # own restore, trains no epoch, and records itself finished for the next time.
    finished = Path(storage) / res["run_name"] / FINISHED_FILE
    finished.unlink()
    caplog.clear()
    restored = fit_best(scripted_loop, cfg, dest=tmp_path / "b2.pt", **kw)
    assert "Ray Train not started" not in caplog.text and finished.is_file()
    assert restored["kept_epoch"] == 1 and restored["best"] == res["best"]
    assert (tmp_path / "b2.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()
    # `fresh` discards the stored run, record included: it trains again.
    caplog.clear()
    fresh = fit_best(scripted_loop, cfg, dest=tmp_path / "b3.pt", fresh=True, **kw)
    assert "discarded the stored run" in caplog.text and "Ray Train not started" not in caplog.text
    assert fresh["kept_epoch"] == 1 and fresh["ray_checkpoint"] != res["ray_checkpoint"]

    # A changed setting trains a new run and the log says what changed.
    caplog.clear()
    changed = fit_best(scripted_loop, {**cfg, "scores": [0.2, 0.3, 0.5, 0.4, 0.8]},
                       dest=tmp_path / "c.pt", **kw)
    assert changed["run_name"] != res["run_name"] and changed["kept_epoch"] == 4
    assert "settings or data changed" in caplog.text and "scores" in caplog.text

    # A metric that is never finite (no validation study): the last epoch, with a warning;
    # and a rerun of that finished run works too (Ray's get_best_checkpoint used to raise here).
    nan_cfg = {"epochs": 3, "scores": [math.nan] * 3}
    for dest in ("d.pt", "e.pt"):
        caplog.clear()
        r = fit_best(scripted_loop, nan_cfg, dest=tmp_path / dest, **kw)
        assert r["kept_epoch"] == 2 and r["kept_by"].startswith("last epoch")
        assert "was not finite in any epoch" in caplog.text
    assert torch.load(tmp_path / "e.pt", weights_only=True)["epoch"] == 2
