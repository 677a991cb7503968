"""Training throughput of the branched classifier (Sec. 6): loop vs fused executions vs a dense ResNet18 with the
same number of parameters, measured in one run, on one device.

    .venv/bin/python benchmarks/classify_throughput.py                          # the GPU setting: batch 512, bf16
    .venv/bin/python benchmarks/classify_throughput.py --device cpu --batch-size 64 --steps 3 --warmup 1

A step is forward, the paper's clamped soft-target CE, backward and an SGD step on a batch already on the
device (data loading is not measured: on the GPU the data set is resident there). Each variant is timed over
``--steps`` steps after ``--warmup`` steps; the device is synchronized around the timed loop. The dense
baseline is the CIFAR ResNet18 with its widths scaled so that its parameter count is closest to M × 79,262.

Anchor (issue #3, H100, batch 512, bf16): loop 3.4k img/s, cuDNN grouped convolutions 12k img/s, dense 45k img/s;
target: fused ≥ 0.7× dense.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from branchspec.losses import get_loss
from branchspec.nets.resnet import PAPER_WIDTHS, SlimResNet18, branched_resnet, fuse


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def dense_widths(target: int) -> tuple[int, ...]:
    """ResNet18 widths α·(64, 128, 256, 512), rounded, with the parameter count closest to ``target``."""
    best = None
    for step in range(1, 2000):
        widths = tuple(max(1, round(step / 1000 * w)) for w in (64, 128, 256, 512))
        gap = abs(count(SlimResNet18(widths)) - target)
        if best is None or gap < best[0]:
            best = (gap, widths)
        if count(SlimResNet18(widths)) > target:
            break
    return best[1]


def throughput(model, x, y, loss, *, steps: int, warmup: int, dtype, compile_: bool) -> float:
    """Images per second of SGD training steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile_ else model
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        with autocast:
            f = forward(x)
        loss(f.float(), y).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--branches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=("bf16", "32"), default=None, help="default: bf16 on CUDA, 32 on CPU")
    p.add_argument("--variants", default="loop,fused,fused_cl,fused_cl_compile,dense,dense_cl",
                   help="comma-separated subset of the variants")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if (args.precision or ("bf16" if device.type == "cuda" else "32")) == "bf16" else torch.float32
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    loss = get_loss("clamped_ce")
    per_branch = count(SlimResNet18(PAPER_WIDTHS))
    widths = dense_widths(args.branches * per_branch)

    def build(name: str):
        torch.manual_seed(0)
        if name.startswith("dense"):
            return SlimResNet18(widths)
        loop = branched_resnet(args.branches, PAPER_WIDTHS, seed=0)
        return loop if name == "loop" else fuse(loop)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, batch {args.batch_size}, {dtype}, M = {args.branches} "
          f"({args.branches * per_branch:,} parameters); dense widths {widths} ({count(SlimResNet18(widths)):,})")
    results = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        model = build(name).to(device).train()
        xs = x
        if "_cl" in name:
            model = model.to(memory_format=torch.channels_last)
            xs = x.contiguous(memory_format=torch.channels_last)
        results[name] = throughput(model, xs, y, loss, steps=args.steps, warmup=args.warmup, dtype=dtype,
                                   compile_="compile" in name)
        print(f"  {name:18s} {results[name]:10.1f} img/s", flush=True)
    base = max((v for k, v in results.items() if k.startswith("dense")), default=None)
    if base:
        print("ratios against the fastest dense variant (target for fused: ≥ 0.70):")
        for name, v in results.items():
            print(f"  {name:18s} {v / base:6.3f}×")
    if "loop" in results:
        print("speed-up over the loop: " + ", ".join(f"{k} {v / results['loop']:.2f}×" for k, v in results.items()))


if __name__ == "__main__":
    main()
