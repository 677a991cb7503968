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
