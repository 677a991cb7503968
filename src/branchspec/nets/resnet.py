"""The slim CIFAR ResNet18 branch of Sec. 6, and its fused execution for M branches at once.

The layout is the common CIFAR ResNet18 (He et al. 2016, as in kuangliu/pytorch-cifar): a 3×3 stride-1 stem
with no max-pool, four stages of two BasicBlocks (stride 2 at the start of stages 2-4, with a 1×1 shortcut
where the shape changes), global average pooling and a linear head. Convolutions have no bias; BatchNorm is
affine. With stage widths (w1, w2, w3, w4) and C classes the branch has

    params = Σ convs + 2 · Σ BN channels + w4·C + C;   widths (c, 2c, 4c, 8c): 2724c² + 257c + 10 (C = 10),

so (64, 128, 256, 512) is the plain ResNet18 (11,173,962) and the paper's ~0.08M branch is (5, 11, 21, 43)
(79,262; α = 1/12 of ResNet18's widths, rounded). Module names follow the CIFAR ResNet18: ``conv1, bn1,
layer1.0, ..., layer4.1, linear``.

The fused execution (:class:`FusedResNet18`) is the same network with every channel count multiplied by M:
the stem is one convolution from the image to M·w1 channels, every other convolution runs the M branches at once,
each BatchNorm is per channel (hence per branch), and the head is a grouped linear map. It computes exactly the
per-branch outputs v_k(x) of the loop execution from the same weights (:func:`fuse`, :func:`unfuse`). It has two
layouts of its channels:

- ``"grouped"``: branch by branch (channel m·C + c), the convolutions grouped (``groups=M``); the GPU's choice;
- ``"lanes"``: branch-minor (channel c·M + m), the convolutions lane convolutions (:mod:`branchspec.nets.lanes`),
  one SIMD lane per branch; the CPU's choice, for M a multiple of 8.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from branchspec.branched import Branched, BranchedOutput
from branchspec.errors import BranchspecError
from branchspec.nets.lanes import LANE, LaneConv2d, grouped_weight, kernels_available, lane_weight

PAPER_WIDTHS = (5, 11, 21, 43)  # Sec. 6: ~0.08M parameters per branch (79,262)
RESNET18_WIDTHS = (64, 128, 256, 512)  # the plain ResNet18 (11,173,962 parameters)
BLOCKS = (2, 2, 2, 2)
LAYOUTS = ("grouped", "lanes")
EXECUTIONS = ("auto", "lanes", "fused", "loop", "vmap")  # lanes and fused: FusedResNet18 in the two layouts


def check_widths(widths: Sequence[int]) -> tuple[int, int, int, int]:
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1:
        raise BranchspecError(f"widths must be four positive integers (one per stage), got {list(widths)}.")
    return widths


def _conv(c_in: int, c_out: int, k: int, stride: int, padding: int, groups: int, layout: str) -> nn.Module:
    """``groups`` side-by-side bias-free convolutions of ``c_in → c_out`` channels each, in the given layout."""
    if layout == "lanes":
        return LaneConv2d(c_in, c_out, k, stride, padding, lanes=groups)
    return nn.Conv2d(groups * c_in, groups * c_out, k, stride, padding, bias=False, groups=groups)


class BasicBlock(nn.Module):
    """conv3×3(s) → BN → ReLU → conv3×3 → BN, plus the shortcut (1×1 conv s + BN when the shape changes), ReLU.

    ``groups`` runs that many independent copies side by side (channel counts are per copy), in ``layout``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, layout: str = "grouped"):
        super().__init__()
        g = groups
        self.conv1 = _conv(c_in, c_out, 3, stride, 1, g, layout)
        self.bn1 = nn.BatchNorm2d(g * c_out)
        self.conv2 = _conv(c_out, c_out, 3, 1, 1, g, layout)
        self.bn2 = nn.BatchNorm2d(g * c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv(c_in, c_out, 1, stride, 0, g, layout), nn.BatchNorm2d(g * c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _Trunk(nn.Module):
    """Stem and the four stages of ``groups`` side-by-side ResNet18s; returns pooled features [B, groups·w4]."""

    def __init__(self, widths: Sequence[int], in_channels: int, groups: int, layout: str = "grouped"):
        super().__init__()
        widths = check_widths(widths)
        self.widths, self.in_channels = widths, in_channels
        # the stem sees the whole image in every copy: one dense conv to groups·w1 channels
        self.conv1 = nn.Conv2d(in_channels, groups * widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(groups * widths[0])
        c_in = widths[0]
        for i, (w, n) in enumerate(zip(widths, BLOCKS)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(c_in, w, 2 if (b == 0 and i > 0) else 1, groups, layout))
                c_in = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def features(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return out.mean((2, 3))  # global average pooling


class SlimResNet18(_Trunk):
    """One branch v_k: the CIFAR ResNet18 at the given widths (Sec. 6). ``[B, C, H, W] → [B, classes]``."""

    def __init__(self, widths: Sequence[int] = PAPER_WIDTHS, num_classes: int = 10, in_channels: int = 3):
        super().__init__(widths, in_channels, groups=1)
        self.num_classes = num_classes
        self.linear = nn.Linear(self.widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


class FusedResNet18(_Trunk):
    """M slim ResNet18 branches as one network (the fused execution of Sec. 6), in one of :data:`LAYOUTS`.

    Same interface as :class:`~branchspec.branched.Branched` for what the classifier needs: ``forward``
    (f = Σ_k v_k over ``subset``), ``branch_outputs`` ``[M, B, classes]``, ``decompose``, ``num_branches``.
    """

    def __init__(self, num_branches: int, widths: Sequence[int] = PAPER_WIDTHS, num_classes: int = 10,
                 in_channels: int = 3, layout: str = "grouped"):
        if int(num_branches) < 1:
            raise BranchspecError(f"num_branches must be a positive integer, got {num_branches!r}.")
        check_layout(layout, int(num_branches))
        super().__init__(widths, in_channels, groups=int(num_branches), layout=layout)
        self.num_branches, self.num_classes, self.layout = int(num_branches), num_classes, layout
        m, w4 = self.num_branches, self.widths[3]
        # the grouped head, initialized as M independent nn.Linear(w4, classes)
        heads = [nn.Linear(w4, num_classes) for _ in range(m)]
        self.linear_weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))  # [M, classes, w4]
        self.linear_bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]))  # [M, classes]

    def branch_outputs(self, x: Tensor, subset: Sequence[int] | None = None) -> Tensor:
        """v_k(x) for every branch (or ``subset``): ``[K, B, classes]``."""
        subset = None if subset is None else list(self.check_subset(subset))
        m, w4 = self.num_branches, self.widths[3]
        if self.layout == "lanes":
            feats = self.features(x.contiguous(memory_format=torch.channels_last)).unflatten(1, (w4, m))
            out = torch.einsum("bcm,moc->mbo", feats, self.linear_weight)
        else:
            out = torch.einsum("bmc,moc->mbo", self.features(x).unflatten(1, (m, w4)), self.linear_weight)
        out = out + self.linear_bias[:, None]
        return out if subset is None else out[subset]

    def decompose(self, x: Tensor, subset: Sequence[int] | None = None) -> BranchedOutput:
        subset = self.check_subset(subset)
        outputs = self.branch_outputs(x, subset)
        return BranchedOutput(total=outputs.sum(0), branch_outputs=outputs, residual=None, subset=subset)

    def forward(self, x: Tensor, subset: Sequence[int] | None = None) -> Tensor:
        return self.branch_outputs(x, subset).sum(0)

    def check_subset(self, subset: Sequence[int] | None) -> tuple[int, ...]:
        return Branched.check_subset(self, subset)  # the same rules as the loop execution


def channels_last(model: nn.Module) -> nn.Module:
    """The model with every ``nn.Conv2d`` weight in channels-last memory (NHWC), in place; the lane weights, which
    have their own layout, are left as they are."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def check_layout(layout: str, num_branches: int) -> None:
    if layout not in LAYOUTS:
        raise BranchspecError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if layout == "lanes" and num_branches % LANE:
        raise BranchspecError(f"the lanes layout needs a number of branches that is a multiple of {LANE}, got "
                              f"{num_branches}; use the grouped layout.")


# ------------------------------------------------------------------------------------------------ executions
def choose_execution(execution: str, num_branches: int, device_type: str) -> tuple[str, str]:
    """The execution to run and why: ``execution`` itself, or for ``"auto"`` the fastest exact one on this device.

    All of them compute the same outputs and gradients (to 1e-5 in float32, tested); they differ in speed
    (docs/results.md, "CPU performance"): on a CPU the lanes layout for M a multiple of 8, else the grouped one;
    on a GPU the grouped one (cuDNN's grouped convolutions).
    """
    if execution not in EXECUTIONS:
        raise BranchspecError(f"execution must be one of {EXECUTIONS}, got {execution!r}.")
    if execution == "lanes":
        check_layout("lanes", num_branches)
    if execution != "auto":
        return execution, "as asked"
    if device_type != "cpu":
        return "fused", f"grouped convolutions on {device_type}"
    if num_branches % LANE:
        return "fused", f"the lanes execution needs M a multiple of {LANE}, this model has M = {num_branches}"
    if not kernels_available():
        return "fused", "the lane kernels could not be built on this machine"
    return "lanes", "the fastest exact execution on a CPU"


def as_execution(model: Branched, execution: str) -> nn.Module:
    """The Branched ResNet ``model`` in a concrete execution (not "auto"): the same weights, the same outputs."""
    if execution == "lanes":
        return fuse(model, "lanes")
    if execution == "fused":
        return fuse(model)
    model.execution = execution
    return model


# --------------------------------------------------------------------------------------------- conversion
def branched_resnet(num_branches: int = 16, widths: Sequence[int] = PAPER_WIDTHS, num_classes: int = 10,
                    in_channels: int = 3, seed: int | None = None, execution: str = "loop") -> Branched:
    """f(x) = Σ_k v_k(x) over M slim ResNet18 branches (Eq. 1, Sec. 6), each initialized independently."""
    widths = check_widths(widths)
    return Branched(lambda: SlimResNet18(widths, num_classes, in_channels), num_branches, seed=seed,
                    execution=execution)


def fuse(model: Branched, layout: str = "grouped") -> FusedResNet18:
    """The fused execution holding the same weights (and BatchNorm statistics) as a Branched of SlimResNet18."""
    first = model.branches[0]
    if not isinstance(first, SlimResNet18):
        raise BranchspecError("fuse() takes a Branched model of SlimResNet18 branches.")
    p = next(first.parameters())
    fused = FusedResNet18(model.num_branches, first.widths, first.num_classes, first.in_channels,
                          layout).to(p.device, p.dtype)
    state = _fused_state([b.state_dict() for b in model.branches])
    if layout == "lanes":
        state = _lanes_from_grouped(state, model.num_branches)
    fused.load_state_dict(state, strict=True)
    return fused.train(model.training)


def unfuse(fused: FusedResNet18, execution: str = "loop") -> Branched:
    """The loop execution (a Branched of SlimResNet18) holding the same weights as ``fused``."""
    model = branched_resnet(fused.num_branches, fused.widths, fused.num_classes, fused.in_channels,
                            execution=execution).to(fused.linear_weight.device, fused.linear_weight.dtype)
    for k, state in enumerate(_branch_states(grouped_state(fused.state_dict(), fused.num_branches), fused.num_branches)):
        model.branches[k].load_state_dict(state, strict=True)
    return model.train(fused.training)


def _fused_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-branch state dicts → the fused state dict: channels concatenated branch by branch."""
    out = {}
    for name in states[0]:
        tensors = [s[name] for s in states]
        if name == "linear.weight":
            out["linear_weight"] = torch.stack(tensors)
        elif name == "linear.bias":
            out["linear_bias"] = torch.stack(tensors)
        elif name.endswith("num_batches_tracked"):
            out[name] = tensors[0].clone()  # one counter for all branches (they are trained together)
        else:
            out[name] = torch.cat(tensors)
    return out


def _branch_states(fused_state: dict[str, Tensor], m: int) -> list[dict[str, Tensor]]:
    """The fused state dict → M per-branch state dicts (the inverse of :func:`_fused_state`)."""
    states: list[dict[str, Tensor]] = [{} for _ in range(m)]
    for name, t in fused_state.items():
        for k in range(m):
            if name == "linear_weight":
                states[k]["linear.weight"] = t[k].clone()
            elif name == "linear_bias":
                states[k]["linear.bias"] = t[k].clone()
            elif name.endswith("num_batches_tracked"):
                states[k][name] = t.clone()
            else:
                states[k][name] = t.chunk(m)[k].clone()
    return states


def _lanes_from_grouped(state: dict[str, Tensor], m: int) -> dict[str, Tensor]:
    """A grouped-layout fused state dict → the lanes layout: channel m·C + c becomes c·M + m."""
    out = {}
    for name, t in state.items():
        if name.startswith("linear_") or name.endswith("num_batches_tracked"):
            out[name] = t
        elif t.dim() == 4 and name != "conv1.weight":  # a grouped convolution's weights
            out[name] = lane_weight(t, m)
        else:  # BatchNorm vectors and the stem's output channels
            out[name] = t.reshape(m, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
    return out


def grouped_state(state: dict[str, Tensor], m: int) -> dict[str, Tensor]:
    """A fused state dict in either layout → the grouped layout (the inverse of :func:`_lanes_from_grouped`)."""
    if not any(t.dim() == 5 for t in state.values()):
        return state
    out = {}
    for name, t in state.items():
        if name.startswith("linear_") or name.endswith("num_batches_tracked"):
            out[name] = t
        elif t.dim() == 5:
            out[name] = grouped_weight(t).contiguous()
        else:
            out[name] = t.reshape(-1, m, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
    return out
