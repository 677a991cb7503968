"""The slim ResNet18 branch: parameter counts (anchors §1.2-1.3), fused = loop on the same weights."""

import pytest
import torch

from branchspec.errors import BranchspecError
from branchspec.nets.resnet import (PAPER_WIDTHS, RESNET18_WIDTHS, FusedResNet18, SlimResNet18, _branch_states,
                                    branched_resnet, fuse, unfuse)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    assert count(SlimResNet18(PAPER_WIDTHS)) == 79_262
    assert count(SlimResNet18(RESNET18_WIDTHS)) == 11_173_962  # M = 1 at full width is the plain ResNet18
    for c in (1, 3, 5, 6, 8):
        assert count(SlimResNet18((c, 2 * c, 4 * c, 8 * c))) == 2724 * c * c + 257 * c + 10
    assert count(branched_resnet(16)) == 16 * 79_262
    assert count(fuse(branched_resnet(3, (2, 3, 4, 5)))) == 3 * count(SlimResNet18((2, 3, 4, 5)))


def test_module_names_follow_the_cifar_resnet18():
    names = {n for n, _ in SlimResNet18().named_modules()}
    assert {"conv1", "bn1", "layer1.0", "layer2.0.shortcut", "layer4.1.conv2", "linear"} <= names


def test_widths_are_checked():
    with pytest.raises(BranchspecError, match="four positive"):
        SlimResNet18((5, 11, 21))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_loop_outputs_and_gradients(training, dtype):
    """To 1e-5 in float64; in float32 the gradients (up to ~50 here) agree to 1e-5 of their largest entry."""
    torch.manual_seed(0)
    loop = branched_resnet(3, (2, 3, 4, 5), num_classes=4, seed=1).to(dtype).train(training)
    with torch.no_grad():  # non-trivial running statistics for eval mode
        for b in loop.branches:
            for m in b.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    fused = fuse(loop)
    x = torch.randn(5, 3, 12, 12, dtype=dtype)
    target = torch.randn(5, 4, dtype=dtype)
    out_loop, out_fused = loop.branch_outputs(x), fused.branch_outputs(x)
    assert out_fused.shape == (3, 5, 4)
    torch.testing.assert_close(out_fused, out_loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(unfuse(fused).state_dict(), loop.state_dict(), atol=1e-5, rtol=0)  # BN statistics
    torch.testing.assert_close(fused(x, subset=[0, 2]), loop(x, subset=[0, 2]), atol=1e-5, rtol=0)
    (loop(x) * target).sum().backward()
    (fused(x) * target).sum().backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    scale = 1.0 if dtype == torch.float64 else max(float(p.grad.abs().max()) for p in loop.parameters())
    for k, branch_grads in enumerate(_branch_states(grads, 3)):  # fused gradients in the loop layout
        for n, p in loop.branches[k].named_parameters():
            torch.testing.assert_close(branch_grads[n], p.grad, atol=1e-5 * scale, rtol=0, msg=f"branch {k} {n}")


def test_conversion_round_trip_is_exact():
    loop = branched_resnet(4, (2, 2, 3, 3), seed=0)
    again = unfuse(fuse(loop))
    for (n, a), (_, b) in zip(loop.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    fused = fuse(loop)
    assert isinstance(fused, FusedResNet18) and fused.num_branches == 4
    with pytest.raises(BranchspecError, match="outside"):
        fused(torch.randn(1, 3, 8, 8), subset=[4])
