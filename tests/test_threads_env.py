"""OpenMP threads sleep instead of spinning in every wsseg process (jobs/__init__.py says why;
bench/bench_threads.py measures it): the job's driver and the workers of the local Ray cluster it
starts get OMP_WAIT_POLICY=PASSIVE, and a user's own setting is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**base, "PYTHONPATH": str(REPO), **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_job_and_its_local_ray_workers_use_passive_openmp_waits():
    code = ("import os, ray; from jobs.common import init_ray; init_ray(num_cpus=1); "
            "f = ray.remote(lambda: os.environ.get('OMP_WAIT_POLICY')); "
            "print('driver', os.environ.get('OMP_WAIT_POLICY'), 'worker', ray.get(f.remote())); ray.shutdown()")
    assert _python(code) == "driver PASSIVE worker PASSIVE"


def test_an_explicit_openmp_wait_policy_is_kept():
    code = "import jobs, bench, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _python("import bench, os; print(os.environ.get('OMP_WAIT_POLICY'))") == "PASSIVE"
