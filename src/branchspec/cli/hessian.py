"""``branchspec hessian``: the Hessian's block structure, Sec. 8's equilibrium statistics and the spectrum of a run."""

from __future__ import annotations

from branchspec.cli.common import finite_float, positive_int


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub) -> None:
    p = sub.add_parser(
        "hessian", help="Hessian block structure (Fig. 5), branch equilibrium (Sec. 8), spectrum of a run",
        description="Analyse a 'toy sweep' or 'classify train' run at initialization and at convergence: the exact "
                    "Hessian of the selected parameters and its block-mass ratio (Eqs. 13-14, Fig. 5 panels 3-4), "
                    "the near-zero distributive and collaborative parts (Sec. 8), and, with --analyses spectrum, "
                    "the whole network's trace, top eigenvalues and eigenvalue density (PyHessian's quantities). "
                    "Writes metrics.json, figures and report.html; a killed run resumes.")
    p.add_argument("--run", required=True, help="the --out of a 'toy sweep' or 'classify train' run")
    p.add_argument("--out", default=None, help="run directory to write (default: RUN/hessian)")
    p.add_argument("--checkpoint", type=_names, default=["init", "last"], metavar="LIST",
                   help="comma-separated: init, last, or weights files (default: init,last)")
    p.add_argument("--params", default="first-layer",
                   help="parameters inside a branch: first-layer, or name patterns such as 'conv1.weight', "
                        "'layer1.*', '*' (comma-separated; default: first-layer)")
    p.add_argument("--analyses", type=_names, default=["hessian", "equilibrium"], metavar="LIST",
                   help="comma-separated subset of hessian, equilibrium, spectrum (default: hessian,equilibrium)")
    p.add_argument("--samples", type=positive_int, default=512,
                   help="classifier runs: samples of the Hessian and equilibrium batch (default: 512)")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="classifier runs: data split (default: train, the data of the trained loss)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample choice, permutations and probes (default: 0)")
    p.add_argument("--batchnorm", default="train", choices=("train", "eval"),
                   help="BatchNorm statistics of the Hessians: the batch's (train) or the running ones (eval, as "
                        "PyHessian) (default: train)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="(default: float32)")
    p.add_argument("--chunk-size", type=positive_int, default=16,
                   help="tangent columns per branch in one pass of the structured Hessian; memory grows with it "
                        "(default: 16)")
    p.add_argument("--memory-gb", type=finite_float, default=8.0,
                   help="bound on the exact Hessian's working memory: its passes take as many branches and columns "
                        "as fit (default: 8)")
    p.add_argument("--pseudo-block-filters", type=positive_int, default=5,
                   help="a run with one branch (a dense network, the control): deal its first-layer filters into "
                        "pseudo-blocks of this many, scored like branch blocks (default: 5, a branch's first layer)")
    p.add_argument("--permutations", type=positive_int, default=10,
                   help="random permutations for the block-mass baseline (default: 10)")
    p.add_argument("--check-direct", action="store_true",
                   help="also compute the direct torch.func.hessian: its difference and its time (slow)")
    p.add_argument("--toy-branches", type=positive_int, default=None,
                   help="toy sweeps: which M (default: the covariance example's M, else the largest)")
    p.add_argument("--toy-trial", type=int, default=None, help="toy sweeps: which trial (default: the first solved)")
    p.add_argument("--spectrum-params", default="*", help="spectrum: parameters inside a branch (default: '*')")
    p.add_argument("--spectrum-samples", type=positive_int, default=2048, help="spectrum: samples (default: 2048)")
    p.add_argument("--batch-size", type=positive_int, default=512,
                   help="spectrum: samples per batch; products are averaged over batches (default: 512)")
    p.add_argument("--probes", type=positive_int, default=100, help="spectrum: Hutchinson trace probes (default: 100)")
    p.add_argument("--block-probes", type=positive_int, default=10,
                   help="spectrum: probes of the Hutchinson block masses, M products each (default: 10)")
    p.add_argument("--top-n", type=positive_int, default=3, help="spectrum: top eigenvalues (default: 3)")
    p.add_argument("--lanczos-steps", type=positive_int, default=100, help="spectrum: Lanczos steps (default: 100)")
    p.set_defaults(func=_hessian)


def hessian_config(args):
    """The HessianConfig of ``hessian``'s arguments."""
    from branchspec.studies.hessian import HessianConfig

    return HessianConfig(run=args.run, checkpoints=args.checkpoint, params=args.params, analyses=args.analyses,
                        samples=args.samples, split=args.split, seed=args.seed, batchnorm=args.batchnorm,
                        device=args.device, dtype=args.dtype, chunk_size=args.chunk_size, memory_gb=args.memory_gb,
                        pseudo_block_filters=args.pseudo_block_filters,
                        permutations=args.permutations, check_direct=args.check_direct,
                        toy_branches=args.toy_branches, toy_trial=args.toy_trial,
                        spectrum_params=args.spectrum_params, spectrum_samples=args.spectrum_samples,
                        batch_size=args.batch_size, probes=args.probes, block_probes=args.block_probes,
                        top_n=args.top_n, lanczos_steps=args.lanczos_steps)


def _hessian(args) -> int:
    import dataclasses
    from pathlib import Path

    from branchspec.seeds import for_each_seed, format_interval, is_seeds_parent
    from branchspec.studies.hessian import run_hessian

    cfg = hessian_config(args)
    if is_seeds_parent(args.run):  # every seed's run, into RUN/seed<N>/hessian (or OUT/seed<N>), then the intervals
        summary = for_each_seed(args.run, lambda run: run_hessian(
            dataclasses.replace(cfg, run=str(run)), None if args.out is None else Path(args.out) / run.name))
        ratios = ", ".join(f"{k.split('/')[-1]}: {format_interval(v)}" for k, v in summary.items()
                           if k.startswith("hessian/block_mass_ratio/"))
        print(f"wrote {args.run}/report.html (block-mass ratio {ratios})")
        return 0
    metrics = run_hessian(cfg, args.out)
    ratios = ", ".join(f"{k}: {v:.3f}" for k, v in metrics.get("block_mass_ratio", {}).items())
    print(f"wrote {args.out or args.run + '/hessian'}/report.html" + (f" (block-mass ratio {ratios})" if ratios else ""))
    return 0
