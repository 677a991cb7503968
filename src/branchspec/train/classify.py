"""Training a branched classifier (Sec. 6) as a LightningModule, with the data resident on the device.

The module holds the model (the loop :class:`~branchspec.branched.Branched` or the fused ResNet), the
per-sample loss from :data:`branchspec.losses.LOSSES` (the paper's clamped soft-target CE by default), SGD
with Nesterov momentum and a one-cycle schedule. The Trainer (:func:`branchspec.train.lightning.make_trainer`)
holds the rest.

Data never passes through a DataLoader worker: the uint8 images sit on the training device, a batch is an
index tensor into them, and the augmentation (random crop with zero padding, horizontal flip) and the
normalization run there. The batches of step t are made from ``(seed, epoch, t, rank)`` alone
(:class:`StepIndices`), so a run resumed from any checkpoint, mid-epoch included, sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from branchspec.data.images import ImageSet
from branchspec.errors import BranchspecError
from branchspec.losses import get_loss

_SEED_STRIDE = 1_000_003  # mixes (seed, epoch or step, rank) into one generator seed
# BatchNorm's running statistics are an exponential average with momentum 0.1: after n steps their initial
# values (mean 0, variance 1) still weigh 0.9^n; below this many steps (0.9^50 < 0.5%) a run's evaluation is
# unreliable, and :func:`recalibrate_batchnorm` recomputes them.
BATCHNORM_SETTLED_STEPS = 50


SCHEDULES = ("one-cycle", "cosine")


@dataclass
class Recipe:
    """The optimization recipe: SGD, Nesterov momentum, one-cycle learning rate, batch 512."""

    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.1  # the one-cycle peak
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.25  # one-cycle: share of the steps spent rising to the peak
    schedule: str = "one-cycle"  # "one-cycle" (peak lr after the warm-up) or "cosine" (from lr down to 0, per step)
    crop_padding: int | None = None  # random crop with this zero padding (0: none; None: 4, digits 1)
    flip: bool | None = None  # random horizontal flip (None: yes, digits no)
    total_decay: float | None = None  # Σ_t lr_t·wd to reach over the run: weight_decay is solved for it (None: as given)

    def check(self) -> "Recipe":
        if self.epochs < 1 or self.batch_size < 1:
            raise BranchspecError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}.")
        if self.schedule not in SCHEDULES:
            raise BranchspecError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0 and 0 < self.warmup < 1
                and (self.crop_padding or 0) >= 0 and (self.total_decay is None or self.total_decay > 0)):
            raise BranchspecError(f"invalid training recipe {self}: need lr > 0, 0 ≤ momentum < 1, weight decay ≥ 0, "
                                  "0 < warmup < 1, crop padding ≥ 0 and a total decay > 0.")
        return self


# Named recipes (``classify train --recipe NAME``): the options they set; options given explicitly win.
PRESETS = {
    # The recipe of the silent-branch grid whose branches go constant (docs/results.md, "Silent branches"): the
    # long cosine schedule of kuangliu/pytorch-cifar (SGD, cosine from the peak to 0, batch 128) and its total
    # weight decay: lr 0.1, 200 epochs of 391 steps, wd 5e-4 give Σ lr·wd ≈ 2 on CIFAR-10. The total, not the
    # per-step decay, is what carries over to a data set of another size, so wd is solved for it.
    "paper-long": {"epochs": 150, "batch_size": 128, "lr": 0.05, "schedule": "cosine", "total_decay": 2.0},
}


def with_total_decay(recipe: Recipe, total: int) -> Recipe:
    """``recipe`` with its weight decay solved so that Σ_t lr_t·wd over ``total`` steps is ``recipe.total_decay``
    (unchanged when that is None)."""
    if recipe.total_decay is None:
        return recipe
    per_unit = total_weight_decay(dataclasses.replace(recipe, weight_decay=1.0), total)
    return dataclasses.replace(recipe, weight_decay=float(f"{recipe.total_decay / per_unit:.6g}"))


def schedule(opt: torch.optim.Optimizer, recipe: Recipe, total: int):
    """The learning-rate schedule of ``recipe`` over ``total`` steps (stepped once per step)."""
    if recipe.schedule == "cosine":  # kuangliu/pytorch-cifar's: cosine from lr to 0 (here per step), no warm-up
        for group in opt.param_groups:
            group["max_lr"] = recipe.lr  # what a resume with a changed rate scales (set_learning_rate)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=recipe.warmup,
                                               anneal_strategy="linear", div_factor=25, final_div_factor=1e3)


def total_weight_decay(recipe: Recipe, total: int) -> float:
    """Σ_t lr_t · wd over the run's ``total`` steps: how far weight decay pulls every weight towards 0 in all
    (each step multiplies a weight by 1 − lr_t·wd; the run, roughly, by exp(−Σ lr_t·wd))."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    sched = schedule(opt, recipe, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return float(sum(lrs) * recipe.weight_decay)


def augment(images: Tensor, generator: torch.Generator, padding: int, flip: bool) -> Tensor:
    """Random crop (zero padding ``padding``) and random horizontal flip of float images ``[B, C, H, W]``, on
    their own device, one draw per image."""
    b, _, h, w = images.shape
    if padding:
        padded = nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b, 1), device=images.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b, 1), device=images.device, generator=generator)
        rows = (dy + torch.arange(h, device=images.device))[:, :, None]  # [B, H, 1]
        cols = (dx + torch.arange(w, device=images.device))[:, None, :]  # [B, 1, W]
        images = padded.permute(0, 2, 3, 1)[torch.arange(b, device=images.device)[:, None, None], rows, cols]
        images = images.permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(b, device=images.device, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Tensor, batch_size: int = 256) -> int:
    """Recompute every BatchNorm's running mean and variance as the average over ``images`` (one pass in
    training mode, no augmentation), as at the end of SWA (``torch.optim.swa_utils.update_bn``). The weights do
    not change. Returns the number of BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 images, or float images in [0, 1], normalized per channel: (x − mean) / std."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class StepIndices:
    """The index batches of one epoch: a permutation drawn from ``(seed, epoch)``, split across ranks, with the
    last incomplete batch dropped. Iteration starts at the module's current global step, so a resumed run
    continues the epoch where it stopped; ``state_dict`` marks it resumable for Lightning."""

    def __init__(self, module: "BranchedClassifier"):
        self.module = module

    def __len__(self) -> int:
        return self.module.steps_per_epoch

    def __iter__(self):
        module = self.module
        trainer = module.trainer
        n, b = len(self), module.recipe.batch_size
        step = trainer.global_step
        epoch, start = divmod(step, n)
        g = torch.Generator().manual_seed(module.seed * _SEED_STRIDE + epoch)
        order = torch.randperm(len(module.train_set), generator=g)
        world, rank = trainer.world_size, trainer.global_rank
        for i in range(start, n):
            lo = (i * world + rank) * b
            yield order[lo:lo + b]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load: the position is the restored global step."""


class BranchedClassifier(L.LightningModule):
    """f(x) = Σ_k v_k(x) trained on labelled images with a per-sample loss (Sec. 6).

    Args:
        model: a Branched classifier or a fused one (anything with ``forward`` and ``branch_outputs``).
        loss: a key of :data:`branchspec.losses.LOSSES`.
        train_set, test_set: uint8 images; moved to the training device when the fit starts.
        mean, std: per-channel normalization of images in [0, 1].
        compile: run the model's forward through ``torch.compile`` (GPU speed; same weights and names).
    """

    def __init__(self, model: nn.Module, loss: str, recipe: Recipe, train_set: ImageSet, test_set: ImageSet | None,
                 mean, std, *, seed: int = 0, compile: bool = False, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = get_loss(loss)
        self.recipe = recipe.check()
        self.train_set, self.test_set = train_set, test_set
        self.seed = seed
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last
        self._forward = torch.compile(model.forward) if compile else model.forward
        self.steps_per_epoch = 0  # set in setup(), once the number of devices is known

    # --------------------------------------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        self.steps_per_epoch = len(self.train_set) // (self.recipe.batch_size * world)
        if self.steps_per_epoch < 1:
            raise BranchspecError(f"{len(self.train_set)} training images make no full batch of "
                                  f"{self.recipe.batch_size} on each of {world} devices; lower `batch_size`.")

    def on_fit_start(self) -> None:
        self._images = self.train_set.images.to(self.device)
        self._labels = self.train_set.labels.to(self.device)
        if self.test_set is not None:
            self._test_images = self.test_set.images.to(self.device)
            self._test_labels = self.test_set.labels.to(self.device)

    def train_dataloader(self):
        return StepIndices(self)

    def val_dataloader(self):
        if self.test_set is None:
            return []
        return DataLoader(torch.arange(len(self.test_set)), batch_size=1000)  # indices; Lightning shards them

    def training_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The augmented, normalized images and labels of one index batch (augmentation drawn from the step)."""
        r = self.recipe
        index = index.to(self.device)
        seed = (self.seed * _SEED_STRIDE + self.global_step) * 1009 + self.global_rank
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = augment(self._images[index].float() / 255, g, r.crop_padding or 0, bool(r.flip))
        return normalize(x, self.mean, self.std), self._labels[index]

    # ------------------------------------------------------------------------------------- steps
    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def training_step(self, index: Tensor, batch_idx: int) -> Tensor:
        x, y = self.training_batch(index)
        f = self._forward(self._prepare(x)).float()
        loss = self.loss_fn(f, y).mean()
        acc = (f.argmax(1) == y).float().mean()
        self.log_dict({"train_loss": loss.detach(), "train_acc": acc.detach()}, prog_bar=True, on_step=True,
                      on_epoch=False)
        return loss

    def validation_step(self, index: Tensor, batch_idx: int) -> None:
        index = index.to(self.device)
        x, y = normalize(self._test_images[index], self.mean, self.std), self._test_labels[index]
        f = self._forward(self._prepare(x)).float()
        self.log_dict({"test_loss": self.loss_fn(f, y).mean(), "test_acc": (f.argmax(1) == y).float().mean()},
                      prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(index))

    def on_train_start(self) -> None:
        """After a resume with a changed peak learning rate (``run_train(change_lr=True)``), the new peak."""
        from branchspec.train.lightning import set_learning_rate

        for opt in self.trainer.optimizers:
            set_learning_rate(opt, self.recipe.lr, key="max_lr")

    def configure_optimizers(self):
        r = self.recipe
        opt = torch.optim.SGD(self.model.parameters(), lr=r.lr, momentum=r.momentum, nesterov=r.momentum > 0,
                              weight_decay=r.weight_decay)
        sched = schedule(opt, r, r.epochs * self.steps_per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
