"""``branchspec classify train | analyze | sweep``: the branched CIFAR-10 classifier of Sec. 6 (Figs. 5-8, 16-17)."""

from __future__ import annotations

from branchspec.cli.common import add_seeds_option, add_trainer_options, finite_float, int_list, positive_int


def register(sub) -> None:
    cls = sub.add_parser("classify", help="the branched slim-ResNet18 classifier of Sec. 6 (Figs. 5-8, 16-17)",
                         description="Train branched classifiers on CIFAR-10 or digits and analyse their branches.")
    cmds = cls.add_subparsers(dest="classify_command", metavar="SUBCOMMAND", required=True)

    train = cmds.add_parser("train", help="train (or resume) a branched classifier",
                            description="Train M slim ResNet18 branches summed into one classifier; an existing "
                                        "--out with the same options resumes exactly where it stopped.")
    _training(train)
    add_seeds_option(train)
    train.add_argument("--branches", type=positive_int, default=16, help="M (default: 16)")
    train.set_defaults(func=_train)

    sweep = cmds.add_parser("sweep", help="one run per M, then active/silent counts and covariance against M",
                            description="Fig. 5 left and Fig. 17: train a classifier for each M (each resumable).")
    _training(sweep)
    sweep.add_argument("--branches", type=int_list, default=[2, 4, 8, 16, 32], metavar="LIST",
                       help="values of M (default: 2,4,8,16,32)")
    sweep.set_defaults(func=_sweep)

    an = cmds.add_parser("analyze", help="Figs. 5-8, 16: activity, covariance, confidence, contributions, ablation",
                         description="Analyse a trained run; writes RUN/analysis and rebuilds RUN/report.html.")
    an.add_argument("--run", required=True, help="the --out of a 'classify train' run")
    an.add_argument("--checkpoint", default="last", help="last, init, or a weights file (default: last)")
    an.add_argument("--samples-per-class", type=positive_int, default=20, help="Fig. 7 samples per class (default: 20)")
    an.add_argument("--top-percent", default="2,7", help="Figs. 8 and 16: top-p%% confidence grids (default: 2,7)")
    an.add_argument("--top-branches", type=positive_int, default=2, help="branches shown in Fig. 8 (default: 2)")
    an.add_argument("--classes", default=None, help="classes shown in Fig. 8, e.g. horse,deer,bird (default: the 3 "
                                                    "shared by the most branches)")
    an.add_argument("--seed", type=int, default=0, help="seed of the Fig. 7 sample (default: 0)")
    an.add_argument("--device", default="cpu", help="device for the forward passes (default: cpu)")
    an.set_defaults(func=_analyze)


def _training(p) -> None:
    p.add_argument("--data", default="digits", help="digits, a cifar-10-batches-py folder, an image tree "
                                                    "ROOT/train/<class>/*, or a .tar(.gz) of one (default: digits)")
    p.add_argument("--out", required=True, help="run directory to write (or resume)")
    p.add_argument("--epochs", type=positive_int, default=30, help="epochs (default: 30)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="batch size per device (default: 512)")
    p.add_argument("--lr", type=finite_float, default=0.1, help="one-cycle peak learning rate (default: 0.1)")
    p.add_argument("--momentum", type=finite_float, default=0.9, help="Nesterov momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=finite_float, default=5e-4, help="weight decay (default: 5e-4)")
    p.add_argument("--total-weight-decay", type=finite_float, default=None, metavar="TOTAL",
                   help="solve the weight decay so that Σ lr·wd over the run is TOTAL (default: --weight-decay as given)")
    p.add_argument("--recipe", choices=("paper-long",), default=None,
                   help="a named recipe; options given explicitly win. paper-long: 150 epochs of cosine from lr 0.05, "
                        "batch 128, Σ lr·wd = 2 (kuangliu/pytorch-cifar's total on CIFAR-10; the grid's recipe whose "
                        "branches go constant, docs/results.md)")
    p.add_argument("--schedule", choices=("one-cycle", "cosine"), default="one-cycle",
                   help="learning-rate schedule: one-cycle (peak --lr after a 25%% warm-up) or cosine (from --lr to 0, "
                        "kuangliu/pytorch-cifar's) (default: one-cycle)")
    p.add_argument("--loss", default="clamped_ce", help="clamped_ce (the paper's, trainable), clamped_ce_literal "
                                                        "(torch.clamp), cross_entropy (plain CE) (default: clamped_ce)")
    p.add_argument("--head-scale", type=finite_float, default=None,
                   help="multiply the heads' initial weights by this (default: 1/M, the sum starts inside the clamp)")
    p.add_argument("--widths", type=_widths, default=[5, 11, 21, 43], help="stage widths of a branch (default: 5,11,21,43 = 79,262 parameters)")
    p.add_argument("--execution", choices=("auto", "lanes", "fused", "loop", "vmap"), default="auto",
                   help="auto: the fastest exact execution here (lanes on a CPU for M a multiple of 8, else fused); "
                        "lanes: branch-minor layout with lane convolutions; fused: grouped convolutions; loop: the "
                        "per-branch reference (default: auto)")
    p.add_argument("--crop-padding", type=int, default=None, help="random-crop padding (default: 4; digits 1)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips (digits: never flipped)")
    p.add_argument("--limit-per-class", type=positive_int, default=None, help="train on the first N images per class")
    p.add_argument("--test-limit-per-class", type=positive_int, default=None, help="test on the first N per class")
    p.add_argument("--size", type=positive_int, default=None, help="image side for image trees (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, shuffling and augmentation (default: 0)")
    p.add_argument("--eval-every", type=positive_int, default=1, help="test every N epochs (default: 1)")
    add_trainer_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass (GPU)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory layout")


def _widths(text: str) -> list[int]:
    import argparse

    try:
        widths = [int(v) for v in text.split(",")]
    except ValueError:
        widths = []
    if len(widths) != 4 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not four positive stage widths such as 5,11,21,43")
    return widths


def _config(args, branches: int):
    import dataclasses

    from branchspec.errors import BranchspecError
    from branchspec.studies.classify import ClassifyConfig
    from branchspec.train.classify import PRESETS, Recipe

    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, schedule=args.schedule, crop_padding=args.crop_padding,
                    flip=False if args.no_flip else None, total_decay=args.total_weight_decay)
    explicit_decay = args.weight_decay != Recipe().weight_decay
    if explicit_decay and args.total_weight_decay is not None:
        raise BranchspecError("give --weight-decay or --total-weight-decay, not both.")
    if args.recipe:  # the preset's values for the options left at their defaults (an explicit decay included)
        recipe = dataclasses.replace(recipe, **{k: v for k, v in PRESETS[args.recipe].items()
                                                if getattr(recipe, k) == getattr(Recipe(), k)
                                                and not (k == "total_decay" and explicit_decay)})
    return ClassifyConfig(data=args.data, branches=branches, widths=list(args.widths), loss=args.loss,
                          head_scale=args.head_scale, execution=args.execution, recipe=recipe, seed=args.seed,
                          size=args.size, limit_per_class=args.limit_per_class,
                          test_limit_per_class=args.test_limit_per_class, eval_every=args.eval_every,
                          accelerator=args.device, devices=args.devices, num_nodes=args.num_nodes,
                          strategy=args.strategy, precision=args.precision, checkpoint_every=args.checkpoint_every,
                          checkpoint_minutes=args.checkpoint_minutes, compile=args.compile,
                          channels_last=not args.no_channels_last).check()


def _train(args) -> int:
    import dataclasses

    from branchspec.seeds import format_interval, run_seeds
    from branchspec.studies.classify import run_train

    cfg = _config(args, args.branches)
    if args.seeds is None:
        metrics = run_train(cfg, args.out, change_lr=args.change_lr)
        if metrics:
            print(f"test accuracy {metrics['test_accuracy']:.4f}; wrote {args.out}/report.html")
        return 0
    summary = run_seeds("classify train", args.seeds, args.out, lambda seed, sub: run_train(
        dataclasses.replace(cfg, seed=seed), sub, change_lr=args.change_lr))
    print(f"test accuracy {format_interval(summary['test_accuracy'])}; wrote {args.out}/report.html")
    return 0


def _sweep(args) -> int:
    from branchspec.studies.classify import run_sweep

    metrics = run_sweep(_config(args, args.branches[0]), args.branches, args.out, change_lr=args.change_lr)
    print(f"active branches per M: {metrics['num_active']}; wrote {args.out}/report.html")
    return 0


def _analyze(args) -> int:
    from branchspec.errors import BranchspecError
    from branchspec.studies.classify import run_analyze

    try:
        top = [float(v) for v in args.top_percent.split(",") if v.strip()]
    except ValueError:
        raise BranchspecError(f"--top-percent takes numbers such as 2,7, got {args.top_percent!r}.") from None
    if not top or not all(0 < p <= 100 for p in top):
        raise BranchspecError(f"--top-percent values must lie in (0, 100], got {args.top_percent!r}.")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    from branchspec.seeds import for_each_seed

    def analyse(run):
        return run_analyze(run, checkpoint=args.checkpoint, samples_per_class=args.samples_per_class,
                           top_percent=tuple(top), top_branches=args.top_branches, classes=classes, seed=args.seed,
                           device=args.device)

    result = for_each_seed(args.run, analyse)
    if "num_active" in result:
        print(f"{result['num_active']} active and {result['num_silent']} silent branches; "
              f"wrote {args.run}/analysis and {args.run}/report.html")
    else:
        from branchspec.seeds import format_interval

        print(f"silent branches over the seeds: {format_interval(result['analysis/num_silent'], 2)}; "
              f"wrote {args.run}/report.html")
    return 0
