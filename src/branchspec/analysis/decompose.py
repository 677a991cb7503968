"""Image decomposition by a branched generator: views, manipulations and scores (Sec. 7; App. A, D; Figs. 9-15).

A forward pass of f(x, d) = R(x) + Σ_k v_k(x, d) (Eq. 15) gives ``out = model.decompose(x, d)``: the
re-generated (or translated) image ``out.total``, R and the branch outputs ``out.branch_outputs``
``[M, B, 3, H, W]``, all in the image space ("ambient-space components"). From them:

- views: :func:`contrast_stretch` (Figs. 10 top, 11, 18-20), :func:`added_to_image` (Fig. 10 bottom);
- manipulations: :func:`alpha_sweep` (Figs. 13-14), :func:`subset_sums` (Fig. 15);
- scores against ground truth (layered scenes): :func:`component_recovery` (Hungarian-matched |correlation|),
  :func:`psnr` and :func:`ssim` against paired renderings;
- scores without ground truth: :func:`branch_statistics` (inter-branch correlation and active branches, as
  :mod:`branchspec.analysis.activity`), :func:`structure_fidelity` and :func:`frechet_distance`.

Images are float tensors in [-1, 1] (StarGAN-v2's range) unless a function says otherwise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy import linalg
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from branchspec.analysis.activity import active_mask, correlation, mean_abs_offdiagonal, response_norms
from branchspec.branched import BranchedOutput
from branchspec.errors import BranchspecError


# ------------------------------------------------------------------------------------------------ views
def to_display(images: Tensor) -> np.ndarray:
    """Images ``[N, 3, H, W]`` in [-1, 1] as ``[N, H, W, 3]`` in [0, 1] for plotting."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def contrast_stretch(images: Tensor, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Each image's percentiles ``low``..``high`` mapped to [0, 1] ("increased contrast", Figs. 10-11).

    ``[N, 3, H, W]`` -> ``[N, H, W, 3]``; an image with no spread becomes mid-grey.
    """
    a = images.detach().float().cpu().numpy()
    flat = a.reshape(len(a), -1)
    lo = np.percentile(flat, low, axis=1)[:, None, None, None]
    hi = np.percentile(flat, high, axis=1)[:, None, None, None]
    spread = hi - lo
    out = np.divide(a - lo, spread, out=np.full_like(a, 0.5), where=spread > 1e-12)
    return np.clip(out, 0, 1).transpose(0, 2, 3, 1)


def added_to_image(total: Tensor, branch_outputs: Tensor) -> Tensor:
    """f + v_k for every branch k: each branch added once more, without amplification (Fig. 10 bottom).

    ``total`` ``[B, 3, H, W]``, ``branch_outputs`` ``[K, B, 3, H, W]`` -> ``[K, B, 3, H, W]``.
    """
    return total.unsqueeze(0) + branch_outputs


def alpha_sweep(out: BranchedOutput, k: int, alphas: Sequence[float]) -> Tensor:
    """f with branch k's magnitude set to α: R + Σ_{j≠k} v_j + α·v_k for each α (Figs. 13-14).

    ``[A, B, ...]``.
    """
    pos = _position(out, k)
    v = out.branch_outputs[pos]
    return torch.stack([out.total + (float(a) - 1.0) * v for a in alphas])


def subset_sums(out: BranchedOutput, subsets: Sequence[Sequence[int]], with_residual: bool = True) -> Tensor:
    """R + Σ_{k ∈ S} v_k for each subset S (Fig. 15). ``[len(subsets), B, ...]``."""
    sums = []
    for subset in subsets:
        if not subset:
            raise BranchspecError("a subset of branches is empty; give at least one branch in each subset.")
        s = out.branch_outputs[[_position(out, k) for k in subset]].sum(0)
        sums.append(s + out.residual if with_residual and out.residual is not None else s)
    return torch.stack(sums)


def _position(out: BranchedOutput, k: int) -> int:
    if k not in out.subset:
        raise BranchspecError(f"branch {k} is not among the decomposed branches {list(out.subset)}.")
    return out.subset.index(k)


# ------------------------------------------------------------------------------------- ground-truth scores
def abs_correlation(a: Tensor, b: Tensor) -> np.ndarray:
    """|Pearson correlation| between every row of ``a`` ``[M, ...]`` and of ``b`` ``[J, ...]``: ``[M, J]``.

    Each row is flattened over all its samples, channels and pixels; a constant row correlates 0.
    """
    A = a.detach().double().flatten(1)
    B = b.detach().double().flatten(1).to(A.device)
    A = A - A.mean(1, keepdim=True)
    B = B - B.mean(1, keepdim=True)
    na, nb = A.norm(dim=1), B.norm(dim=1)
    C = (A @ B.T) / (na[:, None] * nb[None, :]).clamp(min=1e-300)
    C[(na == 0)[:, None] | (nb == 0)[None, :]] = 0.0
    return C.abs().cpu().numpy()


def component_recovery(branch_outputs: Tensor, layers: dict[str, Tensor]) -> dict:
    """Component recovery: match each ground-truth layer to its own branch (Hungarian, maximizing |corr|)
    and average the matched |correlation| over the layers (a layer left without a branch scores 0).

    ``branch_outputs`` ``[M, N, 3, H, W]``, ``layers`` name -> ``[N, 3, H, W]`` (the same images).
    """
    names = list(layers)
    C = abs_correlation(branch_outputs, torch.stack([layers[n] for n in names]))  # [M, J]
    rows, cols = linear_sum_assignment(-C)
    per_layer = {name: 0.0 for name in names}
    branch_of = {name: None for name in names}
    for k, j in zip(rows, cols):
        per_layer[names[j]] = float(C[k, j])
        branch_of[names[j]] = int(k)
    return {"mean_matched_abs_correlation": float(np.mean(list(per_layer.values()))),
            "per_layer": per_layer, "branch_of_layer": branch_of, "abs_correlation": C, "layers": names}


SDR_CAP_DB = 100.0  # SI-SDR of a perfect estimate is +∞; capped here so that means stay finite


def si_sdr_scores(estimates: np.ndarray, references: np.ndarray) -> dict[str, np.ndarray]:
    """Scale-invariant BSS Eval of every estimate against every reference of one image (Le Roux et al. 2019;
    Vincent et al. 2006): ``estimates [K, T]``, ``references [J, T]``, both made zero-mean.

    For estimate e and reference s: the target α·s (α = ⟨e, s⟩/‖s‖²); the interference, the part of e in the
    span of the *other* references; the artifacts, the rest. SI-SDR = 10 log10 ‖target‖²/‖e − target‖², SI-SIR
    = 10 log10 ‖target‖²/‖interference‖², SI-SAR = 10 log10 ‖target + interference‖²/‖artifacts‖² (BSS Eval's
    definitions, checked against ``fast_bss_eval`` in the tests), each ``[K, J]``, capped at
    ±:data:`SDR_CAP_DB`. A reference of zero energy gives NaN in its column; an estimate of zero energy (a branch
    that outputs nothing) recovers nothing and scores −:data:`SDR_CAP_DB` in its row (0/0 would otherwise read 0 dB)."""
    E = np.asarray(estimates, dtype=np.float64)
    S = np.asarray(references, dtype=np.float64)
    E = E - E.mean(1, keepdims=True)
    S = S - S.mean(1, keepdims=True)
    energy = (S * S).sum(1)  # [J]
    alpha = (E @ S.T) / np.where(energy > 0, energy, np.nan)  # [K, J]
    target = alpha[:, :, None] * S[None]  # [K, J, T]
    proj = E @ np.linalg.pinv(S) @ S  # [K, T]: the projection of each estimate on the span of all references
    tiny = 1e-300

    def db(num, den):
        return np.clip(10 * np.log10(np.maximum(num, tiny) / np.maximum(den, tiny)), -SDR_CAP_DB, SDR_CAP_DB)

    t2 = (target ** 2).sum(-1)
    sdr = db(t2, ((E[:, None] - target) ** 2).sum(-1))
    sir = db(t2, ((proj[:, None] - target) ** 2).sum(-1))
    sar = db((proj ** 2).sum(-1), ((E - proj) ** 2).sum(-1))[:, None].repeat(S.shape[0], 1)
    bad, silent = ~(energy > 0), ~((E * E).sum(1) > 0)
    for a in (sdr, sir, sar):
        a[silent] = -SDR_CAP_DB
        a[:, bad] = np.nan
    return {"si_sdr": sdr, "si_sir": sir, "si_sar": sar}


def separation_scores(estimates: Tensor, layers: dict[str, Tensor]) -> dict:
    """Per-image, permutation-matched SI-SDR with its SIR/SAR split (:func:`si_sdr_scores`): in every image
    each true layer is matched to its own candidate (Hungarian, maximizing SI-SDR; a candidate serves one
    layer at most), then the scores are averaged per layer, per image, and over everything, with 95% intervals
    over the images.

    ``estimates`` ``[K, N, 3, H, W]`` (branch outputs or a fixed decomposition's candidates), ``layers`` name ->
    ``[N, 3, H, W]``. With fewer candidates than layers, each image's unmatched layers are left out of the
    means (``layers_matched`` says how many were scored per image).
    """
    from branchspec.seeds import interval

    names = list(layers)
    E = estimates.detach().double().flatten(2).cpu().numpy()  # [K, N, T]
    S = torch.stack([layers[n] for n in names]).detach().double().flatten(2).cpu().numpy()  # [J, N, T]
    per = {k: np.full((E.shape[1], len(names)), np.nan) for k in ("si_sdr", "si_sir", "si_sar")}
    for i in range(E.shape[1]):
        scores = si_sdr_scores(E[:, i], S[:, i])
        valid = np.isfinite(scores["si_sdr"]).all(0)
        if not valid.any():
            continue
        cols = np.flatnonzero(valid)
        rows, picked = linear_sum_assignment(-scores["si_sdr"][:, cols])
        for k, c in zip(rows, picked):
            for key in per:
                per[key][i, cols[c]] = scores[key][k, cols[c]]
    per_image = np.nanmean(per["si_sdr"], 1)
    out = {key: float(np.nanmean(v)) for key, v in per.items()}
    out.update({f"{key}_per_layer": dict(zip(names, np.nanmean(v, 0).tolist())) for key, v in per.items()})
    out["layers_matched"] = int(min(E.shape[0], S.shape[0]))
    out["si_sdr_per_image"] = per_image.tolist()
    out["si_sdr_interval_over_images"] = interval(per_image.tolist())["ci95"]
    return out


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean PSNR (dB) over images in [-1, 1] (peak-to-peak 2), per ``skimage.metrics``."""
    from skimage.metrics import peak_signal_noise_ratio

    x, y = _numpy_images(a, b)
    return float(np.mean([peak_signal_noise_ratio(t, p, data_range=2.0) for t, p in zip(x, y)]))


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM over RGB images in [-1, 1] (``skimage.metrics.structural_similarity``, 7×7 window or smaller)."""
    from skimage.metrics import structural_similarity

    x, y = _numpy_images(a, b)
    side = min(x.shape[1:3])
    win = min(7, side if side % 2 else side - 1)
    return float(np.mean([structural_similarity(t, p, data_range=2.0, channel_axis=-1, win_size=win)
                          for t, p in zip(x, y)]))


def _numpy_images(a: Tensor, b: Tensor) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise BranchspecError(f"images to compare differ in shape: {tuple(a.shape)} and {tuple(b.shape)}.")
    def np_(t):
        return t.detach().double().cpu().clamp(-1, 1).permute(0, 2, 3, 1).numpy()

    return np_(a), np_(b)


# ------------------------------------------------------------------------------------ scores without truth
def branch_statistics(branch_outputs: Tensor) -> dict:
    """Per-branch response norms, the active branches (Fig. 4's 10% rule) and the correlation F·Fᵀ normalized
    (Sec. 4.1), with F's row k = branch k's outputs over all images and pixels."""
    F = branch_outputs.detach().double().flatten(1).cpu().numpy()
    active = active_mask(F)
    corr = correlation(F)
    return {"response_norms": response_norms(F), "active": active, "num_active": int(active.sum()),
            "correlation": corr, "mean_abs_correlation_active": float(mean_abs_offdiagonal(corr, active))}


def luminance(images: Tensor) -> Tensor:
    """ITU-R 601 luma of RGB images ``[N, 3, H, W]`` -> ``[N, 1, H, W]``."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def structure_fidelity(inputs: Tensor, outputs: Tensor) -> float:
    """Fidelity of a translation to its input's structure: the mean SSIM of their luminance images.

    Colour and texture may change with the domain; shapes, edges and layout should stay (Fig. 9).
    """
    return ssim(luminance(inputs).expand(-1, 3, -1, -1), luminance(outputs).expand(-1, 3, -1, -1))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between Gaussians fitted to features ``[N, F]``."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise BranchspecError(f"the Fréchet distance needs two feature sets [N ≥ 2, F] of one width, got "
                              f"{a.shape} and {b.shape}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularize as the reference implementations do
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@torch.no_grad()
def batched_features(extract: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """``extract`` applied to ``images`` in batches on ``device``: ``[N, F]`` float64."""
    parts = [extract(images[i:i + batch_size].to(device)).double().flatten(1).cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy()
