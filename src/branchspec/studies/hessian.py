"""The Hessian study (Sec. 5 and 8; Fig. 5 panels 3-4): the loss Hessian of a trained run at initialization and
at convergence, its block structure, the branch-equilibrium statistics and the whole network's spectrum.

    run_hessian(HessianConfig(run=...), out)   analyses a ``toy sweep`` or a ``classify train`` run

Per checkpoint ("init", "last" or a weights file) it runs the chosen analyses, each saved as soon as it is done
(a killed run resumes where it stopped):

- ``hessian``: the exact Hessian of the selected parameters (default: the first layer of every branch) by the
  structured computation of Eqs. (13)-(14), its block-mass ratio beside random permutations (and, with
  ``check_direct``, the direct ``torch.func.hessian`` for comparison: difference and time);
- ``equilibrium``: Sec. 8's fractions of near-zero distributive and collaborative parts;
- ``spectrum``: whole-network estimates by Hessian-vector products (trace, top eigenvalues, eigenvalue
  density, Hutchinson block masses), PyHessian's quantities.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from branchspec.analysis.batchnorm import batchnorm_mode, check_batchnorm_mode
from branchspec.analysis.gradients import equilibrium_statistics
from branchspec.analysis.hessian import (block_coupling, block_mass_ratio, block_squared_norms, exact_hessian,
                                         mass_ratio, mean_coupling, permuted_block_mass_ratios, pseudo_block_sizes)
from branchspec.analysis.selection import FIRST_LAYER, select_parameters
from branchspec.analysis.spectrum import (HessianOperator, density_curve, eigenvalue_density,
                                          hutchinson_block_masses, hutchinson_trace, top_eigenvalues)
from branchspec.branched import Branched
from branchspec.devices import resolve_device
from branchspec import runs
from branchspec import findings
from branchspec.errors import BranchspecError, log
from branchspec.losses import get_loss
from branchspec.nets.perceptron import Perceptron
from branchspec.report import build_report
from branchspec.report.plots import heatmap, heatmap_grid, subplots
from branchspec.rundir import RunDir, atomic_save_npz, atomic_torch_save, to_plain
from branchspec.train.toy import SUCCESS_THRESHOLD, initial_weights, responses

ANALYSES = ("hessian", "equilibrium", "spectrum")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
HEADLINE_TOLERANCE = 1e-2  # the equilibrium fractions shown in the tables (docs/hessian.md)
_RESUME_FREE = {"device", "chunk_size", "memory_gb", "analyses", "checkpoints"}  # options that do not change a result


@dataclass
class HessianConfig:
    """The analyses of one run. Defaults: the paper's Fig. 5 setting (first layer, a batch of 512)."""

    run: str
    checkpoints: list[str] = field(default_factory=lambda: ["init", "last"])
    params: str = FIRST_LAYER
    analyses: list[str] = field(default_factory=lambda: ["hessian", "equilibrium"])
    samples: int = 512  # the batch of the exact Hessian and of the equilibrium statistics
    split: str = "train"  # the data the loss was trained on (docs/hessian.md)
    seed: int = 0
    batchnorm: str = "train"  # the Hessians' BatchNorm statistics (docs/hessian.md)
    device: str = "auto"
    dtype: str = "float32"
    chunk_size: int = 16
    memory_gb: float | None = 8.0  # bound on the exact Hessian's working memory (None: all branches in one pass)
    pseudo_block_filters: int | None = 5  # one branch (a dense network): its filters dealt into blocks of this many
    # (5: a branch's first layer in the paper's widths), the dense control of the block structure
    permutations: int = 10
    check_direct: bool = False
    toy_branches: int | None = None  # toy sweeps: which M (default: the covariance example's M, else the largest)
    toy_trial: int | None = None  # toy sweeps: which trial (default: the first solved one)
    spectrum_params: str = "*"
    spectrum_samples: int = 2048
    batch_size: int = 512  # the spectrum's batches
    probes: int = 100
    block_probes: int = 10
    top_n: int = 3
    lanczos_steps: int = 100

    def check(self) -> "HessianConfig":
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown or not self.analyses:
            raise BranchspecError(f"`analyses` takes a comma-separated subset of {list(ANALYSES)}, got {self.analyses}.")
        if not self.checkpoints:
            raise BranchspecError("give at least one checkpoint: init, last or the path of a weights file.")
        if self.dtype not in DTYPES:
            raise BranchspecError(f"`dtype` must be one of {list(DTYPES)}, got {self.dtype!r}.")
        check_batchnorm_mode(self.batchnorm)
        counts = {"samples": self.samples, "spectrum_samples": self.spectrum_samples, "batch_size": self.batch_size,
                  "chunk_size": self.chunk_size, "probes": self.probes, "block_probes": self.block_probes,
                  "top_n": self.top_n, "lanczos_steps": self.lanczos_steps}
        bad = [k for k, v in counts.items() if int(v) < 1] + ([] if self.permutations >= 0 else ["permutations"])
        bad += [] if self.memory_gb is None or self.memory_gb > 0 else ["memory_gb"]
        if bad:
            raise BranchspecError(f"{', '.join(bad)} must be positive integers.")
        return self


@dataclass
class Case:
    """What an analysis needs: the model at one checkpoint, a batch of data and the loss."""

    model: Branched
    inputs: Tensor
    target: Tensor
    loss: str


# -------------------------------------------------------------------------------------------- the run types
def _source(path: str) -> tuple[RunDir, dict]:
    run = runs.open(path).expect("toy sweep", "classify train")
    return run.dir, run.config



def _toy_choice(run: RunDir, raw: dict, m: int | None, trial: int | None) -> tuple[int, int]:
    """The M and trial of a toy sweep to analyse: by default the covariance example's M (else the largest) and
    the first trial that solved the task."""
    weights = _toy_weights(run.checkpoints / "weights.npz")
    available = sorted(int(k[2:]) for k in weights if k.startswith("w_"))
    if m is None:
        m = raw.get("covariance_m") if raw.get("covariance_m") in available else available[-1]
    if m not in available:
        raise BranchspecError(f"the toy sweep has no M = {m}; choose `toy_branches` from {available}.")
    if trial is None:
        R = responses(weights[f"w_{m}"], weights[f"b_{m}"], np.asarray(raw["data"]["x"]), raw["training"]["slope"])
        solved = np.flatnonzero(((R.sum(1) - np.asarray(raw["data"]["y"])) ** 2).sum(-1) < SUCCESS_THRESHOLD)
        trial = int(solved[0]) if len(solved) else 0
    if not 0 <= trial < raw["trials"]:
        raise BranchspecError(f"`toy_trial` must be in 0..{raw['trials'] - 1}, got {trial}.")
    return int(m), int(trial)


def _toy_weights(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            return dict(npz)
    except (OSError, ValueError) as err:
        raise BranchspecError(f"cannot read the toy weights {path} ({err}); give the `out` of a finished toy sweep "
                              "or an .npz with w_<M> and b_<M> arrays.") from None


def _toy_case(run: RunDir, raw: dict, cfg: HessianConfig, checkpoint: str) -> Case:
    m, t = cfg.toy_branches, cfg.toy_trial
    training = raw["training"]
    if checkpoint == "init":
        w, b = initial_weights(m, raw["trials"], training["init_std"], raw["seed"])
    else:
        weights = _toy_weights(run.checkpoints / "weights.npz" if checkpoint == "last" else Path(checkpoint))
        if f"w_{m}" not in weights or weights[f"w_{m}"].shape[0] <= t:
            raise BranchspecError(f"{checkpoint} holds no weights for M = {m}, trial {t}.")
        w, b = weights[f"w_{m}"], weights[f"b_{m}"]
    model = Branched(lambda: Perceptron(training["slope"]), m, seed=0)
    with torch.no_grad():
        for k, branch in enumerate(model.branches):
            branch.w.fill_(float(w[t, k]))
            branch.b.fill_(float(b[t, k]))
    x = torch.as_tensor(raw["data"]["x"], dtype=torch.float64)[:, None]
    y = torch.as_tensor(raw["data"]["y"], dtype=torch.float64)[:, None]
    return Case(model, x, y, "l2")


class Subject:
    """The run to analyse (a toy sweep or a classifier run); a classifier's data split is read once."""

    def __init__(self, cfg: HessianConfig):
        self.cfg = cfg
        self.run, self.raw = _source(cfg.run)
        self._split = None

    def case(self, checkpoint: str, samples: int) -> Case:
        """The model at ``checkpoint`` and ``samples`` samples (a seeded choice; a toy set whole), on the
        config's device and in its dtype."""
        cfg = self.cfg
        if self.raw["command"] == "toy sweep":
            case = _toy_case(self.run, self.raw, cfg, checkpoint)
        else:
            run = runs.open(self.run.path)
            if self._split is None:
                self._split = run.data(cfg.split)[:2]
            x, y = self._split
            pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))[:samples]
            case = Case(run.model(checkpoint), x[pick], y[pick], self.raw["loss"])
        dtype = DTYPES[cfg.dtype]
        case.model.to(cfg.device, dtype)
        case.inputs = case.inputs.to(cfg.device, dtype)
        case.target = case.target.to(cfg.device, dtype if case.target.is_floating_point() else None)
        return case


def _checkpoint_name(checkpoint: str) -> str:
    return checkpoint if checkpoint in ("init", "last") else Path(checkpoint).stem


# ------------------------------------------------------------------------------------------------ the study
def resolve(cfg: HessianConfig) -> HessianConfig:
    """Checked, with the run path absolute, the device chosen and a toy run's M and trial fixed."""
    cfg = dataclasses.replace(cfg, run=str(Path(cfg.run).resolve())).check()
    run, raw = _source(cfg.run)
    cfg.device = str(resolve_device(cfg.device))
    names = [_checkpoint_name(c) for c in cfg.checkpoints]
    if len(set(names)) != len(names):
        raise BranchspecError(f"the checkpoints {cfg.checkpoints} share a name; give each once.")
    if raw["command"] == "toy sweep":
        cfg.toy_branches, cfg.toy_trial = _toy_choice(run, raw, cfg.toy_branches, cfg.toy_trial)
    return cfg


def run_hessian(cfg: HessianConfig, out: str | RunDir | None = None, *, show_progress: bool = True) -> dict:
    """Run the analyses of ``cfg`` into ``out`` (default: ``<run>/hessian``); returns the metrics."""
    cfg = resolve(cfg)
    run = RunDir.of(out or Path(cfg.run) / "hessian")
    config = {"command": "hessian", **to_plain(cfg)}
    run.check_same_run(config, _RESUME_FREE, "Hessian analysis")
    run.write_config(config)
    source = Subject(cfg)
    for checkpoint in cfg.checkpoints:
        name = _checkpoint_name(checkpoint)
        for analysis in cfg.analyses:
            if _done(run, analysis, name):
                continue
            log.debug("hessian: %s at %s ...", analysis, name)  # the pieces show their own progress bars
            samples = cfg.spectrum_samples if analysis == "spectrum" else cfg.samples
            _PIECES[analysis](run, cfg, source.case(checkpoint, samples), name, show_progress)
    _figures(run, cfg)
    findings.write(run, "hessian")
    build_report(run, title=f"Hessian and gradients: {source.run.path.name}")
    if source.run.path in run.path.resolve().parents:  # an analysis inside its run: a section of the run's report
        build_report(source.run)
    return run.read_metrics()


_DONE_KEY = {"hessian": "block_mass_ratio", "equilibrium": "collaborative_near_zero", "spectrum": "trace"}


def _done(run: RunDir, analysis: str, name: str) -> bool:
    done = name in run.read_metrics().get(_DONE_KEY[analysis], {})
    return done and (analysis != "hessian" or (run.checkpoints / f"hessian_{name}.pt").is_file())


def _merge(run: RunDir, name: str, values: dict) -> None:
    """Add this checkpoint's values to the metrics, each a dict keyed by checkpoint name."""
    metrics = run.read_metrics()
    run.write_metrics({key: {**metrics.get(key, {}), name: value} for key, value in values.items()})


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(device: str, fn, *args, **kw):
    _sync(device)
    start = time.perf_counter()
    out = fn(*args, **kw)
    _sync(device)
    return out, time.perf_counter() - start


def _hessian_piece(run: RunDir, cfg: HessianConfig, case: Case, name: str, show_progress: bool) -> None:
    sel = select_parameters(case.model, cfg.params)
    kw = {"batchnorm": cfg.batchnorm}
    for method in ("structured", "direct") if cfg.check_direct else ("structured",):  # one-time costs: not timed
        exact_hessian(case.model, case.inputs[:2], case.target[:2], case.loss, sel, method=method, **kw)
    H, seconds = _timed(cfg.device, exact_hessian, case.model, case.inputs, case.target, case.loss, sel,
                        chunk_size=cfg.chunk_size, memory_gb=cfg.memory_gb, show_progress=show_progress, **kw)
    sizes = sel.block_sizes
    if len(sel.branches) == 1 and cfg.pseudo_block_filters:  # the dense control: pseudo-branches of its filters
        per_filter = sel.size // _first_layer_filters(case.model, sel)
        sizes = pseudo_block_sizes(sel.size, cfg.pseudo_block_filters * per_filter)
    ratios = permuted_block_mass_ratios(H, sizes, cfg.permutations, cfg.seed)
    coupling = block_coupling(H, sizes)
    values = {"block_mass_ratio": block_mass_ratio(H, sizes),
              "block_mass_ratio_permuted": float(ratios.mean()) if len(ratios) else None,
              "block_mass_ratio_permuted_std": float(ratios.std()) if len(ratios) > 1 else None,
              # how much of the way from a random dealing (0) to block-diagonal (1): comparable across block counts
              "block_mass_excess": (block_mass_ratio(H, sizes) - float(ratios.mean())) / (1 - float(ratios.mean()))
              if len(ratios) else None,
              "block_coupling": coupling, "mean_block_coupling": mean_coupling(coupling),
              "hessian_seconds": seconds}
    if cfg.check_direct:
        D, direct_seconds = _timed(cfg.device, exact_hessian, case.model, case.inputs, case.target, case.loss, sel,
                                   method="direct", **kw)
        values.update(direct_seconds=direct_seconds, direct_relative_difference=float((H - D).norm() / D.norm()))
    with torch.no_grad(), batchnorm_mode(case.model, cfg.batchnorm):
        values["loss"] = float(get_loss(case.loss)(case.model(case.inputs), case.target).mean())
    atomic_torch_save({"hessian": H.detach().cpu(), "block_sizes": torch.tensor(sizes)},
                      run.checkpoints / f"hessian_{name}.pt")
    run.write_metrics({"parameters": sel.size, "branches": len(sel.branches), "blocks": len(sizes),
                       "pseudo_blocks": len(sel.branches) == 1 and bool(cfg.pseudo_block_filters),
                       "selection": list(sel.names), "samples": len(case.target)})
    _merge(run, name, values)


def _first_layer_filters(model: Branched, sel) -> int:
    """The output channels (filters) of the selected parameters' first tensor (a convolution's weight)."""
    return int(dict(model.named_branch_parameters(sel.branches[0]))[sel.names[0]].shape[0])


def _equilibrium_piece(run: RunDir, cfg: HessianConfig, case: Case, name: str, show_progress: bool) -> None:
    stats, seconds = _timed(cfg.device, equilibrium_statistics, case.model, case.inputs, case.target, case.loss,
                            show_progress=show_progress)
    t = stats.tolerances.index(HEADLINE_TOLERANCE)
    _merge(run, name, {
        "distributive_near_zero": float(stats.distributive_near_zero[t].mean()),
        "collaborative_near_zero": float(stats.collaborative_near_zero[t]),
        "equilibrium_seconds": seconds,
        "equilibrium": {"tolerances": list(stats.tolerances),
                        "distributive_near_zero_per_branch": stats.distributive_near_zero,
                        "collaborative_near_zero": stats.collaborative_near_zero}})


def _spectrum_piece(run: RunDir, cfg: HessianConfig, case: Case, name: str, show_progress: bool) -> None:
    start = time.perf_counter()
    batches = [(x, y) for x, y in zip(case.inputs.split(cfg.batch_size), case.target.split(cfg.batch_size))]
    op = HessianOperator(case.model, batches, case.loss, cfg.spectrum_params, batchnorm=cfg.batchnorm)
    kw = {"seed": cfg.seed, "show_progress": show_progress}
    trace = hutchinson_trace(op, cfg.probes, **kw)
    values, _ = top_eigenvalues(op, cfg.top_n, **kw)
    masses = hutchinson_block_masses(op, cfg.block_probes, **kw)
    nodes, weights = eigenvalue_density(op, cfg.lanczos_steps, **kw)
    atomic_save_npz(run.checkpoints / f"density_{name}.npz", {"nodes": nodes, "weights": weights})
    _merge(run, name, {"trace": trace.trace, "trace_probes": len(trace.samples), "branch_traces": trace.block_traces,
                       "top_eigenvalues": values, "hutchinson_block_mass_ratio": mass_ratio(masses),
                       "spectrum_parameters": op.size, "spectrum_samples": len(case.target),
                       "hessian_vector_products": op.products, "spectrum_seconds": time.perf_counter() - start})


_PIECES = {"hessian": _hessian_piece, "equilibrium": _equilibrium_piece, "spectrum": _spectrum_piece}


# ---------------------------------------------------------------------------------------------------- figures
def pooled_magnitude(H: Tensor, pixels: int = 540) -> tuple[np.ndarray, int]:
    """|H| max-pooled to at most ``pixels`` per side (every entry is seen), and the pooling factor."""
    factor = max(1, math.ceil(H.shape[0] / pixels))
    pooled = F.max_pool2d(H.abs().double()[None, None], factor, ceil_mode=True)[0, 0]
    return pooled.numpy(), factor


def _names_done(run: RunDir, cfg: HessianConfig, key: str) -> list[str]:
    have = run.read_metrics().get(key, {})
    return [n for n in map(_checkpoint_name, cfg.checkpoints) if n in have]


def _figures(run: RunDir, cfg: HessianConfig) -> None:
    metrics = run.read_metrics()
    names = _names_done(run, cfg, "block_mass_ratio")
    if names:
        fig, axes = subplots(1, len(names), panel=(4.6, 4.0))
        matrices = []
        for ax, name in zip(axes[0], names):
            saved = torch.load(run.checkpoints / f"hessian_{name}.pt", weights_only=True)
            H, sizes = saved["hessian"], saved["block_sizes"].tolist()
            pooled, factor = pooled_magnitude(H)
            floor = max(float(pooled.max()) * 1e-8, 1e-300)
            heatmap(ax, np.log10(np.maximum(pooled, floor)), symmetric=False, cmap="magma",
                    title=f"{name}: log10|H|, block mass {metrics['block_mass_ratio'][name]:.3f}")
            for edge in np.cumsum(sizes)[:-1] / factor - 0.5:
                ax.axhline(edge, color="w", lw=0.4, alpha=0.6)
                ax.axvline(edge, color="w", lw=0.4, alpha=0.6)
            centres = (np.cumsum(sizes) - np.asarray(sizes) / 2) / factor - 0.5  # ticks name blocks, not pixels
            ax.set_xticks(centres, labels=range(len(sizes)), fontsize=6)
            ax.set_yticks(centres, labels=range(len(sizes)), fontsize=6)
            ax.set(xlabel="branch l (its block of parameters)", ylabel="branch k")
            norms = block_squared_norms(H, sizes)
            matrices.append((norms / norms.sum()).numpy())
        fig.tight_layout()
        run.save_figure(fig, "fig5_hessian", f"Fig. 5 panels 3-4: the Hessian of the loss w.r.t. {cfg.params} of "
                        f"every branch ({metrics['parameters']} parameters, {metrics['samples']} samples, BatchNorm "
                        f"{cfg.batchnorm} mode), log10 of |H| max-pooled to the image size; white lines separate "
                        "the branch blocks. Block mass: the share of ‖H‖²_F inside the diagonal blocks.")
        fig = heatmap_grid(matrices, [f"{n}: ‖H_kl‖²_F / ‖H‖²_F" for n in names], ncols=len(names), symmetric=False,
                           panel=(3.8, 3.2), xlabel="branch l", ylabel="branch k")
        run.save_figure(fig, "hessian_block_masses", "The share of the Hessian's squared Frobenius mass in each "
                        "pair of branch blocks; a block-diagonal Hessian has all of it on the diagonal.")
    names = _names_done(run, cfg, "equilibrium")
    if names:
        fig, axes = subplots(1, 1, panel=(6.0, 3.4))
        ax = axes[0, 0]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            eq = metrics["equilibrium"][name]
            t = eq["tolerances"].index(HEADLINE_TOLERANCE)
            per_branch = eq["distributive_near_zero_per_branch"][t]
            ax.bar(np.arange(len(per_branch)) + i * width, per_branch, width=width,
                   label=f"{name} (collaborative ≈ 0: {eq['collaborative_near_zero'][t]:.0%} of samples)")
        ax.set(xlabel="branch k", ylabel="share of (w, x) pairs", ylim=(0, 1.02),
               title=f"distributive part ≈ 0 (‖∂v_k(x)/∂w‖ ≤ {HEADLINE_TOLERANCE:g}·s(x))")
        ax.legend(fontsize=7)
        fig.tight_layout()
        run.save_figure(fig, "equilibrium", "Sec. 8: per branch, the share of (parameter, sample) pairs whose "
                        "distributive part is near zero; in the legend, the share of samples whose collaborative "
                        "part ‖dL/df(x)‖ is at most the same tolerance.")
    names = _names_done(run, cfg, "trace")
    if names:
        fig, axes = subplots(1, 1, panel=(6.0, 3.4))
        top = 0.0
        for name in names:
            with np.load(run.checkpoints / f"density_{name}.npz") as d:
                grid, density = density_curve(d["nodes"], d["weights"])
            axes[0, 0].semilogy(grid, density + 1e-12, label=name)
            top = max(top, float(density.max()))
        axes[0, 0].set(xlabel="eigenvalue", ylabel="density", title="Hessian eigenvalue density (SLQ)",
                       ylim=(top * 1e-7, top * 2))
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        run.save_figure(fig, "eigenvalue_density", f"The eigenvalue density of the Hessian w.r.t. "
                        f"{cfg.spectrum_params} by stochastic Lanczos quadrature ({cfg.lanczos_steps} steps), "
                        "Gaussian-broadened as PyHessian plots it.")


# -------------------------------------------------------------------------------------------------------- demo
DEMO_TOY_BRANCHES = 10


def demo(out: RunDir, show_progress: bool = True, made: dict | None = None) -> dict:
    """The Hessian part of the demo: the toy (Toy1, M = 10) and the digits classifier, at init and converged,
    on the runs the toy and classify parts made (``made["toy_sweep"]``, ``made["classifier"]``; the demo runs
    those parts first)."""
    made = made or {}
    if "toy_sweep" not in made or "classifier" not in made:
        raise BranchspecError("the Hessian demo analyses the toy and classify parts' runs; run those parts first.")
    run_hessian(HessianConfig(run=str(made["toy_sweep"]), toy_branches=DEMO_TOY_BRANCHES, dtype="float64",
                              analyses=["hessian", "equilibrium", "spectrum"], probes=200, top_n=2,
                              lanczos_steps=2 * DEMO_TOY_BRANCHES, check_direct=True),
                out.sub("toy"), show_progress=show_progress)
    # sized for about a minute on two CPU cores (docs/hessian.md)
    digits = HessianConfig(run=str(made["classifier"]), samples=64, analyses=["hessian", "equilibrium", "spectrum"],
                           spectrum_samples=128, batch_size=128, probes=20, block_probes=2, top_n=2, lanczos_steps=20)
    run_hessian(digits, out.sub("digits"), show_progress=show_progress)
    return {}
