"""The branched class-transfer generator of Sec. 7 and its multi-domain discriminator (App. E).

A branch v_k(x, d) is a slim StarGAN-v2 generator (Choi et al., 2020), re-implemented from the published layer
description (``reference/anchors.md`` §2.2; none of the CC BY-NC code is used):

- an encoder of residual down-blocks with instance norm, then two bottleneck blocks;
- a decoder of AdaIN residual blocks (two bottleneck, then the up-blocks), ``w_hpf = 0``;
- the target domain d enters through a learnt per-domain code, turned into a style vector by a mapping MLP;
  there is no latent noise (class transfer, not diverse synthesis).

The branched generator is f(x, d) = R(x) + Σ_k v_k(x, d) with M = 9 (Eq. 15), built on
:class:`branchspec.Branched` by :func:`branched_generator`.

Every layer here takes ``groups``: with ``groups = G`` one module holds G independent copies side by side
(grouped convolutions, per-channel norms, grouped linear maps), the channels of copy g at ``[g·C, (g+1)·C)``.
``groups = 1`` is one branch; ``groups = M`` is the fused execution of all M branches as one network
(:class:`FusedGenerator`). A fused parameter is the concatenation of the M branches' parameters, so the two
convert into each other exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchspec.branched import Branched, BranchedOutput
from branchspec.errors import BranchspecError

IMAGE_SIZES = (16, 32, 64, 128, 256)
STARGAN_DIM_IN = 2**14  # StarGAN-v2: dim_in = 2^14 // img_size (64 at 256 px)
STARGAN_MAX_CONV_DIM = 512
STARGAN_HIDDEN_DIM = 512  # the mapping MLP's width
LRELU = 0.2


@dataclass
class GeneratorConfig:
    """The shape of one generator branch. Defaults: StarGAN-v2's widths times ``width`` = 1/4 (Sec. 7).

    ``dim_in``/``max_conv_dim``/``hidden_dim`` override the scaled StarGAN-v2 values when given.
    """

    img_size: int = 256
    num_domains: int = 2
    width: float = 0.25
    style_dim: int = 64
    latent_dim: int = 16
    dim_in: int | None = None
    max_conv_dim: int | None = None
    hidden_dim: int | None = None

    def check(self) -> "GeneratorConfig":
        if self.img_size not in IMAGE_SIZES:
            raise BranchspecError(f"image size must be one of {IMAGE_SIZES}, got {self.img_size}; "
                                  "images of other sizes are resized to it.")
        if self.num_domains < 2:
            raise BranchspecError(f"class transfer needs at least 2 domains, got {self.num_domains}.")
        if not self.width > 0:
            raise BranchspecError(f"the width multiplier must be positive, got {self.width}.")
        for name in ("style_dim", "latent_dim", "dim_in", "max_conv_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BranchspecError(f"{name} must be a positive integer, got {value}.")
        return self

    @property
    def widths(self) -> tuple[int, int, int]:
        """(dim_in, max_conv_dim, hidden_dim) after the width multiplier and the overrides."""
        def scaled(value):
            return max(1, round(self.width * value))

        return (self.dim_in or scaled(STARGAN_DIM_IN // self.img_size),
                self.max_conv_dim or scaled(STARGAN_MAX_CONV_DIM),
                self.hidden_dim or scaled(STARGAN_HIDDEN_DIM))

    @property
    def num_down_blocks(self) -> int:
        """log2(img_size) − 4 down-blocks (w_hpf = 0): the bottleneck is 16×16 at 256 px."""
        return int(math.log2(self.img_size)) - 4


# ----------------------------------------------------------------------------------------------- layers
class GroupedLinear(nn.Module):
    """G independent linear maps side by side: ``[..., G·in] -> [..., G·out]``; G = 1 is ``nn.Linear``.

    The weight is ``[G·out, in]``: the G weights stacked along the first dimension, as in a grouped convolution.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(groups * out_features)) if bias else None
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(self.groups, self.out_features, self.in_features)
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (self.groups, self.in_features)), w).flatten(-2)
        return y if self.bias is None else y + self.bias


def grouped_conv(c_in: int, c_out: int, kernel: int, groups: int, bias: bool = True) -> nn.Conv2d:
    """G independent ``c_in -> c_out`` convolutions as one grouped convolution (same padding)."""
    return nn.Conv2d(groups * c_in, groups * c_out, kernel, padding=kernel // 2, bias=bias, groups=groups)


class ResBlk(nn.Module):
    """Encoder block: [IN] → LReLU → conv3×3 → [avgpool] → [IN] → LReLU → conv3×3, plus a shortcut
    ([1×1 conv] → [avgpool]); the output is (shortcut + residual)/√2."""

    def __init__(self, dim_in: int, dim_out: int, *, normalize: bool, downsample: bool, groups: int = 1):
        super().__init__()
        self.normalize, self.downsample = normalize, downsample
        self.conv1 = grouped_conv(dim_in, dim_in, 3, groups)
        self.conv2 = grouped_conv(dim_in, dim_out, 3, groups)
        if normalize:
            self.norm1 = nn.InstanceNorm2d(groups * dim_in, affine=True)
            self.norm2 = nn.InstanceNorm2d(groups * dim_in, affine=True)
        self.shortcut = grouped_conv(dim_in, dim_out, 1, groups, bias=False) if dim_in != dim_out else None

    def forward(self, x: Tensor) -> Tensor:
        s = x if self.shortcut is None else self.shortcut(x)
        r = self.norm1(x) if self.normalize else x
        r = self.conv1(F.leaky_relu(r, LRELU))
        if self.downsample:
            s, r = F.avg_pool2d(s, 2), F.avg_pool2d(r, 2)
        r = self.norm2(r) if self.normalize else r
        r = self.conv2(F.leaky_relu(r, LRELU))
        return (s + r) / math.sqrt(2)


class AdaIN(nn.Module):
    """Adaptive instance norm: (1 + γ(s))·IN(x) + β(s), with [γ, β] = Linear(s) (StarGAN-v2)."""

    def __init__(self, style_dim: int, channels: int, groups: int = 1):
        super().__init__()
        self.channels, self.groups = channels, groups
        self.norm = nn.InstanceNorm2d(groups * channels, affine=False)
        self.fc = GroupedLinear(style_dim, 2 * channels, groups)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        h = self.fc(s).view(-1, self.groups, 2, self.channels)
        gamma = h[:, :, 0].reshape(-1, self.groups * self.channels, 1, 1)
        beta = h[:, :, 1].reshape(-1, self.groups * self.channels, 1, 1)
        return (1 + gamma) * self.norm(x) + beta


class AdainResBlk(nn.Module):
    """Decoder block: AdaIN → LReLU → [nearest ×2] → conv3×3 → AdaIN → LReLU → conv3×3, plus a shortcut
    ([nearest ×2] → [1×1 conv]); the output is (shortcut + residual)/√2 (w_hpf = 0)."""

    def __init__(self, dim_in: int, dim_out: int, style_dim: int, *, upsample: bool, groups: int = 1):
        super().__init__()
        self.upsample = upsample
        self.norm1 = AdaIN(style_dim, dim_in, groups)
        self.norm2 = AdaIN(style_dim, dim_out, groups)
        self.conv1 = grouped_conv(dim_in, dim_out, 3, groups)
        self.conv2 = grouped_conv(dim_out, dim_out, 3, groups)
        self.shortcut = grouped_conv(dim_in, dim_out, 1, groups, bias=False) if dim_in != dim_out else None

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        r = F.leaky_relu(self.norm1(x, s), LRELU)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            r = F.interpolate(r, scale_factor=2, mode="nearest")
        r = self.conv2(F.leaky_relu(self.norm2(self.conv1(r), s), LRELU))
        return ((x if self.shortcut is None else self.shortcut(x)) + r) / math.sqrt(2)


# ---------------------------------------------------------------------------------------------- networks
class Generator(nn.Module):
    """The StarGAN-v2 image generator, ``w_hpf = 0``: RGB image and style in, RGB image out.

    With ``groups = G`` it is G generators side by side: styles ``[B, G·style_dim]`` in, ``[B, G·3, H, W]``
    out. The input is either one image ``[B, 3, H, W]`` that every copy sees, or one per copy ``[B, G·3, H, W]``.
    """

    def __init__(self, cfg: GeneratorConfig, groups: int = 1):
        super().__init__()
        dim_in, max_dim, _ = cfg.widths
        self.groups = groups
        self.from_rgb = grouped_conv(3, dim_in, 3, groups)
        self.encode = nn.ModuleList()
        self.decode = nn.ModuleList()
        dim = dim_in
        for _ in range(cfg.num_down_blocks):
            dim_out = min(2 * dim, max_dim)
            self.encode.append(ResBlk(dim, dim_out, normalize=True, downsample=True, groups=groups))
            self.decode.insert(0, AdainResBlk(dim_out, dim, cfg.style_dim, upsample=True, groups=groups))
            dim = dim_out
        for _ in range(2):  # the bottleneck blocks
            self.encode.append(ResBlk(dim, dim, normalize=True, downsample=False, groups=groups))
            self.decode.insert(0, AdainResBlk(dim, dim, cfg.style_dim, upsample=False, groups=groups))
        self.to_rgb = nn.Sequential(nn.InstanceNorm2d(groups * dim_in, affine=True), nn.LeakyReLU(LRELU),
                                    grouped_conv(dim_in, 3, 1, groups))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        conv = self.from_rgb
        # one image shared by the G copies: the grouped conv of its G-fold repeat is a dense conv
        x = conv(x) if x.shape[1] != 3 or self.groups == 1 else F.conv2d(x, conv.weight, conv.bias, padding=1)
        for block in self.encode:
            x = block(x)
        for block in self.decode:
            x = block(x, s)
        return self.to_rgb(x)


class MappingNetwork(nn.Module):
    """Domain d → style s_d: a learnt code per domain through a shared MLP (Linear + ReLU, ×4) and a per-domain
    head (3 × [Linear + ReLU], then Linear to ``style_dim``), the layout of StarGAN-v2's mapping network with a
    learnt code in place of the latent noise."""

    def __init__(self, cfg: GeneratorConfig, groups: int = 1):
        super().__init__()
        hidden = cfg.widths[2]
        self.codes = nn.Parameter(torch.randn(cfg.num_domains, groups * cfg.latent_dim))

        def mlp(dims):
            layers = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [GroupedLinear(a, b, groups), nn.ReLU()]
            return layers

        self.shared = nn.Sequential(*mlp([cfg.latent_dim] + [hidden] * 4))
        self.heads = nn.ModuleList(
            nn.Sequential(*mlp([hidden] * 4), GroupedLinear(hidden, cfg.style_dim, groups))
            for _ in range(cfg.num_domains)
        )

    def forward(self) -> Tensor:
        """The styles of every domain: ``[num_domains, G·style_dim]``."""
        h = self.shared(self.codes)
        return torch.stack([head(h[j]) for j, head in enumerate(self.heads)])


class StarGANBranch(nn.Module):
    """v_k(x, d): one branch, a slim StarGAN-v2 generator with its own domain styles (Sec. 7).

    With ``groups = M`` the same module is all M branches fused; its output is then ``[B, M·3, H, W]``.
    """

    def __init__(self, cfg: GeneratorConfig, groups: int = 1):
        super().__init__()
        self.cfg = cfg.check()
        self.generator = Generator(cfg, groups)
        self.mapping = MappingNetwork(cfg, groups)
        self.apply(he_init)

    def forward(self, x: Tensor, d: Tensor) -> Tensor:
        return self.generator(x, self.mapping()[d])


# ------------------------------------------------------------------------------------- branched generator
def branched_generator(cfg: GeneratorConfig, num_branches: int = 9, *, residual=None, seed: int | None = None,
                       execution: str = "loop") -> Branched | "FusedGenerator":
    """f(x, d) = R(x) + Σ_k v_k(x, d), Eq. (15): M slim StarGAN-v2 branches (M = 9 in Sec. 7).

    ``execution`` is ``"loop"`` or ``"vmap"`` (a :class:`Branched`) or ``"fused"`` (a :class:`FusedGenerator`
    with the same weights as the loop built from the same seed).
    """
    cfg.check()
    model = Branched(lambda: StarGANBranch(cfg), num_branches, residual=residual, seed=seed,
                     execution="loop" if execution == "fused" else execution)
    return FusedGenerator.from_branched(model) if execution == "fused" else model


class FusedGenerator(nn.Module):
    """All M branches of a branched generator as one network of grouped convolutions (Sec. 7).

    The same methods as :class:`Branched` (``forward``, ``decompose``, ``branch_outputs``, ``num_branches``),
    and the same numbers from the same weights; :meth:`from_branched` and :meth:`to_branched` convert.
    """

    def __init__(self, cfg: GeneratorConfig, num_branches: int, residual=None):
        super().__init__()
        self.net = StarGANBranch(cfg, groups=num_branches)
        self.num_branches = num_branches
        self._set_residual(residual)

    def _set_residual(self, residual) -> None:
        if isinstance(residual, nn.Module):
            self.residual = residual
        else:
            self._fixed_residual = residual

    # the same rules as Branched for subsets and for a residual that returns (R, branch inputs)
    residual_fn = Branched.residual_fn
    check_subset = Branched.check_subset
    _residual = Branched._residual

    def forward(self, x: Tensor, d: Tensor, subset: Sequence[int] | None = None) -> Tensor:
        return self.decompose(x, d, subset=subset).total

    def branch_outputs(self, x: Tensor, d: Tensor, subset: Sequence[int] | None = None) -> Tensor:
        return self.decompose(x, d, subset=subset).branch_outputs

    def decompose(self, x: Tensor, d: Tensor, subset: Sequence[int] | None = None) -> BranchedOutput:
        """R, every branch's output v_k(x, d) ``[K, B, 3, H, W]`` and the total, as :meth:`Branched.decompose`."""
        subset = self.check_subset(subset)
        residual, phi = self._residual((x, d))
        # branch k sees φ_k when R hands out branch inputs (App. E): [M, B, 3, H, W] -> [B, M·3, H, W]
        inputs = x if phi is None else phi.transpose(0, 1).flatten(1, 2)
        out = self.net(inputs, d).unflatten(1, (self.num_branches, -1)).transpose(0, 1)
        out = out if subset == tuple(range(self.num_branches)) else out[list(subset)]
        total = out.sum(0) if residual is None else out.sum(0) + residual
        return BranchedOutput(total=total, branch_outputs=out, residual=residual, subset=subset)

    @classmethod
    def from_branched(cls, model: Branched) -> "FusedGenerator":
        """The fused network holding exactly the weights of ``model``'s branches (it shares R)."""
        first = model.branches[0]
        if not isinstance(first, StarGANBranch):
            raise BranchspecError("only a branched generator of StarGANBranch branches can be fused.")
        with torch.device("meta"):  # no initialization: every weight comes from the branches
            fused = cls(first.cfg, model.num_branches)
        states = [b.state_dict() for b in model.branches]
        fused.net.load_state_dict({name: torch.cat([s[name] for s in states], dim=_group_dim(name))
                                   for name in states[0]}, assign=True)
        fused._set_residual(model.residual_fn)
        return fused

    def to_branched(self, execution: str = "loop") -> Branched:
        """The loop (or vmap) execution of the same weights (copied), sharing R."""
        m = self.num_branches
        state = self.net.state_dict()
        branches = []
        for k in range(m):
            with torch.device("meta"):
                branch = StarGANBranch(self.net.cfg)
            branch.load_state_dict({name: t.chunk(m, dim=_group_dim(name))[k].clone() for name, t in state.items()},
                                   assign=True)
            branches.append(branch)
        return Branched(branches, residual=self.residual_fn, execution=execution)


def _group_dim(name: str) -> int:
    """The dimension along which a fused parameter holds its M copies: the channels, except for the codes."""
    return 1 if name == "mapping.codes" else 0


# --------------------------------------------------------------------------------------------- discriminator
class Discriminator(nn.Module):
    """The multi-domain discriminator of StarGAN-v2: one real/fake logit per domain; D(x, y) is the logit of y.

    conv3×3 → log2(img) − 2 residual down-blocks without norm (channels doubling up to ``max_conv_dim``) →
    LReLU → conv4×4 (valid) → LReLU → conv1×1 to ``num_domains``. ``width`` scales StarGAN-v2's channels.
    """

    def __init__(self, img_size: int = 256, num_domains: int = 2, width: float = 1.0):
        super().__init__()
        dim, max_dim, _ = GeneratorConfig(img_size=img_size, num_domains=num_domains, width=width).check().widths
        layers = [nn.Conv2d(3, dim, 3, padding=1)]
        for _ in range(int(math.log2(img_size)) - 2):
            dim_out = min(2 * dim, max_dim)
            layers.append(ResBlk(dim, dim_out, normalize=False, downsample=True))
            dim = dim_out
        layers += [nn.LeakyReLU(LRELU), nn.Conv2d(dim, dim, 4), nn.LeakyReLU(LRELU)]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(dim, num_domains, 1)
        self.feature_dim = dim
        self.apply(he_init)

    def features(self, x: Tensor) -> Tensor:
        """The trunk's output ``[B, feature_dim]`` (used as a feature extractor for the Fréchet distance)."""
        return self.trunk(x).flatten(1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The logits ``[B, num_domains]``, or the logit of domain ``y[i]`` for each image when ``y`` is given."""
        logits = self.head(self.trunk(x)).flatten(1)
        return logits if y is None else logits.gather(1, y.view(-1, 1)).squeeze(1)


def he_init(module: nn.Module) -> None:
    """StarGAN-v2's initialization: He (Kaiming normal, fan-in) weights and zero biases for convs and linears."""
    if isinstance(module, (nn.Conv2d, nn.Linear, GroupedLinear)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
