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

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from branchspec.data.domains import DomainImages, StepBatches
from branchspec.errors import BranchspecError, log

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


def classifier_steps_for(data: DomainImages, batch_size: int = 64) -> int:
    """The default length of the domain classifier's training: 10 passes over the training images, at least 200
    and at most 2,000 steps."""
    return min(2000, max(200, -(-10 * len(data.labels) // batch_size)))


def domain_classifier_extractor(data: DomainImages, *, steps: int | None = None, batch_size: int = 64,
                                width: float = 0.25, seed: int = 0, device="cpu", cache: str | Path | None = None,
                                show_progress: bool = True) -> tuple[Extractor, str]:
    """Train the discriminator's architecture as a domain classifier on ``data`` and use its trunk features.

    ``steps`` defaults to :func:`classifier_steps_for`. With ``cache`` (a ``.safetensors`` path) a classifier
    trained before on the same images with the same settings is loaded from it instead, and a new one is saved
    there. The expected training time is logged after the first steps.
    """
    from safetensors.torch import load_file, save_file

    from branchspec.nets.stargan import Discriminator

    steps = steps or classifier_steps_for(data, batch_size)
    key = {"steps": str(steps), "batch_size": str(batch_size), "width": repr(width), "seed": str(seed),
           "size": str(data.size), "domains": ",".join(data.classes),
           "images": ",".join(str(n) for n in data.counts().values())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Discriminator(data.size, len(data.classes), width=width).to(device)
    cached = Path(cache) if cache else None
    if cached is not None and cached.is_file():
        from safetensors import safe_open

        with safe_open(str(cached), "pt") as fh:
            meta = fh.metadata() or {}
        if {k: meta.get(k) for k in key} == key:
            net.load_state_dict(load_file(str(cached), device=str(device)))
            net.eval().requires_grad_(False)
            return net.features, meta.get("description", "domain classifier (cached)") + " (cached)"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = StepBatches(data, batch_size, seed=seed)
    recent = []  # accuracy over the last 100 training batches
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="domain classifier for the Fréchet distance", disable=not show_progress):
        x, y, _ = batches[step]
        logits = net(x.to(device))
        loss = F.cross_entropy(logits, y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = recent[-99:] + [float((logits.argmax(1).cpu() == y).float().mean())]
        if step == 4 and steps > 20:
            minutes = (time.perf_counter() - start) / 5 * steps / 60
            log.info("training a domain classifier for the Fréchet distance: %d steps, about %.0f min%s", steps,
                     max(1.0, minutes), " (kept for the next run)" if cached else "")
    net.eval().requires_grad_(False)
    description = (f"domain classifier (discriminator architecture, width {width}) trained here for {steps} steps on "
                   f"the real training images (accuracy on its last 100 batches "
                   f"{sum(recent) / max(1, len(recent)):.3f})")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={**key, "description": description})
        tmp.replace(cached)
    return net.features, description
