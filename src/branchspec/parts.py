"""Parts: any model whose output at some point is a sum of parallel parts, f = rest + Σ_k part_k.

The paper's branched network is one case (Eq. 1). Models users already have are others (the paper's
introduction names them): multi-head attention, whose output is Σ_h head_h(x) W_O^h + b_O; a grouped
convolution followed by a linear layer (ResNeXt's block, F(x) = Σ_i T_i(x)); a mixture of experts,
y = Σ_e g_e(x) E_e(x); an ensemble. A :class:`Parts` adapter finds the parts at one *site* of a model and gives
every analysis the same four things:

- ``parts(*inputs)``: the model's output, the parts at the site ``[K, B, ...]`` and the rest (bias, residual);
  ``rest + parts.sum(0)`` equals the site's output (to floating-point error, tested);
- ``run(*inputs, subset=...)``: the model's output with only ``subset`` of the parts kept (an ablation), or
  with each part scaled (``scale``, a ``[K]`` tensor: Michel et al.'s head mask ξ);
- ``part_parameters(k)``: part k's parameter group θ_k, as ``(parameter, index)`` pairs (a part may own rows or
  columns of a shared weight, as a head owns a slice of W_Q, W_K, W_V and W_O);
- ``num_parts``.

Adapters, chosen by :func:`parts_of` from the module at the site, or registered for a user's own module type
with :func:`register`:

- :class:`BranchedParts`: a :class:`~branchspec.Branched` model (or a fused one): its branches;
- :class:`LinearInputGroups`: a linear layer (``nn.Linear`` or ``nn.Conv2d``) whose input channels fall into
  groups: the output is the sum over groups of the layer applied to that group's channels alone, plus its bias.
  With the out-projection of an attention block this is the heads; with the convolution after a grouped
  convolution, the groups (per-channel BatchNorm and ReLU between them keep the groups apart);
- :class:`AttentionHeads`: ``nn.MultiheadAttention``, whose out-projection runs inside a functional call
  (no hook sees it): its heads recomputed from its own weights;
- :class:`Experts`: a mixture-of-experts module with ``experts`` (a ModuleList) and a ``gate`` returning the
  weights ``[B, E]``: part e = g_e(x)·E_e(x).

Everything works through forward hooks on the site: the model itself is never wrapped or changed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchspec.branched import Branched
from branchspec.errors import BranchspecError


@dataclass
class PartsOutput:
    """One forward pass: the model's output, the parts at the site (``[K, B, ...]``) and the rest there."""

    output: Tensor
    parts: Tensor
    rest: Tensor | None

    @property
    def site_output(self) -> Tensor:
        return self.parts.sum(0) if self.rest is None else self.rest + self.parts.sum(0)


class Parts:
    """The common interface (module docstring). Subclasses implement :meth:`split` (the site's input to its
    parts and rest) and say where the site is; the rest is shared."""

    kind = "parts"

    def __init__(self, model: nn.Module, site: nn.Module, num_parts: int, name: str = ""):
        self.model, self.site, self.num_parts, self.name = model, site, int(num_parts), name

    # ----------------------------------------------------------------------------------------- subclasses
    def split(self, args: tuple, kwargs: dict, output) -> tuple[Tensor, Tensor | None]:
        """The parts ``[K, B, ...]`` and the rest of the site's output, from the site's inputs."""
        raise NotImplementedError

    def part_parameters(self, k: int) -> list[tuple[nn.Parameter, tuple]]:
        raise NotImplementedError

    def replace_output(self, output, new: Tensor):
        """The site's output with its tensor replaced by ``new`` (for sites that return tuples)."""
        return new

    # -------------------------------------------------------------------------------------------- shared
    def parts(self, *inputs, **kwargs) -> PartsOutput:
        """The model's output and the parts at the site, from one forward pass."""
        seen = {}

        def hook(module, args, kw, output):
            seen["parts"], seen["rest"] = self.split(args, kw, output)

        handle = self.site.register_forward_hook(hook, with_kwargs=True)
        try:
            out = self.model(*inputs, **kwargs)
        finally:
            handle.remove()
        if "parts" not in seen:
            raise BranchspecError(f"the site {self.name or type(self.site).__name__} was not called by the model's "
                                  "forward pass; choose a module the model uses.")
        return PartsOutput(out, seen["parts"], seen["rest"])

    def run(self, *inputs, subset: Sequence[int] | None = None, scale: Tensor | None = None, **kwargs) -> Tensor:
        """The model's output with the site's output rebuilt from the parts in ``subset`` (all by default), each
        multiplied by ``scale[k]`` when given (a differentiable head mask; ``[K]``, or ``[B, K]`` per input)."""
        keep = self.check_subset(subset)

        def hook(module, args, kw, output):
            parts, rest = self.split(args, kw, output)
            new = _weighted_sum(parts, keep, scale)
            return self.replace_output(output, new if rest is None else rest + new)

        handle = self.site.register_forward_hook(hook, with_kwargs=True)
        try:
            return self.model(*inputs, **kwargs)
        finally:
            handle.remove()

    def check_subset(self, subset) -> tuple[int, ...]:
        if subset is None:
            return tuple(range(self.num_parts))
        subset = tuple(int(k) for k in subset)
        bad = [k for k in subset if not 0 <= k < self.num_parts]
        if bad or len(set(subset)) != len(subset):
            raise BranchspecError(f"subset {list(subset)} must name distinct parts among 0..{self.num_parts - 1}.")
        return subset

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name or type(self.site).__name__}, {self.num_parts} parts)"


def _weighted_sum(parts: Tensor, keep: tuple[int, ...], scale: Tensor | None) -> Tensor:
    """Σ_{k ∈ keep} scale_k · part_k; ``scale`` is ``[K]`` or one row per input ``[B, K]``."""
    w = torch.zeros(parts.shape[0], dtype=parts.dtype, device=parts.device)
    w[list(keep)] = 1
    if scale is not None:
        scale = scale.to(parts.device, parts.dtype)
        w = (w * scale).T if scale.dim() == 2 else w * scale  # [K, B] or [K]
    return (parts * w.reshape(*w.shape, *[1] * (parts.dim() - w.dim()))).sum(0)


# ------------------------------------------------------------------------------------------------ adapters
class BranchedParts(Parts):
    """The branches of a :class:`~branchspec.Branched` model (or of a fused network with ``branch_outputs``);
    the site is the model's output, the rest is R."""

    kind = "branches"

    def __init__(self, model: nn.Module):
        super().__init__(model, model, model.num_branches, "branches")

    def parts(self, *inputs, **kwargs) -> PartsOutput:
        out = self.model.decompose(*inputs, **kwargs)
        return PartsOutput(out.total, out.branch_outputs, out.residual)

    def run(self, *inputs, subset=None, scale=None, **kwargs) -> Tensor:
        out = self.parts(*inputs, **kwargs)
        total = _weighted_sum(out.parts, self.check_subset(subset), scale)
        return total if out.rest is None else out.rest + total

    def part_parameters(self, k: int) -> list[tuple[nn.Parameter, tuple]]:
        if not isinstance(self.model, Branched):
            raise BranchspecError("the parameter groups of a fused network are slices of its layers; convert it with "
                                  "unfuse() first.")
        return [(p, ()) for p in self.model.branch_parameters(k)]


class LinearInputGroups(Parts):
    """A linear layer whose input channels split into ``groups`` equal, contiguous groups (heads before an
    attention block's out-projection; groups before the convolution after a grouped convolution):
    part g = the layer applied to group g's channels alone, rest = its bias."""

    kind = "input groups"

    def __init__(self, model: nn.Module, site: nn.Module, groups: int, name: str = ""):
        if not isinstance(site, (nn.Linear, nn.Conv1d, nn.Conv2d)) or getattr(site, "groups", 1) != 1:
            raise BranchspecError(f"input groups need an nn.Linear or an ungrouped nn.Conv1d/2d site, got "
                                  f"{type(site).__name__}.")
        channels = site.in_features if isinstance(site, nn.Linear) else site.in_channels
        if groups < 1 or channels % groups:
            raise BranchspecError(f"{channels} input channels do not split into {groups} equal groups.")
        super().__init__(model, site, groups, name)
        self.width = channels // groups

    def _linear(self, x: Tensor) -> Tensor:
        site = self.site
        if isinstance(site, nn.Linear):
            return F.linear(x, site.weight)
        conv = F.conv2d if isinstance(site, nn.Conv2d) else F.conv1d
        return conv(x, site.weight, None, site.stride, site.padding, site.dilation)

    def split(self, args, kwargs, output):
        x = args[0]
        dim = -1 if isinstance(self.site, nn.Linear) else 1
        chunks = x.split(self.width, dim=dim)
        parts = []
        for g, chunk in enumerate(chunks):
            masked = torch.zeros_like(x)
            masked.narrow(dim, g * self.width, self.width).copy_(chunk)
            parts.append(self._linear(masked))
        bias = self.site.bias
        if bias is None:
            return torch.stack(parts), None
        shape = [1] * output.dim()
        shape[dim] = -1  # the bias runs along the output channels
        return torch.stack(parts), bias.view(shape).expand_as(output)

    def part_parameters(self, k: int) -> list[tuple[nn.Parameter, tuple]]:
        cols = slice(k * self.width, (k + 1) * self.width)
        return [(self.site.weight, (slice(None), cols))]


class AttentionHeads(Parts):
    """The heads of an ``nn.MultiheadAttention`` (batch-first or not; self- or cross-attention; with masks):
    part h = softmax(q_h k_hᵀ/√d + mask) v_h W_O^hᵀ, rest = b_O, recomputed from the module's own weights (its
    out-projection runs inside a functional call, where no hook sees it). Dropout is ignored: use eval mode."""

    kind = "attention heads"

    def __init__(self, model: nn.Module, site: nn.MultiheadAttention, name: str = ""):
        if not isinstance(site, nn.MultiheadAttention):
            raise BranchspecError(f"AttentionHeads needs an nn.MultiheadAttention, got {type(site).__name__}.")
        if not site._qkv_same_embed_dim or site.in_proj_weight is None:  # separate q/k/v projections
            raise BranchspecError("attention with separate q/k/v dimensions (kdim/vdim) is not supported yet.")
        super().__init__(model, site, site.num_heads, name)

    def replace_output(self, output, new):
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def split(self, args, kwargs, output):
        m = self.site
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        given = {**dict(zip(names, args)), **kwargs}
        q, k, v = given["query"], given["key"], given["value"]
        if m.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [L, B, E]
        L, B, E = q.shape
        H, d = m.num_heads, E // m.num_heads
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
        b_q, b_k, b_v = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)

        def heads(x, w, b):  # [S, B, E] -> [B, H, S, d]
            return F.linear(x, w, b).view(x.shape[0], B, H, d).permute(1, 2, 0, 3)

        qh, kh, vh = heads(q, w_q, b_q), heads(k, w_k, b_k), heads(v, w_v, b_v)
        scores = qh @ kh.transpose(-1, -2) / d ** 0.5  # [B, H, L, S]
        mask = given.get("attn_mask")
        if mask is not None:
            mask = mask.view(B, H, L, -1) if mask.dim() == 3 else mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        padding = given.get("key_padding_mask")
        if padding is not None:
            pad = padding.view(B, 1, 1, -1)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        context = scores.softmax(-1) @ vh  # [B, H, L, d]
        w_o = m.out_proj.weight.view(E, H, d)  # column block h of W_O
        parts = torch.einsum("bhld,ehd->hble", context, w_o)  # [H, B, L, E]
        if not m.batch_first:
            parts = parts.transpose(1, 2)  # [H, L, B, E]
        rest = None if m.out_proj.bias is None else m.out_proj.bias.expand_as(parts[0])
        return parts, rest

    def part_parameters(self, k: int) -> list[tuple[nn.Parameter, tuple]]:
        m = self.site
        E, d = m.embed_dim, m.embed_dim // m.num_heads
        rows = [slice(i * E + k * d, i * E + (k + 1) * d) for i in range(3)]
        out = [(m.in_proj_weight, (r,)) for r in rows]
        if m.in_proj_bias is not None:
            out += [(m.in_proj_bias, (r,)) for r in rows]
        return out + [(m.out_proj.weight, (slice(None), slice(k * d, (k + 1) * d)))]


class Experts(Parts):
    """A mixture of experts: a module with ``experts`` (a ModuleList) and ``gate(x)`` → weights ``[B, E]``,
    whose output is Σ_e gate(x)_e · experts[e](x). Part e = gate(x)_e · E_e(x); the gate is shared (no part
    owns it)."""

    kind = "experts"

    def __init__(self, model: nn.Module, site: nn.Module, name: str = ""):
        if not isinstance(getattr(site, "experts", None), nn.ModuleList) or not callable(getattr(site, "gate", None)):
            raise BranchspecError("Experts needs a module with an `experts` ModuleList and a `gate(x)` method; "
                                  "register an adapter for other layouts (branchspec.parts.register).")
        super().__init__(model, site, len(site.experts), name)

    def split(self, args, kwargs, output):
        x = args[0]
        gates = self.site.gate(x)  # [B, E]
        parts = torch.stack([gates[:, e].view(-1, *[1] * (x.dim() - 1)) * expert(x)
                             for e, expert in enumerate(self.site.experts)])
        return parts, None

    def part_parameters(self, k: int) -> list[tuple[nn.Parameter, tuple]]:
        return [(p, ()) for p in self.site.experts[k].parameters()]


# ------------------------------------------------------------------------------------------------ finding
_REGISTRY: list[tuple[type, Callable]] = []


def register(module_type: type, adapter: Callable[[nn.Module, nn.Module, str], Parts]) -> None:
    """Use ``adapter(model, site, name)`` for sites of ``module_type`` (checked before the built-in ones)."""
    _REGISTRY.insert(0, (module_type, adapter))


def parts_of(model: nn.Module, at: str | None = None, *, groups: int | None = None) -> Parts:
    """The parts of ``model`` at the module named ``at`` (``None``: the model itself, a Branched model's
    branches). ``groups``: for a linear site, how many input groups (heads, convolution groups)."""
    if at is None:
        if hasattr(model, "branch_outputs") and hasattr(model, "num_branches"):
            return BranchedParts(model)
        raise BranchspecError("give the site of the parts (`at`, a module name): the model is not a branched one.")
    modules = dict(model.named_modules())
    if at not in modules:
        close = [n for n in modules if n and (at in n or n.split(".")[-1] == at.split(".")[-1])][:6]
        raise BranchspecError(f"the model has no module {at!r}" + (f"; similar names: {', '.join(close)}" if close
                                                                   else f"; it has {', '.join(list(modules)[1:8])}, ...")
                              + ".")
    site = modules[at]
    for module_type, adapter in _REGISTRY:
        if isinstance(site, module_type):
            return adapter(model, site, at)
    if isinstance(site, nn.MultiheadAttention):
        return AttentionHeads(model, site, at)
    if isinstance(getattr(site, "experts", None), nn.ModuleList):
        return Experts(model, site, at)
    if isinstance(site, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        if groups is None:
            raise BranchspecError(f"{at} is a linear layer: say how many input groups it sums (groups: its heads, "
                                  "or the groups of the grouped convolution before it).")
        return LinearInputGroups(model, site, groups, at)
    if hasattr(site, "branch_outputs") and hasattr(site, "num_branches"):
        return BranchedParts(site)
    raise BranchspecError(f"no parts adapter for {at} ({type(site).__name__}); register one with "
                          "branchspec.parts.register, or choose an attention, expert or linear layer.")


@contextmanager
def evaluation(model: nn.Module):
    """Eval mode for the duration (parts are a deterministic decomposition: no dropout, running statistics)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
