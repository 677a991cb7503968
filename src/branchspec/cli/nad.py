"""``branchspec nad search`` and ``branchspec nad evaluate``: architecture disentanglement (docs/nad.md)."""

from __future__ import annotations

import argparse

from branchspec.cli.common import finite_float, float_list, int_list, name_list, positive_int


def _fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value


def register(sub) -> None:
    p = sub.add_parser("nad", help="architecture disentanglement: per-class sub-architectures (NAD)",
                       description="Architecture disentanglement (Hu et al., ICCV 2021): per-class sub-architectures "
                                   "of a trained classifier, and where and how they separate.")
    cmds = p.add_subparsers(dest="nad_command", metavar="SUBCOMMAND", required=True)

    s = cmds.add_parser("search", help="learn each class's channel gates and save the binary masks",
                        description="Learn per-class channel gates on a frozen classifier (the training split) and "
                                    "save the sub-architectures as masks.npz + masks.json in --out.")
    src = s.add_argument_group("the classifier (give --run, or --model with --weights and --data)")
    src.add_argument("--run", help="a `branchspec classify train` run directory")
    src.add_argument("--checkpoint", default="last", help="of --run: last, init or a weights path (default: last)")
    src.add_argument("--model", metavar="FILE.py:FACTORY",
                     help="any PyTorch CNN classifier: a factory called with no argument (or package.module:FACTORY)")
    src.add_argument("--weights", help="with --model: its state dict (.pt/.pth/.ckpt or .safetensors)")
    src.add_argument("--data", help="with --model: digits, a cifar-10-batches-py folder, an image tree "
                                    "ROOT/{train,test}/<class>/*, or a .tar(.gz) of one")
    src.add_argument("--mean", type=float_list, help="with --model: per-channel mean of images in [0, 1] "
                                                  "(default: ImageNet's 0.485,0.456,0.406)")
    src.add_argument("--std", type=float_list, help="with --model: per-channel std (default: ImageNet's)")
    src.add_argument("--size", type=positive_int,
                     help="with --model: resize image-tree images to this side (default 32)")
    src.add_argument("--limit-per-class", type=positive_int, help="with --model: the first N images of each class")
    s.add_argument("--out", help="output folder (default: DIR/nad for --run DIR; required with --model)")
    s.add_argument("--layers", type=name_list, help="comma-separated module names to gate (relative to a branch); "
                                                 "default: every residual block")
    s.add_argument("--classes", type=lambda t: int_list(t, minimum=0), help="class indices to search, e.g. 0-9 "
                                                                             "(default: all)")
    s.add_argument("--beta", type=finite_float, help="sparsity weight β (default: 1 for a classify run, chosen in "
                                                     "docs/nad.md; 0.02, the authors' ResNet50 value, for --model)")
    s.add_argument("--lr", type=finite_float, default=0.1, help="step size (default: 0.1)")
    s.add_argument("--optimizer", choices=("normalized", "adam"), default="normalized",
                   help="normalized: the authors' unit-norm gradient step per layer (default); adam")
    s.add_argument("--epochs", type=positive_int, default=20, help="passes over the largest class (default: 20)")
    s.add_argument("--min-steps", type=positive_int, default=1640,
                   help="but at least this many steps (default: 1640, the authors' ImageNet search)")
    s.add_argument("--steps", type=positive_int, help="search steps (overrides --epochs and --min-steps)")
    s.add_argument("--batch-size", type=positive_int, default=16, help="images of each class per step (default: 16)")
    s.add_argument("--crop-padding", type=int, help="random-crop padding (default: the classifier's, else 4)")
    s.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: the classifier's, else on)")
    s.add_argument("--classes-per-pass", type=positive_int,
                   help="classes searched together in one program (default: all; lower it when memory is short)")
    s.add_argument("--execution", choices=("auto", "fused", "loop"), default="auto",
                   help="branched slim ResNets: fused (auto) or the per-branch loop")
    s.add_argument("--seed", type=int, default=0, help="seed of the gates, batches and augmentation (default: 0)")
    _device(s)
    s.add_argument("--evaluate", action="store_true", help="run `nad evaluate` with its defaults afterwards")
    s.set_defaults(func=_search)

    e = cmds.add_parser("evaluate", help="hit rate, similarity, misclassification and branch link of a search",
                        description="Measure the sub-architectures of a `nad search` output (the test split): "
                                    "metrics.json, figures and report.html in the same folder.")
    e.add_argument("--run", required=True, help="the --out of `branchspec nad search`")
    e.add_argument("--mosaics", type=positive_int, default=100, help="2×2 mosaics (default: 100)")
    e.add_argument("--mask-rate", type=_fraction, default=0.1, help="share of top pixels (default: 0.1)")
    e.add_argument("--mosaic-scale", type=_fraction, default=1.0,
                   help="resize the 2S×2S mosaic by this factor; 0.5 feeds it at the input size S, as the authors "
                        "do at 224 (default: 1)")
    e.add_argument("--top-k", type=positive_int, default=3, help="most similar sub-architectures (default: 3)")
    e.add_argument("--detection-images", type=positive_int, default=50,
                   help="test images per class on which each sub-architecture is run (default: 50)")
    e.add_argument("--permutations", type=int, default=1000, help="of the branch-link test (default: 1000)")
    e.add_argument("--seed", type=int, default=0, help="seed of the mosaics and permutations (default: 0)")
    _device(e, default=None)
    e.set_defaults(func=_evaluate)


def _device(p, default="auto") -> None:
    p.add_argument("--device", default=default, help="cpu, cuda, cuda:N or auto" +
                   (" (default: auto)" if default else " (default: the search's)"))
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"),
                   help="default: bf16-mixed on CUDA, 32-true on the CPU")


def _search(args) -> int:
    import dataclasses
    from pathlib import Path

    from branchspec.errors import BranchspecError
    from branchspec.studies.nad import run_evaluate, run_search

    from branchspec.seeds import for_each_seed, format_interval, is_seeds_parent

    if args.run and is_seeds_parent(args.run):  # every seed's classifier, into RUN/seed<N>/nad (or OUT/seed<N>)
        cfg = search_config(args)

        def one(run):
            out = Path(args.out) / run.name if args.out else run / "nad"
            run_search(dataclasses.replace(cfg, run=str(run)), out)
            if args.evaluate:
                run_evaluate(out)

        summary = for_each_seed(args.run, one)
        hit = summary.get("nad/hit_rate/last3_mean")
        print(f"wrote {args.run}/report.html" + (f" (hit rate of the last 3 layers {format_interval(hit)})"
                                                  if hit else ""))
        return 0
    out = args.out or (str(Path(args.run) / "nad") if args.run else None)
    if out is None:
        raise BranchspecError("--model needs --out (the folder to write the masks into).")
    sub = run_search(search_config(args), out)
    missing = sub.info["classes_without_correct"]
    print(f"wrote {out}/masks.npz, masks.json and report.html ({int(sub.searched.sum())} classes searched"
          + (f"; not searched, no correctly classified image: {missing}" if missing else "") + ")")
    if args.evaluate:
        _report_evaluation(out, run_evaluate(out))
    return 0


def search_config(args):
    """The NADConfig of ``nad search``'s arguments."""
    from branchspec.analysis.nad import SearchSettings
    from branchspec.studies.nad import NADConfig

    settings = SearchSettings(beta=args.beta, lr=args.lr, optimizer=args.optimizer, epochs=args.epochs,
                              min_steps=args.min_steps, steps=args.steps, batch_size=args.batch_size,
                              crop_padding=args.crop_padding, flip=args.flip, seed=args.seed,
                              classes_per_pass=args.classes_per_pass)
    return NADConfig(run=args.run, checkpoint=args.checkpoint, model=args.model, weights=args.weights, data=args.data,
                     mean=args.mean, std=args.std, size=args.size, limit_per_class=args.limit_per_class,
                     layers=args.layers, classes=args.classes, search=settings, execution=args.execution,
                     device=args.device, precision=args.precision)


def evaluate_config(args):
    """The EvalConfig of ``nad evaluate``'s arguments."""
    from branchspec.studies.nad import EvalConfig

    return EvalConfig(mosaics=args.mosaics, mask_rate=args.mask_rate, mosaic_scale=args.mosaic_scale,
                      top_k=args.top_k, detection_images=args.detection_images, permutations=args.permutations,
                      seed=args.seed, device=args.device, precision=args.precision)


def _evaluate(args) -> int:
    from pathlib import Path

    from branchspec.seeds import for_each_seed, is_seeds_parent
    from branchspec.studies.nad import run_evaluate

    if is_seeds_parent(args.run):  # a classifier's seeds parent searched by `nad search`: every seed's RUN/seed<N>/nad
        cfg = evaluate_config(args)
        for_each_seed(args.run, lambda run: run_evaluate(Path(run) / "nad", cfg))
        print(f"wrote {args.run}/report.html")
        return 0
    _report_evaluation(args.run, run_evaluate(args.run, evaluate_config(args)))
    return 0


def _report_evaluation(out, metrics: dict) -> None:
    hr, mis, det = metrics.get("hit_rate", {}), metrics.get("misclassification", {}), metrics.get("detection")
    parts = [] if det else ["no class could be searched"]
    if det:
        parts.append(f"sub-architectures: recall {det['mean_recall']:.3f}, false positives "
                     f"{det['mean_false_positive_rate']:.3f}")
    if "last3_mean" in hr:
        parts.append(f"hit rate of the last 3 layers {hr['last3_mean']:.3f} (chance 0.25)")
    if mis.get("rate") is not None:
        parts.append(f"true class among the top-{mis['k']} similar: {mis['rate']:.3f} (chance {mis['chance']:.3f})")
    if "branch_link" in metrics and metrics["branch_link"]["pearson"] is not None:
        parts.append(f"branch link r = {metrics['branch_link']['pearson']:.3f}")
    print(f"wrote {out}/metrics.json and report.html" + (": " + "; ".join(parts) if parts else ""))
