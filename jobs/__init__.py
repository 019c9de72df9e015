"""Thin Ray entry points: each runs as ``python -m jobs.<name>`` or under ``ray job submit``."""

import os

# Before torch loads libgomp (it reads this once): torch's OpenMP threads otherwise spin while they
# wait for each other, and when other processes hold the cores (Ray workers, the driver, a second
# job) every parallel op waits for a descheduled partner. Measured on this 2-core machine under the
# test suite's load: the small classifier's training step 2.18 s with the default policy, 0.29 s
# with PASSIVE (0.26 s at 1 thread); idle, PASSIVE costs nothing against the default
# (bench/README.md, "Torch threads on shared cores"). An explicit setting is kept.
# Workers of a local cluster inherit it from this process; cluster nodes get it from the Dockerfile.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
