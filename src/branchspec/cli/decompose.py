"""``branchspec decompose train | apply | manipulate | segment``: the class-transfer GAN of Sec. 7."""

from __future__ import annotations

from branchspec.cli.common import add_seeds_option, add_trainer_options, finite_float, float_list, int_list, name_list, positive_int
from branchspec.errors import BranchspecError


def register(sub) -> None:
    top = sub.add_parser("decompose", help="branched class-transfer GAN: image decomposition (Sec. 7, Figs. 9-15)",
                         description="Train a branched StarGAN-v2-style generator f(x, d) = R(x) + Σ_k v_k(x, d) and "
                                     "use its branch outputs as an image decomposition.")
    cmds = top.add_subparsers(dest="decompose_command", metavar="SUBCOMMAND", required=True)

    t = cmds.add_parser("train", help="train (or resume) the GAN; writes checkpoints, curves and report.html",
                        description="Train the branched generator with the non-saturating GAN loss and R1 only "
                                    "(App. E). Re-running with the same --out resumes from its last checkpoint.")
    t.add_argument("--out", required=True, help="run directory (re-use it to resume)")
    t.add_argument("--data", default="scenes", help="'scenes' (embedded layered scenes), an image tree "
                   "ROOT/train/<domain>/* (AFHQ, CelebA-HQ, CIFAR-10), a .tar(.gz) of one, or a cifar-10-batches-py "
                   "folder (default: scenes)")
    t.add_argument("--domains", type=name_list, default=None, help="domain folders to use, e.g. cat,dog (default: all)")
    t.add_argument("--size", type=positive_int, default=None, help="image side, a power of two in 16..256 "
                   "(default: 32 for scenes, 256 for folders)")
    t.add_argument("--num-domains", type=positive_int, default=None, help="layered scenes: 2 or 3 domains "
                   "(default: 2)")
    t.add_argument("--num-scenes", type=positive_int, default=None, help="layered scenes: training scenes "
                   "(default: 4000)")
    t.add_argument("--eval-scenes", type=positive_int, default=None, help="layered scenes: held-out scenes scored "
                   "in every domain (default: 64)")
    t.add_argument("--limit-per-domain", type=positive_int, default=None, help="folders: read at most N images "
                   "per domain")
    t.add_argument("--branches", type=positive_int, default=9, help="M (default: 9)")
    t.add_argument("--width", type=finite_float, default=0.25, help="branch width, times StarGAN-v2's (default: 0.25)")
    t.add_argument("--dim-in", type=positive_int, default=None, help="override the branch's first width")
    t.add_argument("--max-conv-dim", type=positive_int, default=None, help="override the branch's widest width")
    t.add_argument("--residual", choices=("diffusion", "gaussian", "none"), default="diffusion",
                   help="R: learnt nonlinear diffusion (App. E), Gaussian smoothing (App. D) or none "
                        "(default: diffusion)")
    t.add_argument("--sigma", type=finite_float, default=None, help="Gaussian R: σ in pixels (default: size/16)")
    t.add_argument("--dt", type=finite_float, default=0.2, help="diffusion R: time step (default: 0.2)")
    t.add_argument("--heat", type=finite_float, default=0.0, help="diffusion R: a fixed heat-flow term κ added to p "
                   "(0: the paper's form, p alone; 1: R starts as a heat-equation blur) (default: 0)")
    t.add_argument("--d-width", type=finite_float, default=1.0, help="discriminator width, times "
                   "StarGAN-v2's (default: 1)")
    t.add_argument("--execution", choices=("fused", "loop", "vmap"), default="fused",
                   help="fused: the M branches as one grouped network (default); loop: one call per branch")
    t.add_argument("--lr", type=finite_float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    t.add_argument("--mapping-lr", type=finite_float, default=1e-6, help="Adam learning rate of the branches' "
                   "mapping networks, StarGAN-v2's f_lr (default: 1e-6)")
    t.add_argument("--ema", type=finite_float, default=0.999, help="EMA decay of G (default: 0.999)")
    t.add_argument("--r1", type=finite_float, default=1.0, help="R1 weight γ (default: 1)")
    t.add_argument("--batch-size", type=positive_int, default=8, help="per device (default: 8)")
    t.add_argument("--iterations", type=positive_int, default=100_000, help="D+G steps (default: 100000)")
    t.add_argument("--seed", type=int, default=0, help="seed of weights and batches (default: 0)")
    add_trainer_options(t, checkpoint_every=1000)
    add_seeds_option(t)
    t.add_argument("--eval-every", type=positive_int, default=1000, help="iterations between recorded "
                   "curves and saved generator weights (default: 1000)")
    t.set_defaults(func=_train)

    a = cmds.add_parser("apply", help="decompose held-out images; scores and Figs. 9-11, 18-20",
                        description="Re-generate and translate held-out images, show R and every branch output, and "
                                    "score the decomposition. Writes RUN/apply unless --out is given.")
    _analysis(a)
    a.add_argument("--num-images", type=positive_int, default=4, help="images per domain in the figures (default: 4)")
    a.add_argument("--eval-images", type=positive_int, default=500, help="images per domain scored (default: 500)")
    a.add_argument("--features", default=None, help="a TorchScript feature extractor file (e.g. Inception) for the "
                   "Fréchet distance; default: a domain classifier trained here on the same data")
    a.add_argument("--classifier-steps", type=positive_int, default=None, help="training steps of that domain "
                   "classifier (default: 10 passes over the training images, 200 to 2000); it is kept in "
                   "RUN/checkpoints for the next apply")
    a.set_defaults(func=_apply)

    m = cmds.add_parser("manipulate", help="sweep a component's magnitude and sum subsets (Figs. 13-15)",
                        description="Scale single branch outputs by α and sum subsets of them. Writes RUN/manipulate.")
    _analysis(m)
    m.add_argument("--branches", type=_indices, default=None, help="branches to sweep, e.g. 0,3 "
                   "(default: the 2 strongest)")
    m.add_argument("--alphas", type=float_list, default=[-1.0, 0.0, 1.0, 2.0, 3.0], help="values of α "
                   "(default: -1,0,1,2,3)")
    m.add_argument("--subsets", type=_subsets, default=None, help="subsets to sum, e.g. 0,2,4:1,3 (default: the "
                   "active branches split in two)")
    m.add_argument("--num-images", type=positive_int, default=4, help="images per domain (default: 4)")
    m.set_defaults(func=_manipulate)

    s = cmds.add_parser("segment", help="segment eyes with Chan–Vese on the components (App. F, Figs. 12, 21)",
                        description="Chan–Vese on the HSV value of the components, initialized from the components "
                                    "that locate the eyes; keeps the connected components in pairs on a row.")
    _analysis(s)
    s.add_argument("--domain", default=None, help="which domain's images (default: the first)")
    s.add_argument("--init-branches", type=_indices, default=None, help="eye-locating branches (default: chosen)")
    s.add_argument("--image-branches", type=_indices, default=None, help="branches whose sum is segmented "
                   "(default: the generated image)")
    s.add_argument("--num-images", type=positive_int, default=8, help="images (default: 8)")
    s.add_argument("--init-threshold", type=finite_float, default=2.0, help="σ above which the "
                   "initial surface is positive (default: 2)")
    s.add_argument("--mu", type=finite_float, default=0.1, help="Chan–Vese length weight (default: 0.1)")
    s.set_defaults(func=_segment)


def _analysis(p) -> None:
    p.add_argument("--run", required=True, help="a `decompose train` run directory")
    p.add_argument("--images", default=None, metavar="FOLDER", help="your own images (any size or mode) instead "
                   "of the run's held-out split")
    p.add_argument("--out", default=None, help="where to write (default: a folder inside --run)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="the EMA of G or G itself (default: ema)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _indices(text: str) -> list[int]:
    """Branch indices from 0: ``0,3`` or ``0-2``."""
    return int_list(text, minimum=0)


def _subsets(text: str) -> list[list[int]]:
    return [_indices(part) for part in text.split(":")]


def train_config(args):
    """The DecomposeConfig of ``decompose train``'s arguments (scene options only with the scenes)."""
    from branchspec.nets.stargan import GeneratorConfig
    from branchspec.studies.decompose import SCENES, DecomposeConfig
    from branchspec.train.gan import GANRecipe

    scene_options = {"num_domains": args.num_domains, "num_scenes": args.num_scenes, "eval_scenes": args.eval_scenes}
    folder_options = {"domains": args.domains, "limit_per_domain": args.limit_per_domain}
    wrong = [k for k, v in (folder_options if args.data == SCENES else scene_options).items() if v is not None]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise BranchspecError(f"{flags}: only for {'image folders' if args.data == SCENES else 'the layered scenes'}"
                              f", not with --data {args.data}.")
    given = {k: v for k, v in {**scene_options, **folder_options}.items() if v is not None}
    cfg = DecomposeConfig(
        data=args.data, size=args.size, **given, branches=args.branches,
        generator=GeneratorConfig(width=args.width, dim_in=args.dim_in, max_conv_dim=args.max_conv_dim),
        residual=args.residual, sigma=args.sigma, dt=args.dt, d_width=args.d_width, execution=args.execution,
        heat=args.heat, recipe=GANRecipe(lr=args.lr, mapping_lr=args.mapping_lr, ema_decay=args.ema, r1_gamma=args.r1),
        batch_size=args.batch_size,
        iterations=args.iterations, seed=args.seed, accelerator=args.device, devices=args.devices,
        num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision,
        checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes, eval_every=args.eval_every)
    return cfg


def _train(args) -> int:
    from branchspec.studies.decompose import run_train

    cfg = train_config(args)
    if args.seeds is not None:
        import dataclasses

        from branchspec.seeds import format_interval, run_seeds

        summary = run_seeds("decompose train", args.seeds, args.out, lambda seed, sub: run_train(
            dataclasses.replace(cfg, seed=seed), sub, change_lr=args.change_lr))
        extra = (f", component recovery {format_interval(summary['latest/recovery_ema'])} (EMA)"
                 if "latest/recovery_ema" in summary else "")
        print(f"wrote {args.out}/report.html{extra}")
        return 0
    metrics = run_train(cfg, args.out, change_lr=args.change_lr)
    last = metrics.get("latest", {})
    extra = f", component recovery {last['recovery_ema']:.3f} (EMA)" if "recovery_ema" in last else ""
    print(f"wrote {args.out}/report.html after {last.get('iteration')} iterations{extra}")
    return 0


def _apply(args) -> int:
    from branchspec.studies.decompose import run_apply

    from branchspec.seeds import for_each_seed, format_interval, is_seeds_parent

    if is_seeds_parent(args.run):
        from pathlib import Path

        summary = for_each_seed(args.run, lambda run: run_apply(
            run, None if args.out is None else Path(args.out) / run.name, num_images=args.num_images,
            eval_images=args.eval_images, weights=args.weights, features=args.features,
            classifier_steps=args.classifier_steps, images=args.images, device=args.device))
        key = "apply/component_recovery" if "apply/component_recovery" in summary else "apply/mean_frechet_distance"
        print(f"wrote {args.run}/report.html; {key.split('/')[-1].replace('_', ' ')} "
              f"{format_interval(summary.get(key, {}))}")
        return 0
    metrics = run_apply(args.run, args.out, num_images=args.num_images, eval_images=args.eval_images,
                        weights=args.weights, features=args.features, classifier_steps=args.classifier_steps,
                        images=args.images, device=args.device)
    if args.images is not None:
        print(f"wrote {args.out or args.run + '/apply_images'}: {metrics['images']} images decomposed"
              + (f" ({metrics['skipped_files']} unreadable files skipped)" if metrics["skipped_files"] else ""))
        return 0
    score = (f"component recovery {metrics['component_recovery']:.3f}" if "component_recovery" in metrics
             else f"mean Fréchet distance {metrics.get('mean_frechet_distance', float('nan')):.2f} (untranslated "
                  f"images: {metrics.get('mean_frechet_distance_untranslated', float('nan')):.2f})")
    print(f"wrote {args.out or args.run + '/apply'}; {score}")
    return 0


def _manipulate(args) -> int:
    from branchspec.studies.decompose import run_manipulate

    run_manipulate(args.run, args.out, branches=args.branches, alphas=args.alphas, subsets=args.subsets,
                   num_images=args.num_images, images=args.images, weights=args.weights, device=args.device)
    print(f"wrote {args.out or args.run + '/manipulate'}")
    return 0


def _segment(args) -> int:
    from branchspec.studies.decompose import run_segment

    metrics = run_segment(args.run, args.out, domain=args.domain, init_branches=args.init_branches,
                          image_branches=args.image_branches, num_images=args.num_images,
                          init_threshold=args.init_threshold, mu=args.mu, images=args.images, weights=args.weights,
                          device=args.device)
    extra = f"; mean eye IoU {metrics['mean_eye_iou']:.3f}" if "mean_eye_iou" in metrics else ""
    print(f"wrote {args.out or args.run + '/segment'}{extra}")
    return 0
