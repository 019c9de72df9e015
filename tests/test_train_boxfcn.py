"""Ray Train job of BoxFCN: one fine-tuning run from a warm start, and the ablation table helpers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest


def test_ablation_table_and_markdown():
    from jobs.train_boxfcn import VARIANTS, ablation_table, format_ablation

    rows = []
    for i, v in enumerate(VARIANTS):
        for split, dices in (("val", [0.1 * i, 0.1 * i + 0.2]), ("test", [0.5, np.nan, 0.3])):
            for k, d in enumerate(dices):
                rows.append({"patient_id": f"P{k}", "study_id": "s", "split": split, "variant": v,
                             "dice": d, "ude_mm": 2.0 * (k + 1), "mtv_pred_ml": 1.0, "mtv_true_ml": 1.0})
    t = ablation_table(pd.DataFrame(rows)).set_index("variant")
    assert list(t.index) == list(VARIANTS)
    assert t.loc["L_MDice", "val_dice_median"] == pytest.approx(0.2)  # (0.1 + 0.3) / 2
    assert t.loc["L_MDice", "test_n"] == 2 and t.loc["L_MDice", "test_dice_median"] == pytest.approx(0.4)
    assert t.loc["L_MDice", "test_ude_median_mm"] == pytest.approx(4.0)
    md = format_ablation(t.reset_index())
    assert md.count("\n") == 1 + len(VARIANTS) and "| L_MDice+L_MS+M |" in md


@pytest.mark.slow
def test_fit_boxfcn_fine_tunes_from_warm_start_with_ray_train(ray_cluster, tmp_path):
    from jobs.train_boxfcn import fit_boxfcn
    from wsseg_core.boxfcn import build_boxfcn, load_boxfcn, save_boxfcn
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=2, shape=(48, 48, 16), seed=3, negative_fraction=0.0)
    warm = tmp_path / "warm.pt"
    save_boxfcn(warm, build_boxfcn("small"))
    res = fit_boxfcn(refs[:1], refs[1:], tmp_path / "out", kind="mdice_ms", init_from=warm,
                     epochs=2, patience=5, steps_per_epoch=1, cpus_per_worker=1, max_failures=0,
                     name="boxfcn_test")
    model, meta = load_boxfcn(res["checkpoint"])
    assert res["checkpoint"].endswith("models/boxfcn.pt")
    assert meta["kind"] == "mdice_ms" and meta["loss"]["beta"] == 10.0 and meta["loss"]["omega2"] == 3.0
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    assert all(math.isfinite(h["val_loss"]) for h in res["history"])
    # the kept checkpoint is the one with the lowest validation loss
    assert meta["val_loss"] == pytest.approx(min(h["val_loss"] for h in res["history"]))
