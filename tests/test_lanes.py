"""Lane convolutions (the lanes execution): the compiled kernels equal the grouped-convolution reference, and the
lanes layout of the ResNet equals the loop on the same weights (outputs and gradients, to 1e-5 in float32)."""

import shutil

import pytest
import torch

from branchspec.errors import BranchspecError
from branchspec.nets.lanes import kernels_available, lane_conv2d, reference_lane_conv2d
from branchspec.nets.resnet import (_branch_states, as_execution, branched_resnet, choose_execution, fuse,
                                    grouped_state, unfuse)

needs_kernels = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                   reason="no C++ compiler on this machine: the lane kernels cannot be built")


@needs_kernels
def test_the_kernels_build_here():
    assert kernels_available()


@needs_kernels
@pytest.mark.parametrize("shape", [
    # batch, c_in, c_out, height, width, kernel, stride, padding, branches
    (3, 5, 5, 8, 8, 3, 1, 1, 16),
    (2, 5, 11, 9, 7, 3, 2, 1, 8),  # odd sizes, stride 2, 256-bit lanes
    (5, 11, 11, 4, 4, 3, 1, 1, 32),  # two vectors of lanes; a batch that is not a multiple of the 4-image tile
    (3, 4, 6, 8, 8, 1, 2, 0, 16),  # the 1×1 strided shortcut
    (2, 3, 7, 5, 6, 3, 1, 1, 24),
    (2, 21, 43, 8, 8, 3, 2, 1, 16),
])
def test_lane_convolution_equals_the_grouped_reference(shape):
    b, ci, co, h, w, k, s, p, m = shape
    torch.manual_seed(0)
    x = torch.randn(b, ci * m, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(k, k, ci, co, m, requires_grad=True)
    y = lane_conv2d(x, weight, s, p)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y2 = reference_lane_conv2d(x2, w2, s, p)
    gx2, gw2 = torch.autograd.grad(y2, (x2, w2), grad)
    for a, ref in ((y, y2), (gx, gx2), (gw, gw2)):
        torch.testing.assert_close(a, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_reference_is_a_per_branch_convolution():
    """Branch m of the branch-minor layout (channels c·M + m) is an ordinary convolution with branch m's weights."""
    torch.manual_seed(1)
    m, ci, co = 8, 2, 3
    x = torch.randn(2, ci * m, 6, 6, dtype=torch.float64)
    weight = torch.randn(3, 3, ci, co, m, dtype=torch.float64)
    y = reference_lane_conv2d(x, weight, 1, 1)
    for k in range(m):
        expect = torch.nn.functional.conv2d(x[:, k::m], weight[..., k].permute(3, 2, 0, 1), padding=1)
        torch.testing.assert_close(y[:, k::m], expect)


@pytest.mark.parametrize("training", [True, False])
def test_lanes_resnet_equals_the_loop(training):
    torch.manual_seed(0)
    loop = branched_resnet(8, (2, 3, 4, 5), num_classes=4, seed=1).train(training)
    lanes = fuse(loop, "lanes")
    x, target = torch.randn(5, 3, 12, 12), torch.randn(5, 4)
    torch.testing.assert_close(lanes.branch_outputs(x), loop.branch_outputs(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(unfuse(lanes).state_dict(), loop.state_dict(), atol=1e-5, rtol=0)  # BN statistics
    (loop(x) * target).sum().backward()
    (lanes(x) * target).sum().backward()
    grads = grouped_state({n: p.grad for n, p in lanes.named_parameters()}, 8)
    scale = max(float(p.grad.abs().max()) for p in loop.parameters())
    for k, branch_grads in enumerate(_branch_states(grads, 8)):
        for n, p in loop.branches[k].named_parameters():
            torch.testing.assert_close(branch_grads[n], p.grad, atol=1e-5 * scale, rtol=0, msg=f"branch {k} {n}")


def test_lanes_round_trip_is_exact():
    loop = branched_resnet(8, (2, 2, 3, 3), seed=0)
    again = unfuse(fuse(loop, "lanes"))
    for (n, a), (_, b) in zip(loop.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_auto_execution_and_its_errors():
    assert choose_execution("auto", 16, "cuda")[0] == "fused"
    assert choose_execution("auto", 12, "cpu") == ("fused", "the lanes execution needs M a multiple of 8, this "
                                                            "model has M = 12")
    if kernels_available():
        assert choose_execution("auto", 16, "cpu")[0] == "lanes"
    assert choose_execution("loop", 3, "cpu") == ("loop", "as asked")
    with pytest.raises(BranchspecError, match="multiple of 8"):
        choose_execution("lanes", 12, "cpu")
    with pytest.raises(BranchspecError, match="execution must be one of"):
        choose_execution("fast", 8, "cpu")
    assert as_execution(branched_resnet(8, (2, 2, 2, 2)), "lanes").layout == "lanes"
