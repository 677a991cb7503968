"""Eq. (10): distributive × collaborative equals autograd's gradient, for the L2 and cross-entropy losses."""

import pytest
import torch
from torch import nn

from branchspec import Branched
from branchspec.analysis.gradients import gradient_factorization
from branchspec.losses import get_loss
from branchspec.nets.perceptron import Perceptron


def classifier():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def conv_classifier():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def autograd_gradients(model, x, y, loss):
    model.zero_grad()
    get_loss(loss)(model(x), y).sum().backward()
    return [{n: p.grad.clone() for n, p in b.named_parameters()} for b in model.branches]


@pytest.mark.parametrize("loss", ["l2", "cross_entropy"])
@pytest.mark.parametrize("factory", [classifier, conv_classifier])
def test_product_of_parts_equals_autograd(loss, factory):
    torch.manual_seed(0)
    model = Branched(factory, 3, seed=0).double()
    x = torch.randn(5, 6, dtype=torch.float64) if factory is classifier else torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64) if loss == "l2" else torch.randint(0, 4, (5,))
    fact = gradient_factorization(model, x, y, loss)
    assert fact.collaborative.shape == (5, 4)
    expected = autograd_gradients(model, x, y, loss)
    for k in range(3):
        got = fact.gradient(k)
        assert set(got) == set(expected[k])
        for name in got:
            torch.testing.assert_close(got[name], expected[k][name], rtol=1e-9, atol=1e-10)


def test_collaborative_part_is_the_residual_for_l2():
    model = Branched(lambda: Perceptron(slope=0.1), 2, seed=0).double()
    x = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.5], [1.0]], dtype=torch.float64)
    fact = gradient_factorization(model, x, y, "l2")
    torch.testing.assert_close(fact.collaborative, model(x) - y)  # Eq. (5): f(x_j) − y_j
    # Eq. (5): the distributive part of w_k is σ'(w_k x + b_k)·x
    for k, branch in enumerate(model.branches):
        z = branch.w * x + branch.b
        slope_grad = torch.where(z > 0, 1.0, 0.1)
        torch.testing.assert_close(fact.distributive[k]["w"], (slope_grad * x).detach().reshape(3, 1))


def test_soft_targets_cross_entropy():
    torch.manual_seed(1)
    model = Branched(classifier, 2, seed=0).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1)
    fact = gradient_factorization(model, x, p, "cross_entropy")
    torch.testing.assert_close(fact.collaborative, torch.softmax(model(x), 1) - p)  # Eq. (3)
    expected = autograd_gradients(model, x, p, "cross_entropy")
    for k in range(2):
        for name, g in fact.gradient(k).items():
            torch.testing.assert_close(g, expected[k][name])
