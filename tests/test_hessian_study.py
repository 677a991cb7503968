"""The Hessian study and its command: a toy sweep and a classifier run, resume, and bad input."""

import json
import subprocess
import sys

import pytest
import torch

import branchspec.studies.hessian as study
from branchspec.cli import main
from branchspec.errors import BranchspecError
from branchspec.studies.classify import ClassifyConfig, run_train
from branchspec.studies.hessian import HessianConfig, run_hessian
from branchspec.studies.toy import ToySweepConfig, run_sweep
from branchspec.train.classify import Recipe
from branchspec.train.toy import ToyTraining


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    run_sweep(ToySweepConfig(branches=[2, 5], trials=6, training=ToyTraining(steps=2000), covariance_m=5),
              out, show_progress=False)
    return out


def test_toy_run_every_analysis_then_resume(toy_run, tmp_path, monkeypatch):
    cfg = HessianConfig(run=str(toy_run), analyses=["hessian", "equilibrium", "spectrum"], dtype="float64",
                        check_direct=True, probes=20, block_probes=2, top_n=2, lanczos_steps=10)
    metrics = run_hessian(cfg, tmp_path / "h", show_progress=False)
    assert metrics["parameters"] == 10 and metrics["branches"] == 5 and metrics["selection"] == ["w", "b"]
    for name in ("init", "last"):
        assert 0 < metrics["block_mass_ratio"][name] <= 1
        assert metrics["direct_relative_difference"][name] < 1e-12
        assert len(metrics["equilibrium"][name]["distributive_near_zero_per_branch"][0]) == 5
        assert len(metrics["top_eigenvalues"][name]) == 2
    assert metrics["loss"]["last"] < metrics["loss"]["init"]
    config = json.loads(json.dumps(study.RunDir(tmp_path / "h").read_config()))
    assert config["toy_branches"] == 5 and config["toy_trial"] is not None  # the choice is recorded
    for figure in ("fig5_hessian", "hessian_block_masses", "equilibrium", "eigenvalue_density"):
        assert (tmp_path / "h/figures" / f"{figure}.png").is_file()
    assert "fig5_hessian" in (tmp_path / "h/report.html").read_text()

    def fail(*args, **kw):
        raise AssertionError("a finished piece was computed again")

    monkeypatch.setattr(study, "_PIECES", {a: fail for a in study.ANALYSES})
    assert run_hessian(cfg, tmp_path / "h", show_progress=False) == metrics  # resumed: nothing left to do
    with pytest.raises(BranchspecError, match="differs in .*params"):
        run_hessian(HessianConfig(run=str(toy_run), params="w"), tmp_path / "h", show_progress=False)


def test_classifier_run_default_output_inside_the_run(tmp_path):
    tiny = ClassifyConfig(data="digits", branches=2, widths=[2, 2, 2, 2], limit_per_class=4, test_limit_per_class=2,
                          recipe=Recipe(epochs=1, batch_size=20, lr=0.2))
    run_train(tiny, tmp_path, show_progress=False)
    metrics = run_hessian(HessianConfig(run=str(tmp_path), samples=12, chunk_size=54), show_progress=False)
    assert metrics["parameters"] == 2 * 27 * 2 and metrics["samples"] == 12  # conv1.weight: 27·w1 per branch
    assert set(metrics["block_mass_ratio"]) == {"init", "last"}
    assert set(metrics["collaborative_near_zero"]) == {"init", "last"}
    saved = torch.load(tmp_path / "hessian/checkpoints/hessian_last.pt", weights_only=True)
    assert saved["hessian"].shape == (108, 108) and saved["block_sizes"].tolist() == [54, 54]
    assert "hessian" in (tmp_path / "report.html").read_text()  # a section of the run's own report


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "branchspec.cli", "hessian", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--analyses", "hessian,curvature"], "--analyses takes"),
    (["--params", "conv9.*"], "matches no parameter"),
    (["--toy-branches", "7"], "no M = 7"),
    (["--checkpoint", "init,init"], "share a name"),
    (["--device", "tpu:x"], "is not a device"),
])
def test_cli_bad_input_gets_one_line(toy_run, tmp_path, capsys, args, message):
    assert main(["hessian", "--run", str(toy_run), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_runs_and_rejects_a_folder_that_is_no_run(toy_run, tmp_path):
    code, out, err = run_cli("--run", str(toy_run), "--out", str(tmp_path / "h"), "--checkpoint", "last",
                             "--analyses", "hessian")
    assert code == 0, err
    assert "block-mass ratio last:" in out
    code, out, err = run_cli("--run", str(tmp_path / "h"), "--out", str(tmp_path / "x"))
    assert code == 2 and "not by `branchspec toy sweep` or" in err and "Traceback" not in err
