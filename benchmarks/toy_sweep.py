"""Benchmark: the full Fig. 3 sweep (M = 2..30, 1000 trials, 10,000 steps) against a per-M baseline.

    .venv/bin/python benchmarks/toy_sweep.py [--trials 1000] [--steps 10000] [--engines numba,torch]

The baseline is the straightforward vectorization: one torch tensor program per M (`train_per_m`), measured in
the same run. Target (issue #2): the sweep in 10 s or less on a 2-core CPU. Compilation (numba, cached on disk
after the first run) is timed separately.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from branchspec.data.toy import TOY1
from branchspec.train.toy import ToyTraining, train_per_m, train_toy

TARGET_SECONDS = 10.0


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--branches", default="2-30")
    p.add_argument("--engines", default="numba,torch", help="engines to time besides the baseline")
    args = p.parse_args()
    lo, hi = (int(v) for v in args.branches.split("-"))
    ms = list(range(lo, hi + 1))
    cfg = ToyTraining(steps=args.steps)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"sweep: M = {lo}..{hi}, {args.trials} trials, {args.steps} steps, "
          f"{args.trials * sum(ms)} branch-trials")

    compile_s, _ = timed(lambda: train_toy(TOY1, [2], 16, ToyTraining(steps=1), engine="numba"))
    print(f"numba compile (or cache load): {compile_s:.2f} s")

    base_s, base = timed(lambda: train_per_m(TOY1, ms, args.trials, cfg))
    print(f"{'baseline: torch, one program per M':42s} {base_s:8.2f} s   1.00x")
    for engine in [e for e in args.engines.split(",") if e]:
        seconds, out = timed(lambda: train_toy(TOY1, ms, args.trials, cfg, engine=engine))
        diff = max(float(np.abs(out[m][0] - base[m][0]).max()) for m in ms)
        verdict = "meets" if seconds <= TARGET_SECONDS else "misses"
        print(f"{'engine ' + engine + ' (all M in one program)':42s} {seconds:8.2f} s {base_s / seconds:6.2f}x"
              f"   max |Δw| vs baseline {diff:.1e}   {verdict} the {TARGET_SECONDS:.0f} s target")


if __name__ == "__main__":
    main()
