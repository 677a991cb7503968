"""The NAD study and CLI: `nad search` (a classify run, or a user's model) and `nad evaluate`, end to end."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import yaml

import nad_helpers as H
from nad_helpers import single_thread  # noqa: F401 - autouse fixture
from branchspec.cli import main


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A user's model file, its trained weights and an image tree: what `--model ... --weights ... --data` takes."""
    root = tmp_path_factory.mktemp("user")
    path = H.write_model(root)
    from branchspec.runs import load_user_model

    model = load_user_model(f"{path}:make", None)
    data = H.write_image_tree(root / "images", {"train": 16, "test": 8})
    from branchspec.data.images import load_images

    train = load_images(data, "train", size=H.SIZE, show_progress=False)
    with H.one_thread():
        H.train(model, H.normalize(train.images), train.labels, steps=80)
    torch.save(model.state_dict(), root / "weights.pt")
    return root, path


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A small trained branched classifier (M = 3) from `branchspec classify train` on the digits."""
    from branchspec.studies.classify import ClassifyConfig, run_train
    from branchspec.train.classify import Recipe

    out = tmp_path_factory.mktemp("classify") / "run"
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its stream handler may hold a closed capture stream of an earlier test
    with H.one_thread():
        run_train(ClassifyConfig(data="digits", branches=3, widths=[4, 4, 4, 4], loss="cross_entropy",
                                 limit_per_class=30, test_limit_per_class=12, recipe=Recipe(epochs=10, batch_size=32)),
                  out, show_progress=False)
    quiet.setLevel(level)
    return out


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_search_and_evaluate_a_users_model(user_model, tmp_path, capsys):
    root, path = user_model
    out = tmp_path / "nad"
    argv = ["nad", "search", "--model", f"{path}:make", "--weights", str(root / "weights.pt"), "--data",
            str(root / "images"), "--size", str(H.SIZE), "--steps", "12", "--batch-size", "6", "--out", str(out),
            "--device", "cpu"]
    assert main(argv) == 0
    assert "4 classes searched" in capsys.readouterr().out
    meta = json.loads((out / "masks.json").read_text())
    assert meta["classes"] == sorted(H.CLASSES) and [d["name"] for d in meta["layers"]][0] == "layer1.0"
    assert meta["settings"]["crop_padding"] == 4 and meta["settings"]["flip"] is True  # a user's model: CIFAR-like
    assert meta["settings"]["beta"] == 0.02  # the authors' ResNet value
    assert main(["nad", "evaluate", "--run", str(out), "--mosaics", "12"]) == 0
    assert "hit rate of the last 3 layers" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hit_rate"]["mosaics"] == 12 and set(metrics["hit_rate"]["mean"]) == {
        "layer1.0", "layer1.1", "layer2.0", "layer2.1"}
    assert metrics["misclassification"]["k"] == 3 and "branch_link" not in metrics
    assert metrics["test_accuracy"] > 0.9 and metrics["kept_fraction"]  # the search's metrics are kept
    det = metrics["detection"]
    assert np.asarray(det["matrix"]).shape == (4, 4) and set(det["recall"]) == set(H.CLASSES)
    test_images = len(list((root / "images" / "test" / H.CLASSES[0]).iterdir()))
    assert det["images_per_class"] == min(50, test_images)  # what was used, not the setting
    assert 0 <= det["mean_false_positive_rate"] <= 1
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"nad_hit_rate.png", "nad_similarity.png", "nad_kept_channels.png", "nad_detection.png",
            "nad_mosaic_example.png"} <= figures
    assert "nad_hit_rate" in (out / "report.html").read_text()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["evaluate"]["mosaics"] == 12 and config["model"].endswith("tiny_resnet.py:make")


def test_a_classify_run_links_masks_to_branches_and_resumes(classify_run, capsys):
    argv = ["nad", "search", "--run", str(classify_run), "--steps", "8", "--batch-size", "4", "--evaluate",
            "--device", "cpu"]
    assert main(argv) == 0
    out = classify_run / "nad"  # the default --out of a classify run
    text = capsys.readouterr().out
    assert "branch link r =" in text
    meta = json.loads((out / "masks.json").read_text())
    assert meta["layers"][0]["branches"] == 3 and meta["layers"][0]["widths"] == [12]  # fused: 3 × 4 channels
    assert meta["settings"]["crop_padding"] == 1 and meta["settings"]["flip"] is False  # the classifier's recipe
    assert meta["settings"]["beta"] == 1.0  # chosen for the ResNet18s of classify runs
    metrics = json.loads((out / "metrics.json").read_text())
    link = metrics["branch_link"]
    assert np.asarray(link["share"]).shape == (10, 3) and np.asarray(link["contribution"]).shape == (3, 10)
    assert set(link["per_layer_pearson"]) == {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    before = (out / "masks.npz").read_bytes()
    assert main(argv[:-3] + ["--device", "cpu"]) == 0  # the same search again: finished, nothing recomputed
    with np.load(out / "masks.npz") as now:
        from io import BytesIO

        with np.load(BytesIO(before)) as old:
            assert all(np.array_equal(now[k], old[k]) for k in old.files)
    err = one_line_error(capsys, ["nad", "search", "--run", str(classify_run), "--steps", "9"])
    assert "different NAD search" in err and "search.steps" in err


def test_loop_execution_gives_the_same_masks_as_fused(classify_run, tmp_path):
    from branchspec.analysis.nad import SearchSettings
    from branchspec.studies.nad import NADConfig, run_search

    s = SearchSettings(steps=3, batch_size=4)
    fused = run_search(NADConfig(run=str(classify_run), search=s, device="cpu"), tmp_path / "f", show_progress=False)
    loop = run_search(NADConfig(run=str(classify_run), search=s, execution="loop", device="cpu"), tmp_path / "l",
                      show_progress=False)
    assert loop.layers[0].modules == ("branches.0.layer1.0", "branches.1.layer1.0", "branches.2.layer1.0")
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(fused.logits, loop.logits))


def test_bad_input_gets_one_line(user_model, classify_run, tmp_path, capsys):
    root, path = user_model
    weights, data = str(root / "weights.pt"), str(root / "images")
    out = str(tmp_path / "o")
    assert "exactly one classifier" in one_line_error(capsys, ["nad", "search", "--out", out])
    assert "FILE.py:FACTORY" in one_line_error(capsys, ["nad", "search", "--model", str(path), "--data", data,
                                                        "--out", out])
    assert "could not be built" in one_line_error(capsys, ["nad", "search", "--model", f"{path}:nothing",
                                                           "--data", data, "--out", out])
    assert "needs --data" in one_line_error(capsys, ["nad", "search", "--model", f"{path}:make", "--out", out])
    assert "--out" in one_line_error(capsys, ["nad", "search", "--model", f"{path}:make", "--data", data])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    assert "does not fit" in one_line_error(capsys, ["nad", "search", "--model", f"{path}:make", "--weights",
                                                     str(tmp_path / "bad.pt"), "--data", data, "--out", out])
    assert "no module" in one_line_error(capsys, ["nad", "search", "--model", f"{path}:make", "--weights", weights,
                                                  "--data", data, "--size", str(H.SIZE), "--layers", "layer7.0",
                                                  "--out", out])
    assert "not a 'branchspec nad search'" in one_line_error(capsys, ["nad", "evaluate", "--run", str(classify_run)])
    assert "does not exist" in one_line_error(capsys, ["nad", "evaluate", "--run", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        main(["nad", "evaluate", "--run", out, "--mask-rate", "2"])


def test_a_classifier_that_is_always_wrong_is_reported_not_crashed(user_model, tmp_path, capsys):
    """Every class lacks a correctly classified image: nothing is searched, every output says so, no NaN."""
    root, path = user_model
    shifted = tmp_path / "shifted"
    names = sorted(H.CLASSES)
    for split in ("train", "test"):
        for i, name in enumerate(names):  # the images of each class under the next class's name
            shutil.copytree(root / "images" / split / name, shifted / split / names[(i + 1) % 4])
    out = tmp_path / "nad"
    assert main(["nad", "search", "--model", f"{path}:make", "--weights", str(root / "weights.pt"), "--data",
                 str(shifted), "--size", str(H.SIZE), "--steps", "2", "--out", str(out), "--evaluate",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "0 classes searched" in text and "no class could be searched" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["classes_without_correct"]) == names and metrics["test_accuracy"] < 0.2
    assert "detection" not in metrics and set(metrics["original_recall"].values()) == {0.0}
    assert "NaN" not in (out / "metrics.json").read_text() and (out / "report.html").is_file()
