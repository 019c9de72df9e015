"""Supervised 2-D U-Net baseline (Früh et al. 2.3.2): shapes, skips, paired augmentation,
checkpoints, a tiny phantom training run, whole-volume inference and the Ray Train job."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsseg_core import unet as unet_mod
from wsseg_core.models import SlicePreprocessor
from wsseg_core.unet import (N_LEVELS, UNet2D, augment_pair, build_unet, evaluate_unet,
                             fit_unet_slices, load_unet, masks_from_studies, resize_masks,
                             save_unet, segment_volume_unet)
from wsseg_core.train import make_loss


pytestmark = pytest.mark.usefixtures("two_torch_threads")


def test_paper_preset_is_64_base_and_keeps_256x256():
    torch.manual_seed(0)
    model, pre = build_unet("paper")
    assert pre.input_size == 256 and model.base == 64
    assert [m[0].out_channels for m in model.down] == [64, 128, 256, 512]
    assert model.bottleneck[0].out_channels == 1024
    model.eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 2, 256, 256))
    assert out.shape == (1, 2, 256, 256)


def test_small_preset_shapes_and_overrides():
    model, pre = build_unet("small")
    assert (model.base, pre.input_size) == (8, 64)
    assert model(torch.rand(3, 2, 64, 64)).shape == (3, 2, 64, 64)
    m2, p2 = build_unet("small", base=4, input_size=32)
    assert (m2.base, p2.input_size) == (4, 32) and m2(torch.rand(1, 2, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="16"):
        build_unet("small", input_size=40)
    with pytest.raises(ValueError, match="preset"):
        build_unet("huge")


def test_four_levels_with_a_skip_connection_at_every_level():
    model = UNet2D(base=4, input_size=32)
    assert N_LEVELS == 4 and len(model.down) == len(model.up) == len(model.upconv) == 4
    # each decoder level takes the upsampled map concatenated with the same-level encoder map
    enc = [d[0].out_channels for d in model.down]
    for dec, up, c in zip(model.up, model.upconv, reversed(enc)):
        assert up.out_channels == c and dec[0].in_channels == 2 * c and dec[0].out_channels == c
    # each conv in a double conv is conv3x3 -> BN -> ReLU
    assert [type(m) for m in model.down[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    # the skips are really used: the concatenated inputs reach the decoder at every resolution
    seen = []
    hooks = [dec.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape))) for dec in model.up]
    model(torch.rand(1, 2, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [(1, 64, 4, 4), (1, 32, 8, 8), (1, 16, 16, 16), (1, 8, 32, 32)]


def _square_batch(n=16, s=64):
    x = torch.zeros(n, 2, s, s)
    y = torch.zeros(n, s, s, dtype=torch.int64)
    rng = np.random.default_rng(0)
    for i in range(n):
        a, b = rng.integers(12, 40, size=2)
        x[i, 0, a:a + 12, b:b + 12] = 0.9
        x[i, 1, a - 4:a + 16, b - 4:b + 16] = 0.5  # a CT structure around it
        y[i, a:a + 12, b:b + 12] = 1
    return x, y


def test_augment_pair_keeps_image_and_mask_aligned():
    x, y = _square_batch()
    gen = torch.Generator().manual_seed(3)
    xa, ya = augment_pair(x, y, gen)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.int64
    assert set(ya.unique().tolist()) <= {0, 1}
    assert not torch.equal(ya, y)  # it did move
    bright = xa[:, 0] > 0.5
    m = ya == 1
    iou = (bright & m).sum(dim=(1, 2)).float() / (bright | m).sum(dim=(1, 2)).float()
    assert float(iou.min()) > 0.8, iou
    # CT is warped but its values are not gamma-changed; outside is filled with 0 in both
    assert float(xa[:, 1].max()) <= 0.5 + 1e-6
    # deterministic for a generator state
    xb, yb = augment_pair(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_masks_from_studies_resizes_seg_by_nearest():
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    shape = (32, 32, 6)
    seg = np.zeros(shape, np.uint8)
    seg[8:16, 8:16, 2] = 1
    st = SimpleNamespace(suv=rng.uniform(0, 3, shape).astype(np.float32),
                         ct=rng.uniform(-1000, 500, shape).astype(np.float32), seg=seg)
    pre = SlicePreprocessor(input_size=16)
    x, y = masks_from_studies([st, SimpleNamespace(suv=st.suv, ct=st.ct, seg=None)], pre)
    assert x.shape == (6, 2, 16, 16) and y.shape == (6, 16, 16) and y.dtype == torch.int64
    assert int(y[2].sum()) == 16 and y[2, 4:8, 4:8].all() and int(y.sum()) == 16
    x, y = masks_from_studies([st], pre, negative_keep=0.01, generator=torch.Generator().manual_seed(0))
    assert 1 <= len(y) < 6 and int(y.sum()) == 16  # the tumour slice is always kept
    assert resize_masks(np.ones((1, 16, 16), np.uint8), 16).dtype == torch.int64


def test_save_load_roundtrip_is_weights_only_and_atomic(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, pre = build_unet("small", base=4, input_size=32)
    model(torch.rand(4, 2, 32, 32))  # move BN running stats off their defaults
    path = tmp_path / "models" / "unet.pt"
    save_unet(path, model, pre, meta={"epoch": 3, "val_dice": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["unet.pt"]  # no temp file left behind
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    m2, p2, meta = load_unet(path)
    assert calls and calls[0].get("weights_only") is True
    assert p2 == pre and meta == {"epoch": 3, "val_dice": 0.5} and not m2.training
    model.eval()
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), m2(x))
    with pytest.raises(ValueError, match="JSON"):
        save_unet(path, model, pre, meta={"bad": object()})
    bad = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="other.pt"):
        load_unet(bad)
    with pytest.raises(ValueError, match="not found"):
        load_unet(tmp_path / "missing.pt")


def test_segment_volume_unet_returns_uint8_on_the_suv_grid():
    torch.manual_seed(0)
    model, pre = build_unet("small", base=4, input_size=32)
    model.train()
    suv = np.random.default_rng(0).uniform(0, 5, (40, 36, 11)).astype(np.float32)
    ct = np.zeros_like(suv)
    mask = segment_volume_unet(model, pre, suv, ct, batch_size=4)
    assert mask.shape == suv.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert model.training  # mode restored
    # slice z of the mask is the upsampled prediction of slice z alone (batching does not matter)
    one = segment_volume_unet(model, pre, suv[:, :, 5:6], ct[:, :, 5:6])
    assert np.array_equal(one[:, :, 0], mask[:, :, 5])


@pytest.mark.slow
def test_tiny_phantom_training_reaches_a_positive_validation_dice():
    """A few CPU epochs on 64x64x32 phantoms: the validation pixel Dice leaves ~0 and the trained
    model segments a whole study on its own grid."""
    from wsseg_core.phantom import make_phantom_study

    torch.manual_seed(0)
    studies = [make_phantom_study(seed=s, shape=(64, 64, 32)) for s in range(6)]
    model, pre = build_unet("small")
    gen = torch.Generator().manual_seed(0)
    tr = masks_from_studies(studies[:4], pre, negative_keep=0.5, generator=gen)
    va = masks_from_studies(studies[4:], pre)
    assert int(va[1].sum()) > 0
    before = evaluate_unet(model, *va, make_loss(7.7))
    t0 = time.perf_counter()
    hist = fit_unet_slices(model, tr, va, epochs=8, batch_size=32, lr=1e-2, seed=0)
    seconds = time.perf_counter() - t0
    dices = [h["val_dice"] for h in hist]
    print(f"U-Net tiny fit: {len(tr[1])} train slices, 8 epochs in {seconds:.1f} s; val Dice "
          f"{before['dice']:.3f} -> {[round(d, 3) for d in dices]}")
    assert max(dices) > 0.1 and max(dices) > 2 * before["dice"]
    mask = segment_volume_unet(model, pre, studies[4].suv, studies[4].ct)
    assert mask.shape == studies[4].suv.shape and mask.dtype == np.uint8 and mask.any()


@pytest.mark.slow
def test_fit_unet_through_ray_train_writes_a_loadable_model(tmp_path, ray_cluster):
    from jobs.train_unet import fit_unet, unet_path
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=3, shape=(48, 48, 16), seed=2,
                                negative_fraction=0.0)
    t0 = time.perf_counter()
    # input_size left at its default, "native": the 48x48 slices' own grid, trained on 16x16 windows.
    res = fit_unet(refs[:2], refs[2:], tmp_path / "out", model_preset="small",
                   base=4, epochs=2, batch_size=16, lr=1e-3, num_workers=1, cpus_per_worker=1.0,
                   max_failures=0, schedule="cosine", crop=16,
                   check_steps=None)  # every epoch checked (the interval: test_unet_checks.py)
    print(f"fit_unet through Ray Train (2 epochs): {time.perf_counter() - t0:.1f} s")
    assert Path(res["checkpoint"]) == unet_path(tmp_path / "out") and Path(res["checkpoint"]).is_file()
    assert [int(h["epoch"]) for h in res["history"]] == [0, 1]
    model, pre, meta = load_unet(res["checkpoint"])
    assert isinstance(model, UNet2D) and (model.base, pre.input_size) == (4, 48)
    assert meta["epoch"] in (0, 1) and "val_dice" in meta
    # Issue 23: the kept epoch is the one with the best pooled Dice over the threshold grid.
    kept = max(res["history"], key=lambda h: h["val_best_dice"])
    assert meta["epoch"] == kept["epoch"] and 0 <= meta["val_best_dice"] <= 1
    # The threshold search writes the entry the scorer reads.
    import json

    from jobs.train_unet import tune_threshold

    entry = tune_threshold(refs[2:], tmp_path / "out", refs[:2])
    saved = json.loads((tmp_path / "out" / "thresholds.json").read_text())["methods"]["UNet"]
    assert saved["threshold"] == entry["threshold"] and 0 < entry["threshold"] < 1
    assert entry["rule"] == "pooled" and "pooled" in entry["selected_on"]
    assert entry["n"] == 1 and set(entry["by_threshold"]) == {"0.02", "0.05", "0.1", "0.2", "0.3",
                                                             "0.4", "0.5", "0.6", "0.7", "0.8",
                                                             "0.9", "0.95", "0.98"}


def test_module_never_imports_ray():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(unet_mod))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "ray" for n in names)
