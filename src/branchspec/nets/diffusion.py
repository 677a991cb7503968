"""The residual R of the class-transfer generator: f(x) = R + Σ_k v_k (Eq. 15, App. E).

Two choices, both called as ``R(x, d)`` (the domain d is ignored) so that they plug into
:class:`branchspec.Branched` as its residual:

- :class:`GaussianSmoothing`: R is x blurred by a Gaussian of width σ; every branch sees x (App. D, "without
  pre-processing").
- :class:`LearntDiffusion`: the learnt nonlinear diffusion of App. E. A recurrent CNN p drives
  u_{n+1} = u_n − dt·p(u_n), u_0 = x (Eq. 16); the components φ_k come from the discrete t·u_tt and
  R = T·p(u(T)) + u(T), so that x = Σ_k φ_k + R (Eq. 17) holds to floating-point error. It returns
  ``(R, φ)`` with φ ``[M, B, C, H, W]``: φ_k feeds branch k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchspec.errors import BranchspecError


class GaussianSmoothing(nn.Module):
    """R(x) = G_σ * x per channel; edges extended by their nearest pixel (scipy's ``mode="nearest"``),
    the kernel truncated at 4σ, as ``skimage.filters.gaussian``."""

    def __init__(self, sigma: float, truncate: float = 4.0):
        super().__init__()
        if not sigma > 0:
            raise BranchspecError(f"the Gaussian σ of R must be positive, got {sigma}.")
        self.sigma = float(sigma)
        self.radius = int(truncate * sigma + 0.5)

    def forward(self, x: Tensor, d: Tensor | None = None) -> Tensor:
        c, r = x.shape[1], self.radius
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / self.sigma) ** 2)
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class DiffusionNet(nn.Module):
    """p(u): the 8-layer bottleneck CNN of App. E, input and output shaped like x.

    Layers (3×3 convs, LeakyReLU between): C→16, 16→24 (stride 2), 24→32 (stride 2), 32→32, 32→32,
    ×2 → 32→24, ×2 → 24→16, 16→C, with additive skips at the two upsampled scales: 40,211 parameters for
    C = 3 (the paper: 4.05·10⁴). The image side must be divisible by 4.

    The last layer starts at zero. ``heat`` = κ adds a fixed heat-flow term −κΔu (5-point Laplacian, no
    parameters): with κ > 0 the diffusion starts as the heat equation (R a smoothed x, φ_k its scale bands) and
    R stays partly a blur whatever p learns. The paper's form is κ = 0 (p alone, which "is learnt to be a
    smoothing operator"): p then starts at zero (φ_k = 0, R = x) and whatever smoothing R does is learnt. (The
    paper does not say how p starts; see docs/decompose.md.)
    """

    WIDTHS = (16, 24, 32, 32, 32, 24, 16)

    def __init__(self, channels: int = 3, heat: float = 0.0):
        super().__init__()
        w = self.WIDTHS
        dims = (channels, *w, channels)
        strides = (1, 2, 2, 1, 1, 1, 1, 1)
        self.layers = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=s, padding=1) for a, b, s in zip(dims[:-1], dims[1:], strides)
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        self.heat = heat
        laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", laplacian, persistent=False)

    def forward(self, u: Tensor) -> Tensor:
        c = u.shape[1]
        h1 = F.leaky_relu(self.layers[0](u), 0.2)
        h2 = F.leaky_relu(self.layers[1](h1), 0.2)
        h = h2
        for layer in self.layers[2:5]:
            h = F.leaky_relu(layer(h), 0.2)
        h = F.leaky_relu(self.layers[5](F.interpolate(h, scale_factor=2.0)), 0.2) + h2
        h = F.leaky_relu(self.layers[6](F.interpolate(h, scale_factor=2.0)), 0.2) + h1
        out = self.layers[7](h)
        if self.heat:
            out = out - self.heat * F.conv2d(F.pad(u, (1, 1, 1, 1), mode="replicate"),
                                             self.laplacian.to(u.dtype).expand(c, 1, 3, 3), groups=c)
        return out


class LearntDiffusion(nn.Module):
    """The learnt nonlinear diffusion of App. E: R and one input φ_k per branch, with x = Σ_k φ_k + R.

    With D_n = −p(u_n) the discrete u_t (n = 0..M) and t_n = n·dt, the discrete t·u_tt integrated over one
    step is φ_k = t_k·(D_k − D_{k−1}) = k·dt·(p(u_{k−1}) − p(u_k)), k = 1..M. Summation by parts gives
    Σ_k φ_k = x − u_M − T·p(u_M) with T = M·dt (the discrete Eq. 17), so R = T·p(u(T)) + u(T).
    p is evaluated M + 1 times ("M + 1 steps"), always with the same weights (a recurrent network).
    """

    def __init__(self, num_branches: int = 9, dt: float = 0.2, channels: int = 3, heat: float = 0.0):
        super().__init__()
        if num_branches < 1 or not dt > 0 or not math.isfinite(dt) or not (math.isfinite(heat) and heat >= 0):
            raise BranchspecError(f"the diffusion needs M ≥ 1 steps, a positive dt and a heat term ≥ 0, got "
                                  f"M={num_branches}, dt={dt}, heat={heat}.")
        self.num_branches, self.dt = num_branches, float(dt)
        self.p = DiffusionNet(channels, heat=heat)

    def trajectory(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u_0..u_M ``[M+1, B, C, H, W]`` and p(u_0)..p(u_M) ``[M+1, B, C, H, W]``."""
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise BranchspecError(f"the learnt diffusion needs image sides divisible by 4, got {tuple(x.shape[-2:])}.")
        us, ps = [x], [self.p(x)]
        for _ in range(self.num_branches):
            us.append(us[-1] - self.dt * ps[-1])
            ps.append(self.p(us[-1]))
        return torch.stack(us), torch.stack(ps)

    def forward(self, x: Tensor, d: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(R, φ): R ``[B, C, H, W]`` and the branch inputs φ ``[M, B, C, H, W]``."""
        u, p = self.trajectory(x)
        k = torch.arange(1, self.num_branches + 1, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
        phi = k * self.dt * (p[:-1] - p[1:])
        residual = self.num_branches * self.dt * p[-1] + u[-1]
        return residual, phi


def make_residual(kind: str, *, num_branches: int, img_size: int, sigma: float | None = None,
                  dt: float = 0.2, heat: float = 0.0) -> nn.Module | None:
    """R by name: ``"diffusion"`` (App. E; ``heat``: its optional heat-flow term), ``"gaussian"`` (σ defaults to
    img_size/16) or ``"none"``."""
    if kind == "diffusion":
        return LearntDiffusion(num_branches, dt=dt, heat=heat)
    if kind == "gaussian":
        return GaussianSmoothing(sigma if sigma is not None else img_size / 16)
    if kind == "none":
        return None
    raise BranchspecError(f"unknown residual {kind!r}; choose diffusion, gaussian or none.")
