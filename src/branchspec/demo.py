"""The demo: every study on its embedded default, one run directory, one report (``make demo``).

Each part is a module with ``demo(run: RunDir, show_progress: bool)`` that writes into its own sub-directory.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from branchspec.errors import BranchspecError
from branchspec.report import build_report
from branchspec.rundir import RunDir

PARTS: list[tuple[str, str]] = [
    ("toy", "branchspec.studies.toy"),
    ("decompose", "branchspec.studies.decompose"),
    ("classify", "branchspec.studies.classify"),
    ("hessian", "branchspec.studies.hessian"),
    ("nad", "branchspec.studies.nad"),
]


def run_demo(out: str | Path = "runs/demo", parts: list[str] | None = None, show_progress: bool = True) -> Path:
    known = dict(PARTS)
    parts = list(known) if parts is None else parts
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise BranchspecError(f"unknown demo part(s) {unknown}; choose from {list(known)}.")
    run = RunDir(out)
    run.write_config({"command": "demo", "parts": parts})
    seconds = {}
    for name in parts:
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        importlib.import_module(known[name]).demo(run.sub(name), show_progress=show_progress)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[demo] {name} done in {seconds[name]} s", flush=True)
        run.write_metrics({"seconds": seconds})
    return build_report(run, title="branchspec demo")
