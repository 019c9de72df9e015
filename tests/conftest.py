"""Shared fixtures: one local Ray cluster per test session (jobs tests only)."""

from __future__ import annotations

import os

import pytest

# `ray job submit` needs the token when Ray 2.59+ starts a local cluster with token auth.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Keep test logs readable: progress bars are for people, not for CI logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs), shared by every test that needs one."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def two_torch_threads():
    """Torch on 2 threads for the test (the CI machine's 2 cores), the caller's count restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
