"""Issue 7, target 1: all four CAMs of a batch of flagged slices with CamEngine vs pytorch-grad-cam.

grad-cam computes GradCAM, GradCAM++ and ScoreCAM separately (ScoreCAM with its own batch_size);
plain CAM is a forward plus a numpy weighted sum.  Maps are compared per slice at the input
resolution (ours upsampled bilinearly with upsample_cam, grad-cam resized with cv2 and min-max
scaled).  The timed engine runs in grad-cam's conventions, at the same cost: ScoreCAM masks with
align_corners=True and GradCAM++ with eps = 1e-6 in its alpha denominator; the r of our exact
GradCAM++ (eps = 0, the default) is printed too.

The script also counts the forward passes each side needs per slice (a backward counted as two
forwards); their ratio bounds the speed-up that skipping work can give, whatever the hardware.

    .venv/bin/python bench/bench_cams.py [--classifier models/classifier.pt] [--n 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import default_device, flagged_batch, get_classifier, load_info, median, pearson, timed  # noqa: E402
from wsseg_core.cams import CAM_METHODS, CamEngine, upsample_cam  # noqa: E402


def gradcam_package(model, x: torch.Tensor, scorecam_batch_size: int) -> dict[str, np.ndarray]:
    """The pytorch-grad-cam way: one CAM object per method, each with its own passes."""
    import cv2
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.features[-1]
    targets = [ClassifierOutputTarget(1)] * x.shape[0]
    out = {}
    for name, cls in (("GradCAM", GradCAM), ("GradCAM++", GradCAMPlusPlus), ("ScoreCAM", ScoreCAM)):
        with cls(model=model, target_layers=[layer]) as cam:
            if name == "ScoreCAM":
                cam.batch_size = scorecam_batch_size
            out[name] = cam(input_tensor=x, targets=targets)
        model.zero_grad(set_to_none=True)
    # plain CAM (Eq. 1): forward, numpy weighted sum, resize + min-max like grad-cam does
    with torch.no_grad():
        a = model.forward_features(x).cpu().numpy()
    w = model.fc.weight[1].detach().cpu().numpy()
    cams = np.einsum("k,bkhw->bhw", w, a)
    s = x.shape[-1]
    res = []
    for c in cams:
        c = cv2.resize(c, (s, s))
        c = c - c.min()
        res.append(c / (c.max() + 1e-7))
    out["CAM"] = np.stack(res).astype(np.float32)
    return out


def forward_equivalents(k: int, varying: float, n: int) -> tuple[float, float]:
    """Forward passes per slice (a full backward = 2 forwards) for grad-cam and for CamEngine.

    grad-cam: GradCAM and GradCAM++ each a forward and a full backward (3 + 3), ScoreCAM a forward
    plus one per channel (1 + K), plain CAM a forward (1).  CamEngine: one shared forward (the
    backward runs through the GAP + linear head only), one per non-constant channel, and one blank
    input per call shared by all n slices.
    """
    return 3 + 3 + (1 + k) + 1, 1 + varying + 1 / n


def ours(engine: CamEngine, x: torch.Tensor) -> dict[str, np.ndarray]:
    res = engine(x, CAM_METHODS)
    return {m: upsample_cam(res.maps[m], x.shape[-1]) for m in CAM_METHODS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None, help="checkpoint (default: train small preset 2 epochs)")
    p.add_argument("--n", type=int, default=32, help="flagged slices in the batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=default_device(),
                   help="cuda (default when there is a GPU: the paper-preset figures) or cpu")
    p.add_argument("--scorecam-batch-sizes", type=int, nargs="+", default=[32],
                   help="grad-cam ScoreCAM batch sizes to try; the fastest counts (default: 32, its default)")
    p.add_argument("--engine-batch-size", type=int, default=None,
                   help="CamEngine scorecam_batch_size (default: the engine's, 32 on CPU, 512 on GPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, pre = get_classifier(args.classifier)
    x = flagged_batch(model, pre, args.n).to(args.device)
    model.to(args.device)
    with torch.no_grad():
        f = model.forward_features(x).flatten(2)
    k = f.shape[1]
    const = (f.amax(2) == f.amin(2)).float().mean().item()
    print(f"batch {tuple(x.shape)}, last conv K={k}, constant (dead) channels {100 * const:.1f}%")
    print(f"machine: {load_info()}, torch threads {args.threads}")
    n_lib, n_ours = forward_equivalents(k, (1 - const) * k, len(x))
    print(f"forward passes per slice: grad-cam {n_lib:.1f}, ours {n_ours:.1f} -> skipping work can give "
          f"at most {n_lib / n_ours:.2f}x; the rest must come from cheaper forwards")

    engine = CamEngine(model, scorecam_align_corners=True, gradcampp_eps=1e-6,
                       scorecam_batch_size=args.engine_batch_size)
    t_ours, t_lib = [], {bs: [] for bs in args.scorecam_batch_sizes}
    ours(engine, x)  # warm-up, untimed: first calls pay for lazy imports, allocations, BN folding
    for bs in args.scorecam_batch_sizes:
        gradcam_package(model, x, bs)
    for rep in range(args.repeats):  # interleaved, so load changes hit both sides alike
        t, ours_maps = timed(lambda: ours(engine, x))
        t_ours.append(t)
        for bs in args.scorecam_batch_sizes:
            t, lib_maps = timed(lambda: gradcam_package(model, x, bs))
            t_lib[bs].append(t)
        print(f"  repeat {rep}: ours {t_ours[-1]:.2f} s, grad-cam "
              + ", ".join(f"bs{bs} {v[-1]:.2f} s" for bs, v in t_lib.items()))
    best_bs = min(t_lib, key=lambda bs: median(t_lib[bs]))
    to, tl = median(t_ours), median(t_lib[best_bs])
    print(f"CamEngine, all four maps:            median {to:.2f} s  ({[round(v, 2) for v in t_ours]})")
    print(f"grad-cam GradCAM+GradCAM++ +ScoreCAM(bs={best_bs}) + numpy CAM: median {tl:.2f} s "
          f"({[round(v, 2) for v in t_lib[best_bs]]})")
    print(f"speed-up grad-cam / ours: {tl / to:.2f}x  (target >= 3x)  [{load_info()}]")

    worst = 1.0
    for m in CAM_METHODS:
        rs = [pearson(ours_maps[m][b], lib_maps[m][b]) for b in range(len(x))]
        ok = [r for r in rs if not np.isnan(r)]
        lo = min(ok) if ok else float("nan")
        worst = min(worst, lo)
        print(f"  {m:10s} per-slice Pearson r: min {lo:.5f}, median {np.median(ok):.5f} "
              f"({len(rs) - len(ok)} degenerate slices skipped)")
    exact = upsample_cam(CamEngine(model)(x, ("GradCAM++",)).maps["GradCAM++"], x.shape[-1])
    rs = [pearson(exact[b], lib_maps["GradCAM++"][b]) for b in range(len(x))]
    print(f"  GradCAM++ exact (gradcampp_eps=0, our default) vs grad-cam: min r {np.nanmin(rs):.5f} "
          f"(grad-cam's eps=1e-6 dominates alpha when gradients are small)")
    print(f"agreement: min r = {worst:.5f} (target >= 0.999) -> {'OK' if worst >= 0.999 else 'BELOW'}")
    print(f"speed-up {tl / to:.2f}x measured; forward-pass bound {n_lib / n_ours:.2f}x")


if __name__ == "__main__":
    main()
