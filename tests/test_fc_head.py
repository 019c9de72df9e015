"""The classifier's two heads (issue 18 item 1).

Under the GAP + linear head GradCAM is ReLU(CAM) up to normalisation, so the paper's CAM-vs-GradCAM
contrast cannot appear; the "fc" head (VGG16's classifier over the last conv map, as in the authors'
code) makes the gradients vary over the map, and classic CAM undefined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsseg_core.cams import CamEngine, CamUndefined, available_methods, normalize_maps
from wsseg_core.models import (SliceClassifier, build_slice_classifier, load_classifier,
                               save_classifier)

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _small(head: str, seed: int = 0) -> SliceClassifier:
    torch.manual_seed(seed)
    model, _ = build_slice_classifier("small", head=head)
    return model.eval()


def test_fc_head_is_torchvision_vgg16s_classifier_with_the_imagenet_layers_loaded(tmp_path):
    """Independent reference: torchvision's own VGG16 avgpool + classifier modules, fed the same
    last conv map after VGG's last max-pool, with the same state dict loaded."""
    from torchvision.models import vgg16

    torch.manual_seed(1)
    tv = vgg16().eval()  # random weights, torchvision's layout
    path = tmp_path / "vgg16.pth"
    torch.save(tv.state_dict(), path)
    model, _ = build_slice_classifier("paper", weights=str(path), head="fc")
    model.eval()
    assert model.fc is None and model.head == "fc"
    assert torch.equal(model.classifier[0].weight, tv.classifier[0].weight)
    assert torch.equal(model.classifier[3].bias, tv.classifier[3].bias)
    a = torch.rand(2, 512, 32, 32)  # the paper preset's last map at 256x256
    with torch.no_grad():
        hidden_tv = tv.classifier[:6](torch.flatten(tv.avgpool(F.max_pool2d(a, 2, 2)), 1))
        ours = model.logits_from_features(a)
        hidden_ours = model.classifier[:6](torch.flatten(
            F.adaptive_avg_pool2d(F.max_pool2d(a, 2, 2), 7), 1))
    torch.testing.assert_close(hidden_ours, hidden_tv)
    torch.testing.assert_close(ours, model.classifier[6](hidden_tv))
    assert ours.shape == (2, 2)


def test_gap_head_gradcam_is_normalised_relu_of_cam():
    """The identity the README states: dS/dA_k = w_k / (h w) under GAP + linear."""
    model = _small("gap")
    x = torch.rand(4, 2, 64, 64)
    res = CamEngine(model)(x, ("CAM", "GradCAM"))
    relu_cam = normalize_maps(torch.from_numpy(res.raw["CAM"]).clamp_min(0)).numpy()
    np.testing.assert_allclose(res.maps["GradCAM"], relu_cam, atol=1e-5)


class _PositiveMapModel(torch.nn.Module):
    """The small fc head over a last "conv map" A = |x| + 0.1: strictly positive with distinct
    values, so no max-pool tie or ReLU kink sits exactly at A and finite differences are exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # a narrow fc head (K = 16 maps, 128 hidden) keeps the loop short
        self.inner = SliceClassifier(width=1 / 32, input_size=64, head="fc").double().eval()
        self.head = "fc"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() + 0.1

    def logits_from_features(self, a: torch.Tensor) -> torch.Tensor:
        return self.inner.logits_from_features(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.forward_features(x))


def test_fc_head_gradcam_uses_the_true_gradient_and_cam_is_undefined():
    """GradCAM weights under the fc head against central finite differences of the tumour logit
    with respect to every element of A (float64), not against autograd."""
    assert available_methods(_small("fc")) == ("GradCAM", "GradCAM++", "ScoreCAM")
    assert available_methods(_small("gap")) == ("CAM", "GradCAM", "GradCAM++", "ScoreCAM")
    model = _PositiveMapModel().eval()
    engine = CamEngine(model, fold_bn=False, channels_last=False)
    torch.manual_seed(5)
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)  # A itself: K = 16 maps of 8x8
    with pytest.raises(CamUndefined, match="global-average-pooling head"):
        engine(x, ("CAM", "GradCAM"))
    res = engine(x, ("GradCAM",))
    with torch.no_grad():
        a = model.forward_features(x)
        eps = 1e-7
        flat = a.flatten()
        grad = torch.empty_like(flat)
        for i in range(flat.numel()):
            up, down = flat.clone(), flat.clone()
            up[i] += eps
            down[i] -= eps
            grad[i] = (model.logits_from_features(up.view_as(a))[0, 1]
                       - model.logits_from_features(down.view_as(a))[0, 1]) / (2 * eps)
    weights = grad.view_as(a).mean(dim=(2, 3))
    expect = torch.einsum("bk,bkhw->bhw", weights, a).clamp_min(0)
    np.testing.assert_allclose(res.raw["GradCAM"], expect.numpy(), rtol=1e-5, atol=1e-12)
    # The gradient is not constant over the map (it is under GAP): the head matters.
    g = grad.view_as(a)[0]
    assert float((g - g.mean(dim=(1, 2), keepdim=True)).abs().max()) > 1e-6


def test_fc_head_round_trips_and_old_checkpoints_load_as_gap(tmp_path):
    model = _small("fc", seed=3)
    _, pre = build_slice_classifier("small")
    save_classifier(tmp_path / "c.pt", model, pre)
    back, _, _ = load_classifier(tmp_path / "c.pt")
    assert back.head == "fc"
    x = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    # A checkpoint without "head" in its config (written before the option) is a GAP network.
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    gap = _small("gap", seed=4)
    save_classifier(tmp_path / "g.pt", gap, pre)
    g = torch.load(tmp_path / "g.pt", weights_only=True)
    del g["config"]["head"]
    torch.save(g, tmp_path / "g_old.pt")
    assert load_classifier(tmp_path / "g_old.pt")[0].head == "gap"
    assert ckpt["config"]["head"] == "fc"


def test_unknown_head_is_a_clear_error():
    with pytest.raises(ValueError, match="head must be one of"):
        SliceClassifier(width=0.125, input_size=64, head="mlp")


def test_scoring_under_the_fc_head_writes_skipped_cam_rows(ray_cluster, tmp_path, scoring_study):
    """CAM gets `status = "skipped"` rows that say why; the other methods are scored; the study
    counts as ok, and the statistics leave the skipped rows out."""
    import pandas as pd

    from jobs.common import RunLayout
    from jobs.analyze import analyze
    from jobs.score_cohort import score
    from jobs.common import write_manifest
    from wsseg_core.thresholds import update_thresholds
    from wsseg_core.stats import summarize

    ref, _ = scoring_study
    layout = RunLayout(tmp_path / "out")
    layout.classifier.parent.mkdir(parents=True)
    model = _small("fc")
    _, pre = build_slice_classifier("small")
    save_classifier(layout.classifier, model, pre)
    thresholds = {"GradCAM": {"t": 0.5, "q": 40.0}, "Threshold": {"q": 40.0}}
    res = score([ref], layout.out, thresholds, methods=["CAM", "GradCAM", "Threshold"],
                concurrency=1, cam_batch_size=16, flag_threshold=0.0)
    assert (res["ok_studies"], res["failed_studies"]) == (1, 0)
    df = pd.read_parquet(layout.metrics).set_index("method")
    assert df.loc["CAM", "status"] == "skipped"
    assert "global-average-pooling head" in df.loc["CAM", "error"]
    assert pd.isna(df.loc["CAM", "mask_path"])
    assert list(df.loc[["GradCAM", "Threshold"], "status"]) == ["ok", "ok"]
    assert set(summarize(df.reset_index())["method"]) == {"GradCAM", "Threshold"}
    # The analysis (tables, figures, CAM overlays of the methods the head defines) runs on them.
    write_manifest([ref], layout.cohort)
    update_thresholds(layout.thresholds, thresholds)
    res = analyze(layout.out, split="all")
    assert set(res["summary"]["method"]) == {"GradCAM", "Threshold"}
    assert any("cam_" in Path(f).name for f in res["figures"])
