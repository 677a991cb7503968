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


def soft_targets(y: Tensor, num_classes: int) -> Tensor:
    """The paper's targets (Sec. 6): softmax of +1 for the true class and −1 for the others.

    With 10 classes they are e²/(e² + 9) = 0.45085 and 1/(e² + 9) = 0.06102.
    """
    return F.softmax(2.0 * F.one_hot(y.long(), num_classes).to(torch.float32) - 1.0, dim=1)


class _RestoringClamp(torch.autograd.Function):
    """clamp(f, −1, 1) whose gradient is defined at and beyond the bounds.

    Forward: the hard clamp. Backward: the gradient passes inside [−1, 1], and outside only where a descent
    step moves f back towards the interval (f > 1 with a positive gradient, f < −1 with a negative one).
    Elsewhere it is 0, as for the hard clamp. So a logit pushed past a bound is never frozen there when the
    loss wants it back, which is the trap of the literal clamp (docs/classify.md).
    """

    generate_vmap_rule = True  # usable under torch.func (vmap, jacrev, hessian)

    @staticmethod
    def forward(f: Tensor) -> Tensor:
        return f.clamp(-1.0, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        """Forward mode (``torch.func.hessian``): the hard clamp's derivative, 1 inside [−1, 1] and 0 outside."""
        (f,) = ctx.saved_tensors
        return tangent * ((f >= -1) & (f <= 1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (f,) = ctx.saved_tensors
        passes = ((f >= -1) & (f <= 1)) | ((f > 1) & (grad > 0)) | ((f < -1) & (grad < 0))
        return grad * passes


def clamped_cross_entropy(f: Tensor, y: Tensor) -> Tensor:
    """The paper's loss (Sec. 6): CE between softmax(clamp(f, −1, 1)) and the soft targets softmax(±1).

    The clamp's value is the hard clamp; its gradient is defined at the bounds (:class:`_RestoringClamp`). The
    minimum, reached at f = ±1, is the targets' entropy (1.89491 nats for 10 classes); at f = 0 it is ln C.
    """
    return cross_entropy(_RestoringClamp.apply(f), soft_targets(y, f.shape[1]))


def clamped_cross_entropy_literal(f: Tensor, y: Tensor) -> Tensor:
    """The same loss with the literal ``torch.clamp``: zero gradient wherever |f| > 1 (kept for comparison)."""
    return cross_entropy(f.clamp(-1.0, 1.0), soft_targets(y, f.shape[1]))


LOSSES: dict[str, PerSampleLoss] = {
    "l2": l2,
    "cross_entropy": cross_entropy,
    "clamped_ce": clamped_cross_entropy,
    "clamped_ce_literal": clamped_cross_entropy_literal,
}


def get_loss(loss: str | PerSampleLoss) -> PerSampleLoss:
    """A per-sample loss by name, or the callable itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise BranchspecError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable.")
    return LOSSES[loss]
