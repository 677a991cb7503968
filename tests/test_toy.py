"""The toy studies (Sec. 4.1): engines agree, gradient descent is Eq. (5)-(6), the sweep writes its outputs."""

import json

import numpy as np
import pytest
import torch

from branchspec import Branched
from branchspec.data.toy import TOY1, TOY2, make_toyset
from branchspec.nets.perceptron import Perceptron
from branchspec.studies.toy import ToyDynamicsConfig, ToySweepConfig, run_dynamics, run_sweep, sweep_metrics
from branchspec.train.toy import ToyTraining, gd_torch, initial_weights, responses, train_per_m, train_toy

SHORT = ToyTraining(steps=400)


def test_engines_agree_on_the_same_initial_weights():
    kw = dict(trials=37, cfg=SHORT, seed=3)  # 37: not a multiple of the numba block
    numba = train_toy(TOY2, [2, 5], engine="numba", **kw)
    padded = train_toy(TOY2, [2, 5], engine="torch", **kw)
    per_m = train_per_m(TOY2, [2, 5], **kw)
    for m in (2, 5):
        for a, b, c in zip(numba[m], padded[m], per_m[m]):
            assert a.shape == (37, m)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)  # numba reassociates sums (fastmath)
            np.testing.assert_allclose(b, c, rtol=1e-12, atol=1e-12)


def test_progress_counts_the_real_branch_trials():
    """The bar's total is reached exactly: the padding of the last block of trials is not counted as work."""
    seen = []
    train_toy(TOY2, [2, 5], trials=37, cfg=SHORT, seed=3, engine="numba", progress=seen.append)
    assert sum(seen) == 37 * (2 + 5)


def test_one_step_is_gradient_descent_on_the_branched_perceptron_model():
    cfg = ToyTraining(steps=1, lr=0.05, slope=0.2)
    w0, b0 = initial_weights(4, 1, 1.0, seed=0)
    w1, b1, _, _ = gd_torch(torch.from_numpy(w0), torch.from_numpy(b0), torch.ones(1, 4), torch.tensor(TOY1.x),
                            torch.tensor(TOY1.y), cfg)
    model = Branched(lambda: Perceptron(slope=0.2), 4).double()
    with torch.no_grad():
        for branch, w, b in zip(model.branches, w0[0], b0[0]):
            branch.w.fill_(w)
            branch.b.fill_(b)
    x, y = torch.tensor(TOY1.x), torch.tensor(TOY1.y)
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    for k, branch in enumerate(model.branches):
        assert (branch.w - 0.05 * branch.w.grad).item() == pytest.approx(float(w1[0, k]), abs=1e-12)
        assert (branch.b - 0.05 * branch.b.grad).item() == pytest.approx(float(b1[0, k]), abs=1e-12)


def test_training_reduces_the_loss():
    w0, b0 = initial_weights(6, 50, 1.0, seed=0)
    (w, b), = train_toy(TOY1, [6], 50, ToyTraining(steps=2000), seed=0).values()
    loss = lambda w, b: ((responses(w, b, TOY1.x, 0.01).sum(1) - TOY1.y) ** 2).sum(-1)  # noqa: E731
    assert np.median(loss(w, b)) < 1e-3 * np.median(loss(w0, b0))


def test_sweep_metrics_on_known_responses():
    y = np.array([1.0, 0.5])
    F = np.array([[[1.0, 0.5], [0.0, 0.0], [0.01, 0.0]]])  # one trial: one active branch, two silent
    m = sweep_metrics(F + np.array([[[0, 0], [0, 0], [-0.01, 0]]]), F, y)
    assert m["success_rate"] == 1.0 and m["mean_active"] == 1.0 and m["mean_silent"] == 2.0


def test_sweep_writes_metrics_figures_and_report(tmp_path):
    cfg = ToySweepConfig(branches=[2, 3, 10, 20], trials=48, training=ToyTraining(steps=1500), covariance_examples=4)
    metrics = run_sweep(cfg, tmp_path, show_progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["success_rate"]) == {"2", "3", "10", "20"} and set(saved["mean_active"]) == set(saved["success_rate"])
    assert metrics["success_rate"]["10"] >= metrics["success_rate"]["2"]
    assert metrics["mean_silent"]["20"] > metrics["mean_silent"]["3"]
    for name in ("fig3_success_rate", "fig3_covariance_examples", "fig4_active_silent", "fig4_responses_m20"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in html and "success_rate" in html


def test_dynamics_records_every_branch_on_every_point(tmp_path):
    cfg = ToyDynamicsConfig(examples=3, training=ToyTraining(steps=1500), record_every=250, pool=20)
    metrics = run_dynamics(cfg, tmp_path)
    data = np.load(tmp_path / "dynamics.npz")
    assert data["responses"].shape == (7, 3, 2, 4) and list(data["steps"]) == [0, 250, 500, 750, 1000, 1250, 1500]
    assert np.asarray(metrics["final_responses"]).shape == (3, 2, 4)
    solved = metrics["success"]
    assert 0 < metrics["pool_success_rate"] < 1
    assert list(solved) == sorted(solved, reverse=True)  # solved trials are shown first
    assert (tmp_path / "figures" / "fig2_dynamics.png").is_file()


@pytest.mark.parametrize("x, y, match", [([], [], "empty"), ([1, 2], [1], "one y per x"),
                                         ([1, float("nan")], [1, 2], "non-finite")])
def test_bad_toy_sets_are_explained(x, y, match):
    from branchspec import BranchspecError

    with pytest.raises(BranchspecError, match=match):
        make_toyset(x, y)
