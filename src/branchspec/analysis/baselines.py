"""Fixed decompositions of images, scored exactly like a branched generator's branches (Sec. 7's control).

A learnt decomposition means something only if it beats what needs no learning. Each baseline turns images
``[N, 3, H, W]`` into K candidate components ``[K, N, 3, H, W]`` that sum (with a remainder) to the images,
and :func:`score` puts them through the same metrics as the branches: component recovery (Hungarian-matched
|correlation|, :func:`~branchspec.analysis.decompose.component_recovery`) and per-image, permutation-matched
SI-SDR with its SIR/SAR split (:func:`~branchspec.analysis.decompose.separation_scores`).

- :func:`dog_bank`: a difference-of-Gaussians filter bank, 9 bands for σ from 0.5 to 8 px: band 0 = x − G_σ0 x,
  band i = G_σ(i−1) x − G_σi x (the remainder G_σ8 x plays R's part);
- :func:`luma_chroma`: each band split into its luminance (Y in all three channels) and the rest (chroma),
  twice the candidates;
- :func:`diffusion_at_init`: the learnt diffusion's inputs φ_k before any training (App. E);
- :func:`pca_components`: a data-driven linear baseline: the images' projections on the leading principal
  components of the training images' pixel vectors (scikit-learn's PCA), one candidate per component.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from branchspec.analysis.decompose import component_recovery, separation_scores
from branchspec.errors import BranchspecError

DOG_SIGMAS = tuple(float(s) for s in np.geomspace(0.5, 8.0, 9))


def dog_bank(images: Tensor, sigmas=DOG_SIGMAS) -> Tensor:
    """Difference-of-Gaussians bands ``[len(sigmas), N, 3, H, W]`` (edges extended by their nearest pixel)."""
    from branchspec.nets.diffusion import GaussianSmoothing

    x = images.detach().double()
    blurred = [x] + [GaussianSmoothing(s)(x) for s in sigmas]
    return torch.stack([blurred[i] - blurred[i + 1] for i in range(len(sigmas))]).float()


def luma_chroma(bands: Tensor) -> Tensor:
    """Each band ``[K, N, 3, H, W]`` as its luma part (ITU-R 601 Y in every channel) and the rest: ``[2K, ...]``."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=bands.dtype, device=bands.device).view(1, 1, 3, 1, 1)
    luma = (bands * w).sum(2, keepdim=True).expand_as(bands)
    return torch.cat([luma, bands - luma])


@torch.no_grad()
def diffusion_at_init(images: Tensor, num_branches: int, *, dt: float = 0.2, heat: float = 0.0, seed: int = 0) -> Tensor:
    """φ_1..φ_M of the learnt diffusion R before training (App. E; with ``heat`` its fixed heat-flow term), drawn
    from ``seed`` as a run's R is: ``[M, N, 3, H, W]``."""
    from branchspec.nets.diffusion import LearntDiffusion

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        residual = LearntDiffusion(num_branches, dt=dt, heat=heat)
    return residual(images.float())[1]


def pca_components(train_images: Tensor, images: Tensor, k: int, seed: int = 0) -> Tensor:
    """The projections of ``images`` on the ``k`` leading principal components of ``train_images``' pixel
    vectors: candidate j is (x − μ)·u_j u_j, ``[k, N, 3, H, W]`` (the mean μ is the remainder)."""
    from sklearn.decomposition import PCA

    X = train_images.detach().double().flatten(1).cpu().numpy()
    if k > min(X.shape):
        raise BranchspecError(f"{k} principal components need at least {k} training images and pixels, got "
                              f"{X.shape[0]} images of {X.shape[1]} values.")
    pca = PCA(n_components=k, random_state=seed).fit(X)
    Y = images.detach().double().flatten(1).cpu().numpy() - pca.mean_
    coef = Y @ pca.components_.T  # [N, k]
    parts = coef.T[:, :, None] * pca.components_[:, None, :]  # [k, N, D]
    return torch.from_numpy(parts).float().view(k, *images.shape)


def score(candidates: Tensor, layers: dict[str, Tensor]) -> dict:
    """Component recovery and SI-SDR of a set of candidate components, as for the branches."""
    rec = component_recovery(candidates, layers)
    sep = separation_scores(candidates, layers)
    return {"candidates": int(candidates.shape[0]), "component_recovery": rec["mean_matched_abs_correlation"],
            "component_recovery_per_layer": rec["per_layer"], **sep}


def fixed_baselines(images: Tensor, train_images: Tensor, num_branches: int, *, dt: float = 0.2, heat: float = 0.0,
                    seed: int = 0) -> dict[str, Tensor]:
    """Every fixed decomposition of ``images`` by name (the candidates of each)."""
    bands = dog_bank(images)
    return {"dog_bank": bands, "dog_luma_chroma": luma_chroma(bands),
            "diffusion_at_init": diffusion_at_init(images, num_branches, dt=dt, heat=heat, seed=seed),
            "pca": pca_components(train_images, images, num_branches, seed=seed)}


# ---------------------------------------------------------------------------------- more than frequency bands?
def band_energy_shares(components: Tensor, num_bands: int = 5) -> np.ndarray:
    """The share of each component's energy in octave bands of spatial frequency: ``components [K, N, C, H, W]``
    -> ``[K, num_bands]``, rows summing to 1 (a component of zero energy gives a row of NaN).

    Band 0 holds the radial frequencies |f| ≥ 1/4 cycle per pixel, band b those in [2^−(b+2), 2^−(b+1)), the last
    band everything below (the mean included). Energy by Parseval, from the 2-D FFT of every image and channel.
    """
    x = components.detach().double()
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x).abs().square().sum((1, 2))  # [K, H, W]
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    band = torch.clamp(torch.floor(-torch.log2(radius.clamp_min(1e-12))) - 2, 0, num_bands - 1).long()  # [H, W]
    energy = torch.zeros(x.shape[0], num_bands, dtype=torch.float64).index_add_(1, band.flatten(), power.flatten(1))
    total = energy.sum(1, keepdim=True)
    return (energy / torch.where(total > 0, total, torch.nan)).numpy()


def band_comparison(branch_outputs: Tensor, images: Tensor, num_bands: int = 5) -> dict:
    """Are the branches more than frequency bands? For data without true layers (real photos), each branch
    beside the difference-of-Gaussians bank of the same images: its share of energy per octave band
    (:func:`band_energy_shares`), the share in its dominant band, and its best |correlation| with any one DoG
    band (1: the branch is that band; a DoG band's own dominant share is given as the reference for what "a
    band" looks like)."""
    from branchspec.analysis.decompose import abs_correlation

    bands = dog_bank(images)
    shares, dog_shares = band_energy_shares(branch_outputs, num_bands), band_energy_shares(bands, num_bands)
    best = abs_correlation(branch_outputs, bands).max(1)
    live = np.isfinite(shares).all(1)  # a branch of zero energy has no spectrum (and correlates 0)
    dominant = np.where(live, np.nanmax(np.where(live[:, None], shares, 0), 1), np.nan)
    return {"band_edges_cycles_per_pixel": [2.0 ** -(b + 2) for b in range(num_bands - 1)],
            "branch_band_shares": shares.tolist(), "dog_band_shares": dog_shares.tolist(),
            "branch_dominant_band_share": dominant.tolist(), "dog_dominant_band_share": dog_shares.max(1).tolist(),
            "branch_best_dog_band_correlation": best.tolist(),
            "mean_branch_dominant_band_share": float(np.nanmean(dominant)) if live.any() else None,
            "mean_dog_dominant_band_share": float(dog_shares.max(1).mean()),
            "mean_best_dog_band_correlation": float(best[live].mean()) if live.any() else None}
