"""``branchspec parts``: the paper's branch analyses on the parallel parts of your own model."""

from __future__ import annotations

from branchspec.cli.common import name_list, positive_int


def register(sub) -> None:
    p = sub.add_parser("parts", help="analyse the parallel parts of your model: attention heads, experts, groups",
                       description="Find the parts at a module of your model (the heads of an attention layer, the "
                                   "experts of a mixture, the groups before a linear layer, a branched model's "
                                   "branches) and measure them as the paper measures branches: active and silent "
                                   "parts (raw and centred), correlation, ablation and head importance.")
    p.add_argument("--model", required=True, help="FILE.py:FACTORY or package.module:FACTORY (called with no argument)")
    p.add_argument("--weights", default=None, help="a state dict (.pt or .safetensors)")
    p.add_argument("--data", required=True, help="a .pt or .npz file with tensors x and y, or an image source "
                   "('digits', an image tree or a tar), its test split")
    p.add_argument("--at", type=name_list, default=[], metavar="MODULES",
                   help="comma-separated module names of the sites (default: the model's own branches)")
    p.add_argument("--groups", type=positive_int, default=None, help="a linear site's input groups (heads, groups)")
    p.add_argument("--limit", type=positive_int, default=1000, help="inputs analysed (default: 1000)")
    p.add_argument("--size", type=positive_int, default=None, help="image side for image sources (default: 32)")
    p.add_argument("--analyses", type=name_list, default=["activity", "correlation", "ablation", "importance"],
                   metavar="LIST", help="activity, correlation, ablation, importance, contribution (default: all "
                   "but contribution, which needs parts at the logits)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.set_defaults(func=_parts)


def _parts(args) -> int:
    from branchspec.studies.parts import PartsConfig, run_parts

    metrics = run_parts(PartsConfig(model=args.model, weights=args.weights, data=args.data, at=args.at,
                                    groups=args.groups, limit=args.limit, size=args.size, analyses=args.analyses),
                        args.out)
    for site, m in metrics["sites"].items():
        print(f"{site}: {m['num_parts']} {m['kind']}; " + "; ".join(m["findings"]))
    print(f"wrote {args.out}/report.html")
    return 0
