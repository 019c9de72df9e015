"""Issue 16: where a finished run's CAMs point. For every flagged slice with tumour of the tumour-
bearing studies of a split, does each CAM method's hottest cell cover tumour
(`wsseg_core.segment.pointing_game`)? Printed beside chance, the share of the body's cells that
cover tumour. Algorithm 1's Dice cannot tell this apart: at a high SUV percentile a CAM whose region
is the whole slice segments as well as one on the tumour.

    .venv/bin/python bench/cam_pointing.py runs/demo [--splits val test]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from wsseg_core.cams import CAM_METHODS, CamEngine  # noqa: E402
from wsseg_core.data import StudyRef, load_study  # noqa: E402
from wsseg_core.inference import classify_volume, flagged_slices, volume_cams  # noqa: E402
from wsseg_core.models import load_classifier  # noqa: E402
from wsseg_core.segment import body_mask_slice, pointing_game  # noqa: E402


def split_pointing(run: str, split: str, batch_size: int = 64) -> dict:
    """Hit rate per CAM method and mean chance over the split's flagged tumour slices."""
    model, pre, _ = load_classifier(os.path.join(run, "models", "classifier.pt"))
    flag = float(json.load(open(os.path.join(run, "thresholds.json")))["flag_threshold"])
    cohort = pd.read_parquet(os.path.join(run, "cohort.parquet"))
    engine = CamEngine(model)
    hits = {m: 0 for m in CAM_METHODS}
    chance, n = [], 0
    for _, row in cohort[cohort["split"] == split].iterrows():
        ref = StudyRef(**{k: row[k] for k in StudyRef.__dataclass_fields__ if k in row})
        if not ref.seg_path:
            continue
        st = load_study(ref)
        if not st.seg.any():
            continue
        geometry = pre.geometry(st.suv, st.ct, st.spacing_mm)  # once per study (body scan)
        z = flagged_slices(classify_volume(model, pre, st.suv, st.ct, geometry=geometry), flag)
        maps = volume_cams(engine, pre, st.suv, st.ct, z, batch_size=batch_size, geometry=geometry)
        for k, zz in enumerate(z):
            seg = st.seg[:, :, zz] > 0
            if not seg.any():
                continue
            body = body_mask_slice(st.suv[:, :, zz], st.ct[:, :, zz])
            h, w = maps[CAM_METHODS[0]][k].shape
            idx = geometry.cam_index(h, w)
            for m in CAM_METHODS:
                hit, c = pointing_game(maps[m][k], seg, body, idx)
                hits[m] += int(hit)
            chance.append(c)
            n += 1
    return {"split": split, "slices": n, "chance": float(np.mean(chance)) if n else float("nan"),
            **{m: hits[m] / n if n else float("nan") for m in CAM_METHODS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished jobs.pipeline run folder (models/classifier.pt, thresholds.json)")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = torch.load(os.path.join(args.run, "models", "classifier.pt"), weights_only=True)["config"]
    print(f"{args.run}: map stride {cfg.get('map_stride', 8)}, atrous {cfg.get('atrous', False)}")
    print(f"{'split':6} {'slices':>6} {'chance':>7} " + " ".join(f"{m:>9}" for m in CAM_METHODS))
    for split in args.splits:
        r = split_pointing(args.run, split)
        print(f"{r['split']:6} {r['slices']:6d} {r['chance']:7.3f} " + " ".join(f"{r[m]:9.3f}" for m in CAM_METHODS))


if __name__ == "__main__":
    main()
