"""Per-sample losses L(f(x_i), y_i) -> [B], in one place.

Everything here returns one value per sample so that the analyses can take dL/df per sample (the
collaborative part of Eq. 10). Training reduces them with a mean.

Sign conventions follow the calculus, not the paper's typography: for L² = ½‖f − y‖² we use
dL/df = f − y (the paper's Eq. 2 prints y − f), and for cross-entropy L = −Σ_c p_c log s_c(f) we use
dL/df = s(f) − p (Eq. 3 omits the minus sign of the loss).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from branchspec.errors import BranchspecError

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def l2(f: Tensor, y: Tensor) -> Tensor:
    """½‖f − y‖² per sample (Sec. 3, Eq. 2)."""
    return 0.5 * (f - y).pow(2).flatten(1).sum(1)


def cross_entropy(f: Tensor, y: Tensor) -> Tensor:
    """Softmax cross-entropy per sample (Eq. 3); ``y`` holds class indices or target distributions."""
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.cross_entropy(f, y.long(), reduction="none")
    return -(y * F.log_softmax(f, dim=1)).sum(1)


LOSSES: dict[str, PerSampleLoss] = {"l2": l2, "cross_entropy": cross_entropy}


def get_loss(loss: str | PerSampleLoss) -> PerSampleLoss:
    """A per-sample loss by name, or the callable itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise BranchspecError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable.")
    return LOSSES[loss]
