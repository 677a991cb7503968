"""The toy studies of Sec. 4.1: success rate, covariance, active/silent counts (Figs. 3-4) and dynamics (Fig. 2).

    run_sweep(ToySweepConfig(...), out)       Fig. 3 (success rate, covariance examples) and Fig. 4
    run_dynamics(ToyDynamicsConfig(...), out)  Fig. 2 (each branch's response on each x_j over the steps)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from branchspec.analysis.activity import active_mask, correlation, covariance, mean_abs_offdiagonal, response_norms
from branchspec.data.toy import load_toyset
from branchspec import findings
from branchspec.errors import BranchspecError
from branchspec.report import build_report
from branchspec.report.plots import curves, heatmap, heatmap_grid, subplots
from branchspec.rundir import RunDir, atomic_save_npz, to_plain
from branchspec.train.toy import SUCCESS_THRESHOLD, ToyTraining, gd_torch, initial_weights, responses, train_toy



@dataclass
class ToySweepConfig:
    """Fig. 3 and Fig. 4 at the paper's size by default: M = 2..30, 1000 trials each."""

    toy: str = "toy1"
    branches: list[int] = field(default_factory=lambda: list(range(2, 31)))
    trials: int = 1000
    training: ToyTraining = field(default_factory=ToyTraining)
    seed: int = 0
    engine: str = "auto"
    covariance_m: int = 10  # Fig. 3 right: covariance examples for M = 10
    covariance_examples: int = 10
    example_m: int = 20  # Fig. 4 left/middle: example responses for M = 20


@dataclass
class ToyDynamicsConfig:
    """Fig. 2: the training dynamics of M = 2 branches on Toy1, a few independent examples."""

    toy: str = "toy1"
    branches: int = 2
    examples: int = 2
    training: ToyTraining = field(default_factory=ToyTraining)
    seed: int = 0
    record_every: int = 10
    pool: int = 64  # trials trained; the solved ones are shown first


def sweep_metrics(F: np.ndarray, F0: np.ndarray, y: np.ndarray) -> dict:
    """Per-M numbers from trained responses F ``[T, M, N]`` and initial responses F0."""
    sq_error = ((F.sum(1) - y) ** 2).sum(-1)
    active = active_mask(F)
    n_active = active.sum(-1)
    return {
        "success_rate": float((sq_error < SUCCESS_THRESHOLD).mean()),
        "mean_active": float(n_active.mean()),
        "std_active": float(n_active.std()),
        "mean_silent": float((F.shape[1] - n_active).mean()),
        "median_squared_error": float(np.median(sq_error)),
        "mean_abs_correlation": _nanmean(mean_abs_offdiagonal(correlation(F), active)),
        "mean_abs_correlation_init": _nanmean(mean_abs_offdiagonal(correlation(F0), active_mask(F0))),
    }


def _nanmean(values: np.ndarray) -> float:
    """The mean over trials that define the value (a trial with one active branch has no pairs)."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def run_sweep(cfg: ToySweepConfig, out: str | RunDir, *, show_progress: bool = True) -> dict:
    """Train ``cfg.trials`` models for every M, write metrics, figures and the report into ``out``."""
    run = RunDir.of(out)
    data = load_toyset(cfg.toy)
    cfg.training.check()
    run.write_config({"command": "toy sweep", **to_plain(cfg), "data": {"x": data.x, "y": data.y}})
    total = cfg.trials * sum(cfg.branches)
    start = time.perf_counter()
    with tqdm(total=total, desc=f"toy sweep {data.name}", unit="branch-trial", disable=not show_progress) as bar:
        weights = train_toy(data, cfg.branches, cfg.trials, cfg.training, seed=cfg.seed, engine=cfg.engine,
                            progress=bar.update)
    seconds = time.perf_counter() - start
    atomic_save_npz(run.checkpoints / "weights.npz",
                    {f"{name}_{m}": a for m, (w, b) in weights.items() for name, a in (("w", w), ("b", b))})

    slope = cfg.training.slope
    per_m = {}
    trained = {}
    for m, (w, b) in weights.items():
        F = responses(w, b, data.x, slope)
        F0 = responses(*initial_weights(m, cfg.trials, cfg.training.init_std, cfg.seed), data.x, slope)
        per_m[m] = sweep_metrics(F, F0, data.y)
        trained[m] = F
    metrics = {name: {str(m): v[name] for m, v in per_m.items()} for name in next(iter(per_m.values()))}
    metrics.update({"toy": data.name, "trials": cfg.trials, "steps": cfg.training.steps, "train_seconds": seconds})
    run.write_metrics(metrics, merge=False)
    findings.write(run, "toy")
    _sweep_figures(run, cfg, data, trained, per_m)
    build_report(run, title=f"Toy sweep ({data.name})")
    return metrics


def _sweep_figures(run: RunDir, cfg: ToySweepConfig, data, trained: dict, per_m: dict) -> None:
    ms = sorted(per_m)
    fig, axes = subplots(1, 1)
    curves(axes[0, 0], ms, {"success rate": [per_m[m]["success_rate"] for m in ms]}, xlabel="M (branches)",
           ylabel="success rate", title=f"{data.name}: success rate over {cfg.trials} trials")
    axes[0, 0].set_ylim(0, 1.05)
    run.save_figure(fig, "fig3_success_rate", f"Fig. 3 left: share of {cfg.trials} trials with "
                    f"Σ_j (f(x_j) − y_j)² < {SUCCESS_THRESHOLD:g}, against M.")

    fig, axes = subplots(1, 1)
    curves(axes[0, 0], ms, {"active": [per_m[m]["mean_active"] for m in ms],
                            "silent": [per_m[m]["mean_silent"] for m in ms]},
           yerr={"active": [per_m[m]["std_active"] for m in ms], "silent": [per_m[m]["std_active"] for m in ms]},
           xlabel="M (branches)", ylabel="branches", title=f"{data.name}: active and silent branches")
    run.save_figure(fig, "fig4_active_silent", "Fig. 4 right: mean number of active branches (response norm "
                    "≥ 10% of the largest) and silent branches against M, ± one standard deviation.")

    if cfg.covariance_m in trained:
        F = trained[cfg.covariance_m][: cfg.covariance_examples]
        fig = heatmap_grid(list(covariance(F)), [f"trial {i}" for i in range(len(F))], ncols=5,
                           suptitle=f"{data.name}: Cov = F·Fᵀ, M = {cfg.covariance_m}")
        run.save_figure(fig, "fig3_covariance_examples", f"Fig. 3 right: the covariance F·Fᵀ of the trained "
                        f"responses of the first {len(F)} trials with M = {cfg.covariance_m}.")

    if cfg.example_m in trained:
        F = trained[cfg.example_m]
        ok = np.flatnonzero(((F.sum(1) - data.y) ** 2).sum(-1) < SUCCESS_THRESHOLD)
        t = int(ok[0]) if len(ok) else 0
        fig, axes = subplots(1, 2, panel=(4.5, 3.6))
        heatmap(axes[0, 0], F[t], title=f"responses v_k(x_j), trial {t}", xlabel="x_j",
                xlabels=[f"{v:g}" for v in data.x], ylabel="branch k")
        norms = response_norms(F[t])
        axes[0, 1].bar(range(len(norms)), norms, color=np.where(active_mask(F[t]), "C0", "0.7"))
        axes[0, 1].axhline(0.1 * norms.max(), color="C3", lw=1, ls="--", label="10% of max")
        axes[0, 1].set(xlabel="branch k", ylabel="‖F_k‖", title=f"{int(active_mask(F[t]).sum())} active of {len(norms)}")
        axes[0, 1].legend(fontsize=8)
        fig.tight_layout()
        run.save_figure(fig, f"fig4_responses_m{cfg.example_m}", f"Fig. 4 left and middle: the responses of "
                        f"{cfg.example_m} branches in one successful trial, and their norms (grey: silent).")


def run_dynamics(cfg: ToyDynamicsConfig, out: str | RunDir) -> dict:
    """Fig. 2: each branch's response on each x_j over the steps, for ``examples`` trials.

    A pool of ``cfg.pool`` trials is trained and the solved ones are shown first (their order is the pool's).
    """
    run = RunDir.of(out)
    data = load_toyset(cfg.toy)
    cfg.training.check()
    if min(cfg.branches, cfg.examples, cfg.record_every, cfg.pool) < 1:
        raise BranchspecError("`branches`, `examples`, `pool` and `record_every` must be positive integers.")
    run.write_config({"command": "toy dynamics", **to_plain(cfg), "data": {"x": data.x, "y": data.y}})
    # Train a pool of trials and show the solved ones first: Fig. 2 shows how a solution is reached.
    pool = max(cfg.examples, cfg.pool)
    w, b = (torch.from_numpy(a) for a in initial_weights(cfg.branches, pool, cfg.training.init_std, cfg.seed))
    x = torch.as_tensor(data.x)
    y = torch.as_tensor(data.y)
    w, b, history, steps = gd_torch(w, b, torch.ones_like(w), x, y, cfg.training, record_every=cfg.record_every)
    sq_error_pool = ((history[-1].numpy().sum(1) - data.y) ** 2).sum(-1)
    shown = np.argsort(sq_error_pool >= SUCCESS_THRESHOLD, kind="stable")[: cfg.examples]
    H = history.numpy()[:, shown]  # [S, examples, M, N]
    final = H[-1]
    sq_error = sq_error_pool[shown]
    metrics = {
        "pool_success_rate": float((sq_error_pool < SUCCESS_THRESHOLD).mean()),
        "shown_trials": shown,
        "final_responses": final,
        "squared_error": sq_error,
        "success": sq_error < SUCCESS_THRESHOLD,
        "active_branches": active_mask(final).sum(-1),
    }
    run.write_metrics(metrics, merge=False)
    atomic_save_npz(run.path / "dynamics.npz", {"steps": np.array(steps), "responses": H, "trials": shown})

    m, n = cfg.branches, len(data.x)
    fig, axes = subplots(m + 1, cfg.examples, panel=(4.2, 2.2), sharex=True)
    for e in range(cfg.examples):
        for k in range(m):
            ax = axes[k, e]
            for j in range(n):
                ax.plot(steps, H[:, e, k, j], color=f"C{j}", label=f"x={data.x[j]:g}")
            ax.set_ylabel(f"branch {k + 1}")
            ax.grid(alpha=0.3)
        ax = axes[m, e]
        total = H[:, e].sum(1)
        for j in range(n):
            ax.plot(steps, total[:, j], color=f"C{j}")
            ax.axhline(data.y[j], color=f"C{j}", ls=":", lw=1)
        ax.set_ylabel("f = Σ_k v_k")
        ax.set_xlabel("step")
        ax.set_xscale("symlog", linthresh=10)
        ax.grid(alpha=0.3)
        axes[0, e].set_title(f"trial {shown[e]}: " + ("solved" if sq_error[e] < SUCCESS_THRESHOLD else "not solved"))
    axes[0, 0].legend(fontsize=7, ncol=n)
    fig.tight_layout()
    run.save_figure(fig, "fig2_dynamics", f"Fig. 2: each branch's response v_k(x_j) over the steps for "
                    f"{data.name}, M = {m}; bottom: the total f(x_j) and its targets (dotted). Solved trials of a pool "
                    f"of {pool} are shown first ({metrics['pool_success_rate']:.0%} of the pool solved).")
    build_report(run, title=f"Toy dynamics ({data.name}, M = {m})")
    return metrics


def demo(out: RunDir, show_progress: bool = True, made: dict | None = None) -> dict:
    """The toy part of the demo, at full size: Toy1 sweep (Fig. 3), Toy2 sweep (Fig. 4), Toy1 dynamics (Fig. 2).
    Returns the runs it made (``toy_sweep``: the Toy1 sweep, which covers M = 10, for the Hessian part)."""
    run_sweep(ToySweepConfig(toy="toy1"), out.sub("toy1_sweep"), show_progress=show_progress)
    run_sweep(ToySweepConfig(toy="toy2"), out.sub("toy2_sweep"), show_progress=show_progress)
    run_dynamics(ToyDynamicsConfig(), out.sub("toy1_dynamics"))
    return {"toy_sweep": out.path / "toy1_sweep"}
