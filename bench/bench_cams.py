"""Issue 7, target 1: all four CAMs of a batch of flagged slices with CamEngine vs pytorch-grad-cam.

grad-cam computes GradCAM, GradCAM++ and ScoreCAM separately (ScoreCAM with its own batch_size);
plain CAM is a forward plus a numpy weighted sum.  Maps are compared per slice at the input
resolution (ours upsampled bilinearly with upsample_cam, grad-cam resized with cv2 and min-max
scaled).  Our ScoreCAM uses align_corners=True here, grad-cam's mask convention (same cost).

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

from bench._common import flagged_batch, get_classifier, load_info, median, pearson, timed  # noqa: E402
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
        a = model.forward_features(x).numpy()
    w = model.fc.weight[1].detach().numpy()
    cams = np.einsum("k,bkhw->bhw", w, a)
    s = x.shape[-1]
    res = []
    for c in cams:
        c = cv2.resize(c, (s, s))
        c = c - c.min()
        res.append(c / (c.max() + 1e-7))
    out["CAM"] = np.stack(res).astype(np.float32)
    return out


def gradcampp_with_library_eps(model, x: torch.Tensor, eps: float = 1e-7) -> np.ndarray:
    """Our GradCAM++ with pytorch-grad-cam's eps added to the alpha denominator (diagnostic only):
    shows that a residual disagreement is that eps, not a different definition."""
    from wsseg_core.cams import combine, normalize_maps

    with torch.no_grad():
        a = model.forward_features(x)
    leaf = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.logits_from_features(leaf)[:, 1].sum(), leaf)
    g2, g3 = g * g, g * g * g
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom) * eps) if eps == 0 else g2 / (denom + eps)
    w = (alpha * g.clamp_min(0)).sum(dim=(2, 3))
    with torch.no_grad():
        m = normalize_maps(combine(w, a, relu=True))
    return upsample_cam(m.numpy(), x.shape[-1])


def ours(engine: CamEngine, x: torch.Tensor) -> dict[str, np.ndarray]:
    res = engine(x, CAM_METHODS)
    return {m: upsample_cam(res.maps[m], x.shape[-1]) for m in CAM_METHODS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None, help="checkpoint (default: train small preset 2 epochs)")
    p.add_argument("--n", type=int, default=32, help="flagged slices in the batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scorecam-batch-sizes", type=int, nargs="+", default=[32],
                   help="grad-cam ScoreCAM batch sizes to try; the fastest counts (default: 32, its default)")
    p.add_argument("--engine-batch-size", type=int, default=None,
                   help="CamEngine scorecam_batch_size (default: the engine's, 32 on CPU, 512 on GPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, pre = get_classifier(args.classifier)
    x = flagged_batch(model, pre, args.n)
    with torch.no_grad():
        f = model.forward_features(x).flatten(2)
    const = (f.amax(2) == f.amin(2)).float().mean().item()
    print(f"batch {tuple(x.shape)}, last conv K={f.shape[1]}, constant (dead) channels {100 * const:.1f}%")
    print(f"machine: {load_info()}, torch threads {args.threads}")

    engine = CamEngine(model, scorecam_align_corners=True, scorecam_batch_size=args.engine_batch_size)
    t_ours, t_lib = [], {bs: [] for bs in args.scorecam_batch_sizes}
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
    eps_maps = gradcampp_with_library_eps(model, x)
    rs = [pearson(eps_maps[b], lib_maps["GradCAM++"][b]) for b in range(len(x))]
    print(f"  GradCAM++ with grad-cam's eps=1e-7 in the alpha denominator: min r {np.nanmin(rs):.5f} "
          f"(diagnostic: how much of the gap that eps explains)")
    print(f"agreement: min r = {worst:.5f} (target >= 0.999) -> {'OK' if worst >= 0.999 else 'BELOW'}")


if __name__ == "__main__":
    main()
