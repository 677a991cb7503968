"""The command line: every subcommand answers --help; bad input gets one line and a non-zero exit."""

import json
import os
import subprocess
import sys

import pytest

from branchspec.cli import build_parser, main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "branchspec.cli", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def all_commands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from all_commands(sub, (*prefix, name))


@pytest.mark.parametrize("command", [()] + list(all_commands(build_parser())), ids=lambda c: " ".join(c) or "root")
def test_every_subcommand_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _one_line_error(code, out, err):
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_malformed_branch_range(tmp_path):
    for bad in ("2-", "30-2", "a", "0-3", "2..5"):
        err = _one_line_error(*run_cli("toy", "sweep", "--branches", bad, "--out", str(tmp_path)))
        assert "--branches" in err


@pytest.mark.parametrize("content, suffix", [("", ".csv"), ("x,y\n1,2\n3\n", ".csv"), ('{"x": [1, 2], "y": [1]}', ".json"),
                                             ("x,y\n1,nan\n", ".csv"), ('{"x": [1, Infinity], "y": [1, 2]}', ".json")])
def test_empty_mismatched_or_non_finite_toy_data(tmp_path, content, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    _one_line_error(*run_cli("toy", "sweep", "--toy", str(path), "--out", str(tmp_path / "o"), "--trials", "2"))


def test_non_finite_option(tmp_path):
    err = _one_line_error(*run_cli("toy", "sweep", "--lr", "nan", "--out", str(tmp_path)))
    assert "--lr" in err


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = _one_line_error(*run_cli("toy", "dynamics", "--out", str(blocker / "run"), "--steps", "10"))
    assert "cannot write" in err


def test_toy_sweep_from_a_user_file(tmp_path):
    path = tmp_path / "pts.json"
    path.write_text(json.dumps({"x": [-1, 0, 1], "y": [1, 0.2, 1]}))
    code, out, err = run_cli("toy", "sweep", "--toy", str(path), "--branches", "2,6", "--trials", "16",
                             "--steps", "500", "--out", str(tmp_path / "run"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["success_rate"]) == {"2", "6"} and metrics["toy"] == "pts"


def test_the_command_line_flushes_subnormals_in_every_thread():
    """The flag is per thread: set before torch starts its threads, a two-thread product of subnormals is 0."""
    code = ("import torch; from branchspec.cli import _setup_process; _setup_process(); torch.set_num_threads(2); "
            "x = torch.full((1 << 20,), 1e-39); print(int((x * 1.0).count_nonzero()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "BRANCHSPEC_KEEP_DENORMALS": "1"}).stdout
    assert kept.strip() == str(1 << 20)
