"""Training the branched class-transfer generator as a GAN (Sec. 7, App. E), as a LightningModule.

The loss is the non-saturating adversarial loss and R1 on real images, nothing else (App. E drops StarGAN-v2's
style, diversity and cycle terms; fidelity to the input comes from R in Eq. 15):

    L_D = softplus(−D(x, y)) + softplus(D(G(x, ỹ), ỹ)) + γ/2 · ‖∇_x D(x, y)‖²     (γ = 1)
    L_G = softplus(−D(G(x, ỹ), ỹ))

with x a real image of domain y and ỹ a target domain. Adam at lr 1e-4 (the mapping networks at 1e-6, StarGAN-v2's
f_lr), β = (0, 0.99), weight decay 1e-4, and an exponential moving average of G at 0.999 (StarGAN-v2's recipe). Optimization is manual: one D step
and one G step per iteration, G's output computed once and shared by both.

The iteration counter is a buffer, so it is saved in every checkpoint; the batch of iteration t is made from
``(seed, rank, t)`` (:class:`branchspec.data.domains.StepBatches`), so a resumed run continues exactly.
A non-finite loss is caught before its backward pass by the Trainer of :mod:`branchspec.train.lightning`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from branchspec.data.domains import DomainImages, StepBatches
from branchspec.errors import BranchspecError


@dataclass
class GANRecipe:
    """The optimization recipe (StarGAN-v2's, without its extra losses)."""

    lr: float = 1e-4
    mapping_lr: float = 1e-6  # StarGAN-v2's f_lr: the mapping network (domain code → style) learns 100× slower
    beta1: float = 0.0
    beta2: float = 0.99
    weight_decay: float = 1e-4
    r1_gamma: float = 1.0
    ema_decay: float = 0.999

    def check(self) -> "GANRecipe":
        if not (self.lr > 0 and self.mapping_lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.weight_decay >= 0
                and self.r1_gamma >= 0 and 0 <= self.ema_decay < 1):
            raise BranchspecError(f"invalid GAN recipe {self}: need lr > 0, 0 ≤ β < 1, weight decay ≥ 0, γ ≥ 0 "
                                  "and 0 ≤ EMA decay < 1.")
        return self


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """½·E‖∇_x D(x)‖² over real images (Mescheder et al. 2018; ``real_images`` must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


class ClassTransferGAN(L.LightningModule):
    """G (a branched generator, called ``G(x, d)``), D (one logit per domain) and the EMA of G.

    With ``data`` the module makes its own data loader: ``iterations`` batches of ``batch_size`` drawn by
    :class:`StepBatches` from ``seed`` and the device's rank, starting at the saved iteration.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, recipe: GANRecipe,
                 data: DomainImages | None = None, *, batch_size: int = 8, seed: int = 0, iterations: int = 100_000):
        super().__init__()
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.generator_ema = copy.deepcopy(generator).requires_grad_(False)
        self.recipe = recipe.check()
        self.data, self.batch_size, self.seed, self.iterations = data, batch_size, seed, iterations
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------------------- setup
    def configure_optimizers(self):
        r = self.recipe

        def adam(groups):
            return torch.optim.Adam(groups, lr=r.lr, betas=(r.beta1, r.beta2), weight_decay=r.weight_decay)

        mapping = [p for n, p in self.generator.named_parameters() if _is_mapping(n)]
        rest = [p for n, p in self.generator.named_parameters() if not _is_mapping(n)]
        groups = [{"params": rest, "lr": r.lr, "name": "generator"}]
        if mapping:
            groups.append({"params": mapping, "lr": r.mapping_lr, "name": "mapping"})
        return [adam([{"params": list(self.discriminator.parameters()), "lr": r.lr, "name": "discriminator"}]),
                adam(groups)]

    def on_train_start(self) -> None:
        """After a resume with a changed learning rate (``run_train(change_lr=True)``), the new rates."""
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.recipe.mapping_lr if group.get("name") == "mapping" else self.recipe.lr

    def train_dataloader(self) -> DataLoader:
        if self.data is None:
            raise BranchspecError("this GAN module was built without training data.")
        batches = StepBatches(self.data, self.batch_size, self.seed, rank=self.global_rank)
        return DataLoader(batches, batch_size=None, sampler=_RemainingSteps(self))

    # ---------------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> dict:
        x, y_org, y_trg = batch
        opt_d, opt_g = self.optimizers()
        fake = self.generator(x, y_trg)

        # D: real images of their own domain against translations to the target domain, plus R1 on the reals
        x = x.detach().requires_grad_(True)
        real_logits = self.discriminator(x, y_org)
        r1 = r1_penalty(real_logits, x)
        d_adv = F.softplus(-real_logits).mean() + F.softplus(self.discriminator(fake.detach(), y_trg)).mean()
        d_loss = d_adv + self.recipe.r1_gamma * r1
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        # G: the non-saturating loss against the updated D
        self.toggle_optimizer(opt_g)
        g_loss = F.softplus(-self.discriminator(fake, y_trg)).mean()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.update_ema()
        self.iteration += 1
        self.log_dict({"d_loss": d_adv.detach(), "g_loss": g_loss.detach(), "r1": r1.detach()}, prog_bar=True)
        return {"loss": (d_loss + g_loss).detach()}

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← β·θ_ema + (1 − β)·θ, β = ``ema_decay`` (buffers are copied)."""
        beta = self.recipe.ema_decay
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)


def _is_mapping(name: str) -> bool:
    """A parameter of a branch's mapping network (its domain codes and MLP), in the loop or fused generator."""
    return ".mapping." in f".{name}"


class _RemainingSteps:
    """The step indices still to train, from the module's iteration counter each time it is iterated.

    Lightning restarts a data loader at its first item when it resumes in the middle of an epoch; starting
    from the counter (restored from the checkpoint) keeps the batch of iteration t the batch of step t.
    """

    def __init__(self, module: ClassTransferGAN):
        self.module = module

    def __iter__(self):
        return iter(range(int(self.module.iteration), self.module.iterations))

    def __len__(self) -> int:
        return max(0, self.module.iterations - int(self.module.iteration))
