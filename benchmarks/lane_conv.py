"""One 3×3 convolution of each stage of the paper's branches, forward + backward, in one run: the dense ResNet18
of equal parameters (channels-last), the grouped convolution of the fused execution (channels-last), and the
lane convolution of the lanes execution (nets/lanes.py).

    .venv/bin/python benchmarks/lane_conv.py [--batch 128] [--branches 16]

Batch of random activations; each figure is the mean of 5 timed repeats after 2 warm-ups, in milliseconds.
Freed memory is kept for reuse, as in the CLI.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from branchspec.devices import keep_freed_memory
from branchspec.nets.lanes import kernels_available, lane_conv2d

STAGES = [(5, 22, 32), (11, 43, 16), (21, 86, 8), (43, 172, 4)]  # (per-branch channels, dense channels, side)


def ms(fn, repeats: int = 5) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def conv(c: int, hw: int, groups: int, batch: int) -> float:
    x = torch.randn(batch, c * groups, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(c * groups, c, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step():
        y = F.conv2d(x, w, padding=1, groups=groups)
        y.backward(torch.ones_like(y))

    return ms(step)


def lanes(c: int, hw: int, m: int, batch: int) -> float:
    x = torch.randn(batch, c * m, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, 3, c, c, m, requires_grad=True)

    def step():
        y = lane_conv2d(x, w, 1, 1)
        y.backward(torch.ones_like(y))

    return ms(step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--branches", type=int, default=16)
    args = p.parse_args()
    keep_freed_memory()
    print(f"lane kernels built: {kernels_available()}; batch {args.batch}, M = {args.branches}, "
          f"threads {torch.get_num_threads()}")
    print("channels  side   dense_cl   grouped_cl   lanes   (ms, forward + backward)")
    for c, dense, hw in STAGES:
        d, g, ln = conv(dense, hw, 1, args.batch), conv(c, hw, args.branches, args.batch), lanes(c, hw, args.branches,
                                                                                                  args.batch)
        print(f"{c:8d} {hw:5d} {d:10.1f} {g:12.1f} {ln:7.1f}   lanes/dense {ln / d:.2f}×, grouped/lanes {g / ln:.2f}×")


if __name__ == "__main__":
    main()
