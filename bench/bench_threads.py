"""Torch CPU threads when cores are shared: the small classifier's training step under 1 or 2 threads
and libgomp's OMP_WAIT_POLICY (unset: threads spin a while, then sleep; ACTIVE: they spin while
they wait for each other; PASSIVE: they sleep at once), with `--busy` other processes each holding a core, as Ray's driver, actors and a second
job do on a small machine.

    .venv/bin/python -m bench.bench_threads [--steps 20] [--busy 1] [--threads 1 2]

Each setting runs in its own process: libgomp reads OMP_WAIT_POLICY once, when torch loads it.
Prints seconds per step (wall and CPU) per setting. jobs/__init__.py and tests/conftest.py set
PASSIVE (unless set already) because of what this measures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def child(threads: int, steps: int, batch: int) -> dict:
    """Time `steps` AdamW steps of the small preset's classifier on random (batch, 2, S, S) input."""
    import torch

    from wsseg_core.models import build_slice_classifier

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, pre = build_slice_classifier("small")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 2, pre.input_size, pre.input_size)
    y = torch.randint(0, 2, (batch,))

    def step() -> None:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # first-call set-up out of the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return {"wall_s": (time.perf_counter() - wall) / steps, "cpu_s": (time.process_time() - cpu) / steps}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--busy", type=int, default=1, help="processes holding a core each while timing")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--policies", nargs="+", default=["unset", "ACTIVE", "PASSIVE"],
                    help="OMP_WAIT_POLICY values; 'unset' = libgomp's default")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.batch)))
        return []

    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    rows = []
    try:
        print(f"small classifier, batch {args.batch}, {args.steps} steps; {os.cpu_count()} cores, "
              f"{args.busy} of them held by a busy process")
        print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} {'wall s/step':>11} {'CPU s/step':>10}")
        for threads in args.threads:
            for policy in args.policies:
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                if policy != "unset":  # unset: libgomp's default (spin ~300k rounds, then sleep)
                    env["OMP_WAIT_POLICY"] = policy
                out = subprocess.run([sys.executable, "-m", "bench.bench_threads", "--child", str(threads),
                                      "--steps", str(args.steps), "--batch", str(args.batch)],
                                     env=env, capture_output=True, text=True, check=True)
                r = {"threads": threads, "policy": policy, **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append(r)
                print(f"{threads:>7} {policy:>15} {r['wall_s']:>11.3f} {r['cpu_s']:>10.3f}", flush=True)
    finally:
        stop.set()
        for p in spinners:
            p.join(5)
    return rows


if __name__ == "__main__":
    main()
