"""Parts of models users have: attention heads, grouped-convolution groups, experts, and the paper's branches.

Each model is tiny and trained here. In each, the parts (plus the rest) sum to the site's output to 1e-6, and
every analysis runs on them the same way.
"""

import pytest
import torch
from torch import nn

from branchspec.analysis import parts as analyses
from branchspec.errors import BranchspecError
from branchspec.nets.resnet import branched_resnet
from branchspec.nets.transformer import TinyTransformer, marker_task
from branchspec.parts import AttentionHeads, BranchedParts, LinearInputGroups, parts_of, register


def site_output(model, name, x):
    seen = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    out = seen["out"]
    return out[0] if isinstance(out, tuple) else out


def trained(model, make_batch, steps=60, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = make_batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = trained(TinyTransformer(d_model=16, heads=4), lambda s: marker_task(64, seed=s), steps=60)
    return model.double(), *(t for t in marker_task(96, seed=-1))


def test_attention_heads_sum_to_the_attention_output(transformer):
    model, x, y = transformer
    parts = parts_of(model, "blocks.0.attention")
    assert isinstance(parts, AttentionHeads) and parts.num_parts == 4
    out = parts.parts(x)
    assert out.parts.shape == (4, 96, 8, 16)
    torch.testing.assert_close(out.site_output, site_output(model, "blocks.0.attention", x), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(parts.run(x), model(x), atol=1e-6, rtol=0)  # all heads kept: the model itself
        assert not torch.allclose(parts.run(x, subset=[0, 1]), model(x))


def test_heads_analyses_run_and_agree_with_their_definitions(transformer):
    model, x, y = transformer
    parts = parts_of(model, "blocks.1.attention")
    act = analyses.activity(parts, x)
    assert len(act.norms) == 4 and act.num_active + act.num_silent == 4 and "silent" in act.finding
    corr = analyses.correlation(parts, x)
    assert len(corr.correlation) == 4 and 0 <= corr.mean_abs_correlation <= 1
    abl = analyses.ablation(parts, x, y)
    assert abl.metric == "accuracy" and len(abl.without) == 4 and abl.drop[0] == pytest.approx(abl.full - abl.without[0])
    imp = analyses.importance(parts, x, y)
    assert len(imp.importance) == 4 and max(imp.normalized) == 1.0
    # Michel et al.'s importance is |∂L/∂ξ_h| per input: check one head against a finite difference, per input
    eps, h = 1e-6, 2
    scale = torch.ones(len(x), 4, dtype=torch.float64)
    up, down = scale.clone(), scale.clone()
    up[:, h] += eps
    down[:, h] -= eps
    with torch.no_grad():
        loss = nn.functional.cross_entropy
        fd = (torch.stack([loss(parts.run(x[i:i + 1], scale=up[i:i + 1]), y[i:i + 1]) for i in range(len(x))]) -
              torch.stack([loss(parts.run(x[i:i + 1], scale=down[i:i + 1]), y[i:i + 1]) for i in range(len(x))])) / (2 * eps)
    assert imp.importance[h] == pytest.approx(float(fd.abs().mean()), rel=1e-5)
    assert act.to_dict()["num_active"] == act.num_active and isinstance(corr.to_dict()["correlation"], list)
    assert act.figure() is not None and abl.figure() is not None


def test_head_parameter_groups_and_their_hessian_blocks(transformer):
    model, x, y = transformer
    parts = parts_of(model, "blocks.1.attention")
    groups = [parts.part_parameters(k) for k in range(4)]
    sizes = [sum(p[i].numel() for p, i in g) for g in groups]
    assert sizes == [4 * 16 * 4 + 3 * 4] * 4  # W_Q, W_K, W_V rows (3·4·16), their biases (3·4), W_O columns (16·4)
    H = analyses.hessian_blocks(parts, x[:32], y[:32], max_parameters=2000)
    assert H.block_sizes == sizes and 0 < H.block_mass_ratio <= 1 and len(H.coupling) == 4
    with pytest.raises(BranchspecError, match="at most"):
        analyses.hessian_blocks(parts, x, y, max_parameters=10)


class ResNeXtish(nn.Module):
    """conv → BN → ReLU → grouped 3×3 conv (4 groups) → BN → ReLU → 1×1 conv → pool → linear: F = Σ_g T_g."""

    def __init__(self, groups=4, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, groups * width, 3, padding=1), nn.BatchNorm2d(groups * width), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(groups * width, groups * width, 3, padding=1, groups=groups),
                                     nn.BatchNorm2d(groups * width), nn.ReLU())
        self.merge = nn.Conv2d(groups * width, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.merge(self.grouped(self.stem(x))).mean((2, 3)))


def test_grouped_convolution_groups_on_digits():
    from branchspec.data.images import load_images
    from branchspec.train.classify import normalize

    data = load_images("digits", "train")
    x = normalize(data.images[:512], [0.2] * 3, [0.3] * 3)
    y = data.labels[:512]
    torch.manual_seed(0)
    model = trained(ResNeXtish(), lambda s: (x[(s * 64) % 512:(s * 64) % 512 + 64], y[(s * 64) % 512:(s * 64) % 512 + 64]),
                    steps=40)
    parts = parts_of(model, "merge", groups=4)
    assert isinstance(parts, LinearInputGroups) and parts.num_parts == 4
    out = parts.parts(x[:50])
    torch.testing.assert_close(out.site_output, site_output(model, "merge", x[:50]), atol=1e-5, rtol=1e-5)
    abl = analyses.ablation(parts, x[:200], y[:200])
    assert abl.full > 0.3 and len(abl.alone) == 4
    assert analyses.activity(parts, x[:200]).num_active >= 1
    with pytest.raises(BranchspecError, match="input groups"):
        parts_of(model, "merge")


class MoE(nn.Module):
    """y = Σ_e softmax(gate(x))_e · expert_e(x), then a read-out."""

    def __init__(self, experts=4):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(experts))
        self.router = nn.Linear(2, experts)

    def gate(self, x):
        return self.router(x).softmax(-1)

    def forward(self, x):
        g = self.gate(x)
        return sum(g[:, e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class MoEClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = MoE()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.moe(x)))


def test_mixture_of_experts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()  # the quadrant
    torch.manual_seed(0)
    model = trained(MoEClassifier(), lambda s: (x, y), steps=150, lr=1e-2)
    parts = parts_of(model, "moe")
    assert parts.kind == "experts" and parts.num_parts == 4
    torch.testing.assert_close(parts.parts(x).site_output, site_output(model, "moe", x), atol=1e-6, rtol=0)
    assert analyses.ablation(parts, x, y).full > 0.8
    assert len(analyses.importance(parts, x, y).importance) == 4


def test_the_papers_branches_are_parts_too_and_a_custom_adapter_registers():
    model = branched_resnet(3, (2, 2, 2, 2), seed=0).eval()
    x, y = torch.randn(20, 3, 8, 8), torch.randint(0, 10, (20,))
    parts = parts_of(model)
    assert isinstance(parts, BranchedParts) and parts.num_parts == 3
    with torch.no_grad():
        torch.testing.assert_close(parts.parts(x).site_output, model(x))
    contrib = analyses.contribution(parts, x, y)
    assert len(contrib.matrix) == 3 and len(contrib.matrix[0]) == 10
    assert len(parts.part_parameters(1)) == len(list(model.branches[1].parameters()))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class PairParts(LinearInputGroups.__mro__[1]):  # a user's adapter on the Parts base class
        kind = "pair"

        def split(self, args, kwargs, output):
            return torch.stack([self.site.a(args[0]), self.site.b(args[0])]), None

        def part_parameters(self, k):
            return [(p, ()) for p in (self.site.a if k == 0 else self.site.b).parameters()]

    register(Pair, lambda model, site, name: PairParts(model, site, 2, name))
    net = nn.Sequential(Pair(), nn.ReLU())
    pp = parts_of(net, "0")
    assert pp.kind == "pair"
    with torch.no_grad():
        torch.testing.assert_close(pp.parts(torch.ones(1, 3)).site_output, net[0](torch.ones(1, 3)))


def test_bad_sites_get_one_sentence():
    model = TinyTransformer()
    with pytest.raises(BranchspecError, match="no module 'blocks.7.attention'; similar names"):
        parts_of(model, "blocks.7.attention")
    with pytest.raises(BranchspecError, match="not a branched one"):
        parts_of(model)
    with pytest.raises(BranchspecError, match="no parts adapter"):
        parts_of(model, "norm")


def test_the_parts_command_on_a_users_transformer(tmp_path, capsys):
    from branchspec.cli import main

    (tmp_path / "net.py").write_text("from branchspec.nets.transformer import TinyTransformer\n\n"
                                     "def make():\n    return TinyTransformer(d_model=16, heads=4)\n")
    torch.manual_seed(0)
    model = TinyTransformer(d_model=16, heads=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x, y = marker_task(64, seed=1)
    torch.save({"x": x, "y": y}, tmp_path / "seqs.pt")
    out = tmp_path / "run"
    assert main(["parts", "--model", f"{tmp_path}/net.py:make", "--weights", str(tmp_path / "w.pt"), "--data",
                 str(tmp_path / "seqs.pt"), "--at", "blocks.0.attention,blocks.1.attention", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attention: 4 attention heads;" in printed and "silent by the paper's 10% rule" in printed
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    site = metrics["sites"]["blocks.1.attention"]
    assert site["activity"]["num_active"] + site["activity"]["num_silent"] == 4
    assert set(site["agreement"]) == {"activity_vs_importance", "activity_vs_ablation_drop",
                                      "importance_vs_ablation_drop"}
    assert (out / "report.html").is_file() and (out / "figures" / "blocks_1_attention_ablation.png").is_file()
    assert main(["parts", "--model", f"{tmp_path}/net.py:make", "--data", str(tmp_path / "seqs.pt"), "--at",
                 "blocks.9.attention", "--out", str(out)]) == 2
    assert "no module 'blocks.9.attention'" in capsys.readouterr().err
