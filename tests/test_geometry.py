"""Physical scale (issue 18 item 3): slices resampled in-plane to pixel_mm and padded / cropped
around the body, and the CAM -> voxel map back to the study's native grid.

Every expected index below is worked out by hand from the geometry (module doc of
wsseg_core.geometry): resampled pixel k spans native [k / s, (k + 1) / s) with s = spacing /
pixel_mm, canvas pixel u = k - offset, native voxel i (centre i + 0.5) lands in k = floor((i + 0.5) s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg_core.geometry import body_centre, resample_geometry, resize_geometry
from wsseg_core.models import SlicePreprocessor, build_slice_classifier, load_classifier, save_classifier
from wsseg_core.segment import cam_region, segment_volume

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _pre(size: int = 256, mm: float = 2.0) -> SlicePreprocessor:
    return SlicePreprocessor(input_size=size, mode="resample_mm", pixel_mm=mm)


def _body(shape, x_range, y_range):
    """CT volume of air with a soft-tissue box [x0, x1) x [y0, y1) on every slice, SUV 1 there."""
    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[x_range[0]:x_range[1], y_range[0]:y_range[1]] = 40.0
    suv = np.where(ct > -500, 1.0, 0.0).astype(np.float32)
    return suv, ct


def test_pad_case_300_slice_at_1_5_mm_to_225_pixels_padded_to_256():
    # 300 x 1.5 mm = 450 mm -> 225 pixels of 2 mm; body centred in the FOV -> 31 pixels of padding.
    suv, ct = _body((300, 300, 2), (100, 200), (100, 200))  # centroid (150, 150)
    assert body_centre(suv, ct) == (150.0, 150.0)
    pre = _pre()
    geo = pre.geometry(suv, ct, (1.5, 1.5, 3.0))
    assert geo.resampled_shape == (225, 225)
    # canvas centred on 150 * 0.75 = 112.5: offset floor(112.5 - 128 + 0.5) = -15
    assert geo.offset == (-15, -15)
    # a hot voxel at native (100, 200): k = floor(100.5 * .75) = 75, floor(200.5 * .75) = 150
    hot = np.zeros((300, 300, 1), np.float32)
    hot[100, 200, 0] = 10.0
    x = pre(hot[:, :, 0], np.full((300, 300), -1000.0, np.float32), geo)
    assert x.shape == (1, 2, 256, 256)
    u = np.unravel_index(int(torch.argmax(x[0, 0])), (256, 256))
    assert tuple(int(v) for v in u) == (75 + 15, 150 + 15)
    # padding holds 0 (no uptake, air) exactly: canvas rows < 15 and >= 15 + 225 have no FOV
    pad = torch.ones(256, 256, dtype=torch.bool)
    pad[15:240, 15:240] = False
    ones = pre(np.ones((1, 300, 300), np.float32), np.zeros((1, 300, 300), np.float32), geo)
    assert float(ones[0][:, pad].abs().max()) == 0.0
    assert float(ones[0, 0, 15:240, 15:240].min()) > 0.0
    # back: a canvas-resolution CAM marking that pixel selects exactly the hot voxel
    # (k = 75 spans native [100, 101.33): only voxel 100's centre 100.5; 150: only 200.5)
    cam = np.zeros((256, 256), np.float32)
    cam[90, 165] = 1.0
    region = cam_region(cam, 0.5, (300, 300), geo.cam_index(256, 256))
    assert [tuple(map(int, p)) for p in zip(*np.nonzero(region))] == [(100, 200)]
    # a 32 x 32 CAM (stride 8): cell floor(90 / 8) = 11 covers canvas 88..95 -> k 73..80 ->
    # native centres in [97.33, 108) -> voxels 97..107; y: cell floor(165 / 8) = 20 -> canvas
    # 160..167 -> k 145..152 -> native [193.33, 204) -> voxels 193..203
    cam32 = np.zeros((32, 32), np.float32)
    cam32[11, 20] = 1.0
    region = cam_region(cam32, 0.5, (300, 300), geo.cam_index(32, 32))
    xs, ys = np.nonzero(region)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (97, 107, 193, 203)
    assert region.sum() == 11 * 11


def test_crop_case_fov_over_512_mm_is_cropped_around_the_body():
    # 400 x 1.5 mm = 600 mm -> 300 pixels: 44 too many for 256, cropped around the body.
    shape = (400, 400, 2)
    suv, ct = _body(shape, (180, 220), (100, 300))  # centroid (200, 200): the FOV centre
    geo = _pre().geometry(suv, ct, (1.5, 1.5, 3.0))
    assert geo.resampled_shape == (300, 300)
    assert geo.offset == (22, 22)  # floor(150 - 128 + 0.5)
    # the canvas sees native centres in [22 / .75, 278 / .75) = [29.33, 370.67): voxels 29..370
    ri, _ = geo.cam_index(256, 256)
    inside = np.flatnonzero(ri >= 0)
    assert (inside.min(), inside.max()) == (29, 370)
    assert ri[29] == 0 and ri[370] == 255
    # a body off to one side: the canvas follows it but never leaves the FOV
    suv_l, ct_l = _body(shape, (20, 80), (100, 300))  # x centroid 50 -> 37.5 - 128 < 0 -> 0
    assert _pre().geometry(suv_l, ct_l, (1.5, 1.5, 3.0)).offset[0] == 0
    suv_r, ct_r = _body(shape, (330, 390), (100, 300))  # 360 * .75 = 270 - 128 -> 142 > 44 -> 44
    assert _pre().geometry(suv_r, ct_r, (1.5, 1.5, 3.0)).offset[0] == 44
    # forward and back through the crop: a lesion at native (300, 210) -> k (225, 157) ->
    # canvas (203, 135) and back: k 225 spans native [300, 301.33) (centre 300.5 only), k 157
    # spans [209.33, 210.67) (centres 209.5 and 210.5): the lesion's voxel and its y neighbour.
    # One outside the canvas (x = 10) is in no region, even at t = 0 with a CAM of ones.
    pre = _pre()
    img = np.zeros((400, 400), np.float32)
    img[300, 210] = 10.0
    x = pre(img, np.full((400, 400), -1000.0, np.float32), geo)
    u = np.unravel_index(int(torch.argmax(x[0, 0])), (256, 256))
    assert tuple(int(v) for v in u) == (203, 135)
    cam = np.zeros((256, 256), np.float32)
    cam[203, 135] = 1.0
    region = cam_region(cam, 0.5, (400, 400), geo.cam_index(256, 256))
    assert [tuple(map(int, p)) for p in zip(*np.nonzero(region))] == [(300, 209), (300, 210)]
    everything = cam_region(np.ones((32, 32)), 0.0, (400, 400), geo.cam_index(32, 32))
    assert not everything[:29].any() and not everything[371:].any() and everything[29:371, 29:371].all()
    # the CAM on the native grid (analyze's figures and single-slice masks): the same cells, NaN
    # where the canvas does not reach
    cam32 = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    native = geo.cam_to_native(cam32)
    assert native.shape == (400, 400) and np.isnan(native[:29]).all() and np.isnan(native[371:]).all()
    np.testing.assert_array_equal(native >= 0.4, cam_region(cam32, 0.4, (400, 400), geo.cam_index(32, 32)))
    assert native[29, 29] == cam32[0, 0] and native[370, 370] == cam32[31, 31]
    # Algorithm 1 on the volume with that map: a hot voxel outside the canvas never enters a mask
    vol = np.ones((400, 400, 1), np.float32)
    vol[10, 200, 0] = 50.0
    mask = segment_volume(vol, [0], np.ones((1, 32, 32), np.float32), 0.0, 0.0,
                          cam_index=geo.cam_index(32, 32))
    assert mask[10, 200, 0] == 0 and mask[200, 200, 0] == 1


def test_bilinear_values_at_2_mm_pixel_centres():
    # 4 mm voxels -> 2 mm pixels (s = 2, upsampling: plain bilinear, exact): pixel k's centre is
    # native voxel coordinate (k + 0.5) / 2 - 0.5 (half-pixel convention), the ramp's value there.
    n = 40
    ramp = np.repeat(np.arange(n, dtype=np.float32)[:, None], n, axis=1) * 0.25  # SUV 0 .. 9.75
    geo = resample_geometry((n, n), (4.0, 4.0), 2.0, 64, centre=(n / 2, n / 2))
    assert geo.resampled_shape == (80, 80) and geo.offset == (8, 8)  # floor(40 - 32 + 0.5)
    pre = SlicePreprocessor(input_size=64, mode="resample_mm", pixel_mm=2.0, suv_max=20.0)
    x = pre(ramp, np.zeros((n, n), np.float32), geo)[0, 0].double().numpy() * 20.0
    u = np.arange(64)
    k = u + 8
    want = np.clip((k + 0.5) / 2 - 0.5, 0, n - 1) * 0.25
    np.testing.assert_allclose(x[:, 30], want, atol=1e-5)
    # shrinking (1.5 mm -> 2 mm) is antialiased; its centres still sit at (k + 0.5) / s - 0.5
    geo2 = resample_geometry((n, n), (1.5, 1.5), 2.0, 64, centre=(n / 2, n / 2))
    x2 = pre(ramp, np.zeros((n, n), np.float32), geo2)[0, 0].double().numpy() * 20.0
    k2 = np.arange(2, 28)  # interior of the 30 resampled pixels
    want2 = ((k2 + 0.5) / 0.75 - 0.5) * 0.25
    np.testing.assert_allclose(x2[k2 - geo2.offset[0], 15 - geo2.offset[1]], want2, atol=0.25 * 0.05)


@pytest.mark.parametrize("spacing", [(2.04, 2.04), (0.977, 0.977), (4.07, 3.0), (1.37, 2.5)])
def test_resampled_size_matches_torch_for_odd_spacings(spacing):
    """geometry.py predicts torch's output size (floor(X s)); _resample raises if they differ."""
    shape = (97, 61, 1)
    suv, ct = _body(shape, (20, 70), (10, 50))
    pre = _pre(64)
    geo = pre.geometry(suv, ct, spacing)
    assert pre(suv[:, :, 0], ct[:, :, 0], geo).shape == (1, 2, 64, 64)


def test_resize_mode_keeps_the_old_nearest_map_and_needs_no_spacing():
    geo = resize_geometry((400, 400), 256)
    ri, ci = geo.cam_index(32, 32)
    np.testing.assert_array_equal(ri, np.floor(np.arange(400) * 32 / 400).astype(int))
    cam = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(cam_region(cam, 0.5, (400, 400), geo.cam_index(32, 32)),
                                  cam_region(cam, 0.5, (400, 400)))
    pre = SlicePreprocessor(64)
    assert pre.mode == "resize" and pre.geometry(np.zeros((5, 5, 2))).mode == "resize"
    with pytest.raises(ValueError, match="spacing"):
        _pre().geometry(np.zeros((5, 5, 2)), None, None)
    with pytest.raises(ValueError, match="geometry"):
        _pre()(np.zeros((5, 5)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="pixel_mm"):
        SlicePreprocessor(64, mode="resample_mm")
    with pytest.raises(ValueError, match="mode"):
        SlicePreprocessor(64, mode="stretch")


def test_checkpoint_records_the_mode_and_an_old_one_reads_as_resize(tmp_path):
    model, pre = build_slice_classifier("small", pixel_mm=2.0)
    assert (pre.mode, pre.pixel_mm) == ("resample_mm", 2.0)
    assert build_slice_classifier("paper")[1].to_dict()["mode"] == "resample_mm"
    assert build_slice_classifier("paper", pixel_mm=0)[1].mode == "resize"
    assert build_slice_classifier("small")[1].mode == "resize"
    save_classifier(tmp_path / "c.pt", model, pre)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["preprocessor"]["mode"] == "resample_mm" and raw["preprocessor"]["pixel_mm"] == 2.0
    assert raw["preprocessor"]["input_size"] == 64  # the canvas
    assert load_classifier(tmp_path / "c.pt")[1] == pre
    # a checkpoint from before the field: its record has only the numbers, and it resized
    del raw["preprocessor"]["mode"], raw["preprocessor"]["pixel_mm"]
    torch.save(raw, tmp_path / "old.pt")
    old = load_classifier(tmp_path / "old.pt")[1]
    assert (old.mode, old.pixel_mm, old.input_size) == ("resize", None, 64)
