"""Tests of wsseg_core.cams: hand-derived references, pytorch-grad-cam agreement, exactness of the
ScoreCAM speed-ups, batch independence, probabilities and state hygiene.

Every model here is a tiny stand-in with the SliceClassifier interface
(forward_features / logits_from_features / fc), so the tests run in seconds on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsseg_core.cams import (
    CAM_METHODS,
    CamEngine,
    CamResult,
    combine,
    gradcampp_weights,
    normalize_maps,
    scorecam_weights,
    upsample_cam,
)


class IdentityNet(nn.Module):
    """A = ReLU(x): the activation maps are the input itself, so every CAM is derivable by hand."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.fc.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.forward_features(x))


class SmallNet(nn.Module):
    """Three conv layers, last ReLU is a module (pytorch-grad-cam hooks it); (B,2,32,32) -> (B,K,8,8)."""

    def __init__(self, k: int = 12, seed: int = 0, fc_scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, k, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(k, 2)
        with torch.no_grad():
            self.fc.weight.mul_(fc_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.forward_features(x))


def _dead_net(seed: int = 1) -> SmallNet:
    """SmallNet whose last conv has dead channels (bias -10) and one constant non-zero channel."""
    net = SmallNet(k=12, seed=seed, fc_scale=3.0)
    conv = net.features[6]
    with torch.no_grad():
        conv.bias[[0, 3, 4, 7, 9]] = -10.0
        conv.weight[5].zero_()
        conv.bias[5] = 1.0
    return net.eval()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def _minmax(m: np.ndarray) -> np.ndarray:
    rng = m.max() - m.min()
    return np.zeros_like(m) if rng == 0 else (m - m.min()) / rng


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


# ----------------------------------------------------------------------------- hand-derived


W = np.array([[0.3, -0.7], [1.5, -0.8]])  # fc.weight: row 1 = tumour
BIAS = np.array([0.1, -0.2])


def _hand_input() -> np.ndarray:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 2, 4, 4))
    x[1, 1] = -np.abs(x[1, 1]) - 0.1  # slice 1: channel 1 dead after ReLU -> blank masked input
    return x.astype(np.float32)


def _np_logits(x: np.ndarray) -> np.ndarray:
    """Numpy forward of IdentityNet for one slice (2,4,4) -> (2,)."""
    return W @ np.maximum(x, 0).mean(axis=(1, 2)) + BIAS


def test_hand_derived_cam_gradcam_gradcampp_scorecam() -> None:
    x = _hand_input()
    res = CamEngine(IdentityNet(W, BIAS))(torch.from_numpy(x))
    assert isinstance(res, CamResult)
    hw = 16
    for b in range(2):
        a = np.maximum(x[b].astype(np.float64), 0)
        cam = W[1, 0] * a[0] + W[1, 1] * a[1]
        np.testing.assert_allclose(res.raw["CAM"][b], cam, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.maps["CAM"][b], _minmax(cam), atol=1e-5)

        g = W[1] / hw  # dS/dA_k of GAP + linear, spatially constant
        grad = np.maximum(g[0] * a[0] + g[1] * a[1], 0)
        np.testing.assert_allclose(res.raw["GradCAM"][b], grad, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.maps["GradCAM"][b], _minmax(np.maximum(cam, 0)), atol=1e-5)

        alpha = g**2 / (2 * g**2 + a.sum(axis=(1, 2)) * g**3)
        wpp = hw * alpha * np.maximum(g, 0)
        gpp = np.maximum(wpp[0] * a[0] + wpp[1] * a[1], 0)
        np.testing.assert_allclose(res.raw["GradCAM++"][b], gpp, rtol=1e-5, atol=1e-7)

        scores = []
        for k in range(2):
            rng = a[k].max() - a[k].min()
            mask = np.zeros_like(a[k]) if rng == 0 else (a[k] - a[k].min()) / rng
            scores.append(_np_logits(x[b] * mask)[1])
        alpha_s = _softmax(np.array(scores))
        sc = np.maximum(alpha_s[0] * a[0] + alpha_s[1] * a[1], 0)
        np.testing.assert_allclose(res.raw["ScoreCAM"][b], sc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.maps["ScoreCAM"][b], _minmax(sc), atol=1e-5)
    # slice 1's dead channel scored the blank input: its logit is the bias
    assert np.isclose(_np_logits(np.zeros((2, 4, 4)))[1], BIAS[1])


def test_hand_derived_prob_score() -> None:
    """score='prob': dp1/dA_k = p1 p0 (w1k - w0k)/hw, ScoreCAM uses masked-input probabilities."""
    x = _hand_input()
    res = CamEngine(IdentityNet(W, BIAS), score="prob")(torch.from_numpy(x), ("GradCAM", "ScoreCAM"))
    for b in range(2):
        a = np.maximum(x[b].astype(np.float64), 0)
        p = _softmax(_np_logits(x[b]))
        g = p[1] * p[0] * (W[1] - W[0]) / 16
        np.testing.assert_allclose(
            res.raw["GradCAM"][b], np.maximum(g[0] * a[0] + g[1] * a[1], 0), rtol=1e-4, atol=1e-8
        )
        scores = []
        for k in range(2):
            rng = a[k].max() - a[k].min()
            mask = np.zeros_like(a[k]) if rng == 0 else (a[k] - a[k].min()) / rng
            scores.append(_softmax(_np_logits(x[b] * mask))[1])
        al = _softmax(np.array(scores))
        np.testing.assert_allclose(
            res.raw["ScoreCAM"][b], np.maximum(al[0] * a[0] + al[1] * a[1], 0), rtol=1e-5, atol=1e-6
        )


def test_gradcampp_zero_denominator_gives_zero_weight() -> None:
    a = torch.ones(1, 2, 2, 2)
    g = torch.zeros(1, 2, 2, 2)
    g[0, 1] = -0.5  # 2 g^2 + sum(A) g^3 = 0.5 - 0.5 = 0
    w = gradcampp_weights(a, g)
    assert torch.equal(w, torch.zeros(1, 2))


# ----------------------------------------------------------------------------- vs pytorch-grad-cam


def _library_raw(cls, model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's low-resolution map (before its cv2 resize / min-max), via its internals."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.features[-1]
    cam = cls(model=model, target_layers=[layer])
    if hasattr(cam, "uses_gradients") and not cam.uses_gradients:
        cam.batch_size = 64
    targets = [ClassifierOutputTarget(1)] * x.shape[0]
    try:
        out = cam.activations_and_grads(x)
        if cam.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, out)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients
        grads = grads[0].numpy() if grads else None
        raw = cam.get_cam_image(x, layer, targets, acts, grads)
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.maximum(raw, 0)


@pytest.fixture(scope="module")
def small_net_and_input() -> tuple[SmallNet, torch.Tensor]:
    # fc_scale keeps gradients >> pytorch-grad-cam's GradCAM++ eps (1e-6), so eps is negligible
    net = SmallNet(k=12, seed=0, fc_scale=8.0).eval()
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(5))
    return net, x


def test_matches_pytorch_grad_cam(small_net_and_input, monkeypatch) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    net, x = small_net_and_input
    # pytorch-grad-cam's ScoreCAM upsamples with align_corners=True: compare in that configuration
    res = CamEngine(net, scorecam_align_corners=True)(x)
    for name, cls in (("GradCAM", GradCAM), ("GradCAM++", GradCAMPlusPlus), ("ScoreCAM", ScoreCAM)):
        lib = _library_raw(cls, net, x)
        ours = res.raw[name]
        assert ours.shape == lib.shape == (3, 8, 8)
        for b in range(3):
            assert lib[b].std() > 0, f"{name} slice {b}: degenerate reference map"
            r = _pearson(ours[b], lib[b])
            assert r >= 0.999, f"{name} slice {b}: r={r}"
        if name in ("GradCAM", "ScoreCAM"):  # same arithmetic: equal, not just correlated
            np.testing.assert_allclose(ours, lib, rtol=1e-4, atol=1e-6)
    # the default (align_corners=False) mask convention changes ScoreCAM only marginally
    res_default = CamEngine(net)(x, ("ScoreCAM",))
    for b in range(3):
        assert _pearson(res_default.raw["ScoreCAM"][b], res.raw["ScoreCAM"][b]) > 0.99


def test_public_api_and_upsample_match_pytorch_grad_cam(small_net_and_input) -> None:
    """End to end: grad-cam's resized output vs our normalised map through upsample_cam."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, x = small_net_and_input
    with GradCAM(model=net, target_layers=[net.features[-1]]) as cam:
        lib = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 3)
    net.zero_grad(set_to_none=True)
    ours = upsample_cam(CamEngine(net)(x, ("GradCAM",)).maps["GradCAM"], 32)
    assert ours.shape == lib.shape == (3, 32, 32) and ours.dtype == np.float32
    for b in range(3):
        assert _pearson(ours[b], lib[b]) >= 0.999


# ----------------------------------------------------------------------------- ScoreCAM exactness


def _naive_scorecam_scores(model: nn.Module, x: torch.Tensor, align_corners: bool = False) -> np.ndarray:
    """One forward per (slice, channel), no dedup, no chunking: the definition, written plainly."""
    with torch.no_grad():
        acts = model.forward_features(x)
        b, k = acts.shape[:2]
        scores = np.zeros((b, k))
        for i in range(b):
            for j in range(k):
                a = acts[i, j]
                if a.max() == a.min():
                    mask = torch.zeros(x.shape[-2:])
                else:
                    up = F.interpolate(a[None, None], size=x.shape[-2:], mode="bilinear",
                                       align_corners=align_corners)[0, 0]
                    mask = (up - up.min()) / (up.max() - up.min())
                scores[i, j] = model(x[i : i + 1] * mask)[0, 1].item()
    return scores


@pytest.fixture(scope="module")
def dead_net_and_input() -> tuple[SmallNet, torch.Tensor, torch.Tensor]:
    net = _dead_net()
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        acts = net.forward_features(x)
    return net, x, acts


def test_scorecam_dedup_and_chunking_are_exact(dead_net_and_input) -> None:
    net, x, acts = dead_net_and_input
    flat = acts.flatten(2)
    constant = flat.amax(2) == flat.amin(2)
    assert constant[:, [0, 3, 4, 5, 7, 9]].all(), "test net should have dead / constant channels"
    assert (flat[:, 5] == 1).all()  # a constant NON-zero channel: still contributes to the map

    scores = _naive_scorecam_scores(net, x)
    naive_w = np.stack([_softmax(s) for s in scores])
    naive_maps = np.maximum(np.einsum("bk,bkhw->bhw", naive_w, acts.numpy().astype(np.float64)), 0)

    for bs in (512, 7, 1):  # one chunk across all slices, odd chunks, one at a time
        w = scorecam_weights(net, x, acts, batch_size=bs).numpy()
        assert np.abs(w - naive_w).max() < 1e-5, bs
    res = CamEngine(net, scorecam_batch_size=5)(x, ("ScoreCAM",))
    assert np.abs(res.raw["ScoreCAM"] - naive_maps).max() < 1e-5
    assert np.abs(res.maps["ScoreCAM"] - np.stack([_minmax(m) for m in naive_maps])).max() < 1e-5

    for top_k in (None, 12, 40):
        res_k = CamEngine(net, scorecam_top_k=top_k)(x, ("ScoreCAM",))
        assert np.abs(res_k.maps["ScoreCAM"] - res.maps["ScoreCAM"]).max() < 1e-5, top_k


def test_channels_last_layout_gives_the_same_maps(dead_net_and_input) -> None:
    import copy

    net, x, _ = dead_net_and_input
    nchw = CamEngine(copy.deepcopy(net), channels_last=False)
    nhwc = CamEngine(copy.deepcopy(net), channels_last=True)
    assert nhwc.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = nchw(x), nhwc(x)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    for m in CAM_METHODS:
        assert np.abs(a.maps[m] - b.maps[m]).max() < 1e-5, m
    assert CamEngine(copy.deepcopy(net)).channels_last  # CPU default: on
    assert CamEngine(copy.deepcopy(net)).scorecam_batch_size == 32


def test_scorecam_top_k_softmax_over_kept_channels(dead_net_and_input) -> None:
    net, x, acts = dead_net_and_input
    top_k = 4
    w = scorecam_weights(net, x, acts, top_k=top_k).numpy()
    scores = _naive_scorecam_scores(net, x)
    var = acts.flatten(2).var(2, unbiased=False).numpy()
    for b in range(3):
        kept = np.argsort(-var[b])[:top_k]
        expect = np.zeros(12)
        expect[kept] = _softmax(scores[b, kept])
        np.testing.assert_allclose(w[b], expect, atol=1e-5)


# ----------------------------------------------------------------------------- engine behaviour


def test_batch_independence(dead_net_and_input) -> None:
    net, x, _ = dead_net_and_input
    engine = CamEngine(net)
    full = engine(x)
    for i in range(x.shape[0]):
        one = engine(x[i : i + 1])
        np.testing.assert_allclose(one.probs, full.probs[i : i + 1], atol=1e-6)
        for m in CAM_METHODS:
            assert np.abs(one.maps[m][0] - full.maps[m][i]).max() < 1e-5, m


def test_probs_logits_shapes_and_range(small_net_and_input) -> None:
    net, x = small_net_and_input
    res = CamEngine(net)(x)
    with torch.no_grad():
        logits = net(x)
    np.testing.assert_allclose(res.logits, logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.probs, torch.softmax(logits, 1)[:, 1].numpy(), atol=1e-6)
    assert res.probs.dtype == np.float32 and res.probs.shape == (3,)
    assert set(res.maps) == set(CAM_METHODS)
    for m in CAM_METHODS:
        assert res.maps[m].shape == (3, 8, 8) and res.maps[m].dtype == np.float32
        assert res.maps[m].min() >= 0 and res.maps[m].max() <= 1
    # target_class=0 explains the other class
    res0 = CamEngine(net, target_class=0)(x, ("CAM",))
    np.testing.assert_allclose(res0.probs, 1 - res.probs, atol=1e-6)
    # methods subset and empty
    assert set(CamEngine(net)(x, ("ScoreCAM", "CAM")).maps) == {"ScoreCAM", "CAM"}
    assert CamEngine(net)(x, ()).maps == {}


def test_no_state_leaks_and_inference_mode(small_net_and_input) -> None:
    net, x = small_net_and_input
    net.train()
    req = [p.requires_grad for p in net.parameters()]
    try:
        ref = CamEngine(net)(x, ("GradCAM", "GradCAM++"))
        assert net.training
        assert [p.requires_grad for p in net.parameters()] == req
        assert all(p.grad is None for p in net.parameters())
        with torch.inference_mode():
            inside = CamEngine(net)(x, ("GradCAM", "GradCAM++"))
        for m in ("GradCAM", "GradCAM++"):
            np.testing.assert_allclose(inside.maps[m], ref.maps[m], atol=1e-6)
    finally:
        net.eval()


def test_helpers_and_validation() -> None:
    maps = torch.stack([torch.full((3, 3), 2.5), torch.arange(9.0).reshape(3, 3)])
    n = normalize_maps(maps)
    assert torch.equal(n[0], torch.zeros(3, 3))
    assert n[1].min() == 0 and n[1].max() == 1
    a = torch.rand(2, 3, 4, 4)
    np.testing.assert_allclose(combine(torch.ones(2, 3), a, relu=False), a.sum(1), rtol=1e-6)
    assert (combine(-torch.ones(2, 3), a, relu=True) == 0).all()
    up = upsample_cam(np.ones((2, 4, 4), np.float32), 16)
    assert isinstance(up, np.ndarray) and up.shape == (2, 16, 16) and np.allclose(up, 1)
    assert upsample_cam(torch.ones(1, 4, 4), (8, 12)).shape == (1, 8, 12)

    net = IdentityNet(W, BIAS)
    with pytest.raises(ValueError):
        CamEngine(net, score="softmax")
    with pytest.raises(ValueError):
        CamEngine(net)(torch.zeros(1, 2, 4, 4), ("EigenCAM",))
    with pytest.raises(ValueError):
        CamEngine(net, scorecam_top_k=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(dead_net_and_input) -> None:
    net, x, _ = dead_net_and_input
    cpu = CamEngine(net)(x)
    gpu_net = _dead_net().cuda()
    # x on CPU: the engine moves it to the model's device; float32 ScoreCAM for an exact comparison
    gpu = CamEngine(gpu_net, scorecam_bf16=False)(x)
    for m in CAM_METHODS:
        assert np.abs(gpu.maps[m] - cpu.maps[m]).max() < 1e-4, m
    bf16 = CamEngine(gpu_net)(x, ("ScoreCAM",)).maps["ScoreCAM"]  # CUDA default: bf16 autocast
    for b in range(x.shape[0]):
        assert _pearson(bf16[b], cpu.maps["ScoreCAM"][b]) >= 0.99


# ----------------------------------------------------------------------------- inference rewrites


class BnNet(SmallNet):
    """SmallNet with BatchNorm after each conv and non-trivial running statistics."""

    def __init__(self, seed: int = 2) -> None:
        super().__init__(k=12, seed=seed, fc_scale=3.0)
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        layers: list[nn.Module] = []
        for m in self.features:
            layers.append(m)
            if isinstance(m, nn.Conv2d):
                bn = nn.BatchNorm2d(m.out_channels)
                with torch.no_grad():
                    bn.running_mean.uniform_(-0.3, 0.3)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.2, 0.2)
                layers.append(bn)
        assert len(convs) == 3
        self.features = nn.Sequential(*layers)
        self.eval()


def test_fold_batch_norm_is_the_same_function() -> None:
    from wsseg_core.models import build_slice_classifier, fold_batch_norm

    net = BnNet()
    x = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    folded = fold_batch_norm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3  # original untouched
    assert len(folded.features) == len(net.features)  # indices keep naming the same layers
    assert isinstance(folded.features[-1], nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.forward_features(x), net.forward_features(x),
                                   rtol=1e-5, atol=1e-5)
    # the small preset (batch norm on) too, in train mode: the copy uses the running statistics
    torch.manual_seed(0)
    clf, _ = build_slice_classifier("small")
    clf.train()
    folded = fold_batch_norm(clf)
    assert clf.training and not folded.training
    xs = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(xs), clf.eval()(xs), rtol=1e-4, atol=1e-5)


def test_engine_folds_bn_exactly_and_refolds_after_weight_updates() -> None:
    import copy

    net = BnNet()
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(4))
    engine = CamEngine(net)
    assert engine.network() is not net and engine.network() is engine.network()  # cached
    folded, plain = engine(x), CamEngine(copy.deepcopy(net), fold_bn=False)(x)
    np.testing.assert_allclose(folded.probs, plain.probs, atol=1e-5)
    for m in CAM_METHODS:
        assert np.abs(folded.maps[m] - plain.maps[m]).max() < 1e-4, m
    # an in-place update (what an optimizer step or load_state_dict does) must not leave a stale copy
    with torch.no_grad():
        net.features[0].weight.mul_(-1.0)
        net.features[1].running_mean.add_(0.5)
    after, fresh = engine(x), CamEngine(copy.deepcopy(net), fold_bn=False)(x)
    np.testing.assert_allclose(after.probs, fresh.probs, atol=1e-5)
    assert np.abs(after.probs - folded.probs).max() > 1e-3  # the update did change the answer
    for m in CAM_METHODS:
        assert np.abs(after.maps[m] - fresh.maps[m]).max() < 1e-4, m
    # a model without BatchNorm runs as it is
    plain_net = SmallNet(k=4)
    assert CamEngine(plain_net).network() is plain_net


def test_gradcampp_eps_reproduces_pytorch_grad_cam_where_it_matters() -> None:
    """Behind a GAP head g = w/(h w) is tiny; with small fc weights the library's eps = 1e-6
    dominates its alpha, so only gradcampp_eps=1e-6 matches it, and the exact form differs."""
    from pytorch_grad_cam import GradCAMPlusPlus

    net = SmallNet(k=12, seed=3, fc_scale=0.05).eval()
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(6))
    lib = _library_raw(GradCAMPlusPlus, net, x)
    compat = CamEngine(net, gradcampp_eps=1e-6)(x, ("GradCAM++",)).raw["GradCAM++"]
    exact = CamEngine(net)(x, ("GradCAM++",)).raw["GradCAM++"]
    for b in range(3):
        assert _pearson(compat[b], lib[b]) >= 0.9999
    assert min(_pearson(exact[b], lib[b]) for b in range(3)) < 0.999
    with pytest.raises(ValueError):
        CamEngine(net, gradcampp_eps=-1.0)


def test_scorecam_bf16_autocast_is_close_and_off_on_cpu(dead_net_and_input) -> None:
    net, x, _ = dead_net_and_input
    assert not CamEngine(net).scorecam_bf16  # CPU default: exact float32
    exact = CamEngine(net)(x, ("ScoreCAM",)).maps["ScoreCAM"]
    bf16 = CamEngine(net, scorecam_bf16=True)(x, ("ScoreCAM",)).maps["ScoreCAM"]
    assert not np.array_equal(bf16, exact)  # the forwards really ran in bfloat16
    for b in range(3):
        assert _pearson(bf16[b], exact[b]) >= 0.99
