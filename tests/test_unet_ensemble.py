"""Issue 23: the U-Net ensemble (`wsseg_core.unet.UNetEnsemble`, `jobs.train_unet.fit_unet(members=)`,
`jobs.pipeline --unet-members`): its probability is the members' mean, it saves and loads as one
U-Net, and the job trains one Ray run per member, reusing the single network's run as member 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsseg_core.models import SlicePreprocessor
from wsseg_core.unet import (UNet2D, UNetEnsemble, load_unet, predict_volume_unet, save_unet,
                             segment_volume_unet)


def _members(n: int, context: int = 0) -> list[UNet2D]:
    nets = []
    for k in range(n):
        torch.manual_seed(100 + k)
        net = UNet2D(base=2, input_size=32, context=context)
        # BN running statistics other than the init's, so eval mode is not the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        nets.append(net.eval())
    return nets


def test_probability_is_the_mean_of_the_members_softmax():
    nets = _members(3)
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        # the reference, by hand: each member's softmax, then the arithmetic mean
        ref = sum(torch.softmax(n(x), dim=1) for n in nets) / 3
        got = torch.softmax(UNetEnsemble(nets).eval()(x), dim=1)
    assert torch.allclose(got, ref, atol=1e-6)
    # and it is not any one member's
    with torch.no_grad():
        assert not torch.allclose(got, torch.softmax(nets[0](x), dim=1), atol=1e-3)


def test_one_member_is_that_network():
    (net,) = _members(1)
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(UNetEnsemble([net])(x), dim=1), torch.softmax(net(x), dim=1),
                              atol=1e-6)


def test_members_must_agree_on_their_input():
    with pytest.raises(ValueError, match="context"):
        UNetEnsemble(_members(1) + _members(1, context=1))
    with pytest.raises(ValueError, match="one or more"):
        UNetEnsemble([])


def test_saved_ensemble_loads_and_predicts_the_mean_volume(tmp_path):
    nets = _members(2)
    pre = SlicePreprocessor(input_size=32)
    rng = np.random.default_rng(0)
    suv = rng.uniform(0, 8, (32, 32, 5)).astype(np.float32)
    ct = rng.uniform(-900, 300, (32, 32, 5)).astype(np.float32)
    save_unet(tmp_path / "ens.pt", UNetEnsemble(nets), pre, meta={"members": [{"k": 0}, {"k": 1}]})
    save_unet(tmp_path / "one.pt", nets[0], pre)
    # a single network stays a version-1 file, which code from before the ensemble reads
    assert torch.load(tmp_path / "one.pt", weights_only=True)["version"] == 1
    assert torch.load(tmp_path / "ens.pt", weights_only=True)["version"] == 2
    model, pre2, meta = load_unet(tmp_path / "ens.pt")
    assert isinstance(model, UNetEnsemble) and len(model.members) == 2 and meta["members"][1] == {"k": 1}
    assert pre2.to_dict() == pre.to_dict()
    ref = np.mean([predict_volume_unet(n, pre, suv, ct) for n in nets], axis=0)
    got = predict_volume_unet(model, pre2, suv, ct)
    assert np.allclose(got, ref, atol=1e-5)
    assert np.array_equal(segment_volume_unet(model, pre2, suv, ct, threshold=0.5), (got > 0.5).astype(np.uint8))


@pytest.mark.slow
def test_fit_unet_ensemble_reuses_the_single_run_as_member_0(tmp_path, ray_cluster):
    from jobs.train_unet import fit_unet, member_file, tune_threshold, unet_path
    from wsseg_core.phantom import write_phantom_cohort

    refs = write_phantom_cohort(tmp_path / "cohort", n=3, shape=(48, 48, 16), seed=2, negative_fraction=0.0)
    kw = dict(model_preset="small", base=4, epochs=2, batch_size=16, lr=1e-3, num_workers=1,
              cpus_per_worker=1.0, max_failures=0, schedule="cosine", crop=16, seed=5)
    out = tmp_path / "out"
    single = fit_unet(refs[:2], refs[2:], out, **kw)
    single_sha = single["record"]["sha256"]
    assert set(single["training_runs"]) == {"unet"}

    ens = fit_unet(refs[:2], refs[2:], out, members=2, **kw)
    models = out / "models"
    # member 0 is the single network's run, read back (same fingerprint), not retrained
    assert ens["members"][0]["run_name"] == single["run_name"]
    assert ens["members"][0]["record"]["sha256"] == single_sha
    assert ens["members"][1]["run_name"] != single["run_name"]
    assert set(ens["training_runs"]) == {"unet", "unet_m1"}
    assert (models / member_file(0)).is_file() and (models / member_file(1)).is_file()
    model, _, meta = load_unet(unet_path(out))
    assert isinstance(model, UNetEnsemble) and len(model.members) == 2
    assert [m["run_name"] for m in meta["members"]] == [f["run_name"] for f in ens["members"]]
    # the two members are different draws (seed 5 and 6), so they are different networks
    m0, _, _ = load_unet(models / member_file(0))
    m1, _, _ = load_unet(models / member_file(1))
    assert any(not torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert ens["record"]["sha256"] != single_sha and len(ens["record"]["members"]) == 2
    # the threshold is searched on the ensemble's probabilities
    entry = tune_threshold(refs[2:], out, refs[:2])
    saved = json.loads((out / "thresholds.json").read_text())["methods"]["UNet"]
    assert saved["threshold"] == entry["threshold"] and entry["n"] == 1


def test_members_must_be_a_positive_integer(tmp_path):
    from jobs.train_unet import fit_unet

    with pytest.raises(ValueError, match="members"):
        fit_unet([], [], tmp_path, members=0)


def test_cli_passes_members():
    from jobs.pipeline import parse_args
    from jobs.train_unet import build_parser

    assert build_parser().parse_args(["--cohort", "c", "--out", "o", "--members", "3"]).members == 3
    assert parse_args(["--out", "o", "--unet-members", "3"]).unet_members == 3
    assert parse_args(["--out", "o"]).unet_members == 1
