"""Layered scenes: a procedural image set whose additive components are known (Sec. 7 evaluation).

Each image is a sum of layers, all in the image space:

    image = base + diffuse + specular + texture + hue + eyes

- ``base``: a smooth background gradient and the flat colour of one ellipsoid "head";
- ``diffuse``: Lambertian shading of the ellipsoid under a random light (grey);
- ``specular``: the Blinn-Phong highlight of the same light (white);
- ``texture``: the domain's pattern on the head: ``spots``, ``stripes`` or ``rings`` (grey);
- ``hue``: a smooth change of chroma across the head (zero luminance);
- ``eyes``: two small dark discs on one row (the "small parts" for segmentation, App. F).

A scene (head, light, colours, pattern phase, eyes) is drawn from its own seed ``(seed, scene_id)``, and can be
rendered in every domain; only the texture differs between domains. Training data is unpaired: scene i
appears in domain ``i mod num_domains`` only (:func:`training_scenes`). Evaluation scenes come from a disjoint id
range and are rendered in every domain, so a translation has a paired ground truth and every output has its
true layers (:func:`evaluation_scenes`). Values stay within [-1, 1] without clamping, so the layers sum exactly
to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from branchspec.data.domains import DomainImages
from branchspec.errors import BranchspecError

DOMAINS = ("spots", "stripes", "rings")
LAYERS = ("diffuse", "specular", "texture", "hue", "eyes")  # the components to recover; ``base`` belongs to R
EVAL_ID_OFFSET = 1_000_000  # evaluation scene ids never meet training ids
NUM_SPOTS = 7


@dataclass
class Scenes:
    """Rendered scenes: images ``[N, 3, S, S]``, their layers by name (each ``[N, 3, S, S]``, ``base`` included),
    the domain of each image and the scene it shows."""

    images: Tensor
    layers: dict[str, Tensor]
    domains: Tensor
    scene_ids: Tensor


def _scene_parameters(scene_ids: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Every random choice of each scene, drawn from the scene's own seed (independent of the other scenes)."""
    rows = []
    for i in scene_ids:
        r = np.random.default_rng([seed, int(i)])
        light = np.array([r.uniform(-0.8, 0.8), r.uniform(-0.8, 0.8), 1.0])
        chroma = r.uniform(0, 2 * np.pi)
        rows.append(np.concatenate([
            r.uniform(-0.25, 0.25, 2),          # 0-1  head centre
            r.uniform(0.5, 0.7, 2),             # 2-3  head radii
            r.uniform(-0.35, 0.05, 3),          # 4-6  background colour
            r.uniform(-0.15, 0.15, 6),          # 7-12 background gradient (x, y per channel)
            r.uniform(-0.25, 0.15, 3),          # 13-15 head colour
            light / np.linalg.norm(light),      # 16-18 light direction
            [np.cos(chroma), np.sin(chroma)],   # 19-20 hue direction in the chroma plane
            r.uniform(-np.pi, np.pi, 2),        # 21-22 hue field orientation and phase
            r.uniform(0, 2 * np.pi, 2),         # 23-24 texture orientation and phase
            r.uniform(-0.6, 0.6, 2 * NUM_SPOTS),  # 25-38 spot positions (head coordinates)
            [r.uniform(0.3, 0.42), r.uniform(0.15, 0.3), r.uniform(0.11, 0.15)],  # 39-41 eyes: dx, dy, radius
        ]))
    return np.stack(rows)


def render_scenes(scene_ids, domains, *, size: int = 32, num_domains: int = 2, seed: int = 0) -> Scenes:
    """Render scenes ``scene_ids`` in ``domains`` (one per scene, or one for all) at ``size`` × ``size``."""
    if not 2 <= num_domains <= len(DOMAINS):
        raise BranchspecError(f"layered scenes have 2 to {len(DOMAINS)} domains, got {num_domains}.")
    if size < 16:
        raise BranchspecError(f"layered scenes need at least 16 px, got {size}.")
    ids = np.atleast_1d(np.asarray(scene_ids, dtype=np.int64))
    dom = torch.as_tensor(np.broadcast_to(np.asarray(domains, dtype=np.int64), ids.shape).copy())
    if dom.numel() and (dom.min() < 0 or dom.max() >= num_domains):
        raise BranchspecError(f"domains must lie in 0..{num_domains - 1}.")
    P = torch.as_tensor(_scene_parameters(ids, seed), dtype=torch.float32)
    n = len(ids)

    def col(i, j=None):  # parameter column(s) as [N, k, 1, 1]
        return P[:, i:(j or i + 1), None, None]

    lin = torch.linspace(-1, 1, size)
    Y, X = torch.meshgrid(lin, lin, indexing="ij")  # [S, S]; y grows downwards
    X, Y = X.expand(n, 1, size, size), Y.expand(n, 1, size, size)
    px = 2.0 / size  # one pixel in these units

    # the head: an ellipsoid; (hx, hy) are head coordinates, r2 its squared radius
    hx, hy = (X - col(0)) / col(2), (Y - col(1)) / col(3)
    r2 = hx**2 + hy**2
    mask = torch.sigmoid((1 - r2.sqrt()) * col(2).clamp(min=0.1) / px * 2)
    nz = (1 - r2).clamp(min=0).sqrt()
    normal = torch.cat([hx, hy, nz], 1) / torch.cat([hx, hy, nz], 1).norm(dim=1, keepdim=True).clamp(min=1e-6)
    light = col(16, 19)
    half = light + torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    half = half / half.norm(dim=1, keepdim=True)

    gray = torch.ones(1, 3, 1, 1)
    base = col(4, 7) + col(7, 10) * X + col(10, 13) * Y
    base = base * (1 - mask) + col(13, 16) * mask
    diffuse = 0.45 * ((normal * light).sum(1, keepdim=True).clamp(min=0) - 0.5) * mask * gray
    specular = 0.45 * (normal * half).sum(1, keepdim=True).clamp(min=0).pow(30) * mask * gray

    angle, phase = col(23), col(24)
    u = hx * torch.cos(angle) + hy * torch.sin(angle)
    patterns = torch.stack([
        -_spots(hx, hy, P[:, 25:25 + 2 * NUM_SPOTS], radius=0.16),
        torch.sin(7.0 * u + phase),
        torch.sin(9.0 * r2.sqrt() + phase),
    ][:num_domains])  # [D, N, 1, S, S]
    texture = 0.14 * patterns[dom, torch.arange(n)] * mask * gray

    # hue: a chroma vector (zero mean over RGB) modulated by a smooth wave across the head
    chroma_basis = torch.tensor([[2.0, -1.0, -1.0], [0.0, 3**0.5, -(3**0.5)]]) / 6**0.5
    chroma = (P[:, 19:21] @ chroma_basis).view(n, 3, 1, 1)
    wave = torch.sin(1.5 * (X * torch.cos(col(21)) + Y * torch.sin(col(21))) + col(22))
    hue = 0.18 * wave * chroma * mask

    dx, dy, radius = col(39), col(40), col(41)
    eye = sum(_disc(hx - s * dx, hy + dy, radius, px / col(2)) for s in (-1.0, 1.0))
    eyes = -0.55 * eye * mask * gray

    layers = {"base": base, "diffuse": diffuse, "specular": specular, "texture": texture, "hue": hue, "eyes": eyes}
    images = sum(layers.values())
    return Scenes(images=images, layers=layers, domains=dom, scene_ids=torch.as_tensor(ids))


def _disc(x: Tensor, y: Tensor, radius: Tensor, soft: Tensor) -> Tensor:
    """A filled disc of ``radius`` at the origin with an edge about one pixel wide."""
    return torch.sigmoid((radius - (x**2 + y**2).sqrt()) / soft)


def _spots(hx: Tensor, y: Tensor, centres: Tensor, radius: float) -> Tensor:
    """A sum of soft round spots at ``centres`` ``[N, 2·K]`` (head coordinates), clipped to 1."""
    c = centres.view(-1, NUM_SPOTS, 2, 1, 1)
    d2 = (hx - c[:, :, 0]) ** 2 + (y - c[:, :, 1]) ** 2  # [N, K, S, S]
    return torch.exp(-d2 / (2 * radius**2)).sum(1, keepdim=True).clamp(max=1.0)


def training_scenes(num_scenes: int, *, size: int = 32, num_domains: int = 2, seed: int = 0) -> DomainImages:
    """Unpaired training images: scene i in domain ``i mod num_domains`` only."""
    if num_scenes < num_domains:
        raise BranchspecError(f"need at least one scene per domain ({num_domains}), got {num_scenes}.")
    ids = np.arange(num_scenes)
    scenes = render_scenes(ids, ids % num_domains, size=size, num_domains=num_domains, seed=seed)
    return DomainImages.from_float(scenes.images, scenes.domains, list(DOMAINS[:num_domains]))


def evaluation_scenes(num_scenes: int, *, size: int = 32, num_domains: int = 2, seed: int = 0) -> list[Scenes]:
    """Held-out scenes, each rendered in every domain: one :class:`Scenes` per domain, the same scenes in each."""
    ids = EVAL_ID_OFFSET + np.arange(num_scenes)
    return [render_scenes(ids, d, size=size, num_domains=num_domains, seed=seed) for d in range(num_domains)]
