"""Afshari et al.'s loss terms (wsseg_core.losses) against values computed by hand on 2x2x2 volumes."""

from __future__ import annotations

import math

import pytest
import torch

from wsseg_core.losses import (MS_FORMS, PAPER_LOSS, box_dice_loss, boxfcn_loss, modified_dice_loss,
                               mumford_shah_loss, regularised_heaviside, shifted_heaviside)

# 2x2x2 volume, flattened in C order: the first four voxels (x = 0) are the box.
B = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64).reshape(1, 2, 2, 2)
P = torch.tensor([0.9, 0.8, 0.3, 0.1, 0.6, 0.2, 0.0, 0.4], dtype=torch.float64).reshape(1, 2, 2, 2)
# sum p = 3.3, sum p b = 2.1, sum b = 4


def test_box_dice_by_hand():
    # 1 - 2 * 2.1 / (3.3 + 4)
    assert float(box_dice_loss(P, B)) == pytest.approx(1 - 4.2 / 7.3)
    assert float(box_dice_loss(B, B)) == pytest.approx(0.0)
    empty = torch.zeros_like(B)
    assert float(box_dice_loss(empty, empty)) == 0.0  # nothing to find, nothing found
    assert float(box_dice_loss(P, empty)) == pytest.approx(1.0)  # negative volume: constant 1


def test_modified_dice_by_hand():
    # fraction in box 2.1 / 4 = 0.525 > alpha 0.1: H = 1, M = 4 - 2.1 = 1.9,
    # denominator 3.3 + 4 - 1.9 = 5.4 = sum p + sum p b
    assert float(modified_dice_loss(P, B, alpha=0.1)) == pytest.approx(1 - 4.2 / 5.4)
    # alpha above the fraction: H = 0, the plain box Dice
    assert float(modified_dice_loss(P, B, alpha=0.6)) == pytest.approx(1 - 4.2 / 7.3)
    # the Heaviside is strict: x > alpha
    assert float(shifted_heaviside(torch.tensor(0.1), 0.1)) == 0.0
    assert float(shifted_heaviside(torch.tensor(0.11), 0.1)) == 1.0
    # half the box predicted, nothing outside: box Dice penalises it, MDice does not
    half = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float64).reshape(1, 2, 2, 2)
    assert float(box_dice_loss(half, B)) == pytest.approx(1 - 4 / 6)
    assert float(modified_dice_loss(half, B)) == pytest.approx(0.0)
    # a false positive outside the box still costs: sum p = 3, sum pb = 2, M = 2, den = 3 + 4 - 2
    fp = half.clone().reshape(-1)
    fp[5] = 1
    assert float(modified_dice_loss(fp.reshape(1, 2, 2, 2), B)) == pytest.approx(1 - 4 / 5)


def test_modified_dice_per_box_keeps_an_empty_small_box_pulled_by_hand():
    """Two boxes on a line: A (voxels 0-3) half foreground, B (5-6) empty. Over the whole volume
    (the paper's sums) the fraction 2/6 > 0.1 releases every box voxel and the loss is 0, so B is
    never found; per box only A is released: den = 2 + 6 - (4 - 2) = 6, loss 1 - 4/6."""
    b = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.float64)
    p = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64, requires_grad=True)
    assert float(modified_dice_loss(p, b)) == pytest.approx(0.0)
    loss = modified_dice_loss(p, b, per_box=True)
    assert float(loss) == pytest.approx(1 - 4 / 6)
    loss.backward()
    # dL/dp_j = -2 (dI D - I dD) / D^2 with I = 2, D = 6: in A dI = 1, dD = 2 (sum p and A's sum p b);
    # in B dI = 1, dD = 1; outside dI = 0, dD = 1.
    a, b_in, out = -2 * (6 - 2 * 2) / 36, -2 * (6 - 2) / 36, -2 * (0 - 2) / 36
    assert p.grad[0].tolist() == pytest.approx([a] * 4 + [out] + [b_in] * 2 + [out] * 3)
    # one box region: per box is the paper's loss; through boxfcn_loss too (beta 10)
    assert float(modified_dice_loss(P, B, per_box=True)) == pytest.approx(1 - 4.2 / 5.4)
    assert float(boxfcn_loss(P, P, B, kind="mdice", per_box=True)) == pytest.approx(10 * (1 - 4.2 / 5.4))
    # both boxes above alpha: both released, as over the whole volume
    both = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.float64)
    assert float(modified_dice_loss(both, b, per_box=True)) == pytest.approx(float(modified_dice_loss(both, b)))
    # an empty box mask: the plain box Dice's 1 (nothing released)
    assert float(modified_dice_loss(P, torch.zeros_like(B), per_box=True)) == pytest.approx(1.0)


def test_regularised_heaviside_by_hand():
    eps = 0.03
    x = torch.tensor([0.0, eps, -eps], dtype=torch.float64)
    # 1/2 (1 + 2/pi arctan(+-1)) = 1/2 (1 +- 1/2)
    assert regularised_heaviside(x, eps).tolist() == pytest.approx([0.5, 0.75, 0.25])
    with pytest.raises(ValueError):
        regularised_heaviside(x, 0.0)


# Mumford-Shah scene: box voxels p = 0.5 +- eps, so H_eps(phi) = 0.75 / 0.25 exactly; I = 4, 2, 1, 1.
P_MS = torch.tensor([0.53, 0.53, 0.47, 0.47, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 2, 2, 2)
I_MS = torch.tensor([4.0, 2.0, 1.0, 1.0, 9.0, 9.0, -9.0, 5.0], dtype=torch.float64).reshape(1, 2, 2, 2)


def test_mumford_shah_by_hand_sharp_regions():
    # phi = +-0.03: sharp H(phi) = 1, 1, 0, 0 -> C1 = (4 + 2) / 2 = 3, C2 = (1 + 1) / 2 = 1.
    # I h = 3, 1.5, 0.25, 0.25:  |Ih - C1| - |Ih - C2| = -2, 1, 2, 2 -> sum 3
    # I (1 - h) = 1, 0.5, 0.75, 0.75:  |. - C2| - |. - C1| = -2, -2, -2, -2 -> sum -8
    # L_MS = (omega1 * 3 + omega2 * -8) / 4 = (3 - 24) / 4 with the paper's omegas (1, 3)
    got = mumford_shah_loss(P_MS, I_MS, B, omega1=1.0, omega2=3.0, eps=0.03)
    assert float(got) == pytest.approx(-21 / 4)
    assert float(mumford_shah_loss(P_MS, I_MS, B, omega1=2.0, omega2=0.0)) == pytest.approx(6 / 4)
    # voxels outside the box (I = 9, -9, 5 there) do not matter
    i2 = I_MS.clone().reshape(-1)
    i2[4:] = 100.0
    assert float(mumford_shah_loss(P_MS, i2.reshape(1, 2, 2, 2), B)) == pytest.approx(-21 / 4)


def test_mumford_shah_by_hand_smooth_regions():
    # C1 = sum(I h) / sum h = (3 + 1.5 + .25 + .25) / 2 = 2.5; C2 = sum(I (1-h)) / sum(1-h) = 3 / 2
    # omega1 terms: -1, 1, 1, 1 -> 2; omega2 terms: -1, -1, -1, -1 -> -4; (2 - 12) / 4
    got = mumford_shah_loss(P_MS, I_MS, B, region="smooth")
    assert float(got) == pytest.approx(-10 / 4)


def test_mumford_shah_edge_cases_and_gradient():
    empty = torch.zeros_like(B)
    assert float(mumford_shah_loss(P_MS, I_MS, empty)) == 0.0  # no box, no term
    p = P_MS.clone().requires_grad_()
    mumford_shah_loss(p, I_MS, B).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert (p.grad.reshape(-1)[4:] == 0).all()  # only box voxels get a gradient


def test_full_loss_and_batch():
    # P_MS: sum p = 2 = sum p b, sum b = 4; fraction 0.5 > 0.1, M = 2 -> MDice = 1 - 4 / 4 = 0
    assert float(boxfcn_loss(P_MS, I_MS, B, kind="mdice_ms")) == pytest.approx(10 * 0 + 1 * (-21 / 4))
    assert float(boxfcn_loss(P, I_MS, B, kind="mdice")) == pytest.approx(10 * (1 - 4.2 / 5.4))
    assert float(boxfcn_loss(P, I_MS, B, kind="box_dice")) == pytest.approx(1 - 4.2 / 7.3)
    assert float(boxfcn_loss(P_MS, I_MS, B, kind="mdice_ms", beta=2, lam=0.5)) == pytest.approx(-21 / 8)
    assert PAPER_LOSS == {"alpha": 0.1, "omega1": 1.0, "omega2": 3.0, "beta": 10.0, "lam": 1.0}
    # per-sample values and the batch mean
    pb = torch.cat([P, P_MS])
    bb = torch.cat([B, B])
    per = box_dice_loss(pb, bb, reduce=False)
    assert per.tolist() == pytest.approx([1 - 4.2 / 7.3, 1 - 4 / 6])
    assert float(box_dice_loss(pb, bb)) == pytest.approx(float(per.mean()))
    with pytest.raises(ValueError):
        boxfcn_loss(P, I_MS, B, kind="dice")
    with pytest.raises(ValueError):
        box_dice_loss(P, B[..., :1])
    assert not math.isnan(float(modified_dice_loss(torch.zeros_like(B), B)))


def test_mumford_shah_gradient_pushes_voxels_brighter_than_c2_to_foreground():
    """Why L_MS over-segments (docs/EXPERIMENTS.md, BoxFCN): Eq. 5 takes |I H - C|, not Chan-Vese's |I - C|^2 H.
    With C1, C2 fixed (Eq. 7's sharp H), a background voxel's gradient is -2 omega2 I / sum(b) dH/dp
    whenever C2 < I(1 - H) < C1, and 0 below C2: it is pushed to the foreground as soon as it is
    brighter than the background mean, where Chan-Vese would split at (C1 + C2) / 2.

    Box of 10 voxels: lesion I = 10 (p = 1) x3, background I = 1 (p = 0) x6, one test voxel (p = 0).
    """
    eps = 0.03
    dh_dp = (1 / math.pi) * eps / (eps**2 + 0.25)  # H_eps'(phi) at phi = p - 0.5 = -0.5

    def grad_of_test_voxel(i_test: float) -> float:
        image = torch.tensor([[10.0] * 3 + [1.0] * 6 + [i_test]])
        p = torch.tensor([[1.0] * 3 + [0.0] * 7], requires_grad=True)
        mumford_shah_loss(p, image, torch.ones_like(image)).backward()
        return float(p.grad[0, -1])

    # I = 3: C2 = 9/7 < 3 < C1 = 10 and closer to C2 than to C1 (Chan-Vese: background), yet
    # dL/dp = -2 * omega2 * I / 10 * H' = -1.8 * H' < 0: gradient descent raises p.
    assert grad_of_test_voxel(3.0) == pytest.approx(-2 * 3.0 * 3.0 / 10 * dh_dp, rel=1e-5)
    assert grad_of_test_voxel(3.0) == pytest.approx(-0.0685077, rel=1e-4)
    # I = 0.5 < C2 = 6.5/7: no push either way.
    assert grad_of_test_voxel(0.5) == 0.0


def test_mumford_shah_chan_vese_form_by_hand():
    """Issue 18 item 9: the Chan-Vese form |I - C1|^2 H + |I - C2|^2 (1 - H) on P_MS / I_MS."""
    # Sharp regions: C1 = 3, C2 = 1; h = .75, .75, .25, .25; I = 4, 2, 1, 1.
    # inside (I - C1)^2 h = 1*.75 + 1*.75 + 4*.25 + 4*.25 = 3.5
    # outside (I - C2)^2 (1 - h) = 9*.25 + 1*.25 + 0 + 0 = 2.5
    # L = (omega1 * 3.5 + omega2 * 2.5) / sum b = (3.5 + 7.5) / 4
    got = mumford_shah_loss(P_MS, I_MS, B, omega1=1.0, omega2=3.0, form="chan-vese")
    assert float(got) == pytest.approx(11 / 4)
    # Smooth regions: C1 = 2.5, C2 = 1.5: inside 2.25*.75 + .25*.75 + 2.25*.25 * 2 = 3.0,
    # outside 6.25*.25 + .25*.25 + .25*.75 * 2 = 2.0 -> (3 + 6) / 4
    got = mumford_shah_loss(P_MS, I_MS, B, region="smooth", form="chan-vese")
    assert float(got) == pytest.approx(9 / 4)
    # boxfcn_loss forwards the form (MDice is 0 here, see test_full_loss_and_batch)
    assert float(boxfcn_loss(P_MS, I_MS, B, ms_form="chan-vese")) == pytest.approx(11 / 4)
    assert float(boxfcn_loss(P_MS, I_MS, B, ms_form="eq5")) == pytest.approx(-21 / 4)
    assert MS_FORMS == ("eq5", "chan-vese")
    with pytest.raises(ValueError, match="form"):
        mumford_shah_loss(P_MS, I_MS, B, form="chanvese")


def test_chan_vese_gradient_sends_a_voxel_closer_to_c2_to_the_background():
    """The scene of the test above (C1 = 10, C2 = 9/7, box of 10): where Eq. 5 pushes I = 3 to the
    foreground, Chan-Vese's dL/dp = (omega1 (I - C1)^2 - omega2 (I - C2)^2) / sum(b) * H' is > 0."""
    eps = 0.03
    dh_dp = (1 / math.pi) * eps / (eps**2 + 0.25)
    image = torch.tensor([[10.0] * 3 + [1.0] * 6 + [3.0]])
    p = torch.tensor([[1.0] * 3 + [0.0] * 7], requires_grad=True)
    mumford_shah_loss(p, image, torch.ones_like(image), form="chan-vese").backward()
    c2 = 9 / 7
    expected = (1.0 * (3 - 10) ** 2 - 3.0 * (3 - c2) ** 2) / 10 * dh_dp
    assert float(p.grad[0, -1]) == pytest.approx(expected, rel=1e-5)
    assert expected > 0  # gradient descent lowers p: background


def test_mumford_shah_box_scaled_image_by_hand():
    """Issue 23: image_scale="box" min-max scales I over the box voxels before Eq. 5-7."""
    # box I = 4, 2, 1, 1 -> (I - 1) / 3 = 1, 1/3, 0, 0; sharp H = 1, 1, 0, 0 -> C1 = 2/3, C2 = 0
    # h = .75, .75, .25, .25.  I h = 3/4, 1/4, 0, 0:  |Ih - C1| - |Ih - C2| = -2/3, 1/6, 2/3, 2/3 -> 5/6
    # I (1 - h) = 1/4, 1/12, 0, 0:  |. - C2| - |. - C1| = -1/6, -1/2, -2/3, -2/3 -> -2
    # L_MS = (1 * 5/6 + 3 * -2) / 4 = -31/24
    got = mumford_shah_loss(P_MS, I_MS, B, image_scale="box")
    assert float(got) == pytest.approx(-31 / 24)
    # Chan-Vese, same C1, C2, h:
    # inside: (1 - 2/3)^2 .75 + (1/3 - 2/3)^2 .75 + (0 - 2/3)^2 .25 * 2 = 1/12 + 1/12 + 2/9 = 7/18
    # outside: (1 - 0)^2 .25 + (1/3)^2 .25 + 0 + 0 = 1/4 + 1/36 = 5/18
    got = mumford_shah_loss(P_MS, I_MS, B, image_scale="box", form="chan-vese")
    assert float(got) == pytest.approx((7 / 18 + 3 * 5 / 18) / 4)
    # affine-invariant: 5 I + 7 gives the same loss; voxels outside the box do not matter
    assert float(mumford_shah_loss(P_MS, 5 * I_MS + 7, B, image_scale="box")) == pytest.approx(-31 / 24)
    # bounded by omega1 + omega2 whatever the intensities
    big = I_MS * 1000
    assert abs(float(mumford_shah_loss(P_MS, big, B, image_scale="box"))) <= 4.0
    # a flat box: every scaled intensity 0, so C1 = C2 = 0 and the loss 0
    assert float(mumford_shah_loss(P_MS, torch.full_like(I_MS, 3.0), B, image_scale="box")) == 0.0
    assert float(boxfcn_loss(P_MS, I_MS, B, ms_scale="box")) == pytest.approx(-31 / 24)
    with pytest.raises(ValueError, match="image_scale"):
        mumford_shah_loss(P_MS, I_MS, B, image_scale="max")
