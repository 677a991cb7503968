"""The paper's analyses of branches, on the parts of any model (:mod:`branchspec.parts`), called one way.

Every analysis takes ``(parts, data, target)`` (``data`` the model's inputs ``[N, ...]``, ``target`` labels
``[N]`` where it needs them) and returns a result dataclass with ``to_dict()`` (for metrics.json), a
``figure()`` beside it, and, where a claim of the paper applies, a one-line ``finding``:

- :func:`activity`: response norms, active and silent parts by the 10% rule (Fig. 4), on raw and on
  mean-centred responses, and the constant parts (observations 3-4);
- :func:`correlation`: the inter-part covariance F·Fᵀ and correlation (observation 5);
- :func:`contribution`: per-class confidence of each part (Figs. 6-7), for parts at the model's output;
- :func:`ablation`: the metric with each part removed and with each part alone (the model rerun);
- :func:`importance`: Michel et al. (2019)'s head importance, E_x|∂L(x)/∂ξ_k| for a mask ξ on the parts;
- :func:`hessian_blocks`: the Hessian of the loss w.r.t. the parts' parameter groups and its block mass,
  coupling and permutation baseline (Sec. 5, for small selections: the direct ``torch.func.hessian``).

The branched models of the paper go through the same functions (:class:`~branchspec.parts.BranchedParts`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from branchspec.analysis.activity import active_mask, correlation as correlation_matrix, covariance, \
    mean_abs_offdiagonal, response_norms
from branchspec.errors import BranchspecError
from branchspec.losses import get_loss
from branchspec.parts import Parts, evaluation
from branchspec.rundir import to_plain

CONSTANT_FRACTION = 1e-3  # a part whose centred response norm is below this share of the largest: constant


class Result:
    """What every result has: ``to_dict()`` of its fields (arrays as lists, NaN as None)."""

    def to_dict(self) -> dict:
        return to_plain(asdict(self))


@torch.no_grad()
def part_outputs(parts: Parts, data: Tensor, batch_size: int = 256) -> Tensor:
    """The parts at the site for every input, in eval mode and batches: ``[K, N, ...]`` float32 on the CPU."""
    with evaluation(parts.model):
        chunks = [parts.parts(data[i:i + batch_size]).parts.float().cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(chunks, 1)


def _rows(V: Tensor) -> np.ndarray:
    return V.reshape(V.shape[0], -1).double().numpy()


# --------------------------------------------------------------------------------------------- activity
@dataclass
class Activity(Result):
    norms: list[float]
    active: list[bool]
    centred_norms: list[float]
    centred_active: list[bool]
    num_active: int
    num_silent: int
    num_active_centred: int
    num_silent_centred: int
    num_constant: int
    norm_ratio_min: float
    centred_norm_ratio_min: float
    kind: str = "parts"

    @property
    def finding(self) -> str:
        return (f"{self.num_silent} of {len(self.norms)} {self.kind} silent by the paper's 10% rule on raw responses, "
                f"{self.num_silent_centred} on mean-centred ones ({self.num_constant} constant)")

    def figure(self):
        from branchspec.report.plots import subplots

        fig, axes = subplots(1, 2, panel=(4.2, 3.0))
        for ax, norms, active, title in ((axes[0, 0], self.norms, self.active, "raw"),
                                         (axes[0, 1], self.centred_norms, self.centred_active, "mean-centred")):
            norms = np.asarray(norms)
            ax.bar(range(len(norms)), norms, color=np.where(active, "C0", "0.7"))
            ax.axhline(0.1 * norms.max(), color="C3", lw=1, ls="--")
            ax.set(xlabel="part k", ylabel="response norm", title=f"{title}: {int(np.sum(active))} active")
        fig.tight_layout()
        return fig


def activity(parts: Parts, data: Tensor, target: Tensor | None = None, *, outputs: Tensor | None = None) -> Activity:
    """Fig. 4's rule on the parts' responses F_k (part k over every input, flattened), raw and mean-centred
    (each part minus its mean over the inputs: a part that gives every input the same vector is silent there)."""
    V = part_outputs(parts, data) if outputs is None else outputs
    F, Fc = _rows(V), _rows(V - V.mean(1, keepdim=True))
    n, nc = response_norms(F), response_norms(Fc)
    a, ac = active_mask(F), active_mask(Fc)
    return Activity(norms=n.tolist(), active=a.tolist(), centred_norms=nc.tolist(), centred_active=ac.tolist(),
                    num_active=int(a.sum()), num_silent=int((~a).sum()), num_active_centred=int(ac.sum()),
                    num_silent_centred=int((~ac).sum()),
                    num_constant=int((nc < CONSTANT_FRACTION * nc.max()).sum()) if nc.max() > 0 else 0,
                    norm_ratio_min=float(n.min() / n.max()) if n.max() > 0 else float("nan"),
                    centred_norm_ratio_min=float(nc.min() / nc.max()) if nc.max() > 0 else float("nan"),
                    kind=parts.kind)


# ------------------------------------------------------------------------------------------ correlation
@dataclass
class Correlation(Result):
    covariance: list[list[float]]
    correlation: list[list[float]]
    mean_abs_correlation: float
    mean_abs_correlation_active: float

    @property
    def finding(self) -> str:
        return f"mean |correlation| between parts {self.mean_abs_correlation:.2f} (active ones: " \
               f"{self.mean_abs_correlation_active:.2f})"

    def figure(self):
        from branchspec.report.plots import heatmap, subplots

        fig, axes = subplots(1, 1, panel=(4.0, 3.5))
        heatmap(axes[0, 0], np.asarray(self.correlation), title="correlation of the parts' responses",
                xlabel="part", ylabel="part")
        return fig


def correlation(parts: Parts, data: Tensor, target: Tensor | None = None, *, outputs: Tensor | None = None) -> Correlation:
    """Sec. 4.1's covariance F·Fᵀ (divided by the response length) and the correlation of the parts."""
    V = part_outputs(parts, data) if outputs is None else outputs
    F = _rows(V)
    C = correlation_matrix(F)
    return Correlation(covariance=(covariance(F) / F.shape[1]).tolist(), correlation=C.tolist(),
                       mean_abs_correlation=float(mean_abs_offdiagonal(C)),
                       mean_abs_correlation_active=float(mean_abs_offdiagonal(C, active_mask(F))))


# ----------------------------------------------------------------------------------------- contribution
@dataclass
class Contribution(Result):
    matrix: list[list[float]]  # [K, C]: part k's mean confidence on class c
    top_share: list[float]  # per class: the share of its positive contribution carried by its top part
    mean_top_share: float

    @property
    def finding(self) -> str:
        k = len(self.matrix)
        return f"a class's top part carries {self.mean_top_share:.2f} of its positive contribution (uniform: {1 / k:.2f})"

    def figure(self):
        from branchspec.report.plots import heatmap, subplots

        fig, axes = subplots(1, 1, panel=(4.5, 3.5))
        heatmap(axes[0, 0], np.asarray(self.matrix), title="contribution: mean confidence of part k on class c",
                xlabel="class c", ylabel="part k")
        return fig


def contribution(parts: Parts, data: Tensor, target: Tensor, *, outputs: Tensor | None = None) -> Contribution:
    """Figs. 6-7 for parts at the model's output (logits ``[N, C]``): conf_k(x) = v_k(x)_y − mean_{j≠y} v_k(x)_j,
    averaged per true class (:mod:`branchspec.analysis.classify`)."""
    from branchspec.analysis.classify import contribution_matrix, top_branch_share

    V = part_outputs(parts, data) if outputs is None else outputs
    if V.dim() != 3:
        raise BranchspecError(f"contributions need parts at the model's output, logits [N, C]; these parts are "
                              f"{tuple(V.shape[1:])}: use ablation or importance for an inner site.")
    C = int(V.shape[-1])
    M = contribution_matrix(V, target.long().cpu(), C)
    share = top_branch_share(M)
    return Contribution(matrix=M.tolist(), top_share=share.tolist(), mean_top_share=float(share.mean()))


# --------------------------------------------------------------------------------------------- ablation
@dataclass
class Ablation(Result):
    metric: str
    full: float
    without: list[float]
    alone: list[float]
    drop: list[float] = field(default_factory=list)  # full − without: what removing each part costs

    def figure(self):
        from branchspec.report.plots import subplots

        fig, axes = subplots(1, 1, panel=(5.0, 3.2))
        ax = axes[0, 0]
        k = np.arange(len(self.without))
        ax.bar(k - 0.2, self.without, width=0.4, label="without part k")
        ax.bar(k + 0.2, self.alone, width=0.4, label="part k alone")
        ax.axhline(self.full, color="k", ls="--", lw=1, label="all parts")
        ax.set(xlabel="part k", ylabel=self.metric, title="ablation")
        ax.legend(fontsize=7)
        return fig


@torch.no_grad()
def ablation(parts: Parts, data: Tensor, target: Tensor, *, metric: str = "accuracy", batch_size: int = 256) -> Ablation:
    """The model rerun with each part removed and with each part alone (the site's rest kept): ``metric`` is
    ``"accuracy"`` (of logits ``[N, C]`` or ``[N, L, C]``) or a loss name of :mod:`branchspec.losses`."""
    def score(subset) -> float:
        with evaluation(parts.model):
            outs = torch.cat([parts.run(data[i:i + batch_size], subset=subset).float().cpu()
                              for i in range(0, len(data), batch_size)])
        return _metric(outs, target.cpu(), metric)

    everything = range(parts.num_parts)
    full = score(None)
    without = [score([j for j in everything if j != k]) for k in everything] if parts.num_parts > 1 else [float("nan")]
    alone = [score([k]) for k in everything]
    return Ablation(metric, full, without, alone, [full - w for w in without])


def _metric(outputs: Tensor, target: Tensor, metric: str) -> float:
    if metric == "accuracy":
        return float((outputs.argmax(-1) == target).float().mean())
    loss = get_loss(metric)
    return float(loss(outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1)).mean())


# ------------------------------------------------------------------------------------------- importance
@dataclass
class Importance(Result):
    importance: list[float]  # E_x |∂L(x)/∂ξ_k| at ξ = 1
    normalized: list[float]  # divided by the largest

    @property
    def finding(self) -> str:
        return f"the least important part has {min(self.normalized):.2f} of the most important's importance"


def importance(parts: Parts, data: Tensor, target: Tensor, *, loss: str = "cross_entropy",
               batch_size: int = 256) -> Importance:
    """Michel et al. (2019): a mask ξ_k multiplies part k; its importance is the mean over inputs of |∂L(x)/∂ξ_k|
    at ξ = 1. One mask per input, so a single backward pass gives every input's own derivative."""
    loss_fn = get_loss(loss)
    total = torch.zeros(parts.num_parts, dtype=torch.float64)
    with evaluation(parts.model):
        for i in range(0, len(data), batch_size):
            x, y = data[i:i + batch_size], target[i:i + batch_size]
            xi = torch.ones(len(x), parts.num_parts, requires_grad=True)
            out = parts.run(x, scale=xi)
            L = loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1).to(out.device)).sum()
            (g,) = torch.autograd.grad(L, xi)
            total += g.abs().sum(0).double()
    imp = (total / len(data)).tolist()
    top = max(imp) or 1.0
    return Importance(importance=imp, normalized=[v / top for v in imp])


# --------------------------------------------------------------------------------------- Hessian blocks
@dataclass
class HessianBlocks(Result):
    block_sizes: list[int]
    block_mass_ratio: float
    block_mass_ratio_permuted: float
    mean_block_coupling: float
    coupling: list[list[float]]

    @property
    def finding(self) -> str:
        return (f"block mass {self.block_mass_ratio:.3f} against {self.block_mass_ratio_permuted:.3f} for a random "
                f"dealing; mean cross-block coupling {self.mean_block_coupling:.3f}")


def hessian_blocks(parts: Parts, data: Tensor, target: Tensor, *, loss: str = "cross_entropy",
                   max_parameters: int = 4000, permutations: int = 10, seed: int = 0) -> HessianBlocks:
    """The Hessian of the mean loss w.r.t. every part's parameter group (θ_1, ..., θ_K side by side) by
    ``torch.func.hessian`` of the flat selection, and its block structure: block mass, the random-dealing
    baseline and the normalized coupling ‖H_kl‖/√(‖H_kk‖‖H_ll‖) (:mod:`branchspec.analysis.hessian`).
    The direct Hessian grows as the square of the selection: at most ``max_parameters``."""
    from torch.func import functional_call

    from branchspec.analysis.hessian import block_coupling, block_mass_ratio, mean_coupling, permuted_block_mass_ratios

    groups = [parts.part_parameters(k) for k in range(parts.num_parts)]
    sizes = [sum(int(p[idx].numel()) for p, idx in g) for g in groups]
    if sum(sizes) > max_parameters:
        raise BranchspecError(f"the parts hold {sum(sizes)} parameters; the direct Hessian allows at most "
                              f"{max_parameters} (raise max_parameters, or choose a smaller site).")
    named = {id(p): n for n, p in parts.model.named_parameters()}
    base = {n: p.detach() for n, p in parts.model.named_parameters()}
    flat0 = torch.cat([p.detach()[idx].reshape(-1) for g in groups for p, idx in g])
    loss_fn = get_loss(loss)

    def loss_of(flat: Tensor) -> Tensor:
        params = dict(base)
        offset = 0
        for g in groups:
            for p, idx in g:
                n = p[idx].numel()
                name = named[id(p)]
                params[name] = params[name].index_put(_index_tensors(p, idx), flat[offset:offset + n].view(
                    p[idx].shape)) if idx else flat[offset:offset + n].view(p.shape)
                offset += n
        out = functional_call(parts.model, params, (data,))
        return loss_fn(out.reshape(-1, out.shape[-1]), target.reshape(-1)).mean()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # forward-over-reverse needs forward-mode derivatives, which the fused attention kernels lack: the math one
    with evaluation(parts.model), sdpa_kernel([SDPBackend.MATH]):
        H = torch.func.hessian(loss_of)(flat0).detach()
    ratios = permuted_block_mass_ratios(H, sizes, permutations, seed)
    coupling = block_coupling(H, sizes)
    return HessianBlocks(block_sizes=sizes, block_mass_ratio=block_mass_ratio(H, sizes),
                         block_mass_ratio_permuted=float(ratios.mean()), mean_block_coupling=mean_coupling(coupling),
                         coupling=coupling.tolist())


def _index_tensors(p: Tensor, idx: tuple) -> tuple:
    """Basic slices of ``p`` as the index tensors of ``index_put`` (an open grid over the sliced dimensions)."""
    ranges = [torch.arange(p.shape[d])[s] for d, s in enumerate(idx)] + [torch.arange(p.shape[d])
                                                                         for d in range(len(idx), p.dim())]
    return tuple(torch.meshgrid(*ranges, indexing="ij"))
