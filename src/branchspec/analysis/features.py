"""Feature extractors for the Fréchet distance on real data (Sec. 7 evaluation).

StarGAN-v2 reports FID with torchvision's ImageNet Inception-v3; torchvision is not a dependency here and
nothing is downloaded, so the extractor is one of:

- a TorchScript file the user has (for example an Inception-v3 pool3 extractor saved with ``torch.jit.save``):
  it receives images ``[B, 3, S, S]`` with values in [0, 1], resized to ``input_size`` (299 for Inception),
  and returns features ``[B, F]`` (it does its own normalization);
- otherwise a domain classifier trained here on the same real training images: the discriminator's
  architecture with a cross-entropy loss over the domains, its trunk output as the features.

Each returns ``(extract, description)``; the description goes into metrics.json, so a number always says
which features it was measured with. Numbers from different extractors are not comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from branchspec.data.domains import DomainImages, StepBatches
from branchspec.errors import BranchspecError

Extractor = Callable[[Tensor], Tensor]


def torchscript_extractor(path: str | Path, input_size: int = 299, device="cpu") -> tuple[Extractor, str]:
    """A TorchScript feature extractor file (see the module docstring for its contract)."""
    path = Path(path)
    if not path.is_file():
        raise BranchspecError(f"feature extractor {path} does not exist; give a TorchScript file (torch.jit.save).")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise BranchspecError(f"{path} is not a TorchScript file ({str(err).splitlines()[0]}).") from None

    def extract(images: Tensor) -> Tensor:
        x = F.interpolate((images.clamp(-1, 1) + 1) / 2, size=(input_size, input_size), mode="bilinear",
                          align_corners=False)
        return net(x)

    return extract, f"TorchScript file {path.name} at {input_size} px"


def domain_classifier_extractor(data: DomainImages, *, steps: int = 2000, batch_size: int = 64, width: float = 0.25,
                                seed: int = 0, device="cpu", show_progress: bool = True) -> tuple[Extractor, str]:
    """Train the discriminator's architecture as a domain classifier on ``data`` and use its trunk features."""
    from branchspec.nets.stargan import Discriminator

    torch.manual_seed(seed)
    net = Discriminator(data.size, len(data.classes), width=width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = StepBatches(data, batch_size, seed=seed)
    recent = []  # accuracy over the last 100 training batches
    for step in tqdm(range(steps), desc="domain classifier for the Fréchet distance", disable=not show_progress):
        x, y, _ = batches[step]
        logits = net(x.to(device))
        loss = F.cross_entropy(logits, y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = recent[-99:] + [float((logits.argmax(1).cpu() == y).float().mean())]
    net.eval().requires_grad_(False)
    return net.features, (f"domain classifier (discriminator architecture, width {width}) trained here for "
                          f"{steps} steps on the real training images (accuracy on its last 100 batches "
                          f"{sum(recent) / max(1, len(recent)):.3f})")
