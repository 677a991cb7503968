"""The 1-D toy data sets of Sec. 4.1, and any (x, y) set a user gives.

Toy1 (a 1-D XOR-like classification): X = {-1, 0, 0, 1}, Y = {1, 0.5, 0.5, 1}.
Toy2 (a regression):                  X = {-1, 0, 1, 2}, Y = {1, 0.25, 0.5, 0.75}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from branchspec.errors import BranchspecError


@dataclass(frozen=True)
class ToySet:
    """N scalar inputs and targets."""

    name: str
    x: np.ndarray  # [N] float64
    y: np.ndarray  # [N] float64

    def __len__(self) -> int:
        return len(self.x)


def make_toyset(x, y, name: str = "custom") -> ToySet:
    """A toy set from two sequences of numbers, checked: non-empty, equal lengths, finite, 1-D."""
    try:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        raise BranchspecError(f"toy set {name!r}: x and y must be numbers.") from None
    if x.ndim != 1 or y.ndim != 1:
        raise BranchspecError(f"toy set {name!r}: x and y must be 1-D lists of numbers, got shapes {x.shape} and {y.shape}.")
    if len(x) == 0:
        raise BranchspecError(f"toy set {name!r} is empty; give at least one (x, y) pair.")
    if len(x) != len(y):
        raise BranchspecError(f"toy set {name!r}: x has {len(x)} values but y has {len(y)}; give one y per x.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise BranchspecError(f"toy set {name!r} holds a non-finite value (nan or inf); give finite numbers.")
    return ToySet(name, x, y)


TOY1 = make_toyset([-1, 0, 0, 1], [1, 0.5, 0.5, 1], "toy1")
TOY2 = make_toyset([-1, 0, 1, 2], [1, 0.25, 0.5, 0.75], "toy2")
BUILTIN = {"toy1": TOY1, "toy2": TOY2}


def load_toyset(spec: str) -> ToySet:
    """``toy1``, ``toy2``, or a file: ``.csv`` (two columns x, y; an optional header), ``.json``
    (``{"x": [...], "y": [...]}``) or ``.npz`` (arrays ``x`` and ``y``)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise BranchspecError(f"`toy` {spec!r} is neither {' nor '.join(BUILTIN)} nor an existing file.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            x, y = data["x"], data["y"]
        elif suffix == ".npz":
            with np.load(path) as data:
                x, y = data["x"], data["y"]
        elif suffix in (".csv", ".txt", ".tsv"):
            x, y = _read_columns(path)
        else:
            raise BranchspecError(f"toy file {path} must be .csv, .json or .npz.")
    except (KeyError, TypeError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, BranchspecError):
            raise
        raise BranchspecError(f"cannot read x and y from {path} ({type(err).__name__}: {err}).") from None
    return make_toyset(x, y, path.stem)


def _read_columns(path: Path) -> tuple[list[float], list[float]]:
    rows = [line.replace("\t", ",").replace(";", ",").split(",") for line in path.read_text().splitlines() if line.strip()]
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]  # header
    if any(len(r) != 2 for r in rows):
        raise BranchspecError(f"{path} must have exactly two columns, x and y, on every line.")
    try:
        return [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    except ValueError as err:
        raise BranchspecError(f"{path} holds a value that is not a number ({err}).") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
