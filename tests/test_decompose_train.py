"""GAN training (App. E): the losses, the EMA, exact resume, a non-finite loss, and the CLI end to end."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from branchspec import BranchspecError
from branchspec.cli import main
from branchspec.nets.stargan import GeneratorConfig
from branchspec.studies.decompose import DecomposeConfig, run_train
from branchspec.train.gan import ClassTransferGAN, GANRecipe, r1_penalty


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread is as fast, and stays fast when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(iterations, **kw):
    options = dict(size=16, num_scenes=24, eval_scenes=4, branches=3, batch_size=4, iterations=iterations,
                   generator=GeneratorConfig(dim_in=4, max_conv_dim=4, hidden_dim=8, style_dim=8, latent_dim=4),
                   d_width=1 / 64, checkpoint_every=2, eval_every=2, accelerator="cpu", devices=1)
    return DecomposeConfig(**{**options, **kw})


def test_r1_is_half_the_squared_input_gradient():
    w = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)  # a linear D: ∇_x D = w for every image
    torch.testing.assert_close(r1_penalty(logits, x), 0.5 * w.pow(2).sum())


def test_ema_update():
    g = torch.nn.Linear(2, 2)
    gan = ClassTransferGAN(g, torch.nn.Linear(2, 1), GANRecipe(ema_decay=0.9))
    before = gan.generator_ema.weight.clone()
    with torch.no_grad():
        g.weight.add_(1.0)
    gan.update_ema()
    torch.testing.assert_close(gan.generator_ema.weight, 0.9 * before + 0.1 * g.weight)
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())


def test_training_lowers_the_discriminator_loss(tmp_path):
    metrics = run_train(tiny(24, recipe=GANRecipe(lr=1e-3), eval_every=12), tmp_path, show_progress=False)
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["iteration"] == 24
    assert last["d_loss"] < 2 * torch.log(torch.tensor(2.0)).item() - 0.1  # below chance, D has learnt something
    assert 0 <= last["recovery"] <= 1 and "recovery_ema" in first
    assert (tmp_path / "figures" / "training_curves.png").is_file()
    assert (tmp_path / "report.html").is_file()


def test_bf16_mixed_precision(tmp_path):
    """The precision CUDA runs use by default (bf16 autocast), here on the CPU: R1's double backward included."""
    latest = run_train(tiny(2, precision="bf16-mixed"), tmp_path, show_progress=False)["latest"]
    assert latest["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(latest[k])) for k in ("d_loss", "g_loss", "r1"))


def test_resume_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(tiny(5), straight, show_progress=False)
    run_train(tiny(3), resumed, show_progress=False)
    run_train(tiny(5), resumed, show_progress=False)  # more iterations: continue from the last checkpoint
    for name in ("generator", "generator_ema"):
        a, b = (load_file(str(d / "checkpoints" / f"{name}.safetensors")) for d in (straight, resumed))
        for key in a:
            assert torch.equal(a[key], b[key]), key
    history = json.loads((resumed / "metrics.json").read_text())["history"]
    assert [r["iteration"] for r in history] == [2, 3, 4, 5]
    with pytest.raises(BranchspecError, match="different run"):
        run_train(tiny(6, branches=4), resumed, show_progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from branchspec.nets.stargan import Discriminator

    forward = Discriminator.forward
    calls = {"n": 0}

    def poisoned(self, x, y=None):
        calls["n"] += 1
        out = forward(self, x, y)
        return out * float("nan") if calls["n"] > 2 * 3 else out  # after two iterations (3 D calls each)

    monkeypatch.setattr(Discriminator, "forward", poisoned)
    with pytest.raises(BranchspecError, match="non-finite"):
        run_train(tiny(6), tmp_path, show_progress=False)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(ckpt["state_dict"]["iteration"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------- CLI
TINY_CLI = ["--size", "16", "--branches", "3", "--width", "0.01", "--d-width", "0.016",
            "--batch-size", "4", "--iterations", "4", "--eval-every", "2", "--device", "cpu", "--devices", "1"]


def test_cli_train_apply_manipulate_segment(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["decompose", "train", "--out", str(run), "--num-scenes", "24", *TINY_CLI]) == 0
    assert main(["decompose", "apply", "--run", str(run), "--num-images", "2", "--eval-images", "8"]) == 0
    assert main(["decompose", "manipulate", "--run", str(run), "--branches", "0,2", "--alphas", "0,1,2",
                 "--subsets", "0:1,2", "--num-images", "1"]) == 0
    assert main(["decompose", "segment", "--run", str(run), "--num-images", "2", "--init-branches", "1"]) == 0
    out = capsys.readouterr().out
    assert "component recovery" in out and "eye IoU" in out
    apply = json.loads((run / "apply" / "metrics.json").read_text())
    assert 0 <= apply["component_recovery"] <= 1
    assert set(apply["translation_psnr"]) == {"spots->stripes", "stripes->spots"}
    assert len(apply["response_norms"]) == 3
    figures = {p.name for p in (run / "apply" / "figures").glob("*.png")}
    assert {"fig9_regeneration_spots.png", "fig10_branches_spots.png", "fig10_added_stripes.png",
            "component_recovery.png"} <= figures
    manipulate = json.loads((run / "manipulate" / "metrics.json").read_text())
    assert manipulate["subsets"] == [[0], [1, 2]] and manipulate["branches"] == [0, 2]
    assert (run / "manipulate" / "figures" / "fig13_alpha_sweep_branch2.png").is_file()
    assert (run / "segment" / "figures" / "fig12_segmentation.png").is_file()
    report = (run / "report.html").read_text()
    assert all(f"<h2>{name}</h2>" in report for name in ("apply", "manipulate", "segment"))


def write_two_domains(root, per_split=6):
    """ROOT/{train,test}/{bright,dark}/*.png: two domains of 16-px random images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, low in (("bright", 150), ("dark", 0)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_split):
                Image.fromarray(rng.integers(low, low + 100, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cli_apply_on_image_folders_scores_the_frechet_distance_against_no_translation(tmp_path, capsys):
    write_two_domains(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["decompose", "train", "--out", str(run), "--data", str(tmp_path / "data"), *TINY_CLI]) == 0
    assert main(["decompose", "apply", "--run", str(run), "--eval-images", "6", "--classifier-steps", "5"]) == 0
    assert "untranslated images" in capsys.readouterr().out
    apply = json.loads((run / "apply" / "metrics.json").read_text())
    assert apply["evaluation_images"] == "test" and "component_recovery" not in apply
    assert set(apply["frechet_distance"]) == set(apply["frechet_distance_untranslated"]) == {"bright->dark",
                                                                                            "dark->bright"}
    assert apply["mean_frechet_distance_untranslated"] > 0 and "trained here" in apply["frechet_features"]
    assert apply["frechet_reliable"] is False and apply["frechet_images_per_domain"] == 6  # 6 images, 8+ features
    assert (run / "checkpoints" / "frechet_classifier.safetensors").is_file()
    bands = apply["band_energy"]  # without true layers: the branches beside the frequency bands, and a finding
    assert len(bands["branch_band_shares"]) == 3 and 0 <= bands["mean_best_dog_band_correlation"] <= 1
    claims = [f["control"] for f in apply["findings"]]
    assert any("DoG band" in c for c in claims) and any("untranslated" in c for c in claims)
    assert main(["decompose", "apply", "--run", str(run), "--eval-images", "6", "--classifier-steps", "5"]) == 0
    again = json.loads((run / "apply" / "metrics.json").read_text())
    assert again["frechet_features"].endswith("(cached)")  # the second apply trains no classifier
    assert again["mean_frechet_distance"] == pytest.approx(apply["mean_frechet_distance"])
    err = capsys.readouterr().err
    assert "unreliable" in err


@pytest.mark.parametrize("make, args", [
    (lambda d: (d / "data" / "train" / "cat").mkdir(parents=True), ["train", "--data", "{d}/data"]),
    (lambda d: None, ["train", "--data", "{d}/missing"]),
    (lambda d: None, ["train", "--size", "48"]),
    (lambda d: d.joinpath("notarun").mkdir(), ["apply", "--run", "{d}/notarun"]),
    (lambda d: None, ["segment", "--run", "{d}/nowhere"]),
])
def test_cli_bad_input_gets_one_line(tmp_path, capsys, make, args):
    make(tmp_path)
    args = [a.format(d=tmp_path) for a in args]
    out = [] if args[0] != "train" else ["--out", str(tmp_path / "out"), "--iterations", "1"]
    assert main(["decompose", *args, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("branchspec: error:") and len(err.strip().splitlines()) == 1, err


def test_cli_options_of_the_other_kind_of_data_are_an_error_not_ignored(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--iterations", "1"]
    assert main(["decompose", "train", "--domains", "cat,dog", *out]) == 2
    assert "--domains: only for image folders" in capsys.readouterr().err
    write_two_domains(tmp_path / "data")
    assert main(["decompose", "train", "--data", str(tmp_path / "data"), "--num-scenes", "9", "--eval-scenes", "4",
                 *out]) == 2
    assert "--num-scenes, --eval-scenes: only for the layered scenes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_apply_manipulate_segment_on_a_folder_of_own_images(tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "run"
    assert main(["decompose", "train", "--out", str(run), "--num-scenes", "24", *TINY_CLI]) == 0
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(photos / "gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 26, 4), dtype=np.uint8), "RGBA").save(photos / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)).save(photos / "sub" / "deep.png")
    (photos / "broken.jpg").write_bytes(b"no image here")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="1 of 4"):
        assert main(["decompose", "apply", "--run", str(run), "--images", str(photos), "--num-images", "3"]) == 0
    out = capsys.readouterr()
    assert "3 images decomposed (1 unreadable files skipped)" in out.out and "skipped" in out.err
    metrics = json.loads((run / "apply_images" / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["skipped_files"] == 1 and sorted(metrics["files"]) == [
        "alpha.png", "gray.png", "sub/deep.png"]
    figures = {p.name for p in (run / "apply_images" / "figures").glob("*.png")}
    assert {"fig9_regeneration_spots.png", "fig10_branches_stripes.png"} <= figures
    with pytest.warns(UserWarning):
        assert main(["decompose", "manipulate", "--run", str(run), "--images", str(photos), "--branches", "0",
                     "--alphas", "0,1", "--num-images", "2"]) == 0
        assert main(["decompose", "segment", "--run", str(run), "--images", str(photos), "--num-images", "2",
                     "--init-branches", "1"]) == 0
    assert "mean_eye_iou" not in json.loads((run / "segment" / "metrics.json").read_text())


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "holds no image files"),
    (lambda d: (d.mkdir(), (d / "x.png").write_bytes(b"junk")), "could be read"),
])
def test_bad_image_folders_get_one_line(tmp_path, capsys, make, message):
    run = tmp_path / "run"
    assert main(["decompose", "train", "--out", str(run), "--num-scenes", "24", *TINY_CLI]) == 0
    folder = tmp_path / "photos"
    make(folder)
    capsys.readouterr()
    assert main(["decompose", "apply", "--run", str(run), "--images", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_a_run_of_another_command_is_named(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("command: classify train\n")
    assert main(["decompose", "apply", "--run", str(tmp_path)]) == 2
    assert "made by `branchspec classify train`" in capsys.readouterr().err


def test_the_shipped_generator_loads_and_decomposes_a_scene(tmp_path):
    """The demo's trained generator (≤ 5 MB, with its command and scores): it loads as a run would, and its
    branches sum with R to the re-generation of a held-out scene."""
    from branchspec.data.scenes import evaluation_scenes
    from branchspec.rundir import RunDir
    from branchspec.studies.decompose import SHIPPED, load_generator

    weights = SHIPPED / "generator_ema.safetensors"
    assert weights.stat().st_size <= 5 * 2**20
    assert "decompose train" in (SHIPPED / "README.md").read_text()
    run = RunDir(tmp_path / "shipped")
    run.checkpoints.mkdir(parents=True)
    (run.path / "config.yaml").write_bytes((SHIPPED / "config.yaml").read_bytes())
    (run.checkpoints / "generator_ema.safetensors").write_bytes(weights.read_bytes())
    generator, cfg, _ = load_generator(run)
    assert cfg.generator.img_size == 32 and cfg.branches == 9
    scenes = evaluation_scenes(2, size=cfg.generator.img_size, num_domains=2, seed=0)[0]
    with torch.no_grad():
        out = generator.decompose(scenes.images, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out.total, out.residual + out.branch_outputs.sum(0), atol=1e-5, rtol=0)
    assert out.branch_outputs.flatten(1).std(1).min() > 0  # no branch is blank
