"""Per-class analyses of a branched classifier's branch outputs (Sec. 6, Figs. 5-8, 16-17).

Everything starts from the branch outputs ``V = [M, N, C]``: v_k(x_i) for the M branches, N samples and C
classes (:func:`branch_outputs_in_batches`). Because f = Σ_k v_k, the logit margin of the true class y over
the mean of the other classes splits exactly into per-branch terms,

    f_y(x) − mean_{j≠y} f_j(x) = Σ_k conf_k(x),   conf_k(x) = v_k(x)_y − mean_{j≠y} v_k(x)_j,

and conf_k(x) is branch k's *confidence* in the correct class (Fig. 7: positive is true confidence, negative
false confidence). The rest follows from it and from :mod:`branchspec.analysis.activity` (the 10% active
rule and the covariance F·Fᵀ of Fig. 5, on the response rows F_k = v_k over every sample and class).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from branchspec.analysis.activity import active_mask, covariance, response_norms
from branchspec.branched import unchanged_buffers


@torch.no_grad()
def branch_outputs_in_batches(model, images: Tensor, batch_size: int = 1000) -> Tensor:
    """v_k(x) for every branch and image, in eval mode and batches: ``[M, N, C]`` float32 on the CPU."""
    was_training = model.training
    model.eval()
    try:
        with unchanged_buffers(model):
            device = next(model.parameters()).device
            parts = [model.branch_outputs(images[i:i + batch_size].to(device)).float().cpu()
                     for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts, dim=1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of samples whose largest logit is the label (``logits [..., N, C]`` → mean over N)."""
    return float((logits.argmax(-1) == labels).float().mean())


def confidence(branch_outputs: Tensor, labels: Tensor) -> Tensor:
    """conf_k(x_i) = v_k(x_i)_y − mean_{j≠y} v_k(x_i)_j: ``[M, N]`` (Fig. 7); sums over k to f's margin."""
    c = branch_outputs.shape[-1]
    true = branch_outputs.gather(-1, labels.view(1, -1, 1).expand(branch_outputs.shape[0], -1, 1)).squeeze(-1)
    others = (branch_outputs.sum(-1) - true) / (c - 1)
    return true - others


def per_class_mean(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The mean of ``values [M, N, ...]`` over the samples of each class: ``[M, C, ...]``."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(values.dtype)  # [N, C]
    counts = onehot.sum(0).clamp_min(1)
    summed = torch.einsum("mn...,nc->mc...", values, onehot)
    return summed / counts.view(1, -1, *([1] * (values.dim() - 2)))


def class_outputs(branch_outputs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Fig. 6: each branch's mean output vector on each true class, ``[M, C_true, C_out]``."""
    return per_class_mean(branch_outputs, labels, num_classes)


def contribution_matrix(branch_outputs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Branch k's contribution to class c: its mean confidence conf_k on the samples of class c, ``[M, C]``.

    The columns sum over k to the summed model's mean margin on each class.
    """
    return per_class_mean(confidence(branch_outputs, labels), labels, num_classes)


def top_branch_share(contribution: Tensor) -> Tensor:
    """Intra-class specialization (Figs. 6-7): for each class, the share of the positive contributions that its
    largest contributor carries, ``[C]``. 1/M when every branch contributes alike, 1 when one branch does it all.
    """
    positive = contribution.clamp_min(0)
    return positive.amax(0) / positive.sum(0).clamp_min(1e-12)


def experts_per_class(contribution: Tensor, threshold: float = 0.1) -> dict:
    """Observations 2 and 3 of Sec. 4, with the 10% rule of Fig. 4 applied within each class (a class is a region
    of specialization): branch k is *active in class c* when its contribution (``contribution [M, C]``, positive
    part) is at least ``threshold`` of class c's largest.

    Returns ``branches_per_class`` ``[C]`` (how many branches share each class: 1 when a single expert carries
    it) and its mean, and ``silent_class_share`` ``[M]``: the share of the classes in which each branch is not
    active (NaN for a branch active in no class), with its mean over the branches active somewhere.
    """
    positive = contribution.clamp_min(0)
    active = positive >= threshold * positive.amax(0, keepdim=True).clamp_min(1e-12)  # [M, C]
    active &= positive > 0
    anywhere = active.any(1)
    silent_share = torch.where(anywhere, 1 - active.double().mean(1), torch.full_like(anywhere, float("nan"),
                                                                                      dtype=torch.float64))
    return {"branches_per_class": active.sum(0).tolist(), "mean_branches_per_class": float(active.sum(0).double().mean()),
            "silent_class_share": silent_share.tolist(),
            "mean_silent_class_share": float(silent_share[anywhere].mean()) if anywhere.any() else float("nan")}


def response_rows(branch_outputs: Tensor) -> np.ndarray:
    """F_k = v_k over every sample and class as one row per branch (Sec. 4.1's F, for vector outputs)."""
    return branch_outputs.reshape(branch_outputs.shape[0], -1).double().numpy()


CONSTANT_FRACTION = 1e-3  # a branch whose centred response norm is below this share of the largest: constant


def activity(branch_outputs: Tensor) -> dict:
    """Fig. 5: response norms, active (≥ 10% of the largest norm) and silent branches, covariance F·Fᵀ, on the raw
    responses (the paper's rule), and the same counts on mean-centred ones.

    Centred: each branch's output minus its mean over the samples (per output dimension). A branch that gives
    the same vector for every input has a large raw norm but a centred norm of 0: it is active by the paper's
    rule and silent by the centred one (it only shifts the logits). ``num_constant`` counts the branches whose
    centred norm is below :data:`CONSTANT_FRACTION` of the largest.
    """
    F = response_rows(branch_outputs)
    active = active_mask(F)
    centred = branch_outputs - branch_outputs.mean(1, keepdim=True)
    Fc = response_rows(centred)
    active_c = active_mask(Fc)
    norms, norms_c = response_norms(F), response_norms(Fc)
    return {"norms": norms, "active": active, "num_active": int(active.sum()),
            "num_silent": int((~active).sum()), "covariance": covariance(F) / F.shape[1],
            "norm_ratio_min": float(norms.min() / norms.max()) if norms.max() > 0 else float("nan"),
            "centred_norms": norms_c, "centred_active": active_c, "num_active_centred": int(active_c.sum()),
            "num_silent_centred": int((~active_c).sum()),
            "num_constant": int((norms_c < CONSTANT_FRACTION * norms_c.max()).sum()) if norms_c.max() > 0 else 0,
            "centred_norm_ratio_min": float(norms_c.min() / norms_c.max()) if norms_c.max() > 0 else float("nan")}


def ablation(branch_outputs: Tensor, labels: Tensor) -> dict:
    """Accuracy of the full sum, of the sum without each branch, and of each branch alone.

    In eval mode the branches do not interact, so f without branch k is exactly f − v_k (the same as
    ``model(x, subset=all but k)``).
    """
    total = branch_outputs.sum(0)
    return {
        "full": accuracy(total, labels),
        "without": [accuracy(total - v, labels) for v in branch_outputs],
        "alone": [accuracy(v, labels) for v in branch_outputs],
    }


def sample_per_class(labels: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """``per_class`` random sample indices of each class (Fig. 7: 20), grouped by class."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def most_confident(conf: Tensor, labels: Tensor, branch: int, cls: int, percent: float) -> Tensor:
    """Figs. 8 and 16: the test samples of class ``cls`` with the top ``percent``% confidence of ``branch``,
    most confident first."""
    idx = torch.nonzero(labels == cls).flatten()
    k = max(1, int(round(len(idx) * percent / 100)))
    order = conf[branch, idx].argsort(descending=True)[:k]
    return idx[order]
