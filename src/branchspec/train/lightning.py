"""The shared Lightning set-up: one Trainer for every study that trains (classification, class transfer).

    trainer = make_trainer(run, max_epochs=20)
    trainer.fit(module, ckpt_path=resume_checkpoint(run), weights_only=True)   # starts, or resumes exactly

What it gives every run:
- CSV and TensorBoard logs under ``run.logs`` (``csv/version_N/metrics.csv``, one version per start or resume);
- ``run.checkpoints/last.ckpt`` (weights, optimizer, scheduler and loop state) at the end of every epoch, every
  ``checkpoint_minutes`` of wall-clock (10 by default) and, if asked, every N optimizer steps, each written
  atomically (a temporary file and a rename); the one it replaces is kept as ``previous.ckpt``, and a resume
  whose ``last.ckpt`` cannot be read falls back to it (:class:`RunCheckpoints`, :func:`resume_checkpoint`);
- Ctrl-C (SIGINT) finishes the optimizer step under way, writes the checkpoint and ends the command with one
  line that says how to resume (:class:`~branchspec.errors.Interrupted`); a killed process loses at most the
  interval since the last checkpoint;
- checkpoints loaded with ``weights_only=True``: a checkpoint that would run code when unpickled is refused;
- a progress bar with its length and ETA, also after a resume in the middle of an epoch;
- bf16 mixed precision on CUDA, full 32-bit on the CPU, unless ``precision`` is given;
- a non-finite loss stops the run with one clear sentence, before that loss is back-propagated; the state
  before it is saved, so the run can go on with a lower learning rate (``change_lr`` of the studies, and
  :func:`set_learning_rate`);
- devices, nodes and DDP through Lightning's own flags (``devices``, ``num_nodes``, ``strategy``).
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from branchspec.errors import BranchspecError, Interrupted, StopRequest, log
from branchspec.rundir import RunDir, atomic_torch_save

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"
CHECKPOINT_MINUTES = 10.0  # the default wall-clock interval between checkpoints within an epoch


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A checkpoint read with ``weights_only=True``: tensors and plain data only, so unpickling runs no code.

    A file that is not a readable checkpoint, or one that holds other Python objects, is a one-line error.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise BranchspecError(f"refused to load {path}: it holds Python objects beyond tensors and plain data, which "
                              f"could run code when loaded ({str(err).splitlines()[0][:120]}); use checkpoints that "
                              "branchspec wrote.") from None
    except FileNotFoundError:
        raise BranchspecError(f"checkpoint {path} does not exist.") from None
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file: one answer
        raise BranchspecError(f"cannot read the checkpoint {path} ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0][:120] if str(err).strip() else 'no detail'}); it is "
                              "truncated or corrupt.") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the same folder, then a rename: a killed run never leaves half a
    checkpoint behind. Loading is always ``weights_only`` (:func:`load_checkpoint_file`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location)


class RunCheckpoints(L.Callback):
    """``last.ckpt`` at the end of every epoch, of the run, every ``every_n_steps`` optimizer steps, every
    ``minutes`` of wall-clock within an epoch, and after the step under way when Ctrl-C is pressed; the file it
    replaces is kept as ``previous.ckpt``.

    A checkpoint is written after a whole training step (``on_train_batch_end``), where the loop state and the
    weights agree, so a resume from any of them continues exactly. The first Ctrl-C only asks for a stop
    (a second one interrupts at once); with several processes the decision to save is taken together.
    """

    def __init__(self, run: RunDir, every_n_steps: int | None = None, minutes: float | None = CHECKPOINT_MINUTES):
        self.run, self.every_n_steps, self.minutes = run, every_n_steps, minutes
        self._saved_step: int | None = None
        self._last_time = time.monotonic()
        self._stop = StopRequest()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step, self._last_time = trainer.global_step, time.monotonic()
        self._stop.install()

    # ------------------------------------------------------------------------------------------- saving
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self._stop.requested or bool(self.every_n_steps and step % self.every_n_steps == 0) or (
            self.minutes is not None and time.monotonic() - self._last_time >= 60 * self.minutes)
        stop = self._stop.requested
        if trainer.world_size > 1:
            due = trainer.strategy.reduce_boolean_decision(due, all=False)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if due:
            self.save(trainer)
        if stop:
            self._stop.restore()
            raise Interrupted(f"interrupted after step {step}; the run is saved in "
                              f"{self.run.checkpoints / LAST}: run the same command again to resume it.")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)
        self._stop.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop.restore()

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (all ranks call it; rank 0 writes), the old one becoming ``previous.ckpt``."""
        if trainer.global_step == self._saved_step:
            return
        last = self.run.checkpoints / LAST
        if trainer.is_global_zero and last.is_file():
            os.replace(last, self.run.checkpoints / PREVIOUS)
        trainer.save_checkpoint(last)
        self._saved_step, self._last_time = trainer.global_step, time.monotonic()


class StopOnNonFiniteLoss(L.Callback):
    """Stop the run when the training loss is NaN or infinite, before it is back-propagated.

    The check runs in ``on_before_backward`` (automatic and manual optimization alike), so the weights that the
    bad loss would have produced are never made; the state before the bad step is saved as ``last.ckpt`` (the
    one before it kept as ``previous.ckpt``). With several processes, every rank stops together.
    """

    def __init__(self, checkpoints: RunCheckpoints, advice: str):
        self.checkpoints, self.advice = checkpoints, advice

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.checkpoints.save(trainer)
            raise BranchspecError(
                f"the training loss became non-finite at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                f"the run stopped before using it and saved the state before that step: {self.advice}"
            )


def resume_checkpoint(run: RunDir) -> Path | None:
    """The checkpoint to resume from: ``last.ckpt``, or ``previous.ckpt`` when the last cannot be read (a line
    is logged); None for a new run. Both unreadable is a one-line error."""
    candidates = [p for p in (run.checkpoints / LAST, run.checkpoints / PREVIOUS) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            load_checkpoint_file(path)
        except BranchspecError as err:
            problems.append(str(err))
            continue
        if problems:
            log.warning("%s Resuming from %s instead.", problems[0].rstrip("."), path.name)
        return path
    if problems:
        raise BranchspecError(f"no checkpoint of {run.path} can be read ({problems[0]}); start a new run with "
                              "another `out`.")
    return None


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, key: str = "lr") -> bool:
    """Make ``lr`` the optimizer's learning rate after a resume with a changed one: the param groups' ``key``
    (``"lr"``, or ``"max_lr"`` for a one-cycle schedule, whose ``initial_lr``, ``min_lr`` and current ``lr`` are
    scaled with it). Returns whether anything changed (nothing does when they already agree)."""
    changed = False
    for group in optimizer.param_groups:
        factor = lr / group[key]
        if abs(factor - 1) > 1e-12:
            for name in ("lr", "max_lr", "initial_lr", "min_lr"):
                if name in group:
                    group[name] *= factor
            changed = True
    return changed


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, which also knows its length after a resume in the middle of an epoch.

    Lightning skips ``on_train_epoch_start`` when it resumes mid-epoch, and its bar then counts on with no total
    and no ETA ("646/?"); here the bar takes the epoch's length and starts at the batches already done.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning's loop state, the one place that knows the batches done in a resumed epoch; not in its
        # documented API: tests/test_train_lightning.py::test_progress_bar_knows_its_length_after_a_mid_epoch_resume
        # fails if it changes.
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
                 checkpoint_every_n_steps: int | None = None, checkpoint_minutes: float | None = CHECKPOINT_MINUTES,
                 nonfinite_advice: str = "resume it with a lower learning rate.", callbacks=(),
                 enable_progress_bar: bool = True, **trainer_kwargs) -> L.Trainer:
    """A Trainer that logs, checkpoints and stops on a non-finite loss as described in the module docstring.

    ``max_epochs`` or ``max_steps`` bound the run; the other arguments are Lightning's, passed through
    (``trainer_kwargs`` too), so DDP on several GPUs or nodes is ``devices=4, num_nodes=2, strategy="ddp"``.
    """
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise BranchspecError("the CUDA accelerator was asked for but no GPU is visible; use `device` cpu.")
    if max_epochs is None and max_steps < 0:
        raise BranchspecError("give the run a length: max_epochs or max_steps.")
    check_precision(precision, accelerator)
    checkpoints = RunCheckpoints(run, checkpoint_every_n_steps, checkpoint_minutes)
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
        callbacks=[checkpoints, StopOnNonFiniteLoss(checkpoints, nonfinite_advice),
                   *([ProgressBar()] if enable_progress_bar else []), *callbacks],
        logger=loggers,
        enable_checkpointing=False,  # RunCheckpoints writes them
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
