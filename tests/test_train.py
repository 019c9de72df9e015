"""Training utilities: slice sampling, augmentation, AUC, loss/optimiser, a small end-to-end fit."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsseg_core.models import SlicePreprocessor, build_slice_classifier
from wsseg_core.metrics import roc_auc
from wsseg_core.train import (augment_batch, evaluate, fit_classifier, make_loss, make_optimizer,
                              predict_proba, sample_slices, slices_from_studies)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _study(shape=(32, 32, 10), tumour_z=(2, 3), seg=True, seed=0):
    rng = np.random.default_rng(seed)
    suv = rng.uniform(0, 3, shape).astype(np.float32)
    ct = rng.uniform(-1000, 500, shape).astype(np.float32)
    m = np.zeros(shape, np.uint8)
    for z in tumour_z:
        m[10:12, 10:12, z] = 1
    return SimpleNamespace(suv=suv, ct=ct, seg=m if seg else None)


def test_slices_from_studies_labels_and_negative_subsampling():
    pre = SlicePreprocessor(input_size=16)
    studies = [_study(tumour_z=(2, 3)), _study(seg=False), _study(shape=(32, 32, 6), tumour_z=(5,))]
    x, y = slices_from_studies(studies, pre)
    assert x.shape == (16, 2, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert y.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0] + [0, 0, 0, 0, 0, 1]
    gen = torch.Generator().manual_seed(0)
    xs, ys = slices_from_studies(studies, pre, negative_keep=0.3, generator=gen)
    assert int(ys.sum()) == 3  # every tumour slice kept
    assert len(ys) < 16
    gen = torch.Generator().manual_seed(0)
    xs2, ys2 = slices_from_studies(studies, pre, negative_keep=0.3, generator=gen)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    x0, y0 = slices_from_studies([_study(seg=False)], pre)
    assert x0.shape == (0, 2, 16, 16) and y0.shape == (0,)


def test_one_slice_sampler_for_classifier_and_unet_against_a_hand_computed_draw():
    from wsseg_core.unet import masks_from_studies

    pre = SlicePreprocessor(input_size=16)
    studies = [_study(shape=(32, 32, 30), tumour_z=(2, 3, 26)), _study(seg=False),
               _study(shape=(32, 32, 6), tumour_z=(5,), seed=1)]
    keep = 0.3
    # The rule written out independently: per labelled study (the unlabelled one draws nothing),
    # one uniform per slice from the generator, kept if tumour or draw < keep.
    gen = torch.Generator().manual_seed(7)
    expected = []
    for st in (studies[0], studies[2]):
        tumour = st.seg.reshape(-1, st.seg.shape[2]).any(axis=0)
        draw = torch.rand(st.seg.shape[2], generator=gen).numpy()
        expected.append(np.flatnonzero(tumour | (draw < keep)))
    got = list(sample_slices(studies, keep, torch.Generator().manual_seed(7), chunk=4))
    assert [g[0] for g in got] == [studies[0], studies[2]]
    assert [len(g[1]) for g in got] == [-(-len(e) // 4) for e in expected]  # chunks of <= 4
    for (_, chunks, labels), exp, st in zip(got, expected, (studies[0], studies[2])):
        assert np.array_equal(np.concatenate(chunks), exp)
        assert all(1 <= len(c) <= 4 for c in chunks)
        assert labels.tolist() == [bool(st.seg[:, :, z].any()) for z in range(st.seg.shape[2])]
    # Both training sets take exactly those slices, in that order, for the same seed.
    x_c, y_c = slices_from_studies(studies, pre, keep, torch.Generator().manual_seed(7))
    x_u, y_u = masks_from_studies(studies, pre, keep, torch.Generator().manual_seed(7))
    kept = np.concatenate(expected)
    assert len(y_c) == len(y_u) == len(kept)
    assert torch.equal(x_c, x_u)  # same slices, same preprocessing ("resize")
    assert y_c.tolist() == (y_u.flatten(1).amax(1)).tolist()
    with pytest.raises(ValueError, match="negative_keep"):
        next(sample_slices(studies, 0.0))


def test_augment_batch_is_deterministic_and_pads_with_background():
    torch.manual_seed(0)
    x = torch.rand(8, 2, 32, 32) * 0.5 + 0.25
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    c = augment_batch(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)  # input untouched, output changed
    assert float(a[:, 0].min()) >= 0 and float(a[:, 0].max()) <= 1
    # Rotations and shifts bring in outside pixels: they are background (0) in both channels,
    # so the image corners of a constant image fall to ~0 for at least some samples.
    ones = torch.ones(16, 2, 32, 32)
    out = augment_batch(ones, torch.Generator().manual_seed(0))
    assert float(out[:, :, 0, 0].min()) < 0.05
    # other per-channel fills are honoured: the CT channel padded with -1 stays -1 outside
    out2 = augment_batch(torch.full((16, 2, 32, 32), -1.0), torch.Generator().manual_seed(0),
                         fill=(0.0, -1.0))
    assert torch.allclose(out2[:, 1], torch.full((16, 32, 32), -1.0), atol=1e-6)


def test_roc_auc_matches_pairwise_count_with_ties():
    scores = np.array([0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.1, 0.9, 0.35])
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1])
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0
                for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert roc_auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1])) and np.isnan(roc_auc([0.1, 0.2], [0, 0]))


def test_loss_and_optimizer_defaults():
    loss = make_loss()
    assert torch.allclose(loss.weight, torch.tensor([1.0, 7.7]))
    model, _ = build_slice_classifier("small", width=0.0625, input_size=16)
    opt = make_optimizer(model)
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert g["lr"] == 1e-3 and g["momentum"] == 0.9 and g["weight_decay"] == 0.0


def test_predict_proba_and_evaluate_keep_training_mode():
    torch.manual_seed(0)
    model, _ = build_slice_classifier("small", width=0.0625, input_size=16)
    x = torch.rand(10, 2, 16, 16)
    y = torch.tensor([0, 1] * 5)
    model.train()
    p = predict_proba(model, x, batch_size=3)
    assert p.shape == (10,) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    assert model.training
    r = evaluate(model, x, y, make_loss(), batch_size=4)
    assert set(r) >= {"loss", "auc", "accuracy", "n", "n_pos"}
    assert r["n"] == 10 and r["n_pos"] == 5 and np.isfinite(r["loss"])
    assert r["auc"] == pytest.approx(roc_auc(p, y.numpy()))


def _blob_slices(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2-channel slices; class 1 has a hot blob in PET, class 0 the same blob in CT only, so
    'something bright' is not enough: the net must learn which channel matters."""
    y = (torch.rand(n, generator=gen) < 0.5).long()
    x = torch.rand(n, 2, size, size, generator=gen) * 0.1
    x[:, 1] += 0.3
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c = 8 + torch.rand(n, 2, generator=gen) * (size - 16)
    blob = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 12.5)
    yf = y[:, None, None].float()
    x[:, 0] += 0.8 * blob * yf
    x[:, 1] += 0.8 * blob * (1 - yf)
    return x, y


@pytest.mark.slow
def test_fit_classifier_learns_synthetic_blobs():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_xy = _blob_slices(256, 64, gen)
    val_xy = _blob_slices(128, 64, gen)
    model, pre = build_slice_classifier("small")
    assert pre.input_size == 64
    seen = []
    t0 = time.perf_counter()
    # lr above the paper's 1e-3: random init (no ImageNet offline) and a few epochs only
    hist = fit_classifier(model, train_xy, val_xy, epochs=4, batch_size=32, lr=0.05,
                          tumour_weight=1.0, seed=0,
                          on_epoch=lambda e, m, mod: seen.append((e, m["val_auc"], mod is model)))
    elapsed = time.perf_counter() - t0
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[2] for s in seen)
    assert set(hist[-1]) >= {"train_loss", "val_loss", "val_auc", "val_accuracy"}
    assert hist[-1]["val_auc"] > 0.9, hist
    assert elapsed < 120, elapsed


def test_early_stopping_counts_epochs_without_a_better_auc():
    from wsseg_core.train import EarlyStopping

    s = EarlyStopping(2)
    # 0.6 best, 0.7 better, then 0.65 and 0.7 (equal is not better): stop at the second
    assert [s.update(a) for a in (0.6, 0.7, 0.65, 0.7)] == [False, False, False, True]
    assert s.best == 0.7
    nan = EarlyStopping(1)
    assert not any(nan.update(float("nan")) for _ in range(5))  # no validation: never stops
    assert [EarlyStopping(None).update(0.5) for _ in range(3)] == [False] * 3
    with pytest.raises(ValueError):
        EarlyStopping(0)


def test_early_stopping_patience_counts_only_from_start():
    """Epochs before `start` are ignored (neither the best AUC nor the patience), and the count
    travels in the state (a resumed run counts on where it was)."""
    from wsseg_core.train import EarlyStopping

    s = EarlyStopping(2, start=3)
    # epoch 0's 0.9 is ignored; 0.7 at epoch 3 is the best, 0.6 and 0.65 after it stop the run
    assert [s.update(a) for a in (0.9, 0.5, 0.6, 0.7, 0.6, 0.65)] == [False] * 5 + [True]
    assert s.best == 0.7
    # a NaN still counts as an epoch seen (it is one), though never toward the patience
    s2 = EarlyStopping(1, start=1)
    assert [s2.update(a) for a in (float("nan"), 0.5, 0.4)] == [False, False, True]
    # restore: same stop decision as the uninterrupted run
    a = EarlyStopping(2, start=3)
    for v in (0.9, 0.5):
        a.update(v)
    b = EarlyStopping(2, start=3)
    b.restore(a.state())
    assert [b.update(v) for v in (0.6, 0.7, 0.6, 0.6)] == [False, False, False, True]
    # a state written before `seen` existed counted every epoch: it keeps counting
    c = EarlyStopping(2, start=3)
    c.restore({"best": 0.9, "since": 1})
    assert c.update(0.5) is True
    with pytest.raises(ValueError):
        EarlyStopping(2, start=-1)


def test_early_stop_start_waits_for_the_one_cycle_anneal():
    """"half_lr": the epoch by which a one-cycle lr is at half its peak (checked against the
    scheduler itself); "first" or a constant lr: 0."""
    import torch

    from wsseg_core.train import early_stop_start, make_optimizer, make_scheduler

    assert early_stop_start("first", "onecycle", 20) == 0
    assert early_stop_start(None, "onecycle", 20) == 0
    assert early_stop_start("half_lr", "constant", 20) == 0
    assert early_stop_start("half_lr", "onecycle", 20) == 13
    assert early_stop_start("half_lr", "onecycle", 30) == 20
    assert early_stop_start("half_lr", "onecycle", 3) == 2
    # a run of 1-2 epochs keeps its last epoch eligible
    assert early_stop_start("half_lr", "onecycle", 2) == 1
    assert early_stop_start("half_lr", "onecycle", 1) == 0
    with pytest.raises(ValueError):
        early_stop_start("later", "onecycle", 20)
    # the scheduler's lr at the start of that epoch is at most half its peak, one epoch earlier above
    epochs, spe = 20, 7
    m = torch.nn.Linear(2, 2)
    opt = make_optimizer(m, lr=1e-2, kind="adamw")
    sched = make_scheduler(opt, "onecycle", 1e-2, epochs, spe)
    lr_at_epoch = []
    for e in range(epochs):
        lr_at_epoch.append(opt.param_groups[0]["lr"])
        for _ in range(spe):
            opt.step()
            sched.step()
    k = early_stop_start("half_lr", "onecycle", epochs)
    assert lr_at_epoch[k] <= 0.5e-2 < lr_at_epoch[k - 2]


def test_onecycle_warms_up_then_anneals_and_resumes_where_it_was():
    import torch

    from wsseg_core.train import make_optimizer, make_scheduler

    def lrs(start_epoch=0, state=None, n=None):
        m = torch.nn.Linear(2, 2)
        opt = make_optimizer(m, lr=1e-2, kind="adamw")
        if state is not None:
            opt.load_state_dict(state)
        sch = make_scheduler(opt, "onecycle", 1e-2, epochs=4, steps_per_epoch=5, start_epoch=start_epoch)
        out = []
        for _ in range(n if n is not None else 20 - 5 * start_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        return out, opt.state_dict()

    full, _ = lrs()
    assert full[0] == pytest.approx(1e-2 / 25)  # warm-up start: max_lr / div_factor
    assert max(full) == pytest.approx(1e-2, rel=1e-3) and int(np.argmax(full)) == 5  # peak at step 0.3 * 20 - 1
    assert full[-1] < 1e-4
    first, state = lrs(n=10)
    resumed, _ = lrs(start_epoch=2, state=state)
    np.testing.assert_allclose(first + resumed, full, rtol=1e-9)
    assert make_scheduler(make_optimizer(torch.nn.Linear(1, 1)), "constant", 1e-3, 1, 1) is None


def test_fit_classifier_patience_start_delays_the_stop(monkeypatch):
    """fit_classifier(patience_start="half_lr") under one-cycle: the same validation AUCs that
    stop a "first" run after 3 epochs run to epoch ceil(0.65 * 12) = 8, the first that counts,
    then `patience` more."""
    import torch

    import wsseg_core.train as tr

    aucs = iter([])

    def fake_evaluate(*a, **k):
        return dict(loss=0.0, auc=next(aucs), accuracy=0.0, n=1, n_pos=1)

    monkeypatch.setattr(tr, "evaluate", fake_evaluate)
    x = torch.rand(8, 2, 16, 16)
    y = torch.tensor([0, 1] * 4)

    def run(start):
        nonlocal aucs
        aucs = iter([0.9] + [0.5] * 20)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 16 * 16, 2))
        return tr.fit_classifier(model, (x, y), (x, y), epochs=12, batch_size=4, lr=1e-3,
                                 optimizer="adamw", schedule="onecycle", patience=2,
                                 patience_start=start, augment=False)

    assert len(run("first")) == 3          # epochs 1 and 2 without a better AUC
    assert len(run("half_lr")) == 11       # epoch 8 sets the best, 9 and 10 do not beat it
