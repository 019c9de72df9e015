"""Shared fixtures: one local Ray cluster per test session (jobs tests only), torch threads, and the
scorer tests' phantom study and classifier."""

from __future__ import annotations

import os

import pytest

# `ray job submit` needs the token when Ray 2.59+ starts a local cluster with token auth.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Keep test logs readable: progress bars are for people, not for CI logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# As jobs/__init__.py, before any test imports torch: with spinning OpenMP threads a tiny network's
# training took 444 s instead of 14 s when another process held one of the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs), shared by every test that needs one.

    Ray is a hard dependency: a missing or broken Ray must fail these tests, not skip them."""
    import ray

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


@pytest.fixture(scope="session")
def scoring_study(tmp_path_factory):
    """One tumour-bearing phantom study (64x64x24) and an untrained small classifier checkpoint,
    written once for the test_score_* modules: (StudyRef, path of the classifier file)."""
    import torch

    from wsseg_core.models import build_slice_classifier, save_classifier
    from wsseg_core.phantom import write_phantom_cohort

    root = tmp_path_factory.mktemp("scoring")
    refs = write_phantom_cohort(root / "cohort", n=1, shape=(64, 64, 24), seed=2, negative_fraction=0.0)
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small")
    save_classifier(root / "classifier.pt", model, pre)
    return refs[0], root / "classifier.pt"


@pytest.fixture
def scoring_layout(tmp_path, scoring_study):
    """A fresh run folder holding the shared classifier: (RunLayout, StudyRef)."""
    import shutil

    from jobs.common import RunLayout

    ref, classifier = scoring_study
    layout = RunLayout(tmp_path / "out")
    layout.classifier.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(classifier, layout.classifier)
    return layout, ref


def _stop_ray_head(temp_dir, wait_s: float = 20.0, gcs_port: int | None = None) -> None:
    """`ray stop` for one head only (`ray stop` itself would also stop the test session's cluster):
    every process a head starts (GCS, raylet, dashboard, workers) carries its temp dir on the
    command line, except the Ray Client server, which carries only the GCS address
    (`--address=<ip>:<gcs_port>`): pass `gcs_port` to stop it too. SIGTERM, then SIGKILL what is
    left, waiting up to `wait_s` after each."""
    import signal
    import time
    from pathlib import Path

    def pids() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    args = (entry / "cmdline").read_bytes().split(b"\0")
                    if (any(str(temp_dir).encode() in a for a in args)
                            or (gcs_port is not None
                                and any(a.endswith(f":{gcs_port}".encode()) for a in args))):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(int(wait_s / 0.5)):
            if not pids():
                return
            time.sleep(0.5)


@pytest.fixture(scope="session")
def stop_ray_head():
    """The function that stops one `ray start --head --temp-dir T` head by its temp dir T."""
    return _stop_ray_head
