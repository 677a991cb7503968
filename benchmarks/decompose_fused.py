"""Benchmark: one training-like step (forward + backward) of the branched generator, fused vs loop vs vmap.

    .venv/bin/python benchmarks/decompose_fused.py [--size 32] [--width 0.25] [--batch 8] [--device cuda]

The baseline is the loop execution (one call per branch), measured in the same run on the same weights; the
fused execution runs the M = 9 branches as one network of grouped convolutions (Sec. 7). The outputs of the
three are compared too. On CUDA the step runs under bf16 autocast, as training does.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from branchspec.nets.diffusion import make_residual
from branchspec.nets.stargan import FusedGenerator, GeneratorConfig, branched_generator


def step_seconds(model, x, d, repeats: int, autocast: bool) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, d)
        out.float().square().mean().backward()

    step()  # warm-up
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--branches", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--residual", default="diffusion")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    cfg = GeneratorConfig(img_size=args.size, num_domains=2, width=args.width)
    residual = make_residual(args.residual, num_branches=args.branches, img_size=args.size)
    loop = branched_generator(cfg, args.branches, residual=residual, seed=0).to(device)
    fused = FusedGenerator.from_branched(loop)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    d = torch.randint(2, (args.batch,), device=device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}")
    print(f"generator: M = {args.branches}, {args.size} px, widths {cfg.widths}, R = {args.residual}, batch "
          f"{args.batch}, {sum(q.numel() for q in loop.parameters()):,} parameters, bf16 autocast {autocast}")
    with torch.no_grad():
        reference = loop(x, d)
        diff = (fused(x, d) - reference).abs().max().item()
    base = step_seconds(loop, x, d, args.repeats, autocast)
    print(f"{'baseline: loop (one call per branch)':40s} {base * 1e3:9.1f} ms/step   1.00x")
    loop.execution = "vmap"
    try:
        seconds = step_seconds(loop, x, d, args.repeats, autocast)
        print(f"{'vmap (torch.func)':40s} {seconds * 1e3:9.1f} ms/step {base / seconds:6.2f}x")
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"{'vmap (torch.func)':40s} failed: {str(err).splitlines()[0]}")
    seconds = step_seconds(fused, x, d, args.repeats, autocast)
    print(f"{'fused (grouped convolutions)':40s} {seconds * 1e3:9.1f} ms/step {base / seconds:6.2f}x"
          f"   max |fused − loop| {diff:.1e}")


if __name__ == "__main__":
    main()
