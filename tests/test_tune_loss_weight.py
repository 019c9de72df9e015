"""The classifier's loss-weight search (`--tune-loss-weight`): Ray Train fits inside Ray Tune trials."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest


def _recording_trial(real_trial, record):
    """`jobs.tune_loss_weight.trial` that first appends, in the Tune actor that runs it, the CAM batch
    each of its real `cache_study_cams` calls receives to the file `record`, then runs the real trial."""

    def trial(config, **kwargs):
        import jobs.tune_thresholds as tt

        real_cache = tt.cache_study_cams

        def cache_study_cams(ref, out, cam_batch_size, *args, **kw):
            with open(record, "a") as f:
                f.write(f"{cam_batch_size}\n")
            return real_cache(ref, out, cam_batch_size, *args, **kw)

        tt.cache_study_cams = cache_study_cams
        try:
            return real_trial(config, **kwargs)
        finally:
            tt.cache_study_cams = real_cache

    return trial


@pytest.mark.slow
def test_search_fits_each_weight_and_ranks_them(tmp_path, ray_cluster, monkeypatch):
    """Also: the CAM batch given to `search` (the preset's cam_batch_size) is the one every trial
    caches its validation CAMs with (the trials once hard-coded 64). One search serves both checks:
    each costs a Ray Train fit per weight."""
    import jobs.tune_loss_weight as tlw
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=3, shape=(40, 40, 20), seed=4, negative_fraction=0.0)
    record = tmp_path / "cam_batches.txt"
    monkeypatch.setattr(tlw, "trial", _recording_trial(tlw.trial, record))  # Tune gets `trial` by name
    res = tlw.search(refs[:2], refs[2:], tmp_path / "out", (1.0, 7.7), cam_batch_size=3,
                     model_preset="small", epochs=1, batch_size=16, lr=0.01, weights=None, num_workers=1)
    # two trials, one validation study each, each at the configured batch
    assert record.read_text().split() == ["3", "3"]
    table = pd.read_parquet(res["results"])
    assert sorted(table["tumour_weight"]) == [1.0, 7.7]  # one finished trial per weight
    assert table["val_auc"].notna().all()
    # An independent ranking of the recorded scores (validation AUC, then best CAM Dice; NaN
    # last), not row 0 of the table the search sorted itself.
    def key(row):
        return tuple(-math.inf if math.isnan(v) else v for v in (row["val_auc"], row["best_cam_dice"]))

    rows = table.to_dict("records")
    best = max(key(r) for r in rows)
    winners = {r["tumour_weight"] for r in rows if key(r) == best}
    assert res["tumour_weight"] in winners
    chosen = json.loads((tmp_path / "out" / "loss_weight" / "chosen.json").read_text())
    assert chosen["tumour_weight"] == res["tumour_weight"]
    # the written table is in ranking order, best first
    assert [key(r) for r in rows] == sorted((key(r) for r in rows), reverse=True)
    for w in ("w1", "w7.7"):  # each trial's own classifier and cached validation CAMs
        assert (tmp_path / "out" / "loss_weight" / w / "models" / "classifier.pt").is_file()
