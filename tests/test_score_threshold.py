"""The Threshold baseline as scored: an entry without a `reference` uses the same reference as the
search that tuned it (q % of the slice SUVmax), not another one (issue 19: scoring fell back to
"body" while tuning used "max")."""

from __future__ import annotations

import numpy as np


def test_threshold_entry_without_reference_is_scored_as_tuned(scoring_layout):
    from jobs.score_cohort import StudyMasker
    from wsseg_core.data import load_study
    from wsseg_core.segment import THRESHOLD_REFERENCE, threshold_volume

    layout, ref = scoring_layout
    # flag threshold 0: every slice flagged, so the mask depends on the reference alone
    masker = StudyMasker({"Threshold": {"q": 40.0}}, str(layout.out), methods=["Threshold"],
                         cam_batch_size=16, flag_threshold=0.0)
    got = masker.masks(ref).masks["Threshold"]
    study = load_study(ref)
    z = np.arange(study.suv.shape[2])
    expect = threshold_volume(study.suv, z, 40.0, reference=THRESHOLD_REFERENCE, ct=study.ct)
    other = threshold_volume(study.suv, z, 40.0, reference="body", ct=study.ct)
    assert THRESHOLD_REFERENCE == "max"
    assert not np.array_equal(expect, other)  # the test can tell the two apart
    np.testing.assert_array_equal(got, expect)
