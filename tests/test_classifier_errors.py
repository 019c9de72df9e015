"""bench.classifier_errors.train_patient_subset: nested, stratified training subsets (issue 16)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.classifier_errors import train_patient_subset


def _refs():
    # 12 training patients (4 tumour-free, P2 with two visits), 3 val, 3 test
    refs = [SimpleNamespace(patient_id=f"P{i}", split="train", visit=0) for i in range(12)]
    refs.append(SimpleNamespace(patient_id="P2", split="train", visit=1))
    refs += [SimpleNamespace(patient_id=f"V{i}", split="val", visit=0) for i in range(3)]
    refs += [SimpleNamespace(patient_id=f"T{i}", split="test", visit=0) for i in range(3)]
    tumour = {f"P{i}" for i in range(4, 12)} | {"V0", "T0"}
    return refs, tumour


def test_subset_keeps_val_test_and_is_nested_and_stratified() -> None:
    refs, tumour = _refs()
    prev: set[str] = set()
    for k in range(1, 13):
        out = train_patient_subset(refs, tumour, k, seed=12)
        assert [r for r in out if r.split != "train"] == [r for r in refs if r.split != "train"]
        train = {r.patient_id for r in out if r.split == "train"}
        assert len(train) == k
        assert prev <= train  # nested: a smaller subset is inside every larger one
        prev = train
        free = len(train - tumour)
        assert abs(free - k / 3) <= 0.5 + 1e-9  # the full split's tumour-free share (4 of 12)
    six = train_patient_subset(refs, tumour, 6, seed=12)
    for k in range(1, 13):  # a patient keeps all its visits
        sub = train_patient_subset(refs, tumour, k, seed=12)
        assert sum(r.patient_id == "P2" for r in sub) in (0, 2)
    assert out == refs  # k = all: nothing dropped


def test_subset_rejects_bad_k() -> None:
    refs, tumour = _refs()
    with pytest.raises(ValueError):
        train_patient_subset(refs, tumour, 0, seed=0)
    with pytest.raises(ValueError):
        train_patient_subset(refs, tumour, 13, seed=0)


@pytest.mark.timeout(120)
def test_init_seed_changes_the_network_not_the_split(tmp_path) -> None:
    """Members of a seed ensemble (--init-seed) train on the same split as --seed, with other weights."""
    import json

    from bench.classifier_errors import main

    common = ["--cohort", str(tmp_path / "c"), "--n", "8", "--shape", "48", "48", "24", "--epochs", "1",
              "--seed", "3", "--no-epoch-test"]
    a = main(common + ["--out", str(tmp_path / "a")])
    b = main(common + ["--no-write", "--init-seed", "4", "--out", str(tmp_path / "b")])
    assert a["init_seed"] == 3 and b["init_seed"] == 4  # default: --seed's
    assert a["train_patients"] == b["train_patients"] and a["n"] == b["n"]
    assert json.loads((tmp_path / "b.json").read_text())["init_seed"] == 4
    pa = (tmp_path / "a.slices.csv").read_text()
    pb = (tmp_path / "b.slices.csv").read_text()
    assert pa != pb  # other weights, other probabilities on the same slices
