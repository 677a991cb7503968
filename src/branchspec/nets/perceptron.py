"""The toy branch of Sec. 4.1, Eq. (4): v(x) = σ(w·x + b) with σ a LeakyReLU and scalar w, b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Perceptron(nn.Module):
    """v(x) = LeakyReLU(w·x + b) on scalar inputs ``[B]`` or ``[B, 1]``; w, b ~ N(0, init_std²)."""

    def __init__(self, slope: float = 0.01, init_std: float = 1.0):
        super().__init__()
        self.slope = slope
        self.w = nn.Parameter(torch.randn(()) * init_std)
        self.b = nn.Parameter(torch.randn(()) * init_std)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.w * x + self.b, self.slope)
