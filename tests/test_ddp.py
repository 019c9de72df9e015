"""Every Ray Train job with 2 CPU workers (gloo) on a tiny cohort: it finishes, and the 2-worker
step equals the 1-worker step (issue 17: unequal shards used to deadlock the workers for ever).

Each fit is 1-2 epochs on 48x48x16 phantoms; the per-test timeout (pyproject) turns a deadlock into
a failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SHAPE = (48, 48, 16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 labelled phantom studies (2 train, 1 val, all with a lesion so every metric is defined)."""
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path_factory.mktemp("ddp_cohort"), n=3, shape=SHAPE, seed=5,
                                negative_fraction=0.0)
    return refs[:2], refs[2:]


def _state(path: Path) -> dict[str, torch.Tensor]:
    from wsseg_core.models import load_classifier

    model, _, _ = load_classifier(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_step_on_2_workers_x_8_equals_1_worker_x_16(cohort, tmp_path, ray_cluster):
    """One SGD step on one study's 16 slices: 1 worker x 16 vs 2 workers x 8 (no augmentation, no
    shuffle, same init). The paper-type VGG (no BatchNorm) at width 1/8 and 32x32 input: on CPU the
    per-worker BatchNorm statistics of the "small" preset differ by design (SyncBatchNorm needs GPUs),
    so it cannot be bit-equivalent there. The weighted loss (w = 7.7) makes the test sensitive to
    how the two halves are normalised (their tumour-slice counts differ)."""
    from jobs.train_classifier import fit
    from wsseg_core.data import load_study

    train, val = cohort
    one = train[:1]
    seg = load_study(one[0]).seg
    pos = seg.reshape(-1, seg.shape[2]).any(axis=0)
    print(f"tumour slices in halves: {int(pos[:8].sum())} / {int(pos[8:].sum())}")
    kw = dict(model_preset="paper", width=0.125, input_size=32, weights=None, epochs=1,
              batch_size=16, lr=0.05, momentum=0.9, tumour_weight=7.7, augment=False, seed=3,
              cpus_per_worker=1.0, max_failures=0, test_hooks={"shuffle": False})
    t0 = time.perf_counter()
    r1 = fit(one, val, tmp_path / "w1", num_workers=1, name="eq_w1", **kw)
    t1 = time.perf_counter()
    r2 = fit(one, val, tmp_path / "w2", num_workers=2, name="eq_w2", **kw)
    t2 = time.perf_counter()
    assert [h["steps"] for h in r1["history"]] == [h["steps"] for h in r2["history"]] == [1]
    a, b = _state(Path(r1["checkpoint"])), _state(Path(r2["checkpoint"]))
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    worst = max(diffs.values())
    print(f"1 worker {t1 - t0:.1f} s, 2 workers {t2 - t1:.1f} s; max |w1 - w2| = {worst:.3g}")
    assert worst < 1e-5, diffs
    # The step really moved the weights (else equality would prove nothing).
    torch.manual_seed(3)
    from wsseg_core.models import build_slice_classifier

    init, _ = build_slice_classifier("paper", width=0.125, input_size=32, weights=None)
    moved = max(float((a[k] - v).abs().max()) for k, v in init.state_dict().items())
    assert moved > 1e-4
    assert r1["history"][0]["train_loss"] == pytest.approx(r2["history"][0]["train_loss"], rel=1e-5)
    assert r1["history"][0]["val_loss"] == pytest.approx(r2["history"][0]["val_loss"], rel=1e-5)


def _check_two_worker_history(res: dict, epochs: int) -> None:
    """Every epoch reported once, by 2 workers, with equal steps (the sampler's count)."""
    hist = res["history"]
    assert [int(h["epoch"]) for h in hist] == list(range(epochs))
    assert all(int(h["workers"]) == 2 and int(h["steps"]) >= 1 for h in hist)
    assert Path(res["checkpoint"]).is_file()


def test_unet_trains_on_2_workers(cohort, tmp_path, ray_cluster):
    from jobs.train_unet import fit_unet
    from wsseg_core.unet import load_unet

    train, val = cohort
    t0 = time.perf_counter()
    # 32 training slices (2 x 16), global batch 12: 2 steps of 6 + 6 slices per worker, rest dropped.
    res = fit_unet(train, val, tmp_path / "out", model_preset="small", input_size=32, base=4,
                   epochs=2, batch_size=12, lr=1e-3, negative_keep=1.0, num_workers=2,
                   cpus_per_worker=1.0, max_failures=0)
    print(f"U-Net, 2 workers, 2 epochs: {time.perf_counter() - t0:.1f} s")
    _check_two_worker_history(res, 2)
    assert [int(h["steps"]) for h in res["history"]] == [2, 2]
    load_unet(res["checkpoint"])


def test_mipcam_trains_on_2_workers(cohort, tmp_path, ray_cluster):
    from jobs.train_mipcam import fit_mipcam, prepare_samples
    from wsseg_core.mipcam import TUMOUR_CLASSES, load_mipcam

    train, val = cohort
    files = prepare_samples(train, tmp_path / "samples", TUMOUR_CLASSES)
    val_files = prepare_samples(val, tmp_path / "samples", TUMOUR_CLASSES)
    t0 = time.perf_counter()
    res = fit_mipcam(files, val_files, tmp_path / "mipcam.pt", distance_weight=0.01, epochs=2,
                     batch_size=2, storage_path=str(tmp_path / "ray"), name="mipcam_ddp",
                     num_workers=2, cpus_per_worker=1.0, max_failures=0)
    print(f"MIP-CAM, 2 workers, 2 epochs: {time.perf_counter() - t0:.1f} s")
    _check_two_worker_history(res, 2)
    load_mipcam(res["checkpoint"])


def test_boxfcn_trains_on_2_workers(cohort, tmp_path, ray_cluster):
    from jobs.train_boxfcn import fit_boxfcn
    from wsseg_core.boxfcn import load_boxfcn

    train, val = cohort
    t0 = time.perf_counter()
    # Whole volumes: one per worker per step; 3 volumes-steps at 1 worker -> 2 steps at 2 workers.
    res = fit_boxfcn(train, val, tmp_path / "out", kind="box_dice", epochs=2, patience=5,
                     steps_per_epoch=3, num_workers=2, cpus_per_worker=1.0, max_failures=0,
                     name="boxfcn_ddp")
    print(f"BoxFCN, 2 workers, 2 epochs: {time.perf_counter() - t0:.1f} s")
    _check_two_worker_history(res, 2)
    assert [int(h["steps"]) for h in res["history"]] == [2, 2]
    load_boxfcn(res["checkpoint"])
    # The fine-tuning with the small preset's L_MDice per box region (each rank labels its own
    # volume's boxes) on 2 workers too.
    tuned = fit_boxfcn(train, val, tmp_path / "out", kind="mdice_ms", init_from=res["checkpoint"],
                       filename="boxfcn_mdice_ms.pt", epochs=1, patience=5, steps_per_epoch=2,
                       num_workers=2, cpus_per_worker=1.0, max_failures=0, name="boxfcn_ms_ddp")
    _check_two_worker_history(tuned, 1)
    _, meta = load_boxfcn(tuned["checkpoint"])
    assert meta["loss"]["per_box"] is True


def test_loss_weight_search_runs_train_on_2_workers_inside_tune(cohort, tmp_path, ray_cluster):
    """A Tune trial (0.01 CPU) whose Train run has 2 workers: on 2 CPUs the workers get 0.995 CPU
    each (1 CPU each would wait for resources for ever)."""
    from jobs.tune_loss_weight import search

    train, val = cohort
    t0 = time.perf_counter()
    res = search(train, val, tmp_path / "out", (7.7,), model_preset="small", input_size=32,
                 epochs=1, batch_size=16, lr=0.01, weights=None, num_workers=2, max_failures=0)
    print(f"loss-weight search, 1 trial x 2 workers: {time.perf_counter() - t0:.1f} s")
    assert res["tumour_weight"] == 7.7
    assert (tmp_path / "out" / "loss_weight" / "w7.7" / "models" / "classifier.pt").is_file()
