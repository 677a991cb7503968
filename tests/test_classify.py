"""The classification study: the paper's loss, training, exact resume, the loading API, the analyses, the CLI."""

import dataclasses
import math

import numpy as np

import pytest
import torch
from safetensors.torch import load_file
import yaml

import branchspec.train.lightning as lightning_setup
from branchspec.analysis import classify as ac
from branchspec.branched import unchanged_buffers
from branchspec.cli import main
from branchspec.errors import BranchspecError
from branchspec.losses import get_loss, soft_targets
from branchspec.nets.resnet import branched_resnet
from branchspec.studies.classify import ClassifyConfig, load_classifier, load_split, run_analyze, run_train
from branchspec.train.classify import Recipe, augment

TINY = ClassifyConfig(data="digits", branches=3, widths=[2, 2, 2, 2], limit_per_class=8, test_limit_per_class=4,
                      recipe=Recipe(epochs=2, batch_size=16, lr=0.2))  # 80 images: 5 steps per epoch


# ------------------------------------------------------------------------------------------------ the loss
def test_soft_targets_and_loss_constants():
    y = torch.tensor([3, 0])
    t = soft_targets(y, 10)
    assert t[0, 3].item() == pytest.approx(0.45085, abs=1e-5) and t[0, 0].item() == pytest.approx(0.06102, abs=1e-5)
    at_targets = 2.0 * torch.nn.functional.one_hot(y, 10).float() - 1
    for name in ("clamped_ce", "clamped_ce_literal"):
        loss = get_loss(name)
        assert loss(at_targets, y) == pytest.approx([1.89491] * 2, abs=1e-5)  # the minimum: the targets' entropy
        assert loss(3 * at_targets, y) == pytest.approx([1.89491] * 2, abs=1e-5)  # clamped back to ±1
        assert loss(torch.zeros(2, 10), y) == pytest.approx([math.log(10)] * 2, abs=1e-6)
        f = torch.randn(64, 10) * 0.3
        assert (loss(f, torch.randint(0, 10, (64,))) >= 1.89491 - 1e-5).all()


def test_clamp_gradient_is_restoring_outside_the_bounds():
    y = torch.tensor([0])
    f = torch.tensor([[0.5, 3.0, -3.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    g_lit, = torch.autograd.grad(get_loss("clamped_ce_literal")(f, y).sum(), f)
    g_new, = torch.autograd.grad(get_loss("clamped_ce")(f, y).sum(), f)
    assert g_lit[0, 1] == 0 and g_lit[0, 2] == 0  # the literal clamp freezes a wrong class stuck at +1
    assert g_new[0, 1] > 0  # ...the restoring clamp pushes it back down
    assert g_new[0, 2] < 0  # a logit below −1 that the loss wants higher is moved back towards the interval
    torch.testing.assert_close(g_new[0, [0, 3, 4]], g_lit[0, [0, 3, 4]])  # inside the interval: the same gradient
    f = torch.tensor([[-3.0] + [0.0] * 9], requires_grad=True)  # the true class below −1: pushed up, not frozen
    g, = torch.autograd.grad(get_loss("clamped_ce")(f, y).sum(), f)
    assert g[0, 0] < 0


def test_augment_crops_and_flips_per_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    out = augment(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(2)) for o, i in zip(out, x))
    out = augment(x, torch.Generator().manual_seed(1), padding=2, flip=False)
    assert out.shape == x.shape
    assert all(set(o.unique().tolist()) <= set(i.unique().tolist()) | {0.0} for o, i in zip(out, x))


# -------------------------------------------------------------------------------------------- training
def test_training_reduces_the_loss_and_the_api_loads_the_run(tmp_path):
    metrics = run_train(TINY, tmp_path / "run", show_progress=False)
    assert metrics["steps"] == 10 and metrics["parameters_per_branch"] == sum(
        p.numel() for p in branched_resnet(1, [2, 2, 2, 2]).parameters())
    x, y, names = load_split(tmp_path / "run", "train")
    assert x.shape == (80, 3, 8, 8) and names == [str(c) for c in range(10)]
    assert abs(float(x.mean())) < 0.1  # normalized with the training set's statistics
    losses = {}
    for which in ("init", "last"):
        model, config = load_classifier(tmp_path / "run", which)
        assert not model.training and model.execution == "loop" and model.num_branches == 3
        with torch.no_grad(), unchanged_buffers(model.train()):  # batch statistics, as in training
            losses[which] = float(get_loss(config["loss"])(model(x), y).mean())
    assert losses["last"] < losses["init"] - 0.02
    from_ckpt = load_classifier(tmp_path / "run", str(tmp_path / "run/checkpoints/last.ckpt"))[0]  # fused layout
    # the same weights; the running statistics of this 10-step run were recomputed after training (not in last.ckpt)
    assert metrics["batchnorm_recalibrated"]
    assert all(torch.equal(a, b) for (n, a), b in zip(from_ckpt.state_dict().items(), model.state_dict().values())
               if not n.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert (tmp_path / "run/report.html").is_file() and (tmp_path / "run/figures/training.png").is_file()

    with pytest.raises(BranchspecError, match="differs in branches"):
        run_train(dataclasses.replace(TINY, branches=4), tmp_path / "run", show_progress=False)
    other = run_train(dataclasses.replace(TINY, branches=2, recipe=Recipe(epochs=1, batch_size=16)),
                      tmp_path / "other", show_progress=False)
    assert other["steps"] == 5
    with pytest.raises(BranchspecError, match="different configuration"):
        load_classifier(tmp_path / "run", str(tmp_path / "other/checkpoints/weights.safetensors"))
    with pytest.raises(BranchspecError, match="no config.yaml"):
        load_classifier(tmp_path)
    (tmp_path / "config.yaml").write_text("command: toy sweep\n")
    with pytest.raises(BranchspecError, match="not a 'branchspec classify train' run"):
        load_classifier(tmp_path)


def test_resume_after_a_kill_equals_training_straight(tmp_path, monkeypatch):
    """Kill mid-epoch after step 7 (last checkpoint: step 6), resume, and reach the same weights at step 10."""
    cfg = dataclasses.replace(TINY, checkpoint_every=3, execution="loop")
    run_train(cfg, tmp_path / "straight", show_progress=False)

    class Kill(lightning_setup.L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("killed")

    make = lightning_setup.make_trainer
    monkeypatch.setattr(lightning_setup, "make_trainer", lambda run, **kw: make(
        run, **{**kw, "callbacks": [*kw["callbacks"], Kill()]}))
    with pytest.raises(RuntimeError, match="killed"):
        run_train(cfg, tmp_path / "killed", show_progress=False)
    monkeypatch.setattr(lightning_setup, "make_trainer", make)
    assert torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    metrics = run_train(cfg, tmp_path / "killed", show_progress=False)
    assert metrics["steps"] == 10
    straight = load_file(tmp_path / "straight/checkpoints/weights.safetensors")
    resumed = load_file(tmp_path / "killed/checkpoints/weights.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0, msg=name)


# -------------------------------------------------------------------------------------------- analysis
def test_confidence_contribution_and_ablation_are_exact_decompositions():
    torch.manual_seed(0)
    model = branched_resnet(4, [2, 2, 2, 2], num_classes=5, seed=0).eval()
    x, y = torch.randn(30, 3, 8, 8), torch.arange(30) % 5
    V = ac.branch_outputs_in_batches(model, x, batch_size=7)
    f = model(x).detach()
    torch.testing.assert_close(V.sum(0), f, atol=1e-5, rtol=0)
    margin = f.gather(1, y[:, None]).squeeze(1) - (f.sum(1) - f.gather(1, y[:, None]).squeeze(1)) / 4
    torch.testing.assert_close(ac.confidence(V, y).sum(0), margin, atol=1e-5, rtol=0)
    contrib = ac.contribution_matrix(V, y, 5)
    torch.testing.assert_close(contrib.sum(0), torch.stack([margin[y == c].mean() for c in range(5)]), atol=1e-5,
                               rtol=0)
    abl = ac.ablation(V, y)
    for k in range(4):
        others = [j for j in range(4) if j != k]
        assert abl["without"][k] == ac.accuracy(model(x, subset=others), y)
        assert abl["alone"][k] == ac.accuracy(model(x, subset=[k]), y)
    act = ac.activity(torch.cat([V, torch.zeros(1, 30, 5)]))
    assert act["num_silent"] >= 1 and not act["active"][-1] and act["covariance"].shape == (5, 5)
    top = ac.most_confident(ac.confidence(V, y), y, branch=1, cls=2, percent=50)
    assert len(top) == 3 and (y[top] == 2).all()
    conf = ac.confidence(V, y)[1, top]
    assert (conf[:-1] >= conf[1:]).all()


def test_analyze_writes_metrics_figures_and_report(tmp_path):
    run_train(dataclasses.replace(TINY, recipe=Recipe(epochs=1, batch_size=16)), tmp_path, show_progress=False)
    metrics = run_analyze(tmp_path, top_percent=(25.0, 50.0), samples_per_class=2, classes=["3", "5"])
    assert metrics["num_active"] + metrics["num_silent"] == 3
    assert len(metrics["contribution"]) == 3 and len(metrics["contribution"][0]) == 10
    figures = {p.name for p in (tmp_path / "analysis/figures").glob("*.png")}
    assert {"fig5_covariance.png", "fig6_branch_outputs.png", "fig7_confidence.png", "contribution_and_ablation.png",
            "fig8_top25pct.png", "fig16_top50pct.png"} <= figures
    assert "analysis" in (tmp_path / "report.html").read_text()
    with pytest.raises(BranchspecError, match="not in this run"):
        run_analyze(tmp_path, classes=["horse"])


# ------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, message", [
    (("train", "--data", "no/such/folder", "--out", "{tmp}"), "does not exist"),
    (("train", "--loss", "hinge", "--out", "{tmp}"), "unknown loss"),
    (("analyze", "--run", "{tmp}"), "config.yaml"),
    (("analyze", "--run", "{tmp}", "--top-percent", "0,200"), "--top-percent"),
    (("train", "--branches", "12", "--execution", "lanes", "--out", "{tmp}"), "multiple of 8"),
    (("train", "--precision", "16-mixed", "--device", "cpu", "--out", "{tmp}"), "choose one of 32-true"),
])
def test_cli_bad_input_gets_one_line(tmp_path, capsys, args, message):
    assert main(["classify", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_cli_rejects_malformed_widths(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["classify", "train", "--widths", "5,11", "--out", "x"])
    assert exc.value.code == 2 and "--widths" in capsys.readouterr().err


def test_top_branch_share_is_one_over_m_for_equal_branches_and_one_for_an_expert():
    equal = torch.ones(4, 3)
    assert torch.allclose(ac.top_branch_share(equal), torch.full((3,), 0.25))
    expert = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, 3.0]])  # a negative vote does not count as a share
    assert torch.allclose(ac.top_branch_share(expert), torch.tensor([1.0, 0.75]))


def test_a_short_run_recomputes_batchnorm_statistics_and_is_not_at_chance(tmp_path):
    """The issue's case: 6 epochs of 2 steps (digits at the default batch of 512). Running statistics after 12
    steps still lean on their initial values and gave chance accuracy; they are now recomputed."""
    cfg = ClassifyConfig(data="digits", branches=4, widths=[3, 6, 12, 24], recipe=Recipe(epochs=6))
    metrics = run_train(cfg, tmp_path / "run", show_progress=False)
    assert metrics["steps"] == 12 and metrics["batchnorm_recalibrated"] is True
    assert metrics["test_accuracy"] > 0.3  # chance: 0.1
    model = load_classifier(tmp_path / "run")[0]
    x, _, _ = load_split(tmp_path / "run", "train")
    first = model.branches[0]
    with torch.no_grad():
        stem = first.conv1(x)
    torch.testing.assert_close(first.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-3, rtol=0)  # batch means


def test_experts_per_class_counts_the_branches_that_share_a_class():
    contribution = torch.tensor([[1.0, 0.0, 0.5], [0.05, 2.0, 0.5], [0.0, 0.0, 0.0]])  # branch 2 silent everywhere
    out = ac.experts_per_class(contribution)
    assert out["branches_per_class"] == [1, 1, 2] and out["mean_branches_per_class"] == pytest.approx(4 / 3)
    assert out["silent_class_share"][:2] == pytest.approx([1 / 3, 1 / 3]) and math.isnan(out["silent_class_share"][2])
    assert out["mean_silent_class_share"] == pytest.approx(1 / 3)


def test_a_total_weight_decay_is_reached_and_the_preset_fills_only_the_defaults(tmp_path):
    """``total_decay`` solves the weight decay for Σ lr·wd over the run's steps (the measured metric equals it); the
    named recipe sets the options left at their defaults, and a decay given both ways is a one-line error."""
    from branchspec.cli import build_parser, classify

    cfg = dataclasses.replace(TINY, recipe=dataclasses.replace(TINY.recipe, schedule="cosine", total_decay=0.5))
    metrics = run_train(cfg, tmp_path / "run", show_progress=False)
    assert metrics["total_weight_decay"] == pytest.approx(0.5, rel=1e-4)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["recipe"]
    assert written["total_decay"] == 0.5 and written["weight_decay"] > 0
    assert run_train(cfg, tmp_path / "run", show_progress=False)["steps"] == metrics["steps"]  # resumes as the same run

    def recipe(*argv):
        return classify._config(build_parser().parse_args(["classify", "train", "--out", "x", *argv]), 16).recipe

    assert recipe("--recipe", "paper-long") == Recipe(epochs=150, batch_size=128, lr=0.05, schedule="cosine",
                                                      total_decay=2.0)
    assert recipe("--recipe", "paper-long", "--epochs", "5", "--weight-decay", "0.01").epochs == 5
    assert recipe("--recipe", "paper-long", "--weight-decay", "0.01").total_decay is None
    with pytest.raises(BranchspecError, match="not both"):
        recipe("--weight-decay", "0.01", "--total-weight-decay", "2")


def test_an_image_folder_without_a_test_split(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ants", "bees"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"photos/{c}/{i}.png")
    cfg = dataclasses.replace(TINY, data=str(tmp_path / "photos"), size=8, limit_per_class=None,
                              test_limit_per_class=None)
    run_train(cfg, tmp_path / "run", show_progress=False)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["classes"] == ["ants", "bees"] and (config["train_images"], config["test_images"]) == (18, 2)
    assert "10% of each class held out as the test split (seed 0)" in config["test_split"]
