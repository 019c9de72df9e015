"""Agreement of MTV and TLG with the manual reference, and the per-method summary.

Reads `<out>/metrics/`, writes `<out>/icc.parquet` (per method and quantity: ICC(2,1), 95% CI,
p-value, n; test split by default) and `<out>/summary.parquet` (median/IQR of Dice, |dMTV|, |dTLG|),
and prints both as one table. Runs in one process (pandas + pingouin); no Ray needed.

    python -m jobs.analyze --out runs/demo
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from jobs.common import RunLayout, setup_logging

LOG = logging.getLogger("wsseg.analyze")


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def analyze(out: str | Path, split: str = "test") -> dict[str, Any]:
    """ICC table and summary for one split ('all' for every study)."""
    from wsseg_core.stats import icc_table, summarize

    layout = RunLayout(Path(out))
    df = pd.read_parquet(layout.metrics)
    if split != "all":
        df = df[df["split"] == split]
    icc = icc_table(df)
    icc.insert(0, "split", split)
    summary = summarize(df)
    summary.insert(0, "split", split)
    _write_parquet(icc, layout.icc)
    _write_parquet(summary, layout.summary)
    return {"icc": icc, "summary": summary, "n_studies": int(df[["patient_id", "study_id"]].drop_duplicates().shape[0])}


def format_report(icc: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The paper-style table: median (IQR) per method, ICC [95% CI] p for MTV and TLG."""
    lines = [f"{'method':<10} {'n':>3}  {'Dice median (IQR)':<19} {'|dMTV| ml (IQR)':<19} "
             f"{'|dTLG| g (IQR)':<19} {'ICC MTV [95% CI]':<22} {'ICC TLG [95% CI]':<22}"]
    by = {(r.method, r.quantity): r for r in icc.itertuples()}

    def icc_cell(method: str, q: str) -> str:
        r = by.get((method, q))
        if r is None or pd.isna(r.icc):
            return "n/a"
        p = "<0.001" if r.pval < 0.001 else f"{r.pval:.3f}"
        return f"{r.icc:.2f} [{r.ci_low:.2f},{r.ci_high:.2f}] p{p if p.startswith('<') else '=' + p}"

    for r in summary.itertuples():
        lines.append(
            f"{r.method:<10} {int(r.n):>3}  {r.dice_median:>6.2f} ({r.dice_iqr:.2f}){'':<7} "
            f"{r.abs_dmtv_median_ml:>7.1f} ({r.abs_dmtv_iqr_ml:.1f}){'':<4} "
            f"{r.abs_dtlg_median_g:>7.1f} ({r.abs_dtlg_iqr_g:.1f}){'':<3} "
            f"{icc_cell(r.method, 'MTV'):<22} {icc_cell(r.method, 'TLG'):<22}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder holding metrics/")
    p.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = build_parser().parse_args(argv)
    res = analyze(args.out, args.split)
    print(f"split={args.split}: {res['n_studies']} studies")
    print(format_report(res["icc"], res["summary"]))
    return res


if __name__ == "__main__":
    main()
