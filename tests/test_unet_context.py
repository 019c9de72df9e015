"""Issue 23, fourth round: the U-Net's 2.5-D input (`context` neighbouring PET slices as extra
channels), checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsseg_core.models import SlicePreprocessor
from wsseg_core.train import PET_GAMMA_RANGE
from wsseg_core.unet import (UNet2D, augment_pair, build_unet, load_unet, masks_from_studies,
                             predict_volume_unet, save_unet, slice_batch)


def _ramp_volume(nz: int = 5, side: int = 16):
    """SUV = z + 1 on slice z (constant in-plane), CT 0 HU."""
    suv = np.broadcast_to(np.arange(1, nz + 1, dtype=np.float32), (side, side, nz)).copy()
    return suv, np.zeros_like(suv)


def test_slice_batch_stacks_the_neighbouring_pet_slices_clamped_at_the_edges():
    suv, ct = _ramp_volume()
    pre = SlicePreprocessor(input_size=16)  # suv_max 20: PET channel = SUV / 20
    x0 = slice_batch(suv, ct, [0, 2, 4], pre)
    assert x0.shape == (3, 2, 16, 16)
    x = slice_batch(suv, ct, [0, 2, 4], pre, context=1)
    assert x.shape == (3, 4, 16, 16)
    assert torch.equal(x[:, :2], x0)  # channels 0, 1 are the slice alone
    # channel 2 = PET of z - 1, channel 3 = PET of z + 1 (index clamped to 0 ... 4)
    assert x[:, 2, 0, 0].tolist() == pytest.approx([1 / 20, 2 / 20, 4 / 20])
    assert x[:, 3, 0, 0].tolist() == pytest.approx([2 / 20, 4 / 20, 5 / 20])
    x2 = slice_batch(suv, ct, [2], pre, context=2)  # z-2, z-1, z+1, z+2
    assert x2[0, 2:, 0, 0].tolist() == pytest.approx([1 / 20, 2 / 20, 4 / 20, 5 / 20])


def test_masks_from_studies_with_context_keeps_the_masks_and_adds_channels():
    suv, ct = _ramp_volume()
    seg = np.zeros(suv.shape, np.uint8)
    seg[4:8, 4:8, 1] = 1

    class St:
        pass

    st = St()
    st.suv, st.ct, st.seg = suv, ct, seg
    pre = SlicePreprocessor(input_size=16)
    x0, y0 = masks_from_studies([st], pre)
    x1, y1 = masks_from_studies([st], pre, context=1)
    assert torch.equal(y0, y1) and x1.shape == (5, 4, 16, 16)
    assert torch.equal(x1[:, :2], x0)
    assert x1[1, 2, 0, 0] == pytest.approx(1 / 20) and x1[1, 3, 0, 0] == pytest.approx(3 / 20)


def test_augment_pair_gives_the_context_channels_channel_0s_warp_and_gamma():
    torch.manual_seed(2)
    pet = torch.rand(3, 1, 32, 32)
    x = torch.cat([pet, torch.rand(3, 1, 32, 32), pet, 0.5 * pet], dim=1)
    y = (torch.rand(3, 32, 32) > 0.8).long()
    xo, yo = augment_pair(x, y, torch.Generator().manual_seed(7))
    # the first two channels are exactly what the 2-channel augmentation gives
    x2, y2 = augment_pair(x[:, :2], y, torch.Generator().manual_seed(7))
    assert torch.equal(yo, y2) and torch.allclose(xo[:, :2], x2, atol=1e-6)
    assert torch.allclose(xo[:, 2], xo[:, 0], atol=1e-6)  # same input -> same output
    # channel 3 = (warped 0.5 pet) ** gamma, gamma from the documented draws (5 per sample)
    xn, _ = augment_pair(x, y, torch.Generator().manual_seed(7), pet_gamma=False)
    u = torch.rand((3, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lg0, lg1 = math.log(PET_GAMMA_RANGE[0]), math.log(PET_GAMMA_RANGE[1])
    gamma = torch.exp(lg0 + (lg1 - lg0) * u[:, 4]).float().view(3, 1, 1)
    assert torch.allclose(xo[:, 3], xn[:, 3].clamp(0, 1).pow(gamma), atol=1e-5)
    assert torch.allclose(xn[:, 3], 0.5 * xn[:, 0], atol=1e-6)  # the same warp


def test_context_network_channels_checkpoint_and_inference(tmp_path):
    model, pre = build_unet("small", base=4, input_size=16, context=1)
    assert model.context == 1 and model.down[0][0].in_channels == 4
    assert build_unet("small", base=4, input_size=16)[0].context == 0
    with pytest.raises(ValueError, match="input channels"):
        model(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="context"):
        UNet2D(base=4, input_size=16, context=-1)
    save_unet(tmp_path / "u.pt", model, pre)
    m2, pre2, _ = load_unet(tmp_path / "u.pt")
    assert m2.context == 1
    suv, ct = _ramp_volume()
    p = predict_volume_unet(m2, pre2, suv, ct)  # builds the 4-channel input itself
    assert p.shape == suv.shape and np.all((p >= 0) & (p <= 1))
    # the prediction of slice 2 is the network on slice_batch's input for it
    with torch.no_grad():
        ref = torch.softmax(m2(slice_batch(suv, ct, [2], pre2, context=1)), 1)[0, 1].numpy()
    assert np.allclose(p[:, :, 2], ref, atol=1e-5)


def test_context_enters_the_training_fingerprint_only_when_nonzero():
    import inspect

    from jobs.ray_train import run_fingerprint
    from jobs.train_unet import UNET_JOB_PRESETS, fit_unet

    assert inspect.signature(fit_unet).parameters["context"].default == 0
    cfg = {k: v for k, v in UNET_JOB_PRESETS["small"].items() if k != "context"}
    default = run_fingerprint(cfg, metric="val_best_dice", mode="max")
    ctx = run_fingerprint({**cfg, "context": 1}, metric="val_best_dice", mode="max")
    assert ctx["digest"] != default["digest"] and ctx["fields"]["context"] == 1


# --------------------------------------------------------------------------------------------------
# Lesion-uptake augmentation (scale_lesion_uptake)
# --------------------------------------------------------------------------------------------------

def _disc_batch():
    """Two 24x24 samples, background PET 0.04 (SUV 0.8), a 4x4 lesion at PET 0.14 (SUV 2.8) in
    sample 0, none in sample 1; CT 0.5."""
    x = torch.full((2, 2, 24, 24), 0.04)
    x[:, 1] = 0.5
    y = torch.zeros(2, 24, 24, dtype=torch.long)
    y[0, 10:14, 10:14] = 1
    x[0, 0, 10:14, 10:14] = 0.14
    return x, y


def test_scale_lesion_uptake_scales_the_excess_over_the_ring_background_by_hand():
    from wsseg_core.unet import scale_lesion_uptake

    x, y = _disc_batch()
    xo = scale_lesion_uptake(x, y, torch.Generator().manual_seed(5), fraction=1.0, low=0.5)
    u = torch.rand((2, 2), generator=torch.Generator().manual_seed(5))
    a = 0.5 + 0.5 * float(u[0, 1])  # the factor drawn for sample 0
    # inside the lesion: background 0.04 + a * excess 0.10; the background is left alone
    assert xo[0, 0, 10:14, 10:14] == pytest.approx(torch.full((4, 4), 0.04 + a * 0.10), abs=1e-6)
    assert torch.equal(xo[0, 0, :6], x[0, 0, :6]) and torch.equal(xo[0, 1], x[0, 1])
    assert torch.equal(xo[1], x[1])  # no tumour: unchanged
    assert torch.equal(x[0, 0, 12, 12], torch.tensor(0.14))  # the input is not modified
    # low = 1: nothing changes; fraction 0: nothing changes
    assert torch.equal(scale_lesion_uptake(x, y, torch.Generator().manual_seed(5), 1.0, 1.0), x)
    assert torch.equal(scale_lesion_uptake(x, y, torch.Generator().manual_seed(5), 0.0, 0.5), x)
    # low = 0 and the draw at its lower end: the lesion sinks to the background
    g = torch.Generator().manual_seed(5)
    xo0 = scale_lesion_uptake(x, y, g, fraction=1.0, low=0.0)
    assert float(xo0[0, 0, 12, 12]) == pytest.approx(0.04 + float(u[0, 1]) * 0.10, abs=1e-6)


def test_scale_lesion_uptake_blurred_halo_and_ring_background():
    from wsseg_core.unet import scale_lesion_uptake

    x, y = _disc_batch()
    # a halo of spilled uptake one pixel outside the lesion (PET 0.09), inside the 2-pixel halo
    x[0, 0, 9, 10:14] = 0.09
    xo = scale_lesion_uptake(x, y, torch.Generator().manual_seed(5), fraction=1.0, low=0.0)
    a = float(torch.rand((2, 2), generator=torch.Generator().manual_seed(5))[0, 1])
    # pixel (9, 12): the mask dilated by 2 covers rows 8-15, so its 5x5 box (rows 7-11) holds
    # 20 of 25 dilated pixels -> w = 0.8, and its excess 0.05 is scaled by 1 - 0.8 (1 - a)
    assert float(xo[0, 0, 9, 12]) == pytest.approx(0.09 - 0.8 * (1 - a) * 0.05, abs=1e-6)
    # pixel (6, 12): 4 rows off the lesion, its box (rows 4-8) holds one dilated row -> w = 0.2;
    # it is at the background, so nothing to scale
    assert float(xo[0, 0, 6, 12]) == pytest.approx(0.04, abs=1e-7)
    # a brighter ring moves the background b up: the lesion is scaled towards b
    x2, y2 = _disc_batch()
    x2[0, 0] = 0.06
    x2[0, 0, 10:14, 10:14] = 0.14
    xo2 = scale_lesion_uptake(x2, y2, torch.Generator().manual_seed(5), fraction=1.0, low=0.0)
    assert float(xo2[0, 0, 12, 12]) == pytest.approx(0.06 + a * 0.08, abs=1e-6)
    with pytest.raises(ValueError):
        scale_lesion_uptake(x, y, None, fraction=1.5)


# --------------------------------------------------------------------------------------------------
# Lesion copy-paste augmentation (paste_lesions)
# --------------------------------------------------------------------------------------------------

def test_paste_lesions_adds_the_donor_excess_and_mask_at_a_body_pixel_by_hand():
    from wsseg_core.unet import paste_lesions

    x, y = _disc_batch()  # sample 0: a 4x4 lesion at 0.14 over 0.04; sample 1: tumour-free
    # sample 1's body: only the left half has CT > 0.3 (the right half is air, CT 0)
    x[1, 1, :, 12:] = 0.0
    xo, yo = paste_lesions(x, y, torch.Generator().manual_seed(0), fraction=1.0)
    # sample 0 has no other donor: unchanged
    assert torch.equal(xo[0], x[0]) and torch.equal(yo[0], y[0])
    # sample 1 got the 16-pixel mask, centred on a body pixel, and +0.10 PET inside it
    assert int(yo[1].sum()) == 16
    r, c = yo[1].nonzero(as_tuple=True)
    assert int(r.max() - r.min()) == 3 and int(c.max() - c.min()) == 3  # the same 4x4 square
    assert xo[1, 0][yo[1] > 0] == pytest.approx(torch.full((16,), 0.14), abs=1e-6)
    # the added uptake is the donor's excess: 0.10 on 16 pixels (the halo had none)
    assert float((xo[1, 0] - x[1, 0]).sum()) == pytest.approx(1.6, abs=1e-5)
    assert torch.equal(xo[1, 1], x[1, 1])  # CT untouched
    # the centre drawn is the documented one: body pixels in row-major order, 3rd uniform
    u = torch.rand((2, 3), generator=torch.Generator().manual_seed(0))
    body = (x[1, 1] > 0.3).flatten().nonzero()[:, 0]
    k = int(body[int(u[1, 2] * len(body)) % len(body)])
    assert x[1, 1, k // 24, k % 24] > 0.3  # a body pixel
    # the donor's rows / columns 10-13 have the rounded centre 12 (half to even), which lands on k
    assert (int(r.min()), int(c.min())) == (k // 24 - 2, k % 24 - 2)
    # fraction 0: nothing changes
    x0, y0 = paste_lesions(x, y, torch.Generator().manual_seed(0), fraction=0.0)
    assert torch.equal(x0, x) and torch.equal(y0, y)


def test_paste_lesions_and_uptake_enter_the_fingerprint_only_when_given():
    import inspect

    from jobs.ray_train import run_fingerprint
    from jobs.train_unet import UNET_JOB_PRESETS, fit_unet

    sig = inspect.signature(fit_unet).parameters
    cfg = {k: v for k, v in UNET_JOB_PRESETS["small"].items()
           if k not in ("lesion_paste", "lesion_uptake")}
    base = run_fingerprint(cfg, metric="val_best_dice", mode="max")
    for key, val in (("lesion_paste", 0.5), ("lesion_uptake", [0.5, 0.5])):
        assert sig[key].default is None
        other = run_fingerprint({**cfg, key: val}, metric="val_best_dice", mode="max")
        assert other["digest"] != base["digest"] and other["fields"][key] == val


def test_threshold_grid_reaches_past_0_1_and_0_9_and_travels_in_the_job_config(monkeypatch):
    import jobs.train_unet as T
    from wsseg_core.data import StudyRef
    from wsseg_core.unet import THRESHOLD_GRID

    # issue 23, fourth round: the validation choice sat on 0.1 or 0.9 in 9 of 12 bench runs
    assert min(THRESHOLD_GRID) < 0.1 and max(THRESHOLD_GRID) > 0.9
    assert list(THRESHOLD_GRID) == sorted(THRESHOLD_GRID) and 0.5 in THRESHOLD_GRID
    seen = {}

    def fake_fit(loop, config, **kw):
        seen.update(config)
        return {"checkpoint": None}

    monkeypatch.setattr(T, "fit_and_keep_best", fake_fit)
    ref = StudyRef(patient_id="P", study_id="S", suv_path="/x/suv.nii.gz", ct_path="/x/ct.nii.gz",
                   seg_path="/x/seg.nii.gz", split="train")
    T.fit_unet([ref], [ref], "/tmp/unused", **T.preset_kwargs("small"), context=1,
               lesion_uptake=(0.5, 0.5), lesion_paste=0.2)
    # the grid the epochs are ranked on is in the config, so a changed grid changes the fingerprint
    assert seen["threshold_grid"] == list(THRESHOLD_GRID)
    assert seen["context"] == 1 and seen["lesion_uptake"] == [0.5, 0.5] and seen["lesion_paste"] == 0.2
    seen.clear()
    T.fit_unet([ref], [ref], "/tmp/unused", **T.preset_kwargs("small"))
    assert not {"context", "lesion_uptake", "lesion_paste"} & set(seen)  # defaults add no key
