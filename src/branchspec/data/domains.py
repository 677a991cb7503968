"""Images grouped by domain, for class transfer (Sec. 7), and the batches a GAN step draws from them.

Sources, all giving a :class:`DomainImages` (uint8 images at one square size, one domain label each):

- an image tree of domain folders ``ROOT/train/<domain>/*`` (AFHQ: cat, dog, wild; CelebA-HQ: female, male), a
  tar of one, or CIFAR-10 (an image tree or the pickle folder) with a class subset as the domains (cat, dog);
  the images are read by :mod:`branchspec.data.images` (any size, centre-cropped and resized; grayscale,
  palette, RGBA and 16-bit converted to RGB; unreadable files counted and skipped);
- the embedded layered scenes (:mod:`branchspec.data.scenes`).

The images are kept in memory as uint8 at the training size (N·3·S² bytes: 2.9 GB for AFHQ at 256 px), so
that a training step only indexes a tensor. :class:`StepBatches` makes the batch of step t from
``(seed, rank, t)`` alone, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from branchspec.data.images import ImageSet, load_images
from branchspec.errors import BranchspecError

MIN_SIZE, MAX_SIZE = 16, 256


@dataclass
class DomainImages(ImageSet):
    """An :class:`~branchspec.data.images.ImageSet` whose classes are the domains: uint8 images ``[N, 3, S, S]``,
    the domain of each ``labels`` ``[N]``, the domain names ``classes``; at least 2 domains, none empty."""

    def __post_init__(self):
        if len(self.classes) < 2:
            raise BranchspecError(f"class transfer needs at least 2 domains, got {len(self.classes)} "
                                  f"({self.classes}).")
        super().__post_init__()

    @classmethod
    def from_float(cls, images: Tensor, domains: Tensor, names: list[str]) -> "DomainImages":
        """From float images in [-1, 1]."""
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return cls(u8, domains.long(), list(names))

    def as_float(self, index=slice(None)) -> Tensor:
        """Images ``index`` as float in [-1, 1] (StarGAN-v2's normalization)."""
        return to_float(self.images[index])


def to_float(images: Tensor) -> Tensor:
    """uint8 images -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------- reading
def load_domains(source: str | Path, size: int, domains: list[str] | None = None, *, split: str = "train",
                 limit: int | None = None, show_progress: bool = True) -> DomainImages:
    """The domains of an image source, at ``size`` × ``size``: an image tree ``ROOT/<split>/<domain>/*`` (AFHQ,
    CelebA-HQ, a CIFAR-10 tree), a tar of one, or a ``cifar-10-batches-py`` folder, read by
    :func:`branchspec.data.images.load_images`.

    ``domains`` picks and orders the domains (default: every class, sorted); ``limit`` caps the images read per
    domain; ``split`` is ``train`` or ``test`` (``val`` stands in for a missing ``test``).
    """
    check_size(size)
    data = load_images(source, split, size=size, limit_per_class=limit, holdout=None, show_progress=show_progress)
    names = list(domains) if domains else data.classes
    missing = [n for n in names if n not in data.classes]
    if missing:
        raise BranchspecError(f"domain(s) {missing} not found in {source}; it holds {data.classes}.")
    index = torch.tensor([data.classes.index(n) for n in names])
    keep = torch.isin(data.labels, index)
    images = data.images[keep]
    if data.size != size:  # sources of a fixed size (the CIFAR pickle) are resized here
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    relabel = torch.full((len(data.classes),), -1, dtype=torch.long)
    relabel[index] = torch.arange(len(names))
    skipped = {n: data.skipped[n] for n in names if data.skipped.get(n)}
    return DomainImages(images, relabel[data.labels[keep]], names, skipped)


def check_size(size: int) -> int:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise BranchspecError(f"image size must lie in {MIN_SIZE}..{MAX_SIZE} px, got {size}.")
    return size


# ------------------------------------------------------------------------------------------------ batches
class StepBatches(Dataset):
    """Item t is the batch of training step t: ``(x, y_org, y_trg)``.

    Domains are drawn uniformly (class-balanced sampling, as StarGAN-v2), then an image of that domain; each
    image is flipped left-right with probability ½; the target domain y_trg is uniform over all domains
    (re-generation included). Everything comes from a generator seeded by ``(seed, rank, t)``.
    """

    def __init__(self, data: DomainImages, batch_size: int, seed: int = 0, rank: int = 0, length: int = 10**12):
        if batch_size < 1:
            raise BranchspecError(f"batch size must be positive, got {batch_size}.")
        self.data, self.batch_size, self.seed, self.rank, self.length = data, batch_size, seed, rank, length
        self.by_domain = [torch.nonzero(data.labels == j).flatten() for j in range(len(data.classes))]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        seed = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        nd, b = len(self.by_domain), self.batch_size
        y_org = torch.randint(nd, (b,), generator=g)
        index = torch.stack([self.by_domain[j][torch.randint(len(self.by_domain[j]), (), generator=g)]
                             for j in y_org.tolist()])
        x = self.data.as_float(index)
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y_trg = torch.randint(nd, (b,), generator=g)
        return x, y_org, y_trg
