"""The parts study: the paper's branch analyses on the parallel parts of a user's model (attention heads,
experts, convolution groups, branches), into a run directory (``branchspec parts``); and the demo's tiny
transformer, whose heads' activity is set beside Michel et al.'s head importance and the ablation drop.

    run_parts(PartsConfig(model="net.py:make", weights="w.pt", data="seqs.npz", at="blocks.0.attention"), out)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from branchspec import runs
from branchspec.analysis import parts as analyses
from branchspec.errors import BranchspecError
from branchspec.parts import parts_of
from branchspec.report import build_report
from branchspec.rundir import RunDir, to_plain

ANALYSES = ("activity", "correlation", "ablation", "importance", "contribution")


@dataclass
class PartsConfig:
    """What to analyse: a model (``FILE.py:FACTORY`` and its weights), its inputs, and the sites of its parts."""

    model: str = ""
    weights: str | None = None
    data: str = ""  # a .pt or .npz file with tensors x (inputs) and y (labels), or an image source (classify's)
    at: list[str] = field(default_factory=list)  # module names of the sites; [] for a Branched model's branches
    groups: int | None = None  # a linear site's input groups (heads; convolution groups)
    limit: int = 1000  # inputs analysed
    size: int | None = None  # image sources: the side (default 32)
    analyses: list[str] = field(default_factory=lambda: ["activity", "correlation", "ablation", "importance"])
    loss: str = "cross_entropy"

    def check(self) -> "PartsConfig":
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown or not self.analyses:
            raise BranchspecError(f"`analyses` takes a subset of {list(ANALYSES)}, got {self.analyses}.")
        if not self.model or not self.data:
            raise BranchspecError("give the model (`model` FILE.py:FACTORY) and its inputs (`data`).")
        if self.limit < 1:
            raise BranchspecError(f"`limit` must be a positive integer, got {self.limit}.")
        return self


def load_inputs(source: str, limit: int, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` from a .pt/.npz file, or a labelled image source's test split (normalized per channel)."""
    path = Path(source)
    if path.suffix in (".pt", ".npz"):
        if not path.is_file():
            raise BranchspecError(f"`data` {path} does not exist.")
        if path.suffix == ".npz":
            with np.load(path) as z:
                tensors = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict) or "x" not in tensors or "y" not in tensors:
            raise BranchspecError(f"`data` {path} must hold tensors named x (inputs) and y (labels).")
        x, y = tensors["x"], tensors["y"]
        if len(x) != len(y):
            raise BranchspecError(f"`data` {path} holds {len(x)} inputs but {len(y)} labels.")
        return x[:limit], y[:limit].long()
    from branchspec.data.images import load_images
    from branchspec.train.classify import normalize

    data = load_images(source, "test", size=size, show_progress=False)
    x = data.images.float() / 255
    return normalize(data.images, x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist())[:limit], data.labels[:limit]


def analyse_site(model, at: str | None, x, y, analyses_: list[str], *, groups=None, loss="cross_entropy") -> dict:
    """Every requested analysis of the parts at one site, as ``{name: result}``."""
    parts = parts_of(model, at, groups=groups)
    outputs = analyses.part_outputs(parts, x)
    results = {"parts": parts}
    for name in analyses_:
        if name == "activity":
            results[name] = analyses.activity(parts, x, outputs=outputs)
        elif name == "correlation":
            results[name] = analyses.correlation(parts, x, outputs=outputs)
        elif name == "ablation":
            results[name] = analyses.ablation(parts, x, y)
        elif name == "importance":
            results[name] = analyses.importance(parts, x, y, loss=loss)
        elif name == "contribution":
            results[name] = analyses.contribution(parts, x, y, outputs=outputs)
    if "importance" in results and "ablation" in results and "activity" in results:
        results["agreement"] = agreement(results["activity"], results["importance"], results["ablation"])
    return results


def agreement(activity, importance, ablation) -> dict:
    """Rank correlations between three views of how much each part matters: its centred response norm (the
    paper's activity), Michel et al.'s importance, and the accuracy lost without it."""
    def rho(a, b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return float(spearmanr(a, b).statistic) if a.std() > 0 and b.std() > 0 else float("nan")

    return {"activity_vs_importance": rho(activity.centred_norms, importance.importance),
            "activity_vs_ablation_drop": rho(activity.centred_norms, ablation.drop),
            "importance_vs_ablation_drop": rho(importance.importance, ablation.drop)}


def write_site(run: RunDir, site: str, results: dict) -> dict:
    """Metrics, figures and findings of one site into ``run``."""
    parts = results["parts"]
    metrics = {"kind": parts.kind, "num_parts": parts.num_parts}
    findings = []
    for name, result in results.items():
        if name in ("parts", "agreement"):
            continue
        metrics[name] = result.to_dict()
        if getattr(result, "finding", None):
            findings.append(result.finding)
        if hasattr(result, "figure"):
            run.save_figure(result.figure(), f"{site.replace('.', '_')}_{name}",
                            f"{name} of the {parts.num_parts} {parts.kind} at {site}.")
    if "agreement" in results:
        metrics["agreement"] = results["agreement"]
    metrics["findings"] = findings
    return metrics


def run_parts(cfg: PartsConfig, out: str | RunDir) -> dict:
    """Analyse the parts at every site of ``cfg`` into ``out``: metrics.json (one entry per site), figures, report."""
    cfg.check()
    run = RunDir.of(out)
    run.write_config({"command": "parts", **to_plain(cfg)})
    model = runs.load_user_model(cfg.model, cfg.weights)
    x, y = load_inputs(cfg.data, cfg.limit, cfg.size)
    sites = cfg.at or [None]
    metrics = {}
    for site in sites:
        results = analyse_site(model, site, x, y, cfg.analyses, groups=cfg.groups, loss=cfg.loss)
        metrics[site or "branches"] = write_site(run, site or "branches", results)
    run.write_metrics({"sites": metrics, "inputs": len(x)}, merge=False)
    build_report(run, title=f"Parts of {cfg.model}")
    return run.read_metrics()


# -------------------------------------------------------------------------------------------------------- demo
def demo(out: RunDir, show_progress: bool = True, made: dict | None = None) -> dict:
    """A 2-layer, 4-head transformer trained on the marker task (about half a minute), then the paper's
    analyses on the heads of each attention layer, with Michel et al.'s importance and the ablation drop."""
    from branchspec.nets.transformer import marker_task, train_tiny_transformer

    model, info = train_tiny_transformer(steps=400, seed=0)
    x, y = marker_task(1024, seed=12345)
    out.write_config({"command": "parts", "model": "branchspec.nets.transformer:TinyTransformer (trained here on "
                      "the marker task, 400 Adam steps)", "at": ["blocks.0.attention", "blocks.1.attention"]})
    sites = {}
    for site in ("blocks.0.attention", "blocks.1.attention"):
        results = analyse_site(model, site, x, y, ["activity", "correlation", "ablation", "importance"])
        sites[site] = write_site(out, site, results)
    out.write_metrics({"sites": sites, "inputs": len(x), **info}, merge=False)
    build_report(out, title="Parts: the heads of a tiny transformer")
    return {}
