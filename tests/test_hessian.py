"""The exact Hessian of a parameter selection (Eqs. 12-14), its block scores, and Sec. 8's equilibrium statistics."""

import math

import pytest
import torch
from torch import nn

from branchspec import Branched, BranchspecError
from branchspec.analysis.batchnorm import batchnorm_mode
from branchspec.analysis.gradients import (distributive_part, equilibrium_statistics,
                                           per_sample_distributive_part)
from branchspec.analysis.hessian import (block_mass_ratio, block_squared_norms, exact_hessian,
                                         permuted_block_mass_ratios)
from branchspec.analysis.selection import select_parameters
from branchspec.losses import get_loss
from branchspec.nets.perceptron import Perceptron
from branchspec.nets.resnet import branched_resnet

D = torch.float64


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def conv_bn():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def conv_bn_model(m=3):
    model = Branched(conv_bn, m, seed=0).to(D)
    with torch.no_grad():  # running statistics that differ from the batch's, so that the two modes differ
        for b in model.branches:
            b[1].running_mean.uniform_(-0.5, 0.5)
            b[1].running_var.uniform_(0.5, 2.0)
    return model


def data(shape, n=5, loss="cross_entropy", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=D)
    y = torch.randn(n, 3, generator=g, dtype=D) if loss == "l2" else torch.randint(0, 3, (n,), generator=g)
    return x, y


def relative(a, b):
    return float((a - b).norm() / b.norm())  # a relative Frobenius distance


# -------------------------------------------------------------------------------- structured == direct
@pytest.mark.parametrize("loss", ["l2", "cross_entropy", "clamped_ce"])
@pytest.mark.parametrize("params, branches", [("first-layer", None), ("*", None), ("2.*,0.weight", [0, 2])])
def test_structured_equals_direct_mlp(loss, params, branches):
    model = Branched(mlp, 3, seed=0).to(D)
    x, y = data((3,), loss=loss)
    H = exact_hessian(model, x, y, loss, params, branches=branches, chunk_size=5)
    direct = exact_hessian(model, x, y, loss, params, branches=branches, method="direct")
    assert H.shape == (select_parameters(model, params, branches).size,) * 2
    assert relative(H, direct) < 1e-10


@pytest.mark.parametrize("batchnorm", ["train", "eval"])
@pytest.mark.parametrize("params", ["first-layer", "0.weight,1.*"])
def test_structured_equals_direct_with_batchnorm(batchnorm, params):
    model = conv_bn_model()
    x, y = data((2, 6, 6))
    H = exact_hessian(model, x, y, "cross_entropy", params, batchnorm=batchnorm, chunk_size=7)
    direct = exact_hessian(model, x, y, "cross_entropy", params, batchnorm=batchnorm, method="direct")
    assert relative(H, direct) < 1e-10
    assert relative(H, H.T) < 1e-12


def test_structured_equals_direct_for_the_slim_resnet_in_float32():
    model = branched_resnet(2, widths=(2, 2, 2, 2), seed=0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 9])
    H = exact_hessian(model, x, y, "clamped_ce", batchnorm="eval", chunk_size=18)
    direct = exact_hessian(model, x, y, "clamped_ce", batchnorm="eval", method="direct")
    assert H.shape == (2 * 27 * 2, 2 * 27 * 2)
    assert relative(H, direct) < 1e-5  # the bar, in float32 (float64: 1e-15, docs/hessian.md)


def test_a_memory_bound_splits_the_passes_and_changes_nothing():
    """Under memory_gb the structured Hessian runs a few branches and columns at a time: the same matrix."""
    torch.manual_seed(0)
    model = branched_resnet(4, (2, 2, 2, 2), seed=0).double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    sel = select_parameters(model)
    whole = exact_hessian(model, x, y, "clamped_ce", sel)
    from branchspec.analysis.hessian import pass_shape
    tiny = 1e-9 * 5 * 3 * 6 * _one_sample_bytes(model)  # room for three (branch, column) units of this batch
    assert pass_shape(model, (x,), sel, 16, tiny) == (1, 3)
    split = exact_hessian(model, x, y, "clamped_ce", sel, memory_gb=tiny)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)
    with pytest.raises(BranchspecError, match="more than the"):
        exact_hessian(model, x, y, "clamped_ce", sel, memory_gb=tiny / 10)


def _one_sample_bytes(model):
    from branchspec.analysis.hessian import _activation_bytes

    return _activation_bytes(model, (torch.randn(1, 3, 8, 8, dtype=torch.float64),), 0)


def test_residual_with_per_branch_inputs():
    """App. E: R hands branch k its own input φ_k; the structured Hessian stacks the inputs for vmap."""
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([0.5, 1.0, -1.5], dtype=D))

        def forward(self, x):
            return 0.1 * x, self.scale[:, None, None] * x[None]

    model = Branched(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), 3, residual=Split(),
                     seed=0).to(D)
    x, y = data((3,), loss="l2")
    H = exact_hessian(model, x, y, "l2", "*", chunk_size=4)
    assert relative(H, exact_hessian(model, x, y, "l2", "*", method="direct")) < 1e-10


# ------------------------------------------------------------------------------------------- Eq. (14)
def test_cross_branch_blocks_are_eq14():
    """H_kl = (1/B) Σ_i J_k(x_i)ᵀ (∂²ℓ/∂f²)(x_i) J_l(x_i) for k ≠ l, with J from the gradient factorization."""
    model = Branched(mlp, 3, seed=1).to(D)
    x, y = data((3,), n=4)
    sel = select_parameters(model, "*")
    H = exact_hessian(model, x, y, "cross_entropy", sel, method="direct")  # independent of the structured code
    J = [torch.cat([t.reshape(4, 3, -1) for t in distributive_part(model, k, x).values()], 2) for k in range(3)]
    with torch.no_grad():
        f = model(x)
    loss = get_loss("cross_entropy")
    Hf = torch.stack([torch.autograd.functional.hessian(lambda fi: loss(fi[None], y[i:i + 1])[0], f[i])
                      for i in range(4)])  # the derivative of the collaborative part, per sample
    n = sel.per_branch
    for k in range(3):
        for l in range(3):
            if k != l:
                expected = torch.einsum("bcp,bcd,bdq->pq", J[k], Hf, J[l]) / 4
                torch.testing.assert_close(H[k * n:(k + 1) * n, l * n:(l + 1) * n], expected, rtol=1e-10, atol=1e-12)


def test_zero_distributive_part_gives_a_block_diagonal_hessian():
    """Sec. 5.2: where a branch's distributive part vanishes on every sample, its cross blocks are zero."""
    model = Branched(lambda: Perceptron(slope=0.0), 3, seed=0).to(D)
    with torch.no_grad():  # branch 1 is silent on every x (w·x + b < 0): σ' = 0; branches 0 and 2 are active
        for branch, (w, b) in zip(model.branches, [(1.0, 1.5), (0.1, -5.0), (-1.0, 2.5)]):
            branch.w.fill_(w)
            branch.b.fill_(b)
    x = torch.tensor([[-1.0], [0.5], [1.0], [2.0]], dtype=D)
    y = torch.tensor([[1.0], [0.2], [0.5], [0.7]], dtype=D)
    H = exact_hessian(model, x, y, "l2", "*")
    assert H[2:4].abs().max() == 0 and H[:, 2:4].abs().max() == 0
    assert H[:2, 4:].abs().max() > 0  # the two live branches still couple


# --------------------------------------------------------------------------------------- BatchNorm
def test_batch_statistics_hessian_matches_finite_differences():
    """torch.func's nested derivatives of the fused BatchNorm are wrong in training mode (pytorch#196699); the
    "train" mode computes the normalization from elementary operations, so the Hessian is symmetric and exact."""
    model = Branched(lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(2 * 3 * 3, 3)), 1, seed=0).to(D)
    x, y = data((1, 4, 4))
    sel = select_parameters(model, "0.weight,1.*")  # the mixed blocks of conv weights and BatchNorm's affine
    H = exact_hessian(model, x, y, "cross_entropy", sel, batchnorm="train", method="direct")
    params = sel.parameters(model)
    loss = get_loss("cross_entropy")

    def gradient():
        with batchnorm_mode(model, "train"):
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model(x), y).mean(), params)])

    eps, columns = 1e-6, []
    flat = sel.values(model)
    for j in range(sel.size):
        grads = []
        for sign in (1, -1):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(flat + sign * eps * torch.eye(sel.size, dtype=D)[j], params)
            grads.append(gradient())
        columns.append((grads[0] - grads[1]) / (2 * eps))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, params)
    assert relative(H, torch.stack(columns, 1)) < 1e-7


def test_batchnorm_mode_leaves_no_trace():
    model = conv_bn_model(2).train()
    model.branches[0][3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    x, y = data((2, 6, 6))
    for mode in ("train", "eval"):
        exact_hessian(model, x, y, "cross_entropy", batchnorm=mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {name: m.training for name, m in model.named_modules()}
    assert all("forward" not in vars(m) for m in model.modules())
    with batchnorm_mode(model, "train"):  # batch statistics: normalized output has zero mean per channel
        z = model.branches[0][1](model.branches[0][0](x))
        torch.testing.assert_close(z.mean((0, 2, 3)), model.branches[0][1].bias.detach(), rtol=0, atol=1e-12)
    with pytest.raises(BranchspecError, match="batchnorm must be one of"):
        exact_hessian(model, x, y, "cross_entropy", batchnorm="running")


# ----------------------------------------------------------------------------------------- block scores
def test_block_mass_of_constructed_matrices():
    sizes = [2, 3, 1]
    block_diagonal = torch.block_diag(torch.randn(2, 2), torch.randn(3, 3), torch.randn(1, 1))
    assert block_mass_ratio(block_diagonal, sizes) == pytest.approx(1.0)
    ones = torch.ones(6, 6)
    assert block_mass_ratio(ones, sizes) == pytest.approx((4 + 9 + 1) / 36)
    H = torch.arange(36.0).reshape(6, 6)
    norms = block_squared_norms(H, sizes)
    assert norms[0, 1] == pytest.approx(float(H[:2, 2:5].pow(2).sum()))
    assert norms.sum() == pytest.approx(float(H.pow(2).sum()))


def test_permutation_baseline_matches_its_expectation():
    """A random permutation keeps the diagonal entries on the diagonal and puts an off-diagonal pair in the
    same block with probability Σ n_k(n_k − 1) / (P(P − 1))."""
    sizes = [4] * 5
    g = torch.Generator().manual_seed(0)
    H = torch.randn(20, 20, generator=g, dtype=D)
    H = H + H.T + torch.diag(torch.rand(20, generator=g, dtype=D) * 10)
    ratios = permuted_block_mass_ratios(H, sizes, permutations=1000, seed=1)
    sq = H.pow(2)
    diag = float(torch.diagonal(sq).sum())
    same = sum(n * (n - 1) for n in sizes) / (20 * 19)
    expected = (diag + (float(sq.sum()) - diag) * same) / float(sq.sum())
    assert float(ratios.mean()) == pytest.approx(expected, abs=3 * float(ratios.std()) / math.sqrt(1000))
    torch.testing.assert_close(ratios[:5], permuted_block_mass_ratios(H, sizes, permutations=5, seed=1))
    with pytest.raises(BranchspecError, match="a square matrix is needed"):
        block_mass_ratio(H[:10], sizes)
    with pytest.raises(BranchspecError, match="side 20"):
        block_mass_ratio(H, [4, 4])


# ------------------------------------------------------------------------------------------- selection
def test_first_layer_selection():
    paper = branched_resnet(16, widths=(5, 10, 20, 40))
    sel = select_parameters(paper)
    assert sel.names == ("conv1.weight",) and sel.size == 2160  # 16 × 27·5, the 2,160 × 2,160
    toy = Branched(Perceptron, 4)
    assert select_parameters(toy).names == ("w", "b") and select_parameters(toy).block_sizes == [2] * 4
    assert select_parameters(Branched(mlp, 2)).names == ("0.weight", "0.bias")
    flat = torch.arange(float(sel.size))
    parts = sel.split(flat)
    assert len(parts) == 16 and parts[1]["conv1.weight"].shape == (5, 3, 3, 3)
    assert float(parts[1]["conv1.weight"].reshape(-1)[0]) == 135


def test_bad_selections_and_options():
    model = Branched(mlp, 2, seed=0).to(D)
    x, y = data((3,))
    with pytest.raises(BranchspecError, match="matches no parameter.*0.weight"):
        exact_hessian(model, x, y, "cross_entropy", "conv*")
    with pytest.raises(BranchspecError, match="method must be one of"):
        exact_hessian(model, x, y, "cross_entropy", method="fast")
    with pytest.raises(BranchspecError, match="chunk_size"):
        exact_hessian(model, x, y, "cross_entropy", chunk_size=0)
    with pytest.raises(BranchspecError, match="Branched model"):
        select_parameters(mlp())
    with pytest.raises(BranchspecError, match="outside the branch indices"):
        exact_hessian(model, x, y, "cross_entropy", branches=[5])


# ------------------------------------------------------------------------------- equilibrium (Sec. 8)
def test_per_sample_distributive_part_equals_the_batch_jacobian_without_coupling():
    model = conv_bn_model().eval()
    x, _ = data((2, 6, 6))
    a, b = per_sample_distributive_part(model, 1, x), distributive_part(model, 1, x)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_equilibrium_statistics_on_a_constructed_toy():
    """Branch 0 is silent everywhere (zero distributive part), branch 1 active everywhere; the fit is exact on
    two of the four samples (zero collaborative part there)."""
    model = Branched(lambda: Perceptron(slope=0.0), 2, seed=0).to(D)
    with torch.no_grad():
        model.branches[0].w.fill_(1.0)
        model.branches[0].b.fill_(-10.0)
        model.branches[1].w.fill_(1.0)
        model.branches[1].b.fill_(3.0)
    x = torch.tensor([[-1.0], [0.0], [1.0], [2.0]], dtype=D)
    y = torch.tensor([[2.0], [3.0], [0.0], [0.0]], dtype=D)  # f = x + 3: exact on the first two
    stats = equilibrium_statistics(model, x, y, "l2", tolerances=(1e-2,), sample_chunk=3)
    # branch 0: all 8 (parameter, sample) pairs zero; branch 1: ∂v/∂w = x is zero on x = 0 only (1 of 8)
    torch.testing.assert_close(stats.distributive_near_zero, torch.tensor([[1.0, 1 / 8]], dtype=D))
    torch.testing.assert_close(stats.collaborative_near_zero, torch.tensor([0.5], dtype=D))
    assert stats.samples == 4 and stats.branches == (0, 1)
