"""Issue 16: the two documented extensions of Algorithm 1 (wsseg_core.segment ``grow`` and
``q_rule``), their grid counts, the tuning cache's variant keys and the search that chooses them.

Every expected mask below is derived by hand in the comments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.tune_thresholds import cam_variants, evaluate_cell
from wsseg_core.gridcache import PAPER_VARIANT, build_grid_cache, cache_dice_grid, variant_key
from wsseg_core.metrics import dice
from wsseg_core.segment import dice_grid, dice_grid_counts, grow_slice, segment_slice, segment_volume


def _slice_with_lesion_across_the_region() -> tuple[np.ndarray, np.ndarray]:
    """6x6 SUV 1, a 2x2 lesion of SUV 10 at rows 2-3, cols 2-3, a separate hot spot SUV 10 at
    (5, 0); a 2x2 CAM whose top row is hot, so the region (nearest, 2 -> 6) is rows 0-2."""
    suv = np.ones((6, 6))
    suv[2:4, 2:4] = 10.0
    suv[5, 0] = 10.0
    cam = np.array([[1.0, 1.0], [0.0, 0.0]])
    return suv, cam


def test_grow_slice_keeps_the_components_touching_the_seed_8_connected() -> None:
    cand = np.zeros((5, 5), dtype=bool)
    cand[0, 0] = cand[1, 1] = True  # diagonal neighbours: one component under 8-connectivity
    cand[3:5, 3:5] = True           # another component, not seeded
    seed = np.zeros((5, 5), dtype=bool)
    seed[0, 0] = True
    expect = np.zeros((5, 5), dtype=bool)
    expect[0, 0] = expect[1, 1] = True
    np.testing.assert_array_equal(grow_slice(seed, cand), expect)
    # a seed voxel outside the candidates connects nothing
    seed2 = np.zeros((5, 5), dtype=bool)
    seed2[2, 2] = True
    assert not grow_slice(seed2, cand).any()
    with pytest.raises(ValueError):
        grow_slice(seed, cand[:4])


def test_q_rule_max_is_a_fraction_of_the_region_suvmax() -> None:
    suv, cam = _slice_with_lesion_across_the_region()
    # Region rows 0-2: 18 voxels, SUV 1 except (2, 2), (2, 3) = 10; max 10.
    # "max", q = 50: t_q = 5 -> the two lesion voxels of the region.
    m = segment_slice(suv, cam, 0.5, 50.0, q_rule="max")
    expect = np.zeros((6, 6), dtype=bool)
    expect[2, 2:4] = True
    np.testing.assert_array_equal(m, expect)
    # "percentile", q = 50: the median of the region's SUVs is 1 -> all 18 region voxels.
    assert segment_slice(suv, cam, 0.5, 50.0).sum() == 18
    # "max", q = 5: t_q = 0.5 -> the whole region too
    assert segment_slice(suv, cam, 0.5, 5.0, q_rule="max").sum() == 18
    with pytest.raises(ValueError):
        segment_slice(suv, cam, 0.5, 50.0, q_rule="mean")


def test_grow_extends_the_mask_past_the_region_along_the_lesion_only() -> None:
    suv, cam = _slice_with_lesion_across_the_region()
    # Algorithm 1 ("max", q 50): (2, 2), (2, 3). Grown along SUV >= 5: the lesion's row 3 joins;
    # the hot spot (5, 0) is two rows from the lesion, another component, so it stays out.
    m = segment_slice(suv, cam, 0.5, 50.0, q_rule="max", grow="slice")
    expect = np.zeros((6, 6), dtype=bool)
    expect[2:4, 2:4] = True
    np.testing.assert_array_equal(m, expect)
    # percentile rule, q = 95: 17 of the 18 region SUVs; linear interpolation at rank 0.95 x 17 =
    # 16.15 between sorted[16] = 10 and sorted[17] = 10 -> t_q = 10: the same two voxels, grown
    # to the same 2x2 lesion.
    np.testing.assert_array_equal(segment_slice(suv, cam, 0.5, 95.0, grow="slice"), expect)
    with pytest.raises(ValueError):
        segment_slice(suv, cam, 0.5, 50.0, grow="3d")


def test_volume_and_grid_counts_agree_for_every_variant() -> None:
    rng = np.random.default_rng(0)
    suv = rng.gamma(2.0, 1.0, size=(16, 16, 5))
    suv[4:9, 5:11, 1:4] += 8.0
    seg = np.zeros(suv.shape, dtype=np.uint8)
    seg[4:9, 5:11, 1:4] = 1
    z = np.array([1, 2, 4])
    cams = rng.random((3, 4, 4))
    ts, qs = [0.3, 0.7], [30.0, 60.0, 90.0]
    for grow, q_rule in cam_variants("auto", "auto"):
        grid = dice_grid(suv, seg, z, cams, ts, qs, grow=grow, q_rule=q_rule)
        for i, t in enumerate(ts):
            for j, q in enumerate(qs):
                m = segment_volume(suv, z, cams, t, q, grow=grow, q_rule=q_rule)
                assert grid[i, j] == pytest.approx(dice(m, seg), abs=1e-12), (grow, q_rule, t, q)
    # growth only adds voxels: |pred| never falls
    _, n_none, _ = dice_grid_counts(suv, seg, z, cams, ts, qs, q_rule="max")
    _, n_grow, _ = dice_grid_counts(suv, seg, z, cams, ts, qs, q_rule="max", grow="slice")
    assert (n_grow >= n_none).all() and (n_grow > n_none).any()


def test_cam_variants_paper_first() -> None:
    assert cam_variants("none", "percentile") == [PAPER_VARIANT]
    assert cam_variants("none", "auto") == [("none", "percentile"), ("none", "max")]
    assert cam_variants("auto", "auto")[0] == PAPER_VARIANT and len(cam_variants("auto", "auto")) == 4
    with pytest.raises(ValueError):
        cam_variants("volume", "auto")


def test_cache_variant_keys_and_the_search_choose_and_record_the_variant(tmp_path) -> None:
    suv, cam = _slice_with_lesion_across_the_region()
    vol = suv[:, :, None].repeat(2, axis=2)
    seg = np.zeros(vol.shape, dtype=np.uint8)
    seg[2:4, 2:4, :] = 1  # the lesion in both slices: 8 voxels
    cams = np.stack([cam, cam])
    variants = cam_variants("auto", "auto")
    cache = build_grid_cache(vol, seg, [0, 1], {"CAM": cams}, [0.5], [50.0], variants=variants)
    assert variant_key("CAM") == "CAM" and variant_key("CAM", ("slice", "max")) == "CAM|slice|max"
    # Per slice (hand-derived above): paper (percentile 50) -> 18 region voxels, 2 on the lesion:
    # Dice 2*4/(36+8) = 0.1818; (none, max) -> 2 of 2: 2*4/(4+8) = 0.667; (slice, max) -> the
    # 2x2 lesion: Dice 1; (slice, percentile 50): t_q = 1 grows over the whole slice (SUV >= 1):
    # 36 voxels a slice, Dice 2*8/(72+8) = 0.2.
    got = {v: float(cache_dice_grid(cache, "CAM", [0.5], [50.0], v)[0, 0]) for v in variants}
    assert got[("none", "percentile")] == pytest.approx(8 / 44)
    assert got[("none", "max")] == pytest.approx(8 / 12)
    assert got[("slice", "max")] == pytest.approx(1.0)
    assert got[("slice", "percentile")] == pytest.approx(0.2)
    paper_only = build_grid_cache(vol, seg, [0, 1], {"CAM": cams}, [0.5], [50.0])
    with pytest.raises(KeyError):
        cache_dice_grid(paper_only, "CAM", [0.5], [50.0], ("none", "max"))
    # The trial chooses (variant, t, q) jointly; the file round trip is the tuning cache's.
    f = tmp_path / "s.npz"
    np.savez(f, patient_id=np.array("p1"), **cache.to_arrays())
    res = evaluate_cell({"cell": {"method": "CAM", "ts": [0.5], "variants": [list(v) for v in variants]}},
                        [str(f)], [50.0])
    assert (res["grow"], res["q_rule"]) == ("slice", "max") and res["mean_dice"] == pytest.approx(1.0)
    # Only the paper's variant searched: it is what comes back.
    res = evaluate_cell({"cell": {"method": "CAM", "ts": [0.5]}}, [str(f)], [50.0])
    assert (res["grow"], res["q_rule"]) == PAPER_VARIANT and res["mean_dice"] == pytest.approx(8 / 44)
    json.dumps(res)  # a Tune metric must serialise


def test_ties_go_to_the_paper_variant(tmp_path) -> None:
    # A slice whose region is exactly the lesion: every variant gives Dice 1; the paper's is kept.
    suv = np.ones((4, 4, 1))
    suv[:2, :, 0] = 10.0
    seg = np.zeros(suv.shape, dtype=np.uint8)
    seg[:2, :, 0] = 1
    cams = np.array([[[1.0], [0.0]]])  # (1, 2, 1): rows 0-1 of the 4x4 slice
    variants = cam_variants("auto", "auto")
    cache = build_grid_cache(suv, seg, [0], {"CAM": cams}, [0.5], [50.0], variants=variants)
    f = tmp_path / "s.npz"
    np.savez(f, patient_id=np.array("p1"), **cache.to_arrays())
    res = evaluate_cell({"cell": {"method": "CAM", "ts": [0.5], "variants": [list(v) for v in variants]}},
                        [str(f)], [50.0])
    assert res["mean_dice"] == pytest.approx(1.0)
    assert (res["grow"], res["q_rule"]) == PAPER_VARIANT


def test_chosen_entries_record_the_variant_and_prefer_the_paper_on_ties() -> None:
    import pandas as pd

    from jobs.tune_thresholds import chosen_entries

    rows = []
    # CAM: (none, percentile) best 0.40 at t 0.5 q 30; (none, max) best 0.55 at t 0.3 q 40.
    for (g, r), tab in {("none", "percentile"): {(0.3, 30.0): 0.2, (0.5, 30.0): 0.4, (0.5, 40.0): 0.1},
                        ("none", "max"): {(0.3, 40.0): 0.55, (0.5, 30.0): 0.3}}.items():
        rows += [{"method": "CAM", "grow": g, "q_rule": r, "t": t, "q": q, "mean_dice": d}
                 for (t, q), d in tab.items()]
    # GradCAM: both variants reach 0.5: the paper's (listed first) is kept.
    rows += [{"method": "GradCAM", "grow": "none", "q_rule": "percentile", "t": 0.5, "q": 35.0, "mean_dice": 0.5},
             {"method": "GradCAM", "grow": "none", "q_rule": "max", "t": 0.3, "q": 40.0, "mean_dice": 0.5}]
    rows += [{"method": "Threshold", "grow": None, "q_rule": None, "t": np.nan, "q": 40.0, "mean_dice": 0.45}]
    got = chosen_entries(pd.DataFrame(rows), np.array([0.1, 0.3, 0.5, 0.9]), np.array([20.0, 30.0, 40.0, 50.0]))
    assert {k: got["CAM"][k] for k in ("t", "q", "grow", "q_rule")} == \
        {"t": 0.3, "q": 40.0, "grow": "none", "q_rule": "max"}
    assert got["CAM"]["val_dice"] == pytest.approx(0.55)
    assert got["CAM"]["val_dice_by_variant"] == {"none/percentile": pytest.approx(0.4),
                                                 "none/max": pytest.approx(0.55)}
    assert (got["GradCAM"]["grow"], got["GradCAM"]["q_rule"], got["GradCAM"]["t"]) == ("none", "percentile", 0.5)
    assert "grow" not in got["Threshold"] and got["Threshold"]["q"] == 40.0
    json.dumps(got)  # goes to thresholds.json as is


def test_scoring_applies_the_recorded_variant() -> None:
    from types import SimpleNamespace

    from wsseg_core.methods import METHODS, StudyContext

    suv, cam = _slice_with_lesion_across_the_region()
    study = SimpleNamespace(suv=suv[:, :, None].repeat(2, axis=2), ct=None)
    geometry = SimpleNamespace(cam_index=lambda h, w: None)  # the slice was resized: no index
    cams = {"CAM": np.stack([cam, cam])}

    def mask(entry: dict) -> np.ndarray:
        ctx = StudyContext(flagged_z=np.array([1]), thresholds={"CAM": entry}, cams={"CAM": cams["CAM"][:1]},
                           geometry=geometry)
        return METHODS["CAM"].segment(study, ctx)

    # hand-derived in the tests above: paper (percentile 50) 18 region voxels; max 2; grown max 4
    assert mask({"t": 0.5, "q": 50.0}).sum() == 18  # an entry without a variant: the paper's
    assert mask({"t": 0.5, "q": 50.0, "grow": "none", "q_rule": "max"}).sum() == 2
    m = mask({"t": 0.5, "q": 50.0, "grow": "slice", "q_rule": "max"})
    assert m[:, :, 1].sum() == 4 and m[:, :, 0].sum() == 0  # slice 0 not flagged


def test_variant_options_enter_the_tuning_stage_fingerprint(tmp_path) -> None:
    from jobs.pipeline import parse_args, stage_change, stage_fingerprint

    model = tmp_path / "classifier.pt"
    model.write_bytes(b"weights")

    def stage(*extra: str) -> dict:
        return stage_fingerprint(parse_args(["--out", str(tmp_path), *extra]), [], model)

    default = stage()
    assert default["fields"]["args"]["q_rule"] == "auto" and default["fields"]["args"]["grow"] == "none"
    why = stage_change(default, stage("--q-rule", "percentile"), outputs_exist=True)
    assert why is not None and 'q_rule: "auto" -> "percentile"' in why
    why = stage_change(default, stage("--grow", "auto"), outputs_exist=True)
    assert why is not None and 'grow: "none" -> "auto"' in why


def test_q_rule_default_is_the_presets_and_the_paper_preset_keeps_algorithm_1() -> None:
    from jobs.pipeline import parse_args
    from jobs.tune_thresholds import build_parser as tune_parser, preset_q_rule

    assert parse_args(["--out", "o"]).q_rule == "auto"
    assert parse_args(["--out", "o", "--preset", "paper"]).q_rule == "percentile"
    assert parse_args(["--out", "o", "--preset", "paper", "--q-rule", "max"]).q_rule == "max"
    tune_args = tune_parser().parse_args(["--cohort", "c", "--out", "o", "--preset", "paper"])
    assert tune_args.q_rule is None and preset_q_rule(tune_args) == "percentile"
