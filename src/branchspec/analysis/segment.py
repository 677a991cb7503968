"""Unsupervised segmentation of eyes from a decomposition (App. F; Figs. 12, 21).

The branch outputs are aligned with the generated image, so they can be segmented directly:

1. every RGB component is made scalar by the value channel of HSV (after contrast stretching);
2. the components that locate the eyes give the initial surface: where their value stands out from the
   component's typical value (|z| > ``init_threshold``) the surface is positive;
3. Chan–Vese (``skimage.segmentation.chan_vese``) evolves that surface on an image in which the eyes are
   regions of nearly constant value: the sum of chosen components, or by default the generated image;
4. of the connected components found, only those that come in pairs on one row are kept (eyes, not a nose).

Which components locate the eyes can be given; by default it is the active branch whose value channel is the
most heavy-tailed (largest mean kurtosis over the images): small parts make rare, strong values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats
from skimage import color, measure
from skimage.segmentation import chan_vese
from torch import Tensor

from branchspec.analysis.decompose import contrast_stretch
from branchspec.errors import BranchspecError


def value_channel(images: Tensor) -> np.ndarray:
    """The HSV value of contrast-stretched images ``[N, 3, H, W]``: ``[N, H, W]`` in [0, 1]."""
    rgb = contrast_stretch(images)
    return np.stack([color.rgb2hsv(im)[..., 2] for im in rgb])


def choose_eye_branches(branch_outputs: Tensor, active: np.ndarray | None = None, count: int = 1) -> list[int]:
    """The ``count`` (active) branches whose value channel is the most heavy-tailed over the images."""
    m = branch_outputs.shape[0]
    candidates = [k for k in range(m) if active is None or active[k]]
    if not candidates:
        raise BranchspecError("no active branch to locate the eyes with.")
    score = {k: float(np.mean(stats.kurtosis(value_channel(branch_outputs[k]).reshape(branch_outputs.shape[1], -1),
                                             axis=1))) for k in candidates}
    return sorted(candidates, key=lambda k: -score[k])[:count]


def initial_surface(values: np.ndarray, threshold: float = 2.0) -> np.ndarray:
    """Positive where the mean of the eye-locating value images departs from its median by > ``threshold`` σ."""
    v = values.mean(0)
    z = np.abs(v - np.median(v)) / (v.std() + 1e-12)
    return z - threshold


def paired_on_rows(mask: np.ndarray) -> np.ndarray:
    """Keep the connected components that come in pairs on one row: two components whose row ranges
    overlap, and no third overlapping either (App. F's "row-wise multiplicity of 2")."""
    labels = measure.label(mask, connectivity=2)
    regions = measure.regionprops(labels)
    rows = [(r.bbox[0], r.bbox[2]) for r in regions]
    keep = np.zeros(len(regions), dtype=bool)
    for i, (a0, a1) in enumerate(rows):
        mates = [j for j, (b0, b1) in enumerate(rows) if j != i and a0 < b1 and b0 < a1]
        if len(mates) == 1:
            j = mates[0]
            mates_of_j = [q for q, (c0, c1) in enumerate(rows) if q != j and rows[j][0] < c1 and c0 < rows[j][1]]
            keep[i] = mates_of_j == [i]
    return np.isin(labels, [r.label for r, k in zip(regions, keep) if k])


def segment_eyes(branch_outputs: Tensor, generated: Tensor, init_branches: Sequence[int],
                 image_branches: Sequence[int] | None = None, *, init_threshold: float = 2.0, mu: float = 0.1,
                 max_iterations: int = 200) -> dict[str, np.ndarray]:
    """Segment the eyes of one image from its branch outputs ``[M, 3, H, W]`` and generated image ``[3, H, W]``.

    Returns the initial surface, the image segmented, Chan–Vese's region and the final mask (pairs on a row).
    """
    m = branch_outputs.shape[0]
    bad = [k for k in list(init_branches) + list(image_branches or []) if not 0 <= k < m]
    if bad or not init_branches:
        raise BranchspecError(f"branches {bad or '(none)'} are not valid eye-locating/image branches of 0..{m - 1}.")
    init = initial_surface(value_channel(branch_outputs[list(init_branches)]), init_threshold)
    source = generated[None] if not image_branches else branch_outputs[list(image_branches)].sum(0, keepdim=True)
    image = value_channel(source)[0]
    if (init > 0).sum() == 0:  # nothing stands out: start from the strongest departure
        init = init - init.max() + 1e-3
    region = chan_vese(image, mu=mu, lambda1=1.0, lambda2=1.0, tol=1e-4, max_num_iter=max_iterations, dt=0.5,
                       init_level_set=init)
    if region.sum() > region.size / 2:  # the eyes are the small region, whichever sign Chan–Vese gave it
        region = ~region
    return {"initial_surface": init, "image": image, "chan_vese": region, "mask": paired_on_rows(region)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
