"""The core: a branched model f(x) = R(x) + Σ_k v_k(x)  (Eq. 1, Eq. 15).

M branches share one architecture and differ only by their random initialization. Their outputs live in the
output ("ambient") space and are summed; R is an optional residual: nothing, a fixed operator, or a learnt
module. A residual may also hand each branch its own input, as the learnt diffusion of App. E does
(φ_k feeds branch k): it then returns ``(R, branch_inputs)`` with ``branch_inputs`` shaped ``[M, B, ...]``.

Two executions compute the same thing from the same weights:

- ``"loop"``: one call per branch, the reference;
- ``"vmap"``: the branches' weights stacked on the fly and run through ``torch.func.vmap``. The stacked
  weights are views of the branches' own parameters, so gradients land in the same places as with the loop.

Architecture-specific fused executions (grouped convolutions) live beside their architecture in
:mod:`branchspec.nets`; they expose the same methods (``forward``, ``branch_outputs``, ``decompose``,
``num_branches``) and convert to and from :class:`Branched`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from branchspec.errors import BranchspecError

EXECUTIONS = ("loop", "vmap")


@dataclass
class BranchedOutput:
    """One forward pass: the total and its parts, all in the output space."""

    total: Tensor  # f(x) = R(x) + Σ_{k ∈ subset} v_k(x)
    branch_outputs: Tensor  # [K, B, ...]: v_k(x) for k in subset, in subset order
    residual: Tensor | None  # R(x), or None when the model has no residual
    subset: tuple[int, ...]


class Branched(nn.Module):
    """f(x) = R(x) + Σ_k v_k(x) over M branches of one architecture (Eq. 1, Eq. 15).

    Args:
        branch: a factory called M times (each call must build a fresh, randomly initialized module), or a
            sequence of already-built modules of one architecture.
        num_branches: M; required with a factory, implied by a sequence.
        residual: None, a fixed callable, or a learnt ``nn.Module``. It receives the same inputs as the model
            and returns R, or ``(R, branch_inputs)`` to give branch k the input ``branch_inputs[k]`` in place
            of the first input (App. E).
        execution: ``"loop"`` (reference) or ``"vmap"``.
        seed: when given, the branches are built under this seed without touching the global RNG state.
    """

    def __init__(
        self,
        branch: Callable[[], nn.Module] | Sequence[nn.Module],
        num_branches: int | None = None,
        *,
        residual: Callable | nn.Module | None = None,
        execution: str = "loop",
        seed: int | None = None,
    ):
        super().__init__()
        modules = _build_branches(branch, num_branches, seed)
        _check_same_architecture(modules)
        self.branches = nn.ModuleList(modules)
        if isinstance(residual, nn.Module):
            self.residual = residual
        else:
            self._fixed_residual = residual
        self.execution = execution

    # ----------------------------------------------------------------------------------------- properties
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise BranchspecError(f"execution must be one of {EXECUTIONS}, got {value!r}.")
        self._execution = value

    @property
    def residual_fn(self) -> Callable | None:
        """R as a callable, learnt or fixed, or None."""
        module = self._modules.get("residual")
        return module if module is not None else self.__dict__.get("_fixed_residual")

    # ------------------------------------------------------------------------------------ forward passes
    def forward(self, *inputs, subset: Sequence[int] | None = None) -> Tensor:
        """f(x) = R(x) + Σ_{k ∈ subset} v_k(x); all branches when ``subset`` is None."""
        return self.decompose(*inputs, subset=subset).total

    def branch_outputs(self, *inputs, subset: Sequence[int] | None = None) -> Tensor:
        """v_k(x) for k in ``subset`` (all by default), stacked: ``[K, B, ...]``."""
        return self.decompose(*inputs, subset=subset).branch_outputs

    def decompose(self, *inputs, subset: Sequence[int] | None = None) -> BranchedOutput:
        """The total, the per-branch outputs and R from one pass (ablation through ``subset``)."""
        subset = self.check_subset(subset)
        residual, branch_inputs = self._residual(inputs)
        if self.execution == "vmap":
            outputs = self._run_vmap(subset, inputs, branch_inputs)
        else:
            outputs = self._run_loop(subset, inputs, branch_inputs)
        total = outputs.sum(0)
        if residual is not None:
            total = total + residual
        return BranchedOutput(total=total, branch_outputs=outputs, residual=residual, subset=subset)

    def check_subset(self, subset: Sequence[int] | None) -> tuple[int, ...]:
        """Validate a subset of branch indices; None means all branches."""
        if subset is None:
            return tuple(range(self.num_branches))
        try:
            subset = tuple(int(k) for k in subset)
        except (TypeError, ValueError):
            raise BranchspecError(f"subset must be a sequence of branch indices, got {subset!r}.") from None
        bad = [k for k in subset if not 0 <= k < self.num_branches]
        if bad:
            raise BranchspecError(f"subset holds {bad}, outside the branch indices 0..{self.num_branches - 1}.")
        if len(set(subset)) != len(subset):
            raise BranchspecError(f"subset {list(subset)} repeats a branch; give each branch once.")
        if not subset:
            raise BranchspecError("subset is empty; give at least one branch index.")
        return subset

    def _residual(self, inputs: tuple) -> tuple[Tensor | None, Tensor | None]:
        fn = self.residual_fn
        if fn is None:
            return None, None
        out = fn(*inputs)
        if isinstance(out, tuple):
            residual, branch_inputs = out
            if branch_inputs.shape[0] != self.num_branches:
                raise BranchspecError(
                    f"the residual gave inputs for {branch_inputs.shape[0]} branches, the model has "
                    f"{self.num_branches}."
                )
            return residual, branch_inputs
        return out, None

    def inputs_of_branch(self, k: int, *inputs) -> tuple:
        """The inputs branch k receives: the model's inputs, or φ_k from the residual (App. E)."""
        return self._inputs_for(k, inputs, self._residual(inputs)[1])

    def branch_call(self, k: int, params: dict[str, Tensor], *branch_inputs) -> Tensor:
        """v_k evaluated with parameters ``params`` (a functional view of θ_k for torch.func transforms).

        ``branch_inputs`` are what branch k receives (see :meth:`inputs_of_branch`). The branch's buffers are
        copied inside the call, so running statistics are used as they are but never updated.
        """
        branch = self.branches[k]
        buffers = {n: b.clone() for n, b in branch.named_buffers()}
        return functional_call(branch, (params, buffers), branch_inputs)

    @staticmethod
    def _inputs_for(k: int, inputs: tuple, branch_inputs: Tensor | None) -> tuple:
        return inputs if branch_inputs is None else (branch_inputs[k], *inputs[1:])

    def _run_loop(self, subset, inputs, branch_inputs) -> Tensor:
        return torch.stack([self.branches[k](*self._inputs_for(k, inputs, branch_inputs)) for k in subset])

    def _run_vmap(self, subset, inputs, branch_inputs) -> Tensor:
        modules = [self.branches[k] for k in subset]
        params = _stack_named([dict(m.named_parameters()) for m in modules])
        buffers = _stack_named([dict(m.named_buffers()) for m in modules])
        template = modules[0]

        def call(p, b, *xs):
            return functional_call(template, (p, b), xs)

        if branch_inputs is not None:
            inputs = (branch_inputs[list(subset)], *inputs[1:])
        in_dims = (0, 0, *[0 if (i == 0 and branch_inputs is not None) else None for i in range(len(inputs))])
        try:
            outputs = torch.vmap(call, in_dims=in_dims, randomness="different")(params, buffers, *inputs)
        except RuntimeError as err:
            raise BranchspecError(
                f"this branch cannot run under torch.func.vmap ({str(err).splitlines()[0]}); "
                "use execution='loop'."
            ) from err
        if self.training and buffers:  # running statistics were updated in the stacked copies: write back
            with torch.no_grad():
                for name, stacked in buffers.items():
                    for i, module in enumerate(modules):
                        module.get_buffer(name).copy_(stacked[i])
        return outputs

    # ------------------------------------------------------------------------------- parameter groups θ_k
    def branch_parameters(self, k: int) -> list[nn.Parameter]:
        """θ_k: the parameters of branch k (disjoint from every other branch's)."""
        return list(self.branches[self.check_subset([k])[0]].parameters())

    def named_branch_parameters(self, k: int) -> dict[str, nn.Parameter]:
        """θ_k by name, the names relative to the branch."""
        return dict(self.branches[self.check_subset([k])[0]].named_parameters())

    @property
    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """[θ_1, ..., θ_M]."""
        return [list(b.parameters()) for b in self.branches]

    def residual_parameters(self) -> list[nn.Parameter]:
        """The learnt residual's parameters (empty when R is fixed or absent); they belong to no θ_k."""
        module = self._modules.get("residual")
        return list(module.parameters()) if module is not None else []

    def branch_of(self, parameter: Tensor) -> int | None:
        """The branch k whose θ_k holds ``parameter``, or None."""
        for k, group in enumerate(self.parameter_groups):
            if any(p is parameter for p in group):
                return k
        return None


@contextmanager
def unchanged_buffers(module: nn.Module):
    """Run analyses in the module's current mode without leaving a trace in its buffers (BN statistics)."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])


def _build_branches(branch, num_branches, seed) -> list[nn.Module]:
    if isinstance(branch, nn.Module):
        raise BranchspecError(
            "give Branched a factory (e.g. `lambda: MyNet()`) or a list of modules, not one module: "
            "each branch needs its own initialization."
        )
    if callable(branch):
        if num_branches is None or int(num_branches) < 1:
            raise BranchspecError(f"num_branches must be a positive integer, got {num_branches!r}.")
        if seed is None:
            return [branch() for _ in range(int(num_branches))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [branch() for _ in range(int(num_branches))]
    modules = list(branch)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise BranchspecError("branch must be a factory or a non-empty sequence of nn.Module.")
    if num_branches is not None and int(num_branches) != len(modules):
        raise BranchspecError(f"num_branches={num_branches} but {len(modules)} modules were given.")
    return modules


def _check_same_architecture(modules: list[nn.Module]) -> None:
    def signature(m: nn.Module):
        return type(m), [(n, tuple(t.shape)) for n, t in m.state_dict().items()]

    first = signature(modules[0])
    for k, m in enumerate(modules[1:], start=1):
        if signature(m) != first:
            raise BranchspecError(
                f"branch {k} differs in architecture from branch 0; all branches must share one architecture."
            )
    ids = [id(p) for m in modules for p in m.parameters()]
    if len(ids) != len(set(ids)):
        raise BranchspecError("branches share parameter tensors; build each branch with its own parameters.")


def _stack_named(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.stack([d[name] for d in dicts]) for name in dicts[0]}
