"""The selection rule every validation search uses: Dice averaged per patient, then over patients.

The slice-CAM (t, q) search (`jobs.tune_thresholds`), MIP-CAM's (distance weight, t, q) search
(`jobs.train_mipcam`) and the loss-weight search (`jobs.tune_loss_weight`, through the first) score
each candidate by this one rule, so they cannot drift apart: a patient with three studies weighs
as much as a patient with one (the test split is drawn by patient, and the README reports
per-patient statistics), and a study without tumour (Dice NaN: nothing to overlap) counts for
nothing rather than as 0 or 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

__all__ = ["patient_mean", "best_cell"]


def patient_mean(study_scores: Iterable[tuple[str, np.ndarray]], shape: tuple[int, ...]
                 ) -> tuple[np.ndarray, int]:
    """Mean over patients of each patient's mean over their studies, cell by cell.

    Args:
        study_scores: (patient id, that study's score array of `shape`, e.g. Dice over a t x q
            grid, NaN where undefined), one per study.
        shape: the score arrays' shape (the result's when there is no study).

    Returns:
        (the mean, of `shape`: NaN where no patient has a defined score; the number of patients
        with a defined score somewhere).
    """
    per_patient: dict[str, list[np.ndarray]] = {}
    for patient, score in study_scores:
        score = np.asarray(score, dtype=float)
        if score.shape != tuple(shape):
            raise ValueError(f"patient {patient!r}: score shape {score.shape} != {tuple(shape)}")
        per_patient.setdefault(str(patient), []).append(score)
    if not per_patient:
        return np.full(shape, np.nan), 0
    # NaN means "no tumour to score": average what exists (an all-NaN cell is expected, not worth
    # nanmean's "Mean of empty slice" warning).
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pm = np.stack([np.nanmean(np.stack(v), axis=0) for v in per_patient.values()])
        mean = np.nanmean(pm, axis=0)
    n = int(np.isfinite(pm.reshape(len(pm), -1)).any(axis=1).sum())
    return mean, n


def best_cell(mean: np.ndarray) -> tuple[int, ...] | None:
    """Index of the highest finite value of `mean` (the first on ties, in C order), or None when
    no value is finite."""
    mean = np.asarray(mean, dtype=float)
    if not np.isfinite(mean).any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.nanargmax(mean)), mean.shape))
