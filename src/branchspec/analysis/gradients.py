"""The gradient factorization of a branched model, Eq. (10)-(11).

Because θ_k ∩ θ_l = ∅, the gradient of the loss with respect to branch k's parameters factorizes per sample:

    ∇_{θ_k} L(x) = (∇_{θ_k} v_k(x))ᵀ · dL/df(x)
                   └ distributive ┘   └ collaborative ┘

The collaborative part is shared by all branches; the distributive part belongs to branch k alone.
Both are computed exactly: dL/df by autograd on the total output, ∇_{θ_k} v_k by ``torch.func.jacrev``.
Batch-coupled layers (BatchNorm in training mode) are handled exactly, since the Jacobian is taken of the
whole batch's output; Eq. (10) then holds for the batch sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev

from branchspec.branched import Branched, unchanged_buffers
from branchspec.losses import PerSampleLoss, get_loss


@dataclass
class GradientFactorization:
    """Both factors of Eq. (10) for a batch of B samples with outputs of shape ``out``."""

    collaborative: Tensor  # [B, *out]: dL(x_i)/df(x_i)
    distributive: dict[int, dict[str, Tensor]]  # branch k -> name -> [B, *out, *param.shape]: ∂v_k(x_i)/∂θ_k

    def per_sample_gradient(self, k: int) -> dict[str, Tensor]:
        """∇_{θ_k} L(x_i) = D_dist^k(x_i)ᵀ · D_collab(x_i) for every sample i: name -> [B, *param.shape]."""
        collab = self.collaborative.flatten(1)
        out: dict[str, Tensor] = {}
        for name, dist in self.distributive[k].items():
            b = dist.shape[0]
            pshape = dist.shape[self.collaborative.dim() :]
            flat = dist.reshape(b, collab.shape[1], -1)
            out[name] = torch.einsum("bc,bcp->bp", collab, flat).reshape(b, *pshape)
        return out

    def gradient(self, k: int) -> dict[str, Tensor]:
        """∇_{θ_k} Σ_i L(x_i), Eq. (10) summed over the batch."""
        return {name: g.sum(0) for name, g in self.per_sample_gradient(k).items()}


def _as_tuple(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def collaborative_part(model: Branched, inputs, target: Tensor, loss: str | PerSampleLoss = "l2") -> Tensor:
    """dL/df(x_i) for every sample: the factor shared by all branches (Eq. 10)."""
    loss_fn = get_loss(loss)
    with torch.enable_grad(), unchanged_buffers(model):
        f = model(*_as_tuple(inputs)).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(f, target).sum(), f)
    return grad


def distributive_part(model: Branched, k: int, inputs) -> dict[str, Tensor]:
    """∂v_k(x_i)/∂θ_k for every sample: name -> [B, *out, *param.shape] (Eq. 10)."""
    with unchanged_buffers(model):
        branch_inputs = model.inputs_of_branch(k, *_as_tuple(inputs))
    params = {n: p.detach() for n, p in model.named_branch_parameters(k).items()}
    with torch.enable_grad():
        return jacrev(lambda p: model.branch_call(k, p, *branch_inputs))(params)


def gradient_factorization(
    model: Branched,
    inputs,
    target: Tensor,
    loss: str | PerSampleLoss = "l2",
    branches=None,
) -> GradientFactorization:
    """Both parts of Eq. (10) for the given branches (all by default) on one batch."""
    subset = model.check_subset(branches)
    return GradientFactorization(
        collaborative=collaborative_part(model, inputs, target, loss),
        distributive={k: distributive_part(model, k, inputs) for k in subset},
    )
