"""The Branched core: executions agree, subsets, parameter groups, residuals (Eq. 1, Eq. 15)."""

import pytest
import torch
from torch import nn

from branchspec import Branched, BranchspecError


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_total_is_sum_of_branch_outputs():
    model = Branched(mlp, 4, seed=0)
    x = torch.randn(6, 5)
    out = model.decompose(x)
    assert out.branch_outputs.shape == (4, 6, 3)
    torch.testing.assert_close(out.total, out.branch_outputs.sum(0))
    torch.testing.assert_close(out.total, sum(b(x) for b in model.branches))


def test_branches_have_different_initializations_and_seed_is_reproducible():
    a = Branched(mlp, 3, seed=1)
    b = Branched(mlp, 3, seed=1)
    w = [br[0].weight for br in a.branches]
    assert not torch.equal(w[0], w[1])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("factory", [mlp, cnn])
def test_vmap_equals_loop_outputs_and_gradients(factory):
    torch.manual_seed(0)
    model = Branched(factory, 3, seed=0)
    x = torch.randn(4, 5) if factory is mlp else torch.randn(4, 3, 6, 6)
    model.eval()
    outs, grads = {}, {}
    for execution in ("loop", "vmap"):
        model.execution = execution
        model.zero_grad()
        y = model(x)
        (y ** 2).sum().backward()
        outs[execution] = y.detach()
        grads[execution] = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(outs["loop"], outs["vmap"], rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_vmap_updates_each_branch_running_stats_like_the_loop():
    x = torch.randn(8, 3, 5, 5)
    loop = Branched(cnn, 3, seed=0).train()
    vm = Branched(cnn, 3, seed=0, execution="vmap").train()
    torch.testing.assert_close(loop(x), vm(x), rtol=1e-5, atol=1e-6)
    for b1, b2 in zip(loop.branches, vm.branches):
        torch.testing.assert_close(b1[1].running_mean, b2[1].running_mean)
        torch.testing.assert_close(b1[1].running_var, b2[1].running_var)
    means = [b[1].running_mean for b in vm.branches]
    assert not torch.allclose(means[0], means[1])  # each branch keeps its own statistics


def test_subset_ablation():
    model = Branched(mlp, 5, seed=0)
    x = torch.randn(3, 5)
    full = model.branch_outputs(x)
    out = model.decompose(x, subset=[4, 1])
    torch.testing.assert_close(out.branch_outputs, full[[4, 1]])
    torch.testing.assert_close(out.total, full[4] + full[1])
    assert out.subset == (4, 1)
    for bad in ([5], [1, 1], [], "ab"):
        with pytest.raises(BranchspecError):
            model(x, subset=bad)


def test_parameter_groups_are_disjoint_and_cover_the_branches():
    model = Branched(mlp, 4, residual=nn.Linear(5, 3), seed=0)
    groups = model.parameter_groups
    ids = [{id(p) for p in g} for g in groups]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not ids[i] & ids[j]
    branch_ids = set().union(*ids)
    residual_ids = {id(p) for p in model.residual_parameters()}
    assert branch_ids | residual_ids == {id(p) for p in model.parameters()}
    assert not branch_ids & residual_ids
    p = groups[2][0]
    assert model.branch_of(p) == 2 and model.branch_of(model.residual_parameters()[0]) is None
    assert set(model.named_branch_parameters(1)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_fixed_and_learnt_residual():
    x = torch.randn(3, 5)
    fixed = Branched(lambda: nn.Linear(5, 5), 2, residual=lambda x: 2 * x, seed=0)
    out = fixed.decompose(x)
    torch.testing.assert_close(out.total, 2 * x + out.branch_outputs.sum(0))
    learnt = Branched(lambda: nn.Linear(5, 5), 2, residual=nn.Linear(5, 5), seed=0)
    assert len(learnt.residual_parameters()) == 2


def test_residual_can_feed_each_branch_its_own_input():
    M = 3

    def split(x):  # R = x / 2 and φ_k = x · k, one input per branch
        return x / 2, torch.stack([x * k for k in range(M)])

    for execution in ("loop", "vmap"):
        model = Branched(lambda: nn.Linear(4, 4), M, residual=split, seed=0, execution=execution)
        x = torch.randn(2, 4)
        out = model.decompose(x)
        expected = torch.stack([model.branches[k](x * k) for k in range(M)])
        torch.testing.assert_close(out.branch_outputs, expected)
        torch.testing.assert_close(out.total, x / 2 + expected.sum(0))


def test_bad_construction_is_explained():
    with pytest.raises(BranchspecError, match="factory"):
        Branched(nn.Linear(2, 2), 3)
    with pytest.raises(BranchspecError, match="architecture"):
        Branched([nn.Linear(2, 2), nn.Linear(2, 3)])
    with pytest.raises(BranchspecError, match="positive"):
        Branched(mlp, 0)
    shared = nn.Linear(2, 2)
    with pytest.raises(BranchspecError, match="share"):
        Branched([shared, shared])
    with pytest.raises(BranchspecError, match="execution"):
        Branched(mlp, 2, execution="fast")
