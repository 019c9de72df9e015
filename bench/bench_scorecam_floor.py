"""Issue 7, target 2: ScoreCAM time vs its floor, the bare batched forward passes it needs.

Floor = the same number of inputs as ScoreCAM scores (one per non-constant (slice, channel) pair,
plus one blank input if any channel is constant), forward only, torch.inference_mode, the same chunk
size.  Also: the same with a channels_last copy of the model (an exact trick a caller can apply),
and the approximate top-k mode (off by default) with its error, 1 - Pearson r vs exact.

    .venv/bin/python bench/bench_scorecam_floor.py [--classifier models/classifier.pt] [--n 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import flagged_batch, get_classifier, load_info, median, pearson, timed  # noqa: E402
from wsseg_core.cams import CamEngine  # noqa: E402


def floor(model, x: torch.Tensor, n: int, batch_size: int) -> float:
    """Forward ``n`` inputs (built before timing) in chunks of ``batch_size``."""
    reps = -(-n // len(x))
    inputs = x.repeat(reps, 1, 1, 1)[:n].contiguous(memory_format=_fmt(model))
    t, _ = timed(lambda: _forward_all(model, inputs, batch_size))
    return t


def _fmt(model) -> torch.memory_format:
    w = next(model.parameters())
    return torch.channels_last if w.ndim == 4 and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format


def _forward_all(model, inputs, batch_size):
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            model(inputs[i:i + batch_size])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512, help="ScoreCAM chunk = floor chunk")
    p.add_argument("--top-k", type=int, default=16, help="approximate mode to report (0 = skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, pre = get_classifier(args.classifier)
    x = flagged_batch(model, pre, args.n)
    with torch.no_grad():
        f = model.forward_features(x).flatten(2)
    const = f.amax(2) == f.amin(2)
    n_inputs = int((~const).sum()) + int(bool(const.any()))
    print(f"batch {tuple(x.shape)}, K={f.shape[1]}: {int(const.sum())} constant (slice, channel) maps; "
          f"ScoreCAM needs {n_inputs} forwards (naive: {const.numel()})")
    print(f"machine: {load_info()}, torch threads {args.threads}, chunk {args.batch_size}")

    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants = {"default": model, "channels_last": model_cl}
    t_sc = {k: [] for k in variants}
    t_fl = {k: [] for k in variants}
    t_top = []
    exact = None
    for rep in range(args.repeats):
        for name, m in variants.items():
            eng = CamEngine(m, scorecam_batch_size=args.batch_size)
            t, res = timed(lambda: eng(x, ("ScoreCAM",)))
            t_sc[name].append(t)
            if name == "default":
                exact = res.maps["ScoreCAM"]
            else:
                cl_err = np.abs(res.maps["ScoreCAM"] - exact).max()
            t_fl[name].append(floor(m, x, n_inputs, args.batch_size))
        if args.top_k:
            eng = CamEngine(model, scorecam_batch_size=args.batch_size, scorecam_top_k=args.top_k)
            t, top = timed(lambda: eng(x, ("ScoreCAM",)))
            t_top.append(t)
        print(f"  repeat {rep}: " + ", ".join(
            f"{k}: ScoreCAM {t_sc[k][-1]:.2f} s / floor {t_fl[k][-1]:.2f} s" for k in variants)
            + (f", top-{args.top_k} {t_top[-1]:.2f} s" if t_top else ""))
    for k in variants:
        s, fl = median(t_sc[k]), median(t_fl[k])
        print(f"{k:14s} ScoreCAM median {s:.2f} s, floor median {fl:.2f} s -> ratio {s / fl:.2f} "
              f"(target <= 1.3); per-repeat ratios "
              f"{[round(a / b, 2) for a, b in zip(t_sc[k], t_fl[k])]}")
    print(f"channels_last vs default ScoreCAM: {median(t_sc['default']) / median(t_sc['channels_last']):.2f}x "
          f"faster; max |map difference| {cl_err:.2e}")
    if t_top:
        errs = [1 - pearson(top.maps["ScoreCAM"][b], exact[b]) for b in range(len(x))]
        print(f"top-{args.top_k} (approximate, off by default): median {median(t_top):.2f} s "
              f"({median(t_sc['default']) / median(t_top):.2f}x faster than exact); "
              f"error 1 - r: median {np.nanmedian(errs):.2e}, max {np.nanmax(errs):.2e}")
    print(f"[{load_info()}]")


if __name__ == "__main__":
    main()
