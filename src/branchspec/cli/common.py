"""Argument types and option groups shared by the command modules."""

from __future__ import annotations

import argparse
import math
import re


def int_list(text: str, minimum: int = 1) -> list[int]:
    """``"2-30"``, ``"2,4,8"`` or ``"2-10,20"`` as a sorted list of distinct integers ≥ ``minimum``."""
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers or ranges such as 2-30 or 2,4,8")
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if lo < minimum or hi < lo:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not an increasing range of integers ≥ {minimum}")
        values.update(range(lo, hi + 1))
    return sorted(values)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def float_list(text: str) -> list[float]:
    """``"0.5,0.25,1"`` as a list of finite numbers."""
    values = [finite_float(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} holds no number")
    return values


def name_list(text: str) -> list[str]:
    """``"layer1.0, layer2.1"`` as a list of non-empty names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} holds no name")
    return names


def add_trainer_options(p, checkpoint_every: int | None = None) -> None:
    """The options of a Lightning training run: where it runs, DDP, precision and checkpoints."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda: Lightning's accelerator (default: auto)")
    p.add_argument("--devices", type=_devices, default="auto", help="devices per node, or auto (default: auto)")
    p.add_argument("--num-nodes", type=positive_int, default=1, help="nodes for DDP (default: 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto; DDP when "
                   "several devices)")
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed, 32-true (default: "
                   "bf16-mixed on CUDA, 32-true on the CPU)")
    p.add_argument("--checkpoint-every", type=positive_int, default=checkpoint_every,
                   help="also checkpoint every N steps" + (f" (default: {checkpoint_every})" if checkpoint_every
                                                           else " (always at the end of each epoch)"))
    p.add_argument("--checkpoint-minutes", type=finite_float, default=10.0,
                   help="and every this many minutes of wall-clock (default: 10); Ctrl-C also saves, then stops")
    p.add_argument("--change-lr", action="store_true",
                   help="resume with a different --lr (after a non-finite loss); the change is recorded in "
                        "config.yaml")


def _devices(text: str) -> int | str:
    return positive_int(text) if text != "auto" else text


def seed_list(text: str) -> list[int]:
    """``--seeds``: ``0,1,2`` or ``0-4``: distinct non-negative integers."""
    from branchspec.errors import BranchspecError
    from branchspec.seeds import parse_seeds

    try:
        return parse_seeds(text)
    except BranchspecError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--seeds takes ").rstrip(".")) from None


def add_seeds_option(p, what: str = "run") -> None:
    p.add_argument("--seeds", type=seed_list, default=None, metavar="LIST",
                   help=f"several seeds, e.g. 0,1,2 or 0-4: one {what} per seed in OUT/seed<N>, and in OUT/metrics.json "
                        "the mean and 95%% interval of every number over the seeds (replaces --seed)")
