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
    assert t.loc["L_MDice", "val_dice_median"] == pytest.approx(0.3)  # 3rd variant: (0.2 + 0.4) / 2
    assert t.loc["L_MDice", "test_n"] == 2 and t.loc["L_MDice", "test_dice_median"] == pytest.approx(0.4)
    assert t.loc["L_MDice", "test_ude_median_mm"] == pytest.approx(4.0)
    md = format_ablation(t.reset_index())
    assert md.count("\n") == 1 + len(VARIANTS) and "| L_MDice+L_MS+M |" in md


def test_ablation_files_are_written_whole_and_leave_no_temp_file(tmp_path):
    """`_write_ablation` goes through the storage atomic writers: the four files, nothing else."""
    from jobs.train_boxfcn import VARIANTS, _write_ablation, ablation_table

    per_study = pd.DataFrame([{"patient_id": "P0", "study_id": "s", "split": sp, "variant": v,
                               "dice": 0.5, "ude_mm": 1.0, "mtv_pred_ml": 1.0, "mtv_true_ml": 1.0}
                              for v in VARIANTS for sp in ("val", "test")])
    table = ablation_table(per_study)
    paths = _write_ablation(tmp_path, per_study, table)
    assert sorted(p.name for p in (tmp_path / "boxfcn").iterdir()) == sorted(
        ["ablation_studies.parquet", "ablation.parquet", "ablation.md", "ablation.png"])
    pd.testing.assert_frame_equal(pd.read_parquet(paths["table"]), table.reset_index(drop=True))
    assert (tmp_path / "boxfcn" / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def _val_rows(dices: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"patient_id": f"P{k}", "split": "val", "variant": v, "dice": d}
                         for v, ds in dices.items() for k, d in enumerate(ds)])


def test_select_variant_takes_the_best_validation_median_whatever_the_loss():
    from jobs.train_boxfcn import VARIANTS, select_variant

    assert len(VARIANTS) == 8  # four networks (L_MS in two forms), each with and without M
    # The demo's failure (docs/EXPERIMENTS.md ablation): L_MDice + L_MS over-segments, L_MDice is best.
    rows = _val_rows({"L_Dice (box)": [0.2, 0.25, np.nan], "L_Dice (box)+M": [0.21, 0.2, np.nan],
                      "L_MDice": [0.3, 0.22, np.nan], "L_MDice+M": [0.31, 0.24, np.nan],
                      "L_MDice+L_MS": [0.1, 0.15, np.nan], "L_MDice+L_MS+M": [0.12, 0.2, np.nan]})
    c = select_variant(rows)
    assert (c["variant"], c["role"], c["postprocess"]) == ("L_MDice+M", "mdice", True)
    assert c["val_dice"] == pytest.approx(0.275)  # median of 0.31, 0.24 (the NaN left out)
    assert c["medians"]["L_MDice+L_MS"] == pytest.approx(0.125)
    # The warm start wins when fine-tuning made both fine-tuned networks worse.
    rows = _val_rows({"L_Dice (box)": [0.5], "L_Dice (box)+M": [0.4], "L_MDice": [0.3],
                      "L_MDice+M": [0.3], "L_MDice+L_MS": [0.1], "L_MDice+L_MS+M": [0.1]})
    assert select_variant(rows)["role"] == "box_dice" and not select_variant(rows)["postprocess"]
    # Ties go to the paper's full method; a variant that was not trained is simply absent.
    rows = _val_rows({"L_Dice (box)": [0.4], "L_Dice (box)+M": [0.4],
                      "L_MDice+L_MS": [0.4], "L_MDice+L_MS+M": [0.4]})
    c = select_variant(rows)
    assert c["variant"] == "L_MDice+L_MS+M" and "L_MDice" not in c["medians"]
    with pytest.raises(ValueError, match="no BoxFCN variant"):
        select_variant(_val_rows({"L_MDice": [np.nan]}))


def test_select_variant_treats_cells_within_the_margin_as_ties_and_prefers_the_papers_method():
    """coarse30's validation medians (runs of 2026-12-03, thresholds.json "val_dice_by_threshold"):
    the highest cell, L_MDice+L_MS+M at p >= 0.9 (0.396), is within 0.05 of the paper's full method
    at 0.5 (0.375), so the latter is chosen; a cell more than the margin above it still wins."""
    from jobs.train_boxfcn import SELECTION_MARGIN, select_variant

    medians = {"L_Dice (box)": {0.3: 0.310, 0.5: 0.298, 0.7: 0.294, 0.9: 0.262},
               "L_MDice": {0.3: 0.312, 0.5: 0.352, 0.7: 0.283, 0.9: 0.219},
               "L_MDice+L_MS": {0.3: 0.338, 0.5: 0.348, 0.7: 0.358, 0.9: 0.370},
               "L_MDice+L_MS+M": {0.3: 0.353, 0.5: 0.375, 0.7: 0.383, 0.9: 0.396}}

    def rows(cells):
        return pd.DataFrame([{"patient_id": "P0", "split": "val", "variant": v, "threshold": t, "dice": d}
                             for v, ts in cells.items() for t, d in ts.items()])

    assert SELECTION_MARGIN == 0.05
    c = select_variant(rows(medians))
    assert (c["variant"], c["threshold"]) == ("L_MDice+L_MS+M", 0.5)
    assert c["val_dice"] == pytest.approx(0.375) and c["best_val_dice"] == pytest.approx(0.396)
    # margin 0: the plain maximum, as before the rule.
    assert (select_variant(rows(medians), margin=0.0)["threshold"]) == 0.9
    # 0.30 ahead of the paper's method is no tie: L_MDice at 0.5 wins.
    c = select_variant(rows({**medians, "L_MDice": {0.5: 0.451}}))
    assert (c["variant"], c["threshold"]) == ("L_MDice", 0.5)
    # The demo's medians: p never reached 0.7 (every cell 0 there), 0.3 and 0.5 within 0.012.
    demo = {"L_MDice+L_MS+M": {0.3: 0.561, 0.5: 0.549, 0.7: 0.0, 0.9: 0.0},
            "L_MDice": {0.3: 0.521, 0.5: 0.534, 0.7: 0.0, 0.9: 0.0}}
    c = select_variant(rows(demo))
    assert (c["variant"], c["threshold"]) == ("L_MDice+L_MS+M", 0.5)
    # Equally far from 0.5 (0.3 and 0.7 when 0.5 is out of the margin): the lower one.
    c = select_variant(rows({"L_MDice": {0.3: 0.40, 0.5: 0.10, 0.7: 0.40}}))
    assert c["threshold"] == 0.3


def test_a_boxfcn_that_did_not_learn_is_named_in_thresholds_and_the_summary(tmp_path):
    """coarse30's medians (README, "Results per cohort"): the best variant at 0.042 has not learned;
    the demo's (0.403) has. The reason reaches the one-screen summary through thresholds.json."""
    import json

    from jobs.analyze import format_not_learned, read_not_learned
    from jobs.train_boxfcn import MIN_LEARNED_VAL_DICE, not_learned_reason, select_variant

    collapsed = select_variant(_val_rows({"L_Dice (box)": [0.028, 0.01, 0.05], "L_MDice": [0.041, 0.03, 0.06],
                                          "L_MDice+M": [0.042, 0.03, 0.06], "L_MDice+L_MS": [0.028, 0.0, 0.04]}))
    why = not_learned_reason(collapsed)
    assert collapsed["val_dice"] < MIN_LEARNED_VAL_DICE == 0.10
    assert why.startswith("BoxFCN did not learn") and "L_MDice+M" in why and "0.042" in why
    learned = select_variant(_val_rows({"L_Dice (box)": [0.124], "L_MDice+L_MS+M": [0.403]}))
    assert not_learned_reason(learned) is None
    assert not_learned_reason(learned, bar=0.5) is not None  # the bar is the argument's
    (tmp_path / "thresholds.json").write_text(json.dumps(
        {"methods": {"BoxFCN": {"learned": False, "not_learned": why}, "CAM": {"t": 0.5, "q": 40.0}}}))
    found = read_not_learned(tmp_path / "thresholds.json")
    assert found == {"BoxFCN": why}
    assert format_not_learned(found) == f"WARNING BoxFCN: {why}"
    assert format_not_learned({}) == "" and read_not_learned(tmp_path / "absent.json") == {}


@pytest.mark.slow
def test_fit_boxfcn_fine_tunes_from_warm_start_with_ray_train(ray_cluster, tmp_path):
    from jobs.train_boxfcn import fit_boxfcn
    from wsseg_core.boxfcn import build_boxfcn, load_boxfcn, save_boxfcn
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=2, shape=(48, 48, 16), seed=3, negative_fraction=0.0)
    warm = tmp_path / "warm.pt"
    save_boxfcn(warm, build_boxfcn("small"))
    # The small preset's per-box L_MDice, and a lost node: rank 0 is SIGKILLed once during epoch 2
    # (test hook); Ray Train restarts the worker from the epoch-1 checkpoint and the run ends whole.
    marker = tmp_path / "killed"
    res = fit_boxfcn(refs[:1], refs[1:], tmp_path / "out", kind="mdice_ms", init_from=warm,
                     loss={"per_box": True}, epochs=3, patience=5, steps_per_epoch=1,
                     cpus_per_worker=1, max_failures=1, name="boxfcn_test",
                     test_hooks={"crop": [32, 32, 16], "fail_after_epoch": 1, "fail_marker": str(marker),
                                 "fail_delay_s": 8.0})
    assert marker.is_file()  # the worker really was killed
    model, meta = load_boxfcn(res["checkpoint"])
    assert res["checkpoint"].endswith("models/boxfcn.pt")
    assert meta["kind"] == "mdice_ms" and meta["loss"]["beta"] == 10.0 and meta["loss"]["omega2"] == 3.0
    assert meta["loss"]["ms_form"] == "eq5"  # the literal Eq. 5 by default, recorded in the checkpoint
    assert meta["loss"]["per_box"] is True
    assert meta["crop"] == [32, 32, 16]  # the worker trained on body crops (the paper preset's input)
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]  # each epoch once, the kill redid none
    assert all(math.isfinite(h["val_loss"]) for h in res["history"])
    # the small preset keeps the epoch with the best validation Dice (issue 23; the second
    # volume has tumour, so the score is the Dice, not the fallback -val_loss)
    assert res["kept_by"] == "max keep_score"
    # one validation study: its median is its Dice
    assert all(h["val_dice_defined"] and h["keep_score"] == h["val_dice_median"] == pytest.approx(h["val_dice"])
               for h in res["history"])
    assert meta["val_dice"] == pytest.approx(max(h["val_dice"] for h in res["history"]))
    assert meta["epoch"] == res["kept_epoch"]


def _dead_warm_start(tmp_path) -> list:
    """Two tiny phantom studies, and at tmp_path/dead.pt a small BoxFCN born collapsed (head weight
    0, bias -60: p = 1e-26 everywhere, no gradient back), so every epoch ends all background."""
    import torch

    from wsseg_core.boxfcn import build_boxfcn, save_boxfcn
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=2, shape=(48, 48, 16), seed=3, negative_fraction=0.0)
    dead = build_boxfcn("small")
    with torch.no_grad():
        dead.head.weight.zero_()
        dead.head.bias.fill_(-60.0)
    save_boxfcn(tmp_path / "dead.pt", dead)
    return refs


def test_a_collapsed_warm_start_restarts_from_its_first_weights_at_a_lower_lr(ray_cluster, tmp_path):
    """Issue 23 (coarse30): after a box-Dice epoch that ends all background (loss 1.0, sigmoid
    saturated) the run restarts from its first weights at COLLAPSE_LR_FACTOR x the lr with its epoch
    budget again, at most `collapse_retries` times. The network starts collapsed (head weight 0,
    bias -60: p = 1e-26 everywhere), so every epoch collapses: epochs 1 and 2 restart (3 + 1, then
    3 + 2 epochs planned), the rest train on."""
    from jobs.train_boxfcn import COLLAPSE_LR_FACTOR, fit_boxfcn
    from wsseg_core.boxfcn import load_boxfcn

    refs = _dead_warm_start(tmp_path)
    res = fit_boxfcn(refs[:1], refs[1:], tmp_path / "out", kind="box_dice", init_from=tmp_path / "dead.pt",
                     optimizer="adam", lr=1e-3, epochs=3, patience=10, steps_per_epoch=1,
                     cpus_per_worker=1, max_failures=0, name="boxfcn_collapse",
                     test_hooks={"collapse_retries": 2})
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3, 4]
    assert [h["train_loss"] for h in hist] == pytest.approx([1.0] * 5)
    assert [h["restarts"] for h in hist] == [1, 2, 2, 2, 2]
    assert [h["epochs_planned"] for h in hist] == [4, 5, 5, 5, 5]
    lr1, lr2 = 1e-3 * COLLAPSE_LR_FACTOR, 1e-3 * COLLAPSE_LR_FACTOR ** 2
    assert [h["lr"] for h in hist] == pytest.approx([lr1, lr2, lr2, lr2, lr2])
    model, meta = load_boxfcn(res["checkpoint"])
    assert meta["epoch"] == 0  # all epochs at Dice 0: the first is kept, and it restarted exactly
    assert float(model.head.bias.detach()) == -60.0 and not model.head.weight.any()


@pytest.mark.slow
def test_the_warm_start_does_not_stop_early_before_it_has_learned(ray_cluster, tmp_path):
    """Issue 23 (hot30): with patience 1 a warm start whose validation Dice stays 0 would stop after
    its 2nd epoch; under the small preset's bar (`patience_from_dice`, the "did not learn" bar) it
    runs its whole budget, its early-stopping count held at 0. The network starts dead (head weight
    0, bias -60: p = 1e-26 everywhere) so the Dice is 0 whatever it trains."""
    from jobs.train_boxfcn import MIN_LEARNED_VAL_DICE, fit_boxfcn, fit_config

    assert fit_config([], [], kind="box_dice")["patience_from_dice"] == MIN_LEARNED_VAL_DICE
    assert "patience_from_dice" not in fit_config([], [], kind="mdice", init_from="warm.pt")
    assert "patience_from_dice" not in fit_config([], [], kind="box_dice", preset="paper")
    refs = _dead_warm_start(tmp_path)
    res = fit_boxfcn(refs[:1], refs[1:], tmp_path / "out", kind="box_dice", init_from=tmp_path / "dead.pt",
                     optimizer="adam", lr=1e-3, epochs=3, patience=1, steps_per_epoch=1,
                     cpus_per_worker=1, max_failures=0, name="boxfcn_floor",
                     test_hooks={"patience_from_dice": MIN_LEARNED_VAL_DICE})
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # without the bar: [0, 1]
    assert [h["keep_score"] for h in hist] == [0.0, 0.0, 0.0] and [h["bad_epochs"] for h in hist] == [0, 0, 0]


def test_evaluate_study_scores_every_network_with_and_without_m(tmp_path):
    from jobs.train_boxfcn import VARIANTS, evaluate_study, select_variant
    from wsseg_core.boxfcn import build_boxfcn, save_boxfcn
    from wsseg_core.phantom import write_phantom_cohort

    ref = write_phantom_cohort(tmp_path / "c", n=1, shape=(48, 48, 16), seed=3, negative_fraction=0.0)[0]
    import torch

    models = {}
    for k, role in enumerate(("box_dice", "mdice", "mdice_ms", "mdice_ms_cv")):
        torch.manual_seed(k)
        models[role] = str(tmp_path / f"{role}.pt")
        save_boxfcn(models[role], build_boxfcn("small"))
    rows = pd.DataFrame(evaluate_study(ref.to_dict(), models, {"opening_vox": 1, "min_volume_ml": 0.1}))
    assert list(rows["variant"]) == list(VARIANTS)
    assert rows["dice"].between(0, 1).all()
    # "+M" never adds voxels: opening and small-component removal only remove
    for name in ("L_Dice (box)", "L_MDice", "L_MDice+L_MS", "L_MDice+L_MS(CV)"):
        with_m = rows.loc[rows["variant"] == name + "+M", "mtv_pred_ml"].item()
        assert with_m <= rows.loc[rows["variant"] == name, "mtv_pred_ml"].item()
    assert select_variant(rows)["variant"] in VARIANTS
    assert set(rows["threshold"]) == {0.5}  # the default: the paper's cut only
    # several thresholds: each cut scored; a higher cut never marks more voxels
    rows = pd.DataFrame(evaluate_study(ref.to_dict(), {"mdice": models["mdice"]},
                                       {"opening_vox": 1, "min_volume_ml": 0.1}, thresholds=(0.5, 0.9)))
    assert len(rows) == 4 and sorted(set(rows["threshold"])) == [0.5, 0.9]
    mtv = rows.set_index(["variant", "threshold"])["mtv_pred_ml"]
    assert mtv["L_MDice", 0.9] <= mtv["L_MDice", 0.5]


def test_select_variant_chooses_the_threshold_on_validation_and_ties_go_to_one_half():
    from jobs.train_boxfcn import select_variant

    def rows(spec):  # {(variant, threshold): [dice per study]}
        return pd.DataFrame([{"patient_id": f"P{k}", "split": "val", "variant": v, "threshold": t, "dice": d}
                             for (v, t), ds in spec.items() for k, d in enumerate(ds)])

    c = select_variant(rows({("L_MDice", 0.5): [0.2, 0.3], ("L_MDice", 0.7): [0.4, 0.3],
                             ("L_Dice (box)", 0.5): [0.32, 0.33], ("L_Dice (box)", 0.9): [0.1, 0.1]}))
    assert (c["variant"], c["threshold"]) == ("L_MDice", 0.7) and c["val_dice"] == pytest.approx(0.35)
    assert c["medians"] == {"L_MDice": pytest.approx(0.25), "L_Dice (box)": pytest.approx(0.325)}
    assert c["medians_by_threshold"]["L_Dice (box)"][0.9] == pytest.approx(0.1)
    # equal medians: the threshold nearest 0.5, then the lower one
    c = select_variant(rows({("L_MDice", 0.3): [0.4], ("L_MDice", 0.5): [0.4], ("L_MDice", 0.9): [0.4]}))
    assert c["threshold"] == 0.5
    c = select_variant(rows({("L_MDice", 0.3): [0.4], ("L_MDice", 0.7): [0.4]}))
    assert c["threshold"] == 0.3


def test_scored_summary_reads_the_chosen_variant_and_threshold():
    from jobs.train_boxfcn import scored_summary

    per_study = pd.DataFrame([
        {"split": "val", "variant": "L_MDice", "threshold": 0.7, "dice": 0.4, "mtv_pred_ml": 5.0},
        {"split": "val", "variant": "L_MDice", "threshold": 0.5, "dice": 0.1, "mtv_pred_ml": 50.0},
        {"split": "test", "variant": "L_MDice", "threshold": 0.7, "dice": 0.2, "mtv_pred_ml": 3.0},
        {"split": "test", "variant": "L_MDice", "threshold": 0.7, "dice": 0.6, "mtv_pred_ml": 9.0},
        {"split": "test", "variant": "L_MDice", "threshold": 0.7, "dice": np.nan, "mtv_pred_ml": 99.0},
        {"split": "test", "variant": "L_MDice+M", "threshold": 0.7, "dice": 0.9, "mtv_pred_ml": 1.0}])
    s = scored_summary(per_study, {"variant": "L_MDice", "threshold": 0.7})
    assert s["val_dice_median"] == pytest.approx(0.4) and s["val_mtv_median_ml"] == pytest.approx(5.0)
    # the negative study (NaN Dice) is left out of both medians
    assert s["test_n"] == 2 and s["test_dice_median"] == pytest.approx(0.4)
    assert s["test_mtv_median_ml"] == pytest.approx(6.0)


def test_ms_form_enters_the_fine_tuning_fingerprint_only(tmp_path):
    """Issue 18 item 9: a rerun with another L_MS form trains a new fine-tuning run (its Ray run name
    carries the fingerprint), while the warm start (box Dice) is reused."""
    from jobs.ray_train import run_fingerprint
    from jobs.train_boxfcn import MS_FORM_ROLES, build_parser, fit_config, ms_forms_arg
    from wsseg_core.data import StudyRef

    refs = [StudyRef(patient_id="P0", study_id="s", suv_path=str(tmp_path / "suv.nii.gz"),
                     ct_path=str(tmp_path / "ct.nii.gz"), seg_path=str(tmp_path / "seg.nii.gz"))]

    def digest(**kw):
        return run_fingerprint(fit_config(refs, refs, **kw), metric="val_loss", mode="min")["digest"]

    cfg = fit_config(refs, refs, kind="mdice_ms", ms_form="chan-vese")
    assert cfg["loss"]["ms_form"] == "chan-vese" and cfg["loss"]["omega2"] == 3.0
    assert digest(kind="mdice_ms") == digest(kind="mdice_ms", ms_form="eq5")
    assert digest(kind="mdice_ms", ms_form="eq5") != digest(kind="mdice_ms", ms_form="chan-vese")
    assert digest(kind="box_dice", ms_form="eq5") == digest(kind="box_dice", ms_form="chan-vese")
    assert "ms_form" not in fit_config(refs, refs, kind="mdice")["loss"]
    # issue 18 item 8: the paper preset trains on 160x160x128 crops (in its fingerprint and the
    # worker's config); the small preset on whole volumes, its config unchanged
    assert fit_config(refs, refs, preset="paper", kind="box_dice")["crop"] == [160, 160, 128]
    assert "crop" not in fit_config(refs, refs, preset="small")
    # issue 23: the small preset's warm start (and only it) starts its output bias at the box prior
    # and undoes collapsed epochs; the paper preset keeps the plain initialisation and loop
    warm = fit_config(refs, refs, preset="small", kind="box_dice")
    assert warm["head_prior"] is True and warm["collapse_retries"] == 3
    assert not {"head_prior", "collapse_retries"} & set(fit_config(refs, refs, preset="small", kind="mdice",
                                                                   init_from="w.pt"))
    assert "head_prior" not in fit_config(refs, refs, preset="small", kind="box_dice", init_from="w.pt")
    assert not {"head_prior", "collapse_retries"} & set(fit_config(refs, refs, preset="paper", kind="box_dice"))
    # issue 23: the small preset's L_MDice is per box region (in the fine-tuning runs' loss, so
    # their fingerprints); the warm start and the paper preset keep the paper's sums; a loss that
    # names it wins
    assert fit_config(refs, refs, preset="small", kind="mdice")["loss"]["per_box"] is True
    assert fit_config(refs, refs, preset="small", kind="mdice_ms")["loss"]["per_box"] is True
    assert "per_box" not in fit_config(refs, refs, preset="small", kind="box_dice")["loss"]
    assert "per_box" not in fit_config(refs, refs, preset="paper", kind="mdice_ms")["loss"]
    assert fit_config(refs, refs, preset="small", kind="mdice", loss={"per_box": False})["loss"]["per_box"] is False
    assert digest(kind="mdice") != digest(kind="mdice", loss={"per_box": False})
    with pytest.raises(ValueError, match="ms_form"):
        fit_config(refs, refs, ms_form="cv")
    # CLI: eq5 is the default; "both" trains one network per form, under distinct roles and files
    assert build_parser().parse_args(["--cohort", "c", "--out", "o"]).ms_form == "eq5"
    assert ms_forms_arg("both") == ("eq5", "chan-vese") and ms_forms_arg("chan-vese") == ("chan-vese",)
    roles = [MS_FORM_ROLES[f] for f in ms_forms_arg("both")]
    assert len({r for r, _ in roles}) == len({f for _, f in roles}) == 2


def test_pipeline_forwards_the_ms_form_into_its_stage_fingerprint(tmp_path):
    from jobs.pipeline import build_parser, stage_fingerprint

    model = tmp_path / "classifier.pt"
    model.write_bytes(b"weights")
    out = ["--out", str(tmp_path / "run"), "--methods", "CAM", "BoxFCN"]
    eq5 = build_parser().parse_args(out)
    cv = build_parser().parse_args(out + ["--boxfcn-ms-form", "chan-vese"])
    assert eq5.boxfcn_ms_form == "eq5" and cv.boxfcn_ms_form == "chan-vese"
    fp_eq5, fp_cv = stage_fingerprint(eq5, [], model), stage_fingerprint(cv, [], model)
    assert fp_eq5["digest"] != fp_cv["digest"]
    assert fp_cv["fields"]["args"]["boxfcn_ms_form"] == "chan-vese"
    # The warm start's budget and patience (what the "did not learn" message tells a user to raise)
    # reach the pipeline's arguments, and jobs.train_boxfcn's CLI takes the patience too.
    from jobs.train_boxfcn import build_parser as boxfcn_parser
    from jobs.train_boxfcn import fit_config

    longer = build_parser().parse_args(out + ["--boxfcn-warm-epochs", "20", "--boxfcn-patience", "20"])
    assert (longer.boxfcn_warm_epochs, longer.boxfcn_patience) == (20, 20)
    assert (eq5.boxfcn_warm_epochs, eq5.boxfcn_patience) == (None, None)  # the preset's
    assert boxfcn_parser().parse_args(["--cohort", "c", "--out", "o", "--patience", "20"]).patience == 20
    assert fit_config([], [], kind="box_dice", epochs=20, patience=20)["patience"] == 20


def test_keep_score_follows_the_rule_and_falls_back_to_the_loss_without_tumour():
    """Issue 23: the small preset keeps the epoch with the best validation Dice (the measure the
    variant is chosen by), the paper preset the lowest validation loss."""
    from jobs.train_boxfcn import BOXFCN_JOB_PRESETS, KEEP_MODES, keep_score

    assert BOXFCN_JOB_PRESETS["small"]["keep_by"] == "val_dice"
    assert BOXFCN_JOB_PRESETS["paper"]["keep_by"] == "val_loss"  # Afshari Sec. 4.3
    assert keep_score("val_loss", 7.5, 0.2) == 7.5 and KEEP_MODES["val_loss"] == "min"
    assert keep_score("val_dice", 7.5, 0.2) == 0.2 and KEEP_MODES["val_dice"] == "max"
    # no validation study with tumour (Dice NaN): the higher score is the lower loss
    assert keep_score("val_dice", 7.5, float("nan")) == -7.5
    assert keep_score("val_dice", 3.0, float("nan")) > keep_score("val_dice", 7.5, float("nan"))
    with pytest.raises(ValueError, match="keep_by"):
        keep_score("dice", 1.0, 0.5)


def test_keep_by_enters_the_fingerprint(tmp_path):
    """A rerun with another keep rule trains a new run (its config and fingerprint differ)."""
    from jobs.ray_train import run_fingerprint
    from jobs.train_boxfcn import fit_config
    from wsseg_core.data import StudyRef

    refs = [StudyRef(patient_id="P0", study_id="s", suv_path=str(tmp_path / "suv.nii.gz"),
                     ct_path=str(tmp_path / "ct.nii.gz"), seg_path=str(tmp_path / "seg.nii.gz"))]
    small = fit_config(refs, refs, kind="mdice", preset="small")
    assert small["keep_by"] == "val_dice" and fit_config(refs, refs, preset="paper")["keep_by"] == "val_loss"
    by_loss = fit_config(refs, refs, kind="mdice", preset="small", keep_by="val_loss")
    digest = lambda c: run_fingerprint(c, metric="x", mode="max")["digest"]  # noqa: E731
    assert digest(small) != digest(by_loss)
    with pytest.raises(ValueError, match="keep_by"):
        fit_config(refs, refs, keep_by="dice")
