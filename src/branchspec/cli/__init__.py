"""The ``branchspec`` command: a thin layer that parses arguments and calls the library.

Each command group lives in its own module here (``toy``, ``report``, ``demo``, ...), which defines
``register(subparsers)``. Errors in the input end the command with one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from branchspec.errors import BranchspecError, Interrupted

COMMANDS = ("toy", "report", "demo", "decompose", "classify", "nad", "hessian", "parts")


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from branchspec import __version__

    parser = Parser(prog="branchspec", description="Branch specialization and architecture disentanglement.")
    parser.add_argument("--version", action="version", version=f"branchspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"branchspec.cli.{name}").register(sub)
    return parser


def _options(parser: argparse.ArgumentParser, args) -> set[str]:
    """The option strings of the (sub)command that ``args`` ran."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub else None
        if sub is None or name not in sub.choices:
            return {o for a in parser._actions for o in a.option_strings}
        parser = sub.choices[name]


def as_flags(message: str, options: set[str]) -> str:
    """A library message names Python parameters as `name`; on the command line they are the command's flags
    (`lr` → --lr, `batch_size` → --batch-size). A name with no flag keeps its quotes."""
    import re

    def flag(match):
        option = "--" + match.group(1).replace("_", "-")
        return option if option in options else match.group(0)

    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)


class _Stderr(__import__("logging").Handler):
    """One line per message on whatever ``sys.stderr`` is at the time (it may be replaced, as tests do)."""

    def emit(self, record) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def _setup_process() -> None:
    """What a command-line process of branchspec sets up once: the ``branchspec`` logger printed as one line per
    message on stderr, freed memory kept for reuse (:func:`branchspec.devices.keep_freed_memory`; the
    environment variable ``BRANCHSPEC_RAW_ALLOCATOR=1`` leaves the allocator alone, for benchmarks), and
    subnormal floats flushed to zero in every thread (:func:`branchspec.devices.flush_denormals`;
    ``BRANCHSPEC_KEEP_DENORMALS=1`` keeps them)."""
    import logging
    import os

    from branchspec.devices import flush_denormals, keep_freed_memory
    from branchspec.errors import log

    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("branchspec: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if os.environ.get("BRANCHSPEC_RAW_ALLOCATOR") != "1":
        keep_freed_memory()
    if os.environ.get("BRANCHSPEC_KEEP_DENORMALS") != "1":
        flush_denormals()  # before torch starts its threads, which copy the flag from this one
    import matplotlib

    matplotlib.use("Agg")  # figures go to files; the library itself leaves the backend alone
    _quiet_dependencies()


# What the dependencies print that a user of the command line cannot act on (each was seen in a run's log).
_SILENCED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # a deprecation inside Lightning's own code
    r"The number of training batches .* is smaller than the logging interval",  # short epochs log at their end
    r"You're resuming from a checkpoint that ended before the epoch ended",  # our batches follow the global step
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",  # ours are always the same
)


def _quiet_dependencies() -> None:
    """Lightning's adverts and notices (the "Tip", "GPU available", "`Trainer.fit` stopped") and the warnings
    above; Lightning's own warnings and errors still show."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - it sets its logger's level when imported: import it first

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_process()
    try:
        return int(args.func(args) or 0)
    except BranchspecError as err:
        print(f"branchspec: error: {as_flags(str(err), _options(parser, args))}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"branchspec: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("branchspec: interrupted; what was finished is saved in the run directory.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
