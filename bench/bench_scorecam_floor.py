"""Issue 7, target 2: ScoreCAM time vs its floor, the bare batched forward passes it needs.

Floor = the same number of inputs as ScoreCAM scores (one per non-constant (slice, channel) pair,
plus one blank input if any channel is constant), forward only, torch.inference_mode, the same chunk
size, through the same network the engine runs (``engine.network()``).  Ratio = ScoreCAM / floor:
what the engine spends beyond the forwards themselves (masks, interpolation, bookkeeping).

Each exact trick is then switched off on its own (BatchNorm folding, channels-last), and all of them
together, to show what each buys; the approximate modes (top-k channels, bf16 autocast; off by
default on CPU) are reported with their error, 1 - per-slice Pearson r against the exact maps.

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

from bench._common import default_device, flagged_batch, get_classifier, load_info, median, pearson, timed  # noqa: E402
from wsseg_core.cams import CamEngine  # noqa: E402


def floor(engine: CamEngine, x: torch.Tensor, n: int) -> float:
    """Forward ``n`` inputs (built before timing) through the engine's network, its chunk size."""
    net = engine.network().eval()
    fmt = torch.channels_last if engine.channels_last else torch.contiguous_format
    inputs = x.repeat(-(-n // len(x)), 1, 1, 1)[:n].contiguous(memory_format=fmt)
    bs = engine.scorecam_batch_size

    def forward_all() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16,
                                                    enabled=engine.scorecam_bf16):
            for i in range(0, len(inputs), bs):
                net(inputs[i:i + bs])

    t, _ = timed(forward_all)
    return t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=default_device(),
                   help="cuda (default when there is a GPU: the paper-preset figures) or cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="ScoreCAM chunk = floor chunk (default: the engine's, 32 on CPU, 512 on GPU)")
    p.add_argument("--top-k", type=int, default=16, help="approximate mode to report (0 = skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, pre = get_classifier(args.classifier)
    x = flagged_batch(model, pre, args.n).to(args.device)
    model.to(args.device)
    with torch.no_grad():
        f = model.eval().forward_features(x).flatten(2)
    const = f.amax(2) == f.amin(2)
    n_inputs = int((~const).sum()) + int(bool(const.any()))
    print(f"batch {tuple(x.shape)}, K={f.shape[1]}: {int(const.sum())} constant (slice, channel) maps; "
          f"ScoreCAM needs {n_inputs} forwards (naive: {const.numel()})")

    def engine(**kw) -> CamEngine:  # a copy each: the engine converts its model's layout in place
        return CamEngine(copy.deepcopy(model), scorecam_batch_size=args.batch_size, **kw)

    variants = {
        "engine defaults": engine(),
        "without BN folding": engine(fold_bn=False),
        "without channels-last": engine(channels_last=False),
        "no tricks (plain NCHW)": engine(fold_bn=False, channels_last=False, scorecam_bf16=False),
    }
    if variants["engine defaults"].scorecam_bf16:  # on a GPU: the float32 engine is the reference
        variants["float32 (no bf16)"] = engine(scorecam_bf16=False)
        approx = {}
    else:
        approx = {"bf16 autocast": engine(scorecam_bf16=True)}
    if args.top_k:
        approx[f"top-{args.top_k} channels"] = engine(scorecam_top_k=args.top_k)
    base = variants["engine defaults"]
    print(f"machine: {load_info()}, torch threads {args.threads}, chunk {base.scorecam_batch_size}, "
          f"device {base.device}, bf16 default {base.scorecam_bf16}")

    t_sc = {k: [] for k in (*variants, *approx)}
    t_fl = {k: [] for k in variants}
    maps = {}
    for eng in (*variants.values(), *approx.values()):  # warm-up, untimed (allocations, BN folding)
        eng(x[:1], ("ScoreCAM",))
        floor(eng, x, 1)
    for rep in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, eng in (*variants.items(), *approx.items()):
            t, res = timed(lambda: eng(x, ("ScoreCAM",)))
            t_sc[name].append(t)
            maps[name] = res.maps["ScoreCAM"]
            if name in variants:
                t_fl[name].append(floor(eng, x, n_inputs))
        print(f"  repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in t_sc.items()))

    exact = maps["float32 (no bf16)" if "float32 (no bf16)" in maps else "engine defaults"]
    plain = median(t_sc["no tricks (plain NCHW)"])
    print(f"{'variant':24s} {'ScoreCAM':>9s} {'floor':>7s} {'ratio':>6s} {'vs plain':>9s} {'max |dmap|':>10s}")
    for k in variants:
        s, fl = median(t_sc[k]), median(t_fl[k])
        print(f"{k:24s} {s:8.2f}s {fl:6.2f}s {s / fl:6.2f} {plain / s:8.2f}x "
              f"{np.abs(maps[k] - exact).max():10.1e}")
    s, fl = median(t_sc["engine defaults"]), median(t_fl["engine defaults"])
    print(f"target 2: engine ScoreCAM / floor = {s / fl:.2f} (target <= 1.3) -> "
          f"{'OK' if s / fl <= 1.3 else 'ABOVE'}")
    for k in approx:
        errs = [1 - pearson(maps[k][b], exact[b]) for b in range(len(x))]
        print(f"{k} (approximate, off by default on CPU): median {median(t_sc[k]):.2f} s "
              f"({s / median(t_sc[k]):.2f}x vs exact); error 1 - r: median {np.nanmedian(errs):.1e}, "
              f"max {np.nanmax(errs):.1e}")
    print(f"[{load_info()}]")


if __name__ == "__main__":
    main()
