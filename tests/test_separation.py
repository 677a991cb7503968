"""SI-SDR with its SIR/SAR split, and the fixed baselines, on constructed cases (and against fast_bss_eval)."""

import numpy as np
import pytest
import torch

from branchspec.analysis import baselines
from branchspec.analysis.decompose import SDR_CAP_DB, component_recovery, separation_scores, si_sdr_scores
from branchspec.data.scenes import LAYERS, evaluation_scenes


@pytest.fixture(scope="module")
def scenes():
    return evaluation_scenes(6, size=32, num_domains=2, seed=0)[0]


def layers_of(s):
    return {n: s.layers[n] for n in LAYERS}


def test_perfect_separation_is_capped_and_recovers_everything(scenes):
    truth = torch.stack([scenes.layers[n] for n in LAYERS])
    extra = torch.zeros(4, *truth.shape[1:])
    out = separation_scores(torch.cat([truth, extra]), layers_of(scenes))
    assert out["si_sdr"] == SDR_CAP_DB and out["layers_matched"] == 5
    assert component_recovery(torch.cat([truth, extra]), layers_of(scenes))["mean_matched_abs_correlation"] == \
        pytest.approx(1.0)


def test_a_permuted_separation_is_matched_back_and_a_scale_changes_nothing(scenes):
    g = torch.Generator().manual_seed(0)
    truth = torch.stack([scenes.layers[n] for n in LAYERS])
    leaky = truth + 0.2 * truth.roll(1, 0) + 0.01 * torch.randn(truth.shape, generator=g)
    base = separation_scores(leaky, layers_of(scenes))
    permuted = separation_scores(leaky[[3, 0, 4, 1, 2]], layers_of(scenes))
    scaled = separation_scores(leaky * torch.tensor([3.0, -0.5, 2.0, 7.0, 0.1]).view(5, 1, 1, 1, 1),
                               layers_of(scenes))
    for other in (permuted, scaled):
        assert other["si_sdr"] == pytest.approx(base["si_sdr"], abs=1e-6)  # float32 inputs
        assert other["si_sdr_per_layer"] == pytest.approx(base["si_sdr_per_layer"], abs=1e-6)
    assert 0 < base["si_sdr"] < SDR_CAP_DB
    noise = separation_scores(torch.randn((9, *truth.shape[1:]), generator=g), layers_of(scenes))
    assert noise["si_sdr"] < -10  # noise explains nothing


def test_an_estimate_of_zero_energy_scores_the_lower_cap_not_zero_db(scenes):
    """0/0 would read 0 dB, better than most real estimates: a decomposition of silent branches (the diffusion's
    φ_k at initialization) must not look like a good one."""
    truth = torch.stack([scenes.layers[n] for n in LAYERS])
    silent = separation_scores(torch.zeros(9, *truth.shape[1:]), layers_of(scenes))
    assert silent["si_sdr"] == -SDR_CAP_DB and silent["si_sir"] == -SDR_CAP_DB
    one = si_sdr_scores(np.stack([np.zeros(50), np.arange(50.0)]), np.arange(50.0)[None])
    assert one["si_sdr"][0, 0] == -SDR_CAP_DB and one["si_sdr"][1, 0] == SDR_CAP_DB


def test_si_bss_eval_agrees_with_fast_bss_eval():
    fast_bss_eval = pytest.importorskip("fast_bss_eval")
    rng = np.random.default_rng(0)
    S = rng.standard_normal((3, 400))
    E = (rng.random((3, 3)) + 2 * np.eye(3)) @ S + 0.1 * rng.standard_normal((3, 400))
    mine = si_sdr_scores(E, S)
    sdr, sir, sar, perm = fast_bss_eval.si_bss_eval_sources(S, E, zero_mean=True)
    assert list(perm) == [0, 1, 2]
    np.testing.assert_allclose(np.diag(mine["si_sdr"]), sdr, atol=1e-8)
    np.testing.assert_allclose(np.diag(mine["si_sir"]), sir, atol=1e-8)
    np.testing.assert_allclose(np.diag(mine["si_sar"]), sar, atol=1e-8)


def test_the_fixed_baselines_are_decompositions(scenes):
    x = scenes.images
    bands = baselines.dog_bank(x)
    assert bands.shape == (9, *x.shape)
    from branchspec.nets.diffusion import GaussianSmoothing

    torch.testing.assert_close(bands.sum(0).double(), x.double() - GaussianSmoothing(8.0)(x.double()), atol=1e-5,
                               rtol=0)
    split = baselines.luma_chroma(bands)
    torch.testing.assert_close(split[:9] + split[9:], bands)
    pool = evaluation_scenes(40, size=32, num_domains=2, seed=3)[1].images
    pca = baselines.pca_components(pool, x, 5)
    assert pca.shape == (5, *x.shape)
    phi = baselines.diffusion_at_init(x, 9)
    assert phi.shape == (9, *x.shape) and float(phi.abs().max()) == 0.0  # the paper's p starts at zero
    phi = baselines.diffusion_at_init(x, 9, heat=1.0)
    assert float(phi.abs().max()) > 0  # with the heat term: the scale bands of the heat equation
    scored = baselines.score(bands, layers_of(scenes))
    assert scored["candidates"] == 9 and 0 < scored["component_recovery"] < 1 and np.isfinite(scored["si_sdr"])


def test_band_energy_shares_put_a_sinusoid_in_its_octave_and_a_dog_band_matches_itself():
    from branchspec.analysis.baselines import band_comparison, band_energy_shares, dog_bank

    x = torch.arange(32.0)
    fine = torch.cos(2 * torch.pi * 0.4 * x).expand(1, 2, 3, 32, 32)  # 0.4 cycles/px: band 0 (≥ 1/4)
    coarse = torch.cos(2 * torch.pi * x / 16).expand(1, 2, 3, 32, 32)  # 1/16: band 2 ([1/16, 1/8))
    shares = band_energy_shares(torch.cat([fine, coarse, torch.zeros(1, 2, 3, 32, 32)]))
    np.testing.assert_allclose(shares[0], [1, 0, 0, 0, 0], atol=1e-3)
    np.testing.assert_allclose(shares[1], [0, 0, 1, 0, 0], atol=1e-3)
    assert np.isnan(shares[2]).all()  # no energy, no spectrum
    images = torch.randn(4, 3, 32, 32)
    bands = dog_bank(images)[[1, 4]]
    out = band_comparison(torch.cat([bands, torch.zeros(1, 4, 3, 32, 32)]), images)
    np.testing.assert_allclose(out["branch_best_dog_band_correlation"][:2], 1.0, atol=1e-6)
    assert out["mean_best_dog_band_correlation"] == pytest.approx(1.0)  # the silent branch is left out
