"""The MIP-CAM Ray job: Ray Train fits inside a Ray Tune search over the distance weight, then the
(t, q) grid on cached validation CAMs; the winner lands in models/ and thresholds.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from jobs.common import RunLayout


@pytest.mark.slow
def test_search_trains_tunes_and_writes_the_winner(tmp_path, ray_cluster):
    from jobs.train_mipcam import search
    from wsseg_core.mipcam import load_mipcam
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=4, shape=(48, 40, 24), seed=1,
                                negative_fraction=0.25)
    train, val = refs[:3], refs[3:]
    # w = 0 not asked for: "CAMs alone" (Amyar et al.'s baseline) is searched anyway, as its own row
    res = search(train, val, tmp_path / "out", weights=(0.01,), epochs=1, seed=0)
    table = pd.read_parquet(res["search"])
    assert list(zip(table.sort_values("distance_weight")["distance_weight"],
                    table.sort_values("distance_weight")["variant"])) == [
        (0.0, "CAMs alone"), (0.01, "CAMs + distance loss")]
    alone = table[table["distance_weight"] == 0].iloc[0]
    layout = RunLayout(tmp_path / "out")
    model, meta = load_mipcam(layout.model("mipcam.pt"))
    assert meta["distance_weight"] == res["distance_weight"] and meta["epoch"] == 0
    entry = json.loads(layout.thresholds.read_text())["methods"]["MIP-CAM"]
    assert entry["t"] == res["t"] and entry["q"] == res["q"] and entry["reference"] == "component_max"
    assert entry["gate_threshold"] == 0.5 and entry["cams_alone_val_dice"] == alone["val_dice"]
    grid = pd.read_parquet(res["grid"])
    assert len(grid) == 2 * 10 * 20 and set(grid["distance_weight"]) == {0.0, 0.01}
    # The winner, ranked independently from the recorded grid: the highest mean validation Dice
    # over every (weight, t, q); ties go to the smaller weight (documented), any tied (t, q).
    assert grid["mean_dice"].nunique() > 1  # else any (weight, t, q) would pass
    top = grid[np.isclose(grid["mean_dice"], grid["mean_dice"].max(), rtol=0, atol=1e-12)]
    w_best = float(top["distance_weight"].min())
    assert entry["distance_weight"] == w_best == res["distance_weight"]
    cells = {(float(r.t), float(r.q)) for r in top.itertuples() if r.distance_weight == w_best}
    assert (entry["t"], entry["q"]) in cells
    assert entry["val_dice"] == pytest.approx(grid["mean_dice"].max())
    assert np.isfinite(res["table"]["val_dice"]).all()


def test_search_always_includes_cams_alone():
    from jobs.train_mipcam import searched_weights

    assert searched_weights((0.03, 0.01)) == [0.0, 0.01, 0.03]
    assert searched_weights((0.01, 0.0, 0.01)) == [0.0, 0.01]
    with pytest.raises(ValueError):
        searched_weights((-0.1,))


def test_grid_dice_applies_the_study_gate(tmp_path):
    """A validation study the CNN calls tumour-free scores Dice 0 at every (t, q), as the scorer
    gives it an empty mask; a tumour-free study stays NaN (no Dice); a flagged one is scored."""
    from jobs.train_mipcam import grid_dice
    from wsseg_core.mipcam import dice_grid, mip_views
    from wsseg_core.phantom import phantom_affine

    shape = (8, 6, 5)
    affine, spacing = phantom_affine(shape, (2.0, 2.0, 2.0)), np.array([2.0, 2.0, 2.0])
    suv = np.ones(shape, np.float32)
    suv[2:4, 1:3, 1:3] = 10.0
    seg = np.zeros(shape, np.uint8)
    seg[2:4, 1:3, 1:3] = 1
    views = mip_views(shape, affine, spacing)
    cams = {v: (lambda m: m / m.max())(suv.max(axis=views[v].proj_axis)) for v in ("coronal", "sagittal")}
    ts, qs = [0.5, 0.9], [30.0, 50.0]

    def write(name, patient, probs, seg_):
        f = tmp_path / f"{name}.npz"
        np.savez(f, suv=suv, seg=seg_, affine=affine, spacing_mm=spacing, patient_id=np.array(patient),
                 probs=np.array(probs), **{f"cam_{v}": c for v, c in cams.items()})
        return str(f)

    flagged = write("a", "P1", [0.9], seg)
    expected = dice_grid(suv, seg, cams, views, ts, qs)
    assert np.nanmin(expected) > 0.5  # the CAM is the lesion: a gated 0 cannot hide in it
    mean, n, n_gated = grid_dice([flagged], ts, qs)
    np.testing.assert_allclose(mean, expected)
    assert (n, n_gated) == (1, 0)
    missed = write("b", "P2", [0.2], seg)  # tumour, called tumour-free: empty mask, Dice 0
    free = write("c", "P3", [0.2], np.zeros(shape, np.uint8))  # tumour-free, called so: no Dice
    mean, n, n_gated = grid_dice([flagged, missed, free], ts, qs)
    assert (n, n_gated) == (2, 1)
    np.testing.assert_allclose(mean, expected / 2)  # patients P1 (expected) and P2 (0)
    mean, n, n_gated = grid_dice([flagged, missed, free], ts, qs, gate_threshold=0.0)  # gate off
    np.testing.assert_allclose(mean, expected)
    assert n_gated == 0
