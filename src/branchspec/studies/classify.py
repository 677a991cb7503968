"""The classification study (Sec. 6; Figs. 5-8, 16-17): train a branched slim-ResNet18 classifier, analyse its
branches, and sweep the number of branches M.

    run_train(ClassifyConfig(...), out)           train (or resume) into a run directory
    run_analyze(run)                              Figs. 5-8, 16, contribution matrix, ablation, into run/analysis
    run_sweep(ClassifyConfig(...), [2, ..], out)  one run per M, then Fig. 5 left and Fig. 17
    load_classifier(run), load_split(run)         the trained model and its data, for other analyses

A run directory holds, besides config.yaml and metrics.json: ``checkpoints/last.ckpt`` (Lightning: weights,
optimizer, schedule and loop state, for exact resume) and the branch weights in the loop layout as
safetensors, ``checkpoints/init.safetensors`` (before the first step) and ``checkpoints/weights.safetensors``
(written with every checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor

from branchspec.analysis import classify as ac
from branchspec.branched import Branched
from branchspec.data.images import DIGITS, ImageSet, load_images
from branchspec.devices import resolve_device
from branchspec import findings
from branchspec.errors import BranchspecError, log
from branchspec.losses import LOSSES
from branchspec.nets.resnet import (EXECUTIONS, PAPER_WIDTHS, FusedResNet18, as_execution, branched_resnet,
                                    channels_last, check_layout, check_widths, choose_execution, grouped_state,
                                    unfuse)
from branchspec.report import build_report
from branchspec.report.plots import curves, heatmap, heatmap_grid, image_grid, subplots
from branchspec.rundir import RunDir, atomic_save_npz, atomic_write_bytes, to_plain
from branchspec.train.classify import (BATCHNORM_SETTLED_STEPS, BranchedClassifier, Recipe, normalize,
                                       recalibrate_batchnorm, total_weight_decay,
                                       with_total_decay)
from branchspec.train.lightning import check_precision

INIT, WEIGHTS = "init.safetensors", "weights.safetensors"
SWEEP_M = [2, 4, 8, 16, 32]  # Fig. 5 left and Fig. 17


@dataclass
class ClassifyConfig:
    """A classification run. Defaults: the paper's model (M = 16 slim ResNet18 branches of 79,262 parameters,
    the clamped soft-target CE), trained with SGD and a one-cycle schedule at batch 512."""

    data: str = DIGITS  # "digits", a cifar-10-batches-py folder, an image tree, or a .tar(.gz) of one
    branches: int = 16
    widths: list[int] = field(default_factory=lambda: list(PAPER_WIDTHS))
    loss: str = "clamped_ce"  # a key of branchspec.losses.LOSSES; "cross_entropy" is plain CE
    head_scale: float | None = None  # the heads' initial weights × this; None: 1/M (the sum starts in the clamp)
    execution: str = "auto"  # auto (the fastest exact here), lanes, fused (grouped), loop (the reference) or vmap
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    size: int | None = None  # image trees: resize to this side (default 32)
    limit_per_class: int | None = None  # train on the first N images of each class (quick runs)
    test_limit_per_class: int | None = None
    holdout: float = 0.1  # a tree with no test split (ROOT/<class>/*, ROOT/train/ alone): this share is the test
    split_seed: int = 0  # ... drawn from this seed (not the training seed: every seed of a sweep sees one test set)
    eval_every: int = 1  # evaluate on the test split every N epochs
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # default: bf16-mixed on CUDA, 32-true on the CPU
    checkpoint_every: int | None = None  # also checkpoint every N steps (always at the end of each epoch)
    checkpoint_minutes: float | None = 10.0  # and every this many minutes of wall-clock within an epoch
    compile: bool = False  # torch.compile the forward (GPU)
    channels_last: bool = True  # NHWC memory layout: 3.5× faster grouped convolutions on the CPU (lanes: always)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifyConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**{**d, "recipe": Recipe(**d.get("recipe", {}))})

    def check(self) -> "ClassifyConfig":
        if self.loss not in LOSSES:
            raise BranchspecError(f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)}.")
        if self.execution not in EXECUTIONS:
            raise BranchspecError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}.")
        if int(self.branches) < 1 or int(self.eval_every) < 1:
            raise BranchspecError(f"branches and eval_every must be positive, got {self.branches}, {self.eval_every}.")
        if self.execution == "lanes":
            check_layout("lanes", int(self.branches))
        check_precision(self.precision, self.accelerator)
        if self.head_scale is not None and not self.head_scale > 0:
            raise BranchspecError(f"head_scale must be positive, got {self.head_scale}.")
        check_widths(self.widths)
        self.recipe.check()
        return self

    def initial_head_scale(self) -> float:
        return 1.0 / self.branches if self.head_scale is None else float(self.head_scale)


# ---------------------------------------------------------------------------------------------- the model
def build_model(cfg: ClassifyConfig, num_classes: int = 10):
    """The run's model at initialization, from ``cfg.seed`` alone, in the execution ``cfg.execution`` (concrete,
    as :func:`resolve` leaves it; the weights are the same in every execution).

    The heads' initial weights and biases are multiplied by :meth:`ClassifyConfig.initial_head_scale`.
    """
    model = branched_resnet(cfg.branches, cfg.widths, num_classes, seed=cfg.seed)
    with torch.no_grad():
        for branch in model.branches:
            branch.linear.weight.mul_(cfg.initial_head_scale())
            branch.linear.bias.mul_(cfg.initial_head_scale())
    return as_execution(model, cfg.execution)


def branched_state(model) -> dict[str, Tensor]:
    """The weights in the loop layout (a Branched's state dict), whatever the execution."""
    model = unfuse(model) if isinstance(model, FusedResNet18) else model
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_weights(model, path: Path) -> Path:
    return atomic_write_bytes(path, save(branched_state(model)))


class ExportWeights(L.Callback):
    """With every Lightning checkpoint, the branch weights in the loop layout as ``weights.safetensors``."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            save_weights(pl_module.model, self.run.checkpoints / WEIGHTS)


# -------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    train: ImageSet
    test: ImageSet
    mean: list[float]
    std: list[float]


def load_data(cfg: ClassifyConfig, show_progress: bool = True) -> Data:
    """The run's splits and the per-channel mean and std of the training images."""
    kw = {"size": cfg.size, "holdout": cfg.holdout, "seed": cfg.split_seed, "show_progress": show_progress}
    test = load_images(cfg.data, "test", limit_per_class=cfg.test_limit_per_class, **kw)
    tr = load_images(cfg.data, "train", limit_per_class=cfg.limit_per_class, **kw)
    if tr.classes != test.classes:
        raise BranchspecError(f"the train and test splits name different classes ({tr.classes} vs {test.classes}).")
    x = tr.images.float() / 255
    return Data(tr, test, x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist())


def resolve(cfg: ClassifyConfig) -> ClassifyConfig:
    """Defaults that depend on the data and the machine: random crop with padding 4 and flips (CIFAR), but a
    1-pixel padding and no flip for the 8×8 digits (a mirrored digit is another symbol); the data path made
    absolute; the execution "auto" made concrete (:func:`~branchspec.nets.resnet.choose_execution`, logged)."""
    digits = cfg.data == DIGITS
    recipe = dataclasses.replace(
        cfg.recipe,
        crop_padding=(1 if digits else 4) if cfg.recipe.crop_padding is None else cfg.recipe.crop_padding,
        flip=(not digits) if cfg.recipe.flip is None else cfg.recipe.flip)
    execution, _ = choose_execution(cfg.execution, cfg.branches, _device_type(cfg))
    return dataclasses.replace(cfg, data=cfg.data if digits else str(Path(cfg.data).resolve()), recipe=recipe.check(),
                               execution=execution)


def _device_type(cfg: ClassifyConfig) -> str:
    return resolve_device(None if cfg.accelerator in ("auto", "gpu") else cfg.accelerator).type


# ------------------------------------------------------------------------------------------------- train
_RESUME_FREE = {"accelerator", "devices", "num_nodes", "strategy", "precision", "checkpoint_every", "compile",
                "checkpoint_minutes", "lr_changes", "test_split",
                "channels_last", "eval_every", "command", "classes", "train_images", "test_images", "skipped_files",
                "mean", "std"}


def run_train(cfg: ClassifyConfig, out: str | RunDir, *, show_progress: bool = True, change_lr: bool = False) -> dict:
    """Train (or resume) a branched classifier into ``out``; write metrics, curves, weights and the report.

    ``change_lr``: a resume may change ``cfg.recipe.lr`` (after a non-finite loss, say); the peak of the one-cycle
    schedule becomes the new value from the resumed step on, and the change is recorded in config.yaml
    (``lr_changes``).
    """
    from branchspec.train.lightning import load_checkpoint_file, make_trainer, resume_checkpoint

    run = RunDir.of(out)
    asked = cfg.check().execution
    data = load_data(cfg, show_progress)
    cfg = resolve(cfg).check()
    if cfg.recipe.total_decay is not None:  # the weight decay that reaches the total over this data's steps
        steps = cfg.recipe.epochs * (len(data.train) // cfg.recipe.batch_size)
        cfg = dataclasses.replace(cfg, recipe=with_total_decay(cfg.recipe, steps))
        log.info("weight decay %g: Σ lr·wd = %g over %d steps (on one device)", cfg.recipe.weight_decay,
                 cfg.recipe.total_decay, steps)
    if asked == "auto":
        log.info("execution %s (auto: %s)", cfg.execution, choose_execution("auto", cfg.branches, _device_type(cfg))[1])
    config = {"command": "classify train", **to_plain(cfg), "classes": data.train.classes,
              "train_images": len(data.train), "test_images": len(data.test),
              "skipped_files": {"train": data.train.skipped, "test": data.test.skipped},
              "test_split": data.test.origin,
              "mean": data.mean, "std": data.std}
    old = run.read_config() if run.config_path.is_file() else None
    run.check_same_run(config, _RESUME_FREE | ({"lr"} if change_lr else set()))
    resume = resume_checkpoint(run)
    steps_before = int(load_checkpoint_file(resume)["global_step"]) if resume else 0
    config["lr_changes"] = (old or {}).get("lr_changes", [])
    if old and old["recipe"]["lr"] != cfg.recipe.lr:
        config["lr_changes"] = config["lr_changes"] + [{"step": steps_before, "from": old["recipe"]["lr"],
                                                         "to": cfg.recipe.lr}]
        log.info("the peak learning rate changes from %g to %g at step %d", old["recipe"]["lr"], cfg.recipe.lr,
                 steps_before)
    run.write_config(config)

    model = build_model(cfg, len(data.train.classes))
    if not (run.checkpoints / INIT).is_file():
        save_weights(model, run.checkpoints / INIT)
    if cfg.channels_last or cfg.execution == "lanes":
        channels_last(model)
    module = BranchedClassifier(model, cfg.loss, cfg.recipe, data.train, data.test, data.mean, data.std,
                                seed=cfg.seed, compile=cfg.compile,
                                channels_last=cfg.channels_last or cfg.execution == "lanes")
    advice = (f"resume it with a lower learning rate: the same command with `lr` below {cfg.recipe.lr:g} and "
              "`change_lr`" + (", or with `precision` 32-true." if cfg.precision not in (None, "32-true") else "."))
    trainer = make_trainer(run, max_epochs=cfg.recipe.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
                           num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=cfg.precision,
                           checkpoint_every_n_steps=cfg.checkpoint_every, checkpoint_minutes=cfg.checkpoint_minutes,
                           nonfinite_advice=advice, callbacks=[ExportWeights(run)],
                           enable_progress_bar=show_progress, check_val_every_n_epoch=cfg.eval_every,
                           log_every_n_steps=max(1, min(50, len(data.train) // cfg.recipe.batch_size)))
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=resume, weights_only=True)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    if trainer.global_step > steps_before:  # the wall-clock of this invocation of fit (Lightning's set-up included)
        run.write_metrics({"fit_seconds": seconds, "fit_steps": trainer.global_step - steps_before,
                           "resumed_from_step": steps_before})
    recalibrated = trainer.global_step < BATCHNORM_SETTLED_STEPS
    if recalibrated:  # a short run's running statistics still lean on their initial values: recompute them
        log.info("%d optimizer steps are too few for BatchNorm's running statistics (momentum 0.1); they are "
                 "recomputed from the training images", trainer.global_step)
        x_train = normalize(data.train.images, data.mean, data.std)
        recalibrate_batchnorm(module.model, x_train.contiguous(memory_format=torch.channels_last)
                              if module.channels_last else x_train)
    save_weights(module.model, run.checkpoints / WEIGHTS)
    model = load_classifier(run)[0]
    outputs = ac.branch_outputs_in_batches(model, normalize(data.test.images, data.mean, data.std))
    per_branch = sum(p.numel() for p in model.branches[0].parameters())
    accuracy = ac.accuracy(outputs.sum(0), data.test.labels)
    chance = 1 / len(data.train.classes)
    train_acc = float(trainer.callback_metrics.get("train_acc", float("nan")))
    if accuracy < 1.5 * chance and train_acc > 2 * chance:
        log.warning("the test accuracy %.3f is at chance (%.3f) while the last training batches reached %.3f: the "
                    "model does not carry over to the test split (look at its BatchNorm statistics and the "
                    "learning rate)", accuracy, chance, train_acc)
    run.write_metrics({"test_accuracy": accuracy, "epochs": cfg.recipe.epochs, "steps": trainer.global_step,
                       "total_weight_decay": total_weight_decay(cfg.recipe, trainer.global_step),
                       "batchnorm_recalibrated": recalibrated,
                       "parameters_per_branch": per_branch, "parameters": per_branch * cfg.branches})
    _training_figure(run)
    build_report(run, title=f"Branched classifier (M = {cfg.branches}): training")
    return run.read_metrics()


def _training_figure(run: RunDir) -> None:
    """Loss and accuracy over the steps, from the CSV log."""
    import csv

    from branchspec.train.lightning import csv_logs

    rows = [row for path in csv_logs(run) for row in csv.DictReader(path.open())]
    if not rows:
        return
    fig, axes = subplots(1, 2, panel=(4.5, 3.2))
    for ax, key in zip(axes[0], ("loss", "acc")):
        for split in ("train", "test"):
            pts = [(int(r["step"]), float(r[f"{split}_{key}"])) for r in rows if r.get(f"{split}_{key}")]
            if pts:
                ax.plot(*zip(*pts), marker="o" if split == "test" else None, ms=3, label=split)
        ax.set(xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, "training", "Training loss and accuracy (per step) and test loss and accuracy (per "
                    "evaluation).")


# -------------------------------------------------------------------------------------- loading (API)
def _config(run) -> tuple[RunDir, ClassifyConfig, dict]:
    run = RunDir.of(run, must_exist=True)
    raw = run.read_config()
    if raw.get("command") != "classify train":
        raise BranchspecError(f"{run.path} is not a 'branchspec classify train' run; give the `out` of one.")
    return run, ClassifyConfig.from_dict(raw), raw


def load_classifier(run, checkpoint: str = "last", device="cpu") -> tuple[Branched, dict]:
    """The model of a ``branchspec classify train`` run as a loop-execution Branched in eval mode, and the
    run's config dict.

    ``checkpoint``: "init" (the weights at initialization, saved before the first step), "last", or a path
    to a ``.safetensors`` file of a Branched state dict or a Lightning ``.ckpt`` of the run.
    ``config["loss"]`` is a key of :data:`branchspec.losses.LOSSES` (a per-sample loss on f).
    """
    run, cfg, raw = _config(run)
    model = branched_resnet(cfg.branches, cfg.widths, len(raw["classes"]))
    path = {"init": run.checkpoints / INIT, "last": run.checkpoints / WEIGHTS}.get(checkpoint, Path(checkpoint))
    if not path.is_file():
        raise BranchspecError(f"checkpoint {path} does not exist; give 'init', 'last' or the path of a weights file "
                              "(is the run trained?).")
    state = _read_state(path, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BranchspecError(f"{path} was made by a different configuration than {run.config_path} "
                              f"({str(err).splitlines()[-1].strip()}); give a checkpoint of this run.") from None
    return model.to(device).eval(), raw


def _read_state(path: Path, model: Branched) -> dict[str, Tensor]:
    """A Branched state dict from safetensors, or from a Lightning checkpoint in either layout."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise BranchspecError(f"cannot read the checkpoint {path} ({type(err).__name__}); is it complete?") from None
    state = {k.removeprefix("model."): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    if "linear_weight" in state:  # the fused execution, in either layout
        m = state["linear_weight"].shape[0]
        state = grouped_state(state, m)
        first = model.branches[0]
        fused = FusedResNet18(m, first.widths, first.num_classes, first.in_channels)
        try:
            fused.load_state_dict(state)
        except RuntimeError as err:
            raise BranchspecError(f"{path} was made by a different configuration "
                                  f"({str(err).splitlines()[-1].strip()}); give a checkpoint of this run.") from None
        return unfuse(fused).state_dict()
    return state


def load_split(run, split: str = "test", device="cpu", show_progress: bool = False) -> tuple[Tensor, Tensor, list[str]]:
    """The run's data split as normalized float images ``[N, C, H, W]``, labels int64 ``[N]``, class names."""
    run, cfg, raw = _config(run)
    limit = cfg.test_limit_per_class if split == "test" else cfg.limit_per_class
    data = load_images(cfg.data, split, size=cfg.size, limit_per_class=limit, holdout=cfg.holdout, seed=cfg.split_seed,
                       show_progress=show_progress)
    return normalize(data.images, raw["mean"], raw["std"]).to(device), data.labels.to(device), data.classes


# ---------------------------------------------------------------------------------------------- analyze
def _informative(act: dict, k: int) -> list[int]:
    """The ``k`` branches with the largest response norms, largest first."""
    return [int(i) for i in np.argsort(-act["norms"])[:k]]


def _distributed_classes(contrib: Tensor, k: int) -> list[int]:
    """The ``k`` classes whose inference is shared by the most branches (contribution ≥ 10% of the class's
    largest), as Fig. 8 picks classes "distributed between several branches"."""
    share = contrib / contrib.abs().amax(0, keepdim=True).clamp_min(1e-12)
    return [int(c) for c in (share >= 0.1).sum(0).argsort(descending=True, stable=True)[:k]]


def run_analyze(run, *, checkpoint: str = "last", samples_per_class: int = 20, top_percent=(2.0, 7.0),
                top_branches: int = 2, classes: list[str] | None = None, max_shown: int = 20, seed: int = 0,
                device="cpu") -> dict:
    """Figs. 5-8 and 16, the contribution matrix and the ablation accuracies of a trained run, written into
    ``run/analysis`` (its metrics.json, figures and arrays) and the run's report."""
    run, cfg, raw = _config(run)
    out = run.sub("analysis")
    out.write_config({"command": "classify analyze", "run": str(run.path), "checkpoint": checkpoint,
                      "samples_per_class": samples_per_class, "top_percent": list(top_percent),
                      "top_branches": top_branches, "classes": classes, "seed": seed})
    x, y, names = load_split(run, "test")
    unknown = [c for c in classes or [] if c not in names]
    if unknown:
        raise BranchspecError(f"class(es) {unknown} are not in this run; it has {names}.")
    V = ac.branch_outputs_in_batches(load_classifier(run, checkpoint, device)[0], x)
    V0 = ac.branch_outputs_in_batches(load_classifier(run, "init", device)[0], x)
    C = len(names)
    act, act0 = ac.activity(V), ac.activity(V0)
    conf = ac.confidence(V, y)
    contrib = ac.contribution_matrix(V, y, C)
    abl = ac.ablation(V, y)
    branches = _informative(act, min(top_branches, cfg.branches))
    contrib0 = ac.contribution_matrix(V0, y, C)
    chosen = [names.index(c) for c in classes] if classes else _distributed_classes(contrib, min(3, C))
    sample = ac.sample_per_class(y, samples_per_class, seed)
    metrics = {
        "test_accuracy": abl["full"],
        "num_active": act["num_active"], "num_silent": act["num_silent"],
        "num_active_at_init": act0["num_active"],
        "active": act["active"], "response_norms": act["norms"], "norm_ratio_min": act["norm_ratio_min"],
        # the same on mean-centred responses: a branch that outputs one vector for every input is silent here
        "num_active_centred": act["num_active_centred"], "num_silent_centred": act["num_silent_centred"],
        "num_constant": act["num_constant"], "centred_norm_ratio_min": act["centred_norm_ratio_min"],
        "centred_response_norms": act["centred_norms"],
        "mean_abs_offdiagonal_correlation": _offdiagonal_correlation(V, act["active"]),
        "mean_abs_offdiagonal_correlation_at_init": _offdiagonal_correlation(V0, act0["active"]),
        "mean_abs_correlation_all": _offdiagonal_correlation(V, None),
        "mean_abs_correlation_all_at_init": _offdiagonal_correlation(V0, None),
        "covariance": act["covariance"],
        "contribution": contrib,
        "mean_top_branch_share": float(ac.top_branch_share(contrib).mean()),
        "mean_top_branch_share_at_init": float(ac.top_branch_share(contrib0).mean()),
        # observations 2 and 3: how many branches share a class, and in how many classes a branch is silent
        **{k: v for k, v in ac.experts_per_class(contrib).items() if k.startswith("mean_")},
        **{f"{k}_at_init": v for k, v in ac.experts_per_class(contrib0).items() if k.startswith("mean_")},
        "accuracy_without_branch": abl["without"], "accuracy_branch_alone": abl["alone"],
        "informative_branches": branches, "fig8_classes": [names[c] for c in chosen],
    }
    out.write_metrics(metrics, merge=False)
    findings.write(out, "classify", run.path)
    atomic_save_npz(out.path / "branch_outputs.npz", {"branch_outputs": V.numpy(), "labels": y.numpy(),
                                                      "branch_outputs_init": V0.numpy()})
    images = (x * torch.as_tensor(raw["std"]).view(1, -1, 1, 1) + torch.as_tensor(raw["mean"]).view(1, -1, 1, 1))
    _analysis_figures(out, V, act, act0, conf, contrib, abl, y, names, sample, branches, chosen, images,
                      top_percent, max_shown)
    build_report(run, title=f"Branched classifier (M = {cfg.branches})")
    return metrics


def _offdiagonal_correlation(V: Tensor, active) -> float:
    from branchspec.analysis.activity import correlation, mean_abs_offdiagonal

    return float(mean_abs_offdiagonal(correlation(ac.response_rows(V)), active))


def _class_separators(ax, n_classes: int, width: int) -> None:
    for c in range(1, n_classes):
        ax.axvline(c * width - 0.5, color="k", lw=0.6)


def _branch_labels(m: int) -> list[str]:
    return [str(k) for k in range(m)]


def _analysis_figures(out: RunDir, V, act, act0, conf, contrib, abl, y, names, sample, branches, chosen, images,
                      top_percent, max_shown) -> None:
    M, _, C = V.shape
    fig, axes = subplots(1, 1, panel=(min(16.0, 0.12 * C * C + 2), 0.3 * M + 1.5))
    heatmap(axes[0, 0], ac.class_outputs(V, y, C).reshape(M, C * C), title="mean v_k(x) per true class "
            "(blocks: true class; within a block: the C outputs)", ylabel="branch k",
            xlabels=[f"{names[c]}" if j == 0 else "" for c in range(C) for j in range(C)],
            ylabels=_branch_labels(M))
    _class_separators(axes[0, 0], C, C)
    out.save_figure(fig, "fig6_branch_outputs", "Fig. 6: each branch's output before summation, averaged over "
                    "the test samples of each class. Silent branches stay near zero; active ones specialize.")

    fig, axes = subplots(1, 3, panel=(4.2, 3.6))
    heatmap(axes[0, 0], act["covariance"], title="Cov = F·Fᵀ/(N·C), trained", xlabel="branch", ylabel="branch")
    heatmap(axes[0, 1], act0["covariance"], title="at initialization", xlabel="branch", ylabel="branch")
    norms = act["norms"]
    axes[0, 2].bar(range(M), norms, color=np.where(act["active"], "C0", "0.7"))
    axes[0, 2].axhline(0.1 * norms.max(), color="C3", lw=1, ls="--", label="10% of max")
    axes[0, 2].set(xlabel="branch k", ylabel="‖F_k‖", title=f"{act['num_active']} active, {act['num_silent']} silent")
    axes[0, 2].legend(fontsize=8)
    fig.tight_layout()
    out.save_figure(fig, "fig5_covariance", "Fig. 5 (second panel): the inter-branch covariance of the branch "
                    "responses on the test set, trained and at initialization; right: response norms, grey bars "
                    "are silent branches (norm < 10% of the largest).")

    per = len(sample) // C
    fig, axes = subplots(1, 1, panel=(min(18.0, 0.06 * len(sample) + 2), 0.3 * M + 1.5))
    heatmap(axes[0, 0], conf[:, sample], title=f"conf_k(x): {per} random test samples per class", cmap="viridis",
            ylabel="branch k", xlabels=[names[c] if i == per // 2 else "" for c in range(C) for i in range(per)],
            ylabels=_branch_labels(M))
    _class_separators(axes[0, 0], C, per)
    out.save_figure(fig, "fig7_confidence", "Fig. 7: each branch's confidence in the correct class, "
                    "conf_k = v_k,y − mean_{j≠y} v_k,j, on random test samples of each class. Positive: true "
                    "confidence; negative: false confidence.")

    fig, axes = subplots(1, 2, panel=(max(4.5, 0.45 * C + 1), 0.3 * M + 1.5))
    heatmap(axes[0, 0], contrib, title="contribution: mean conf_k on class c", xlabels=names,
            ylabels=_branch_labels(M), ylabel="branch k")
    axes[0, 1].bar(np.arange(M) - 0.2, abl["without"], width=0.4, label="without branch k")
    axes[0, 1].bar(np.arange(M) + 0.2, abl["alone"], width=0.4, label="branch k alone")
    axes[0, 1].axhline(abl["full"], color="k", lw=1, ls="--", label="all branches")
    axes[0, 1].set(xlabel="branch k", ylabel="test accuracy", title="branch ablation", ylim=(0, 1.02))
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    out.save_figure(fig, "contribution_and_ablation", "Left: the branch×class contribution matrix (columns sum "
                    "over branches to the model's mean margin). Right: test accuracy with each branch removed "
                    "and with each branch alone.")

    display = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for p in top_percent:
        rows, labels = [], []
        for k in branches:
            for c in chosen:
                idx = ac.most_confident(conf, y, k, c, p)[:max_shown]
                rows.append(idx)
                labels.append(f"branch {k}\n{names[c]}")
        ncols = max(len(r) for r in rows)
        grid = np.full((len(rows) * ncols, *display.shape[1:]), np.nan, dtype=display.dtype)  # NaN: an empty cell
        for r, idx in enumerate(rows):
            grid[r * ncols:r * ncols + len(idx)] = display[idx.numpy()]
        fig = image_grid(grid, nrows=len(rows), ncols=ncols, row_labels=labels,
                         suptitle=f"top {p:g}% confidence per branch and class")
        name = "fig8" if p == top_percent[0] else "fig16"
        out.save_figure(fig, f"{name}_top{p:g}pct", f"Figs. 8 and 16: the test samples of each class with the top "
                        f"{p:g}% confidence of the {len(branches)} most active branches, most confident first "
                        f"(at most {max_shown} shown).")


# ------------------------------------------------------------------------------------------------ sweep
def run_sweep(cfg: ClassifyConfig, branches: list[int] | None = None, out: str | RunDir = "runs/classify_sweep", *,
              show_progress: bool = True, change_lr: bool = False) -> dict:
    """Fig. 5 left and Fig. 17: one run per M (nested in ``out`` as ``m<M>``, each resumable), then the active
    and silent counts against M and each run's branch outputs and covariance."""
    run = RunDir.of(out)
    branches = sorted(set(branches or SWEEP_M))
    run.write_config({"command": "classify sweep", "branches": branches, **to_plain(cfg)})
    per_m, outputs = {}, {}
    for m in branches:
        sub = run.sub(f"m{m}")
        metrics = run_train(dataclasses.replace(cfg, branches=m), sub, show_progress=show_progress, change_lr=change_lr)
        x, y, names = load_split(sub, "test")
        V = ac.branch_outputs_in_batches(load_classifier(sub)[0], x)
        act = ac.activity(V)
        per_m[m] = {"test_accuracy": metrics["test_accuracy"], "num_active": act["num_active"],
                    "num_silent": act["num_silent"], "covariance": act["covariance"]}
        outputs[m] = (ac.class_outputs(V, y, len(names)), act["covariance"])
    metrics = {key: {str(m): per_m[m][key] for m in branches} for key in ("test_accuracy", "num_active", "num_silent")}
    run.write_metrics(metrics, merge=False)

    fig, axes = subplots(1, 1)
    curves(axes[0, 0], branches, {"active": [per_m[m]["num_active"] for m in branches],
                                  "silent": [max(per_m[m]["num_silent"], 0.5) for m in branches]},
           xlabel="M (branches)", ylabel="branches", title="active and silent branches", logx=True)
    axes[0, 0].set_yscale("log", base=2)
    run.save_figure(fig, "fig5_active_silent", "Fig. 5 left: active (response norm ≥ 10% of the largest) and "
                    "silent branches against M, both axes logarithmic (a run with no silent branch is drawn at ½).")
    fig = heatmap_grid([outputs[m][0].reshape(m, -1) for m in branches], [f"M = {m}: branch outputs" for m in branches],
                       ncols=len(branches), panel=(3.6, 3.0))
    run.save_figure(fig, "fig17_branch_outputs", "Fig. 17 left: mean branch outputs per true class (as in Fig. 6) "
                    "for each M.")
    fig = heatmap_grid([outputs[m][1] for m in branches], [f"M = {m}" for m in branches], ncols=len(branches),
                       panel=(3.0, 2.6))
    run.save_figure(fig, "fig17_covariance", "Fig. 17 right: the inter-branch covariance for each M (as in Fig. 5).")
    build_report(run, title="Branched classifiers: the M sweep")
    return metrics


# ------------------------------------------------------------------------------------------------- demo
DEMO = ClassifyConfig(data=DIGITS, branches=8, recipe=Recipe(epochs=8, batch_size=128, lr=0.05))


def demo(out: RunDir, show_progress: bool = True, made: dict | None = None) -> dict:
    """The classification part of the demo: M = 8 branches on the embedded digits, trained and analysed.
    Returns the runs it made (``classifier``, for the Hessian and NAD parts)."""
    run_train(DEMO, out, show_progress=show_progress)
    run_analyze(out, top_percent=(10.0,))
    return {"classifier": out.path}
