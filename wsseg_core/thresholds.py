"""The `thresholds.json` format: what each method segments with, chosen once and read by scoring.

One file per run (`<out>/thresholds.json`)::

    {"source": "tuned",
     "methods": {"GradCAM": {"t": 0.2, "q": 35.0, "val_dice": 0.61, "grid_edge": []},
                 "Threshold": {"q": 31.0, "reference": "max", ...},
                 "MIP-CAM": {...}, "BoxFCN": {...}, "UNet": {...}},
     "flag_threshold": 0.5, "flag_threshold_source": "fixed", "classifier_gate": {...},
     "tune_on": "train+val", "n_tune_studies": 9, ...}

`t` is a CAM threshold on the [0, 1] CAM, `q` a percent (Algorithm 1's SUV percentile; for the
Threshold baseline a percent of the reference, see `wsseg_core.segment`). A CAM method's entry may
also name the Algorithm-1 variant tuning chose, `"grow"` ("none" / "slice") and `"q_rule"`
("percentile" / "max"), with `"val_dice_by_variant"`; absent, scoring uses the paper's ("none",
"percentile"). The top-level `"cam_variants"` lists the variants the search scored. Several searches write
into the same file (the slice-CAM search, MIP-CAM's, BoxFCN's, the U-Net's), each its own methods'
entries (:func:`update_thresholds`); the top level holds run-wide values (the flag threshold, which
studies were tuned on). A method without an entry is scored with the paper's values
(:func:`load_thresholds`).

`"flag_rule"` (issue 16, written by the slice-CAM search): how step 1 flags slices, e.g.
``{"rule": "hysteresis", "threshold": 0.81, "lo": 0.5}`` (``wsseg_core.gate.FlagRule``), with
`"flag_rule_source"` and the candidates' `"flag_rule_scores"`. Absent (files written before it),
scoring flags p >= `"flag_threshold"` as before (:func:`load_flag_rule`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["PAPER_THRESHOLDS", "THRESHOLD_REFERENCE", "DEFAULT_THRESHOLD_Q", "load_thresholds",
           "update_thresholds", "load_flag_threshold", "load_flag_rule"]

#: Paper values (Früh et al. 2021, 3.1): method -> (t_m on the [0, 1] CAM, q_m in percent).
PAPER_THRESHOLDS: dict[str, tuple[float, float]] = {
    "CAM": (0.3, 31.0),
    "GradCAM": (0.2, 35.0),
    "GradCAM++": (0.3, 32.0),
    "ScoreCAM": (0.4, 31.0),
}
#: The Threshold baseline's reference, the one the pipeline uses in tuning and in scoring (and for an
#: entry that names none): q % of the slice's SUVmax (wsseg_core.segment says why).
THRESHOLD_REFERENCE = "max"
#: The Threshold baseline's q (percent) when nothing was tuned: the paper's q_m of CAM (31st).
DEFAULT_THRESHOLD_Q = 31.0


def load_thresholds(path: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Method -> its entry: the tuned values of thresholds.json (``"source": "tuned"``), or the
    paper's values (``"paper"``; the Threshold baseline: ``"default"``) where none were tuned or
    `path` is None or absent."""
    chosen: dict[str, dict[str, Any]] = {m: {"t": t, "q": q, "source": "paper"}
                                         for m, (t, q) in PAPER_THRESHOLDS.items()}
    chosen["Threshold"] = {"q": DEFAULT_THRESHOLD_Q, "reference": THRESHOLD_REFERENCE, "source": "default"}
    if path is not None and Path(path).exists():
        for m, e in json.loads(Path(path).read_text())["methods"].items():
            chosen[m] = {**e, "source": "tuned"}
    return chosen


def update_thresholds(path: str | os.PathLike, entries: dict[str, dict[str, Any]], **info: Any) -> None:
    """Merge tuned entries (method -> params) into thresholds.json, atomically.

    Each tuning job owns its methods' entries only (the slice-CAM search, MIP-CAM's, BoxFCN's), so a
    later search never drops what an earlier one chose. `info` goes to the top level (e.g.
    n_val_studies).
    """
    from wsseg_core.storage import write_json

    path = Path(path)
    record = json.loads(path.read_text()) if path.exists() else {"source": "tuned", "methods": {}}
    record.setdefault("methods", {}).update(entries)
    record.update(info)
    write_json(path, record)


def load_flag_threshold(path: str | os.PathLike | None) -> float:
    """The flag threshold of thresholds.json (slices with p >= it get CAMs), or the paper's 0.5
    where none was chosen."""
    from wsseg_core.gate import PAPER_FLAG_THRESHOLD

    if path is not None and Path(path).exists():
        return float(json.loads(Path(path).read_text()).get("flag_threshold", PAPER_FLAG_THRESHOLD))
    return PAPER_FLAG_THRESHOLD


def load_flag_rule(path: str | os.PathLike | None) -> "FlagRule":
    """The flag rule of thresholds.json (``wsseg_core.gate.FlagRule``): its "flag_rule" where the
    search recorded one, else p >= its "flag_threshold" (older files score as before), else the
    paper's p >= 0.5."""
    from wsseg_core.gate import FlagRule

    if path is not None and Path(path).exists():
        rec = json.loads(Path(path).read_text())
        if rec.get("flag_rule") is not None:
            return FlagRule.from_record(rec["flag_rule"])
    return FlagRule("threshold", load_flag_threshold(path))
