"""Peak memory of BoxFCN (Afshari et al.) per volume at autoPET size (issue 18 item 8).

Two cases per preset width (``small``: base 4, 3 levels; ``paper``: base 16, 4 levels):

* ``infer``: ``wsseg_core.boxfcn.predict_volume`` on one whole volume (default 400x400x326, the
  autoPET grid at 2.04x2.04x3 mm): z-scoring, padding to a multiple of ``2**levels``, one fully
  convolutional forward pass under ``inference_mode``, the probability map back as numpy.
* ``train``: one ``train_epoch`` step (L_MDice + L_MS, SGD) on one 160x160x128 crop (the paper
  preset's training input, ``body_crop``), batch 1: forward, loss, backward, optimiser step.

Each measured case runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own; the
baseline is the RSS after building the model and the input, before the measured call. With
``--device cuda`` the CUDA peak (``torch.cuda.max_memory_allocated``) is printed too.

Before measuring, every case is estimated from its activation sizes (``estimate_bytes``); a case
whose estimate exceeds ``--max-gib`` (default 8) is not run on the CPU, only its estimate printed
(this benchmark runs on shared machines). The estimate/measurement ratio of the cases that ran is
printed, to judge the estimates of those that did not.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_boxfcn_memory.py
    PYTHONPATH=$PWD .venv/bin/python bench/bench_boxfcn_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024 ** 3
AUTOPET_SHAPE = (400, 400, 326)
AUTOPET_SPACING_MM = (2.04, 2.04, 3.0)


def _rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _padded(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    return tuple(s + (-s) % k for s in shape)


def estimate_bytes(case: str, base: int, levels: int, shape: tuple[int, int, int]) -> dict[str, float]:
    """Activation-size estimate (bytes) of one case, float32 throughout.

    With ``c = base`` channels at the full grid of ``V`` voxels (padded to ``2**levels``), level i
    holds ``base 2**i`` channels at ``V / 8**i`` voxels, i.e. ``c V / 4**i`` values:

    * infer (tensors freed as soon as unused): the skips ``sum_i c V / 4**i`` stay alive until the
      last decoder level, where the level below's output (c V / 4), the up-convolution output
      (c V) and the concatenation (2 c V), then the concatenation and the first convolution's
      output (c V) coexist: ``3.25 c V``, rounded up to ``4 c V`` for the CPU convolution's
      reordered copies: peak ``(sum_i 4**-i + 4) c V`` values, plus the z-scored and the padded
      input (2 V; the SUV volume itself is in the baseline; z-scoring's float64 temporaries, 5 V,
      are freed before the network runs).
    * train (every layer output kept for backward): each encoder level 2 convs + pool (+ int64
      pool indices), each decoder level up-conv, concatenation (2x), 2 convs; bottleneck 2 convs;
      head and sigmoid: ``sum_i (7 + 1/8 + 1/4) c V / 4**i + 2 V`` values; backward adds gradient
      buffers of about three level-0 tensors (3 c V) and the loss about 10 V (flattened copies,
      regularised Heaviside, the Mumford-Shah terms).
    """
    k = 2 ** levels
    v = 1
    for s in _padded(shape, k):
        v *= s
    c = base
    geo = sum(4.0 ** -i for i in range(levels)) + 4.0 ** -levels * 2  # bottleneck: 2x channels, /8 voxels
    if case == "infer":
        values = (sum(4.0 ** -i for i in range(levels)) + 4.0) * c * v + 2 * v
    elif case == "train":
        values = (7 + 0.125 + 0.25) * c * v * geo + 2 * v + 3 * c * v + 10 * v
    else:
        raise ValueError(case)
    return {"bytes": 4.0 * values, "voxels": float(v)}


def run_case(case: str, preset: str, shape: tuple[int, int, int], crop: tuple[int, int, int],
             device: str, threads: int) -> dict:
    """Measure one case in this process (called in a fresh subprocess)."""
    import numpy as np
    import torch

    from wsseg_core.boxfcn import BoxVolume, build_boxfcn, make_optimizer, predict_volume, train_epoch
    from wsseg_core.losses import PAPER_LOSS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_boxfcn(preset).to(device)
    rng = np.random.default_rng(0)
    cuda = device.startswith("cuda")
    if case == "infer":
        # Values do not change memory; a positive SUV-like volume with some structure.
        suv = rng.gamma(2.0, 0.5, size=shape).astype(np.float32)
        base_rss = _rss_bytes()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        p = predict_volume(model, suv)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        assert p.shape == shape
    else:
        x = rng.normal(size=crop).astype(np.float32)
        box = np.zeros(crop, np.uint8)
        box[60:100, 60:100, 50:80] = 1
        vol = BoxVolume(x, box, None, np.array([[80, 80, 65]]), np.asarray(AUTOPET_SPACING_MM),
                        boxes=np.array([[[60, 60, 50], [99, 99, 79]]]),
                        body_centre=(np.asarray(crop, float) - 1) / 2)
        opt = make_optimizer(model, "sgd", 1e-5)
        base_rss = _rss_bytes()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = train_epoch(model, [vol], opt, {"kind": "mdice_ms", **PAPER_LOSS}, patch=None,
                           batch_size=1, steps=1, rng=rng, generator=torch.Generator().manual_seed(0),
                           device=device, crop=crop)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        assert np.isfinite(loss)
    out = {"case": case, "preset": preset, "device": device, "seconds": seconds,
           "baseline_rss": base_rss,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "params": sum(q.numel() for q in model.parameters())}
    if cuda:
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "paper"], choices=["small", "paper"])
    ap.add_argument("--cases", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--shape", type=int, nargs=3, default=list(AUTOPET_SHAPE),
                    help="whole volume for inference (default autoPET 400 400 326)")
    ap.add_argument("--crop", type=int, nargs=3, default=[160, 160, 128], help="training crop")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-gib", type=float, default=8.0,
                    help="on the CPU, only estimate a case whose estimate exceeds this (GiB)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print JSON
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape, crop = tuple(args.shape), tuple(args.crop)

    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.preset, shape, crop, args.device,
                                              args.threads)))
        return []

    from wsseg_core.boxfcn import BOXFCN_PRESETS

    la = os.getloadavg()
    print(f"BoxFCN memory per volume; {os.cpu_count()} CPUs, load average {la[0]:.2f} {la[1]:.2f} "
          f"{la[2]:.2f}; device {args.device}, {args.threads} torch thread(s)")
    print(f"inference: whole volume {shape} (autoPET: {AUTOPET_SHAPE} at {AUTOPET_SPACING_MM} mm); "
          f"training: one step on a {crop} crop, L_MDice + L_MS, SGD, batch 1")
    rows = []
    for preset in args.presets:
        cfg = BOXFCN_PRESETS[preset]
        for case in args.cases:
            est = estimate_bytes(case, cfg["base"], cfg["levels"], shape if case == "infer" else crop)
            row = {"preset": preset, "base": cfg["base"], "levels": cfg["levels"], "case": case,
                   "estimate_gib": est["bytes"] / GIB}
            if est["bytes"] / GIB > args.max_gib and not args.device.startswith("cuda"):
                row["status"] = f"estimated only (> {args.max_gib:g} GiB)"
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--preset", preset,
                       "--shape", *map(str, shape), "--crop", *map(str, crop), "--device", args.device,
                       "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
                if res.returncode != 0 or not line:
                    row["status"] = f"failed (rc {res.returncode}): {res.stderr.strip()[-300:]}"
                else:
                    m = json.loads(line[-1][len("RESULT "):])
                    row.update(status="measured", seconds=m["seconds"],
                               baseline_rss_gib=m["baseline_rss"] / GIB, peak_rss_gib=m["peak_rss"] / GIB,
                               delta_rss_gib=(m["peak_rss"] - m["baseline_rss"]) / GIB, params=m["params"])
                    if "cuda_peak_allocated" in m:
                        row["cuda_peak_gib"] = m["cuda_peak_allocated"] / GIB
                        row["cuda_reserved_gib"] = m["cuda_peak_reserved"] / GIB
                    # The estimate counts what the measured call adds (peak - baseline).
                    ref = row.get("cuda_peak_gib", row["delta_rss_gib"])
                    row["measured_over_estimate"] = ref / row["estimate_gib"]
            rows.append(row)
            print(_fmt(row), flush=True)
    ratios = [r["measured_over_estimate"] for r in rows if "measured_over_estimate" in r]
    if ratios:
        print(f"measured / estimated over the measured cases: {', '.join(f'{x:.2f}' for x in ratios)}")
    return rows


def _fmt(r: dict) -> str:
    s = (f"{r['preset']:>5} (base {r['base']}, {r['levels']} levels) {r['case']:>5}: "
         f"estimate {r['estimate_gib']:.2f} GiB; {r['status']}")
    if r["status"] == "measured":
        s += (f": peak RSS {r['peak_rss_gib']:.2f} GiB (baseline {r['baseline_rss_gib']:.2f}, "
              f"+{r['delta_rss_gib']:.2f}), {r['seconds']:.1f} s")
        if "cuda_peak_gib" in r:
            s += f"; CUDA peak allocated {r['cuda_peak_gib']:.2f} GiB (reserved {r['cuda_reserved_gib']:.2f})"
        s += f"; measured/estimate {r['measured_over_estimate']:.2f}"
    return s


if __name__ == "__main__":
    main()
