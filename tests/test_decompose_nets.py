"""The branched generator, its fused execution, the discriminator and R (Sec. 7, App. E; anchors §2.2-2.3)."""

import numpy as np
import pytest
import torch
from skimage.filters import gaussian

from branchspec import Branched, BranchspecError
from branchspec.nets.diffusion import DiffusionNet, GaussianSmoothing, LearntDiffusion, make_residual
from branchspec.nets.stargan import (Discriminator, FusedGenerator, Generator, GeneratorConfig, GroupedLinear,
                                     MappingNetwork, StarGANBranch, branched_generator)


def count(module):
    return sum(p.numel() for p in module.parameters())


# anchors.md §2.3 and its Appendix A formulas (computed independently of this code)
@pytest.mark.parametrize("img, width, dim_in, max_dim, expected", [
    (256, 1.0, None, None, 33_892_995),   # StarGAN-v2's generator, AFHQ, w_hpf = 0
    (256, 0.25, None, None, 2_229_411),   # the default branch: 1/4 of the widths (dim_in 16, max 128)
    (256, 1.0, 21, 171, 3_921_504),       # the α = 1/3 branch of the table
])
def test_generator_parameter_counts_match_stargan_v2(img, width, dim_in, max_dim, expected):
    cfg = GeneratorConfig(img_size=img, num_domains=3, width=width, dim_in=dim_in, max_conv_dim=max_dim)
    assert count(Generator(cfg)) == expected


def test_mapping_and_discriminator_parameter_counts_match_stargan_v2():
    cfg = GeneratorConfig(img_size=256, num_domains=3, width=1.0)
    # StarGAN-v2's mapping network (3,259,072) plus our learnt per-domain codes (3 × 16) in place of the noise
    assert count(MappingNetwork(cfg)) == 3_259_072 + 3 * 16
    assert count(Discriminator(256, num_domains=3)) == 20_852_803
    assert count(Discriminator(256, num_domains=2)) == 20_852_290


def test_default_branched_generator_has_nine_quarter_width_branches():
    cfg = GeneratorConfig(img_size=256, num_domains=3)
    assert cfg.widths == (16, 128, 128)
    with torch.device("meta"):
        model = branched_generator(cfg, residual=None)
    assert model.num_branches == 9
    assert all(count(b.generator) == 2_229_411 for b in model.branches)


def test_grouped_linear_is_independent_linears():
    torch.manual_seed(0)
    lin = GroupedLinear(5, 3, groups=4)
    x = torch.randn(7, 4 * 5)
    w, b = lin.weight.view(4, 3, 5), lin.bias.view(4, 3)
    expected = torch.cat([x[:, 5 * g:5 * (g + 1)] @ w[g].T + b[g] for g in range(4)], dim=1)
    torch.testing.assert_close(lin(x), expected)


def small_cfg(**kw):
    return GeneratorConfig(img_size=32, num_domains=3, dim_in=4, max_conv_dim=8, hidden_dim=8, style_dim=6,
                           latent_dim=4, **kw)


@pytest.mark.parametrize("residual", ["none", "gaussian", "diffusion"])
def test_fused_execution_agrees_with_the_loop(residual):
    """Outputs, R and gradients of the grouped network equal the loop's, from the same weights (float64)."""
    torch.manual_seed(0)
    R = make_residual(residual, num_branches=3, img_size=32)
    loop = branched_generator(small_cfg(), 3, residual=R, seed=1).double()
    if isinstance(R, LearntDiffusion):  # make p nonzero so that φ_k differ between branches
        torch.nn.init.normal_(R.p.layers[-1].weight, std=0.05)
    fused = FusedGenerator.from_branched(loop)
    x, d = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([2, 0])
    a, b = loop.decompose(x, d), fused.decompose(x, d)
    torch.testing.assert_close(a.branch_outputs, b.branch_outputs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.total, b.total, rtol=1e-10, atol=1e-10)
    assert (a.residual is None) == (residual == "none")
    (a.total ** 2).sum().backward()
    (b.total ** 2).sum().backward()
    k = 1
    for name, p in loop.branches[k].named_parameters():
        fused_grad = fused.net.get_parameter(name).grad
        dim = 1 if name == "mapping.codes" else 0
        torch.testing.assert_close(p.grad, fused_grad.chunk(3, dim=dim)[k], rtol=1e-8, atol=1e-10)


def test_fused_round_trip_subset_and_vmap():
    loop = branched_generator(small_cfg(), 4, seed=0)
    rng = torch.get_rng_state()
    fused = FusedGenerator.from_branched(loop)
    back = fused.to_branched(execution="vmap")
    assert torch.equal(torch.get_rng_state(), rng)  # conversions copy weights and draw nothing
    x, d = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    ref = loop.decompose(x, d, subset=[3, 1])
    for model in (fused, back):
        out = model.decompose(x, d, subset=[3, 1])
        torch.testing.assert_close(out.branch_outputs, ref.branch_outputs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.total, ref.total, rtol=1e-4, atol=1e-5)
    with pytest.raises(BranchspecError):
        fused(x, d, subset=[4])


def test_branches_differ_and_the_domain_changes_the_output():
    model = branched_generator(small_cfg(), 3, seed=0)
    x = torch.randn(2, 3, 32, 32)
    v = model.branch_outputs(x, torch.tensor([0, 0]))
    assert not torch.allclose(v[0], v[1])
    assert not torch.allclose(model(x, torch.tensor([0, 0])), model(x, torch.tensor([1, 1])))
    assert model(x, torch.tensor([0, 0])).shape == x.shape


def test_discriminator_gives_one_logit_per_domain():
    D = Discriminator(32, num_domains=3, width=1 / 32)
    x = torch.randn(4, 3, 32, 32)
    logits = D(x)
    assert logits.shape == (4, 3)
    y = torch.tensor([2, 0, 1, 2])
    torch.testing.assert_close(D(x, y), logits[torch.arange(4), y])
    assert D.features(x).shape == (4, D.feature_dim)


@pytest.mark.parametrize("kw", [dict(img_size=48), dict(num_domains=1), dict(width=0.0), dict(dim_in=0)])
def test_bad_generator_config(kw):
    with pytest.raises(BranchspecError):
        StarGANBranch(GeneratorConfig(**{"img_size": 32, **kw}))


# ------------------------------------------------------------------------------------------------------ R
def test_gaussian_smoothing_matches_scikit_image():
    x = torch.randn(2, 3, 20, 24, dtype=torch.float64)
    got = GaussianSmoothing(1.7).double()(x)
    for i in range(2):
        ref = gaussian(x[i].permute(1, 2, 0).numpy(), sigma=1.7, mode="nearest", truncate=4.0, channel_axis=-1,
                       preserve_range=True)
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_diffusion_network_size_and_start():
    p = DiffusionNet()
    assert count(p) == 40_211  # App. E: "4.05·10⁴ parameters"
    assert len(p.layers) == 8
    u = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(p.double()(u), torch.zeros_like(u))  # the paper's form starts at p = 0: R = x, φ = 0
    p = DiffusionNet(heat=1.0).double()
    lap = -4 * u[..., 5, 5] + u[..., 4, 5] + u[..., 6, 5] + u[..., 5, 4] + u[..., 5, 6]
    torch.testing.assert_close(p(u)[..., 5, 5], -lap)  # with the heat term: p(u) = −Δu, the heat equation


@pytest.mark.parametrize("heat", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_learnt_diffusion_reconstruction_identity(seed, heat):
    """x = Σ_k φ_k + R with R = T·p(u(T)) + u(T) (Eq. 17), for any weights of p, with and without the heat
    term, to floating-point error."""
    torch.manual_seed(seed)
    diffusion = LearntDiffusion(num_branches=9, dt=0.15, heat=heat).double()
    for q in diffusion.p.parameters():
        torch.nn.init.normal_(q, std=0.05)  # a nonlinear p that keeps u bounded over the 10 steps
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    R, phi = diffusion(x)
    assert phi.shape == (9, 2, 3, 16, 16)
    torch.testing.assert_close(phi.sum(0) + R, x, rtol=0, atol=1e-12)
    u, p = diffusion.trajectory(x)
    torch.testing.assert_close(u[1], x - 0.15 * p[0])  # u_{t+1} = u_t − dt·p(u_t)
    torch.testing.assert_close(R, 9 * 0.15 * p[-1] + u[-1])


def test_diffusion_feeds_branch_k_with_phi_k():
    diffusion = LearntDiffusion(num_branches=3)
    model = Branched(lambda: torch.nn.Conv2d(3, 3, 1), 3, residual=lambda x, d: diffusion(x), seed=0)
    x = torch.randn(1, 3, 16, 16)
    phi = diffusion(x)[1]
    torch.testing.assert_close(model.inputs_of_branch(2, x, None)[0], phi[2])


def test_bad_residual_input():
    with pytest.raises(BranchspecError):
        make_residual("median", num_branches=9, img_size=32)
    with pytest.raises(BranchspecError):
        GaussianSmoothing(0.0)
    with pytest.raises(BranchspecError):
        LearntDiffusion(3)(torch.randn(1, 3, 18, 18))
