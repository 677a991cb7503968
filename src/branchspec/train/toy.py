"""Full-batch gradient descent on the toy problems (Sec. 4.1), vectorized over trials and over M.

Each trial is a model f(x) = Σ_k σ(w_k x + b_k) of M scalar LeakyReLU branches (Eq. 4), trained by plain
gradient descent on L = ½ Σ_j (f(x_j) − y_j)². The gradient is the paper's product of a collaborative and a
distributive part (Eqs. 5-6):

    ∂L/∂w_k = Σ_j (f(x_j) − y_j) · σ'(w_k x_j + b_k) x_j,     ∂L/∂b_k = Σ_j (f(x_j) − y_j) · σ'(w_k x_j + b_k).

Two engines run the same program on the same initial weights:

- ``"torch"``: every trial of every M at once as one padded tensor program ``[trials, M_max]`` with a
  branch mask. It runs on any device and records training dynamics.
- ``"numba"``: one compiled CPU kernel over all trials and all M. Each thread keeps a block of trials in
  registers for all the steps, which is what makes the full Fig. 3 sweep (M = 2..30, 1000 trials,
  10,000 steps) take seconds rather than minutes on two cores.

Initial weights come from ``numpy.random.default_rng([seed, M])``, so a trial's weights do not depend on
which engine or which other values of M run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from branchspec.data.toy import ToySet
from branchspec.errors import BranchspecError

ENGINES = ("auto", "numba", "torch")
_LANES = 16  # trials per numba block: one SIMD-friendly row per branch



SUCCESS_THRESHOLD = 1e-4  # Sec. 4.1: a trial succeeds when Σ_j (f(x_j) − y_j)² < δ = 1e-4

@dataclass
class ToyTraining:
    """The optimization settings. Defaults: see docs/toy.md for why these values."""

    lr: float = 0.01
    steps: int = 10_000
    init_std: float = 1.0
    slope: float = 0.01

    def check(self) -> "ToyTraining":
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise BranchspecError(f"`lr` must be a positive number, got {self.lr}.")
        if int(self.steps) < 0:
            raise BranchspecError(f"`steps` must be zero or more, got {self.steps}.")
        if not (np.isfinite(self.init_std) and self.init_std >= 0):
            raise BranchspecError(f"`init_std` must be a non-negative number, got {self.init_std}.")
        if not np.isfinite(self.slope):
            raise BranchspecError(f"`slope` must be a finite number, got {self.slope}.")
        return self


def initial_weights(num_branches: int, trials: int, init_std: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """w, b ~ N(0, init_std²), each ``[trials, M]``, from ``default_rng([seed, M])``."""
    rng = np.random.default_rng([seed, num_branches])
    w = rng.normal(0.0, init_std, (trials, num_branches))
    b = rng.normal(0.0, init_std, (trials, num_branches))
    return w, b


def responses(w, b, x, slope: float):
    """The response matrices F[t, k, j] = v_k(x_j) = σ(w_k x_j + b_k) for weights ``[..., M]`` (numpy or torch)."""
    z = w[..., None] * x + b[..., None]
    if isinstance(z, torch.Tensor):
        return torch.where(z > 0, z, slope * z)
    return np.where(z > 0, z, slope * z)


# ----------------------------------------------------------------------------------------------- torch engine
def gd_torch(w: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             cfg: ToyTraining, record_every: int = 0):
    """Gradient descent on padded weights ``[R, M_max]`` (``mask`` marks real branches), all rows at once.

    Returns the final ``(w, b)`` and, if ``record_every`` > 0, the responses ``[S, R, M_max, N]`` every
    ``record_every`` steps (the step numbers are ``0, record_every, ..., steps``).
    """
    w, b = w.clone(), b.clone()
    history, recorded = [], []
    for step in range(int(cfg.steps) + 1):
        z = w[..., None] * x + b[..., None]  # [R, M, N]
        positive = z > 0
        if record_every and (step % record_every == 0 or step == cfg.steps):
            history.append(torch.where(positive, z, cfg.slope * z) * mask[..., None])
            recorded.append(step)
        if step == cfg.steps:
            break
        act = torch.where(positive, z, cfg.slope * z) * mask[..., None]
        residual = act.sum(1) - y  # [R, N]: the collaborative part f(x_j) - y_j
        slope_grad = positive.to(z.dtype) * (1.0 - cfg.slope) + cfg.slope  # σ'(z), in z's dtype
        d = residual[:, None, :] * slope_grad * mask[..., None]  # [R, M, N]
        w -= cfg.lr * (d * x).sum(-1)
        b -= cfg.lr * d.sum(-1)
    hist = torch.stack(history) if history else None
    return w, b, hist, recorded


# ----------------------------------------------------------------------------------------------- numba engine
_numba_kernel = None


def _get_numba_kernel():
    """Compile (once per process; cached on disk by numba) the blocked gradient-descent kernel."""
    global _numba_kernel
    if _numba_kernel is not None:
        return _numba_kernel
    try:
        from numba import njit, prange
    except ImportError:  # pragma: no cover - numba is a dependency
        raise BranchspecError("the numba engine needs numba; install it or use `engine` torch.") from None

    @njit(parallel=True, fastmath=True, cache=True)
    def kernel(params, offsets, sizes, order, x, y, lr, steps, slope, lanes):
        # params: flat; block i holds w [M_i, L] then b [M_i, L] from offsets[i]; sizes[i] = M_i
        n = x.shape[0]
        for o in prange(order.shape[0]):
            i = order[o]
            m = sizes[i]
            base = offsets[i]
            w = params[base : base + m * lanes].reshape(m, lanes).copy()
            b = params[base + m * lanes : base + 2 * m * lanes].reshape(m, lanes).copy()
            r = np.empty((n, lanes))
            gw = np.empty((m, lanes))
            gb = np.empty((m, lanes))
            for _ in range(steps):
                for j in range(n):
                    for t in range(lanes):
                        r[j, t] = -y[j]
                for j in range(n):
                    xj = x[j]
                    for k in range(m):
                        for t in range(lanes):
                            z = w[k, t] * xj + b[k, t]
                            r[j, t] += z if z > 0 else slope * z
                for k in range(m):
                    for t in range(lanes):
                        gw[k, t] = 0.0
                        gb[k, t] = 0.0
                for j in range(n):
                    xj = x[j]
                    for k in range(m):
                        for t in range(lanes):
                            z = w[k, t] * xj + b[k, t]
                            d = r[j, t] if z > 0 else slope * r[j, t]
                            gw[k, t] += d * xj
                            gb[k, t] += d
                for k in range(m):
                    for t in range(lanes):
                        w[k, t] -= lr * gw[k, t]
                        b[k, t] -= lr * gb[k, t]
            params[base : base + m * lanes] = w.ravel()
            params[base + m * lanes : base + 2 * m * lanes] = b.ravel()

    _numba_kernel = kernel
    return kernel


def _gd_numba(weights: dict[int, tuple[np.ndarray, np.ndarray]], data: ToySet, cfg: ToyTraining,
              progress: Callable[[int], None] | None):
    """All (M, trial) pairs in one compiled program; ``progress`` receives finished branch-trials."""
    kernel = _get_numba_kernel()
    blocks, flat = [], []  # per block: (M, first trial, offset into the flat parameter vector)
    offset = 0
    for m, (w, b) in weights.items():
        trials = w.shape[0]
        padded = -(-trials // _LANES) * _LANES
        wp = np.zeros((padded, m))
        bp = np.zeros((padded, m))
        wp[:trials], bp[:trials] = w, b
        for start in range(0, padded, _LANES):
            blocks.append((m, start, offset, min(_LANES, trials - start)))  # the last block's padding is not work
            flat.append(wp[start : start + _LANES].T.ravel())
            flat.append(bp[start : start + _LANES].T.ravel())
            offset += 2 * m * _LANES
    params = np.concatenate(flat)
    offsets = np.array([blk[2] for blk in blocks], dtype=np.int64)
    sizes = np.array([blk[0] for blk in blocks], dtype=np.int64)
    real = np.array([blk[0] * blk[3] for blk in blocks], dtype=np.int64)  # branch-trials of each block
    order = np.argsort(-sizes, kind="stable").astype(np.int64)  # largest blocks first: better balance
    # Run in a few chunks so that progress can be shown; each chunk is one parallel program.
    work = np.cumsum(sizes[order])
    n_chunks = 20 if progress is not None else 1
    bounds = np.searchsorted(work, np.linspace(0, work[-1], n_chunks + 1)[1:], side="left") + 1
    start = 0
    for end in bounds:
        end = min(int(end), len(order))
        if end > start:
            kernel(params, offsets, sizes, order[start:end], data.x, data.y, float(cfg.lr), int(cfg.steps),
                   float(cfg.slope), _LANES)
            if progress is not None:
                progress(int(real[order[start:end]].sum()))
        start = end
    out = {}
    for m, (w, _) in weights.items():
        trials = w.shape[0]
        rows_w, rows_b = [], []
        for mm, first, off, _ in blocks:
            if mm != m:
                continue
            rows_w.append(params[off : off + m * _LANES].reshape(m, _LANES).T)
            rows_b.append(params[off + m * _LANES : off + 2 * m * _LANES].reshape(m, _LANES).T)
        out[m] = (np.concatenate(rows_w)[:trials], np.concatenate(rows_b)[:trials])
    return out


# ------------------------------------------------------------------------------------------------- the sweep
def train_toy(data: ToySet, branches: Sequence[int], trials: int, cfg: ToyTraining, *, seed: int = 0,
              engine: str = "auto", device: str | torch.device = "cpu",
              progress: Callable[[int], None] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Train ``trials`` independent models for every M in ``branches``; returns M -> (w, b), each ``[trials, M]``.

    ``engine="auto"`` takes numba on the CPU and torch elsewhere. ``progress`` is called with the number of
    branch-trials finished.
    """
    cfg.check()
    branches = [int(m) for m in branches]
    if not branches or min(branches) < 1:
        raise BranchspecError(f"the numbers of branches must be positive integers, got {branches}.")
    if int(trials) < 1:
        raise BranchspecError(f"`trials` must be a positive integer, got {trials}.")
    if engine not in ENGINES:
        raise BranchspecError(f"`engine` must be one of {ENGINES}, got {engine!r}.")
    if engine == "auto":
        engine = "numba" if torch.device(device).type == "cpu" else "torch"
    weights = {m: initial_weights(m, int(trials), cfg.init_std, seed) for m in branches}
    if engine == "numba":
        return _gd_numba(weights, data, cfg, progress)
    return _train_torch_padded(weights, data, cfg, device, progress)


def _train_torch_padded(weights, data: ToySet, cfg: ToyTraining, device, progress):
    """Every M and every trial in one padded tensor program (the GPU path)."""
    m_max = max(weights)
    rows = sum(w.shape[0] for w, _ in weights.values())
    w_all = torch.zeros(rows, m_max, dtype=torch.float64)
    b_all = torch.zeros_like(w_all)
    mask = torch.zeros_like(w_all)
    spans, row = {}, 0
    for m, (w, b) in weights.items():
        t = w.shape[0]
        w_all[row : row + t, :m] = torch.from_numpy(w)
        b_all[row : row + t, :m] = torch.from_numpy(b)
        mask[row : row + t, :m] = 1
        spans[m] = (row, row + t)
        row += t
    x = torch.as_tensor(data.x, dtype=torch.float64, device=device)
    y = torch.as_tensor(data.y, dtype=torch.float64, device=device)
    w_out, b_out, _, _ = gd_torch(w_all.to(device), b_all.to(device), mask.to(device), x, y, cfg)
    if progress is not None:
        progress(sum(m * w.shape[0] for m, (w, _) in weights.items()))
    w_out, b_out = w_out.cpu().numpy(), b_out.cpu().numpy()
    return {m: (w_out[s:e, :m], b_out[s:e, :m]) for m, (s, e) in spans.items()}


def train_per_m(data: ToySet, branches: Sequence[int], trials: int, cfg: ToyTraining, *, seed: int = 0,
                device: str | torch.device = "cpu") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The straightforward vectorization: one tensor program per M (the benchmark's baseline)."""
    x = torch.as_tensor(data.x, dtype=torch.float64, device=device)
    y = torch.as_tensor(data.y, dtype=torch.float64, device=device)
    out = {}
    for m in branches:
        w, b = (torch.from_numpy(a).to(device) for a in initial_weights(m, trials, cfg.init_std, seed))
        w, b, _, _ = gd_torch(w, b, torch.ones_like(w), x, y, cfg)
        out[m] = (w.cpu().numpy(), b.cpu().numpy())
    return out
