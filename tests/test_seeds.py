"""Several seeds of one run: sub-runs, intervals over the seeds, resume of a killed multi-seed run, bad --seeds."""

import json
import math

import pytest

import branchspec.studies.classify as study
from branchspec.cli import main
from branchspec.errors import BranchspecError
from branchspec.seeds import aggregate, check_seeds, flat_numbers, interval, parse_seeds

TINY = ["--data", "digits", "--branches", "3", "--widths", "2,2,2,2", "--limit-per-class", "8",
        "--test-limit-per-class", "4", "--epochs", "2", "--batch-size", "16", "--lr", "0.2", "--device", "cpu"]


def test_interval_is_the_t_interval_of_the_mean():
    s = interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3 and s["sd"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2)
    assert s["ci95"] == pytest.approx([2 - half, 2 + half])
    assert interval([5.0])["ci95"] is None and interval([None, 4.0])["n"] == 1
    assert flat_numbers({"a": 1, "b": {"c": 2.5, "d": [1, 2]}, "e": True, "f": "x"}) == {"a": 1.0, "b/c": 2.5}


@pytest.mark.parametrize("text, message", [("0,0", "repeat"), ("-1", "non-negative"), ("1.5", "non-negative"),
                                           ("3-1", "increasing"), ("a", "non-negative")])
def test_bad_seeds_get_one_line(text, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["classify", "train", "--seeds", text, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    with pytest.raises(BranchspecError):
        parse_seeds(text)


def test_check_seeds():
    assert check_seeds([2, 0, 1]) == [2, 0, 1] and parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(BranchspecError, match="repeat"):
        check_seeds([1, 1])


def test_two_seeds_give_sub_runs_and_intervals_and_a_killed_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = study.run_train
    calls = []

    def dies_on_the_second_seed(cfg, run, **kw):
        calls.append(cfg.seed)
        if cfg.seed == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt  # killed during the second seed
        return real(cfg, run, **kw)

    monkeypatch.setattr(study, "run_train", dies_on_the_second_seed)
    assert main(["classify", "train", *TINY, "--seeds", "0,1", "--out", str(out)]) == 130
    first = (out / "seed0" / "checkpoints" / "weights.safetensors").stat().st_mtime_ns
    assert main(["classify", "train", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    assert (out / "seed0" / "checkpoints" / "weights.safetensors").stat().st_mtime_ns >= first
    assert json.loads((out / "seed0" / "metrics.json").read_text())["steps"] == 10  # seed 0 was not trained again
    assert calls == [0, 1, 0, 1]
    parent = json.loads((out / "metrics.json").read_text())
    assert parent["seeds"] == [0, 1]
    acc = parent["summary"]["test_accuracy"]
    assert acc["n"] == 2 and len(acc["ci95"]) == 2 and acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1]
    assert "test accuracy" in capsys.readouterr().out
    assert main(["classify", "analyze", "--run", str(out), "--top-percent", "50"]) == 0
    parent = json.loads((out / "metrics.json").read_text())
    assert parent["summary"]["analysis/num_silent_centred"]["n"] == 2  # every seed analysed, then aggregated
    assert "seed0" in (out / "report.html").read_text()
    assert main(["classify", "train", *TINY, "--seeds", "1", "--out", str(out)]) == 2  # dropping a seed: refused
    assert "give them all" in capsys.readouterr().err
    assert main(["nad", "search", "--run", str(out), "--steps", "3", "--batch-size", "4", "--evaluate"]) == 0
    parent = json.loads((out / "metrics.json").read_text())
    assert (out / "seed1" / "nad" / "masks.npz").is_file()
    assert parent["summary"]["nad/misclassification/chance"]["n"] == 2  # both seeds searched and evaluated
    assert any(f["source"].startswith("NAD") for f in parent["findings"])


def test_aggregate_skips_missing_numbers(tmp_path):
    for s, metrics in ((0, {"a": 1.0, "b": 2.0}), (1, {"a": 3.0})):
        (tmp_path / f"seed{s}").mkdir()
        (tmp_path / f"seed{s}" / "metrics.json").write_text(json.dumps(metrics))
    summary = aggregate({0: tmp_path / "seed0", 1: tmp_path / "seed1"})
    assert summary["a"]["mean"] == 2.0 and summary["b"]["n"] == 1
