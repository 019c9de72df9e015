"""Flag threshold and quality gate for the slice classifier, measured on validation slices.

An extension of Algorithm 1 (Früh et al. 2021), whose step 1 flags a slice when p >= 0.5. A
classifier trained with a class-weighted loss (w = 7.7) has its decision boundary moved: with
weights [1, w] the trained posterior odds are w times the true odds (and 1/keep times more when
only a fraction ``keep`` of tumour-free slices is sampled), so p >= 0.5 flags slices whose true
tumour probability is only 1 / (1 + w) ~ 0.11. ``choose_flag_threshold`` picks the threshold on
the validation slices instead (maximum slice-level F1, which, unlike Youden's J, counts false
positives against the ~86 % tumour-free slices as they weigh in a segmentation); the paper's 0.5
stays selectable.

``classifier_gate`` decides whether a classifier learned enough for its CAMs to mean anything:
tuning and scoring a classifier that did not learn produce numbers that look like results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from wsseg_core.metrics import roc_auc

PAPER_FLAG_THRESHOLD = 0.5


@dataclass(frozen=True)
class GateBars:
    """The documented bar a classifier must clear on validation (all must hold).

    Attributes:
        min_auc: slice-level ROC AUC; 0.8 is far below what a working classifier reaches on the
            phantoms (0.95+) and far above chance (0.5).
        min_iqr: interquartile range of the validation slice probabilities; a collapsed network
            gives every slice the same p (observed: 0.516 +- 0.0001).
        max_tumour_free_flagged: median fraction of slices flagged in tumour-free validation
            studies (or, without such studies, the fraction of tumour-free slices flagged).
        min_sensitivity: fraction of tumour slices flagged; 0 means nothing reaches CAMs and the
            threshold search would keep its first grid cell at Dice 0.
    """

    min_auc: float = 0.8
    min_iqr: float = 0.01
    max_tumour_free_flagged: float = 0.25
    min_sensitivity: float = 0.2


@dataclass
class GateResult:
    """What was measured on validation, and the verdict."""

    passed: bool
    auc: float
    p_std: float
    p_iqr: float
    flag_threshold: float
    sensitivity: float
    tumour_free_flagged: float
    tumour_free_flagged_source: str
    n_slices: int
    n_tumour_slices: int
    n_studies: int
    n_tumour_free_studies: int
    failures: list[str] = field(default_factory=list)
    bars: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN becomes None)."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    def message(self) -> str:
        """One paragraph: what was measured, which bar failed, what to try."""
        meas = (f"validation slice AUC {_fmt(self.auc)}, p std {self.p_std:.4f} / IQR {self.p_iqr:.4f}, "
                f"{self.sensitivity:.0%} of tumour slices and {self.tumour_free_flagged:.0%} of "
                f"{self.tumour_free_flagged_source} flagged at p >= {self.flag_threshold:.3f} "
                f"({self.n_slices} slices, {self.n_tumour_slices} with tumour, {self.n_studies} studies)")
        if self.passed:
            return f"classifier gate passed: {meas}"
        return ("CLASSIFIER GATE FAILED: " + "; ".join(self.failures) + f". Measured: {meas}. "
                "Tuning and scoring would turn this into numbers that look like results. Try: more "
                "training patients or epochs (--epochs), --optimizer adamw with the one-cycle "
                "schedule (the small preset's default), a lower --lr, or check the cohort (SEG "
                "present, SUV/CT on one grid, validation split holds tumour-bearing patients). "
                "--allow-weak-classifier goes on anyway and records that it did.")


def _fmt(v: float) -> str:
    return "NaN" if v != v else f"{v:.3f}"


def choose_flag_threshold(probs: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """The flag threshold that maximises slice-level F1 on validation.

    Candidates are midpoints between consecutive distinct probabilities (plus just below the
    smallest), so the threshold separates observed values instead of sitting on one. Ties go to
    the higher threshold (fewer false positives). Without tumour slices, or without tumour-free
    slices, there is nothing to fit: the paper's 0.5 is returned.

    Args:
        probs: (N,) tumour probability per validation slice.
        labels: (N,) 1 = slice holds tumour.
    Returns:
        threshold in (0, 1]; a slice is flagged when p >= threshold.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and labels {y.shape} differ in length")
    if not y.any() or y.all():
        return PAPER_FLAG_THRESHOLD
    u = np.unique(p)
    cands = np.concatenate([[u[0] * 0.5], (u[:-1] + u[1:]) / 2.0]) if len(u) > 1 else np.array([u[0] * 0.5])
    cands = cands[cands > 0] if (cands > 0).any() else np.array([u[0]])
    # counts at every candidate from sorted probabilities: O(N log N)
    pos = np.sort(p[y])
    neg = np.sort(p[~y])
    tp = len(pos) - np.searchsorted(pos, cands, side="left")
    fp = len(neg) - np.searchsorted(neg, cands, side="left")
    fn = len(pos) - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = np.flatnonzero(f1 == f1.max())
    return float(cands[best[-1]])


def classifier_gate(probs_per_study: Sequence[np.ndarray], labels_per_study: Sequence[np.ndarray],
                    flag_threshold: float, bars: GateBars = GateBars()) -> GateResult:
    """Measure a classifier on validation studies and judge it against ``bars``.

    Args:
        probs_per_study: per validation study, (Z,) slice tumour probabilities.
        labels_per_study: per study, (Z,) slice labels (1 = tumour); a study whose labels are all 0
            is tumour-free.
        flag_threshold: the threshold used to flag slices (chosen, or the paper's 0.5).
        bars: the documented minimums.
    Returns:
        GateResult; ``passed`` False lists every failed bar in ``failures``.
    """
    if len(probs_per_study) != len(labels_per_study):
        raise ValueError("probs_per_study and labels_per_study differ in length")
    ps = [np.asarray(p, dtype=np.float64).reshape(-1) for p in probs_per_study]
    ys = [np.asarray(y).reshape(-1).astype(bool) for y in labels_per_study]
    for p, y in zip(ps, ys):
        if p.shape != y.shape:
            raise ValueError(f"a study has {p.size} probabilities and {y.size} labels")
    p = np.concatenate(ps) if ps else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0, dtype=bool)
    auc = roc_auc(p, y) if p.size else float("nan")
    std = float(p.std()) if p.size else 0.0
    iqr = float(np.subtract(*np.percentile(p, [75, 25]))) if p.size else 0.0
    flagged = p >= flag_threshold
    sens = float(flagged[y].mean()) if y.any() else float("nan")
    free = [float((pp >= flag_threshold).mean()) for pp, yy in zip(ps, ys) if yy.size and not yy.any()]
    if free:
        tf, src = float(np.median(free)), "slices of tumour-free studies (median)"
    else:
        tf, src = (float(flagged[~y].mean()) if (~y).any() else float("nan")), "tumour-free slices"
    failures = []
    if not auc >= bars.min_auc:  # NaN fails too: no AUC means no evidence the classifier learned
        failures.append(f"slice AUC {_fmt(auc)} < {bars.min_auc}" if auc == auc else
                        "slice AUC undefined (validation needs tumour and tumour-free slices)")
    if not iqr >= bars.min_iqr:
        failures.append(f"near-constant outputs (IQR of p {iqr:.4f} < {bars.min_iqr})")
    if tf == tf and tf > bars.max_tumour_free_flagged:
        failures.append(f"{tf:.0%} of {src} flagged > {bars.max_tumour_free_flagged:.0%}")
    if sens == sens and sens < bars.min_sensitivity:
        failures.append(f"only {sens:.0%} of tumour slices flagged < {bars.min_sensitivity:.0%} "
                        "(too few slices reach the CAM step)")
    return GateResult(passed=not failures, auc=float(auc), p_std=std, p_iqr=iqr,
                      flag_threshold=float(flag_threshold), sensitivity=sens,
                      tumour_free_flagged=tf, tumour_free_flagged_source=src, n_slices=int(p.size),
                      n_tumour_slices=int(y.sum()), n_studies=len(ps),
                      n_tumour_free_studies=len(free), failures=failures, bars=asdict(bars))


class WeakClassifierError(RuntimeError):
    """The classifier did not clear the gate; the pipeline stops before tuning and scoring."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(result.message())
        self.result = result
