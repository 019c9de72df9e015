"""The method registry (wsseg_core.methods): the eight names, defined once, importable without
torch (the Ray driver parses arguments and checks a run's models with it)."""

from __future__ import annotations

import subprocess
import sys


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
