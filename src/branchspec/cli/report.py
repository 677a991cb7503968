"""``branchspec report DIR``: rebuild the self-contained HTML report of a run directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="build DIR/report.html from a run directory",
                       description="Turn a run directory (and the runs nested in it) into one self-contained HTML page.")
    p.add_argument("run", metavar="DIR", help="a run directory")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from branchspec.report import build_report

    print(f"wrote {build_report(args.run, title=args.title, must_hold_a_run=True)}")
    return 0
