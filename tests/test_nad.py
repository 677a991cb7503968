"""NAD search (analysis/nad.py): gates through hooks, the loss, the step, the vectorized search, resume, masks."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nad_helpers as H
from nad_helpers import single_thread  # noqa: F401 - autouse fixture
from branchspec.analysis import nad
from branchspec.errors import BranchspecError
from branchspec.nets.resnet import branched_resnet
from branchspec.runs import load_user_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained torchvision-style ResNet (through the user-model loader), its data and its layers."""
    path = H.write_model(tmp_path_factory.mktemp("model"))
    model = load_user_model(f"{path}:make", None)
    u8, y = H.images(24, seed=0)
    x = H.normalize(u8)
    with H.one_thread():
        H.train(model, x, y, steps=80)
    return model, x, y, nad.find_layers(model, x)


def settings(**kw):
    base = dict(steps=6, batch_size=4, crop_padding=1, flip=True, seed=3)
    return nad.SearchSettings(**{**base, **kw})


def some_wrong_labels(model, x, y):
    """Labels of which roughly half disagree with the model, so K is a strict subset of each batch."""
    pred = model(x).argmax(1)
    y = y.clone()
    y[::2] = pred[::2]
    y[1::2] = (pred[1::2] + 1) % 4
    return y


# ---------------------------------------------------------------------------------------------- layers
def test_default_layers_are_the_residual_blocks(trained):
    model, x, _, layers = trained
    assert [layer.name for layer in layers] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert [layer.channels for layer in layers] == [6, 6, 12, 12]
    assert all(layer.branches == 1 and layer.modules == (layer.name,) for layer in layers)
    chosen = nad.find_layers(model, x, ["bn1", "layer2.1.bn2"])
    assert [layer.channels for layer in chosen] == [6, 12]


def test_branched_layer_is_the_same_block_in_every_branch():
    model = branched_resnet(3, (2, 3, 4, 5), num_classes=4, seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    layers = nad.find_layers(model, x)
    assert [layer.name for layer in layers] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert layers[0].modules == ("branches.0.layer1.0", "branches.1.layer1.0", "branches.2.layer1.0")
    assert layers[-1].widths == (5, 5, 5) and layers[-1].branches == 3 and layers[-1].channels == 15
    assert layers[-1].branch_of_channel().tolist() == [0] * 5 + [1] * 5 + [2] * 5
    fused = nad.gated_execution(model)
    flayers = nad.find_layers(fused, x)
    assert [(f.name, f.channels, f.branches) for f in flayers] == [(g.name, g.channels, g.branches) for g in layers]


def test_bad_layer_names_and_models_without_blocks(trained):
    model, x, _, _ = trained
    with pytest.raises(BranchspecError, match="no module"):
        nad.find_layers(model, x, ["layer9.0"])
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    with pytest.raises(BranchspecError, match="`layers`"):  # the parameter; the CLI says --layers
        nad.find_layers(plain, x)
    assert [layer.channels for layer in nad.find_layers(plain, x, ["1"])] == [4]


# ----------------------------------------------------------------------------------------------- gates
def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_gates_of_one_change_nothing_and_leave_no_trace(trained):
    model, x, _, layers = trained
    with torch.no_grad():
        ref = model(x)
        with nad.Gates(model, layers) as gates:
            z, acts = gates.run(x)
            ones, _ = gates.run(x, [torch.ones(1, layer.channels) for layer in layers])
    assert torch.equal(z, ref) and torch.allclose(ones, ref, atol=1e-6)
    assert [a.shape[1] for a in acts] == [6, 6, 12, 12]
    assert no_hooks(model) and torch.equal(model(x), ref)


def test_a_gate_scales_its_channels_like_editing_the_output(trained):
    """Gate = sigmoid(m) · activation, per channel: the same as a hand-written hook that scales the output."""
    model, x, _, layers = trained
    g = torch.sigmoid(torch.randn(1, 12))
    handle = model.layer2.get_submodule("0").register_forward_hook(lambda m, i, o: o * g.view(1, 12, 1, 1))
    with torch.no_grad():
        expected = model(x)
        handle.remove()
        values = [None, None, g, None]
        with nad.Gates(model, layers) as gates:
            _, raw = gates.run(x)
            z, acts = gates.run(x, values)
    assert torch.allclose(z, expected, atol=1e-6)
    assert torch.allclose(acts[2], raw[2] * g.view(1, 12, 1, 1), atol=1e-6)
    assert torch.equal(acts[0], raw[0])  # upstream layers are untouched


def test_per_sample_gates_equal_separate_runs(trained):
    model, x, _, layers = trained
    a = [torch.rand(1, layer.channels) for layer in layers]
    b = [torch.rand(1, layer.channels) for layer in layers]
    with torch.no_grad(), nad.Gates(model, layers) as gates:
        za, _ = gates.run(x[:3], a)
        zb, _ = gates.run(x[3:6], b)
        zab, _ = gates.run(x[:6], [torch.cat([u.expand(3, -1), v.expand(3, -1)]) for u, v in zip(a, b)])
    assert torch.allclose(zab, torch.cat([za, zb]), atol=1e-5)


def test_fused_and_loop_branched_models_gate_alike():
    model = branched_resnet(3, (2, 3, 4, 5), num_classes=4, seed=0).eval()
    model.execution = "vmap"
    x = torch.randn(6, 3, 8, 8)
    layers = nad.find_layers(model, x)
    fused = nad.gated_execution(model)
    values = [torch.rand(6, layer.channels) for layer in layers]
    with torch.no_grad():
        with nad.Gates(model, layers) as gates:
            z_loop, a_loop = gates.run(x, values)
        with nad.Gates(fused, nad.find_layers(fused, x)) as gates:
            z_fused, a_fused = gates.run(x, values)
    assert torch.allclose(z_loop, z_fused, atol=1e-5)
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a_loop, a_fused))
    assert model.execution == "vmap" and no_hooks(model)
    assert nad.gated_execution(model, "loop") is model
    with pytest.raises(BranchspecError, match="SlimResNet18"):
        nad.gated_execution(torch.nn.Linear(2, 2), "fused")


# ------------------------------------------------------------------------------------------- the loss
def test_loss_is_the_papers_formula_for_every_task(trained):
    """The vectorized loss equals, task by task, [CE + Σ_l MSE over correct images] / L + β Σ_l mean σ² / L."""
    model, x, y, layers = trained
    y = some_wrong_labels(model, x, y)
    T, B, beta = 3, 5, 0.3
    xs = x[: T * B]
    ys = y[: T * B]
    logits = [torch.randn(T, layer.channels) for layer in layers]
    with nad.Gates(model, layers) as gates:
        loss, terms, has_correct = nad.nad_loss(gates, xs, ys, logits, beta)
        for t in range(T):
            xt, yt = xs[t * B:(t + 1) * B], ys[t * B:(t + 1) * B]
            with torch.no_grad():
                z0, a0 = gates.run(xt)
            z, a = gates.run(xt, [torch.sigmoid(m[t:t + 1]) for m in logits])
            keep = z0.argmax(1) == yt
            mse = sum(F.mse_loss(u[keep], v[keep]) for u, v in zip(a, a0)) if keep.any() else 0.0
            sparsity = sum(torch.sigmoid(m[t]).pow(2).mean() for m in logits)
            L = len(layers)
            expected = (F.cross_entropy(z, yt) + mse) / L + beta * sparsity / L
            assert torch.allclose(loss[t], expected, atol=1e-5)
            assert bool(has_correct[t]) == bool(keep.any())
    assert terms.shape == (T, 3) and not terms.requires_grad


def test_normalized_step_moves_each_layer_by_lr_and_skips_tasks():
    logits = [torch.zeros(3, 4), torch.zeros(3, 2)]
    grads = [torch.tensor([[3.0, 4, 0, 0], [1, 1, 1, 1], [5, 0, 0, 0]]), torch.tensor([[0.0, 0], [2, 0], [1, 1]])]
    nad.normalized_step(logits, grads, 0.1, torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(logits[0][0], torch.tensor([-0.06, -0.08, 0, 0]))
    assert torch.allclose(logits[0][1].norm(), torch.tensor(0.1))
    assert torch.allclose(logits[1][1].norm(), torch.tensor(0.1))
    assert torch.equal(logits[1][0], torch.zeros(2))  # zero gradient: no move, no NaN
    assert torch.equal(logits[0][2], torch.zeros(4)) and torch.equal(logits[1][2], torch.zeros(2))  # skipped task


# ------------------------------------------------------------------------------------------ the search
def test_search_finds_sub_architectures_that_still_classify(trained):
    model, x, y, layers = trained
    sub = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(steps=24, batch_size=8),
                     show_progress=False)
    assert sub.searched.all() and sub.info["classes_without_correct"] == []
    for cls, rows in sub.info["history"].items():
        h = np.asarray(rows)
        assert h[-1, 1] < h[0, 1], cls  # the loss came down
    kept = sub.kept()
    assert (kept > 0).all() and (kept < [layer.channels for layer in layers]).any()  # sparse, not empty
    with nad.Gates(model, layers) as gates:
        pred = nad.predict(model, x, gates=gates, values=nad.gate_values(sub.logits, y, binary=True))
    assert (pred == y).float().mean() > 0.9


def test_all_classes_at_once_equal_one_class_at_a_time(trained):
    model, x, y, layers = trained
    together = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(), show_progress=False)
    alone = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(classes_per_pass=1),
                       show_progress=False)
    for u, v in zip(together.logits, alone.logits):
        assert torch.allclose(u, v, atol=1e-5)
    one = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(), tasks=[2], show_progress=False)
    assert one.searched.tolist() == [False, False, True, False]
    assert torch.allclose(one.logits[0][2], together.logits[0][2], atol=1e-5)


def test_a_killed_search_resumes_exactly(trained, tmp_path, monkeypatch):
    model, x, y, layers = trained
    s = settings(steps=7, checkpoint_every=2, optimizer="adam", lr=0.05)
    reference = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=s, show_progress=False)
    calls = {"n": 0}
    real = nad.nad_loss

    def dies_at_step_6(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    state = tmp_path / "state.pt"
    monkeypatch.setattr(nad, "nad_loss", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=s, state_path=state, show_progress=False)
    monkeypatch.setattr(nad, "nad_loss", real)
    assert torch.load(state, weights_only=True)["steps_done"] == [4] * 4
    resumed = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=s, state_path=state,
                         show_progress=False)
    for u, v in zip(reference.logits, resumed.logits):
        assert torch.allclose(u, v, atol=1e-6)
    assert resumed.info["updates"] == reference.info["updates"]
    with pytest.raises(BranchspecError, match="another search"):
        nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(steps=9), state_path=state,
                   show_progress=False)


def test_a_class_with_no_correct_image_is_reported_not_searched(trained):
    model, x, y, layers = trained
    pred = model(x).argmax(1)
    y = torch.where(pred == 3, torch.zeros_like(y), pred)  # nothing is labelled 3 where the model says 3
    y[:4] = 3  # class 3 has images, none of them classified as 3
    assert not ((pred == 3) & (y == 3)).any()
    sub = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(), show_progress=False)
    assert sub.searched.tolist() == [True, True, True, False]
    assert sub.info["classes_without_correct"] == ["stripes"] and sub.info["updates"]["stripes"] == 0
    assert all(not b[3].any() for b in sub.masks) and all(torch.isfinite(m).all() for m in sub.logits)


def test_bf16_autocast_runs_on_cpu(trained):
    model, x, y, layers = trained
    sub = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(steps=2),
                     precision="bf16-mixed", show_progress=False)
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in sub.logits)
    with pytest.raises(BranchspecError, match="precision"):
        nad.search(model, x, y, classes=H.CLASSES, layers=layers, precision="16", show_progress=False)


def test_bad_settings_are_refused(trained):
    model, x, y, layers = trained
    for bad in (dict(optimizer="sgd"), dict(beta=-1), dict(lr=float("nan")), dict(batch_size=0), dict(crop_padding=-1)):
        with pytest.raises(BranchspecError):
            nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(**bad), show_progress=False)
    with pytest.raises(BranchspecError, match="classes to search"):
        nad.search(model, x, y, classes=H.CLASSES, layers=layers, tasks=[7], show_progress=False)


def test_masks_are_saved_with_their_metadata(trained, tmp_path):
    model, x, y, layers = trained
    sub = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(steps=3), show_progress=False)
    sub.save(tmp_path)
    with np.load(tmp_path / "masks.npz") as z:
        assert z["mask/layer2.1"].dtype == bool and z["mask/layer2.1"].shape == (4, 12)
        assert np.array_equal(z["mask/layer1.0"], z["logits/layer1.0"] > 0)
        assert z["classes"].tolist() == H.CLASSES
    meta = json.loads((tmp_path / "masks.json").read_text())
    assert meta["threshold"] == 0.5 and meta["settings"]["steps"] == 3
    assert meta["kept_channels"]["red"]["layer2.0"] == int(sub.masks[2][0].sum())
    back = nad.SubArchitectures.load(tmp_path)
    assert back.layers == sub.layers and back.classes == H.CLASSES
    assert all(torch.equal(u, v) for u, v in zip(back.masks, sub.masks))
    with pytest.raises(BranchspecError, match="nad search"):
        nad.SubArchitectures.load(tmp_path / "nothing")


def test_out_of_memory_splits_the_classes_into_smaller_passes(trained, monkeypatch):
    model, x, y, layers = trained
    reference = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(), show_progress=False)
    real = nad.nad_loss

    def small_memory(gates, xs, *a, **kw):
        if len(xs) > 2 * 4:  # more than two classes of 4 images at once
            raise torch.OutOfMemoryError("simulated")
        return real(gates, xs, *a, **kw)

    monkeypatch.setattr(nad, "nad_loss", small_memory)
    with pytest.warns(UserWarning, match="out of memory"):
        split = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(), show_progress=False)
    assert split.info["classes_per_pass"] == 2
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(reference.logits, split.logits))
    monkeypatch.setattr(nad, "nad_loss", lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(BranchspecError, match="one class per pass"), pytest.warns(UserWarning):
        nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=settings(), show_progress=False)


def test_a_model_without_residual_blocks_gets_its_own_layer_names_suggested():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3),
                          nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(BranchspecError, match=r"e\.g\. `layers` 0,2,4\.$"):  # its convolutions, not another model's names
        nad.default_layer_names(model)


def test_ctrl_c_saves_the_search_state_and_says_how_to_resume(trained, tmp_path, monkeypatch):
    import os
    import signal

    from branchspec.errors import Interrupted

    model, x, y, layers = trained
    s = settings(steps=7, checkpoint_every=100)
    reference = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=s, show_progress=False)
    calls = {"n": 0}
    real = nad.nad_loss

    def ctrl_c_in_step_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the step under way finishes, then the state is saved
        return real(*a, **kw)

    state = tmp_path / "state.pt"
    monkeypatch.setattr(nad, "nad_loss", ctrl_c_in_step_3)
    with pytest.raises(Interrupted, match="after step 3 .*run the same command again"):
        nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=s, state_path=state, show_progress=False)
    monkeypatch.setattr(nad, "nad_loss", real)
    assert torch.load(state, weights_only=True)["steps_done"] == [3] * 4
    resumed = nad.search(model, x, y, classes=H.CLASSES, layers=layers, settings=s, state_path=state,
                         show_progress=False)
    for u, v in zip(reference.logits, resumed.logits):
        assert torch.allclose(u, v, atol=1e-6)
