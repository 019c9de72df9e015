"""The exponential moving average of the classifier's weights (wsseg_core.train.WeightEMA; issue 16):
the update by hand, through the training loop, in fit_classifier."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wsseg_core.train import WeightEMA, ema_decay, fit_classifier, make_loss, train_one_epoch


pytestmark = pytest.mark.usefixtures("two_torch_threads")


def test_ema_update_by_hand_parameters_float_buffers_and_counts():
    """decay 0.5 from w0 = 1: live 3 -> 0.5 * 1 + 0.5 * 3 = 2; live 5 -> 0.5 * 2 + 0.5 * 5 = 3.5.
    BatchNorm's running mean is averaged the same way, num_batches_tracked copied."""
    lin = nn.Linear(1, 1, bias=False)
    bn = nn.BatchNorm1d(1)
    model = nn.Sequential(lin, bn)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.5)
    assert ema.module is not model and not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    with torch.no_grad():
        lin.weight.fill_(3.0)
        bn.running_mean.fill_(4.0)           # average starts at 0
        bn.num_batches_tracked.fill_(7)
    ema.update(model)
    assert ema.module[0].weight.item() == pytest.approx(2.0)
    assert ema.module[1].running_mean.item() == pytest.approx(2.0)
    assert int(ema.module[1].num_batches_tracked) == 7
    with torch.no_grad():
        lin.weight.fill_(5.0)
        bn.running_mean.fill_(0.0)
        bn.num_batches_tracked.fill_(9)
    ema.update(model)
    assert ema.module[0].weight.item() == pytest.approx(3.5)
    assert ema.module[1].running_mean.item() == pytest.approx(1.0)
    assert int(ema.module[1].num_batches_tracked) == 9 and ema.updates == 2
    assert lin.weight.item() == 5.0  # the live network is untouched
    # state round trip (what a resumed Ray run restores)
    other = WeightEMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.module[0].weight.item() == pytest.approx(3.5) and other.updates == 2
    # a DDP-style wrapper (.module) is averaged through its module
    wrapper = nn.Module()
    wrapper.module = model
    WeightEMA(wrapper, 0.5).update(wrapper)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            WeightEMA(model, bad)


def test_ema_decay_is_a_time_constant_in_epochs():
    assert ema_decay(2, 10) == pytest.approx(math.exp(-1 / 20))
    # after ema_epochs * steps updates, the weight left on the start is 1/e
    assert ema_decay(2, 45) ** 90 == pytest.approx(math.exp(-1))
    with pytest.raises(ValueError):
        ema_decay(0, 10)


def test_train_one_epoch_updates_the_ema_after_every_optimizer_step():
    """Two SGD steps (batch 2 of 4 samples, no shuffle): the average is d^2 w0 + d(1-d) w1 + (1-d) w2,
    with w1, w2 the live weights after each step (recorded by a per-step 'scheduler')."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]

    class Snap:
        def step(self):
            snaps.append({k: v.clone() for k, v in model.state_dict().items()})

    d = 0.8
    ema = WeightEMA(model, d)
    train_one_epoch(model, loader, opt, make_loss(1.0), augment=False, scheduler=Snap(), ema=ema)
    assert len(snaps) == 3 and ema.updates == 2
    w0, w1, w2 = snaps
    for k, v in ema.module.state_dict().items():
        expected = d * d * w0[k] + d * (1 - d) * w1[k] + (1 - d) * w2[k]
        torch.testing.assert_close(v, expected)
        assert not torch.allclose(w2[k], w0[k])  # the steps moved the weights


def _separable(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = (torch.arange(n) % 2).long()
    x = torch.rand(n, 2, 8, 8, generator=gen) * 0.2
    x[:, 0] += 0.6 * y[:, None, None].float()
    return x, y


def test_fit_classifier_validates_and_hands_on_the_average_and_trains_live_as_without():
    """With ema_epochs the network validated and handed to on_epoch is the average (history's
    val_auc is its AUC), the live weights end where a run without it ends (the average draws nothing
    from the generators), and it learns the separable task."""
    from wsseg_core.train import predict_proba
    from wsseg_core.metrics import roc_auc

    gen = torch.Generator().manual_seed(0)
    tr, va = _separable(64, gen), _separable(32, gen)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    kw = dict(epochs=4, batch_size=16, lr=3e-2, tumour_weight=1.0, seed=0, optimizer="adamw",
              schedule="onecycle", augment=False)
    seen = []
    live = net()
    hist = fit_classifier(live, tr, va, ema_epochs=1.0,
                          on_epoch=lambda e, m, mod: seen.append(
                              (mod is live, roc_auc(predict_proba(mod, va[0]), va[1].numpy()),
                               m["val_auc"], {k: v.clone() for k, v in mod.state_dict().items()})),
                          **kw)
    assert len(hist) == 4 and not any(s[0] for s in seen)
    for _, auc_of_handed, val_auc, _ in seen:
        assert auc_of_handed == pytest.approx(val_auc)
    assert hist[-1]["val_auc"] > 0.95, hist
    plain = net()
    fit_classifier(plain, tr, va, **kw)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(live.state_dict()[k], v)
    # the average differs from the live weights it follows
    last_avg = seen[-1][3]
    assert any(not torch.allclose(last_avg[k].float(), v.float()) for k, v in plain.state_dict().items()
               if v.dtype.is_floating_point)
