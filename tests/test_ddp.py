"""Several processes: `classify train` and `decompose train` with Lightning's DDP on the CPU (gloo, two processes).

Each run goes through the command line in a fresh process, as a user starts it: Lightning re-executes the command
once per extra rank. Rank 0 alone writes the run directory's metrics, figures, report and logs; the checkpoint
holds the whole state, and running the same command again resumes from it (here: finds the run finished).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BRANCHSPEC = Path(sys.executable).with_name("branchspec")
pytestmark = pytest.mark.skipif(not BRANCHSPEC.is_file() or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs the branchspec command and torch.distributed with gloo")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(BRANCHSPEC), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def written_once(out: Path) -> None:
    """One logger version (rank 0's), a valid metrics.json and one report."""
    assert [p.name for p in (out / "logs" / "csv").iterdir()] == ["version_0"]
    assert [p.name for p in (out / "logs" / "tensorboard").iterdir()] == ["version_0"]
    json.loads((out / "metrics.json").read_text())
    assert (out / "report.html").is_file()
    assert not list(out.rglob("*.tmp"))  # no half-written file left behind


def test_classify_train_with_ddp_on_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    args = ["classify", "train", "--data", "digits", "--branches", "3", "--widths", "2,2,2,2", "--limit-per-class",
            "8", "--test-limit-per-class", "4", "--epochs", "2", "--batch-size", "8", "--lr", "0.2",
            "--strategy", "ddp", "--devices", "2", "--device", "cpu", "--out", str(out)]
    done = run(*args, cwd=tmp_path)
    assert "test accuracy" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (80 // (8 * 2))  # each rank takes its own 8 of every 16 images
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"] == "ddp"
    written_once(out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == metrics["steps"]
    run(*args, cwd=tmp_path)  # the same command again: resumes from the last checkpoint, which is the end
    again = json.loads((out / "metrics.json").read_text())
    assert again["steps"] == metrics["steps"] and again["resumed_from_step"] == 0  # no step was trained twice


def test_decompose_train_with_ddp_on_two_cpu_processes(tmp_path):
    out = tmp_path / "run"

    def args(iterations: int) -> list[str]:
        return ["decompose", "train", "--out", str(out), "--num-scenes", "24", "--size", "16", "--branches", "3",
                "--width", "0.01", "--d-width", "0.016", "--batch-size", "2", "--iterations", str(iterations),
                "--eval-every", "2", "--strategy", "ddp", "--devices", "2", "--device", "cpu"]

    run(*args(4), cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["latest"]["iteration"] == 4 and [r["iteration"] for r in metrics["history"]] == [2, 4]
    written_once(out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(ckpt["state_dict"]["iteration"]) == 4
    run(*args(6), cwd=tmp_path)  # more iterations: resumes at 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["iteration"] for r in metrics["history"]] == [2, 4, 6]
