"""Hessian-vector-product estimates for whole networks, where the matrix is too large to form (Sec. 5.2).

The quantities are PyHessian's (Yao et al. 2020; see docs/hessian.md for where ours differ):

    HessianOperator(model, batches, loss)   v ↦ H·v of the mean loss, averaged over batches by their size
    hutchinson_trace(op)                    tr(H) = E[vᵀHv] over Rademacher v, and the trace of each branch block
    hutchinson_block_masses(op)             ‖H_kl‖_F² = E‖(H v_l)_k‖² over Rademacher v_l living on block l
    top_eigenvalues(op, n)                  power iteration with deflation (or Lanczos)
    lanczos(op, steps)                      Lanczos with full reorthogonalization
    eigenvalue_density(op)                  stochastic Lanczos quadrature: nodes and weights per run
    density_curve(nodes, weights)           the spectral density, broadened by Gaussians

An operator is anything with ``matvec(v)`` on flat vectors, ``size``, ``block_sizes``, ``dtype`` and ``device``:
:class:`HessianOperator` for a model, :class:`MatrixOperator` for an explicit matrix (for instance the exact
Hessian, to compare). Random vectors come from a CPU generator seeded by the caller, so an estimate does
not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor
from tqdm.auto import tqdm

from branchspec.analysis.batchnorm import batchnorm_mode, check_batchnorm_mode
from branchspec.analysis.gradients import _as_tuple
from branchspec.analysis.selection import ParameterSelection, select_parameters
from branchspec.branched import Branched
from branchspec.errors import BranchspecError
from branchspec.losses import PerSampleLoss, get_loss


class HessianOperator:
    """v ↦ H·v, H the Hessian of the mean loss w.r.t. the selected parameters (default: all of every branch).

    ``batches`` is a sequence of ``(inputs, target)``; H·v is the sum of the batches' H_b·v weighted by their
    share of the samples (PyHessian's data-loader mode). Each product is a double backward pass through the
    model (``torch.autograd.grad`` with ``create_graph``); with one batch the first-order graph is kept and
    reused, as PyHessian does. The weights must not change while the operator is in use.
    """

    def __init__(self, model: Branched, batches: Iterable, loss: str | PerSampleLoss = "l2",
                 params: str | ParameterSelection = "*", *, branches=None, batchnorm: str = "train"):
        self.model = model
        self.batches = [(_as_tuple(x), y) for x, y in batches]
        if not self.batches:
            raise BranchspecError("the Hessian operator needs at least one batch of (inputs, target).")
        self.loss_fn = get_loss(loss)
        self.batchnorm = check_batchnorm_mode(batchnorm)
        self.selection = params if isinstance(params, ParameterSelection) else select_parameters(model, params, branches)
        self.parameters = self.selection.parameters(model)
        frozen = [n for n, p in zip(self.selection.names, self.parameters) if not p.requires_grad]
        if frozen:
            raise BranchspecError(f"parameter(s) {frozen} do not require gradients; enable requires_grad or "
                                  "leave them out of the selection.")
        counts = [len(y) for _, y in self.batches]
        self.shares = [c / sum(counts) for c in counts]
        self.block_sizes = self.selection.block_sizes
        self.size = self.selection.size
        self.dtype, self.device = self.parameters[0].dtype, self.parameters[0].device
        self.products = 0  # Hessian-vector products computed so far
        self._kept = None  # the first-order graph of a single batch

    def _gradients(self, b: int, keep: bool) -> tuple[Tensor, ...]:
        if keep and self._kept is not None:
            return self._kept
        inputs, target = self.batches[b]
        with batchnorm_mode(self.model, self.batchnorm), torch.enable_grad():
            loss = self.loss_fn(self.model(*inputs), target).mean()
            grads = torch.autograd.grad(loss, self.parameters, create_graph=True)
        if keep:
            self._kept = grads
        return grads

    def matvec(self, v: Tensor) -> Tensor:
        """H·v for a flat vector ``v`` ``[size]``."""
        pieces = list(v.to(self.dtype).split([p.numel() for p in self.parameters]))
        pieces = [t.view_as(p) for t, p in zip(pieces, self.parameters)]
        keep = len(self.batches) == 1
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for b, share in enumerate(self.shares):
            grads = self._gradients(b, keep)
            hv = torch.autograd.grad(grads, self.parameters, grad_outputs=pieces, retain_graph=keep, allow_unused=True)
            out += share * torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                                      for h, p in zip(hv, self.parameters)])
        self.products += 1
        return out


class MatrixOperator:
    """An explicit symmetric matrix as an operator (to run the estimators on a known Hessian)."""

    def __init__(self, matrix: Tensor, block_sizes=None):
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.block_sizes = list(block_sizes) if block_sizes is not None else [self.size]
        self.dtype, self.device = matrix.dtype, matrix.device
        self.products = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.products += 1
        return self.matrix @ v.to(self.dtype)


def dense(op) -> Tensor:
    """The operator's matrix, one product per column (small operators only)."""
    eye = torch.eye(op.size, dtype=op.dtype, device=op.device)
    return torch.stack([op.matvec(e) for e in eye], 1)


def _rademacher(n: int, gen: torch.Generator, op) -> Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(op.dtype).to(op.device)


def _block_slices(op) -> list[slice]:
    edges = np.cumsum([0, *op.block_sizes])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ------------------------------------------------------------------------------------------------ Hutchinson
@dataclass
class TraceEstimate:
    """Hutchinson's estimate of tr(H), with its samples vᵀHv and the same estimate per block."""

    trace: float
    samples: list[float]
    block_traces: list[float]


def hutchinson_trace(op, probes: int = 100, tol: float = 1e-3, seed: int = 0,
                     show_progress: bool = False) -> TraceEstimate:
    """tr(H) = E[vᵀHv] over Rademacher v (PyHessian's ``trace``, with its stopping rule: stop once the running
    mean moves by less than ``tol`` relative to its size; ``tol=0`` uses every probe). The per-block traces
    tr(H_kk) come from the same products: E[v_kᵀ(Hv)_k]."""
    gen = torch.Generator().manual_seed(int(seed))
    blocks = _block_slices(op)
    samples, per_block = [], []
    for _ in tqdm(range(int(probes)), desc="trace", unit="probe", disable=not show_progress):
        v = _rademacher(op.size, gen, op)
        hv = op.matvec(v)
        per_block.append([float(v[s] @ hv[s]) for s in blocks])
        samples.append(sum(per_block[-1]))
        mean, previous = np.mean(samples), np.mean(samples[:-1]) if len(samples) > 1 else None
        if previous is not None and abs(mean - previous) / (abs(previous) + 1e-6) < tol:
            break
    return TraceEstimate(float(np.mean(samples)), samples, np.mean(per_block, axis=0).tolist())


def hutchinson_block_masses(op, probes: int = 10, seed: int = 0, show_progress: bool = False) -> Tensor:
    """Unbiased estimates of ‖H_kl‖_F² for every pair of blocks ``[M, M]`` (float64): for each block l, a
    Rademacher vector v_l on block l (zero elsewhere) gives E‖(H v_l)_k‖² = ‖H_kl‖_F² for every k at once.
    Costs ``probes × M`` products. :func:`branchspec.analysis.hessian.mass_ratio` turns it into the score."""
    gen = torch.Generator().manual_seed(int(seed))
    blocks = _block_slices(op)
    est = torch.zeros(len(blocks), len(blocks), dtype=torch.float64)
    with tqdm(total=int(probes) * len(blocks), desc="block masses", unit="product", disable=not show_progress) as bar:
        for _ in range(int(probes)):
            for l, s in enumerate(blocks):
                v = torch.zeros(op.size, dtype=op.dtype, device=op.device)
                v[s] = _rademacher(s.stop - s.start, gen, op)
                hv = op.matvec(v)
                est[:, l] += torch.tensor([float(hv[t].double().pow(2).sum()) for t in blocks])
                bar.update()
    return est / int(probes)


# --------------------------------------------------------------------------------------- eigenvalues
def _orthogonalize(v: Tensor, basis: list[Tensor]) -> Tensor:
    for u in basis:
        v = v - (u @ v) * u
    return v


def top_eigenvalues(op, n: int = 1, *, iterations: int = 100, tol: float = 1e-3, seed: int = 0,
                    method: str = "power", show_progress: bool = False) -> tuple[list[float], Tensor]:
    """The ``n`` eigenvalues of largest magnitude and their eigenvectors ``[n, size]``.

    ``"power"``: power iteration, each eigenvector deflated against the earlier ones, stopped when the
    Rayleigh quotient moves by less than ``tol`` relative to its size (PyHessian's ``eigenvalues``).
    ``"lanczos"``: the Ritz pairs of ``iterations`` Lanczos steps.
    """
    if method == "lanczos":
        alpha, beta, basis = lanczos(op, iterations, seed=seed, show_progress=show_progress)
        values, vectors = eigh_tridiagonal(alpha, beta)
        order = np.argsort(-np.abs(values))[:n]
        ritz = torch.as_tensor(vectors[:, order].T, dtype=op.dtype, device=op.device) @ basis
        return values[order].tolist(), ritz
    if method != "power":
        raise BranchspecError(f"method must be 'power' or 'lanczos', got {method!r}.")
    gen = torch.Generator().manual_seed(int(seed))
    values, vectors = [], []
    for i in range(int(n)):
        v = torch.randn(op.size, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        v = _orthogonalize(v, vectors)
        v = v / v.norm()
        value = None
        for _ in tqdm(range(int(iterations)), desc=f"eigenvalue {i + 1}", unit="product", disable=not show_progress):
            hv = _orthogonalize(op.matvec(v), vectors)
            new = float(v @ hv)
            if float(hv.norm()) == 0.0:  # v lies in the null space: its eigenvalue is 0
                value = 0.0
                break
            v = hv / hv.norm()
            if value is not None and abs(new - value) / (abs(value) + 1e-6) < tol:
                value = new
                break
            value = new
        values.append(value)
        vectors.append(v)
    return values, torch.stack(vectors)


def lanczos(op, steps: int, *, seed: int = 0, start: Tensor | None = None,
            show_progress: bool = False) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Lanczos with full reorthogonalization from a normalized Rademacher vector (or ``start``).

    Returns the tridiagonal matrix's diagonal α ``[m]`` and off-diagonal β ``[m - 1]`` (float64) and the
    orthonormal basis ``[m, size]``; m < ``steps`` when an invariant subspace is reached.
    """
    steps = min(int(steps), op.size)
    if steps < 1:
        raise BranchspecError(f"Lanczos needs at least one step, got {steps}.")
    v = start if start is not None else _rademacher(op.size, torch.Generator().manual_seed(int(seed)), op)
    basis = [v / v.norm()]
    alpha, beta = [], []
    for j in tqdm(range(steps), desc="Lanczos", unit="step", disable=not show_progress):
        w = op.matvec(basis[j])
        alpha.append(float(basis[j] @ w))
        V = torch.stack(basis)
        for _ in range(2):  # full reorthogonalization, twice for stability
            w = w - V.T @ (V @ w)
        if j == steps - 1:
            break
        b = float(w.norm())
        if b < 1e-10 * max(1.0, abs(alpha[-1])):
            break
        beta.append(b)
        basis.append(w / b)
    return np.array(alpha), np.array(beta), torch.stack(basis[: len(alpha)])


def eigenvalue_density(op, steps: int = 100, runs: int = 1, seed: int = 0,
                       show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature (PyHessian's ``density``): for each run, the eigenvalues of the
    tridiagonal matrix (the nodes) and the squared first components of its eigenvectors (the weights, which
    sum to 1). Both ``[runs, m]``; Σ_i w_i g(λ_i) estimates tr(g(H))/size."""
    nodes, weights = [], []
    for r in range(int(runs)):
        alpha, beta, _ = lanczos(op, steps, seed=int(seed) + r, show_progress=show_progress)
        values, vectors = eigh_tridiagonal(alpha, beta)
        nodes.append(values)
        weights.append(vectors[0] ** 2)
    m = max(len(n) for n in nodes)  # a run that reached an invariant subspace early: padded with zero weights
    pad = [(0, m - len(n)) for n in nodes]
    return (np.stack([np.pad(n, p, mode="edge") for n, p in zip(nodes, pad)]),
            np.stack([np.pad(w, p) for w, p in zip(weights, pad)]))


def density_curve(nodes: np.ndarray, weights: np.ndarray, *, points: int = 10_000, variance: float = 1e-5,
                  margin: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """The spectral density on a grid: each node a Gaussian of its weight with variance ``variance`` times the
    spectrum's width (at least 1), averaged over runs and normalized to integrate to 1 (as PyHessian plots)."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    lo, hi = nodes.min(1).mean() - margin, nodes.max(1).mean() + margin
    grid = np.linspace(lo, hi, int(points))
    var = variance * max(1.0, hi - lo)
    bumps = np.exp(-((grid[None, None] - nodes[..., None]) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)
    density = (weights[..., None] * bumps).sum(1).mean(0)
    area = density.sum() * (grid[1] - grid[0])
    return grid, density / area if area > 0 else density
