"""A killed run loses at most a few minutes: the command, with its default checkpoint settings, is stopped with
SIGINT (Ctrl-C) or SIGKILL in the middle of its training, started again, and ends with the same weights as a run
that was never interrupted.

Each run is a real ``branchspec`` process. SIGINT: the process finishes the step under way, saves, prints one
line on how to resume and exits with 130. SIGKILL: nothing runs; the resume starts from the last checkpoint
(classify: the end of an epoch, by default; decompose: its ``--checkpoint-every``).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from branchspec.train.lightning import load_checkpoint_file

BRANCHSPEC = Path(sys.executable).with_name("branchspec")
pytestmark = pytest.mark.skipif(not BRANCHSPEC.is_file(), reason="needs the installed branchspec command")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def classify(out: Path) -> list[str]:
    # 6 epochs of 22 steps on the digits with tiny branches: a few seconds, checkpoints at the end of each epoch
    return ["classify", "train", "--data", "digits", "--branches", "3", "--widths", "2,2,2,2", "--epochs", "6",
            "--batch-size", "64", "--lr", "0.1", "--device", "cpu", "--out", str(out)]


def decompose(out: Path) -> list[str]:
    return ["decompose", "train", "--out", str(out), "--num-scenes", "24", "--eval-scenes", "4", "--size", "16",
            "--branches", "3", "--width", "0.01", "--d-width", "0.016", "--batch-size", "2", "--iterations", "60",
            "--eval-every", "60", "--checkpoint-every", "10", "--device", "cpu", "--devices", "1"]


def finish(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BRANCHSPEC), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def interrupt(args: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the command, wait for its first checkpoint, then send ``sig`` while it trains on."""
    proc = subprocess.Popen([str(BRANCHSPEC), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted runs, once for the module."""
    root = tmp_path_factory.mktemp("straight")
    finish(classify(root / "classify"))
    finish(decompose(root / "decompose"))
    return root


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_classify_survives_a_kill_with_the_default_checkpoints(tmp_path, straight, sig):
    out = tmp_path / "killed"
    done = interrupt(classify(out), out, sig)
    if sig == signal.SIGINT:
        assert done.returncode == 130
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("branchspec: interrupted")]
        assert len(lines) == 1 and "run the same command again to resume" in lines[0]
    else:
        assert done.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint_file(out / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < stopped_at < 6 * 22
    finish(classify(out))
    metrics = (out / "metrics.json").read_text()
    assert f'"resumed_from_step": {stopped_at}' in metrics
    same_weights(load_file(out / "checkpoints/weights.safetensors"),
                 load_file(straight / "classify/checkpoints/weights.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_decompose_survives_a_kill(tmp_path, straight, sig):
    out = tmp_path / "killed"
    done = interrupt(decompose(out), out, sig)
    assert done.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    stopped_at = int(load_checkpoint_file(out / "checkpoints" / "last.ckpt")["state_dict"]["iteration"])
    assert 0 < stopped_at < 60
    finish(decompose(out))
    for name in ("generator", "generator_ema"):
        same_weights(load_file(out / f"checkpoints/{name}.safetensors"),
                     load_file(straight / f"decompose/checkpoints/{name}.safetensors"))
