"""``branchspec toy sweep`` (Figs. 3-4) and ``branchspec toy dynamics`` (Fig. 2)."""

from __future__ import annotations

from branchspec.cli.common import finite_float, int_list, positive_int


def register(sub) -> None:
    toy = sub.add_parser("toy", help="the toy studies of Sec. 4.1 (Figs. 2-4)",
                         description="The toy studies of Sec. 4.1: scalar LeakyReLU branches trained by gradient descent.")
    cmds = toy.add_subparsers(dest="toy_command", metavar="SUBCOMMAND", required=True)

    sweep = cmds.add_parser("sweep", help="success rate, covariance and active/silent counts against M (Figs. 3-4)",
                            description="Train many models for every M; write metrics.json, figures and report.html.")
    _data_and_training(sweep)
    sweep.add_argument("--branches", type=int_list, default=list(range(2, 31)), metavar="RANGE",
                       help="values of M, e.g. 2-30 or 2,4,8 (default: 2-30)")
    sweep.add_argument("--trials", type=positive_int, default=1000, help="trials per M (default: 1000)")
    sweep.add_argument("--engine", choices=("auto", "numba", "torch"), default="auto",
                       help="numba: compiled CPU kernel; torch: one padded tensor program on --device (default: auto)")
    sweep.set_defaults(func=_sweep)

    dyn = cmds.add_parser("dynamics", help="each branch's response over the steps (Fig. 2)",
                          description="Record the responses of M branches on every x_j during training (Fig. 2).")
    _data_and_training(dyn)
    dyn.add_argument("--branches", type=positive_int, default=2, help="M (default: 2)")
    dyn.add_argument("--examples", type=positive_int, default=2, help="independent examples to show (default: 2)")
    dyn.add_argument("--pool", type=positive_int, default=64,
                     help="trials trained; the solved ones are shown first (default: 64)")
    dyn.add_argument("--record-every", type=positive_int, default=10, help="record every N steps (default: 10)")
    dyn.set_defaults(func=_dynamics)


def _data_and_training(p) -> None:
    p.add_argument("--toy", default="toy1", help="toy1, toy2, or a .csv/.json/.npz file of x, y (default: toy1)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--lr", type=finite_float, default=0.01, help="gradient-descent step (default: 0.01)")
    p.add_argument("--steps", type=int, default=10_000, help="gradient-descent steps (default: 10000)")
    p.add_argument("--init-std", type=finite_float, default=1.0, help="w, b ~ N(0, std²) (default: 1.0)")
    p.add_argument("--slope", type=finite_float, default=0.01, help="LeakyReLU negative slope (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: 0)")


def _training(args):
    from branchspec.train.toy import ToyTraining

    return ToyTraining(lr=args.lr, steps=args.steps, init_std=args.init_std, slope=args.slope).check()


def sweep_config(args):
    from branchspec.studies.toy import ToySweepConfig

    return ToySweepConfig(toy=args.toy, branches=args.branches, trials=args.trials, training=_training(args),
                          seed=args.seed, engine=args.engine)


def dynamics_config(args):
    from branchspec.studies.toy import ToyDynamicsConfig

    return ToyDynamicsConfig(toy=args.toy, branches=args.branches, examples=args.examples, training=_training(args),
                             seed=args.seed, record_every=args.record_every, pool=args.pool)


def _sweep(args) -> int:
    from branchspec.studies.toy import run_sweep

    cfg = sweep_config(args)
    metrics = run_sweep(cfg, args.out)
    print(f"wrote {args.out}/metrics.json and {args.out}/report.html "
          f"(success rate at M={cfg.branches[-1]}: {metrics['success_rate'][str(cfg.branches[-1])]:.3f})")
    return 0


def _dynamics(args) -> int:
    from branchspec.studies.toy import run_dynamics

    run_dynamics(dynamics_config(args), args.out)
    print(f"wrote {args.out}/figures/fig2_dynamics.png and {args.out}/report.html")
    return 0
