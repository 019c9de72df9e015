"""The searches' selection rule (wsseg_core.selection): per patient, then over patients."""

from __future__ import annotations

import numpy as np
import pytest

from wsseg_core.selection import best_cell, patient_mean

NAN = float("nan")


def test_patient_mean_weighs_patients_not_studies():
    # A 1 x 2 grid. Patient a: two studies; b: one; c: no tumour (NaN everywhere).
    scores = [("a", [[0.2, 0.0]]), ("a", [[0.4, NAN]]), ("b", [[0.9, 0.3]]), ("c", [[NAN, NAN]])]
    mean, n = patient_mean(((p, np.array(s)) for p, s in scores), (1, 2))
    # by hand: a -> [0.3, 0.0] (the NaN cell averages what exists), b -> [0.9, 0.3]
    np.testing.assert_allclose(mean, [[(0.3 + 0.9) / 2, (0.0 + 0.3) / 2]])
    assert n == 2
    # pooling over studies would give (0.2 + 0.4 + 0.9) / 3 = 0.5 in the first cell: the rule differs
    assert not np.isclose(mean[0, 0], 0.5)
    assert best_cell(mean) == (0, 0)


def test_no_study_or_no_tumour_gives_nan_and_no_cell():
    mean, n = patient_mean([], (2, 3))
    assert mean.shape == (2, 3) and np.isnan(mean).all() and n == 0
    assert best_cell(mean) is None
    mean, n = patient_mean([("p", np.full((2, 3), NAN))], (2, 3))
    assert np.isnan(mean).all() and n == 0 and best_cell(mean) is None


def test_best_cell_takes_the_first_of_ties_and_skips_nan():
    m = np.array([[NAN, 0.1, 0.7], [0.7, NAN, 0.2]])
    assert best_cell(m) == (0, 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        patient_mean([("p", np.zeros((2, 2)))], (2, 3))


def test_pooled_dice_counts_tumour_free_studies_by_hand():
    from wsseg_core.selection import pooled_dice

    # Two cells (e.g. thresholds). Study a: |R| 10; b: |R| 30; c: tumour-free, false positives only.
    counts = [(np.array([8, 5]), np.array([12, 6]), 10),
              (np.array([20, 10]), np.array([22, 10]), 30),
              (np.array([0, 0]), np.array([40, 2]), 0)]
    out, n = pooled_dice(counts, (2,))
    # by hand: cell 0: 2*(8+20) / ((12+22+40) + 40) = 56 / 114;
    #          cell 1: 2*(5+10) / ((6+10+2) + 40) = 30 / 58
    np.testing.assert_allclose(out, [56 / 114, 30 / 58])
    assert n == 2
    # the tumour-free study decides here: without it cell 0 (56 / 74) would beat cell 1 (30 / 56)
    alone, _ = pooled_dice(counts[:2], (2,))
    assert best_cell(alone) == (0,) and best_cell(out) == (1,)


def test_pooled_dice_without_tumour_and_bad_counts():
    from wsseg_core.selection import pooled_dice

    out, n = pooled_dice([(np.array([0]), np.array([5]), 0)], (1,))
    assert np.isnan(out).all() and n == 0
    out, n = pooled_dice([], (3,))
    assert out.shape == (3,) and np.isnan(out).all() and n == 0
    with pytest.raises(ValueError):
        pooled_dice([(np.array([6]), np.array([5]), 9)], (1,))  # |P & R| > |P|
    with pytest.raises(ValueError, match="shape"):
        pooled_dice([(np.array([1, 1]), np.array([2, 2]), 3)], (1,))
