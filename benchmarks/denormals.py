"""Training steps of a classifier with and without subnormal floats flushed to zero, in one run.

    .venv/bin/python benchmarks/denormals.py --run RUN [--steps 5]

RUN is a `branchspec classify train` run whose late steps are slow, such as a cell of the silent-branch grid with
Σ lr·wd = 2 (runs/silent/M16_restoring_heads1overM_cosine150_wd-2/seed0): its checkpoint is trained on with
SGD (lr 0.03, momentum 0.9, its weight decay) on one batch of 128 of its training split, in its training
execution (auto). One thread: the flush flag belongs to a thread, so with one thread it can be switched within
the run (the CLI sets it before torch starts any thread; see branchspec.devices.flush_denormals). Each figure is
the mean of ``--steps`` steps after one warm-up, in seconds; the two settings alternate twice.
"""

from __future__ import annotations

import argparse
import time

import torch

from branchspec import runs
from branchspec.losses import LOSSES
from branchspec.nets.resnet import as_execution, choose_execution


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    run = runs.open(args.run).expect("classify train")
    model = run.model("last")
    execution, _ = choose_execution("auto", model.num_branches, "cpu")
    model = as_execution(model, execution).train()
    loss_fn = LOSSES[run.config["loss"]]
    images, labels, _ = run.data("train")
    x, y = images[:128].contiguous(memory_format=torch.channels_last), labels[:128]
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9,
                          weight_decay=float(run.config["recipe"]["weight_decay"]))

    def seconds_per_step() -> float:
        loss_fn(model(x), y).mean().backward()
        opt.step()
        opt.zero_grad()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss_fn(model(x), y).mean().backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - start) / args.steps

    print(f"{args.run}: execution {execution}, one thread, batch 128")
    for _ in range(2):
        times = {}
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            times[flush] = seconds_per_step()
        print(f"subnormals kept {times[False]:.3f} s/step, flushed {times[True]:.3f} s/step: "
              f"flushing is {times[False] / times[True]:.2f}x faster")


if __name__ == "__main__":
    main()
