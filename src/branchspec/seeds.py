"""Several seeds of one run, and intervals over them.

    out/                     the parent: config.yaml {"command": "<cmd> seeds", "seeds": [...]}, metrics.json
      seed0/ seed1/ ...      one ordinary run directory per seed (each resumes by itself)

:func:`run_seeds` trains (or resumes) every seed's run and then writes the parent's ``metrics.json``: for every
number that the runs' metrics.json hold (nested keys joined by ``/``; the runs' nested analysis folders, such as
``analysis/``, too), its mean and a 95% t-interval over the seeds (:func:`interval`). An analysis command given
the parent runs on every seed and aggregates the same way (:func:`seed_runs`, :func:`aggregate`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from branchspec.errors import BranchspecError, log
from branchspec.rundir import RunDir

SEED_DIR = "seed{}"


def check_seeds(seeds: Iterable) -> list[int]:
    """Distinct non-negative integers, in the order given; anything else is a one-line error."""
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]
    if not seeds or bad:
        raise BranchspecError(f"seeds must be non-negative integers, got {seeds}.")
    if len(set(seeds)) != len(seeds):
        raise BranchspecError(f"seeds {seeds} repeat a value; give each seed once.")
    return [int(s) for s in seeds]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (or both, ``"0-2,7"``) as a list of seeds, checked by :func:`check_seeds`."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise BranchspecError(f"`seeds` takes non-negative integers or increasing ranges such as 0,1,2 or 0-4, "
                                  f"got {text!r}.")
        seeds += list(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    return check_seeds(seeds)


def interval(values, level: float = 0.95) -> dict:
    """Mean, standard deviation and the two-sided ``level`` t-interval of the mean over ``values`` (None for a
    single value), ignoring missing ones."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    out = {"mean": float(v.mean()) if v.size else None, "n": int(v.size), "values": [float(x) for x in v]}
    if v.size >= 2:
        sd = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, v.size - 1)) * sd / math.sqrt(v.size)
        out.update(sd=sd, ci95=[out["mean"] - half, out["mean"] + half])
    else:
        out.update(sd=None, ci95=None)
    return out


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics dict (booleans and lists left out), nested keys joined by ``/``."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def run_numbers(run: Path) -> dict[str, float]:
    """The numbers of a run's metrics.json and of its nested analysis folders (``analysis/…``, ``hessian/…``)."""
    numbers = {}
    for path in sorted(Path(run).rglob("metrics.json")):
        rel = path.parent.relative_to(run)
        if any(part.startswith("seed") for part in rel.parts):
            continue  # a seeds parent nested inside: its own aggregate
        prefix = "" if str(rel) == "." else f"{rel.as_posix()}/"
        numbers.update(flat_numbers(json.loads(path.read_text()), prefix))
    return numbers


def aggregate(runs: dict[int, Path]) -> dict:
    """For every number the runs have, its :func:`interval` over the seeds: ``{key: {mean, ci95, sd, n, values}}``."""
    per_seed = {seed: run_numbers(path) for seed, path in runs.items()}
    keys = sorted(set().union(*per_seed.values())) if per_seed else []
    return {key: interval([per_seed[s].get(key) for s in runs]) for key in keys}


def is_seeds_parent(path: str | Path) -> bool:
    config = Path(path) / "config.yaml"
    if not config.is_file():
        return False
    import yaml

    raw = yaml.safe_load(config.read_text()) or {}
    return str(raw.get("command", "")).endswith(" seeds") and "seeds" in raw


def seed_runs(parent: str | Path) -> dict[int, Path]:
    """The seed sub-runs of a seeds parent: ``{seed: path}``."""
    import yaml

    raw = yaml.safe_load((Path(parent) / "config.yaml").read_text())
    return {int(s): Path(parent) / SEED_DIR.format(s) for s in raw["seeds"]}


def run_seeds(command: str, seeds: Iterable[int], out: str | RunDir, train: Callable[[int, RunDir], object],
              config: dict | None = None) -> dict:
    """Run ``train(seed, run_dir)`` for every seed into ``out/seed<N>`` (each run resumes by itself, so a killed
    multi-seed run goes on with the seeds it had not finished and keeps those it had), then write the parent's
    config and its aggregate metrics. Returns the aggregate."""
    seeds = check_seeds(seeds)
    parent = RunDir.of(out)
    old = parent.read_config() if parent.config_path.is_file() else None
    if old and old.get("command") != f"{command} seeds":
        raise BranchspecError(f"{parent.path} holds a '{old.get('command')}' run, not a multi-seed '{command}'; give "
                              "a new `out`.")
    dropped = sorted(set(old.get("seeds", [])) - set(seeds)) if old else []
    if dropped:
        raise BranchspecError(f"{parent.path} holds seeds {old['seeds']}; give them all (more may be added) or a new "
                              "`out`.")
    parent.write_config({"command": f"{command} seeds", "seeds": seeds, **(config or {})})
    for i, seed in enumerate(seeds):
        log.info("seed %d (%d of %d)", seed, i + 1, len(seeds))
        train(seed, parent.sub(SEED_DIR.format(seed)))
    summary = aggregate({s: parent.path / SEED_DIR.format(s) for s in seeds})
    parent.write_metrics({"seeds": seeds, "summary": summary}, merge=False)
    _report(parent, command, seeds)
    return summary


def _report(parent: RunDir, command: str, seeds: list[int]) -> None:
    from branchspec import findings
    from branchspec.report import build_report

    findings.write_parent(parent, command)

    build_report(parent, title=f"{command}: {len(seeds)} seeds")


def write_aggregate(parent: str | Path) -> dict:
    """Recompute a seeds parent's aggregate (after an analysis of every seed)."""
    parent = RunDir(parent, must_exist=True)
    runs = seed_runs(parent.path)
    summary = aggregate(runs)
    parent.write_metrics({"seeds": list(runs), "summary": summary}, merge=False)
    _report(parent, parent.read_config()["command"].removesuffix(" seeds"), list(runs))
    return summary


def format_interval(summary: dict, digits: int = 3) -> str:
    """``0.975 [0.968, 0.982] (n = 3)``, or the mean alone for one seed."""
    if summary.get("mean") is None:
        return "–"
    text = f"{summary['mean']:.{digits}f}"
    if summary.get("ci95"):
        lo, hi = summary["ci95"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{text} (n = {summary['n']})"


def for_each_seed(run: str | Path, analyse: Callable[[Path], object]):
    """``analyse(run)``; for a seeds parent, ``analyse`` of every seed's run and then the parent's aggregate
    (which is returned)."""
    if not is_seeds_parent(run):
        return analyse(Path(run))
    for seed, path in seed_runs(run).items():
        log.info("seed %d: %s", seed, path)
        analyse(path)
    return write_aggregate(run)
