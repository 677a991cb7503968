"""``branchspec report DIR [DIR ...]``: rebuild the self-contained HTML report of a run directory, or compare runs."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="build DIR/report.html from a run directory, or compare several runs",
                       description="Turn a run directory (and the runs nested in it) into one self-contained HTML "
                                   "page; with several directories, put their numbers side by side (a multi-seed "
                                   "run contributes its intervals) in --out.")
    p.add_argument("runs", metavar="DIR", nargs="+", help="run directories")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--out", default="comparison.html", help="several runs: the page to write (default: "
                   "comparison.html)")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from branchspec.report.html import build_comparison, build_report

    if len(args.runs) == 1:
        print(f"wrote {build_report(args.runs[0], title=args.title, must_hold_a_run=True)}")
    else:
        print(f"wrote {build_comparison(args.runs, args.out, title=args.title)}")
    return 0
