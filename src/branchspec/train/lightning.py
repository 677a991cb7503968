"""The shared Lightning set-up: one Trainer for every study that trains (classification, class transfer).

    trainer = make_trainer(run, max_epochs=20)
    trainer.fit(module, ckpt_path=last_checkpoint(run))     # resumes exactly where the run stopped

What it gives every run:
- CSV and TensorBoard logs under ``run.logs`` (``csv/version_N/metrics.csv``, one version per start or resume);
- ``run.checkpoints/last.ckpt`` (weights, optimizer, scheduler and loop state), written atomically (a
  temporary file and a rename) at the end of every epoch and, if asked, every N optimizer steps;
- a progress bar with its length and ETA, also after a resume in the middle of an epoch;
- bf16 mixed precision on CUDA, full 32-bit on the CPU, unless ``precision`` is given;
- a non-finite loss stops the run with one clear sentence, before that loss is back-propagated, and the last
  good checkpoint is kept (nothing is saved after it);
- devices, nodes and DDP through Lightning's own flags (``devices``, ``num_nodes``, ``strategy``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from branchspec.errors import BranchspecError
from branchspec.rundir import RunDir, atomic_torch_save

LAST = "last.ckpt"

# Manual optimization (the GAN) checkpoints the state after an optimizer step, which is what exact resume
# needs (tested); Lightning warns about it at every start.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the same folder, then a rename: a killed run never leaves half a
    checkpoint behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


class StopOnNonFiniteLoss(L.Callback):
    """Stop the run when the training loss is NaN or infinite, before it is back-propagated.

    The check runs in ``on_before_backward`` (automatic and manual optimization alike), so the weights that the
    bad loss would have produced are never written; the checkpoint on disk is the last good one. With several
    processes, every rank stops together.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise BranchspecError(
                f"the training loss became non-finite at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                "the run stopped before using it and its last good checkpoint is kept: resume it with a lower "
                "learning rate or with --precision 32-true."
            )


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, which also knows its length after a resume in the middle of an epoch.

    Lightning skips ``on_train_epoch_start`` when it resumes mid-epoch, and its bar then counts on with no total
    and no ETA ("646/?"); here the bar takes the epoch's length and starts at the batches already done.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done and not self.train_progress_bar.disable:
            bar, total = self.train_progress_bar, self.total_train_batches
            bar.reset(total=None if total == float("inf") else int(total))
            bar.initial = bar.n = done  # the rate and the ETA count from here
            bar.set_description(f"Epoch {trainer.current_epoch}")


PRECISIONS = {"cpu": ("32-true", "64-true", "bf16-mixed", "bf16-true"),
              "cuda": ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")}


def check_precision(precision: str | None, accelerator: str = "auto") -> None:
    """A one-sentence error for a precision the device cannot run: Lightning's names, bf16 only where the CPU
    has bfloat16 instructions (AVX-512 BF16 or AMX)."""
    if precision is None:
        return
    device = "cuda" if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()) \
        else "cpu"
    if precision not in PRECISIONS[device]:
        raise BranchspecError(f"precision {precision!r} cannot run on the {device.upper() if device == 'cpu' else 'GPU'}"
                              f"; choose one of {', '.join(PRECISIONS[device])}.")
    if device == "cpu" and precision.startswith("bf16") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise BranchspecError(f"precision {precision} needs a CPU with bfloat16 instructions (AVX-512 BF16 or AMX), "
                              "which this one lacks; use 32-true.")


def default_precision(accelerator: str = "auto") -> str:
    """bf16-mixed on CUDA, 32-true elsewhere."""
    on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_cuda else "32-true"


def make_trainer(run: RunDir, *, max_epochs: int | None = None, max_steps: int = -1, accelerator: str = "auto",
                 devices="auto", num_nodes: int = 1, strategy: str = "auto", precision: str | None = None,
                 checkpoint_every_n_steps: int | None = None, callbacks=(), enable_progress_bar: bool = True,
                 **trainer_kwargs) -> L.Trainer:
    """A Trainer that logs, checkpoints and stops on a non-finite loss as described in the module docstring.

    ``max_epochs`` or ``max_steps`` bound the run; the other arguments are Lightning's, passed through
    (``trainer_kwargs`` too), so DDP on several GPUs or nodes is ``devices=4, num_nodes=2, strategy="ddp"``.
    """
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise BranchspecError("the CUDA accelerator was asked for but no GPU is visible; use --device cpu.")
    if max_epochs is None and max_steps < 0:
        raise BranchspecError("give the run a length: max_epochs or max_steps.")
    check_precision(precision, accelerator)
    every_epoch = ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=0, save_last=True,
                                  save_on_train_epoch_end=True, enable_version_counter=False)
    checkpoints = [every_epoch]
    if checkpoint_every_n_steps:
        checkpoints.append(ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=0, save_last=True,
                                           every_n_train_steps=int(checkpoint_every_n_steps),
                                           enable_version_counter=False))
    run.logs.mkdir(parents=True, exist_ok=True)
    # one version folder per (re)start, so that a resumed run keeps the logs of the runs before it
    loggers = [CSVLogger(run.logs, name="csv"), TensorBoardLogger(run.logs, name="tensorboard")]
    return L.Trainer(
        max_epochs=max_epochs if max_epochs is not None else -1,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision or default_precision(accelerator),
        callbacks=[*checkpoints, StopOnNonFiniteLoss(), *([ProgressBar()] if enable_progress_bar else []),
                   *callbacks],
        logger=loggers,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run.path,
        **trainer_kwargs,
    )


def csv_logs(run: RunDir) -> list[Path]:
    """The CSV metric files of a run, oldest first (one per start or resume)."""
    files = (run.logs / "csv").glob("version_*/metrics.csv")
    return sorted(files, key=lambda p: int(p.parent.name.removeprefix("version_")))


def last_checkpoint(run: RunDir) -> Path | None:
    """``run.checkpoints/last.ckpt`` if the run has one (pass it to ``Trainer.fit(ckpt_path=...)``), else None."""
    path = run.checkpoints / LAST
    return path if path.is_file() else None
