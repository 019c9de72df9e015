"""jobs.train_classifier.fit with `patience_start` "half_lr" (issue 16): the epochs before the
one-cycle lr has annealed to half its peak can neither be kept nor count toward the patience."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow


def test_half_lr_start_keeps_no_network_of_the_high_lr_epochs(tmp_path, ray_cluster):
    from jobs.train_classifier import ELIGIBLE_METRIC, fit
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=3, shape=(48, 48, 16), seed=5,
                                negative_fraction=0.0)
    train, val = refs[:2], refs[2:]
    kw = dict(model_preset="small", input_size=32, weights=None, epochs=4, batch_size=16, lr=3e-3,
              optimizer="adamw", schedule="onecycle", seed=1, cpus_per_worker=1.0, max_failures=0)
    res = fit(train, val, tmp_path / "half", patience=1, patience_start="half_lr", name="half", **kw)
    hist = res["history"]
    # ceil(0.65 * 4) = 3: epochs 0-2 report no eligible AUC, so epoch 3 is the only one keepable,
    # and with patience 1 the run could not stop before it
    assert [int(h["epoch"]) for h in hist] == [0, 1, 2, 3]
    assert all(math.isnan(h[ELIGIBLE_METRIC]) for h in hist[:3])
    assert hist[3][ELIGIBLE_METRIC] == hist[3]["val_auc"] and math.isfinite(hist[3]["val_auc"])
    assert res["kept_epoch"] == 3 and res["kept_by"] == f"max {ELIGIBLE_METRIC}"
    # without the option the keeping metric is val_auc over every epoch, as before
    old = fit(train, val, tmp_path / "first", patience=None, name="first", **kw)
    assert old["kept_by"] == "max val_auc" and ELIGIBLE_METRIC not in old["history"][0]
    best = max(old["history"], key=lambda h: h["val_auc"])
    assert old["kept_epoch"] == best["epoch"]
