"""Thin Ray entry points: each runs as ``python -m jobs.<name>`` or under ``ray job submit``."""

import os

# Before torch loads libgomp (it reads this once): torch's OpenMP threads otherwise spin while they
# wait for each other, and when anything else holds a core (another Ray worker, the driver, a
# second job) every parallel op waits a scheduler tick for a descheduled thread. Measured on this
# 2-core machine with one core busy: the small classifier's training step 2.18 s with 2 threads,
# 0.29 s with PASSIVE, 0.26 s with 1 thread (bench/bench_threads.py). An explicit setting is kept.
# Workers of a local cluster inherit it from this process; cluster nodes get it from the Dockerfile.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
