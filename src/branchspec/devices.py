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
        raise BranchspecError(f"--device {device!r} is not a device; give auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BranchspecError(f"--device {device} was asked for, but no GPU is visible; use --device cpu.")
    return dev
