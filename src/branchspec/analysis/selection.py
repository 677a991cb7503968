"""Which parameters an analysis differentiates: the same names in every chosen branch (θ_{k,S} ⊂ θ_k).

A selection is given by a pattern matched against the parameter names *inside a branch* (``conv1.weight``,
``layer1.0.*``), so every branch contributes the same parameters and the Hessian has one block per branch:

- ``"first-layer"`` (the default of the Hessian, as in Fig. 5): the parameters of the branch's first module, in
  registration order, that holds parameters of its own. For the slim ResNet18 that is the stem convolution
  ``conv1.weight`` (27·w1 weights); for the toy perceptron, w and b;
- a shell-style pattern (``fnmatch``), or several separated by commas: ``"*"`` is every parameter.

The flat layout used everywhere is branch-major: branch k's selected parameters, in name order, then the
next branch's. ``block_sizes`` gives the branch blocks of a vector or matrix in that layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from branchspec.branched import Branched
from branchspec.errors import BranchspecError

FIRST_LAYER = "first-layer"


@dataclass(frozen=True)
class ParameterSelection:
    """The names (inside a branch) and shapes of the selected parameters, and the branches they are taken from."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    branches: tuple[int, ...]

    @property
    def per_branch(self) -> int:
        """|θ_{k,S}|: the number of selected scalars in one branch."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def block_sizes(self) -> list[int]:
        return [self.per_branch] * len(self.branches)

    @property
    def size(self) -> int:
        return self.per_branch * len(self.branches)

    def parameters(self, model: Branched) -> list[nn.Parameter]:
        """The selected parameter tensors of ``model``, in the flat order."""
        return [model.branches[k].get_parameter(n) for k in self.branches for n in self.names]

    def values(self, model: Branched) -> Tensor:
        """The selected parameters as one flat vector ``[size]`` (detached)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters(model)])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """One branch's flat vector ``[per_branch]`` as name -> tensor (views)."""
        sizes = [math.prod(s) for s in self.shapes]
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(sizes), self.shapes)}

    def split(self, flat: Tensor) -> list[dict[str, Tensor]]:
        """A flat vector ``[size]`` as one name -> tensor dict per selected branch."""
        return [self.unflatten(part) for part in flat.split(self.per_branch)]


def first_layer_names(branch: nn.Module) -> list[str]:
    """The parameters of the first module (in registration order) that holds parameters of its own."""
    for prefix, module in branch.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            return [f"{prefix}.{name}" if prefix else name for name in own]
    raise BranchspecError("the branches have no parameters to select.")


def select_parameters(model: Branched, params: str = FIRST_LAYER, branches=None) -> ParameterSelection:
    """The parameters named by ``params`` (``"first-layer"`` or name patterns) in each of ``branches`` (all)."""
    if not isinstance(model, Branched):
        raise BranchspecError(f"the analysis needs a branchspec Branched model, got {type(model).__name__}.")
    subset = model.check_subset(branches)
    named = dict(model.branches[subset[0]].named_parameters())
    if params == FIRST_LAYER:
        names = first_layer_names(model.branches[subset[0]])
    else:
        patterns = [p.strip() for p in str(params).split(",") if p.strip()]
        names = [n for n in named if any(fnmatchcase(n, p) for p in patterns)]
        if not names:
            shown = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise BranchspecError(f"the parameter pattern {params!r} matches no parameter of a branch (they are "
                                  f"named {shown}); give a pattern such as 'conv1.weight', 'layer1.*' or '*'.")
    return ParameterSelection(tuple(names), tuple(tuple(named[n].shape) for n in names), subset)
