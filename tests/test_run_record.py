"""Each job's own run.json entry (issue 19 item 5): the pieces jobs.pipeline assembles, checked
without a cluster against records written out by hand."""

from __future__ import annotations

import hashlib

from jobs.ray_train import training_record, training_run
from jobs.train_boxfcn import TRAINING_RUN_KEYS, training_runs


def _fit(name: str, kept: int) -> dict:
    return {"run_name": f"{name}-abc", "fingerprint": "f" * 64, "kept_epoch": kept,
            "kept_by": "max val_auc", "best": {"epoch": kept, "val_auc": 0.9},
            "history": [{"epoch": 0, "val_auc": 0.5}, {"epoch": 1, "val_auc": 0.9}]}


def test_training_record_names_the_network_its_run_and_the_kept_epoch(tmp_path):
    model = tmp_path / "classifier.pt"
    model.write_bytes(b"weights")
    rec = training_record(_fit("classifier", 1), "s3://b/run/models/classifier.pt", model)
    assert rec == {"path": "s3://b/run/models/classifier.pt",
                   "sha256": hashlib.sha256(b"weights").hexdigest(),
                   "run_name": "classifier-abc", "fingerprint": "f" * 64, "kept_epoch": 1,
                   "kept_by": "max val_auc", "best_epoch_metrics": {"epoch": 1, "val_auc": 0.9},
                   "history": [{"epoch": 0, "val_auc": 0.5, "kept": False},
                               {"epoch": 1, "val_auc": 0.9, "kept": True}]}
    assert training_record(None, "", model) is None


def test_training_runs_keep_every_key_whether_or_not_a_network_was_trained():
    assert training_run(None) is None
    assert training_run(_fit("unet", 0)) == {"run_name": "unet-abc", "fingerprint": "f" * 64}
    keys = {"boxfcn", "boxfcn_chan_vese", "boxfcn_mdice", "boxfcn_warm_start"}
    assert training_runs(None) == dict.fromkeys(keys)  # no BoxFCN: the keys are there, null
    got = training_runs({"box_dice": _fit("warm", 0), "mdice_ms": _fit("ms", 1)})  # no mdice, no CV
    assert got == {"boxfcn": {"run_name": "ms-abc", "fingerprint": "f" * 64},
                   "boxfcn_warm_start": {"run_name": "warm-abc", "fingerprint": "f" * 64},
                   "boxfcn_mdice": None, "boxfcn_chan_vese": None}
    assert set(TRAINING_RUN_KEYS.values()) == keys
