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
    # A negative study and an unlabelled one must not vote.
    res = choose_threshold(model, pre, [st, _negative(), _study(with_seg=False)])
    assert res["n"] == 1
    # t 0.1, 0.2: lesion (32 voxels) + distractor (4): Dice 2*32 / (36 + 32); 0.3, 0.4: exact;
    # >= 0.5: nothing found. Equal medians (0.3, 0.4) go to the one closest to 0.5.
    assert res["by_threshold"]["0.2"] == pytest.approx(64 / 68)
    assert res["by_threshold"]["0.3"] == res["by_threshold"]["0.4"] == pytest.approx(1.0)
    assert res["by_threshold"]["0.5"] == 0.0
    assert res["threshold"] == 0.4 and res["val_dice"] == pytest.approx(1.0)
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
