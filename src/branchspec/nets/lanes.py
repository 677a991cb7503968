"""Lane convolutions: M per-branch convolutions side by side, one SIMD lane per branch (the ``lanes`` execution).

The fused execution of a branched CNN runs M small convolutions as one grouped convolution. On a CPU the grouped
kernels are slow for the per-branch widths of the paper's branches (5 to 43 channels): the channels of one branch
are too few to fill a vector register. Here the layout is turned around. An activation is a channels-last tensor
whose channel index is ``c * M + m`` ("branch-minor"), so that the M branches of one channel lie side by side in
memory, and a vector register holds one channel of 8 or 16 branches. Branch m's convolution is then a sequence of
fused multiply-adds on whole registers, whatever its channel counts. The weights are ``[K, K, C_in, C_out, M]``.

:func:`lane_conv2d` is that convolution (a ``torch.library`` custom op with its gradients, so autograd and
``torch.compile`` see one operator). It runs a small C++ kernel (``lanes.cpp``) compiled on first use with the
machine's compiler; where none is usable it falls back, with one logged line, to the same mathematics through
:func:`reference_lane_conv2d` (a grouped convolution between two permutations), so results never depend on the
compiler. M must be a multiple of 8.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchspec.errors import log

LANE = 8  # M must be a multiple of this (a 256-bit register of float32)
_SOURCE = Path(__file__).with_name("lanes.cpp")
_state: dict = {}


def _machine_tag() -> str:
    """A tag of the CPU model, so a kernel built with -march=native is never loaded on another kind of CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))), "")
    except OSError:
        model = ""
    return hashlib.sha1(f"{platform.machine()} {model}".encode()).hexdigest()[:10]


def extension():
    """The compiled kernels, or None when they cannot be built here (the reason is logged once)."""
    if "ext" not in _state:
        _state["ext"] = None
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = f"branchspec_lanes_{_machine_tag()}"
            if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file():
                log.info("compiling the lane-convolution kernels (once per machine, about 20 s) ...")
            _state["ext"] = load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                 verbose=False)
        except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean "not here"
            _state["reason"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            log.warning("the lane-convolution kernels could not be built (%s); lane convolutions run through grouped "
                        "convolutions instead (same results, slower).", _state["reason"])
    return _state["ext"]


def kernels_available() -> bool:
    """Whether the compiled lane kernels can run on this machine (builds them on first call)."""
    return extension() is not None


# ------------------------------------------------------------------------------------------------ reference
def to_groups(x: Tensor, m: int) -> Tensor:
    """Branch-minor channels (c·M + m) → the grouped layout (m·C + c) of the same tensor ``[B, C·M, ...]``."""
    b, cm = x.shape[:2]
    return x.reshape(b, cm // m, m, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def from_groups(x: Tensor, m: int) -> Tensor:
    """The grouped layout (m·C + c) → branch-minor channels (c·M + m)."""
    b, cm = x.shape[:2]
    return x.reshape(b, m, cm // m, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def grouped_weight(weight: Tensor) -> Tensor:
    """Lane weights ``[K, K, Ci, Co, M]`` → grouped-convolution weights ``[M·Co, Ci, K, K]``."""
    k1, k2, ci, co, m = weight.shape
    return weight.permute(4, 3, 2, 0, 1).reshape(m * co, ci, k1, k2)


def lane_weight(grouped: Tensor, m: int) -> Tensor:
    """Grouped-convolution weights ``[M·Co, Ci, K, K]`` → lane weights ``[K, K, Ci, Co, M]``."""
    mco, ci, k1, k2 = grouped.shape
    return grouped.reshape(m, mco // m, ci, k1, k2).permute(3, 4, 2, 1, 0).contiguous()


def reference_lane_conv2d(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """:func:`lane_conv2d` through a grouped convolution: the reference, and the fallback without a compiler."""
    m = weight.shape[-1]
    y = F.conv2d(to_groups(x, m), grouped_weight(weight), stride=stride, padding=padding, groups=m)
    return from_groups(y, m).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------- the operator
def _out_size(n: int, k: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - k) // stride + 1


def _nhwc(t: Tensor) -> Tensor:
    """The ``[B, H, W, C]`` memory of a 4-D tensor (a view for channels-last memory, else a copy)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _channels_last(b: int, c: int, h: int, w: int, like: Tensor) -> Tensor:
    return like.new_empty((b, h, w, c)).permute(0, 3, 1, 2)


@torch.library.custom_op("branchspec::lane_conv2d", mutates_args=())
def _conv(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """x ``[B, Ci·M, H, W]``, weight ``[K, K, Ci, Co, M]`` → ``[B, Co·M, Ho, Wo]``, channels-last memory in and out."""
    k = weight.shape[0]
    out_h, out_w = _out_size(x.shape[2], k, stride, padding), _out_size(x.shape[3], k, stride, padding)
    y = extension().conv_forward(_nhwc(x), weight.contiguous(), stride, padding, out_h, out_w)
    return y.permute(0, 3, 1, 2)


@_conv.register_fake
def _(x, weight, stride, padding):
    k = weight.shape[0]
    out_h, out_w = _out_size(x.shape[2], k, stride, padding), _out_size(x.shape[3], k, stride, padding)
    return _channels_last(x.shape[0], weight.shape[3] * weight.shape[4], out_h, out_w, x)


@torch.library.custom_op("branchspec::lane_conv2d_input_grad", mutates_args=())
def _input_grad(grad: Tensor, weight: Tensor, stride: int, padding: int, in_h: int, in_w: int) -> Tensor:
    """dL/dx of :func:`_conv` for an input of ``in_h × in_w``, from its output gradient."""
    return extension().conv_input_grad(_nhwc(grad), weight.contiguous(), stride, padding, in_h, in_w).permute(0, 3, 1, 2)


@_input_grad.register_fake
def _(grad, weight, stride, padding, in_h, in_w):
    return _channels_last(grad.shape[0], weight.shape[2] * weight.shape[4], in_h, in_w, grad)


@torch.library.custom_op("branchspec::lane_conv2d_weight_grad", mutates_args=())
def _weight_grad(x: Tensor, grad: Tensor, k: int, m: int, stride: int, padding: int) -> Tensor:
    """dL/dweight of :func:`_conv` from its input and output gradient → ``[K, K, Ci, Co, M]``."""
    return extension().conv_weight_grad(_nhwc(x), _nhwc(grad), k, m, stride, padding)


@_weight_grad.register_fake
def _(x, grad, k, m, stride, padding):
    return x.new_empty((k, k, x.shape[1] // m, grad.shape[1] // m, m))


def _setup(ctx, inputs, output) -> None:
    x, weight, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding = stride, padding


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _input_grad(grad, weight, ctx.stride, ctx.padding, x.shape[2], x.shape[3])
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad(x, grad, weight.shape[0], weight.shape[4], ctx.stride, ctx.padding)
    return grad_x, grad_w, None, None


_conv.register_autograd(_backward, setup_context=_setup)


def lane_conv2d(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """M convolutions at once in the branch-minor layout (module docstring).

    ``x``: ``[B, Ci·M, H, W]`` with channel index ci·M + m (channels-last memory is used as it is; any other is
    copied). ``weight``: ``[K, K, Ci, Co, M]``. Returns ``[B, Co·M, Ho, Wo]`` in channels-last memory. float32 and
    bfloat16 on the CPU run the compiled kernels (in float32); other dtypes and devices, and machines without
    them, the reference.
    """
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or not kernels_available():
        return reference_lane_conv2d(x, weight.to(x.dtype), stride, padding)
    if x.dtype == torch.bfloat16:  # bf16 autocast: the kernels compute in float32, the activations stay bf16
        return _conv(x.float(), weight.float(), stride, padding).to(torch.bfloat16)
    return _conv(x, weight, stride, padding)


class LaneConv2d(nn.Module):
    """M bias-free convolutions of ``c_in → c_out`` channels each, in the branch-minor layout (:func:`lane_conv2d`).

    Initialized as M independent ``nn.Conv2d`` would be (Kaiming-uniform with a = √5, per branch).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0, *, lanes: int):
        super().__init__()
        self.stride, self.padding, self.lanes = stride, padding, lanes
        convs = [nn.Conv2d(c_in, c_out, kernel_size, bias=False) for _ in range(lanes)]
        self.weight = nn.Parameter(lane_weight(torch.cat([c.weight.detach() for c in convs]), lanes))

    def forward(self, x: Tensor) -> Tensor:
        return lane_conv2d(x, self.weight, self.stride, self.padding)

    def extra_repr(self) -> str:
        k, _, ci, co, m = self.weight.shape
        return f"{ci}, {co}, kernel_size={k}, stride={self.stride}, padding={self.padding}, lanes={m}"
