"""U-Net probability threshold chosen on validation studies (wsseg_core.unet.choose_threshold)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from wsseg_core.models import SlicePreprocessor
from wsseg_core.unet import choose_threshold, predict_volume_unet, segment_volume_unet


class PetIsProbability(nn.Module):
    """Logits (0, logit(PET channel)): softmax[:, 1] equals the preprocessed PET, SUV / 20."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0].clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1) + 0 * self.dummy


def _study(lesion_suv: float = 9.0, distractor_suv: float = 5.0, with_seg: bool = True):
    suv = np.zeros((16, 16, 4), np.float32)
    seg = np.zeros(suv.shape, np.uint8)
    suv[2:6, 2:6, 1:3] = lesion_suv  # tumour: probability 0.45
    seg[2:6, 2:6, 1:3] = 1
    suv[10:12, 10:12, 1] = distractor_suv  # not tumour: probability 0.25
    return SimpleNamespace(suv=suv, ct=np.zeros_like(suv), seg=seg if with_seg else None)


def _negative():
    st = _study()
    st.seg = np.zeros_like(st.seg)  # a negative control: Dice undefined, no vote
    return st


def test_choose_threshold_hand_computed_dice_per_threshold():
    pre = SlicePreprocessor(input_size=16)  # no resize: probability = SUV / 20 exactly
    model = PetIsProbability()
    st = _study()
    prob = predict_volume_unet(model, pre, st.suv, st.ct)
    assert prob[3, 3, 1] == pytest.approx(0.45, abs=1e-5) and prob[10, 10, 1] == pytest.approx(0.25, abs=1e-5)
    # Under the median rule a negative study and an unlabelled one must not vote.
    res = choose_threshold(model, pre, [st, _negative(), _study(with_seg=False)], rule="median")
    assert res["n"] == 1
    # t 0.1, 0.2: lesion (32 voxels) + distractor (4): Dice 2*32 / (36 + 32); 0.3, 0.4: exact;
    # >= 0.5: nothing found. Equal medians (0.3, 0.4) go to the one closest to 0.5.
    assert res["by_threshold"]["0.2"] == pytest.approx(64 / 68)
    assert res["by_threshold"]["0.3"] == res["by_threshold"]["0.4"] == pytest.approx(1.0)
    assert res["by_threshold"]["0.5"] == 0.0
    assert res["threshold"] == 0.4 and res["val_dice"] == pytest.approx(1.0)
    # The pooled rule (default) counts the negative's 36 / 32 voxels: 2*32 / (72 + 32) at 0.1-0.2,
    # 2*32 / (64 + 32) at 0.3-0.4; the unlabelled study still does not count.
    pooled = choose_threshold(model, pre, [st, _negative(), _study(with_seg=False)])
    assert pooled["by_threshold"]["0.2"] == pytest.approx(64 / 104)
    assert pooled["by_threshold"]["0.4"] == pytest.approx(64 / 96) and pooled["threshold"] == 0.4
    # the default 0.5 would have found nothing: what the search is for
    assert segment_volume_unet(model, pre, st.suv, st.ct, threshold=0.5).sum() == 0
    assert segment_volume_unet(model, pre, st.suv, st.ct, threshold=res["threshold"]).sum() == 32


def test_choose_threshold_without_voters_and_bad_grid():
    pre = SlicePreprocessor(input_size=16)
    res = choose_threshold(PetIsProbability(), pre, [_study(with_seg=False)])
    assert res["threshold"] == 0.5 and res["n"] == 0 and np.isnan(res["val_dice"])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        choose_threshold(PetIsProbability(), pre, [], grid=(0.0, 0.5))


def test_epoch_lr_cosine_by_hand():
    from wsseg_core.unet import epoch_lr

    assert [epoch_lr(1e-3, e, 4, "constant") for e in range(4)] == [1e-3] * 4
    # (1 + cos(pi e / 4)) / 2 = 1, 0.8536, 0.5, 0.1464
    assert [round(epoch_lr(2e-3, e, 4, "cosine"), 7) for e in range(4)] == [2e-3, 0.0017071, 1e-3, 0.0002929]
    with pytest.raises(ValueError, match="schedule"):
        epoch_lr(1e-3, 0, 4, "step")


def test_crop_pair_keeps_image_and_mask_aligned_and_finds_lesions():
    from wsseg_core.unet import crop_pair

    b, s = 64, 32
    x = torch.arange(b * 2 * s * s, dtype=torch.float32).reshape(b, 2, s, s)
    y = torch.zeros((b, s, s), dtype=torch.int64)
    y[:, 28:30, 2:4] = 1  # one small lesion near a corner: a uniform 16x16 window rarely holds it
    g = torch.Generator().manual_seed(0)
    xc, yc = crop_pair(x, y, 16, g, lesion_fraction=1.0)
    assert xc.shape == (b, 2, 16, 16) and yc.shape == (b, 16, 16)
    for i in range(b):  # the window's top-left pixel value tells where it was cut: same for the mask
        r0, c0 = divmod(int(xc[i, 0, 0, 0]) - i * 2 * s * s, s)
        assert torch.equal(yc[i], y[i, r0:r0 + 16, c0:c0 + 16])
        assert torch.equal(xc[i, 1], x[i, 1, r0:r0 + 16, c0:c0 + 16])
    assert (yc.flatten(1).sum(1) == 4).all()  # lesion-centred (shift <= 4 px) windows hold all of it
    _, yu = crop_pair(x, y, 16, torch.Generator().manual_seed(0), lesion_fraction=0.0)
    assert (yu.flatten(1).sum(1) > 0).float().mean() < 0.5  # uniform windows mostly miss it
    with pytest.raises(ValueError, match="exceeds"):
        crop_pair(x, y, 48)


def test_ce_dice_loss_by_hand():
    """CEDiceLoss = weighted CE + dice_weight * (1 - (2 sum p r + 1) / (sum p + sum r + 1)), the
    sums pooled over the batch; dice_weight 0 is exactly nn.CrossEntropyLoss(weight)."""
    from wsseg_core.unet import CEDiceLoss

    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, 4)
    y = torch.randint(0, 2, (3, 4, 4))
    w = torch.tensor([1.0, 7.7])
    logp = torch.log_softmax(logits, dim=1)
    ce = -(w[y] * logp.gather(1, y[:, None])[:, 0]).sum() / w[y].sum()
    p = logp[:, 1].exp()
    r = y.float()
    dice_loss = 1 - (2 * (p * r).sum() + 1) / (p.sum() + r.sum() + 1)
    assert torch.allclose(CEDiceLoss(w, dice_weight=0.0)(logits, y),
                          torch.nn.CrossEntropyLoss(weight=w)(logits, y))
    assert torch.allclose(CEDiceLoss(w, dice_weight=0.5)(logits, y), ce + 0.5 * dice_loss)
    # An all-background batch predicted all-background costs (almost) nothing in the Dice term.
    bg = torch.zeros(1, 2, 4, 4)
    bg[:, 0] = 20.0
    zero = torch.zeros(1, 4, 4, dtype=torch.int64)
    assert float(CEDiceLoss(w, dice_weight=1.0)(bg, zero)) < 1e-6
    assert torch.equal(CEDiceLoss(w).weight, w)
    with pytest.raises(ValueError, match="dice_weight"):
        CEDiceLoss(w, dice_weight=-1.0)


def test_unet_epochs_from_a_step_budget():
    from jobs.train_unet import UNET_JOB_PRESETS, unet_epochs

    assert unet_epochs(None, 1000, 29) == 35          # ceil(1000 / 29): 1015 steps
    assert unet_epochs(None, 1000, 13) == 77          # a 15-study cohort: more epochs, same steps
    assert unet_epochs(None, 10, 50) == 1
    assert unet_epochs(7, 1000, 29) == 7              # explicit epochs win
    with pytest.raises(ValueError):
        unet_epochs(None, None, 29)
    assert UNET_JOB_PRESETS["small"]["epochs"] is None and UNET_JOB_PRESETS["small"]["steps"] >= 1000
    assert UNET_JOB_PRESETS["paper"]["dice_weight"] == 0.0  # the paper's loss is the weighted CE


def _blob_slices(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n slices (2, size, size): half hold one small bright disc (radius 1.5-2.5 px, ~0.7 % of the
    pixels), the PET background is faint noise, CT constant."""
    x = torch.zeros(n, 2, size, size)
    y = torch.zeros(n, size, size, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x[:, 0] = 0.05 + 0.02 * torch.rand(n, size, size, generator=gen)
    x[:, 1] = 0.5
    for i in range(0, n, 2):
        c = torch.randint(4, size - 4, (2,), generator=gen)
        rad = 1.5 + torch.rand(1, generator=gen).item()
        m = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= rad * rad
        x[i, 0][m] = 0.4 + 0.4 * torch.rand(1, generator=gen).item()
        y[i][m] = 1
    return x, y


@pytest.mark.slow
def test_small_preset_loss_learns_tiny_lesions(two_torch_threads):
    """The small preset's loss, lr, batch and schedule learn small discs (~0.7 % of the pixels) in
    160 steps. Measured with the same data and steps: the weighted CE alone (dice_weight 0, the
    former preset) stayed at validation Dice 0.01-0.04 (it had not left the 'tumour wherever
    uncertain' start); CE + soft Dice reached 0.61."""
    from jobs.train_unet import UNET_JOB_PRESETS
    from wsseg_core.unet import UNet2D, fit_unet_slices

    p = UNET_JOB_PRESETS["small"]
    gen = torch.Generator().manual_seed(0)
    tr = _blob_slices(128, 32, gen)
    va = _blob_slices(32, 32, gen)
    torch.manual_seed(0)
    model = UNet2D(base=4, input_size=32)
    hist = fit_unet_slices(model, tr, va, epochs=160 * p["batch_size"] // 128,
                           batch_size=p["batch_size"], lr=p["lr"], seed=0, augment=False,
                           schedule=p["schedule"], dice_weight=p["dice_weight"])
    dices = [round(h["val_dice"], 3) for h in hist]
    print(f"tiny discs, small preset loss: val Dice by epoch {dices}")
    assert max(dices) > 0.4


def _ddp_dice_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: CEDiceLoss(world=2) on its half of a fixed batch; saves loss and d loss / d logits."""
    import torch.distributed as dist

    from wsseg_core.unet import CEDiceLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits, y = _dice_batch()
        half = logits.shape[0] // world
        mine = logits[rank * half:(rank + 1) * half].clone().requires_grad_(True)
        loss = CEDiceLoss(torch.tensor([1.0, 7.7]), dice_weight=1.0, world=world)(
            mine, y[rank * half:(rank + 1) * half])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _dice_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(4, 6, 6, generator=g) < 0.2).long()
    y[2:] = 0  # the second rank's half holds no tumour: its local Dice would differ from the global
    return torch.randn(4, 2, 6, 6, generator=g), y


def test_ce_dice_loss_over_two_ranks_matches_one_process(tmp_path):
    """With DDP (gradients averaged over ranks) each rank's CEDiceLoss(world=2) gives the gradient
    of the single-process loss of the whole batch: checked with a real 2-process gloo group."""
    import torch.multiprocessing as mp

    from wsseg_core.unet import CEDiceLoss

    mp.spawn(_ddp_dice_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logits, y = _dice_batch()
    logits.requires_grad_(True)
    ref = CEDiceLoss(torch.tensor([1.0, 7.7]), dice_weight=1.0)(logits, y)
    ref.backward()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Both ranks report the global Dice term; DDP averages gradients: (g0 + g1) / 2 per half.
    ddp_grad = torch.cat([r0["grad"], r1["grad"]]) / 2
    assert torch.allclose(ddp_grad, logits.grad, atol=1e-6)
    assert torch.allclose((r0["loss"] + r1["loss"]) / 2, ref.detach(), atol=1e-6)


def test_native_input_size_rounds_the_largest_side_up_to_16():
    from wsseg_core.unet import native_input_size

    assert native_input_size([(128, 128, 96)]) == 128
    assert native_input_size([(96, 96, 64), (112, 100, 80)]) == 112
    assert native_input_size([(100, 90)]) == 112      # ceil(100 / 16) * 16
    assert native_input_size([(17, 5, 3)]) == 32
    with pytest.raises(ValueError):
        native_input_size([])


def _two_level_study(lesion_suv: float, fp_voxels: int = 0, with_tumour: bool = True):
    """16 x 16 x 4: a 32-voxel lesion of `lesion_suv` (segmented when `with_tumour`) and, in a
    tumour-free study, `fp_voxels` voxels of SUV 5 (probability 0.25) elsewhere."""
    suv = np.zeros((16, 16, 4), np.float32)
    seg = np.zeros(suv.shape, np.uint8)
    if with_tumour:
        suv[2:6, 2:6, 1:3] = lesion_suv
        seg[2:6, 2:6, 1:3] = 1
    flat = suv[8:16, 8:16, :].reshape(-1)
    flat[:fp_voxels] = 5.0
    suv[8:16, 8:16, :] = flat.reshape(8, 8, 4)
    return SimpleNamespace(suv=suv, ct=np.zeros_like(suv), seg=seg)


def test_pooled_rule_counts_a_tumour_free_study_and_differs_from_the_median():
    pre = SlicePreprocessor(input_size=16)
    model = PetIsProbability()  # probability = SUV / 20
    a = _two_level_study(9.0)   # lesion at p 0.45
    b = _two_level_study(3.0)   # lesion at p 0.15
    neg = _two_level_study(0.0, fp_voxels=96, with_tumour=False)  # 96 voxels at p 0.25
    studies = [a, b, neg]
    med = choose_threshold(model, pre, studies, rule="median")
    # median of (A, B): t 0.1 -> (1, 1) = 1; 0.2-0.4 -> (1, 0) = 0.5; >= 0.5 -> 0
    assert med["by_threshold"]["0.1"] == pytest.approx(1.0)
    assert med["by_threshold"]["0.3"] == pytest.approx(0.5)
    assert med["threshold"] == 0.1 and med["n"] == 2
    pooled = choose_threshold(model, pre, studies)
    # pooled, |R| = 64: t 0.1: 2*64 / (32+32+96 + 64) = 128/224; t 0.2: 2*32 / (32+96 + 64) = 64/192;
    # t 0.3, 0.4: 2*32 / (32 + 64) = 64/96; t >= 0.5: 0. Ties (0.3, 0.4) go to the one nearer 0.5.
    by = pooled["by_threshold"]
    assert by["0.1"] == pytest.approx(128 / 224) and by["0.2"] == pytest.approx(64 / 192)
    assert by["0.3"] == by["0.4"] == pytest.approx(64 / 96) and by["0.5"] == 0.0
    assert pooled["threshold"] == 0.4 and pooled["rule"] == "pooled" and pooled["n"] == 2
    assert pooled["median_by_threshold"] == med["by_threshold"]
    with pytest.raises(ValueError, match="rule"):
        choose_threshold(model, pre, studies, rule="mean")


def test_evaluate_unet_pooled_dice_by_threshold_by_hand():
    from wsseg_core.train import make_loss
    from wsseg_core.unet import evaluate_unet

    # Two 16 x 16 slices, probability = PET channel. Slice 0: 4 tumour pixels at p 0.45, 6 others
    # at 0.25; slice 1 (no tumour): 10 pixels at 0.25.
    x = torch.full((2, 2, 16, 16), 1e-3)
    y = torch.zeros((2, 16, 16), dtype=torch.int64)
    x[0, 0, 0, :4] = 0.45
    y[0, 0, :4] = 1
    x[0, 0, 1, :6] = 0.25
    x[1, 0, 2, :10] = 0.25
    res = evaluate_unet(PetIsProbability(), x, y, make_loss(7.7), batch_size=1,
                        thresholds=(0.2, 0.3, 0.5))
    # t 0.2: 2*4 / (4+6+10 + 4) = 8/24; t 0.3: 2*4 / (4 + 4) = 1; t 0.5: nothing, 0
    assert res["dice_by_threshold"] == pytest.approx({"0.2": 8 / 24, "0.3": 1.0, "0.5": 0.0})
    assert res["best_dice"] == pytest.approx(1.0)
    assert res["dice"] == 0.0  # the argmax (p > 0.5) finds nothing
    assert np.isnan(evaluate_unet(PetIsProbability(), x, y, make_loss(7.7))["best_dice"])


def test_a_unet_that_did_not_learn_says_so_and_one_that_learned_does_not():
    """`jobs.train_unet.not_learned_reason` on `choose_threshold`'s result, as `tune_threshold`
    records it: a network that lights the distractor and never the lesion (lesion SUV 0, p ~ 0)
    scores Dice 0 at every threshold and did not learn; the network above (Dice 1 at 0.4) did."""
    from jobs.train_unet import not_learned_reason

    pre = SlicePreprocessor(input_size=16)
    blind = choose_threshold(PetIsProbability(), pre, [_study(lesion_suv=0.0)])
    assert blind["n"] == 1 and blind["val_dice"] == 0.0
    why = not_learned_reason(blind)
    assert why.startswith("UNet did not learn") and "0.000 < 0.1" in why and "--train-seed" in why
    learned = choose_threshold(PetIsProbability(), pre, [_study()])
    assert not_learned_reason(learned) is None
    assert not_learned_reason(learned, bar=1.5) is not None  # the bar is the argument's
    no_voter = choose_threshold(PetIsProbability(), pre, [_study(with_seg=False)])
    assert not_learned_reason(no_voter) is None  # nothing measured: selected_on says so, no verdict
