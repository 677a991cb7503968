"""The gradient factorization of a branched model, Eq. (10)-(11).

Because θ_k ∩ θ_l = ∅, the gradient of the loss with respect to branch k's parameters factorizes per sample:

    ∇_{θ_k} L(x) = (∇_{θ_k} v_k(x))ᵀ · dL/df(x)
                   └ distributive ┘   └ collaborative ┘

The collaborative part is shared by all branches; the distributive part belongs to branch k alone.
Both are computed exactly: dL/df by autograd on the total output, ∇_{θ_k} v_k by ``torch.func.jacrev``.
Batch-coupled layers (BatchNorm in training mode) are handled exactly, since the Jacobian is taken of the
whole batch's output; Eq. (10) then holds for the batch sum.

Sec. 8's equilibrium statistics: how often the distributive part of a (parameter, sample) pair is near zero,
and how often a sample's collaborative part is (:func:`equilibrium_statistics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev
from tqdm.auto import tqdm

from branchspec.analysis.batchnorm import batchnorm_mode
from branchspec.analysis.selection import select_parameters
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


# ------------------------------------------------------------------------------- branch equilibrium (Sec. 8)
NEAR_ZERO = (1e-3, 1e-2, 1e-1)  # the tolerances at which the equilibrium statistics are reported


def per_sample_distributive_part(model: Branched, k: int, inputs, names=None) -> dict[str, Tensor]:
    """∂v_k(x_i)/∂θ_k for every sample, each sample on its own: name -> [B, *out, *param.shape] (Eq. 11).

    Unlike :func:`distributive_part`, which differentiates the whole batch's output (and so includes the
    coupling of BatchNorm's batch statistics), this treats the branch as a per-sample function, one
    ``torch.func.vmap`` over the samples: B times less work. Use it where the branch has no batch coupling
    (BatchNorm in eval mode). ``names`` restricts θ_k to those parameters.
    """
    with unchanged_buffers(model):
        branch_inputs = model.inputs_of_branch(k, *_as_tuple(inputs))
    params = {n: p.detach() for n, p in model.named_branch_parameters(k).items()}
    chosen = {n: params[n] for n in (names or params)}

    def one(*xs):
        def out(selected):
            return model.branch_call(k, {**params, **selected}, *(x.unsqueeze(0) for x in xs))[0]

        return jacrev(out)(chosen)

    with torch.enable_grad():
        return torch.vmap(one)(*branch_inputs)


@dataclass
class EquilibriumStatistics:
    """Sec. 8 on a set of samples, at each tolerance of ``tolerances``.

    ``distributive_near_zero[t, k]``: the fraction of (parameter, sample) pairs of branch k whose distributive
    part ∂v_k(x)/∂w ∈ R^C has a norm ≤ tol · s(x), s(x) the root mean square of that norm over every branch
    and parameter for the same sample (a scale-free "near zero").
    ``collaborative_near_zero[t]``: the fraction of samples with ‖dL/df(x)‖ ≤ tol (an absolute tolerance: the
    collaborative part is a residual of the fit, f − y for L², softmax − target for cross-entropy). It is one
    number for all branches, since every branch shares it (Eq. 10).
    """

    tolerances: tuple[float, ...]
    branches: tuple[int, ...]
    distributive_near_zero: Tensor  # [T, K]
    collaborative_near_zero: Tensor  # [T]
    samples: int


def equilibrium_statistics(model: Branched, inputs, target: Tensor, loss: str | PerSampleLoss = "l2", *,
                           params: str = "*", branches=None, tolerances=NEAR_ZERO, sample_chunk: int = 32,
                           show_progress: bool = False) -> EquilibriumStatistics:
    """The equilibrium statistics of Sec. 8 (see :class:`EquilibriumStatistics`) over the samples of ``inputs``.

    Per-sample gradients need a per-sample function, so BatchNorm runs on its running statistics (eval
    mode). The samples are processed ``sample_chunk`` at a time: memory holds chunk × C × |θ_k| numbers.
    """
    sel = select_parameters(model, params, branches)
    tol = torch.as_tensor([float(t) for t in tolerances], dtype=torch.float64)
    inputs = _as_tuple(inputs)
    n = len(target)
    counts = torch.zeros(len(tol), len(sel.branches), dtype=torch.float64)
    with batchnorm_mode(model, "eval"):
        collab = collaborative_part(model, inputs, target, loss).flatten(1).double().norm(dim=1).cpu()
        for start in tqdm(range(0, n, int(sample_chunk)), desc="equilibrium statistics", unit="chunk",
                          disable=not show_progress):
            chunk = tuple(x[start:start + int(sample_chunk)] for x in inputs)
            b = len(chunk[0])
            norms2 = []  # per branch [b, |θ_k,S|]: ‖∂v_k(x)/∂w‖² summed over the outputs
            for k in sel.branches:
                dist = per_sample_distributive_part(model, k, chunk, sel.names)
                norms2.append(torch.cat([dist[name].reshape(b, -1, math.prod(shape)).double().pow(2).sum(1)
                                         for name, shape in zip(sel.names, sel.shapes)], 1).cpu())
            S = torch.stack(norms2)  # [K, b, n]
            scale2 = S.mean((0, 2))  # s(x)²
            counts += (S[None] <= (tol**2)[:, None, None, None] * scale2[None, None, :, None]).sum((2, 3))
    return EquilibriumStatistics(
        tolerances=tuple(float(t) for t in tol), branches=sel.branches,
        distributive_near_zero=counts / (n * sel.per_branch),
        collaborative_near_zero=(collab[None] <= tol[:, None]).double().mean(1), samples=n)
