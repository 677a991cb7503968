"""The device an analysis runs on: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from branchspec.errors import BranchspecError


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` and ``"auto"`` pick CUDA when it is available."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BranchspecError(f"`device` {device!r} is not a device; give auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BranchspecError(f"`device` {device} was asked for, but no GPU is visible; use `device` cpu.")
    return dev


def flush_denormals() -> bool:
    """Treat subnormal floats (|x| < 1.2e-38 in float32) as zero on this x86 CPU, in every thread started later.

    A subnormal operand makes an x86 floating-point instruction take up to a hundred times longer. Long runs with
    strong weight decay produce them in the gradients: the digits classifier of the silent-branch grid (Σ lr·wd
    = 2) trained 10-20 times slower per epoch from epoch ~40 on, and a convolution backward step on its
    checkpoint takes 3.3 times longer with them than without (docs/results.md, "CPU performance"). Flushing
    changes only values below 1.2e-38, which no result here resolves. The flag is per thread and threads copy
    it when they start, so this must run before torch starts its intra-op threads: the CLI calls it first.
    Returns whether the CPU supports it.
    """
    import torch

    return bool(torch.set_flush_denormal(True))


def keep_freed_memory() -> bool:
    """On Linux with glibc, keep freed memory in the process for reuse instead of returning it to the system.

    glibc serves every allocation above 32 MB (CPU activations of a training step) with a fresh ``mmap`` and
    unmaps it when freed, so the next step takes a page fault for every 4 kB page again; on a 2-core CPU that
    costs as much time as the convolutions of a branched ResNet18 step (docs/results.md, "CPU performance").
    This raises glibc's mmap and trim thresholds (``mallopt``) for the rest of the process; the price is that
    the process keeps the memory of its largest step. Returns whether it was applied. The CLI calls it before
    any training or analysis; library users may call it themselves.
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    return bool(libc.mallopt(mmap_threshold, 1 << 30)) and bool(libc.mallopt(trim_threshold, (1 << 31) - 1))
