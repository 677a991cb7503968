"""The NAD study: search the per-class sub-architectures of a trained classifier, then measure them.

    run_search(NADConfig(run=CLASSIFY_RUN), out)       masks.npz + masks.json, search curves, report
    run_search(NADConfig(model="net.py:factory", weights="w.pt", data="images/"), out)
    run_evaluate(out)                                  hit rate, similarity, misclassification, branch link

The classifier comes from a ``branchspec classify train`` run (``run``), or is any PyTorch CNN classifier a
user brings (``model``: ``path/to/file.py:factory`` or ``package.module:factory``, called with no argument;
``weights``: a state dict, ``.pt``/``.pth``/``.ckpt`` or ``.safetensors``; ``data``: anything
:func:`branchspec.data.images.load_images` reads). The search uses the training split, the evaluation the test
split. See docs/nad.md for the choices made where the paper is silent.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from branchspec import runs
from branchspec.analysis import nad
from branchspec.analysis import nad_metrics as nm
from branchspec.devices import resolve_device
from branchspec import findings
from branchspec.errors import BranchspecError
from branchspec.report import build_report
from branchspec.report.plots import curves, heatmap, heatmap_grid, image_grid, subplots
from branchspec.rundir import RunDir, to_plain

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # torchvision-style models expect ImageNet normalization
IMAGENET_STD = [0.229, 0.224, 0.225]
STATE = "search_state.pt"
RUN_BETA = 1.0  # β for the ResNet18s of `classify train` runs, chosen by the sweep in docs/nad.md
DEMO_STEPS = 200


@dataclass
class NADConfig:
    """One NAD search: the classifier (``run``, or ``model`` + ``weights`` + ``data``), the layers and the
    search settings (the authors' by default)."""

    run: str | None = None  # a `branchspec classify train` run directory
    checkpoint: str = "last"  # of that run: "last", "init" or a path
    model: str | None = None  # path/to/file.py:factory or package.module:factory
    weights: str | None = None  # the model's state dict (.pt/.pth/.ckpt or .safetensors)
    data: str | None = None  # with model: "digits", a cifar-10-batches-py folder, an image tree, or a tar of one
    mean: list[float] | None = None  # with model: normalization of images in [0, 1] (default: ImageNet's)
    std: list[float] | None = None
    size: int | None = None  # with model: image-tree images resized to this side (default 32)
    limit_per_class: int | None = None  # with model: the first N images of each class (quick runs)
    layers: list[str] | None = None  # module names (relative to a branch); default: every residual block
    classes: list[int] | None = None  # the classes to search (default: all)
    search: nad.SearchSettings = field(default_factory=nad.SearchSettings)
    execution: str = "auto"  # Branched slim ResNets: fused (auto) or loop
    device: str = "auto"  # auto: cuda when available
    precision: str | None = None  # default: bf16-mixed on CUDA, 32-true on the CPU

    @classmethod
    def from_dict(cls, d: dict) -> "NADConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        return cls(**{**d, "search": nad.SearchSettings(**d.get("search", {}))})

    def check(self) -> "NADConfig":
        if (self.run is None) == (self.model is None):
            raise BranchspecError("give exactly one classifier: `run` CLASSIFY_RUN, or `model` FILE.py:FACTORY "
                                  "with `weights` and `data`.")
        if self.model is not None and self.data is None:
            raise BranchspecError("`model` needs `data` (the images it classifies: 'digits', a folder or a tar).")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise BranchspecError("give `mean` and `std` together, one value per image channel each.")
        if self.std is not None and min(self.std) <= 0:
            raise BranchspecError(f"`std` must be positive, got {self.std}.")
        self.search.check()
        return self


@dataclass
class EvalConfig:
    """The evaluation: the authors' 100 mosaics and top-10% pixels; top-3 similar sub-architectures."""

    mosaics: int = 100
    mask_rate: float = nm.MASK_RATE
    mosaic_scale: float = 1.0  # 1: the mosaic keeps its 2S × 2S size; 0.5: resized to S × S as the authors do
    top_k: int = 3
    detection_images: int = 50  # test images per class on which each sub-architecture is run as a detector
    permutations: int = 1000  # of the branch link's permutation test
    seed: int = 0
    device: str | None = None  # default: the search's
    precision: str | None = None

    def check(self) -> "EvalConfig":
        if min(self.mosaics, self.top_k, self.detection_images) < 1 or self.permutations < 0:
            raise BranchspecError("`mosaics`, `top_k` and `detection_images` must be positive, `permutations` ≥ 0.")
        if not (0 < self.mask_rate < 1 and 0 < self.mosaic_scale <= 1):
            raise BranchspecError(f"need 0 < mask rate < 1 and 0 < mosaic scale ≤ 1, got {self.mask_rate} and "
                                  f"{self.mosaic_scale}.")
        return self


# -------------------------------------------------------------------------------------------- the source
@dataclass
class Classifier:
    """The frozen classifier and one split of its data (normalized images)."""

    model: nn.Module  # in eval mode; a Branched for a classify run
    images: Tensor
    labels: Tensor
    classes: list[str]
    branched: bool
    search_defaults: dict = field(default_factory=dict)  # SearchSettings defaults that depend on the classifier


def load_source(cfg: NADConfig, split: str, show_progress: bool = False) -> Classifier:
    """The classifier of ``cfg`` and its ``split`` ("train" for the search, "test" for the evaluation)."""
    if cfg.run is not None:
        run = runs.open(cfg.run).expect("classify train")
        model = run.model(cfg.checkpoint)
        nad.check_layer_names(model, cfg.layers)
        images, labels, classes = run.data(split, show_progress=show_progress)
        recipe = run.config.get("recipe", {})
        own = {"beta": RUN_BETA, "crop_padding": recipe.get("crop_padding"), "flip": recipe.get("flip")}
        return Classifier(model, images, labels, classes, model.num_branches > 1, own)
    from branchspec.data.images import load_images
    from branchspec.train.classify import normalize

    model = runs.load_user_model(cfg.model, cfg.weights)
    nad.check_layer_names(model, cfg.layers)
    data = load_images(cfg.data, split, size=cfg.size, limit_per_class=cfg.limit_per_class,
                       show_progress=show_progress)
    mean, std = cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD
    if len(mean) != data.images.shape[1]:
        raise BranchspecError(f"`mean`/`std` give {len(mean)} channels but the images have {data.images.shape[1]}.")
    images = normalize(data.images, mean, std)
    with torch.no_grad():
        out = model(images[:1])
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.dim() != 2 or out.shape[1] != len(data.classes):
        raise BranchspecError(f"the model gives outputs of shape {tuple(out.shape)} for one image, but the data has "
                              f"{len(data.classes)} classes; a classifier must give [B, {len(data.classes)}] logits.")
    return Classifier(model, images, data.labels, data.classes, False)


# ---------------------------------------------------------------------------------------------- search
_RESUME_FREE = ("device", "precision", "command", "classes_per_pass", "checkpoint_every", "source")


def _resolve(cfg: NADConfig, source: Classifier) -> NADConfig:
    """Absolute paths, the precision, and the search defaults that depend on the classifier (β, augmentation)."""
    absolute = {k: str(Path(v).resolve()) for k in ("run", "weights") if (v := getattr(cfg, k)) is not None}
    if cfg.data is not None and cfg.data != "digits":
        absolute["data"] = str(Path(cfg.data).resolve())
    if cfg.model is not None and cfg.model.rpartition(":")[0].endswith(".py"):
        where, _, name = cfg.model.rpartition(":")
        absolute["model"] = f"{Path(where).resolve()}:{name}"
    own = source.search_defaults  # the classifier's own augmentation, and β for our ResNets
    search = dataclasses.replace(cfg.search, **{k: v for k, v in own.items() if getattr(cfg.search, k) is None})
    search = search.resolved()
    from branchspec.train.lightning import default_precision

    precision = cfg.precision or default_precision(resolve_device(cfg.device).type)
    return dataclasses.replace(cfg, **absolute, search=search, precision=precision)


def run_search(cfg: NADConfig, out: str | RunDir, *, show_progress: bool = True) -> nad.SubArchitectures:
    """Search the sub-architectures into ``out`` (resuming a search stopped there); write masks, metrics,
    figures and the report."""
    cfg.check()
    run = RunDir.of(out)
    source = load_source(cfg, "train", show_progress)
    cfg = _resolve(cfg, source)
    device = resolve_device(cfg.device)
    config = {"command": "nad search", **to_plain(cfg)}
    run.check_same_run(config, (*_RESUME_FREE, "evaluate"), "NAD search")
    run.write_config(config)
    model = nad.gated_execution(source.model, cfg.execution).to(device)
    layers = nad.find_layers(model, source.images[:1].to(device), cfg.layers)
    start = time.perf_counter()
    sub = nad.search(model, source.images.to(device), source.labels.to(device), classes=source.classes,
                     layers=layers, settings=cfg.search, tasks=cfg.classes, device=device, precision=cfg.precision,
                     state_path=run.checkpoints / STATE, show_progress=show_progress)
    seconds = time.perf_counter() - start
    sub.info["source"] = {k: getattr(cfg, k) for k in ("run", "checkpoint", "model", "weights", "data")}
    sub.save(run.path)
    kept = sub.kept() / np.array([layer.channels for layer in layers])
    searched = sub.searched.numpy()
    run.write_metrics({
        "classes_searched": int(searched.sum()),
        "classes_without_correct": sub.info["classes_without_correct"],
        "search_steps": sub.info["steps"],
        "search_seconds": seconds,
        "kept_fraction": dict(zip([layer.name for layer in layers], kept[searched].mean(0).tolist()))
        if searched.any() else {},
    }, merge=False)
    _search_figures(run, sub, kept)
    build_report(run, title="NAD: sub-architecture search")
    return sub


def _search_figures(run: RunDir, sub: nad.SubArchitectures, kept: np.ndarray) -> None:
    if not sub.searched.any():
        return
    names = [layer.name for layer in sub.layers]
    fig, axes = subplots(1, 1, panel=(max(4.0, 0.45 * len(names) + 2), max(3.0, 0.25 * len(sub.classes) + 1.5)))
    heatmap(axes[0, 0], np.where(sub.searched.numpy()[:, None], kept, np.nan), symmetric=False, xlabels=names,
            ylabels=sub.classes, title="share of channels kept", xlabel="layer", ylabel="class")
    run.save_figure(fig, "nad_kept_channels", "The share of each layer's channels that each class's "
                    "sub-architecture keeps (σ(m) > 0.5). Blank rows: classes that could not be searched.")
    history = sub.info.get("history", {})
    if history:
        cols = nad.HISTORY_COLUMNS
        fig, axes = subplots(1, 3, panel=(3.8, 3.0))
        for ax, key in zip(axes[0], ("loss", "mse", "kept_fraction")):
            for cls, rows in history.items():
                h = np.asarray(rows)
                ax.plot(h[:, 0], h[:, cols.index(key)], lw=1, label=cls)
            ax.set(xlabel="step", title=key)
            ax.grid(alpha=0.3)
        if len(history) <= 12:
            axes[0, 2].legend(fontsize=6)
        fig.tight_layout()
        run.save_figure(fig, "nad_search", "The search of every class: its loss on the step's batch, the "
                        "activation-preservation term Σ_l MSE, and the share of all gated channels kept.")


# ------------------------------------------------------------------------------------------- evaluation
def run_evaluate(out: str | RunDir, ecfg: EvalConfig | None = None, *, show_progress: bool = True) -> dict:
    """Measure the sub-architectures of a search in ``out``: each one as a detector of its class, the hit rate
    per layer, the similarity, the misclassification statistic, and (branched classifiers) the branch link."""
    ecfg = (ecfg or EvalConfig()).check()
    run = RunDir.of(out, must_exist=True)
    raw = run.read_config()
    if raw.get("command") != "nad search":
        raise BranchspecError(f"{run.path} is not a 'branchspec nad search' output; give the `out` of one.")
    cfg = NADConfig.from_dict(raw)
    sub = nad.SubArchitectures.load(run.path)
    device = resolve_device(ecfg.device or cfg.device)
    from branchspec.train.lightning import default_precision

    precision = ecfg.precision or (cfg.precision if ecfg.device is None else None) or default_precision(device.type)
    autocast = nad.precision_context(device, precision)
    run.write_config({**raw, "evaluate": to_plain(ecfg)})
    source = load_source(cfg, "test", show_progress)
    model = nad.gated_execution(source.model, cfg.execution).to(device)
    layers = nad.find_layers(model, source.images[:1].to(device), [layer.name for layer in sub.layers])
    if [layer.channels for layer in layers] != [layer.channels for layer in sub.layers]:
        raise BranchspecError(f"the masks in {run.path} do not fit the classifier's layers; search again.")
    names = [layer.name for layer in layers]
    x, y = source.images, source.labels
    metrics: dict = {"classes_without_correct": sub.info.get("classes_without_correct", []),
                     "test_images": int(len(y))}
    T = len(sub.classes)
    predictions = nad.predict(model, x, device=device, autocast=autocast,
                              desc="classifying the test images" if show_progress else None)
    metrics["test_accuracy"] = float((predictions == y).float().mean())
    metrics["original_recall"] = dict(zip(sub.classes, nm.class_recall(predictions, y, T).tolist()))
    per_layer = nm.iou(sub.masks)
    if sub.searched.any():
        metrics["detection"] = _whether(model, layers, sub, x, y, ecfg, device, autocast)
        metrics.update(_similarity(per_layer, sub, names))
        metrics["misclassification"] = _misclassification(per_layer.mean(0), source.model, x, y, predictions, sub,
                                                          ecfg, device)
        metrics["hit_rate"] = _where(run, model, layers, sub, x, y, ecfg, device, autocast)
        if source.branched:
            metrics["branch_link"] = _branch_link(model, source, sub, layers, ecfg)
        _evaluation_figures(run, metrics, sub, per_layer, names)
    run.write_metrics(metrics)
    findings.write(run, "nad")
    build_report(run, title="NAD: sub-architectures")
    return run.read_metrics()


def _misclassification(sim: Tensor, model, x: Tensor, y: Tensor, predictions: Tensor, sub: nad.SubArchitectures,
                       ecfg: EvalConfig, device) -> dict:
    """The misclassification statistic with its binomial test, the class-permutation test (errors fixed, the
    similarity's classes relabelled), and the same two for the trivial similarity of class-mean penultimate
    features (``trivial_baseline``): what the sub-architectures add over the features alone."""
    out = nm.misclassification(sim, y, predictions, sub.searched, ecfg.top_k)
    perm = nm.misclassification_permutation(sim, y, predictions, sub.searched, ecfg.top_k,
                                            permutations=ecfg.permutations, seed=ecfg.seed)
    out["permutation_p"], out["permutation_null_mean"], out["permutation_null_95"] = (
        perm["p_value"], perm["null_mean"], perm["null_95"])
    features = nm.penultimate_features(model.to(device), x, device=device)
    trivial = nm.feature_similarity(features, y, len(sub.classes))
    base = nm.misclassification(trivial, y, predictions, sub.searched, ecfg.top_k)
    base_perm = nm.misclassification_permutation(trivial, y, predictions, sub.searched, ecfg.top_k,
                                                 permutations=ecfg.permutations, seed=ecfg.seed)
    out["trivial_baseline"] = {"similarity": "cosine of the class-mean penultimate features", "rate": base["rate"],
                               "chance": base["chance"], "p_value": base["p_value"],
                               "permutation_p": base_perm["p_value"]}
    return out


def _whether(model, layers, sub: nad.SubArchitectures, x: Tensor, y: Tensor, ecfg: EvalConfig, device,
             autocast) -> dict:
    """Each sub-architecture as a detector of its class, on up to ``detection_images`` test images per class."""
    from branchspec.analysis.classify import sample_per_class

    pick = sample_per_class(y, ecfg.detection_images, ecfg.seed)
    tasks = torch.nonzero(sub.searched).flatten().tolist()
    D = nm.detection(model, layers, sub.logits, x[pick], y[pick], tasks, len(sub.classes), device=device,
                     autocast=autocast)
    others = ~torch.eye(len(sub.classes), dtype=torch.bool)[tasks]
    recall = D[torch.arange(len(tasks)), tasks]
    fpr = (D * others).sum(1) / others.sum(1).clamp_min(1)
    counts = torch.bincount(y[pick], minlength=len(sub.classes))[tasks]
    return {"images_per_class": int(counts.min()) if counts.min() == counts.max() else counts.tolist(), "matrix": D,
            "recall": {sub.classes[c]: float(r) for c, r in zip(tasks, recall)},
            "false_positive_rate": {sub.classes[c]: float(f) for c, f in zip(tasks, fpr)},
            "mean_recall": float(recall.mean()), "mean_false_positive_rate": float(fpr.mean())}


def _similarity(per_layer: Tensor, sub: nad.SubArchitectures, names) -> dict:
    """The mean-IoU matrix (classes not searched: null) and the mean IoU between classes at each layer."""
    both = sub.searched[:, None] & sub.searched[None, :]
    pairs = both & ~torch.eye(len(sub.classes), dtype=torch.bool)
    return {"similarity": per_layer.mean(0).masked_fill(~both, float("nan")),
            "mean_iou_between_classes": {n: float(per_layer[i][pairs].mean()) if pairs.any() else None
                                         for i, n in enumerate(names)}}


def _where(run: RunDir, model, layers, sub: nad.SubArchitectures, x: Tensor, y: Tensor, ecfg: EvalConfig, device,
           autocast) -> dict:
    """The hit rate per layer on 2×2 mosaics of the searched classes (and the example figure)."""
    pool = [c for c in torch.nonzero(sub.searched).flatten().tolist() if bool((y == c).any())]
    if len(pool) < 4:
        return {"skipped": f"2×2 mosaics need 4 searched classes with test images, {len(pool)} have some"}
    mosaics, tiles, _ = nm.make_mosaics(x, y, pool, ecfg.mosaics, ecfg.seed)
    if ecfg.mosaic_scale != 1.0:
        side = max(2, 2 * round(mosaics.shape[-1] * ecfg.mosaic_scale / 2))  # even: four equal tiles
        mosaics = torch.nn.functional.interpolate(mosaics, size=(side, side), mode="bilinear", antialias=True,
                                                  align_corners=False)
    hits, chosen = nm.hit_rates(model, layers, sub.logits, mosaics, tiles, mask_rate=ecfg.mask_rate, device=device,
                                autocast=autocast, return_selection=True)
    names = [layer.name for layer in layers]
    _mosaic_figure(run, mosaics[0], tiles[0], chosen[0], names, sub.classes)
    return nm.hit_rate_summary(hits, names)


def _branch_link(model, source: Classifier, sub: nad.SubArchitectures, layers, ecfg: EvalConfig) -> dict:
    from branchspec.analysis.classify import activity, branch_outputs_in_batches, contribution_matrix

    outputs = branch_outputs_in_batches(model, source.images)
    contribution = contribution_matrix(outputs, source.labels, len(sub.classes)).numpy()  # [M, T]
    counts = nm.branch_counts(sub.masks, layers)  # [L, T, M]
    share = nm.shares(counts.sum(0))
    searched = sub.searched.numpy()
    link = nm.branch_link(share, contribution, searched, active=activity(outputs)["active"],
                          permutations=ecfg.permutations, seed=ecfg.seed)
    link["per_layer_pearson"] = {layer.name: nm.branch_link(nm.shares(c), contribution, searched, permutations=0)[
        "pearson"] for layer, c in zip(layers, counts)}
    link["share"] = share  # [T, M]
    link["contribution"] = contribution  # [M, T]
    return link


def _mosaic_figure(run: RunDir, mosaic: Tensor, tiles: Tensor, chosen: Tensor, names, classes) -> None:
    """One mosaic and, for each tile's class and layer, its top pixels (the rest darkened by 80%)."""
    img = mosaic.permute(1, 2, 0).numpy()
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
    if img.shape[-1] == 1:
        img = img.repeat(3, -1)
    panels, titles = [], []
    for q in range(4):
        for i, name in enumerate(names):
            keep = chosen[q, i].numpy()[..., None]
            panels.append(img * (0.2 + 0.8 * keep))
            titles.append(f"{classes[int(tiles[q])]} @ {name}" if q == 0 or i == 0 else name)
    fig = image_grid(panels, nrows=4, ncols=len(names), titles=titles, panel=1.2,
                     row_labels=[f"tile {q}: {classes[int(tiles[q])]}" for q in range(4)])
    run.save_figure(fig, "nad_mosaic_example", "One 2×2 mosaic (tiles: top-left, top-right, bottom-left, "
                    "bottom-right). Row q: the sub-architecture of tile q's class; at each layer the top pixels of "
                    "its channel-summed gated activation are bright, the rest darkened.")


def _evaluation_figures(run: RunDir, metrics: dict, sub: nad.SubArchitectures, per_layer: Tensor, names) -> None:
    searched = sub.searched.numpy()
    labels = [c for c, s in zip(sub.classes, searched) if s]
    hr = metrics["hit_rate"]
    if "mean" in hr:
        fig, axes = subplots(1, 1, panel=(max(4.5, 0.5 * len(names)), 3.4))
        ax = axes[0, 0]
        curves(ax, range(len(names)), {"hit rate": [hr["mean"][n] for n in names]},
               yerr={"hit rate": [hr["std"][n] for n in names]}, xlabel="layer", ylabel="hit rate",
               title=f"hit rate on {hr['mosaics']} 2×2 mosaics (mean ± std)")
        ax.axhline(nm.CHANCE_HIT, color="C3", ls="--", lw=1, label="chance 0.25")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        run.save_figure(fig, "nad_hit_rate", "Where disentanglement occurs: per layer, the share of a "
                        "sub-architecture's top-10% activation pixels that fall on its own class's tile, averaged over "
                        "the four tiles of a mosaic; mean ± std over mosaics. Chance: 0.25.")
    keep = np.ix_(searched, searched)
    fig, axes = subplots(1, 1, panel=(max(4.0, 0.3 * len(labels) + 2), max(3.4, 0.3 * len(labels) + 1.5)))
    heatmap(axes[0, 0], per_layer.mean(0).numpy()[keep], symmetric=False, xlabels=labels, ylabels=labels,
            title="sub-architecture similarity (mean IoU over layers)").set_clim(0, 1)
    run.save_figure(fig, "nad_similarity", "Similarity of the sub-architectures: the IoU of their kept channels, "
                    "averaged over the layers (similarSubArch.py).")
    fig = heatmap_grid([m.numpy()[keep] for m in per_layer], names, ncols=min(4, len(names)), symmetric=False,
                       suptitle="IoU of the kept channels, per layer")
    run.save_figure(fig, "nad_iou_per_layer", "The IoU of every pair of sub-architectures at each layer.")
    mis = metrics["misclassification"]
    if mis.get("by_k"):
        ks = sorted(int(k) for k in mis["by_k"])
        fig, axes = subplots(1, 1)
        curves(axes[0, 0], ks, {"misclassified images": [mis["by_k"][k]["rate"] for k in ks],
                                "chance": [mis["by_k"][k]["chance"] for k in ks]}, xlabel="k", ylabel="rate",
               title=f"true class among the k most similar ({mis['errors_used']} errors)")
        run.save_figure(fig, "nad_misclassification", "For misclassified test images: how often the true class is "
                        "among the k sub-architectures most similar to the predicted class's, against chance k/(S−1).")
    link = metrics.get("branch_link")
    if link:
        share, contribution = np.asarray(link["share"]), np.asarray(link["contribution"])
        fig, axes = subplots(1, 3, panel=(4.2, 3.4))
        heatmap(axes[0, 0], share[searched].T, symmetric=False, xlabels=labels, xlabel="class", ylabel="branch",
                title="share of kept channels")
        heatmap(axes[0, 1], contribution[:, searched], xlabels=labels, xlabel="class", ylabel="branch",
                title="contribution (classifier analysis)")
        axes[0, 2].scatter(share[searched].T.ravel(), contribution[:, searched].ravel(), s=8)
        axes[0, 2].set(xlabel="share of kept channels", ylabel="contribution",
                       title=f"Pearson r = {link['pearson']:.2f}" if link["pearson"] is not None else "")
        axes[0, 2].grid(alpha=0.3)
        fig.tight_layout()
        run.save_figure(fig, "nad_branch_link", "Does NAD recover branch specialization? Left: the share of each "
                        "class's kept channels (all layers) in each branch; middle: each branch's contribution to "
                        "each class (its mean confidence margin); right: one point per branch and class.")
    det = metrics["detection"]
    tasks = [c for c, ok in enumerate(searched) if ok]
    fig, axes = subplots(1, 1, panel=(max(4.0, 0.3 * len(sub.classes) + 2), max(3.4, 0.3 * len(tasks) + 1.5)))
    heatmap(axes[0, 0], np.asarray(det["matrix"]), symmetric=False, xlabels=sub.classes, ylabels=labels,
            xlabel="true class of the images", ylabel="sub-architecture of",
            title=f"share assigned to the sub-architecture's class (recall {det['mean_recall']:.2f}, "
                  f"false positives {det['mean_false_positive_rate']:.2f})").set_clim(0, 1)
    run.save_figure(fig, "nad_detection", "Whether a sub-architecture still classifies, and only its own class: "
                    "row c, column t is the share of class-t test images that the network gated by class c's "
                    "binary sub-architecture assigns to c. Diagonal: recall; off-diagonal: false positives.")


# -------------------------------------------------------------------------------------------------- demo
def demo(out: RunDir, show_progress: bool = True, made: dict | None = None) -> dict:
    """The digits case: NAD on the demo's branched digits classifier (``made["classifier"]``, which the classify
    part makes; the demo runs that part first). The search is 200 steps long, an eighth of the default, to stay
    near a minute on a CPU: it shows the whole pipeline, but its masks are not converged (docs/results.md has the
    full-length search)."""
    made = made or {}
    if "classifier" not in made:
        raise BranchspecError("the NAD demo searches the classify part's classifier; run that part first.")
    run_search(NADConfig(run=str(made["classifier"]), search=nad.SearchSettings(steps=DEMO_STEPS)), out,
               show_progress=show_progress)
    run_evaluate(out, show_progress=show_progress)
    return {}
