"""Which BatchNorm statistics an analysis sees: the batch's own ("train") or the running ones ("eval").

Gradient descent (Eq. 7) moves the training loss, where BatchNorm normalizes with the statistics of the batch.
Inference, and PyHessian, use the running statistics. The Hessian and gradient analyses take either:

- ``"train"``: BatchNorm normalizes with the batch's mean and (biased) variance, the function the training
  steps see. The running statistics are neither read nor updated. The normalization is computed from
  elementary operations, because the fused kernel's nested forward-mode derivatives are wrong in this mode
  (pytorch/pytorch#196699: ``torch.func.hessian`` returns an asymmetric matrix; checked against finite
  differences in ``tests/test_hessian.py``).
- ``"eval"``: BatchNorm uses the running statistics, the function the trained model computes at inference
  (``model.eval()``, as PyHessian does). It is affine there, and the fused kernel's derivatives are right.

In both, every other layer is in eval mode (no dropout), so the loss is a deterministic function of the
parameters, and the model leaves the ``with`` block exactly as it came in.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from branchspec.errors import BranchspecError

BATCHNORM_MODES = ("train", "eval")


def check_batchnorm_mode(mode: str) -> str:
    if mode not in BATCHNORM_MODES:
        raise BranchspecError(f"batchnorm must be one of {BATCHNORM_MODES}, got {mode!r}.")
    return mode


def _batch_statistics_forward(bn: _BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm with the batch's statistics, from elementary operations (correct derivatives of every order)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


@contextmanager
def batchnorm_mode(model: nn.Module, mode: str):
    """Evaluate ``model`` with BatchNorm in ``mode`` ("train": batch statistics, "eval": running statistics)."""
    check_batchnorm_mode(mode)
    training = {m: m.training for m in model.modules()}
    # every BatchNorm that will normalize with batch statistics (in "eval" mode: those without running ones)
    patched = [m for m in model.modules()
               if isinstance(m, _BatchNorm) and (mode == "train" or m.running_mean is None)]
    model.eval()
    try:
        for m in patched:
            m.forward = types.MethodType(_batch_statistics_forward, m)
        yield model
    finally:
        for m in patched:
            del m.forward
        for m, was_training in training.items():
            m.training = was_training
