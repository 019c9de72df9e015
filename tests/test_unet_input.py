"""Issue 23, third round: the U-Net's PET input encoding (log transform, augmentation without the
PET gamma), checked against hand-computed values and an independent recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from wsseg_core.train import PET_GAMMA_RANGE
from wsseg_core.unet import UNet2D, augment_pair, build_unet, load_unet, pet_log_transform, save_unet


def test_pet_log_transform_matches_hand_values():
    p = torch.tensor([0.0, 0.05, 0.5, 1.0])
    out = pet_log_transform(p, 20.0)
    # log(1 + 20 p) / log(21): p = 0.05 (SUV 1 of 20) -> log 2 / log 21 = 0.693147 / 3.044522
    expected = [0.0, 0.6931472 / 3.0445224, 2.3978953 / 3.0445224, 1.0]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)
    # SUV 2 vs 1 (a faint lesion over a background) differ by 0.05 of the linear channel but by
    # log(3 / 2) / log 21 = 0.1332 after the transform
    d = pet_log_transform(torch.tensor([0.10]), 20.0) - pet_log_transform(torch.tensor([0.05]), 20.0)
    assert float(d) == pytest.approx(math.log(1.5) / math.log(21.0), abs=1e-6)


def test_unet_pet_log_is_the_linear_network_on_the_transformed_input(tmp_path):
    torch.manual_seed(0)
    logm = UNet2D(base=4, input_size=32, pet_log=20.0).eval()
    lin = UNet2D(base=4, input_size=32).eval()
    lin.load_state_dict(logm.state_dict())
    x = torch.rand(2, 2, 32, 32)
    xt = x.clone()
    xt[:, 0] = torch.log1p(20.0 * x[:, 0]) / math.log(21.0)
    with torch.no_grad():
        assert torch.allclose(logm(x), lin(xt), atol=1e-6)
        assert not torch.allclose(logm(x), lin(x), atol=1e-3)
    # the setting travels with the checkpoint, and old checkpoints (no key) load as linear
    model, pre = build_unet("small", base=4, input_size=32, pet_log=20.0)
    assert model.pet_log == 20.0 and build_unet("small", base=4, input_size=32)[0].pet_log == 0.0
    save_unet(tmp_path / "u.pt", model, pre)
    m2, _, _ = load_unet(tmp_path / "u.pt")
    assert m2.pet_log == 20.0
    with pytest.raises(ValueError, match="pet_log"):
        UNet2D(base=4, input_size=32, pet_log=-1.0)


def test_augment_pair_without_gamma_is_the_same_warp_without_the_pet_power():
    torch.manual_seed(1)
    x = torch.rand(3, 2, 32, 32)
    y = (torch.rand(3, 32, 32) > 0.8).long()
    xg, yg = augment_pair(x, y, torch.Generator().manual_seed(7))
    xn, yn = augment_pair(x, y, torch.Generator().manual_seed(7), pet_gamma=False)
    assert torch.equal(yg, yn)  # the same geometric draw
    assert torch.allclose(xg[:, 1], xn[:, 1], atol=1e-6)  # CT never gets the gamma
    # the gamma of each sample, recomputed from the generator's documented draws (5 per sample)
    u = torch.rand((3, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lg0, lg1 = math.log(PET_GAMMA_RANGE[0]), math.log(PET_GAMMA_RANGE[1])
    gamma = torch.exp(lg0 + (lg1 - lg0) * u[:, 4]).float().view(3, 1, 1)
    assert torch.allclose(xn[:, 0].clamp(0, 1).pow(gamma), xg[:, 0], atol=1e-5)
    assert not torch.allclose(xn[:, 0], xg[:, 0], atol=1e-3)


def test_pet_gamma_off_enters_the_training_fingerprint_and_the_default_adds_no_key():
    from jobs.ray_train import run_fingerprint
    from jobs.train_unet import UNET_JOB_PRESETS, fit_unet

    # both presets keep the classifier's gamma (docs/UNET_EXPERIMENTS.md, "U-Net: third round": mixed across cohorts)
    assert UNET_JOB_PRESETS["small"]["pet_gamma"] is True
    assert UNET_JOB_PRESETS["paper"]["pet_gamma"] is True
    import inspect
    assert inspect.signature(fit_unet).parameters["pet_gamma"].default is True
    cfg = {k: v for k, v in UNET_JOB_PRESETS["small"].items() if k != "pet_gamma"}
    default = run_fingerprint(cfg, metric="val_best_dice", mode="max")
    off = run_fingerprint({**cfg, "pet_gamma": False}, metric="val_best_dice", mode="max")
    assert off["digest"] != default["digest"]  # a rerun with the gamma off retrains
    assert off["fields"]["pet_gamma"] is False and "pet_gamma" not in default["fields"]
