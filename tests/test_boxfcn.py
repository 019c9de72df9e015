"""BoxFCN (Afshari et al.): box weak labels, the 3-D FCN, post-processing, checkpoints, training steps."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch

from wsseg_core.boxfcn import (BoxFCN3D, augment, box_dice_collapsed, box_labels, box_volumes,
                               build_boxfcn, fit_boxfcn_volumes, init_head_to_prior, load_boxfcn,
                               load_segmenter, postprocess, predict_volume, sample_patch, save_boxfcn,
                               zscore)


def _seg() -> np.ndarray:
    seg = np.zeros((12, 10, 8), np.uint8)
    seg[2:4, 3:6, 1:3] = 1  # lesion A: box x 2..3, y 3..5, z 1..2
    seg[9, 8, 6] = 1  # lesion B: one voxel, one away from the far corner
    seg[8, 7, 5] = 1  # diagonal neighbour of B: same 26-connected lesion
    return seg


def test_box_labels_tight_and_with_margins():
    seg = _seg()
    b = box_labels(seg)
    want = np.zeros_like(seg)
    want[2:4, 3:6, 1:3] = 1
    want[8:10, 7:9, 5:7] = 1  # the bounding box of the diagonal pair
    assert b.dtype == np.uint8 and np.array_equal(b, want)
    # 1 voxel each side, clipped at the grid's edges
    b1 = box_labels(seg, margin_vox=1)
    want1 = np.zeros_like(seg)
    want1[1:5, 2:7, 0:4] = 1
    want1[7:11, 6:10, 4:8] = 1
    assert np.array_equal(b1, want1)
    # 3 mm at (2, 2, 3) mm spacing: ceil(1.5) = 2 voxels in x, y; ceil(1) = 1 in z
    b3 = box_labels(seg, spacing_mm=(2.0, 2.0, 3.0), margin_mm=3.0)
    want3 = np.zeros_like(seg)
    want3[0:6, 1:8, 0:4] = 1
    want3[6:12, 5:10, 4:8] = 1
    assert np.array_equal(b3, want3)
    assert not box_labels(np.zeros_like(seg)).any()
    with pytest.raises(ValueError):
        box_labels(seg, margin_mm=2.0)  # mm without spacing


def test_postprocess_opening_and_small_components():
    m = np.zeros((20, 10, 10), np.uint8)
    m[1:5, 1:5, 1:5] = 1  # cube A, 64 voxels
    m[9:13, 1:5, 1:5] = 1  # cube B
    m[5:9, 2, 2] = 1  # a one-voxel-thick bridge A-B
    m[17, 8, 8] = 1  # an isolated speck
    from scipy import ndimage

    out = postprocess(m, (1.0, 1.0, 1.0), opening_vox=1, min_volume_ml=0.0)
    _, n = ndimage.label(out, structure=np.ones((3, 3, 3)))
    # the bridge is cut (its middle goes; stubs next to a cube face survive the opening), the speck goes
    assert n == 2 and out[17, 8, 8] == 0 and out[6:8, 2, 2].sum() == 0
    # the cubes survive (their cores exactly; the 6-connected opening rounds off their edges)
    assert out[2:4, 2:4, 2:4].all() and out[10:12, 2:4, 2:4].all() and out.sum() >= 2 * 8
    # components below 0.065 ml (64 voxels of 1 mm^3 = 0.064 ml) go; no opening: the bridge joins A and B
    assert postprocess(m, (1.0, 1.0, 1.0), opening_vox=0, min_volume_ml=0.065).sum() == 64 + 64 + 4
    assert postprocess(m, (1.0, 1.0, 1.0), opening_vox=0, min_volume_ml=0.2).sum() == 0
    assert np.array_equal(postprocess(m, (1, 1, 1), 0, 0.0), m)


def test_network_shapes_paper_and_small_presets():
    small = build_boxfcn("small")
    assert (small.base, small.levels) == (4, 3)
    paper = build_boxfcn("paper")  # U-Net's 64 feature maps / 4
    assert (paper.base, paper.levels) == (16, 4)
    assert [m.out_channels for m in paper.down.modules() if isinstance(m, torch.nn.Conv3d)][::2] == [16, 32, 64, 128]
    assert any(isinstance(m, torch.nn.SELU) for m in paper.modules())
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        p = small(x)
    assert p.shape == x.shape and float(p.min()) > 0 and float(p.max()) < 1  # sigmoid
    with pytest.raises(ValueError):
        small(torch.randn(1, 1, 30, 32, 16))


def test_head_prior_makes_an_untrained_network_predict_the_box_fraction():
    net = build_boxfcn("small")
    bias = init_head_to_prior(net, 0.002)
    assert bias == pytest.approx(math.log(0.002 / 0.998))  # logit(0.002) = -6.2126
    assert bias == pytest.approx(-6.2126, abs=1e-4)
    torch.nn.init.zeros_(net.head.weight)  # the head then sees only its bias
    with torch.no_grad():
        p = net(torch.randn(1, 1, 16, 16, 8))
    assert torch.allclose(p, torch.full_like(p, 0.002), rtol=1e-5)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="foreground_fraction"):
            init_head_to_prior(net, bad)


def test_box_dice_collapse_is_a_loss_above_the_untrained_prior():
    # an untrained network at a box prior of 0.002 scores soft Dice ~0.002: loss 0.998, not collapsed
    assert not box_dice_collapsed(0.998) and not box_dice_collapsed(0.9999)
    assert box_dice_collapsed(0.99995) and box_dice_collapsed(1.0) and box_dice_collapsed(float("nan"))


def test_predict_volume_pads_and_crops_and_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = BoxFCN3D(base=2, levels=2)
    suv = np.random.default_rng(0).gamma(2.0, 1.0, (13, 10, 7)).astype(np.float32)
    prob = predict_volume(model, suv)
    assert prob.shape == suv.shape and prob.dtype == np.float32
    assert model.training  # mode restored
    save_boxfcn(tmp_path / "m.pt", model, meta={"kind": "mdice_ms"})
    loaded, meta = load_boxfcn(tmp_path / "m.pt")
    assert meta == {"kind": "mdice_ms"} and not loaded.training
    assert np.allclose(predict_volume(loaded, suv), prob, atol=1e-6)
    assert np.allclose(predict_volume(loaded, zscore(suv), normalised=True), prob, atol=1e-6)
    with pytest.raises(ValueError, match="not found"):
        load_boxfcn(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.pt"):
        load_boxfcn(tmp_path / "bad.pt")
    # the scorer's loader: a uint8 mask on the SUV grid
    study = type("S", (), {"suv": suv, "spacing_mm": np.array([2.0, 2.0, 3.0])})()
    mask = load_segmenter(tmp_path / "m.pt", {"threshold": 0.0, "postprocess": False})(study)
    assert mask.shape == suv.shape and mask.dtype == np.uint8 and mask.all()  # p > 0 everywhere


def test_zscore_augment_and_patches():
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    z = zscore(v)
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0, abs=1e-6)
    assert not zscore(np.ones((2, 2, 2))).any()
    x = torch.arange(2 * 4 * 3 * 2, dtype=torch.float32).reshape(2, 1, 4, 3, 2)
    b = (x > 20).float()
    xa, ba = augment(x, b, torch.Generator().manual_seed(0), noise_std=0.0)
    for i in range(2):  # each sample flipped in x and/or z only, image and box alike
        assert any(torch.equal(xa[i], torch.flip(x[i], d)) for d in ([], [-3], [-1], [-3, -1]))
        assert torch.equal(ba[i], (xa[i] > 20).float())
    xn, _ = augment(x, b, torch.Generator().manual_seed(0), noise_std=0.1)
    assert 0 < float((xn - xa).std()) < 0.2
    seg = np.zeros((40, 40, 20), np.uint8)
    seg[30:33, 30:33, 15:17] = 1
    st = type("S", (), {"suv": seg * 5.0 + 1.0, "seg": seg, "spacing_mm": np.ones(3)})()
    vol = box_volumes([st])[0]
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(20):
        px, pb = sample_patch(vol, (16, 16, 8), rng, p_lesion=1.0)
        assert px.shape == (16, 16, 8) and pb.shape == (16, 16, 8)
        hits += int(pb.any())
    assert hits == 20  # lesion-centred patches (jitter <= a quarter) always hold the box
    big, _ = sample_patch(vol, (48, 48, 24), rng)  # larger than the volume: padded
    assert big.shape == (48, 48, 24)


def _toy_study():
    """A 16x16x8 volume with one 4x4x4 lesion, 7x brighter than the N(1, 0.1) background."""
    rng = np.random.default_rng(0)
    seg = np.zeros((16, 16, 8), np.uint8)
    seg[5:9, 5:9, 2:6] = 1
    suv = (rng.normal(1.0, 0.1, seg.shape) + 6.0 * seg).astype(np.float32)
    return type("S", (), {"suv": suv, "seg": seg, "spacing_mm": np.ones(3)})()


@pytest.mark.slow
def test_box_dice_then_mdice_ms_fit_on_a_toy_volume():
    """A few steps of each phase run, with finite losses, and keep the best-validation-loss state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vols = box_volumes([_toy_study()], margin_vox=1)
        torch.manual_seed(0)
        model = BoxFCN3D(base=2, levels=2)
        hist, best = fit_boxfcn_volumes(model, vols, vols, {"kind": "box_dice"}, epochs=3, patience=3,
                                        steps_per_epoch=4, patch=(8, 8, 8), batch_size=2,
                                        optimizer="adam", lr=1e-2)
        assert len(hist) == 3 and all(np.isfinite(h["val_loss"]) for h in hist)
        kept = min(range(3), key=lambda i: hist[i]["val_loss"])
        model.load_state_dict(best)
        from wsseg_core.boxfcn import evaluate

        assert evaluate(model, vols, {"kind": "box_dice"})["loss"] == pytest.approx(hist[kept]["val_loss"], abs=1e-5)
        hist2, _ = fit_boxfcn_volumes(model, vols, vols, {"kind": "mdice_ms"}, epochs=2, patience=1,
                                      steps_per_epoch=2, patch=None, optimizer="sgd", lr=1e-3)
        assert 1 <= len(hist2) <= 2 and all(np.isfinite(h["train_loss"]) for h in hist2)
    finally:
        torch.set_num_threads(threads)


def test_boxfcn_overfits_one_volume():
    """BoxFCN learns: 20 Adam steps on one 16x16x8 volume with a 4x4x4 lesion (its box is itself)
    take the Dice of the 0.5-thresholded prediction, computed here by hand, from ~0.03 (untrained)
    to ~0.77 (measured; asserted: below 0.1 before, above 0.6 after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        st = _toy_study()
        seg = st.seg
        vols = box_volumes([st])
        torch.manual_seed(0)
        model = BoxFCN3D(base=2, levels=2)

        def dice_now() -> float:
            pred, ref = predict_volume(model, st.suv) >= 0.5, seg > 0
            return 2.0 * float((pred & ref).sum()) / float(pred.sum() + ref.sum())

        before = dice_now()
        fit_boxfcn_volumes(model, vols, vols, {"kind": "box_dice"}, epochs=1, patience=1,
                           steps_per_epoch=20, patch=None, batch_size=1, optimizer="adam", lr=1e-2)
        after = dice_now()
        assert before < 0.1 and after > 0.6, (before, after)
    finally:
        torch.set_num_threads(threads)


def _body_study():
    """60x50x70 grid: body SUV 1 / CT 40 HU at x 10..29, y 20..39 (centroid 19.5, 29.5, 34.5), a
    table under it (CT 0 HU, SUV 0: not body), two lesions (SUV 8) at z 12..14 and z 40..43."""
    suv = np.zeros((60, 50, 70), np.float32)
    ct = np.full(suv.shape, -1000.0, np.float32)
    suv[10:30, 20:40] = 1.0
    ct[10:30, 20:40] = 40.0
    ct[5:55, 42:46] = 0.0  # the scanner table: dense, but no uptake
    seg = np.zeros(suv.shape, np.uint8)
    seg[12:15, 22:25, 12:15] = 1
    seg[26:29, 35:38, 40:44] = 1
    suv[seg > 0] = 8.0
    return type("S", (), {"suv": suv, "ct": ct, "seg": seg, "spacing_mm": np.ones(3)})()


def test_body_crop_geometry():
    """Issue 18 item 8: the paper preset's 160x160x128 crop, here scaled down to 32x32x40."""
    from wsseg_core.boxfcn import PAPER_CROP, BOXFCN_PRESETS, body_centroid, body_crop, crop_start

    assert BOXFCN_PRESETS["paper"]["crop"] == PAPER_CROP == (160, 160, 128)
    assert BOXFCN_PRESETS["small"]["crop"] is None
    st = _body_study()
    assert body_centroid(st.suv, st.ct) == pytest.approx([19.5, 29.5, 34.5])
    assert body_centroid(st.suv, None)[1] == pytest.approx(29.5)  # PET alone: the table has no SUV
    vol = box_volumes([st])[0]
    assert vol.boxes.tolist() == [[[12, 22, 12], [14, 24, 14]], [[26, 35, 40], [28, 37, 43]]]
    size = (32, 32, 40)
    starts = set()
    for seed in range(8):
        x, b, seg, lo = body_crop(vol, size, np.random.default_rng(seed))
        assert x.shape == b.shape == seg.shape == size
        sl = tuple(slice(a, a + n) for a, n in zip(lo, size))
        # image, box label and reference cut with one window
        assert np.array_equal(x, vol.x[sl]) and np.array_equal(b, vol.box[sl])
        assert np.array_equal(seg, vol.seg[sl])
        assert b.sum() == vol.box.sum() and seg.sum() == vol.seg.sum()  # both lesions' boxes whole
        # in-plane: centred on the body (19.5 - 16 -> 4, 29.5 - 16 -> 14 after rounding), which
        # already holds both boxes; so is the whole body (x 10..29, y 20..39)
        assert lo[:2].tolist() == [4, 14]
        # z: drawn among the windows that hold both boxes (z 12..43: starts 4..12)
        assert 4 <= lo[2] <= 12
        starts.add(int(lo[2]))
    assert len(starts) > 1  # a different axial context across draws
    # without rng: deterministic, body-centred in z (34.5 - 20 -> 14), clipped to hold the boxes
    assert crop_start(vol.x.shape, size, vol.body_centre, vol.boxes).tolist() == [4, 14, 12]
    # lesions farther apart than the window: one lesion's box whole (the largest without rng)
    small = (32, 32, 16)
    lo = crop_start(vol.x.shape, small, vol.body_centre, vol.boxes)
    assert lo[2] <= 40 and lo[2] + 16 > 43
    for seed in range(6):
        x, b, _, lo = body_crop(vol, small, np.random.default_rng(seed))
        held = [bool(np.all(bx[0] >= lo) and np.all(bx[1] < lo + np.array(small))) for bx in vol.boxes]
        assert any(held) and b.shape == small
    # a lesion at the edge of the body moves the window off the body centre just enough
    far = np.array([[[40, 30, 30], [44, 33, 33]]])
    lo = crop_start(vol.x.shape, size, vol.body_centre, far)
    assert lo[0] == 44 - 32 + 1 and lo[1] == 14
    # a volume smaller than the crop: padded at the far end (x with its minimum, labels with 0)
    x, b, seg, lo = body_crop(vol, (64, 64, 72))
    assert x.shape == (64, 64, 72) and lo.tolist() == [0, 0, 0]
    assert np.array_equal(b[:60, :50, :70], vol.box) and not b[60:].any()
    assert (x[60:] == vol.x.min()).all()


def test_train_epoch_feeds_the_crop_to_the_network():
    from wsseg_core.boxfcn import make_optimizer, train_epoch

    vol = box_volumes([_body_study()])[0]
    torch.manual_seed(0)
    model = BoxFCN3D(base=2, levels=2)
    shapes = []
    model.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    loss = train_epoch(model, [vol], make_optimizer(model, "adam", 1e-3), {"kind": "box_dice"},
                       patch=None, batch_size=1, steps=2, rng=np.random.default_rng(0),
                       generator=torch.Generator().manual_seed(0), crop=(16, 16, 8))
    assert shapes == [(1, 1, 16, 16, 8)] * 2 and np.isfinite(loss)


def test_evaluate_reports_mean_and_median_dice_over_volumes_with_tumour():
    """The validation Dice that keeps a small-preset epoch (issue 23) is the median over the
    volumes with tumour, recomputed here volume by volume; a lesion-free volume is left out."""
    from wsseg_core.boxfcn import evaluate
    from wsseg_core.metrics import dice

    studies = []
    for k, lo in enumerate((2, 5, 9)):  # lesions of the same size at three places
        st = _toy_study()
        st.seg = np.zeros_like(st.seg)
        st.seg[lo:lo + 4, lo:lo + 4, 2:6] = 1
        st.suv = (np.random.default_rng(k).normal(1.0, 0.1, st.seg.shape) + 6.0 * st.seg).astype(np.float32)
        studies.append(st)
    neg = _toy_study()
    neg.seg = np.zeros_like(neg.seg)
    vols = box_volumes(studies + [neg])
    torch.manual_seed(0)
    model = BoxFCN3D(base=2, levels=2)
    ev = evaluate(model, vols, {"kind": "box_dice"})
    d = [dice((predict_volume(model, v.x, normalised=True) > 0.5).astype(np.uint8), v.seg) for v in vols[:3]]
    assert ev["n"] == 4
    assert ev["dice"] == pytest.approx(np.mean(d)) and ev["dice_median"] == pytest.approx(np.median(d))
    assert math.isnan(evaluate(model, vols[3:], {"kind": "box_dice"})["dice_median"])
