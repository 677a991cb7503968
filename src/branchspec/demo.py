"""The demo: every study on its embedded default, one run directory, one report (``make demo``).

Each part is a module with ``demo(run: RunDir, show_progress: bool, made: dict) -> dict`` that writes into its
own sub-directory and returns the runs it made that later parts use (``made`` holds those of the parts before
it). A part that needs another part's run (the Hessian needs the toy sweep and the classifier; NAD the
classifier) gets that part run first, even when it was not asked for.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from branchspec.errors import BranchspecError, log
from branchspec.report import build_report
from branchspec.rundir import RunDir

PARTS: list[tuple[str, str]] = [
    ("toy", "branchspec.studies.toy"),
    ("decompose", "branchspec.studies.decompose"),
    ("classify", "branchspec.studies.classify"),
    ("hessian", "branchspec.studies.hessian"),
    ("nad", "branchspec.studies.nad"),
    ("parts", "branchspec.studies.parts"),
]
NEEDS = {"hessian": ["toy", "classify"], "nad": ["classify"]}


def run_demo(out: str | Path = "runs/demo", parts: list[str] | None = None, show_progress: bool = True) -> Path:
    known = dict(PARTS)
    asked = list(known) if parts is None else parts
    unknown = [p for p in asked if p not in known]
    if unknown:
        raise BranchspecError(f"unknown demo part(s) {unknown}; choose from {list(known)}.")
    needed = {n for p in asked for n in NEEDS.get(p, [])}
    order = [name for name, _ in PARTS if name in asked or name in needed]
    run = RunDir(out)
    run.write_config({"command": "demo", "parts": asked, "run_for_other_parts": sorted(needed - set(asked))})
    seconds, made = {}, {}
    for name in order:
        log.info("demo: %s ...%s", name, "" if name in asked else " (needed by a later part)")
        start = time.perf_counter()
        made.update(importlib.import_module(known[name]).demo(run.sub(name), show_progress=show_progress,
                                                              made=dict(made)) or {})
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("demo: %s done in %s s", name, seconds[name])
        run.write_metrics({"seconds": seconds})
    return build_report(run, title="branchspec demo")
