"""NAD metrics (analysis/nad_metrics.py): mosaics and hit rate, IoU, misclassification, the branch link."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from branchspec.analysis import nad
from branchspec.analysis import nad_metrics as nm
from branchspec.errors import BranchspecError


class ChannelPerClass(nn.Module):
    """A 'network' whose gated layer is its input: channel c is lit on images of class c."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(classes, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def lit_images(classes: int = 5, per_class: int = 3, size: int = 8):
    x = torch.zeros(classes * per_class, classes, size, size)
    y = torch.arange(classes).repeat_interleave(per_class)
    x[torch.arange(len(y)), y] = 1.0 + torch.rand(len(y), size, size)
    return x, y


# ------------------------------------------------------------------------------------------------- mosaics
def test_mosaic_tiles_sit_in_their_quadrants():
    x, y = lit_images()
    mosaics, tiles, picks = nm.make_mosaics(x, y, range(5), count=20, seed=1)
    assert mosaics.shape == (20, 5, 16, 16)
    assert all(len(set(row.tolist())) == 4 for row in tiles)  # four different classes
    assert torch.equal(y[picks], tiles)
    k = 7
    for q, (r, c) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        assert torch.equal(mosaics[k, :, r:r + 8, c:c + 8], x[picks[k, q]])
    again = nm.make_mosaics(x, y, range(5), count=20, seed=1)
    assert torch.equal(again[0], mosaics)
    with pytest.raises(BranchspecError, match="4 searched classes"):
        nm.make_mosaics(x, y, [0, 1, 2], count=2)


def test_salient_pixels_take_the_top_share_and_a_flat_map_spreads_evenly():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 5.0  # one hot cell in the top-left
    maps[1] = torch.arange(16.0).view(4, 4)  # a ramp: the top rows are the smallest
    chosen = nm.salient_pixels(maps, 16, mask_rate=0.1)  # maps[2] is flat (an all-zero layer)
    assert chosen.shape == (3, 16, 16)
    assert chosen[0].sum() > 0 and chosen[0, 8:, :].sum() == 0 and chosen[0, :, 8:].sum() == 0
    assert chosen[1].sum() <= int(0.1 * 256) and chosen[1, :12].sum() == 0  # the largest values: bottom rows
    assert chosen[2].all()
    share = nm.quadrant_share(chosen, torch.tensor([0, 3, 1]))
    assert share[0] == 1.0 and share[1] > 0.5 and share[2] == 0.25


def test_hit_rate_is_one_for_a_sub_architecture_on_its_own_tile_and_chance_for_an_empty_one():
    x, y = lit_images()
    model = ChannelPerClass().eval()
    layers = nad.find_layers(model, x, ["features"])
    mosaics, tiles, _ = nm.make_mosaics(x, y, range(5), count=10, seed=0)
    own = [torch.eye(5) * 2 - 1]  # class c keeps channel c only
    every = [torch.ones(5, 5)]
    empty = [-torch.ones(5, 5)]  # an all-zero layer mask
    assert torch.all(nm.hit_rates(model, layers, own, mosaics, tiles) == 1.0)
    spread = nm.hit_rates(model, layers, every, mosaics, tiles)
    assert abs(float(spread.mean()) - 0.25) < 0.1
    flat = nm.hit_rates(model, layers, empty, mosaics, tiles, batch_size=7)
    assert torch.all(flat == 0.25) and not torch.isnan(flat).any()
    summary = nm.hit_rate_summary(torch.cat([nm.hit_rates(model, layers, own, mosaics, tiles), flat], -1),
                                  ["own", "empty"])
    assert summary["mean"] == {"own": 1.0, "empty": 0.25} and summary["std"]["own"] == 0.0
    assert summary["best_layer"] == "own" and summary["mosaics"] == 10 and summary["chance"] == 0.25


# ------------------------------------------------------------------------------------------------ IoU
def test_iou_per_layer_and_the_empty_cases():
    a = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    per_layer = nm.iou([a, b])
    assert per_layer.shape == (2, 4, 4)
    assert per_layer[0, 0, 1] == pytest.approx(1 / 3) and per_layer[0, 0, 0] == 1
    assert per_layer[0, 2, 3] == 1.0  # two empty masks: equal sets
    assert per_layer[0, 0, 2] == 0.0  # empty against non-empty
    assert per_layer[1, 0, 1] == 1.0 and per_layer[1, 2, 3] == 0.0
    sim = nm.similarity([a, b])
    assert sim[0, 1] == pytest.approx((1 / 3 + 1) / 2) and torch.isfinite(sim).all()
    assert torch.equal(sim, sim.T)


# ------------------------------------------------------------------------------------- misclassification
def test_misclassification_rate_against_chance():
    T = 5
    sim = torch.eye(T).double()
    for i in range(T):  # class i's nearest is i+1, then i+2, ...
        for d in range(1, T):
            sim[i, (i + d) % T] = 1 - d / 10
    labels = torch.tensor([1, 2, 3, 4, 0, 0, 1])
    predictions = torch.tensor([0, 1, 2, 3, 4, 0, 1])  # 5 errors: the truth is always the predicted's nearest
    searched = torch.ones(T, dtype=torch.bool)
    out = nm.misclassification(sim, labels, predictions, searched, k=1)
    assert out["errors"] == 5 and out["errors_used"] == 5
    assert out["rate"] == 1.0 and out["chance"] == 0.25 and out["p_value"] < 0.01
    assert out["by_k"][2] == {"rate": 1.0, "chance": 0.5} and out["by_k"][4]["rate"] == 1.0
    ties = nm.misclassification(torch.ones(T, T), labels, predictions, searched, k=3)
    assert ties["rate"] == pytest.approx(0.75) and ties["chance"] == 0.75  # all equal: exactly chance
    partial = searched.clone()
    partial[0] = False  # errors that involve class 0 are left out
    out = nm.misclassification(sim, labels, predictions, partial, k=1)
    assert out["errors_used"] == 3 and out["searched_classes"] == 4 and out["chance"] == pytest.approx(1 / 3)
    none = nm.misclassification(sim, labels, labels, searched)
    assert none["rate"] is None and none["errors"] == 0


# --------------------------------------------------------------------------------------------- branch link
def test_branch_shares_follow_the_channel_layout():
    layer = nad.GateLayer("layer1.0", ("layer1.0",), (6,), branches=3)  # 2 channels per branch
    masks = [torch.tensor([[1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)]
    counts = nm.branch_counts(masks, [layer])
    assert counts.tolist() == [[[2, 0, 1], [0, 0, 0]]]
    share = nm.shares(counts.sum(0))
    assert np.allclose(share, [[2 / 3, 0, 1 / 3], [0, 0, 0]])  # a class that keeps nothing: zeros, no NaN


def test_branch_link_correlation_and_permutation_test():
    rng = np.random.default_rng(0)
    M, T = 6, 8
    contribution = rng.normal(size=(M, T))
    share = nm.shares(np.exp(contribution.T))  # monotone in the contribution
    link = nm.branch_link(share, contribution, np.ones(T, bool), active=np.array([1, 1, 1, 0, 0, 0], bool),
                          permutations=200)
    assert link["pearson"] > 0.7 and link["spearman"] > 0.7 and link["per_class_pearson_mean"] > 0.7
    assert link["permutation_p"] < 0.02 and link["classes"] == T
    assert link["share_expected_if_uniform"] == 0.5 and 0 <= link["share_in_active"] <= 1
    noise = nm.branch_link(nm.shares(rng.uniform(size=(T, M))), contribution, np.ones(T, bool), permutations=200)
    assert abs(noise["pearson"]) < 0.5 and noise["permutation_p"] > 0.02
    flat = nm.branch_link(np.full((T, M), 1 / M), contribution, np.ones(T, bool), permutations=10)
    assert math.isnan(flat["pearson"]) and flat["permutation_p"] is None  # undefined, reported as such


def test_detection_matrix_tells_a_selective_sub_architecture_from_a_collapsed_one():
    x, y = lit_images(per_class=4)
    model = ChannelPerClass().eval()
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(5))
        model.head.bias.copy_(torch.tensor([0, 0.1, 0, 0, 0]))  # features gated to zero: class 1 (not tested)
    layers = nad.find_layers(model, x, ["features"])
    own = [torch.eye(5) * 2 - 1]  # class c keeps channel c: answers c on class-c images only
    D = nm.detection(model, layers, own, x, y, [0, 2, 4], 5)
    assert D.shape == (3, 5) and D[0, 0] == 1 and D[1, 2] == 1 and D[2, 4] == 1
    assert D.sum() == 3  # no false positive
    collapsed = [torch.eye(5) * 2 - 1]
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))  # class 0's logit wins whatever the input
    assert torch.all(nm.detection(model, layers, collapsed, x, y, [0], 5) == 1)


def test_class_recall():
    labels = torch.tensor([0, 0, 1, 1, 1])
    predictions = torch.tensor([0, 1, 1, 1, 0])
    assert nm.class_recall(predictions, labels, 3).tolist() == [0.5, 2 / 3, 0.0]
