"""The silent-branch grid of the evidence issue: does any recipe make the branched classifier's branches silent?

    .venv/bin/python experiments/silent_branches.py --out runs/silent [--workers 2] [--seeds 0,1,2]

On the embedded digits (the CPU allows the grid there), M = 16 and 32, 3 seeds, every combination of
- the clamp: the restoring clamp (``clamped_ce``, our default) or the literal ``torch.clamp`` (``clamped_ce_literal``);
- the heads' initial scale: 1/M (our default) or PyTorch's (``--head-scale 1``);
- the schedule: 30-epoch one-cycle (peak lr 0.05) or a long cosine (150 epochs from lr 0.05 to 0,
  kuangliu/pytorch-cifar's schedule);
- the total weight decay Σ_t lr_t·wd: today's (wd 5e-4: 0.004 one-cycle, 0.02 cosine) or 2, about what the
  kuangliu recipe gives on CIFAR-10 (SGD 0.1, cosine, 200 epochs, wd 5e-4); wd is solved for it.
Batch 128. Each cell is a multi-seed run (``classify train --seeds``) analysed by ``classify analyze``; the
table (runs/silent/table.json and table.md) gives test accuracy, active and silent branches on raw and on
mean-centred responses, the constant branches, and the smallest/largest response-norm ratios, each as the mean
and 95% interval over the seeds. Cells run ``--workers`` at a time, one thread each; a killed grid resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Event

from branchspec.seeds import format_interval
from branchspec.train.classify import Recipe, total_weight_decay

STEPS_PER_EPOCH = 1437 // 128  # the digits' training split at batch 128
SCHEDULES = {"onecycle30": ("one-cycle", 30), "cosine150": ("cosine", 150)}
CLAMPS = {"restoring": "clamped_ce", "literal": "clamped_ce_literal"}
HEADS = {"heads1overM": None, "headsdefault": 1.0}
DECAYS = ("wd-today", "wd-2")
LR = 0.05


def weight_decay(schedule: str, epochs: int, level: str) -> float:
    if level == "wd-today":
        return 5e-4
    per_unit = total_weight_decay(Recipe(epochs=epochs, lr=LR, weight_decay=1.0, schedule=schedule),
                                  epochs * STEPS_PER_EPOCH)
    return 2.0 / per_unit


def cells():
    for m, clamp, heads, sched, decay in itertools.product((16, 32), CLAMPS, HEADS, SCHEDULES, DECAYS):
        schedule, epochs = SCHEDULES[sched]
        args = ["--data", "digits", "--branches", str(m), "--epochs", str(epochs), "--batch-size", "128",
                "--lr", str(LR), "--schedule", schedule, "--weight-decay", f"{weight_decay(schedule, epochs, decay):.6g}",
                "--loss", CLAMPS[clamp], "--device", "cpu"]
        if HEADS[heads] is not None:
            args += ["--head-scale", str(HEADS[heads])]
        yield f"M{m}_{clamp}_{heads}_{sched}_{decay}", args


STOP = Event()  # set when a cell fails or is interrupted: no further cell starts


def run_cell(name: str, args: list[str], out: Path, seeds: str) -> str:
    exe = str(Path(sys.executable).with_name("branchspec"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cell = out / name
    log = (out / f"{name}.log").open("a")
    for cmd in ([exe, "classify", "train", *args, "--seeds", seeds, "--out", str(cell)],
                [exe, "classify", "analyze", "--run", str(cell), "--top-percent", "10"]):
        if STOP.is_set():
            return f"{name} not started (an earlier cell stopped)"
        if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            STOP.set()
            return f"{name} stopped (see {out / name}.log; run the grid again to resume it)"
    return f"done {name}"


KEYS = {"test accuracy": "test_accuracy", "active (raw)": "analysis/num_active",
        "silent (raw)": "analysis/num_silent", "active (centred)": "analysis/num_active_centred",
        "silent (centred)": "analysis/num_silent_centred", "constant": "analysis/num_constant",
        "min/max norm (raw)": "analysis/norm_ratio_min", "min/max norm (centred)": "analysis/centred_norm_ratio_min",
        "mean |corr| (at init)": ("analysis/mean_abs_offdiagonal_correlation",
                                  "analysis/mean_abs_offdiagonal_correlation_at_init"),
        "top-branch share (at init)": ("analysis/mean_top_branch_share", "analysis/mean_top_branch_share_at_init"),
        "branches per class": "analysis/mean_branches_per_class", "Σ lr·wd": "total_weight_decay"}


def cell_text(label: str, value) -> str:
    digits = 3 if "norm" in label or "acc" in label or "wd" in label else 2
    if isinstance(value, tuple):  # trained (at initialization)
        return f"{cell_text(label, value[0])} ({cell_text(label, value[1])})"
    return re.sub(r" \(n = \d+\)", "", format_interval(value, digits)) if value else "–"  # n: the table's note


def table(out: Path) -> None:
    rows = {}
    for name, _ in cells():
        path = out / name / "metrics.json"
        if path.is_file():
            summary = json.loads(path.read_text()).get("summary", {})
            rows[name] = {label: tuple(summary.get(k) for k in key) if isinstance(key, tuple) else summary.get(key)
                          for label, key in KEYS.items()}
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| cell | " + " | ".join(k.replace("|", "\\|") for k in KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell_text(k, v) for k, v in row.items()) + " |")
    lines.append("")
    lines.append("Each cell: the mean and 95% interval over the seeds (n = " +
                 ", ".join(sorted({str(v["n"]) for row in rows.values() for v in row.values() if isinstance(v, dict)})) +
                 "), a t interval; in parentheses after a value, the same at initialization.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/silent")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only the cells whose name has one")
    p.add_argument("--table", action="store_true", help="only write the table of what has finished")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        todo = [(n, a) for n, a in cells() if not args.only or any(s in n for s in args.only.split(","))]
        with ThreadPoolExecutor(args.workers) as pool:
            for line in pool.map(lambda c: run_cell(*c, out, args.seeds), todo):
                print(line, flush=True)
    table(out)


if __name__ == "__main__":
    main()
