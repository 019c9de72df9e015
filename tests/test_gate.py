"""The flag threshold chosen on validation and the classifier quality gate (wsseg_core.gate)."""

from __future__ import annotations

import numpy as np
import pytest

from wsseg_core.gate import (PAPER_FLAG_THRESHOLD, GateBars, WeakClassifierError,
                             choose_flag_threshold, classifier_gate)


def test_flag_threshold_maximises_f1_counted_by_hand():
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.9])
    y = np.array([0, 0, 0, 1, 0, 1, 1])
    # by hand: threshold between 0.3 and 0.35 flags {0.35,0.6,0.7,0.9}: tp 3 fp 1 fn 0 -> F1 6/7
    # between 0.6 and 0.7 flags {0.7,0.9}: tp 2 fp 0 fn 1 -> F1 4/5; 6/7 > 4/5, so 0.325 wins
    assert choose_flag_threshold(p, y) == pytest.approx(0.325)


def test_flag_threshold_ties_go_to_the_higher_threshold_and_no_class_gives_paper_value():
    p = np.array([0.1, 0.2, 0.8, 0.9])
    y = np.array([0, 0, 1, 1])
    # every threshold in (0.2, 0.8] gives F1 1; only the midpoint 0.5 is a candidate there
    assert choose_flag_threshold(p, y) == pytest.approx(0.5)
    p2 = np.array([0.01, 0.02, 0.30, 0.31])
    assert choose_flag_threshold(p2, y) == pytest.approx(0.16)
    assert choose_flag_threshold(p2, np.zeros(4)) == PAPER_FLAG_THRESHOLD
    assert choose_flag_threshold(p2, np.ones(4)) == PAPER_FLAG_THRESHOLD


def _study(rng, n, tumour_slices, p_tumour, p_free):
    y = np.zeros(n, dtype=int)
    y[tumour_slices] = 1
    p = np.where(y == 1, p_tumour, p_free) + rng.normal(0, 0.01, n)
    return np.clip(p, 0, 1), y


def test_gate_passes_a_classifier_that_separates_and_measures_by_hand():
    rng = np.random.default_rng(0)
    a = _study(rng, 40, slice(10, 20), 0.9, 0.1)
    b = _study(rng, 40, slice(0, 0), 0.9, 0.1)       # tumour-free study
    b[0][:4] = 0.8                                   # 4 of its 40 slices flagged: 10 %
    res = classifier_gate([a[0], b[0]], [a[1], b[1]], flag_threshold=0.5)
    assert res.passed, res.message()
    assert res.auc > 0.95
    assert res.tumour_free_flagged == pytest.approx(0.1)
    assert res.n_tumour_free_studies == 1
    assert res.sensitivity == pytest.approx(1.0)
    assert res.n_slices == 80 and res.n_tumour_slices == 10
    assert "gate passed" in res.message()


def test_gate_stops_constant_outputs_with_what_was_measured():
    y = [np.r_[np.zeros(30), np.ones(10)].astype(int), np.zeros(40, dtype=int)]
    p = [np.full(40, 0.516), np.full(40, 0.516)]  # the observed collapse
    res = classifier_gate(p, y, flag_threshold=0.5)
    assert not res.passed
    msg = res.message()
    assert "CLASSIFIER GATE FAILED" in msg and "AUC 0.500" in msg and "near-constant" in msg
    assert "100% of slices of tumour-free studies" in msg
    assert "--allow-weak-classifier" in msg
    with pytest.raises(WeakClassifierError, match="near-constant"):
        raise WeakClassifierError(res)


def test_gate_stops_when_no_tumour_slice_is_flagged_and_on_undefined_auc():
    rng = np.random.default_rng(1)
    p, y = _study(rng, 60, slice(20, 30), 0.4, 0.1)  # separates, but nothing reaches 0.5
    res = classifier_gate([p], [y], flag_threshold=0.5)
    assert res.auc > 0.95 and res.sensitivity == 0.0
    assert not res.passed and any("tumour slices flagged" in f for f in res.failures)
    # without any tumour slice there is no evidence the classifier learned
    res2 = classifier_gate([p], [np.zeros(60, dtype=int)], flag_threshold=0.5)
    assert not res2.passed and "undefined" in res2.failures[0]


def test_gate_bars_are_applied_as_documented():
    rng = np.random.default_rng(2)
    p, y = _study(rng, 100, slice(0, 50), 0.6, 0.4)
    p = np.where(rng.uniform(size=100) < 0.15, 1 - p, p)  # ~15 % swapped: AUC ~0.85
    auc = classifier_gate([p], [y], 0.5).auc
    assert 0.75 < auc < 0.95
    below = classifier_gate([p], [y], 0.5, GateBars(min_auc=auc - 0.01))
    above = classifier_gate([p], [y], 0.5, GateBars(min_auc=auc + 0.01))
    assert not any("AUC" in f for f in below.failures)
    assert any("AUC" in f for f in above.failures) and not above.passed
