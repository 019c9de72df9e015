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
                "Tuning and scoring would turn this into numbers that look like results. Try: "
                "another training draw on the same split (jobs.pipeline --train-seed N; on phantom "
                "variants the draw alone moved the AUC by up to 0.18), a lower --lr (1e-3 lifted "
                "two such draws from 0.75 and 0.69 to 0.80 and 0.84, but cost Dice on draws "
                "that passed), more training patients or "
                "epochs (--epochs), --optimizer adamw with the one-cycle "
                "schedule (the small preset's default), or check the cohort (SEG "
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


# --------------------------------------------------------------------------------------------------
# Flag rules (issue 16): which slices reach the CAM step, using the study's z-structure.
#
# Algorithm 1 flags each slice on its own (p >= 0.5; here p >= the validation F1 threshold). A
# lesion spans contiguous slices, and on the hotter-organ phantoms the classifier gives a lesion's
# core slices p 0.5-0.8 while its neighbours reach 0.8-1.0, so the F1 threshold drops the slices
# that hold most of the lesion's voxels. "hysteresis" keeps the F1 threshold as the seed and grows
# each seed along z through contiguous slices with p >= lo (as Canny's edge hysteresis): a slice
# below the seed threshold is flagged only when it is connected in z to a confidently flagged one.
# "zctx" flags on a z-context slice score, p_ctx = (p + max(p[z-1], p[z], p[z+1])) / 2
# (z_context_score), at its own validation-F1 threshold: a slice next to a confident one is lifted
# half way towards it. Which rule (and lo) is chosen on segmentation Dice by jobs.tune_thresholds;
# "threshold" is the per-slice rule, kept so that p >= 0.5 (the paper) and the F1 threshold stay
# selectable.

#: Flag rule kinds: "threshold" (p >= threshold, Algorithm 1's step 1), "hysteresis", "zctx".
FLAG_RULES = ("threshold", "hysteresis", "zctx")


def z_context_score(probs: np.ndarray | Sequence[float]) -> np.ndarray:
    """(p + max(p[z-1], p[z], p[z+1])) / 2 per slice (the volume's ends use their one neighbour).

    Args:
        probs: (Z,) tumour probability per slice, in z order.
    Returns:
        (Z,) float64 in [p, max of the 3-slice window].
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return p
    pad = np.concatenate([p[:1], p, p[-1:]])
    return 0.5 * (p + np.maximum(np.maximum(pad[:-2], pad[1:-1]), pad[2:]))


def hysteresis_flags(probs: np.ndarray | Sequence[float], seed: float, lo: float) -> np.ndarray:
    """Slices flagged by hysteresis along z: every maximal run of contiguous slices with
    p >= ``lo`` that holds at least one slice with p >= ``seed``. With ``lo >= seed`` this is
    ``p >= seed``.

    Args:
        probs: (Z,) tumour probability per slice, in z order.
        seed: the seed threshold (a slice with p >= seed is always flagged).
        lo: the lower threshold the seeds grow through.
    Returns:
        (Z,) bool.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    seeds = p >= seed
    if lo >= seed or not seeds.any():
        return seeds
    low = p >= lo
    # label maximal runs of `low`; a run is kept when it holds a seed
    starts = low & ~np.concatenate([[False], low[:-1]])
    run_id = np.cumsum(starts) * low  # 0 outside runs, 1..n inside
    keep = np.zeros(int(run_id.max()) + 1, dtype=bool)
    keep[run_id[seeds]] = True
    keep[0] = False
    return keep[run_id]


@dataclass(frozen=True)
class FlagRule:
    """How Algorithm 1's step 1 picks the slices that get CAMs.

    Attributes:
        kind: "threshold" (p >= threshold), "hysteresis" (seeds p >= threshold, grown along z
            through contiguous slices with p >= lo; :func:`hysteresis_flags`) or "zctx"
            (:func:`z_context_score` >= threshold).
        threshold: the flag (seed) threshold; for "zctx" a threshold on the z-context score.
        lo: the hysteresis lower threshold (None for "threshold").
    """

    kind: str = "threshold"
    threshold: float = PAPER_FLAG_THRESHOLD
    lo: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FLAG_RULES:
            raise ValueError(f"flag rule must be one of {FLAG_RULES}, got {self.kind!r}")
        if (self.kind == "hysteresis") != (self.lo is not None):
            raise ValueError("a hysteresis flag rule needs lo; a threshold rule takes none")

    def flags(self, probs: np.ndarray | Sequence[float]) -> np.ndarray:
        """(Z,) bool: the flagged slices of one study (probabilities in z order)."""
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        if self.kind == "threshold":
            return p >= self.threshold
        if self.kind == "zctx":
            return z_context_score(p) >= self.threshold
        return hysteresis_flags(p, self.threshold, float(self.lo))

    @property
    def floor(self) -> float:
        """The lowest p this rule can flag (CAMs of slices below it are never needed)."""
        if self.kind == "zctx":  # p_ctx <= (p + 1) / 2
            return max(0.0, 2.0 * self.threshold - 1.0)
        return self.threshold if self.lo is None else min(self.threshold, float(self.lo))

    @property
    def name(self) -> str:
        """Short label, e.g. "threshold 0.813" or "hysteresis 0.813/0.5"."""
        if self.kind == "zctx":
            return f"zctx {self.threshold:.3f}"
        return (f"threshold {self.threshold:.3f}" if self.kind == "threshold"
                else f"hysteresis {self.threshold:.3f}/{self.lo:g}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": self.kind, "threshold": float(self.threshold)}
        if self.lo is not None:
            d["lo"] = float(self.lo)
        return d

    @classmethod
    def from_record(cls, rec: "FlagRule | dict | float | int | None") -> "FlagRule":
        """A rule from thresholds.json's "flag_rule" (a dict), a bare flag threshold (a number:
        older runs), or None (the paper's p >= 0.5)."""
        if isinstance(rec, FlagRule):
            return rec
        if rec is None:
            return cls()
        if isinstance(rec, (int, float, np.integer, np.floating)):
            return cls("threshold", float(rec))
        lo = rec.get("lo")
        return cls(str(rec.get("rule", "threshold")), float(rec["threshold"]),
                   None if lo is None else float(lo))


#: `--flag-rule`: "threshold" (the per-slice rule only), "hysteresis" (hysteresis at every lo of
#: the grid below the seed threshold), "zctx" (the z-context score at its validation-F1
#: threshold), "auto" (all of them, the per-slice rule first so it wins ties).
FLAG_RULE_CHOICES = ("threshold", "hysteresis", "zctx", "auto")
#: `--flag-lo`: the hysteresis lower thresholds searched (absolute p).
DEFAULT_FLAG_LO = (0.5, 0.6, 0.7)


def flag_rule_candidates(threshold: float, mode: str = "threshold",
                         lo_grid: Sequence[float] = DEFAULT_FLAG_LO,
                         ctx_threshold: float | None = None) -> list[FlagRule]:
    """The flag rules a search scores, the per-slice rule first (it wins ties).

    Args:
        threshold: the flag (seed) threshold (validation F1, or fixed).
        mode: one of FLAG_RULE_CHOICES.
        lo_grid: hysteresis lower thresholds; those >= ``threshold`` are dropped (they equal the
            per-slice rule). "hysteresis" with none left falls back to the per-slice rule.
        ctx_threshold: the z-context score's flag threshold ("zctx" and "auto"; None: no zctx
            candidate, and "zctx" falls back to the per-slice rule).
    """
    if mode not in FLAG_RULE_CHOICES:
        raise ValueError(f"flag rule mode must be one of {FLAG_RULE_CHOICES}, got {mode!r}")
    base = FlagRule("threshold", float(threshold))
    hyst = [FlagRule("hysteresis", float(threshold), float(lo))
            for lo in sorted({float(v) for v in lo_grid}, reverse=True) if lo < threshold]
    ctx = [] if ctx_threshold is None else [FlagRule("zctx", float(ctx_threshold))]
    if mode == "threshold":
        return [base]
    if mode == "hysteresis":
        return hyst or [base]
    if mode == "zctx":
        return ctx or [base]
    return [base, *hyst, *ctx]
