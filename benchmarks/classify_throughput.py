"""Training throughput of the branched classifier (Sec. 6): loop vs fused executions vs a dense ResNet18 with the
same number of parameters, measured in one run, on one device.

    .venv/bin/python benchmarks/classify_throughput.py                          # the GPU setting: batch 512, bf16
    .venv/bin/python benchmarks/classify_throughput.py --device cpu --batch-size 128 --precision 32
    .venv/bin/python benchmarks/classify_throughput.py --device cpu --batch-size 128 --precision bf16

Variants: ``loop`` (one call per branch), ``fused`` / ``fused_cl`` (grouped convolutions, NCHW / channels-last),
``lanes`` (the branch-minor layout with lane convolutions, channels-last; the CPU default), ``dense`` /
``dense_cl`` (the baseline); a ``_compile`` suffix runs the model through ``torch.compile``. ``--raw-allocator``
leaves glibc's allocator as it is (by default freed memory is kept for reuse, as the CLI does:
:func:`branchspec.devices.keep_freed_memory`).

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

from branchspec.devices import keep_freed_memory
from branchspec.losses import get_loss
from branchspec.nets.lanes import kernels_available
from branchspec.nets.resnet import PAPER_WIDTHS, SlimResNet18, branched_resnet, channels_last, fuse


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
    p.add_argument("--size", type=int, default=32, help="image side (32: CIFAR-10; 8: the embedded digits)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=("bf16", "32"), default=None, help="default: bf16 on CUDA, 32 on CPU")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: CUDA "
                   "loop,fused,fused_cl,fused_cl_compile,dense,dense_cl; CPU loop,fused_cl,lanes,lanes_compile,"
                   "dense_cl,dense_cl_compile)")
    p.add_argument("--raw-allocator", action="store_true", help="do not keep freed memory for reuse")
    args = p.parse_args()
    if not args.raw_allocator:
        keep_freed_memory()
    device = torch.device(args.device)
    if args.variants is None:
        args.variants = ("loop,fused,fused_cl,fused_cl_compile,dense,dense_cl" if device.type == "cuda" else
                         "loop,fused_cl,lanes,lanes_compile,dense_cl,dense_cl_compile")
    if "lanes" in args.variants and device.type == "cpu" and not kernels_available():
        print("the lane kernels could not be built here: the lanes variants run their grouped-convolution fallback")
    dtype = torch.bfloat16 if (args.precision or ("bf16" if device.type == "cuda" else "32")) == "bf16" else torch.float32
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    loss = get_loss("clamped_ce")
    per_branch = count(SlimResNet18(PAPER_WIDTHS))
    widths = dense_widths(args.branches * per_branch)

    def build(name: str):
        torch.manual_seed(0)
        if name.startswith("dense"):
            return SlimResNet18(widths)
        loop = branched_resnet(args.branches, PAPER_WIDTHS, seed=0)
        if name == "loop":
            return loop
        return fuse(loop, "lanes" if name.startswith("lanes") else "grouped")

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, batch {args.batch_size} of {args.size}×{args.size}, {dtype}, M = {args.branches} "
          f"({args.branches * per_branch:,} parameters); dense widths {widths} ({count(SlimResNet18(widths)):,}); "
          f"{'raw allocator' if args.raw_allocator else 'freed memory kept'}")
    results = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        model = build(name).to(device).train()
        xs = x
        if "_cl" in name or name.startswith("lanes"):
            model = channels_last(model)
            xs = x.contiguous(memory_format=torch.channels_last)
        results[name] = throughput(model, xs, y, loss, steps=args.steps, warmup=args.warmup, dtype=dtype,
                                   compile_="compile" in name)
        print(f"  {name:18s} {results[name]:10.1f} img/s", flush=True)
    for base_name in ("dense_cl", "dense_cl_compile", "dense"):
        if base_name in results:
            print(f"ratios against {base_name}:")
            for name, v in results.items():
                print(f"  {name:18s} {v / results[base_name]:6.3f}×")
    if "loop" in results:
        print("speed-up over the loop: " + ", ".join(f"{k} {v / results['loop']:.2f}×" for k, v in results.items()))


if __name__ == "__main__":
    main()
