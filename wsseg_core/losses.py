"""Loss terms of Afshari et al. 2019 (box-supervised 3-D FCN), exactly as the paper's Eq. 1-7.

All terms take a batch of per-voxel foreground probabilities ``p`` (sigmoid output, in [0, 1]), the
box mask ``b`` ({0, 1}: 1 inside any lesion's bounding box) and, for the Mumford-Shah term, the
network's input intensity ``image`` (the z-scored PET, dimensionless). Shapes are (B, ...) with any
number of voxel dimensions; every sum runs over the voxels of one sample, the paper's batch size is
1, and a batch loss is the mean of the per-sample losses.

* :func:`box_dice_loss` - Eq. 2, the plain Dice loss against the box (the "L_Dice" warm start).
* :func:`modified_dice_loss` - Eq. 3-4: the denominator loses ``M * H(sum p b / sum b)`` with
  ``M = sum b - sum p b`` and ``H`` the Heaviside shifted by alpha, so once more than alpha of the
  box is foreground, box voxels predicted background are no longer penalised.
* :func:`regularised_heaviside` - Eq. 6, ``H_eps(x) = 1/2 (1 + 2/pi arctan(x / eps))``, eps 0.03.
* :func:`mumford_shah_loss` - Eq. 5 and 7 with phi = p - 0.5 (the prediction shifted linearly to
  [-0.5, 0.5], so the lesion boundary is phi's zero level set). ``form="chan-vese"`` replaces Eq. 5's
  ``|I H - C|`` differences by Chan-Vese's fitting term ``|I - C1|^2 H + |I - C2|^2 (1 - H)`` (an
  experiment, issue 18 item 9; the default stays the literal Eq. 5).
* :func:`boxfcn_loss` - Eq. 1, ``beta * L_MDice + lambda * L_MS``.

Choices where the paper's text leaves one (each documented at its function):

* Eq. 7 writes ``H(phi)`` for the region averages C1, C2 without the eps: we read it as the sharp
  Heaviside at phi's zero level set (``p > 0.5``), "voxels inside and outside of the prediction
  boundary", so C1 and C2 are piecewise-constant region means and carry no gradient (as in the
  Chan-Vese alternation). ``region="smooth"`` uses ``H_eps(phi)`` instead (differentiable).
* An empty region (no box voxel predicted foreground, or none background) has C = 0.
* No Dice smoothing constant: the paper has none. A sample whose box and prediction are both empty
  gets Dice loss 0 (nothing to find, nothing found); a sample with an empty box (a negative volume)
  gets Dice loss 1 whatever it predicts (constant, no gradient), and L_MS = 0 (no box voxel).
"""

from __future__ import annotations

import math

import torch

__all__ = ["PAPER_LOSS", "EPSILON", "box_dice_loss", "shifted_heaviside", "modified_dice_loss",
           "regularised_heaviside", "mumford_shah_loss", "boxfcn_loss", "LOSS_KINDS", "MS_FORMS",
           "IMAGE_SCALES"]

#: Afshari et al. Sec. 4.3: alpha 0.1, omega1 1, omega2 3, beta 10, lambda 1 (and eps 0.03, Sec. 3.3).
PAPER_LOSS: dict[str, float] = {"alpha": 0.1, "omega1": 1.0, "omega2": 3.0, "beta": 10.0, "lam": 1.0}
EPSILON = 0.03

#: The training objectives of the paper's comparison (Fig. 1): plain box Dice (L_Dice), the modified
#: Dice alone (L_MDice) and the full loss (L_MDice + L_MS).
LOSS_KINDS = ("box_dice", "mdice", "mdice_ms")

#: Forms of the Mumford-Shah term: "eq5", the paper's Eq. 5 as printed (the default), and
#: "chan-vese", the Chan-Vese fitting term the paper cites (see :func:`mumford_shah_loss`).
MS_FORMS = ("eq5", "chan-vese")

#: How L_MS scales its image (see :func:`mumford_shah_loss`): "none" (the paper) or "box".
IMAGE_SCALES = ("none", "box")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N): one row of voxels per sample (a single volume without batch is B = 1)."""
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


def _check(p: torch.Tensor, *others: torch.Tensor) -> None:
    for o in others:
        if o.shape != p.shape:
            raise ValueError(f"shape mismatch: prediction {tuple(p.shape)} vs {tuple(o.shape)}")


def box_dice_loss(p: torch.Tensor, b: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Eq. 2: ``1 - 2 sum(p b) / (sum p + sum b)`` per sample.

    Args:
        p: (B, ...) foreground probabilities in [0, 1]. b: (B, ...) box mask {0, 1}, same shape.
        reduce: mean over the batch (default) or the (B,) per-sample losses.
    Returns:
        The loss (dimensionless, in [0, 1]); 0 where both sums are 0.
    """
    _check(p, b)
    pf, bf = _flat(p), _flat(b).to(p.dtype)
    inter = (pf * bf).sum(1)
    den = pf.sum(1) + bf.sum(1)
    loss = torch.where(den > 0, 1.0 - 2.0 * inter / den.clamp_min(torch.finfo(p.dtype).tiny),
                       torch.zeros_like(den))
    return loss.mean() if reduce else loss


def shifted_heaviside(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4's H: 1 where ``x > alpha``, else 0 (float, no gradient)."""
    return (x > alpha).to(x.dtype if x.is_floating_point() else torch.float32)


def _released_per_box(pf: torch.Tensor, bf: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per sample, sum over the connected boxes k with more than ``alpha`` of their voxels
    foreground of ``M_k = sum b_k - sum p b_k``: the part of Eq. 3's ``M H`` each box releases on
    its own. (B,) like ``M``; no gradient through which boxes are released (H is a switch)."""
    from scipy import ndimage

    out = []
    for i in range(pf.shape[0]):
        lab, n = ndimage.label(b[i].detach().cpu().numpy() > 0)
        if n == 0:
            out.append(pf.new_zeros(()))
            continue
        idx = torch.from_numpy(lab.reshape(-1)).to(pf.device, torch.long)
        inter_k = pf.new_zeros(n + 1).index_add(0, idx, pf[i] * bf[i])[1:]
        size_k = pf.new_zeros(n + 1).index_add(0, idx, bf[i])[1:]
        released = shifted_heaviside((inter_k / size_k.clamp_min(1.0)).detach(), alpha)
        out.append(((size_k - inter_k) * released).sum())
    return torch.stack(out)


def modified_dice_loss(p: torch.Tensor, b: torch.Tensor, alpha: float = PAPER_LOSS["alpha"],
                       reduce: bool = True, per_box: bool = False) -> torch.Tensor:
    """Eq. 3-4: ``1 - 2 sum(p b) / (sum p + sum b - M H(sum(p b) / sum b))``, ``M = sum b - sum p b``.

    While at most ``alpha`` of the box is foreground (H = 0) this is the box Dice; beyond it the
    denominator becomes ``sum p + sum(p b)``: box voxels predicted background cost nothing, voxels
    outside the box still do. ``M`` is differentiable (the paper's formula), H is a switch.

    Args:
        p, b: as :func:`box_dice_loss`. alpha: the Heaviside shift (paper 0.1: "at least 10 % of the
            voxels inside the box are forced to be predicted as tumor"). reduce: batch mean.
        per_box: an extension for volumes with many lesions (the paper's head-and-neck volumes
            hold one box region each): H and M per connected box region instead of over all boxes
            of the volume, so one large lesion more than alpha foreground no longer releases the
            boxes of small lesions that are still empty (they keep the box Dice's pull).
    Returns:
        The loss; for an empty box the fraction is taken as 0 (H = 0, the box Dice).
    """
    _check(p, b)
    pf, bf = _flat(p), _flat(b).to(p.dtype)
    inter = (pf * bf).sum(1)
    sb = bf.sum(1)
    frac = torch.where(sb > 0, inter / sb.clamp_min(1.0), torch.zeros_like(sb))
    if per_box:
        released = _released_per_box(pf, bf, b, alpha)
    else:
        released = (sb - inter) * shifted_heaviside(frac.detach(), alpha)
    den = pf.sum(1) + sb - released
    loss = torch.where(den > 0, 1.0 - 2.0 * inter / den.clamp_min(torch.finfo(p.dtype).tiny),
                       torch.zeros_like(den))
    return loss.mean() if reduce else loss


def regularised_heaviside(x: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """Eq. 6 (Chan-Vese's regularised Heaviside): ``1/2 (1 + 2/pi arctan(x / eps))``, in (0, 1)."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    return 0.5 * (1.0 + (2.0 / math.pi) * torch.atan(x / eps))


def mumford_shah_loss(p: torch.Tensor, image: torch.Tensor, b: torch.Tensor,
                      omega1: float = PAPER_LOSS["omega1"], omega2: float = PAPER_LOSS["omega2"],
                      eps: float = EPSILON, region: str = "sharp", form: str = "eq5",
                      image_scale: str = "none", reduce: bool = True) -> torch.Tensor:
    """Eq. 5 with Eq. 6-7: the piecewise-constant Mumford-Shah term inside the boxes.

    With ``phi = p - 0.5`` and ``h = H_eps(phi)``::

        L_MS = 1/sum(b) * ( omega1 * sum((|I h - C1| - |I h - C2|) b)
                          + omega2 * sum((|I (1 - h) - C2| - |I (1 - h) - C1|) b) )
        C1 = sum(I H(phi) b) / sum(H(phi) b),   C2 = sum(I (1 - H(phi)) b) / sum((1 - H(phi)) b)

    ``form="chan-vese"`` (the level-set model of the paper's ref. 13, Chan & Vese 2001) instead::

        L_MS = 1/sum(b) * ( omega1 * sum(|I - C1|^2 h b) + omega2 * sum(|I - C2|^2 (1 - h) b) )

    with the same C1, C2, h. Why offer it: with C1, C2 fixed, Eq. 5's gradient pushes every box
    voxel brighter than C2 towards the foreground (``tests/test_losses.py``), whereas Chan-Vese
    moves a voxel to the region whose mean it is closer to (weighted: to the foreground when
    ``omega1 (I - C1)^2 < omega2 (I - C2)^2``). The loss is >= 0 in this form.

    Args:
        p: (B, ...) probabilities. image: (B, ...) input intensity I (the z-scored PET).
        b: (B, ...) box mask. omega1, omega2: the paper's scalar weights (1, 3). eps: Eq. 6 (0.03).
        region: how Eq. 7's H(phi) is read - "sharp" (default): ``phi > 0``, C1/C2 are constants
            for the gradient; "smooth": ``H_eps(phi)``, differentiable.
        form: "eq5" (default, the paper as printed) or "chan-vese" (``MS_FORMS``).
        image_scale: "none" (default, the paper: I as given, the z-scored PET) or "box": I
            min-max scaled to [0, 1] over the sample's box voxels, ``(I - min_b I) / (max_b I -
            min_b I)`` (0 where the box is flat), as a constant (no gradient flows through I anyway).
            Why (issue 23): in z-score units a lesion is 10-30 units bright on the whole-body
            phantoms, so L_MS reaches -10 and outweighs beta L_MDice <= 10; scaled, every per-voxel
            term of either form is in [-1, 1], so ``|L_MS| <= omega1 + omega2``.
        reduce: batch mean (default) or (B,) per-sample values.
    Returns:
        The loss (units of I; can be negative). 0 for a sample without box voxels; an empty region
        has C = 0.
    """
    _check(p, image, b)
    if region not in ("sharp", "smooth"):
        raise ValueError(f"region must be 'sharp' or 'smooth', got {region!r}")
    if form not in MS_FORMS:
        raise ValueError(f"form must be one of {MS_FORMS}, got {form!r}")
    if image_scale not in IMAGE_SCALES:
        raise ValueError(f"image_scale must be one of {IMAGE_SCALES}, got {image_scale!r}")
    pf, bf = _flat(p), _flat(b).to(p.dtype)
    i = _flat(image).to(p.dtype)
    if image_scale == "box":
        inside_box = bf > 0
        big = torch.finfo(i.dtype).max
        lo = torch.where(inside_box, i, torch.full_like(i, big)).amin(1, keepdim=True)
        hi = torch.where(inside_box, i, torch.full_like(i, -big)).amax(1, keepdim=True)
        span = hi - lo
        i = torch.where(span > 0, (i - lo) / span.clamp_min(torch.finfo(i.dtype).tiny), torch.zeros_like(i))
        i = i.detach()
    phi = pf - 0.5
    h = regularised_heaviside(phi, eps)
    hr = (phi > 0).to(p.dtype) if region == "sharp" else h
    w1, w2 = hr * bf, (1.0 - hr) * bf
    n1, n2 = w1.sum(1, keepdim=True), w2.sum(1, keepdim=True)
    c1 = torch.where(n1 > 0, (i * w1).sum(1, keepdim=True) / n1.clamp_min(1e-12), torch.zeros_like(n1))
    c2 = torch.where(n2 > 0, (i * w2).sum(1, keepdim=True) / n2.clamp_min(1e-12), torch.zeros_like(n2))
    if form == "chan-vese":
        inside = (i - c1) ** 2 * h * bf
        outside = (i - c2) ** 2 * (1.0 - h) * bf
    else:
        inside = (torch.abs(i * h - c1) - torch.abs(i * h - c2)) * bf
        outside = (torch.abs(i * (1.0 - h) - c2) - torch.abs(i * (1.0 - h) - c1)) * bf
    sb = bf.sum(1)
    total = omega1 * inside.sum(1) + omega2 * outside.sum(1)
    loss = torch.where(sb > 0, total / sb.clamp_min(1.0), torch.zeros_like(sb))
    return loss.mean() if reduce else loss


def boxfcn_loss(p: torch.Tensor, image: torch.Tensor, b: torch.Tensor, kind: str = "mdice_ms",
                beta: float = PAPER_LOSS["beta"], lam: float = PAPER_LOSS["lam"],
                alpha: float = PAPER_LOSS["alpha"], omega1: float = PAPER_LOSS["omega1"],
                omega2: float = PAPER_LOSS["omega2"], eps: float = EPSILON,
                region: str = "sharp", ms_form: str = "eq5", ms_scale: str = "none",
                per_box: bool = False) -> torch.Tensor:
    """The training objective of one variant (``LOSS_KINDS``), batch mean.

    * "box_dice": Eq. 2 against the box, unweighted (the warm-start network, the paper's L_Dice).
    * "mdice": ``beta * L_MDice`` (the paper's L_MDice-only model).
    * "mdice_ms": Eq. 1, ``beta * L_MDice + lambda * L_MS`` (``lam`` is the paper's lambda; L_MS in
      the form ``ms_form``, "eq5" or "chan-vese", its image scaled per ``ms_scale``, "none" or
      "box", see :func:`mumford_shah_loss`; the other kinds ignore both).

    ``per_box``: L_MDice's Heaviside per connected box region (:func:`modified_dice_loss`).
    """
    if kind == "box_dice":
        return box_dice_loss(p, b)
    if kind == "mdice":
        return beta * modified_dice_loss(p, b, alpha, per_box=per_box)
    if kind == "mdice_ms":
        return (beta * modified_dice_loss(p, b, alpha, per_box=per_box)
                + lam * mumford_shah_loss(p, image, b, omega1, omega2, eps, region, form=ms_form,
                                          image_scale=ms_scale))
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
