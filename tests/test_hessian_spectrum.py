"""Hessian-vector-product estimators against exact values: the operator, Hutchinson, power iteration, Lanczos, SLQ."""

import numpy as np
import pytest
import torch
from torch import nn

from branchspec import Branched, BranchspecError
from branchspec.analysis.hessian import block_squared_norms, exact_hessian, mass_ratio
from branchspec.analysis.spectrum import (HessianOperator, MatrixOperator, dense, density_curve, eigenvalue_density,
                                          hutchinson_block_masses, hutchinson_trace, lanczos, top_eigenvalues)

D = torch.float64


def model_and_batches(n_batches=1):
    model = Branched(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)), 3,
                     seed=0).to(D)
    g = torch.Generator().manual_seed(0)
    sizes = [6, 4, 5][:n_batches]
    return model, [(torch.randn(n, 3, generator=g, dtype=D), torch.randint(0, 2, (n,), generator=g)) for n in sizes]


def symmetric(n=30, seed=0, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    values = spectrum if spectrum is not None else torch.linspace(-2, 1, n, dtype=D) ** 3
    return Q @ torch.diag(values) @ Q.T


@pytest.mark.parametrize("batchnorm", ["train", "eval"])
def test_operator_equals_the_exact_hessian_averaged_over_batches(batchnorm):
    model, batches = model_and_batches(2)
    op = HessianOperator(model, batches, "cross_entropy", "0.*,1.weight", batchnorm=batchnorm)
    H = dense(op)
    total = sum(len(y) for _, y in batches)
    expected = sum(len(y) / total * exact_hessian(model, x, y, "cross_entropy", "0.*,1.weight", batchnorm=batchnorm)
                   for x, y in batches)
    torch.testing.assert_close(H, expected, rtol=1e-9, atol=1e-11)
    assert op.products == op.size and op.block_sizes == [op.size // 3] * 3


def test_single_batch_operator_reuses_its_graph_and_stays_exact():
    model, batches = model_and_batches(1)
    op = HessianOperator(model, batches, "cross_entropy", "0.*")
    first = dense(op)
    torch.testing.assert_close(dense(op), first)
    torch.testing.assert_close(first, exact_hessian(model, *batches[0], "cross_entropy", "0.*"))


def test_hutchinson_is_exact_on_diagonal_matrices():
    """For a diagonal H every Rademacher probe gives vᵀHv = tr H and ‖(H v_l)_k‖² = ‖H_kl‖²: no noise."""
    d = torch.linspace(-1, 3, 12, dtype=D)
    op = MatrixOperator(torch.diag(d), [4, 4, 4])
    est = hutchinson_trace(op, probes=5, tol=0)
    assert est.samples == pytest.approx([float(d.sum())] * 5)
    assert est.block_traces == pytest.approx([float(d[i:i + 4].sum()) for i in (0, 4, 8)])
    torch.testing.assert_close(hutchinson_block_masses(op, probes=2), block_squared_norms(torch.diag(d), [4] * 3))


def test_hutchinson_estimates_converge_to_the_exact_values():
    H = symmetric(24)
    op = MatrixOperator(H, [8, 8, 8])
    est = hutchinson_trace(op, probes=3000, tol=0, seed=1)
    spread = 4 * float(np.std(est.samples)) / np.sqrt(3000)
    assert est.trace == pytest.approx(float(H.trace()), abs=spread)
    masses = hutchinson_block_masses(op, probes=400, seed=2)
    exact = block_squared_norms(H, [8, 8, 8])
    torch.testing.assert_close(masses, exact, rtol=0.15, atol=0)
    assert mass_ratio(masses) == pytest.approx(mass_ratio(exact), rel=0.05)


def test_trace_stops_by_pyhessians_rule():
    op = MatrixOperator(symmetric(24), [24])
    assert len(hutchinson_trace(op, probes=500, tol=0.05).samples) < 500
    assert len(hutchinson_trace(op, probes=50, tol=0).samples) == 50


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_top_eigenvalues_by_magnitude(method):
    values = torch.tensor([-9.0, 7.0, 4.0, 1.0, 0.5, 0.2, 0.1, 0.05] + [0.01] * 12, dtype=D)
    H = symmetric(20, spectrum=values)
    found, vectors = top_eigenvalues(MatrixOperator(H), 3, iterations=300 if method == "power" else 20, tol=1e-10,
                                     method=method)
    assert found == pytest.approx([-9.0, 7.0, 4.0], rel=1e-6)
    for value, v in zip(found, vectors):  # the vector's error is about the square root of the value's
        torch.testing.assert_close(H @ v, value * v, rtol=0, atol=1e-3)


def test_power_iteration_on_a_model_matches_the_exact_spectrum():
    model, batches = model_and_batches(1)
    op = HessianOperator(model, batches, "cross_entropy", "*")
    exact = torch.linalg.eigvalsh(exact_hessian(model, *batches[0], "cross_entropy", "*"))
    (top,), _ = top_eigenvalues(op, 1, iterations=300, tol=1e-9)
    assert top == pytest.approx(float(exact[exact.abs().argmax()]), rel=1e-4)
    assert hutchinson_trace(op, probes=200, tol=0).trace == pytest.approx(float(exact.sum()), rel=0.2)


def test_lanczos_quadrature_is_exact_to_degree_2m_minus_1():
    """Gauss quadrature: with m Lanczos steps from v, Σ_i w_i λ_i^p = vᵀ H^p v / ‖v‖² for p ≤ 2m − 1."""
    H = symmetric(30)
    op = MatrixOperator(H)
    m = 4
    nodes, weights = eigenvalue_density(op, steps=m, seed=3)
    alpha, beta, basis = lanczos(op, m, seed=3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(m, dtype=D), rtol=0, atol=1e-12)
    v = basis[0]
    for p in range(2 * m):
        expected = float(v @ torch.linalg.matrix_power(H, p) @ v)
        assert float((weights[0] * nodes[0] ** p).sum()) == pytest.approx(expected, rel=1e-8, abs=1e-10)
    full, full_weights = eigenvalue_density(op, steps=30, runs=2)  # every step: the nodes are the spectrum
    np.testing.assert_allclose(np.sort(full[0]), torch.linalg.eigvalsh(H).numpy(), atol=1e-8)
    np.testing.assert_allclose(full_weights.sum(1), 1.0)


def test_density_curve_is_a_normalized_density():
    grid, density = density_curve(np.array([[0.0, 1.0]]), np.array([[0.25, 0.75]]), points=4000)
    area = density.sum() * (grid[1] - grid[0])
    assert area == pytest.approx(1.0)
    assert density[np.argmin(abs(grid - 1.0))] > 2.5 * density[np.argmin(abs(grid))]


def test_invariant_subspaces_and_bad_input():
    op = MatrixOperator(torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=D)))
    alpha, beta, basis = lanczos(op, 4, start=torch.ones(4, dtype=D))
    assert len(alpha) == 2  # the Krylov space of v is span{v, Hv}: invariant after two steps
    np.testing.assert_allclose(np.linalg.eigvalsh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)), [0, 2],
                               atol=1e-12)
    model, batches = model_and_batches(1)
    for p in model.branches[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(BranchspecError, match="do not require gradients"):
        HessianOperator(model, batches, "cross_entropy", "*", branches=[0])
    with pytest.raises(BranchspecError, match="at least one batch"):
        HessianOperator(model, [], "cross_entropy")
    with pytest.raises(BranchspecError, match="method must be"):
        top_eigenvalues(op, method="qr")
