"""Figure primitives shared by every study: grids of heat-maps, curves with error bars, image grids.

Each returns a matplotlib figure; :meth:`branchspec.rundir.RunDir.save_figure` writes it. Importing this module
leaves matplotlib's backend alone (a notebook keeps its own); the command line selects Agg, and matplotlib falls
back to it where there is no display.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def subplots(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = (4.0, 3.2), **kw):
    """A figure of ``nrows × ncols`` panels of the given size; the axes always come back as a 2-D array."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False, **kw)
    return fig, axes


def heatmap(ax, matrix, *, title: str = "", symmetric: bool = True, cmap: str | None = None,
            xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None, colorbar: bool = True,
            xlabel: str = "", ylabel: str = ""):
    """One matrix as an image; diverging around 0 when ``symmetric``."""
    matrix = np.asarray(matrix, dtype=float)
    if symmetric:
        vmax = float(np.nanmax(np.abs(matrix))) or 1.0
        im = ax.imshow(matrix, cmap=cmap or "RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
    else:
        im = ax.imshow(matrix, cmap=cmap or "viridis", interpolation="nearest", aspect="auto")
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), labels=list(xlabels), rotation=90, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), labels=list(ylabels), fontsize=7)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def heatmap_grid(matrices: Sequence, titles: Sequence[str], *, ncols: int = 5, symmetric: bool = True,
                 panel: tuple[float, float] = (2.6, 2.3), suptitle: str = "", **kw):
    """Several matrices side by side (e.g. the covariance examples of Fig. 3 right)."""
    n = len(matrices)
    nrows = max(1, -(-n // ncols))
    fig, axes = subplots(nrows, min(ncols, n), panel=panel)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, m, t in zip(axes.flat, matrices, titles):
        heatmap(ax, m, title=t, symmetric=symmetric, **kw)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def curves(ax, x, ys: dict[str, Sequence[float]], *, yerr: dict[str, Sequence[float]] | None = None,
           xlabel: str = "", ylabel: str = "", title: str = "", marker: str = "o", logx: bool = False):
    """Named curves over a shared x, with optional error bars."""
    for name, y in ys.items():
        err = None if yerr is None else yerr.get(name)
        ax.errorbar(x, y, yerr=err, marker=marker, markersize=3, capsize=2, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend(fontsize=8)


def image_grid(images, *, nrows: int, ncols: int, titles: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None, panel: float = 1.3, suptitle: str = ""):
    """Images ``[N, H, W, C]`` (or ``[N, H, W]``) in [0, 1], row-major; missing cells stay empty."""
    images = np.asarray(images)
    fig, axes = subplots(nrows, ncols, panel=(panel, panel))
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if i < len(images):
            img = np.clip(images[i], 0, 1)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            if titles is not None and i < len(titles):
                ax.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
