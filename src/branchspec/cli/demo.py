"""``branchspec demo``: the main job on the embedded defaults (what ``make demo`` runs)."""

from __future__ import annotations


def register(sub) -> None:
    from branchspec.demo import PARTS

    names = [name for name, _ in PARTS]
    p = sub.add_parser("demo", help="run every study on its embedded default data and write one report",
                       description="Run the studies on embedded data (no downloads) and write DIR/report.html.")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--parts", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from branchspec.demo import run_demo

    report = run_demo(args.out, parts=[p.strip() for p in args.parts.split(",") if p.strip()])
    print(f"wrote {report}")
    return 0
