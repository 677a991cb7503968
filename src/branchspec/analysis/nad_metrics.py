"""What the NAD sub-architectures say (reference/nad_method.md §2), and their link to branch specialization.

- *where* disentanglement occurs: the hit rate per layer on 2×2 mosaics of four classes (:func:`hit_rates`);
  chance is 0.25;
- *how similar* two sub-architectures are: the IoU of their kept channels, per layer and averaged
  (:func:`iou`, :func:`similarity`);
- *why* the network errs: how often a misclassified image's true class is among the k sub-architectures most
  similar to the predicted class's, against chance (:func:`misclassification`; an aggregate of what the
  authors showed as examples);
- the link to the first paper: the share of each class's kept channels that lies in each branch
  (:func:`branch_shares`), correlated with the branch×class contribution matrix (:func:`branch_link`).

Every function returns finite numbers for degenerate masks: two empty masks have IoU 1 (equal sets), a map with
no salient pixel (an all-zero layer) spreads its saliency evenly (hit rate 0.25), a class that keeps nothing
has branch shares 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from branchspec.analysis.nad import Gates, GateLayer, gate_values, predict
from branchspec.errors import BranchspecError

CHANCE_HIT = 0.25  # four tiles of equal area
MASK_RATE = 0.1  # the authors keep the top 10% pixels (cam_2x2.py main())


# ----------------------------------------------------------------------------------------- 2×2 mosaics
def make_mosaics(images: Tensor, labels: Tensor, pool: Sequence[int], count: int = 100,
                 seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` 2×2 mosaics of four different classes of ``pool``, one random image each.

    Tile q = 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. Returns the mosaics ``[K, C, 2H, 2W]``,
    the tiles' classes ``[K, 4]`` and the images' indices ``[K, 4]``.
    """
    pool = [c for c in pool if bool((labels == c).any())]
    if len(pool) < 4:
        raise BranchspecError(f"2×2 mosaics need 4 searched classes with test images, only {len(pool)} have some.")
    rng = np.random.default_rng(seed)
    by_class = {c: torch.nonzero(labels == c).flatten().numpy() for c in pool}
    classes = np.stack([rng.choice(pool, 4, replace=False) for _ in range(count)])
    picks = np.vectorize(lambda c: rng.choice(by_class[c]))(classes)
    tiles = images[torch.from_numpy(picks).flatten()].unflatten(0, (count, 4))  # [K, 4, C, H, W]
    top = torch.cat([tiles[:, 0], tiles[:, 1]], -1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], -1)
    return torch.cat([top, bottom], -2), torch.from_numpy(classes), torch.from_numpy(picks)


def salient_pixels(maps: Tensor, size: int, mask_rate: float = MASK_RATE) -> Tensor:
    """The top ``mask_rate`` pixels of channel-summed activation maps ``[N, h, w]``, at ``size × size``.

    As in the authors' ``cam_2x2.py``: min-max normalization, quantization to 8 bits, bicubic resize to the
    input size, threshold T = the k-th largest value (k = ⌊rate·size²⌋) and the pixels strictly above T. Where
    no pixel is strictly above T (a flat map, e.g. an all-zero layer) the pixels equal to T are taken too, so
    a flat map selects every pixel. Returns ``[N, size, size]`` bool.
    """
    maps = maps.float()
    lo = maps.amin((1, 2), keepdim=True)
    span = maps.amax((1, 2), keepdim=True) - lo
    norm = torch.where(span > 0, (maps - lo) / span.clamp_min(1e-30), torch.zeros_like(maps))
    q = torch.floor(norm * 255)
    up = F.interpolate(q[:, None], size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    s = up.clamp(0, 255).round().flatten(1)
    k = max(1, int(mask_rate * size * size))
    t = s.topk(k, dim=1).values[:, -1:]
    above = s > t
    chosen = torch.where(above.any(1, keepdim=True), above, s >= t)
    return chosen.view(-1, size, size)


def quadrant_share(selected: Tensor, quadrant: Tensor) -> Tensor:
    """The share of the selected pixels ``[N, P, P]`` that lies in tile ``quadrant[n]`` of the 2×2 layout."""
    n, p = selected.shape[0], selected.shape[-1]
    h = p // 2
    tiles = selected.view(n, 2, h, 2, h).sum((2, 4)).flatten(1).float()  # [N, 4]: TL, TR, BL, BR
    return tiles.gather(1, quadrant.view(-1, 1)).squeeze(1) / tiles.sum(1).clamp_min(1)


@torch.no_grad()
def hit_rates(model, layers: Sequence[GateLayer], logits: Sequence[Tensor], mosaics: Tensor, tile_classes: Tensor,
              *, mask_rate: float = MASK_RATE, device="cpu", autocast=None, batch_size: int = 128,
              return_selection: bool = False):
    """The hit rate of every tile at every layer, ``[K, 4, L]`` (reference/nad_method.md §2.1).

    For tile q of mosaic k the network runs with the binary sub-architecture of the tile's class in every
    layer; at layer l the channel-summed gated activation gives the salient pixels (:func:`salient_pixels`)
    and the hit is their share inside tile q. The mean over the four tiles is the mosaic's score; the reported
    value is its mean ± std over mosaics (chance 0.25). With ``return_selection`` the salient pixels
    ``[K, 4, L, P, P]`` come back too.
    """
    k, size = mosaics.shape[0], mosaics.shape[-1]
    tasks = tile_classes.flatten()  # [4K]
    quadrant = torch.arange(4).repeat(k)
    hits, selections = [], []
    with Gates(model, layers) as gates:
        for i in range(0, 4 * k, batch_size):
            sl = slice(i, i + batch_size)
            x = mosaics[torch.arange(4 * k)[sl] // 4].to(device)
            values = gate_values([m.to(device) for m in logits], tasks[sl].to(device), binary=True)
            with autocast or nullcontext():
                _, acts = gates.run(x, values)
            chosen = [salient_pixels(a.float().sum(1).cpu(), size, mask_rate) for a in acts]
            hits.append(torch.stack([quadrant_share(c, quadrant[sl]) for c in chosen], 1))
            if return_selection:
                selections.append(torch.stack(chosen, 1))
    out = torch.cat(hits).view(k, 4, len(layers))
    if return_selection:
        return out, torch.cat(selections).view(k, 4, len(layers), size, size)
    return out


def hit_rate_summary(hits: Tensor, layer_names: Sequence[str]) -> dict:
    """Per layer: the mean ± std over mosaics of the mosaic score (the mean over its four tiles); and the mean
    of the last three layers (the authors' ``test()``)."""
    per_mosaic = hits.mean(1).double()  # [K, L]
    mean, std = per_mosaic.mean(0), per_mosaic.std(0, unbiased=False)
    return {
        "mean": dict(zip(layer_names, mean.tolist())),
        "std": dict(zip(layer_names, std.tolist())),
        "last3_mean": float(mean[-3:].mean()),
        "best_layer": layer_names[int(mean.argmax())],
        "chance": CHANCE_HIT,
        "mosaics": int(hits.shape[0]),
    }


# ------------------------------------------------------------------------------------------ similarity
def iou(masks: Sequence[Tensor]) -> Tensor:
    """IoU of the kept channels of every pair of classes, per layer: ``[L, T, T]`` float64.

    |b_i ∧ b_j| / |b_i ∨ b_j|; two empty masks are equal sets and get 1 (the authors' 0/0 is undefined).
    """
    out = []
    for b in masks:
        b = b.double()
        inter = b @ b.T
        size = b.sum(1)
        union = size[:, None] + size[None, :] - inter
        out.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)))
    return torch.stack(out)


def similarity(masks: Sequence[Tensor]) -> Tensor:
    """sim(i, j) = (1/L) Σ_l IoU_l(i, j), ``[T, T]`` (similarSubArch.py)."""
    return iou(masks).mean(0)


# ------------------------------------------------------------------------------------- misclassification
def misclassification(sim: Tensor, labels: Tensor, predictions: Tensor, searched: Tensor, k: int = 3) -> dict:
    """How often the true class of a misclassified image is among the k classes whose sub-architectures are
    most similar to the predicted class's, against chance.

    Over the misclassified images whose true and predicted classes were both searched: the candidates are the
    other searched classes ranked by sim(predicted, ·); ties are broken at random in expectation (the hit
    counts the probability that the true class lands in the top k). Chance is k / (S − 1) for S searched
    classes: the true class is then a uniformly random other class. ``by_k`` gives the rate and chance for
    every k; ``p_value`` is the one-sided binomial test of the (rounded) hits against chance.
    """
    from scipy.stats import binomtest

    pool = torch.nonzero(searched).flatten()
    wrong = (predictions != labels) & searched[labels] & searched[predictions]
    errors = int((predictions != labels).sum())
    y, p = labels[wrong], predictions[wrong]
    s = len(pool)
    others = s - 1
    n = int(wrong.sum())
    result = {"k": k, "errors": errors, "errors_used": n, "searched_classes": s}
    if n == 0 or others < 1:
        return {**result, "rate": None, "chance": None, "hits": 0, "p_value": None, "by_k": {}}
    rate_at = _top_k_rates(sim, y, p, pool)
    by_k = {int(kk): {"rate": float(rate_at(kk).mean()), "chance": kk / others} for kk in range(1, others + 1)}
    kk = min(k, others)
    hits = float(rate_at(kk).sum())
    test = binomtest(int(round(hits)), n, kk / others, alternative="greater")
    return {**result, "k": kk, "rate": hits / n, "chance": kk / others, "hits": hits,
            "lift": (hits / n) / (kk / others),
            "p_value": float(test.pvalue), "by_k": by_k}


def _top_k_rates(sim: Tensor, y: Tensor, p: Tensor, pool: Tensor):
    """``rate_at(k)``: for each error (true y, predicted p), P(y is among the k classes of the pool, p left out,
    most similar to p), ties broken at random."""
    n = len(y)
    sim = sim.double()
    in_pool = torch.zeros(sim.shape[0], dtype=torch.bool)
    in_pool[pool] = True
    rows = sim[p]  # [n, T]
    candidates = in_pool[None, :].expand(n, -1).clone()
    candidates[torch.arange(n), p] = False
    target = rows.gather(1, y[:, None])
    greater = ((rows > target) & candidates).sum(1).double()
    ties = ((rows == target) & candidates).sum(1).double()  # includes the true class itself

    def rate_at(kk: int) -> Tensor:
        return ((kk - greater) / ties).clamp(0, 1)

    return rate_at


def misclassification_permutation(sim: Tensor, labels: Tensor, predictions: Tensor, searched: Tensor, k: int = 3,
                                  permutations: int = 1000, seed: int = 0) -> dict:
    """The class-permutation test of :func:`misclassification`: the errors stay as they are (their clustering in
    a few class pairs included) and the classes of the similarity matrix are relabelled at random,
    sim'(i, j) = sim(π(i), π(j)). The p-value is the share of relabellings whose top-k rate is at least the
    observed one. The binomial test instead treats the errors as independent draws against a uniform
    confusion, which overstates the evidence when errors cluster."""
    pool = torch.nonzero(searched).flatten()
    wrong = (predictions != labels) & searched[labels] & searched[predictions]
    y, p = labels[wrong], predictions[wrong]
    kk = min(k, len(pool) - 1)
    if len(y) == 0 or kk < 1:
        return {"k": kk, "rate": None, "p_value": None, "null_mean": None, "null_95": None, "permutations": 0}
    observed = float(_top_k_rates(sim, y, p, pool)(kk).mean())
    gen = torch.Generator().manual_seed(int(seed))
    null = []
    for _ in range(int(permutations)):
        perm = torch.arange(sim.shape[0])
        perm[pool] = pool[torch.randperm(len(pool), generator=gen)]  # relabel the searched classes among themselves
        null.append(float(_top_k_rates(sim[perm][:, perm], y, p, pool)(kk).mean()))
    null = np.asarray(null)
    return {"k": kk, "rate": observed, "p_value": float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))),
            "null_mean": float(null.mean()), "null_95": [float(np.quantile(null, 0.025)),
                                                        float(np.quantile(null, 0.975))],
            "permutations": int(permutations)}


@torch.no_grad()
def penultimate_features(model, images: Tensor, batch_size: int = 500, device="cpu") -> Tensor:
    """The input of the classifier's last linear layer for every image, ``[N, F]`` (for a Branched model, the
    branches' last linear layers' inputs side by side); the trivial-similarity baseline's features."""
    from torch import nn

    from branchspec.branched import Branched

    bodies = list(model.branches) if isinstance(model, Branched) else [model]
    heads = [[m for m in b.modules() if isinstance(m, nn.Linear)][-1:] for b in bodies]
    if not all(heads):
        raise BranchspecError("the model has no nn.Linear layer whose input could serve as penultimate features.")
    seen: list[Tensor] = []
    handles = [h[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].flatten(1))) for h in heads]
    parts = []
    try:
        model.eval()
        for i in range(0, len(images), batch_size):
            seen.clear()
            model(images[i:i + batch_size].to(device))
            parts.append(torch.cat(seen, 1).float().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(parts)


def feature_similarity(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The trivial similarity of two classes: the cosine of their mean penultimate features, ``[T, T]``."""
    onehot = F.one_hot(labels, num_classes).double()
    means = (onehot.T @ features.double()) / onehot.sum(0).clamp_min(1)[:, None]
    unit = F.normalize(means, dim=1)
    return unit @ unit.T


# ------------------------------------------------------------------------------------- link to branches
def branch_counts(masks: Sequence[Tensor], layers: Sequence[GateLayer]) -> np.ndarray:
    """Kept channels of each class in each branch, per layer: ``[L, T, M]``."""
    return np.stack([b.view(b.shape[0], layer.branches, -1).sum(-1).numpy() for b, layer in zip(masks, layers)])


def shares(counts: np.ndarray) -> np.ndarray:
    """Counts ``[..., T, M]`` → the share of each class's kept channels in each branch (rows sum to 1; a class
    that keeps nothing gets zeros)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def branch_link(share: np.ndarray, contribution: np.ndarray, searched: np.ndarray, *, active: np.ndarray | None = None,
                permutations: int = 1000, seed: int = 0) -> dict:
    """Does NAD recover branch specialization? Correlate the share of class c's kept channels in branch k
    (``share [T, M]``) with branch k's contribution to class c (``contribution [M, T]``, the classifier
    analysis's matrix), over the searched classes.

    Returns Pearson's r and Spearman's ρ over all branch×class entries, the mean over classes of the
    per-class Pearson r across branches, and a permutation p-value for r (branches shuffled independently
    within each class, so each class keeps its own shares). That null ignores branch main effects: a branch
    that keeps more channels of every class and contributes more to every class makes r large with no
    class-specific link. ``interaction_pearson`` is r between the double-centred matrices (main effects
    removed) and ``interaction_p`` its permutation p-value (classes shuffled within each branch). With ``active`` (the active branches of Fig. 5),
    also the mean share per class held by active and by silent branches.
    """
    from scipy.stats import spearmanr

    cols = np.flatnonzero(np.asarray(searched, dtype=bool))
    s = np.asarray(share, dtype=np.float64)[cols].T  # [M, S]
    c = np.asarray(contribution, dtype=np.float64)[:, cols]
    r = _pearson(s.ravel(), c.ravel())
    per_class = [_pearson(s[:, j], c[:, j]) for j in range(s.shape[1])]
    per_class = [v for v in per_class if np.isfinite(v)]
    rng = np.random.default_rng(seed)
    null = np.array([_pearson(rng.permuted(s, axis=0).ravel(), c.ravel()) for _ in range(permutations)])
    p = float((1 + np.sum(null >= r)) / (1 + permutations)) if np.isfinite(r) and permutations else None
    rho = spearmanr(s.ravel(), c.ravel()).statistic if s.std() > 0 and c.std() > 0 else float("nan")
    interaction = _pearson(double_centred(s).ravel(), double_centred(c).ravel())
    null_i = np.array([_pearson(double_centred(_permute_within_rows(s, rng)).ravel(), double_centred(c).ravel())
                       for _ in range(permutations)])
    p_i = float((1 + np.sum(null_i >= interaction)) / (1 + permutations)) if np.isfinite(interaction) and \
        permutations else None
    out = {"pearson": r, "spearman": float(rho), "per_class_pearson_mean": float(np.mean(per_class)) if per_class
           else float("nan"), "permutation_p": p, "permutations": permutations, "classes": int(len(cols)),
           # the same without branch and class main effects (a strong branch both keeps more channels and
           # contributes more): both matrices double-centred; null: classes permuted within each branch
           "interaction_pearson": interaction, "interaction_p": p_i}
    if active is not None:
        active = np.asarray(active, dtype=bool)
        out["active_branches"] = int(active.sum())
        out["share_in_active"] = float(s[active].sum(0).mean()) if len(cols) else float("nan")
        out["share_expected_if_uniform"] = float(active.mean())
    return out


def double_centred(a: np.ndarray) -> np.ndarray:
    """a − row means − column means + grand mean: what is left after both main effects (the interaction)."""
    a = np.asarray(a, dtype=np.float64)
    return a - a.mean(1, keepdims=True) - a.mean(0, keepdims=True) + a.mean()


def _permute_within_rows(a: np.ndarray, rng) -> np.ndarray:
    return rng.permuted(a, axis=1)


# ------------------------------------------------------------------------------------- sub-arch. accuracy
def class_recall(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per class: the share of its images predicted as that class, ``[T]`` (0 for a class with no image)."""
    hit = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    count = torch.bincount(labels, minlength=num_classes).double()
    return hit / count.clamp_min(1)


@torch.no_grad()
def detection(model, layers: Sequence[GateLayer], logits: Sequence[Tensor], images: Tensor, labels: Tensor,
              tasks: Sequence[int], num_classes: int, *, device="cpu", autocast=None) -> Tensor:
    """Whether a sub-architecture still classifies, and only its own class: ``D[i, t]`` is the share of the
    images of class t that the network gated by the binary sub-architecture of class ``tasks[i]`` assigns to
    ``tasks[i]``, ``[len(tasks), T]``. The diagonal entries ``D[i, tasks[i]]`` are recalls; the others are
    false-positive rates (a collapsed mask that always answers its class has a row of ones).
    """
    count = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    rows = []
    with Gates(model, layers) as gates:
        for c in tasks:
            values = [(m[c:c + 1] > 0).float().expand(len(images), -1) for m in logits]
            pred = predict(model, images, device=device, gates=gates, values=values, autocast=autocast)
            rows.append(torch.bincount(labels[pred == c], minlength=num_classes).double() / count)
    return torch.stack(rows) if rows else torch.zeros(0, num_classes, dtype=torch.float64)

