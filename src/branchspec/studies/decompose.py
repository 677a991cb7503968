"""The class-transfer GAN study (Sec. 7; App. A, D-F): train a branched generator, then decompose, manipulate
and segment images with it.

    run_train(DecomposeConfig(...), out)        train; checkpoints, loss and recovery curves (resumes)
    run_apply(run)                              Figs. 9-11, 18-20 and the scores, into run/apply
    run_manipulate(run, branches, alphas, ...)  Figs. 13-15, into run/manipulate
    run_segment(run, ...)                       Figs. 12, 21, into run/segment

The analyses write into folders nested in the training run, so the training run's report shows them all.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.patches import Rectangle
from safetensors.torch import load_file, save
from skimage import measure

from branchspec.analysis.decompose import (abs_correlation, added_to_image, alpha_sweep, batched_features,
                                           branch_statistics, component_recovery, contrast_stretch,
                                           frechet_distance, psnr, separation_scores, ssim, structure_fidelity,
                                           subset_sums,
                                           to_display)
from branchspec.analysis.segment import choose_eye_branches, iou, segment_eyes
from branchspec.branched import EXECUTIONS as BRANCHED_EXECUTIONS
from branchspec.branched import BranchedOutput
from branchspec.data.domains import DomainImages, load_domains
from branchspec.data.scenes import LAYERS, Scenes, evaluation_scenes, training_scenes
from branchspec import findings
from branchspec.errors import BranchspecError, log
from branchspec.nets.diffusion import make_residual
from branchspec.nets.stargan import Discriminator, GeneratorConfig, branched_generator
from branchspec.report import build_report
from branchspec.report.plots import curves, heatmap, image_grid, subplots
from branchspec.rundir import RunDir, atomic_write_bytes, to_plain
from branchspec.train.gan import ClassTransferGAN, GANRecipe
from branchspec.train.lightning import load_checkpoint_file, make_trainer, resume_checkpoint

SCENES = "scenes"
EXECUTIONS = ("fused", *BRANCHED_EXECUTIONS)


@dataclass
class DecomposeConfig:
    """A class-transfer GAN run. Defaults: the paper's (M = 9, 1/4-width StarGAN-v2 branches, learnt diffusion R,
    StarGAN-v2's recipe, batch 8, 100k iterations) on the embedded layered scenes."""

    data: str = SCENES  # "scenes", or an image tree / tar / CIFAR-10 folder with one class per domain
    domains: list[str] | None = None  # which classes are the domains (CIFAR-10: a subset such as cat,dog)
    size: int | None = None  # image side; default 32 for scenes, 256 for image sources
    num_domains: int = 2  # layered scenes only (2 or 3)
    num_scenes: int = 4000  # layered scenes: training scenes (each in one domain)
    eval_scenes: int = 64  # layered scenes: held-out scenes rendered in every domain
    limit_per_domain: int | None = None  # image sources: read at most this many images per domain
    branches: int = 9
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    residual: str = "diffusion"  # diffusion (App. E), gaussian (App. D) or none
    sigma: float | None = None  # gaussian R: σ in pixels (default size/16)
    dt: float = 0.2  # diffusion R: time step
    heat: float = 0.0  # diffusion R: the optional fixed heat-flow term κ (0: the paper's form, p alone)
    d_width: float = 1.0  # the discriminator's width multiplier (StarGAN-v2's widths)
    execution: str = "fused"
    recipe: GANRecipe = field(default_factory=GANRecipe)
    batch_size: int = 8
    iterations: int = 100_000
    seed: int = 0
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # default: bf16-mixed on CUDA, 32-true on CPU
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = 10.0  # and every this many minutes of wall-clock
    eval_every: int = 1000

    @classmethod
    def from_dict(cls, d: dict) -> "DecomposeConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        recipe = dict(d.get("recipe", {}))
        if "recipe" in d and "mapping_lr" not in recipe:  # runs written before the option trained F at lr
            recipe["mapping_lr"] = recipe.get("lr", GANRecipe.lr)
        heat = d.get("heat", 1.0 if "recipe" in d else cls.heat)  # ... and had the heat term
        return cls(**{**d, "heat": heat, "generator": GeneratorConfig(**d.get("generator", {})),
                      "recipe": GANRecipe(**recipe)})

    def check(self) -> "DecomposeConfig":
        if self.execution not in EXECUTIONS:
            raise BranchspecError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}.")
        for name in ("branches", "batch_size", "iterations", "checkpoint_every", "eval_every", "num_scenes",
                     "eval_scenes"):
            if int(getattr(self, name)) < 1:
                raise BranchspecError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        dataclasses.replace(self.generator, img_size=self.image_size).check()
        self.recipe.check()
        return self

    @property
    def image_size(self) -> int:
        return self.size or (32 if self.data == SCENES else 256)


# ---------------------------------------------------------------------------------------------------- data
def training_data(cfg: DecomposeConfig, show_progress: bool = True) -> DomainImages:
    """The unpaired training images of the run."""
    if cfg.data == SCENES:
        return training_scenes(cfg.num_scenes, size=cfg.image_size, num_domains=cfg.num_domains, seed=cfg.seed)
    return load_domains(cfg.data, cfg.image_size, cfg.domains, split="train", limit=cfg.limit_per_domain,
                        show_progress=show_progress)


def scenes_for_evaluation(cfg: DecomposeConfig) -> list[Scenes]:
    return evaluation_scenes(cfg.eval_scenes, size=cfg.image_size, num_domains=cfg.num_domains, seed=cfg.seed)


def build_generator(cfg: DecomposeConfig):
    """The branched generator of the run, initialized from ``cfg.seed`` alone (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        residual = make_residual(cfg.residual, num_branches=cfg.branches, img_size=cfg.generator.img_size,
                                 sigma=cfg.sigma, dt=cfg.dt, heat=cfg.heat)
    return branched_generator(cfg.generator, cfg.branches, residual=residual, seed=cfg.seed, execution=cfg.execution)


def build_discriminator(cfg: DecomposeConfig) -> Discriminator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        return Discriminator(cfg.generator.img_size, cfg.generator.num_domains, width=cfg.d_width)


# --------------------------------------------------------------------------------------------------- train
def run_train(cfg: DecomposeConfig, out: str | RunDir, *, show_progress: bool = True, change_lr: bool = False) -> dict:
    """Train (or resume) the branched class-transfer GAN into ``out``; write curves, weights and the report.

    ``change_lr``: a resume may change ``cfg.recipe.lr`` (after a non-finite loss, say); both optimizers take it
    from the resumed iteration on, and the change is recorded in config.yaml (``lr_changes``).
    """
    run = RunDir.of(out)
    cfg.check()
    data = training_data(cfg, show_progress)
    cfg = dataclasses.replace(cfg, data=cfg.data if cfg.data == SCENES else str(Path(cfg.data).resolve()),
                              num_domains=len(data.classes), generator=dataclasses.replace(
        cfg.generator, img_size=data.size, num_domains=len(data.classes)).check())
    old = run.read_config() if run.config_path.is_file() else None
    run.check_same_run(cfg, _RESUME_FREE | ({"lr"} if change_lr else set()))
    resume = resume_checkpoint(run)
    lr_changes = (old or {}).get("lr_changes", [])
    if old and old["recipe"]["lr"] != cfg.recipe.lr:
        at = int(load_checkpoint_file(resume)["state_dict"]["iteration"]) if resume else 0
        lr_changes = lr_changes + [{"iteration": at, "from": old["recipe"]["lr"], "to": cfg.recipe.lr}]
        log.info("the learning rate changes from %g to %g at iteration %d", old["recipe"]["lr"], cfg.recipe.lr, at)
    run.write_config({"command": "decompose train", **to_plain(cfg), "domain_names": data.classes,
                      "images_per_domain": data.counts(), "skipped_files": data.skipped, "lr_changes": lr_changes})

    module = ClassTransferGAN(build_generator(cfg), build_discriminator(cfg), cfg.recipe, data,
                              batch_size=cfg.batch_size, seed=cfg.seed, iterations=cfg.iterations)
    monitor = TrainingMonitor(run, cfg, scenes_for_evaluation(cfg) if cfg.data == SCENES else None)
    # two optimizer steps (D, then G) per iteration: Lightning's step counts are twice the iterations
    advice = f"resume it with a lower learning rate: the same command with `lr` below {cfg.recipe.lr:g} and `change_lr`."
    trainer = make_trainer(run, max_steps=2 * cfg.iterations, accelerator=cfg.accelerator, devices=cfg.devices,
                           num_nodes=cfg.num_nodes, strategy=_strategy(cfg), precision=cfg.precision,
                           checkpoint_every_n_steps=2 * cfg.checkpoint_every, checkpoint_minutes=cfg.checkpoint_minutes,
                           nonfinite_advice=advice, callbacks=[monitor], enable_progress_bar=show_progress,
                           use_distributed_sampler=False)
    trainer.fit(module, ckpt_path=resume, weights_only=True)
    if trainer.is_global_zero:
        monitor.record(module, trainer.callback_metrics)
        _training_figures(run)
        build_report(run, title="Class-transfer GAN: training")
    return run.read_metrics()


def _strategy(cfg: DecomposeConfig) -> str:
    """DDP needs ``find_unused_parameters``: D and G are stepped by separate backward passes (so plain "ddp", and
    "auto" on several devices, become ``ddp_find_unused_parameters_true``)."""
    many = cfg.num_nodes > 1 or (str(cfg.devices) not in ("1", "auto")) or (
        str(cfg.devices) == "auto" and cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.device_count() > 1)
    return "ddp_find_unused_parameters_true" if cfg.strategy == "ddp" or (cfg.strategy == "auto" and many) \
        else cfg.strategy


_RESUME_FREE = {"iterations", "accelerator", "devices", "num_nodes", "strategy", "precision", "checkpoint_every",
                "checkpoint_minutes", "lr_changes",
                "eval_every", "command", "domain_names", "images_per_domain", "skipped_files"}


class TrainingMonitor(L.Callback):
    """Every ``eval_every`` iterations: the losses, the generator weights (G and its EMA) and, on layered
    scenes, the component recovery of both; kept in metrics.json under ``history``."""

    def __init__(self, run: RunDir, cfg: DecomposeConfig, scenes: list[Scenes] | None):
        self.run, self.cfg, self.scenes = run, cfg, scenes

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        it = int(module.iteration)
        if trainer.is_global_zero and (it % self.cfg.eval_every == 0 or it == self.cfg.iterations):
            self.record(module, trainer.callback_metrics)

    @torch.no_grad()
    def record(self, module: ClassTransferGAN, logged: dict | None = None) -> None:
        it = int(module.iteration)
        row = {"iteration": it, **{k: float(logged[k]) for k in ("d_loss", "g_loss", "r1") if logged and k in logged}}
        for name, net in (("generator", module.generator), ("generator_ema", module.generator_ema)):
            state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
            atomic_write_bytes(self.run.checkpoints / f"{name}.safetensors", save(state))
            if self.scenes is not None:
                score = scenes_recovery(net, self.scenes, device=module.device)
                row["recovery" if name == "generator" else "recovery_ema"] = score
        history = [r for r in self.run.read_metrics().get("history", []) if r["iteration"] < it] + [row]
        self.run.write_metrics({"latest": row, "history": history})


def scenes_recovery(generator, scenes: list[Scenes], device="cpu", batch_size: int = 64) -> float:
    """Mean matched |correlation| of the re-generated evaluation scenes' branch outputs with their layers,
    averaged over the domains."""
    was_training = generator.training
    generator.eval()
    scores = []
    for d, s in enumerate(scenes):
        out = decompose_in_batches(generator, s.images, d, device, batch_size)
        scores.append(component_recovery(out.branch_outputs, {n: s.layers[n] for n in LAYERS})
                      ["mean_matched_abs_correlation"])
    generator.train(was_training)
    return float(np.mean(scores))


@torch.no_grad()
def decompose_in_batches(generator, images: torch.Tensor, domain, device="cpu",
                         batch_size: int = 64) -> BranchedOutput:
    """``generator.decompose`` of ``images`` into ``domain`` (an int, or one per image), in batches on
    ``device``; the result on the CPU in float32."""
    domain = torch.as_tensor(domain)
    domains = domain.expand(len(images)) if domain.ndim == 0 else domain
    parts = [generator.decompose(images[i:i + batch_size].to(device), domains[i:i + batch_size].to(device))
             for i in range(0, len(images), batch_size)]

    def cat(name, dim=0):
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([getattr(p, name).float().cpu() for p in parts], dim)

    return BranchedOutput(total=cat("total"), branch_outputs=cat("branch_outputs", 1), residual=cat("residual"),
                          subset=parts[0].subset)


def _training_figures(run: RunDir) -> None:
    history = run.read_metrics().get("history", [])
    if not history:
        return

    def series(*names):
        return {n: [r.get(n, np.nan) for r in history] for n in names if any(n in r for r in history)}

    its = [r["iteration"] for r in history]
    recovery = series("recovery", "recovery_ema")
    fig, axes = subplots(1, 2 if recovery else 1, panel=(4.6, 3.4))
    curves(axes[0, 0], its, series("d_loss", "g_loss", "r1"), xlabel="iteration", ylabel="loss",
           title="GAN losses", marker=".")
    caption = "The discriminator's adversarial loss, the generator's loss and R1 over training"
    if recovery:
        curves(axes[0, 1], its, recovery, xlabel="iteration", ylabel="mean matched |corr|",
               title="component recovery (held-out scenes)", marker=".")
        axes[0, 1].set_ylim(0, 1)
        caption += ("; right: component recovery on held-out layered scenes (Hungarian-matched |correlation| of "
                    "branch outputs with the true layers) of G and of its EMA")
    fig.tight_layout()
    run.save_figure(fig, "training_curves", caption + ".")


# -------------------------------------------------------------------------------------------- trained model
def load_generator(run: str | RunDir, weights: str = "ema", device="cpu"):
    """The trained generator of a ``decompose train`` run (``weights``: "ema" or "raw") and its config."""
    run = RunDir.of(run, must_exist=True)
    raw = run.read_config()
    if raw.get("command") != "decompose train":
        made = f"was made by `branchspec {raw['command']}`" if raw.get("command") else "holds no branchspec run"
        raise BranchspecError(f"{run.path} {made}, not by `branchspec decompose train`; give the `out` of a "
                              "decompose train run.")
    if weights not in ("ema", "raw"):
        raise BranchspecError(f"weights must be ema or raw, got {weights!r}.")
    cfg = DecomposeConfig.from_dict(raw)
    path = run.checkpoints / ("generator_ema.safetensors" if weights == "ema" else "generator.safetensors")
    if not path.is_file():
        raise BranchspecError(f"{path} does not exist yet; train the run until its first evaluation step.")
    generator = build_generator(cfg)
    generator.load_state_dict(load_file(str(path)))
    return generator.to(device).eval().requires_grad_(False), cfg, raw


def _analysis_dir(run: RunDir, out, name: str) -> RunDir:
    return out if isinstance(out, RunDir) else RunDir(out if out is not None else run.path / name)


def _evaluation_images(cfg: DecomposeConfig, raw: dict,
                       per_domain: int) -> tuple[list[torch.Tensor], list[Scenes] | None, str]:
    """Held-out images per domain (the evaluation scenes, or the source's test/val split, else its training
    split), the scenes when there is ground truth, and the name of the split."""
    if cfg.data == SCENES:
        scenes = scenes_for_evaluation(cfg)
        return [s.images[:per_domain] for s in scenes], [_first(s, per_domain) for s in scenes], "evaluation scenes"
    for split in ("test", "train"):
        try:
            data = load_domains(cfg.data, cfg.image_size, raw["domain_names"], split=split, limit=per_domain,
                                show_progress=False)
            break
        except BranchspecError:
            if split == "train":
                raise
    return [data.as_float(data.labels == j) for j in range(len(data.classes))], None, split


def _first(s: Scenes, n: int) -> Scenes:
    return Scenes(s.images[:n], {k: v[:n] for k, v in s.layers.items()}, s.domains[:n], s.scene_ids[:n])


# --------------------------------------------------------------------------------------------------- apply
def run_apply(run: str | RunDir, out=None, *, num_images: int = 4, eval_images: int = 500, weights: str = "ema",
              features: str | None = None, classifier_steps: int | None = None, images: str | Path | None = None,
              device="cpu", show_progress: bool = True) -> dict:
    """Decompose held-out images: re-generation, R and branch outputs (Figs. 9-11, 18-20), translations, and
    the scores (component recovery, SI-SDR and the fixed baselines, PSNR/SSIM against paired truth on scenes;
    structure fidelity and the Fréchet distance on real data).

    ``images``: a folder of the user's own images instead (any size or mode); each is decomposed as translated
    into every domain of the run, f(x, d): R, every branch's output and the result, into ``RUN/apply_images``.
    """
    run = RunDir.of(run, must_exist=True)
    generator, cfg, raw = load_generator(run, weights, device)
    if images is not None:
        return _apply_to_folder(run, out, generator, cfg, raw, images, num_images, device)
    target = _analysis_dir(run, out, "apply")
    target.write_config({"command": "decompose apply", "run": str(run.path), "weights": weights,
                         "num_images": num_images, "eval_images": eval_images, "features": features,
                         "classifier_steps": classifier_steps})
    images, scenes, split = _evaluation_images(cfg, raw, eval_images)
    names = raw["domain_names"]
    metrics: dict = {"weights": weights, "evaluation_images": split}
    regenerated = [decompose_in_batches(generator, x, d, device) for d, x in enumerate(images)]
    stats = branch_statistics(torch.cat([r.branch_outputs for r in regenerated], dim=1))
    metrics.update({"num_active_branches": stats["num_active"], "active_branches": stats["active"],
                    "response_norms": stats["response_norms"], "inter_branch_correlation": stats["correlation"],
                    "mean_abs_inter_branch_correlation": stats["mean_abs_correlation_active"]})
    translated = {(a, b): decompose_in_batches(generator, images[a], b, device).total
                  for a in range(len(names)) for b in range(len(names)) if a != b}
    if scenes is not None:
        metrics.update(_scene_scores(target, regenerated, translated, images, scenes, names))
        metrics["baselines"] = baseline_scores(cfg, images, scenes)
        metrics["against_baselines"] = beats_baselines(metrics, metrics["baselines"], cfg.branches)
    metrics["structure_fidelity"] = {f"{names[a]}->{names[b]}": structure_fidelity(images[a], t)
                                     for (a, b), t in translated.items()}
    from branchspec.analysis.baselines import band_comparison

    few = slice(0, 128)  # the frequency bands: of up to 128 images per domain, all domains pooled
    metrics["band_energy"] = band_comparison(
        torch.cat([r.branch_outputs[:, few] for r in regenerated], 1), torch.cat([x[few] for x in images]))
    if features is not None or scenes is None:
        metrics.update(_frechet(run, cfg, raw, images, translated, features, classifier_steps, device, show_progress))
    target.write_metrics(metrics, merge=False)
    findings.write(target, "decompose")
    _decomposition_figures(target, images, regenerated, translated, names, num_images)
    build_report(run, title="Class-transfer GAN")
    return metrics


def user_images(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str], int]:
    """A folder of the user's images at the run's size, in [-1, 1] (:func:`branchspec.data.images.read_folder`)."""
    from branchspec.data.domains import to_float
    from branchspec.data.images import read_folder

    images, names, skipped = read_folder(folder, size)
    if skipped:
        log.info("%d file(s) in %s could not be read and were skipped", skipped, folder)
    return to_float(images), names, skipped


def _apply_to_folder(run: RunDir, out, generator, cfg, raw, folder, num_images: int, device) -> dict:
    x, files, skipped = user_images(folder, cfg.image_size)
    target = _analysis_dir(run, out, "apply_images")
    names = raw["domain_names"]
    target.write_config({"command": "decompose apply", "run": str(run.path), "images": str(folder),
                         "num_images": num_images})
    outputs = [decompose_in_batches(generator, x, d, device) for d in range(len(names))]
    stats = [branch_statistics(o.branch_outputs) for o in outputs]
    metrics = {"images": len(x), "files": files, "skipped_files": skipped,
               "response_norms": {names[d]: s["response_norms"] for d, s in enumerate(stats)},
               "num_active_branches": {names[d]: s["num_active"] for d, s in enumerate(stats)}}
    target.write_metrics(metrics, merge=False)
    _decomposition_figures(target, [x] * len(names), outputs, {}, names, num_images, own_images=True)
    build_report(run, title="Class-transfer GAN")
    return metrics


def _scene_scores(run: RunDir, regenerated: list[BranchedOutput], translated: dict, images, scenes: list[Scenes],
                  names: list[str]) -> dict:
    """Scores against the layered scenes' ground truth: component recovery (and what R holds), re-generation
    PSNR, translation PSNR/SSIM against the same scene rendered in the target domain."""
    recovery = [component_recovery(r.branch_outputs, {n: s.layers[n] for n in LAYERS})
                for r, s in zip(regenerated, scenes)]
    separation = _averaged([separation_scores(r.branch_outputs, {n: s.layers[n] for n in LAYERS})
                            for r, s in zip(regenerated, scenes)])
    metrics = {
        "component_recovery": float(np.mean([r["mean_matched_abs_correlation"] for r in recovery])),
        "component_recovery_per_layer": {n: float(np.mean([r["per_layer"][n] for r in recovery])) for n in LAYERS},
        **separation,
        "branch_of_layer": {names[d]: r["branch_of_layer"] for d, r in enumerate(recovery)},
        "regeneration_psnr": float(np.mean([psnr(r.total, x) for r, x in zip(regenerated, images)])),
        "translation_psnr": {f"{names[a]}->{names[b]}": psnr(t, scenes[b].images) for (a, b), t in translated.items()},
        "translation_ssim": {f"{names[a]}->{names[b]}": ssim(t, scenes[b].images) for (a, b), t in translated.items()},
    }
    metrics["mean_translation_psnr"] = float(np.mean(list(metrics["translation_psnr"].values())))
    metrics["mean_translation_ssim"] = float(np.mean(list(metrics["translation_ssim"].values())))
    if regenerated[0].residual is not None:  # what R holds: the smooth layers are its job, not the branches'
        layer_names = ("base", *LAYERS)
        metrics["residual_abs_correlation"] = dict(zip(layer_names, np.mean([abs_correlation(
            r.residual[None], torch.stack([s.layers[n] for n in layer_names]))[0]
            for r, s in zip(regenerated, scenes)], axis=0)))
    _recovery_figure(run, recovery[0], names[0])
    for d, name in enumerate(names):
        _layers_figure(run, regenerated[d], scenes[d], recovery[d], name)
    return metrics


def _layers_figure(run: RunDir, out: BranchedOutput, scenes: Scenes, recovery: dict, domain: str, n: int = 2) -> None:
    """The true layers of a few scenes beside the branch matched to each (and R beside the base)."""
    columns = [("base", out.residual, "R")] if out.residual is not None else []
    for layer in LAYERS:
        k = recovery["branch_of_layer"][layer]
        columns.append((layer, None if k is None else out.branch_outputs[k], "no branch" if k is None else f"branch {k}"))
    cells, labels = [], []
    for i in range(min(n, len(scenes.images))):
        cells.append(np.concatenate([contrast_stretch(scenes.layers[layer][i:i + 1]) for layer, _, _ in columns]))
        cells.append(np.concatenate([contrast_stretch(v[i:i + 1]) if v is not None else
                                     np.full((1, *contrast_stretch(scenes.images[:1]).shape[1:]), 0.5)
                                     for _, v, _ in columns]))
        labels += [f"scene {i}: true layer", f"scene {i}: matched"]
    titles = [f"{layer}\n{who}" + (f" ({recovery['per_layer'][layer]:.2f})" if layer in recovery["per_layer"] else "")
              for layer, _, who in columns]
    fig = image_grid(np.concatenate(cells), nrows=len(cells), ncols=len(columns), titles=titles, row_labels=labels)
    run.save_figure(fig, f"layers_and_branches_{domain}", f"The true layers of {domain} scenes (odd rows) beside the "
                    "branch matched to each by component recovery (even rows; |correlation| in the titles), and R "
                    "beside the base; each image contrast-stretched. A learnt decomposition shows the same "
                    "pattern in both rows.")


def _averaged(scores: list[dict]) -> dict:
    """Per-domain separation scores as one: numbers and per-layer numbers averaged over the domains, the
    per-image SI-SDRs pooled (and their interval over all the images)."""
    from branchspec.seeds import interval

    out = {}
    for key, value in scores[0].items():
        if isinstance(value, dict):
            out[key] = {n: float(np.mean([s[key][n] for s in scores])) for n in value}
        elif isinstance(value, float):
            out[key] = float(np.mean([s[key] for s in scores]))
    per_image = [v for s in scores for v in s["si_sdr_per_image"]]
    out["si_sdr_per_image"] = per_image
    out["si_sdr_interval_over_images"] = interval(per_image)["ci95"]
    return out


def baseline_scores(cfg: "DecomposeConfig", images: list[torch.Tensor], scenes: list[Scenes]) -> dict:
    """The fixed decompositions of :mod:`branchspec.analysis.baselines` of the same held-out images, through the
    same metrics as the branches (per domain, averaged; the per-image SI-SDRs pooled)."""
    from branchspec.analysis import baselines

    train = training_data(cfg, show_progress=False)
    pool = train.as_float(slice(0, 2000))
    per_domain = [baselines.fixed_baselines(x, pool, cfg.branches, dt=cfg.dt, heat=cfg.heat, seed=cfg.seed)
                  for x in images]
    out = {}
    for name in per_domain[0]:
        parts = [baselines.score(d[name], {n: sc.layers[n] for n in LAYERS}) for d, sc in zip(per_domain, scenes)]
        rec = float(np.mean([p["component_recovery"] for p in parts]))
        out[name] = {"candidates": parts[0]["candidates"], "component_recovery": rec,
                     "component_recovery_per_layer": {n: float(np.mean([p["component_recovery_per_layer"][n]
                                                                        for p in parts])) for n in LAYERS},
                     **_averaged(parts)}
    return out


def beats_baselines(metrics: dict, baselines: dict, num_branches: int) -> dict:
    """The branches against the best fixed baseline that has at most M candidates (the issue's bar: by ≥ 0.10
    mean matched |corr| and ≥ 3 dB SI-SDR); the baselines with more candidates are reported, not the bar."""
    fair = {k: v for k, v in baselines.items() if v["candidates"] <= num_branches}
    best = max(fair, key=lambda k: fair[k]["component_recovery"]) if fair else None
    if best is None:
        return {"best_baseline": None}
    best_sdr = max(fair, key=lambda k: fair[k]["si_sdr"])
    return {"best_baseline": best, "best_baseline_si_sdr": best_sdr,
            "recovery_margin": metrics["component_recovery"] - fair[best]["component_recovery"],
            "si_sdr_margin": metrics["si_sdr"] - fair[best_sdr]["si_sdr"],
            "beats_the_bar": bool(metrics["component_recovery"] - fair[best]["component_recovery"] >= 0.10
                                  and metrics["si_sdr"] - fair[best_sdr]["si_sdr"] >= 3.0)}


def _frechet(run, cfg, raw, images, translated, features, classifier_steps, device, show_progress) -> dict:
    """The Fréchet distance between translations into b and real images of b, per pair and on average."""
    from branchspec.analysis.features import domain_classifier_extractor, torchscript_extractor

    if features:
        extract, description = torchscript_extractor(features, device=device)
    else:
        extract, description = domain_classifier_extractor(
            training_data(cfg, show_progress), steps=classifier_steps, seed=cfg.seed, device=device,
            cache=run.checkpoints / "frechet_classifier.safetensors", show_progress=show_progress)
    real = [batched_features(extract, x, device=device) for x in images]
    names = raw["domain_names"]
    fd = {f"{names[a]}->{names[b]}": frechet_distance(batched_features(extract, t, device=device), real[b])
          for (a, b), t in translated.items()}
    # the baseline: no translation at all, the real images of a scored as images of b
    untranslated = {f"{names[a]}->{names[b]}": frechet_distance(real[a], real[b]) for (a, b) in translated}
    # a covariance of F features from fewer than F + 1 images is singular: the distance then says little
    fewest, width = min(len(r) for r in real), real[0].shape[1]
    reliable = fewest > width
    if not reliable:
        log.warning("the Fréchet distances rest on %d images per domain for %d feature dimensions (fewer images than "
                    "dimensions): they are unreliable, compare them only with each other", fewest, width)
    return {"frechet_distance": fd, "mean_frechet_distance": float(np.mean(list(fd.values()))),
            "frechet_distance_untranslated": untranslated,
            "mean_frechet_distance_untranslated": float(np.mean(list(untranslated.values()))),
            "frechet_features": description, "frechet_reliable": reliable,
            "frechet_images_per_domain": fewest, "frechet_feature_dimensions": width}


def _decomposition_figures(run: RunDir, images, regenerated, translated, names, num_images: int,
                           own_images: bool = False) -> None:
    """Figs. 9-11 per domain. ``own_images``: the same (user) images in every domain, decomposed as translated
    to that domain (no source domain, so no re-generation and no other translations)."""
    for d, (x, r) in enumerate(zip(images, regenerated)):
        n = min(num_images, len(x))
        if n == 0:
            continue
        rows = [to_display(x[:n]), to_display(r.total[:n])]
        labels = ["input", f"f(x, {names[d]})" if own_images else "re-generated"]
        if r.residual is not None:
            rows.append(to_display(r.residual[:n]))
            labels.append("R")
        rows += [to_display(translated[(d, b)][:n]) for b in range(len(names)) if (d, b) in translated]
        labels += [f"to {names[b]}" for b in range(len(names)) if (d, b) in translated]
        fig = image_grid(np.concatenate(rows), nrows=len(rows), ncols=n, row_labels=labels)
        what = (f"the images translated to {names[d]}, f(x, {names[d]}), and R" if own_images else
                f"{names[d]} images, their re-generation f(x, own domain), R, and their translation to the other "
                "domains")
        run.save_figure(fig, f"fig9_regeneration_{names[d]}", f"Fig. 9: {what}.")
        v = r.branch_outputs[:, :n]  # [M, n, 3, H, W]
        m = v.shape[0]
        stretched = np.concatenate([contrast_stretch(v[:, i]) for i in range(n)])
        fig = image_grid(stretched, nrows=n, ncols=m, titles=[f"branch {k}" for k in range(m)])
        run.save_figure(fig, f"fig10_branches_{names[d]}", f"Figs. 10 top, 11, 18-20: the output v_k of each of "
                        f"the {m} branches for {n} re-generated {names[d]} images (one row each), contrast-stretched "
                        "per image (1st-99th percentile).")
        added = added_to_image(r.total[:n], v)
        fig = image_grid(np.concatenate([to_display(added[:, i]) for i in range(n)]), nrows=n, ncols=m,
                         titles=[f"f + v_{k}" for k in range(m)])
        run.save_figure(fig, f"fig10_added_{names[d]}", "Fig. 10 bottom: each branch output added once more to the "
                        "re-generated image, without amplification, to show its role.")


def _recovery_figure(run: RunDir, recovery: dict, domain: str) -> None:
    C = recovery["abs_correlation"]
    fig, axes = subplots(1, 1, panel=(4.6, 4.0))
    heatmap(axes[0, 0], C, symmetric=False, xlabels=recovery["layers"], ylabels=[f"branch {k}" for k in range(len(C))],
            title=f"|corr| of branch outputs and true layers ({domain})")
    for j, name in enumerate(recovery["layers"]):
        k = recovery["branch_of_layer"][name]
        if k is not None:
            axes[0, 0].add_patch(Rectangle((j - 0.5, k - 0.5), 1, 1, fill=False, ec="red", lw=2))
    run.save_figure(fig, "component_recovery", "Component recovery on held-out layered scenes: |Pearson "
                    "correlation| between each branch's outputs and each true layer; red: the Hungarian matching.")


# ---------------------------------------------------------------------------------------------- manipulate
def run_manipulate(run: str | RunDir, out=None, *, branches: list[int] | None = None,
                   alphas: list[float] = (-1.0, 0.0, 1.0, 2.0, 3.0), subsets: list[list[int]] | None = None,
                   num_images: int = 4, images: str | Path | None = None, weights: str = "ema",
                   device="cpu") -> dict:
    """Sweep the magnitude α of single components (Figs. 13-14) and sum subsets of them (Fig. 15).

    Defaults: the two strongest branches; two subsets that split the active branches, alternating by strength.
    ``images``: a folder of the user's own images, decomposed as translated to the run's first domain.
    """
    run = RunDir.of(run, must_exist=True)
    generator, cfg, raw = load_generator(run, weights, device)
    target = _analysis_dir(run, out, "manipulate")
    images = ([user_images(images, cfg.image_size)[0][:num_images]] if images is not None
              else _evaluation_images(cfg, raw, num_images)[0])
    x = torch.cat(images)
    out_ = decompose_in_batches(generator, x, torch.cat([torch.full((len(im),), d) for d, im in enumerate(images)]),
                                device)
    stats = branch_statistics(out_.branch_outputs)
    by_strength = [int(k) for k in np.argsort(-stats["response_norms"])]
    active = [k for k in by_strength if stats["active"][k]]
    branches = list(branches) if branches else by_strength[:2]
    subsets = [list(s) for s in subsets] if subsets else [active[0::2], active[1::2] or active[:1]]
    target.write_config({"command": "decompose manipulate", "run": str(run.path), "weights": weights,
                         "branches": branches, "alphas": list(alphas), "subsets": subsets, "num_images": num_images})
    n = len(x)
    for k in branches:
        sweep = alpha_sweep(out_, k, alphas)  # [A, n, ...]
        cells = [np.concatenate([to_display(x[i:i + 1]), contrast_stretch(out_.branch_outputs[k, i:i + 1]),
                                 to_display(sweep[:, i])]) for i in range(n)]
        fig = image_grid(np.concatenate(cells), nrows=n, ncols=len(alphas) + 2,
                         titles=["input", f"v_{k} (stretched)"] + [f"α = {a:g}" for a in alphas])
        run_name = f"fig13_alpha_sweep_branch{k}"
        target.save_figure(fig, run_name, f"Figs. 13-14: the re-generated image with branch {k}'s output scaled by "
                           "α (α = 1: the re-generation; α = 0: the branch removed).")
    sums = subset_sums(out_, subsets)
    cells = [np.concatenate([to_display(x[i:i + 1]), to_display(out_.total[i:i + 1]), to_display(sums[:, i])])
             for i in range(n)]
    fig = image_grid(np.concatenate(cells), nrows=n, ncols=len(subsets) + 2,
                     titles=["input", "re-generated"] + [f"R + Σ {s}" for s in subsets])
    target.save_figure(fig, "fig15_subset_sums", "Fig. 15: R plus the sum of chosen subsets of the branch outputs.")
    metrics = {"branches": branches, "alphas": list(alphas), "subsets": subsets,
               "response_norms": stats["response_norms"], "active_branches": stats["active"]}
    target.write_metrics(metrics, merge=False)
    build_report(run, title="Class-transfer GAN")
    return metrics


# ------------------------------------------------------------------------------------------------- segment
EYE_MASK_LEVEL = -0.25  # a pixel belongs to a true eye where the eyes layer is below this (its floor is -0.55)


def run_segment(run: str | RunDir, out=None, *, domain: str | None = None, init_branches: list[int] | None = None,
                image_branches: list[int] | None = None, num_images: int = 8, init_threshold: float = 2.0,
                mu: float = 0.1, images: str | Path | None = None, weights: str = "ema", device="cpu") -> dict:
    """Segment eyes with Chan–Vese on the branch outputs (App. F; Figs. 12, 21); on layered scenes, score the
    masks against the true eyes (IoU). ``images``: a folder of the user's own images, decomposed as translated
    to ``domain``."""
    run = RunDir.of(run, must_exist=True)
    generator, cfg, raw = load_generator(run, weights, device)
    names = raw["domain_names"]
    if domain is not None and domain not in names:
        raise BranchspecError(f"domain {domain!r} is not one of the run's domains {names}.")
    d = names.index(domain) if domain is not None else 0
    target = _analysis_dir(run, out, "segment")
    if images is not None:
        scenes, images = None, {d: user_images(images, cfg.image_size)[0]}
    else:
        images, scenes, _ = _evaluation_images(cfg, raw, max(num_images, 32))
    out_ = decompose_in_batches(generator, images[d], d, device)
    stats = branch_statistics(out_.branch_outputs)
    init_branches = list(init_branches) if init_branches else choose_eye_branches(out_.branch_outputs, stats["active"])
    target.write_config({"command": "decompose segment", "run": str(run.path), "weights": weights,
                         "domain": names[d], "init_branches": init_branches, "image_branches": image_branches,
                         "num_images": num_images, "init_threshold": init_threshold, "mu": mu})
    n = min(num_images, len(images[d]))
    results = [segment_eyes(out_.branch_outputs[:, i], out_.total[i], init_branches, image_branches,
                            init_threshold=init_threshold, mu=mu) for i in range(n)]
    metrics = {"domain": names[d], "init_branches": init_branches, "image_branches": image_branches,
               "masks_with_one_pair": int(sum(measure.label(r["mask"]).max() == 2 for r in results)), "images": n}
    if scenes is not None:
        truth = scenes[d].layers["eyes"][:n].mean(1).numpy() < EYE_MASK_LEVEL
        metrics["eye_iou"] = [iou(r["mask"], t) for r, t in zip(results, truth)]
        metrics["mean_eye_iou"] = float(np.mean(metrics["eye_iou"]))
    generated = to_display(out_.total[:n])
    cells = []
    for i, r in enumerate(results):
        overlay = generated[i].copy()
        overlay[r["mask"]] = [1.0, 0.1, 0.1]
        gray = [(r["initial_surface"] > 0), r["image"], r["chan_vese"]]
        cells += [generated[i], *[np.repeat(g.astype(float)[..., None], 3, -1) for g in gray], overlay]
    fig = image_grid(np.array(cells), nrows=n, ncols=5,
                     titles=["generated", f"init: branches {init_branches}", "segmented image (HSV value)",
                             "Chan–Vese", "eyes (pairs on a row)"])
    target.save_figure(fig, "fig12_segmentation", "Figs. 12, 21: eyes segmented by Chan–Vese on the HSV value "
                       "channel, initialized from the eye-locating branch outputs; only connected components that "
                       "come in pairs on one row are kept.")
    target.write_metrics(metrics, merge=False)
    build_report(run, title="Class-transfer GAN")
    return metrics


# ---------------------------------------------------------------------------------------------------- demo
def demo_config() -> DecomposeConfig:
    """A layered-scenes run small enough for a CPU in a few minutes (the demo)."""
    return DecomposeConfig(size=32, num_scenes=1000, eval_scenes=32, generator=GeneratorConfig(width=1 / 32),
                           d_width=1 / 16, iterations=300, checkpoint_every=100, eval_every=50, accelerator="cpu",
                           devices=1, recipe=GANRecipe(lr=1e-3, ema_decay=0.99))


SHIPPED = Path(__file__).resolve().parent.parent / "data" / "pretrained" / "scenes_w1-32_heat1"
"""A generator trained on the layered scenes, shipped with the package (its config.yaml, EMA weights and the
`decompose train` command with its scores in README.md there): a short demo run cannot learn a decomposition."""


def demo(out: RunDir, show_progress: bool = True, made: dict | None = None) -> dict:
    """The decomposition part of the demo: a short training run on layered scenes (its loss falls; 300 iterations
    are far too few to decompose) scored by apply, then the shipped trained generator (:data:`SHIPPED`) applied,
    manipulated and segmented in ``out/shipped``."""
    run_train(demo_config(), out, show_progress=show_progress)
    run_apply(out, show_progress=show_progress)
    shipped = RunDir(out.path / "shipped")
    shipped.checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHIPPED / "config.yaml", shipped.path / "config.yaml")
    shutil.copyfile(SHIPPED / "generator_ema.safetensors", shipped.checkpoints / "generator_ema.safetensors")
    run_apply(shipped, show_progress=show_progress)
    run_manipulate(shipped)
    run_segment(shipped)
    return {}
