"""Slice classifier: architecture, preprocessing, pretrained weight mapping, checkpoints."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from wsseg_core import models
from wsseg_core.models import (PRESETS, SliceClassifier, SlicePreprocessor, build_slice_classifier,
                               load_classifier, save_classifier, volume_to_batch)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


def test_paper_preset_map_is_32x32x512():
    model, pre = build_slice_classifier("paper")
    assert pre.input_size == 256 and model.width == 1.0 and model.input_size == 256
    assert model.num_channels_last == 512
    convs = model.conv_layers()
    assert len(convs) == 13
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features) == 3
    # no BN, ends on the last conv's ReLU (what CAM hooks expect)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.features[-1], torch.nn.ReLU)
    with torch.inference_mode():
        a = model.forward_features(torch.rand(1, 2, 256, 256))
        logits = model.logits_from_features(a)
    assert a.shape == (1, 512, 32, 32)
    assert logits.shape == (1, 2)
    assert model.fc.in_features == 512 and model.fc.out_features == 2


def test_small_preset_map_is_16x16x64_and_cam_identity():
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small")
    assert PRESETS["small"] == dict(width=0.125, input_size=64, batch_norm=True, map_stride=4)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features) == 2 and model.atrous
    assert pre.input_size == 64 and model.num_channels_last == 64
    assert model.batch_norm and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.features) == 13
    assert [c.out_channels for c in model.conv_layers()] == [8, 8, 16, 16, 32, 32, 32] + [64] * 6
    model.eval()
    x = torch.rand(3, 2, 64, 64)
    with torch.no_grad():
        a = model.forward_features(x)
        logits = model(x)
    assert a.shape == (3, 64, 16, 16)
    assert torch.allclose(logits, model.logits_from_features(a))
    # classic CAM: the mean of M_c = sum_k w_k A_k plus the bias is exactly the class logit
    cam = torch.einsum("k,bkhw->bhw", model.fc.weight[1], a)
    assert torch.allclose(cam.mean(dim=(1, 2)) + model.fc.bias[1], logits[:, 1], atol=1e-5)


def test_map_stride_4_drops_only_the_last_pool_and_round_trips(tmp_path):
    """Stride 4 removes the pool before the last block: same 13 convs (so ImageNet weights still
    fit), a map of S/4; the paper preset keeps S/8; a checkpoint restores the stride, and one
    written before the option existed loads as stride 8."""
    paper = SliceClassifier(width=0.125, input_size=64, map_stride=8)
    fine = SliceClassifier(width=0.125, input_size=64, map_stride=4)
    def layers(net):
        return [type(m).__name__ for m in net.features if not isinstance(m, torch.nn.MaxPool2d)]

    assert layers(paper) == layers(fine)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in fine.features) == 2  # paper: 3
    x = torch.rand(1, 2, 64, 64)
    assert paper.forward_features(x).shape[-1] == 8 and fine.forward_features(x).shape[-1] == 16
    assert build_slice_classifier("paper")[0].map_stride == 8
    assert build_slice_classifier("small", map_stride=4)[0].map_stride == 4  # --map-stride 4
    with pytest.raises(ValueError, match="map_stride"):
        SliceClassifier(map_stride=2)
    path = tmp_path / "c.pt"
    save_classifier(path, fine, SlicePreprocessor(64))
    assert load_classifier(path)[0].map_stride == 4
    save_classifier(path, paper, SlicePreprocessor(64))
    raw = torch.load(path, weights_only=True)
    del raw["config"]["map_stride"]  # as written before the option existed
    torch.save(raw, path)
    assert load_classifier(path)[0].map_stride == 8


def _cells_seeing_one_pixel(net: SliceClassifier, size: int = 192) -> int:
    """How many cells of one row of the last map change when one input pixel changes. With equal
    positive conv weights, zero biases and a constant input, every ReLU is active and every pool
    window ties, so a bump propagates to exactly the cells whose receptive field holds it."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.constant_(m.weight, 0.01)
            torch.nn.init.zeros_(m.bias)
    net.eval()
    x = torch.ones(1, 2, size, size)
    bumped = x.clone()
    bumped[0, :, size // 2, size // 2] += 1.0
    with torch.no_grad():
        d = (net.forward_features(bumped) - net.forward_features(x))[0, 0].abs()
    return int((d > 0).any(dim=1).sum())


@pytest.mark.parametrize("stride, atrous, rf", [(8, False, 99), (4, False, 71), (4, True, 95)])
def test_atrous_stride_4_keeps_the_receptive_field_of_stride_8(stride, atrous, rf):
    """Receptive field by hand (r += (k - 1) * jump per layer, jump *= 2 per pool; a conv
    dilated by 2 counts as k = 5): 4 convs r = 9; pool 10 (jump 2); 3 convs 22; pool 23 (jump 4);
    3 convs 47; then stride 8: pool 51 (jump 8), 3 convs 99; stride 4: 3 convs 71; stride 4
    atrous: 3 dilated convs 47 + 3 * 4 * 4 = 95. A pixel lies in the field of floor or ceil of
    r / jump cells of a row."""
    net = SliceClassifier(width=0.0625, input_size=64, map_stride=stride, atrous=atrous)
    assert net.forward_features(torch.zeros(1, 2, 64, 64)).shape[-1] == 64 // stride
    assert _cells_seeing_one_pixel(net) in (rf // stride, -(-rf // stride))


def test_atrous_is_the_default_at_stride_4_and_round_trips(tmp_path):
    """build_slice_classifier dilates at stride 4 unless told not to; the checkpoint records it,
    and a stride-4 checkpoint written before the option loads as the plain (undilated) network."""
    assert build_slice_classifier("small", map_stride=4)[0].atrous
    assert not build_slice_classifier("small", map_stride=4, atrous=False)[0].atrous
    assert not build_slice_classifier("small", map_stride=8)[0].atrous
    with pytest.raises(ValueError, match="atrous"):
        SliceClassifier(map_stride=8, atrous=True)
    net = SliceClassifier(width=0.125, input_size=64, map_stride=4, atrous=True)
    path = tmp_path / "c.pt"
    save_classifier(path, net, SlicePreprocessor(64))
    loaded = load_classifier(path)[0]
    assert loaded.atrous and [c.dilation for c in loaded.conv_layers()][-3:] == [(2, 2)] * 3
    x = torch.rand(1, 2, 64, 64)
    net.eval()
    assert torch.allclose(loaded(x), net(x))
    raw = torch.load(path, weights_only=True)
    del raw["config"]["atrous"]  # a --map-stride 4 checkpoint from before the option
    torch.save(raw, path)
    assert not load_classifier(path)[0].atrous


def test_width_multiplier_and_overrides():
    model, pre = build_slice_classifier("small", width=0.25, input_size=32)
    assert model.num_channels_last == 128 and pre.input_size == 32
    assert model(torch.rand(2, 2, 32, 32)).shape == (2, 2)
    assert SliceClassifier(width=0.001).num_channels_last == 1  # max(1, round(c * w))
    with pytest.raises(ValueError, match="preset"):
        build_slice_classifier("huge")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_slice_classifier("small", input_size=60)


def test_preprocessor_scaling_resize_and_roundtrip():
    pre = SlicePreprocessor(input_size=64)
    suv = np.zeros((2, 128, 128), np.float32)
    ct = np.full((2, 128, 128), -3000.0, np.float32)  # below the window: air
    suv[0] = 40.0  # above suv_max: clipped
    ct[1] = 0.0    # water: middle of [-1000, 1000]
    x = pre(suv, ct)
    assert x.dtype == torch.float32 and x.shape == (2, 2, 64, 64)
    assert torch.allclose(x[0, 0], torch.ones(64, 64)) and torch.all(x[1, 0] == 0)
    assert torch.all(x[0, 1] == 0) and torch.allclose(x[1, 1], torch.full((64, 64), 0.5))
    # antialiased downsampling averages a 1-pixel hot spot instead of dropping it
    suv2 = np.zeros((1, 128, 128), np.float32)
    suv2[0, 61, 61] = 20.0
    x2 = pre(suv2, np.zeros_like(suv2))
    assert 0 < float(x2[0, 0].max()) < 1 and float(x2[0, 0].sum()) == pytest.approx(0.25, rel=0.05)
    assert float(x2.min()) >= 0 and float(x2.max()) <= 1
    # tensors in, same answer
    assert torch.allclose(pre(torch.from_numpy(suv), torch.from_numpy(ct)), x)
    d = pre.to_dict()
    assert d == {"input_size": 64, "suv_max": 20.0, "ct_min": -1000.0, "ct_max": 1000.0,
                 "mode": "resize", "pixel_mm": None}
    assert SlicePreprocessor.from_dict(d) == pre
    # the record written before "mode" existed (the numbers only) is the same resize preprocessor
    assert SlicePreprocessor.from_dict({k: d[k] for k in ("input_size", "suv_max", "ct_min", "ct_max")}) == pre


def test_volume_to_batch_takes_axial_slices():
    pre = SlicePreprocessor(input_size=16)
    rng = np.random.default_rng(0)
    suv = rng.uniform(0, 10, (16, 16, 5)).astype(np.float32)
    ct = rng.uniform(-1000, 1000, (16, 16, 5)).astype(np.float32)
    b = volume_to_batch(suv, ct, [4, 1], pre)
    assert b.shape == (2, 2, 16, 16)
    assert torch.allclose(b[0], pre(suv[None, :, :, 4], ct[None, :, :, 4])[0])
    assert torch.allclose(b[1, 0], torch.from_numpy(suv[:, :, 1] / 20.0))
    assert volume_to_batch(suv, ct, [], pre).shape == (0, 2, 16, 16)


def test_imagenet_offline_is_an_error_that_says_how_to_supply_the_weights(monkeypatch):
    """The paper preset never starts from random weights silently (issue 18): offline, asking for
    ImageNet weights fails with a message naming the local-file and --weights random ways on."""
    import torchvision.models._api as tv_api

    from wsseg_core.models import PretrainedWeightsUnavailable, require_imagenet_weights

    def offline(*args, **kwargs):
        raise OSError("no route to host")

    # patch torchvision's own loader, so the test does not depend on network or cache state
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    for call in (lambda: build_slice_classifier("paper", weights="imagenet"), require_imagenet_weights):
        with pytest.raises(PretrainedWeightsUnavailable) as err:
            call()
        msg = str(err.value)
        assert "no route to host" in msg
        assert "--weights /path/to/vgg16-397923af.pth" in msg and "--weights random" in msg
    model, _ = build_slice_classifier("paper", weights=None)  # random, when asked for explicitly
    with torch.inference_mode():
        assert model(torch.rand(1, 2, 64, 64)).shape == (1, 2)


def test_pretrained_weights_need_width_one():
    with pytest.raises(ValueError, match="width"):
        build_slice_classifier("small", weights="imagenet")


def test_local_vgg16_state_dict_is_mapped_conv_by_conv(tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(1)
    state = vgg16().state_dict()  # random weights, torchvision's key layout
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model, _ = build_slice_classifier("paper", weights=str(path))
    convs = model.conv_layers()
    # torchvision conv indices (pools included); ours differ after the removed first pool
    tv_idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    # a conv in the middle: 7th conv, torchvision features.14, ours features.13
    assert torch.equal(convs[6].weight, state["features.14.weight"])
    assert torch.equal(convs[6].bias, state["features.14.bias"])
    for conv, i in zip(convs[1:], tv_idx[1:]):
        assert torch.equal(conv.weight, state[f"features.{i}.weight"])
    first = state["features.0.weight"]
    assert convs[0].weight.shape == (64, 2, 3, 3)
    mean = first.mean(dim=1)
    assert torch.allclose(convs[0].weight[:, 0], mean) and torch.allclose(convs[0].weight[:, 1], mean)
    assert torch.equal(convs[0].bias, state["features.0.bias"])


def test_bad_weights_file_is_a_clear_value_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth"):
        build_slice_classifier("paper", weights=str(junk))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth.*VGG16"):
        build_slice_classifier("paper", weights=str(wrong))
    with pytest.raises(ValueError, match="missing.pth"):
        build_slice_classifier("paper", weights=str(tmp_path / "missing.pth"))


def test_save_load_roundtrip_is_weights_only_and_atomic(tmp_path):
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small", input_size=32)
    pre.suv_max = 15.0
    path = tmp_path / "sub" / "clf.pt"
    save_classifier(path, model, pre, meta={"epoch": 3, "val_auc": 0.91, "note": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["clf.pt"]  # no temp file left
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["config"]["width"] == 0.125 and raw["config"]["input_size"] == 32
    m2, pre2, meta = load_classifier(path)
    assert pre2 == pre and meta == {"epoch": 3, "val_auc": 0.91, "note": "x"}
    assert not m2.training and m2.num_channels_last == model.num_channels_last
    x = torch.rand(2, 2, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), m2(x))
    with pytest.raises(ValueError, match="JSON"):
        save_classifier(path, model, pre, meta={"bad": object()})
    bad = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="other.pt"):
        load_classifier(bad)


def test_module_never_imports_ray():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(models))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "ray" for n in names)
