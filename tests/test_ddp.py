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
    init = None
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
