"""The controls and nulls of the evidence issue, on constructed cases whose answer is known."""

import numpy as np
import torch

from branchspec.analysis import nad_metrics as nm
from branchspec.analysis.hessian import (block_coupling, block_mass_ratio, mean_coupling, permuted_block_mass_ratios,
                                         pseudo_block_sizes)
from branchspec.analysis.classify import activity


def test_block_structure_scores_of_a_block_diagonal_and_a_dense_matrix():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(4, 4, generator=g) for _ in range(3)]
    diagonal = torch.block_diag(*[b @ b.T for b in blocks])
    assert block_mass_ratio(diagonal, [4, 4, 4]) == 1.0
    assert mean_coupling(block_coupling(diagonal, [4, 4, 4])) == 0.0
    a = torch.randn(12, 12, generator=g)
    dense = a @ a.T / 12 + 0 * diagonal
    c = block_coupling(dense, [4, 4, 4])
    assert torch.allclose(torch.diagonal(c), torch.ones(3, dtype=c.dtype))
    assert 0.3 < mean_coupling(c) < 1.5  # no structure: cross blocks as heavy as own blocks
    base = float(permuted_block_mass_ratios(dense, [4, 4, 4], 50).mean())
    assert abs(block_mass_ratio(dense, [4, 4, 4]) - base) < 0.15  # a dense matrix scores like its permutations
    assert pseudo_block_sizes(594, 135) == [135, 135, 135, 135, 54]


def test_centred_activity_finds_a_constant_branch():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(4, 50, 3, generator=g)
    V[3] = torch.tensor([2.0, -1.0, 0.5])  # the same vector for every input: large raw norm, no information
    act = activity(V)
    assert act["num_silent"] == 0 and act["active"][3]  # the paper's raw rule counts it active
    assert act["num_silent_centred"] == 1 and not act["centred_active"][3] and act["num_constant"] == 1


def test_misclassification_nulls_on_pure_class_pair_confusion():
    """Errors only inside two class pairs, similarity matrices unrelated to them: the binomial test (errors as
    independent draws) often calls it significant; the class-permutation test does not (p about uniform)."""
    rng = np.random.default_rng(0)
    T = 8
    y = torch.tensor([0, 1, 2, 3] * 100)
    p = torch.tensor([1, 0, 3, 2] * 100)  # 0↔1 and 2↔3 confused, nothing else
    searched = torch.ones(T, dtype=torch.bool)
    binomial, permutation = [], []
    for _ in range(40):
        a = torch.from_numpy(rng.random((T, T)))
        sim = (a + a.T) / 2
        binomial.append(nm.misclassification(sim, y, p, searched, k=3)["p_value"])
        permutation.append(nm.misclassification_permutation(sim, y, p, searched, k=3, permutations=99,
                                                            seed=int(rng.integers(1 << 30)))["p_value"])
    binomial, permutation = np.array(binomial), np.array(permutation)
    assert (binomial < 0.05).mean() > 0.3  # overstated: the 400 errors are 2 events, not 400
    assert (permutation < 0.05).mean() < 0.15 and 0.3 < permutation.mean() < 0.7


def test_misclassification_permutation_finds_a_real_link():
    T = 10  # 5 confused pairs: a random relabelling keeps all of them with probability 5!·2⁵/10! < 0.002
    y = torch.arange(T).repeat(20)
    p = (y + 1 - 2 * (y % 2))  # 0↔1, 2↔3, ...
    sim = torch.eye(T, dtype=torch.float64)
    for a, b in ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)):
        sim[a, b] = sim[b, a] = 0.9  # the confused pairs have the most similar sub-architectures
    out = nm.misclassification_permutation(sim, y, p, torch.ones(T, dtype=torch.bool), k=1, permutations=499)
    assert out["rate"] == 1.0 and out["p_value"] < 0.05


def test_feature_similarity_is_the_cosine_of_class_means():
    f = torch.tensor([[1.0, 0], [1.0, 0], [0, 2.0], [1.0, 1.0]])
    s = nm.feature_similarity(f, torch.tensor([0, 0, 1, 2]), 3)
    assert torch.allclose(s, torch.tensor([[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]],
                                          dtype=torch.float64), atol=1e-12)


def test_branch_link_null_keeps_main_effects():
    """Shares and contributions with branch main effects (strong branches keep more and contribute more) and
    class main effects but no interaction: the old null rejects, the interaction test's p is about uniform."""
    rng = np.random.default_rng(1)
    M, T = 8, 10
    old, new = [], []
    for rep in range(30):
        strength = rng.random(M)
        share = strength[None, :] + 0.3 * rng.random(T)[:, None] + 0.05 * rng.standard_normal((T, M))  # [T, M]
        contribution = strength[:, None] + 0.3 * rng.random(T)[None, :] + 0.05 * rng.standard_normal((M, T))
        link = nm.branch_link(share, contribution, np.ones(T, bool), permutations=99, seed=rep)
        old.append(link["permutation_p"])
        new.append(link["interaction_p"])
    old, new = np.array(old), np.array(new)
    assert (old < 0.05).mean() > 0.8
    assert (new < 0.05).mean() < 0.2 and 0.3 < new.mean() < 0.7


def test_branch_link_interaction_detects_a_class_specific_link():
    rng = np.random.default_rng(2)
    M, T = 8, 10
    expert = rng.integers(0, M, T)
    share = 0.05 * rng.random((T, M))
    share[np.arange(T), expert] += 1
    contribution = 0.05 * rng.random((M, T))
    contribution[expert, np.arange(T)] += 1
    link = nm.branch_link(share, contribution, np.ones(T, bool), permutations=199)
    assert link["interaction_pearson"] > 0.8 and link["interaction_p"] < 0.05
