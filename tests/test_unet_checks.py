"""The U-Net job's validation interval (issue 23, time): validate every ceil(check_steps / steps
per epoch) epochs and the last; unchecked epochs checkpoint but are never the kept network, and a
worker killed after an unchecked epoch resumes and finishes."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_check_interval_worked_by_hand():
    from jobs.train_unet import check_interval

    assert check_interval(50, 29) == 2    # the demo: 29 steps per epoch, 50/29 = 1.7
    assert check_interval(50, 12) == 5    # a 15-study cohort: 50/12 = 4.2
    assert check_interval(50, 25) == 2    # torso30: exactly 2 epochs
    assert check_interval(50, 50) == 1 and check_interval(50, 51) == 1 and check_interval(50, 400) == 1
    assert check_interval(100, 12) == 9   # 100/12 = 8.3
    assert check_interval(None, 12) == 1 and check_interval(0, 12) == 1  # every epoch
    assert check_interval(50, 0) == 50    # a degenerate epoch count never divides by 0


def test_check_epochs_are_every_kth_and_always_the_last():
    from jobs.train_unet import is_check_epoch

    def checked(every: int, epochs: int) -> list[int]:
        return [e for e in range(epochs) if is_check_epoch(e, every, epochs)]

    # the demo: 35 epochs of 29 steps, every 2nd: epochs 1, 3, ..., 33 and the last, 34 (18 checks)
    assert checked(2, 35) == [*range(1, 34, 2), 34] and len(checked(2, 35)) == 18
    # 84 epochs of 12 steps, every 5th: 4, 9, ..., 79 and 83 (17 checks instead of 84)
    assert checked(5, 84) == [*range(4, 80, 5), 83] and len(checked(5, 84)) == 17
    assert checked(1, 4) == [0, 1, 2, 3]          # every epoch
    assert checked(2, 4) == [1, 3]                # the last is a k-th epoch: not twice
    assert checked(10, 3) == [2] and checked(3, 1) == [0]  # k > epochs: the last epoch only


def test_presets_and_cli_set_the_interval_and_only_a_number_enters_the_fingerprint(monkeypatch):
    import inspect

    import jobs.train_unet as T
    from jobs.ray_train import run_fingerprint
    from wsseg_core.data import StudyRef

    # every epoch in both presets: the interval skipped the demo's best epoch (UNET_EXPERIMENTS.md)
    assert T.UNET_JOB_PRESETS["small"]["check_steps"] is None
    assert T.UNET_JOB_PRESETS["paper"]["check_steps"] is None
    assert inspect.signature(T.fit_unet).parameters["check_steps"].default is None  # the presets' 
    seen: dict = {}

    def fake_fit(loop, config, **kw):
        seen.clear()
        seen.update(config)
        return {"checkpoint": None}

    monkeypatch.setattr(T, "fit_and_keep_best", fake_fit)
    ref = StudyRef(patient_id="P", study_id="S", suv_path="/x/suv.nii.gz", ct_path="/x/ct.nii.gz",
                   seg_path="/x/seg.nii.gz", split="train")
    fp = lambda: run_fingerprint(seen, metric=T.KEEP_METRIC, mode="max")
    T.fit_unet([ref], [ref], "/tmp/unused", **T.preset_kwargs("paper"))
    assert "check_steps" not in seen  # every epoch adds no key: earlier runs keep their fingerprint
    every_epoch = fp()
    T.fit_unet([ref], [ref], "/tmp/unused", **T.preset_kwargs("small"))
    assert "check_steps" not in seen
    T.fit_unet([ref], [ref], "/tmp/unused", **{**T.preset_kwargs("small"), "check_steps": 50})
    assert seen["check_steps"] == 50
    T.fit_unet([ref], [ref], "/tmp/unused", **{**T.preset_kwargs("paper"), "check_steps": 50})
    assert fp()["digest"] != every_epoch["digest"]  # another interval can keep another epoch
    # the CLI: the preset's unless given; 0 means every epoch
    parse = T.build_parser().parse_args
    base = ["--cohort", "c", "--out", "o"]
    assert T.cli_kwargs(parse(base))["check_steps"] is None
    assert T.cli_kwargs(parse([*base, "--check-steps", "100"]))["check_steps"] == 100
    assert T.cli_kwargs(parse([*base, "--check-steps", "0"]))["check_steps"] is None
    assert T.cli_kwargs(parse([*base, "--preset", "paper"]))["check_steps"] is None


@pytest.mark.slow
def test_unchecked_epochs_are_never_kept_and_a_killed_worker_resumes(tmp_path, ray_cluster):
    """4 epochs of 2 steps, check_steps 3: validation every 2nd epoch (epochs 1 and 3). Rank 0 is
    SIGKILLed during epoch 1 (before its check); the restart resumes from the UNCHECKED epoch 0's
    checkpoint and finishes; the kept network is the better of the two checked epochs."""
    from jobs.train_unet import KEEP_METRIC, fit_unet
    from wsseg_core.phantom import write_phantom_cohort
    from wsseg_core.unet import load_unet

    refs = write_phantom_cohort(tmp_path / "cohort", n=3, shape=(48, 48, 16), seed=2,
                                negative_fraction=0.0)
    marker = tmp_path / "killed"
    # 2 training studies x 16 slices, all kept (negative_keep 1), global batch 16: 2 steps per epoch
    res = fit_unet(refs[:2], refs[2:], tmp_path / "out", model_preset="small", base=4, epochs=4,
                   batch_size=16, lr=1e-3, negative_keep=1.0, crop=16, check_steps=3,
                   num_workers=1, cpus_per_worker=1.0, max_failures=2,
                   test_hooks={"fail_after_epoch": 0, "fail_marker": str(marker),
                               "fail_delay_s": 8.0})
    assert marker.is_file()  # the worker really was killed
    hist = res["history"]
    assert [int(h["epoch"]) for h in hist] == [0, 1, 2, 3]
    assert all(int(h["steps"]) == 2 for h in hist)
    # epoch 0 ran before the kill; the restart began at epoch 1 from epoch 0's checkpoint
    assert [int(h["start_epoch"]) for h in hist] == [0, 1, 1, 1]
    assert [h["checked"] for h in hist] == [False, True, False, True]
    for h in hist:  # an unchecked epoch reports no validation metric at all
        assert (KEEP_METRIC in h) == h["checked"] and ("val_dice" in h) == h["checked"]
    checked = [h for h in hist if h["checked"]]
    best = max(checked, key=lambda h: h[KEEP_METRIC])
    assert res["kept_epoch"] == best["epoch"] and res["kept_by"] == f"max {KEEP_METRIC}"
    _, _, meta = load_unet(res["checkpoint"])
    assert meta["epoch"] == best["epoch"] and meta["checked"] is True
