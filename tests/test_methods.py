"""The method registry (wsseg_core.methods): the eight names and their segment callables, defined
once, importable without torch (the Ray driver parses arguments and checks a run's models with it)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def test_eight_methods_once_and_the_cam_names_are_the_engines():
    from wsseg_core import cams, methods

    assert methods.ALL_METHODS == ("CAM", "GradCAM", "GradCAM++", "ScoreCAM", "Threshold", "UNet",
                                   "MIP-CAM", "BoxFCN")
    assert len(set(methods.ALL_METHODS)) == 8
    assert cams.CAM_METHODS is methods.CAM_METHODS
    assert {m: mm.checkpoint for m, mm in methods.MODEL_METHODS.items()} == {
        "UNet": "unet.pt", "MIP-CAM": "mipcam.pt", "BoxFCN": "boxfcn.pt"}
    # the loaders themselves are exercised by tests/test_score_{unet,mipcam,boxfcn}.py


def test_registry_and_the_scorers_parser_import_without_torch():
    code = ("import sys, wsseg_core.methods, jobs.score_cohort; "
            "print(sorted(m for m in ('torch', 'wsseg_core.cams', 'wsseg_core.unet') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_holds_each_method_once_with_its_kind():
    from wsseg_core import methods

    assert tuple(methods.METHODS) == methods.ALL_METHODS
    assert all(m.name == name for name, m in methods.METHODS.items())
    assert [n for n, m in methods.METHODS.items() if m.is_cam] == list(methods.CAM_METHODS)
    assert {n: m.model for n, m in methods.METHODS.items() if m.model is not None} == methods.MODEL_METHODS
    # the rows' method parameters: t_m / q_m from the entry, None where a method has none
    assert methods.METHODS["GradCAM"].row_fields({"t": 0.2, "q": 35.0, "val_dice": 0.6}) == {
        "t_m": 0.2, "q_m": 35.0}
    assert methods.METHODS["Threshold"].row_fields({"q": 31.0, "reference": "max"}) == {
        "t_m": None, "q_m": 31.0}
    assert methods.METHODS["UNet"].row_fields({}) == {"t_m": None, "q_m": None}


def test_slice_methods_segment_a_study_as_worked_out_by_hand():
    """A 4x4 slice, a 2x2 CAM (each cell covers a 2x2 block under "resize"): the CAM methods are
    Algorithm 1 (region, then the q-th SUV percentile inside it), Threshold is q % of the slice's
    SUVmax; only flagged slices are segmented."""
    from types import SimpleNamespace

    from wsseg_core.geometry import resize_geometry
    from wsseg_core.methods import METHODS, StudyContext, segment_study

    suv = np.zeros((4, 4, 3), np.float32)
    suv[:, :, 1] = [[1, 2, 5, 6], [3, 4, 7, 8], [0, 0, 0, 0], [0, 0, 0, 10]]
    suv[:, :, 2] = 9.0  # not flagged: stays empty whatever its uptake
    study = SimpleNamespace(suv=suv, ct=np.zeros_like(suv))
    cam = np.array([[[1.0, 0.2], [0.0, 0.0]]], np.float32)  # CAM of slice 1: top-left block
    ctx = StudyContext(flagged_z=np.array([1]),
                       thresholds={"CAM": {"t": 0.5, "q": 50.0}, "ScoreCAM": {"t": 0.1, "q": 0.0},
                                   "Threshold": {"q": 55.0}},
                       cams={"CAM": cam, "ScoreCAM": cam}, geometry=resize_geometry((4, 4), 8))
    masks = segment_study(study, ctx, ["CAM", "ScoreCAM", "Threshold"])
    want = {m: np.zeros((4, 4, 3), np.uint8) for m in masks}
    # CAM: t = 0.5 keeps the block {1, 2, 3, 4}; its 50th percentile (linear) is 2.5 -> {3, 4}
    want["CAM"][1, :2, 1] = 1
    # ScoreCAM: t = 0.1 keeps both top blocks {1..8}; q = 0 keeps all of them
    want["ScoreCAM"][:2, :, 1] = 1
    # Threshold: 55 % of SUVmax 10 is 5.5 -> {6, 7, 8, 10}; reference "max" when the entry has none
    want["Threshold"][0, 3, 1] = want["Threshold"][1, 2:, 1] = want["Threshold"][3, 3, 1] = 1
    for m in masks:
        assert masks[m].dtype == np.uint8 and np.array_equal(masks[m], want[m]), m
        assert np.array_equal(METHODS[m].segment(study, ctx), want[m])
