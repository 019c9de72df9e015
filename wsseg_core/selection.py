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

__all__ = ["patient_mean", "best_cell", "pooled_dice", "MIN_LEARNED_VAL_DICE"]

#: Below this validation Dice against SEG a segmentation network the pipeline trains (BoxFCN, the
#: U-Net, MIP-CAM) has not learned to segment, and its thresholds.json entry says so
#: (``not_learned``, shown first in the run's summary and report.html). Set on BoxFCN: on the demo
#: the box-Dice warm start alone, a weak but real segmenter, reached 0.124 and the chosen variant
#: 0.403; on the coarse30 variant the warm start fell to all background and every variant stayed
#: <= 0.048 (test Dice 0.03, |dMTV| 352 ml). A bar, not a guarantee: torso30's BoxFCN once passed it
#: at 0.18 and scored 0.00 on test (docs/EXPERIMENTS.md, "Choosing the BoxFCN variant").
MIN_LEARNED_VAL_DICE = 0.10


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


def pooled_dice(study_counts: Iterable[tuple[np.ndarray, np.ndarray, int]], shape: tuple[int, ...]
                ) -> tuple[np.ndarray, int]:
    """Dice of all studies pooled, cell by cell:
    ``2 sum_s |P_s & R_s| / (sum_s |P_s| + sum_s |R_s|)``.

    The U-Net's validation rule (issue 23), not the searches': every study counts, tumour-free ones
    included, since their false-positive voxels enlarge ``sum |P|``; ``patient_mean`` leaves those
    studies out (their Dice is NaN), so a threshold that paints every tumour-free study costs it
    nothing. Why the U-Net departs from the project rule is measured in the docs/UNET_EXPERIMENTS.md ("U-Net: a
    steadier validation choice").

    Args:
        study_counts: per study ``(|P & R|, |P|, |R|)``: the first two arrays of ``shape`` (voxel
            counts per cell, e.g. per threshold), the last the study's reference voxel count.
        shape: the count arrays' shape (the result's when there is no study).

    Returns:
        (the pooled Dice of ``shape``, all NaN when no study has a reference voxel, as
        ``metrics.dice_from_counts``; the number of studies with a reference voxel).
    """
    from wsseg_core.metrics import dice_from_counts

    inter = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    ref, n = 0, 0
    for i, p, r in study_counts:
        i, p = np.asarray(i, dtype=np.int64), np.asarray(p, dtype=np.int64)
        if i.shape != tuple(shape) or p.shape != tuple(shape):
            raise ValueError(f"count shapes {i.shape}, {p.shape} != {tuple(shape)}")
        dice_from_counts(i, p, int(r))  # validates this study's counts (ValueError if impossible)
        inter += i
        pred += p
        ref += int(r)
        n += int(r > 0)
    return np.asarray(dice_from_counts(inter, pred, ref), dtype=float).reshape(shape), n
