"""Flag rules along z (issue 16): hysteresis flags, the rule's record in thresholds.json, the
flag-rule search from one per-slice cache, the tie rule, and what scoring / the tuning stage's
fingerprint do with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsseg_core.gate import (DEFAULT_FLAG_LO, FlagRule, flag_rule_candidates, hysteresis_flags)
from wsseg_core.inference import flagged_slices


def test_hysteresis_flags_by_hand() -> None:
    p = np.array([0.9, 0.6, 0.4, 0.55, 0.85, 0.65, 0.3, 0.7, 0.6, 0.81])
    # seed 0.8, lo 0.5: runs of p >= 0.5 are [0,1], [3,4,5], [7,8,9]; seeds at 0, 4, 9 -> all three
    # runs; 2 (0.4) and 6 (0.3) break them.
    np.testing.assert_array_equal(hysteresis_flags(p, 0.8, 0.5).astype(int),
                                  [1, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    # lo 0.62: runs [0], [4,5], [7], [9]; [7] (0.7) holds no seed
    np.testing.assert_array_equal(hysteresis_flags(p, 0.8, 0.62).astype(int),
                                  [1, 0, 0, 0, 1, 1, 0, 0, 0, 1])
    # no seed: nothing, however much lies above lo
    assert not hysteresis_flags(p, 0.95, 0.1).any()
    # lo >= seed: the per-slice rule
    np.testing.assert_array_equal(hysteresis_flags(p, 0.8, 0.9), p >= 0.8)
    # a run touching both ends of the volume
    np.testing.assert_array_equal(hysteresis_flags([0.6, 0.6, 0.9], 0.8, 0.5), [True, True, True])


def test_flag_rule_record_and_flagged_slices() -> None:
    p = np.array([0.2, 0.6, 0.9, 0.7, 0.1])
    assert flagged_slices(p, 0.8).tolist() == [2]  # a bare threshold, as before
    rule = FlagRule("hysteresis", 0.8, 0.5)
    assert flagged_slices(p, rule).tolist() == [1, 2, 3]
    assert flagged_slices(p, rule.to_dict()).tolist() == [1, 2, 3]
    assert rule.to_dict() == {"rule": "hysteresis", "threshold": 0.8, "lo": 0.5}
    assert FlagRule.from_record(rule.to_dict()) == rule
    assert FlagRule.from_record(0.7) == FlagRule("threshold", 0.7)
    assert FlagRule.from_record(None) == FlagRule("threshold", 0.5)  # the paper's step 1
    assert rule.floor == 0.5 and FlagRule("threshold", 0.8).floor == 0.8
    with pytest.raises(ValueError):
        FlagRule("hysteresis", 0.8)
    with pytest.raises(ValueError):
        FlagRule("zsmooth", 0.8)


def test_flag_rule_candidates_put_the_per_slice_rule_first_and_drop_lo_above_the_seed() -> None:
    names = [r.name for r in flag_rule_candidates(0.65, "auto", DEFAULT_FLAG_LO)]
    assert names == ["threshold 0.650", "hysteresis 0.650/0.6", "hysteresis 0.650/0.5"]
    assert flag_rule_candidates(0.65, "threshold") == [FlagRule("threshold", 0.65)]
    assert [r.lo for r in flag_rule_candidates(0.9, "hysteresis", [0.5, 0.7])] == [0.7, 0.5]
    # nothing below the seed: hysteresis is the per-slice rule
    assert flag_rule_candidates(0.4, "hysteresis", [0.5]) == [FlagRule("threshold", 0.4)]


def test_choose_flag_rule_pooled_validation_dice_and_ties() -> None:
    from jobs.tune_thresholds import choose_flag_rule

    # 2 rules x 1 variant x 1 t x 2 q; tuning Dice picks q index 1 under both rules for "CAM".
    dice = {"CAM": np.array([[[[0.2, 0.5]]], [[[0.1, 0.6]]]])}
    inter = np.zeros((2, 1, 1, 2), dtype=np.int64)
    pred = np.zeros_like(inter)
    # rule 0 at its cell: 2*30 / (50 + 100) = 0.4; rule 1: 2*40 / (60 + 100) = 0.5
    inter[0, 0, 0, 1], pred[0, 0, 0, 1] = 30, 50
    inter[1, 0, 0, 1], pred[1, 0, 0, 1] = 40, 60
    # the cell at q index 0 (not chosen by tuning Dice) would score better: it must not count
    inter[0, 0, 0, 0], pred[0, 0, 0, 0] = 90, 90
    best, scores, cells = choose_flag_rule(dice, {"CAM": (inter, pred, 100)})
    assert best == 1 and scores == pytest.approx([0.4, 0.5]) and cells["CAM"] == [(0, 0, 1), (0, 0, 1)]
    # equal scores: the first rule (the per-slice one) wins
    inter[1, 0, 0, 1], pred[1, 0, 0, 1] = 30, 50
    best, scores, _ = choose_flag_rule(dice, {"CAM": (inter, pred, 100)})
    assert best == 0 and scores[0] == scores[1]
    # false volume in a tumour-free validation study (no reference) lowers the pooled Dice
    pred[1, 0, 0, 1] = 50 + 40
    best, scores, _ = choose_flag_rule(dice, {"CAM": (inter, pred, 100)})
    assert best == 0 and scores[1] == pytest.approx(60 / 190)


def test_per_slice_cache_scores_any_subset_as_a_cache_of_that_subset() -> None:
    from wsseg_core.gridcache import (GridCache, build_grid_cache, cache_dice_grid,
                                      cache_threshold_dice_grid)

    rng = np.random.default_rng(0)
    suv = rng.gamma(2.0, 1.0, (20, 20, 10))
    seg = np.zeros(suv.shape)
    seg[5:9, 5:9, 2:6] = 1
    suv[seg > 0] += 5
    z = np.array([1, 2, 3, 4, 6, 8])
    cams = {"CAM": rng.random((6, 5, 5)).astype(np.float32)}
    ts, qs = [0.1, 0.5], [20.0, 50.0, 90.0]
    variants = [("none", "percentile"), ("none", "max")]
    full = build_grid_cache(suv, seg, z, cams, ts, qs, variants=variants, per_slice=True,
                            probs=rng.random(10))
    sub = np.array([2, 3, 6])
    small = build_grid_cache(suv, seg, sub, {"CAM": cams["CAM"][np.isin(z, sub)]}, ts, qs,
                             variants=variants)
    for v in variants:
        np.testing.assert_array_equal(cache_dice_grid(full, "CAM", ts, qs, v, z=sub),
                                      cache_dice_grid(small, "CAM", ts, qs, v))
    np.testing.assert_array_equal(cache_threshold_dice_grid(full, qs, sub),
                                  cache_threshold_dice_grid(small, qs))
    totals = build_grid_cache(suv, seg, z, cams, ts, qs)
    np.testing.assert_array_equal(cache_dice_grid(full, "CAM", ts, qs), cache_dice_grid(totals, "CAM", ts, qs))
    back = GridCache.from_arrays(full.to_arrays())
    assert back.per_slice and back.probs is not None and back.probs.shape == (10,)
    with pytest.raises(ValueError):  # a slice the cache does not hold
        cache_dice_grid(full, "CAM", ts, qs, z=[0, 2])
    with pytest.raises(ValueError):  # totals cannot answer a proper subset
        cache_dice_grid(totals, "CAM", ts, qs, z=sub)
    # tumour-free study: per-slice counts still hold |pred| (the false volume a rule adds)
    free = build_grid_cache(suv, np.zeros(suv.shape), z, cams, ts, qs, per_slice=True)
    assert free.n_ref == 0 and free.n_pred["CAM"].sum() > 0 and free.inter["CAM"].sum() == 0


def _write_thresholds(path, **extra) -> None:
    path.write_text(json.dumps({"source": "tuned", "methods": {}, "flag_threshold": 0.81, **extra}))


def test_old_thresholds_json_scores_as_before_and_the_recorded_rule_is_applied(tmp_path) -> None:
    from jobs.score_cohort import _flag_fingerprint
    from wsseg_core.thresholds import load_flag_rule

    old = tmp_path / "old.json"
    _write_thresholds(old)  # written before flag rules existed
    assert load_flag_rule(old) == FlagRule("threshold", 0.81)
    # the scoring fingerprint of an old run is unchanged: its results stay current
    assert _flag_fingerprint(load_flag_rule(old)) == {"flag_threshold": 0.81}
    assert _flag_fingerprint(0.81) == {"flag_threshold": 0.81}
    new = tmp_path / "new.json"
    _write_thresholds(new, flag_rule={"rule": "hysteresis", "threshold": 0.81, "lo": 0.5})
    rule = load_flag_rule(new)
    assert rule == FlagRule("hysteresis", 0.81, 0.5)
    assert _flag_fingerprint(rule)["flag_rule"] == {"rule": "hysteresis", "threshold": 0.81, "lo": 0.5}
    assert load_flag_rule(tmp_path / "absent.json") == FlagRule("threshold", 0.5)
    p = np.array([0.1, 0.55, 0.9, 0.3])
    assert flagged_slices(p, load_flag_rule(old)).tolist() == [2]
    assert flagged_slices(p, rule).tolist() == [1, 2]


def test_flag_rule_options_enter_the_tuning_fingerprint(tmp_path) -> None:
    from jobs.pipeline import parse_args, stage_change, stage_fingerprint

    model = tmp_path / "classifier.pt"
    model.write_bytes(b"weights")

    def stage(*extra: str) -> dict:
        return stage_fingerprint(parse_args(["--out", str(tmp_path), *extra]), [], model)

    default = stage()
    assert default["fields"]["args"]["flag_rule"] == "threshold"  # the preset's, resolved
    assert stage_change(default, stage("--flag-rule", "threshold"), outputs_exist=True) is None
    why = stage_change(default, stage("--flag-rule", "auto"), outputs_exist=True)
    assert why is not None and "flag_rule" in why
    why = stage_change(stage("--flag-rule", "auto"), stage("--flag-rule", "auto", "--flag-lo", "0.4"),
                       outputs_exist=True)
    assert why is not None and "flag_lo" in why
    assert parse_args(["--out", str(tmp_path), "--preset", "paper"]).flag_rule == "threshold"


def test_search_scores_every_rule_from_one_cache(tmp_path) -> None:
    """cache_study_cams with candidate rules caches the union of their slices; evaluate_cell's
    table per rule equals the table of a cache built for that rule's slices alone."""
    import torch

    from jobs.tune_thresholds import cache_study_cams, evaluate_cell
    from wsseg_core.models import build_slice_classifier, save_classifier
    from wsseg_core.phantom import write_phantom_cohort

    torch.manual_seed(0)
    model, pre = build_slice_classifier("small", weights=None)
    out = tmp_path / "run"
    save_classifier(out / "models" / "classifier.pt", model, pre)
    refs = write_phantom_cohort(tmp_path / "cohort", n=2, shape=(48, 48, 10), seed=5,
                                negative_fraction=0.0)
    probs = np.asarray(np.load(cache_study_cams(refs[0].to_dict(), str(out), 16, flag_threshold=0.0))["probs"])
    # thresholds placed inside this untrained network's spread of p, so the rules differ
    seed, lo = float(np.quantile(probs, 0.7)), float(np.quantile(probs, 0.2))
    rules = [FlagRule("threshold", seed).to_dict(), FlagRule("hysteresis", seed, lo).to_dict()]
    q_grid, ts = [30.0, 60.0], [0.2, 0.5]
    both = [cache_study_cams(r.to_dict(), str(out), 16, flag_threshold=seed, t_grid=ts, q_grid=q_grid,
                             flag_rules=rules) for r in refs]
    c0 = np.load(both[0])
    union = FlagRule.from_record(rules[0]).flags(c0["probs"]) | FlagRule.from_record(rules[1]).flags(c0["probs"])
    assert c0["flagged_z"].tolist() == np.flatnonzero(union).tolist()
    res = evaluate_cell({"cell": {"method": "CAM", "ts": ts}}, both, q_grid, flag_rules=rules)
    for fi, rule in enumerate(rules):
        alone_dir = tmp_path / f"alone{fi}"
        (alone_dir / "models").mkdir(parents=True)
        (alone_dir / "models" / "classifier.pt").write_bytes((out / "models" / "classifier.pt").read_bytes())
        alone = [cache_study_cams(r.to_dict(), str(alone_dir), 16, flag_threshold=seed, t_grid=ts,
                                  q_grid=q_grid, flag_rules=[rule]) for r in refs]
        ref_res = evaluate_cell({"cell": {"method": "CAM", "ts": ts}}, alone, q_grid)
        np.testing.assert_allclose(np.asarray(res["dice_by_fvtq"][fi])[0], ref_res["dice_by_tq"],
                                   equal_nan=True)
    assert res["flag_rules"] == rules and len(res["val_counts_by_fvtq"]) == 3


def test_z_context_score_and_rule_by_hand() -> None:
    from wsseg_core.gate import z_context_score

    p = np.array([0.2, 0.9, 0.4, 0.1])
    # windows: z0 max(0.2, 0.2, 0.9) = 0.9 -> 0.55; z1 0.9 -> 0.9; z2 max(0.9, 0.4, 0.1) -> 0.65;
    # z3 max(0.4, 0.1, 0.1) = 0.4 -> 0.25
    np.testing.assert_allclose(z_context_score(p), [0.55, 0.9, 0.65, 0.25])
    rule = FlagRule("zctx", 0.6)
    assert flagged_slices(p, rule).tolist() == [1, 2]
    assert rule.floor == pytest.approx(0.2) and rule.name == "zctx 0.600"
    assert FlagRule.from_record(rule.to_dict()) == rule
    names = [r.name for r in flag_rule_candidates(0.8, "auto", [0.7], ctx_threshold=0.75)]
    assert names == ["threshold 0.800", "hysteresis 0.800/0.7", "zctx 0.750"]
    assert flag_rule_candidates(0.8, "zctx", ctx_threshold=0.75) == [FlagRule("zctx", 0.75)]
    assert flag_rule_candidates(0.8, "zctx") == [FlagRule("threshold", 0.8)]  # no threshold: per slice
