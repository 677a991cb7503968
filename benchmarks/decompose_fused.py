"""Benchmark: training iterations of the class-transfer GAN (Sec. 7), fused vs loop vs vmap generator, in one run.

    .venv/bin/python benchmarks/decompose_fused.py [--size 32] [--width 0.25] [--batch 8] [--device cuda]
    .venv/bin/python benchmarks/decompose_fused.py --width 0.03125 --d-width 0.0625      # the CPU configuration

One iteration is what ``decompose train`` does per step, through the same LightningModule and Trainer: G's
forward (with R), D's loss with R1 and its Adam step, G's non-saturating loss, its backward and Adam step, and
the EMA update. The rate is iterations per second after ``--warmup`` iterations. The baseline is the loop
execution (one call per branch) on the same weights and batches; the fused execution runs the M = 9 branches as
one network of grouped convolutions. The parts every execution shares (R, D, the optimizers) are timed
alone too, so the share that a faster generator can save is visible (Amdahl's law). ``--raw-allocator``
leaves glibc's allocator as it is (by default freed memory is kept, as the CLI does).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import lightning as L
import torch

from branchspec.devices import keep_freed_memory
from branchspec.nets.stargan import GeneratorConfig
from branchspec.rundir import RunDir
from branchspec.studies.decompose import DecomposeConfig, build_discriminator, build_generator, training_data
from branchspec.train.gan import ClassTransferGAN, GANRecipe
from branchspec.train.lightning import make_trainer


class Clock(L.Callback):
    """The wall-clock from the start of iteration ``warmup`` to the end of the last one."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if int(module.iteration) == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def iterations_per_second(cfg: DecomposeConfig, data, warmup: int, iterations: int, device: str) -> float:
    module = ClassTransferGAN(build_generator(cfg), build_discriminator(cfg), cfg.recipe, data,
                              batch_size=cfg.batch_size, seed=cfg.seed, iterations=warmup + iterations)
    clock = Clock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(RunDir(tmp), max_steps=2 * (warmup + iterations), accelerator=device, devices=1,
                               callbacks=[clock], enable_progress_bar=False, use_distributed_sampler=False)
        trainer.fit(module)
    return iterations / (clock.end - clock.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--d-width", type=float, default=1.0)
    p.add_argument("--branches", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--residual", default="diffusion")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--executions", default="loop,fused")
    p.add_argument("--raw-allocator", action="store_true")
    args = p.parse_args()
    if not args.raw_allocator:
        keep_freed_memory()
    base = DecomposeConfig(size=args.size, num_scenes=200, branches=args.branches,
                           generator=GeneratorConfig(img_size=args.size, width=args.width), residual=args.residual,
                           d_width=args.d_width, recipe=GANRecipe(), batch_size=args.batch).check()
    data = training_data(base, show_progress=False)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {'raw allocator' if args.raw_allocator else 'freed memory kept'}")
    print(f"GAN: M = {args.branches}, {args.size} px, generator widths {base.generator.widths}, D width "
          f"{args.d_width}, R = {args.residual}, batch {args.batch}; {args.iterations} iterations after "
          f"{args.warmup} of warm-up")
    rates = {}
    for execution in args.executions.split(","):
        cfg = dataclasses.replace(base, execution=execution)
        rates[execution] = iterations_per_second(cfg, data, args.warmup, args.iterations, args.device)
        print(f"  {execution:6s} {rates[execution]:7.2f} it/s  {1e3 / rates[execution]:8.1f} ms/iteration   "
              f"{rates[execution] / rates[args.executions.split(',')[0]]:.2f}× the {args.executions.split(',')[0]}",
              flush=True)
    # the shared parts alone: the same R and D with branches of one channel (fused), so nearly no branch work
    shared = dataclasses.replace(base, generator=GeneratorConfig(img_size=args.size, width=1e-9), execution="fused")
    rate = iterations_per_second(shared, data, args.warmup, args.iterations, args.device)
    print(f"  shared parts (R, D, the optimizers; branches of one channel): {1e3 / rate:8.1f} ms/iteration")


if __name__ == "__main__":
    main()
