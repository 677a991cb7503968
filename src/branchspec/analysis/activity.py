"""Responses, activity and covariance of branches (Sec. 4.1, Figs. 3-6).

A response matrix F has one row per branch: F[k, j] = v_k(x_j) (Sec. 4.1), or, for vector outputs, the
branch's outputs over a set of samples flattened into one row. These functions work on any leading batch
dimensions: ``F`` is ``[..., M, N]``.
"""

from __future__ import annotations

import numpy as np

ACTIVE_FRACTION = 0.1  # Fig. 4: active when the response norm is at least 10% of the largest branch's


def response_norms(F: np.ndarray) -> np.ndarray:
    """‖F_k‖ for each branch: ``[..., M]``."""
    return np.linalg.norm(np.asarray(F, dtype=np.float64), axis=-1)


def active_mask(F: np.ndarray, fraction: float = ACTIVE_FRACTION) -> np.ndarray:
    """Fig. 4: branch k is active when ‖F_k‖ ≥ fraction · max_l ‖F_l‖; silent otherwise. ``[..., M]`` bool."""
    norms = response_norms(F)
    return norms >= fraction * norms.max(axis=-1, keepdims=True)


def covariance(F: np.ndarray) -> np.ndarray:
    """Cov = F · Fᵀ (Sec. 4.1; uncentered, as in the paper): ``[..., M, M]``."""
    F = np.asarray(F, dtype=np.float64)
    return F @ np.swapaxes(F, -1, -2)


def correlation(F: np.ndarray) -> np.ndarray:
    """F·Fᵀ normalized by the response norms (cosine similarity of branch responses); 0 for a zero row."""
    cov = covariance(F)
    d = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0, None))
    denom = d[..., :, None] * d[..., None, :]
    return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)


def mean_abs_offdiagonal(C: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The mean |C_kl| over k ≠ l (restricted to branches where ``mask`` is true); NaN when fewer than two."""
    C = np.asarray(C, dtype=np.float64)
    m = C.shape[-1]
    keep = np.ones(C.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    pair = keep[..., :, None] & keep[..., None, :] & ~np.eye(m, dtype=bool)
    count = pair.sum(axis=(-1, -2))
    total = np.where(pair, np.abs(C), 0.0).sum(axis=(-1, -2))
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
