"""The exact Hessian of the loss with respect to a selection of parameters, and its block structure (Sec. 5.2,
Eqs. 12-14, Fig. 5 panels 3-4).

The loss is the mean per-sample loss over a batch, L = (1/B) Σ_i ℓ(f(x_i), y_i), as a function of the selected
parameters of every branch (:mod:`branchspec.analysis.selection`); everything else is held fixed. Two
computations give the same matrix:

- ``"direct"``: ``torch.func.hessian`` of L as a function of all the selected parameters at once.
- ``"structured"``: Eqs. (13)-(14). With F the model's output on the whole batch, J_k = ∂v_k/∂θ_{k,S} the
  Jacobian of branch k's output (the distributive part) and ∂²L/∂F² the derivative of the collaborative part,

      H_kl = J_kᵀ (∂²L/∂F²) J_l                             k ≠ l   (Eq. 14)
      H_kk = J_kᵀ (∂²L/∂F²) J_k + R_k,   R_k = ∂²⟨∂L/∂F, v_k⟩/∂θ_{k,S}²   (Eq. 13, its second term)

  J_k and R_k involve branch k alone: one forward-over-reverse pass of that branch gives a column of each,
  and the passes of all branches run together under ``torch.func.vmap``. The direct Hessian pushes every
  column through all M branches, so the structured one does about M times less work (see
  ``benchmarks/hessian_structured.py``). ∂²L/∂F² is applied to J's columns as Hessian-vector products of L
  in the output space, so it is never formed and any loss works.

Both hold for BatchNorm with batch statistics too: J is the Jacobian of the whole batch's output, so the
coupling of the samples through the batch statistics is included (:mod:`branchspec.analysis.batchnorm`).

Scores of block structure (the branch blocks of the flat, branch-major layout): the squared Frobenius norm of
every block, the share of the mass inside the diagonal blocks, and the same share after random permutations
of the parameters as a baseline.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from branchspec.analysis.batchnorm import batchnorm_mode
from branchspec.analysis.gradients import _as_tuple
from branchspec.analysis.selection import FIRST_LAYER, ParameterSelection, select_parameters
from branchspec.branched import Branched
from branchspec.errors import BranchspecError
from branchspec.losses import PerSampleLoss, get_loss

METHODS = ("structured", "direct")


def exact_hessian(model: Branched, inputs, target: Tensor, loss: str | PerSampleLoss = "l2",
                  params: str | ParameterSelection = FIRST_LAYER, *, branches=None, method: str = "structured",
                  batchnorm: str = "train", chunk_size: int = 16, memory_gb: float | None = None,
                  show_progress: bool = False) -> Tensor:
    """The Hessian ``[P, P]`` of the batch's mean loss w.r.t. the selected parameters, in the branch-major layout.

    Args:
        params: ``"first-layer"``, name patterns (see :func:`select_parameters`) or a selection.
        branches: the branches whose parameters are selected (all by default); the others are held fixed.
        method: ``"structured"`` (Eqs. 13-14) or ``"direct"`` (``torch.func.hessian``).
        batchnorm: ``"train"`` (batch statistics, the default) or ``"eval"`` (running statistics).
        chunk_size: tangent columns per branch in one vmapped pass of the structured method (memory ∝ it).
        memory_gb: a bound on the structured method's working memory: the branches and columns of one pass are
            chosen to fit it (:func:`pass_shape`); None runs every branch with ``chunk_size`` columns at once.

    The computation runs in the model's dtype on its device (on CUDA without TF32, so float32 stays float32).
    """
    if method not in METHODS:
        raise BranchspecError(f"method must be one of {METHODS}, got {method!r}.")
    if int(chunk_size) < 1:
        raise BranchspecError(f"chunk_size must be a positive integer, got {chunk_size}.")
    if memory_gb is not None and not memory_gb > 0:
        raise BranchspecError(f"memory_gb must be positive, got {memory_gb}.")
    sel = params if isinstance(params, ParameterSelection) else select_parameters(model, params, branches)
    inputs = _as_tuple(inputs)
    loss_fn = get_loss(loss)

    def mean_loss(F: Tensor) -> Tensor:
        return loss_fn(F, target).mean()

    with batchnorm_mode(model, batchnorm), _full_precision(target.device), torch.enable_grad():
        if method == "direct":
            return _direct(model, inputs, mean_loss, sel)
        branches_per_pass, chunk = pass_shape(model, inputs, sel, int(chunk_size), memory_gb)
        return _structured(model, inputs, mean_loss, sel, chunk, branches_per_pass, show_progress)


# The working memory of one vmapped pass of the structured method, per (branch, tangent column, sample), in units
# of one sample's forward activations (the outputs of the branch's leaf modules): measured 4.1 on the slim ResNet18
# at 32×32 (15.4 GB for 16 branches × 8 columns × 64 samples, 0.46 MB of activations per sample); 5 leaves room.
_PASS_MEMORY_FACTOR = 5.0


def pass_shape(model: Branched, inputs: tuple, sel: ParameterSelection, chunk_size: int,
               memory_gb: float | None) -> tuple[int, int]:
    """(branches per pass, columns per pass) of the structured Hessian: all branches and ``chunk_size`` columns,
    or, under ``memory_gb``, as many as fit (columns first, then branches), estimated from one sample's forward
    activations of one branch times :data:`_PASS_MEMORY_FACTOR` times the batch."""
    k = len(sel.branches)
    if memory_gb is None:
        return k, chunk_size
    per_unit = _PASS_MEMORY_FACTOR * _activation_bytes(model, inputs, sel.branches[0]) * len(inputs[0])
    units = int(memory_gb * 1e9 // per_unit)
    if units < 1:
        raise BranchspecError(f"one tangent column of one branch needs about {per_unit / 1e9:.1f} GB for this batch, "
                              f"more than the {memory_gb:g} GB allowed; use fewer samples or allow more memory.")
    chunk = min(chunk_size, units, sel.per_branch)
    return max(1, min(k, units // chunk)), chunk


@torch.no_grad()
def _activation_bytes(model: Branched, inputs: tuple, k: int) -> int:
    """The bytes of one sample's forward activations in branch k (the outputs of its leaf modules)."""
    branch = model.branches[k]
    total = [0]

    def hook(module, args, output):
        if isinstance(output, Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in branch.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    training = branch.training
    try:
        branch.eval()  # one sample: batch statistics are not defined, and the sizes are the same
        branch(*[x[:1] if isinstance(x, Tensor) else x for x in model.inputs_of_branch(k, *inputs)])
    finally:
        branch.train(training)
        for h in handles:
            h.remove()
    return max(total[0], 1)


def _full_precision(device: torch.device):
    """On CUDA, convolutions without TF32 (cuDNN allows it by default), so that float32 means float32."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    return nullcontext()


def _direct(model: Branched, inputs: tuple, mean_loss, sel: ParameterSelection) -> Tensor:
    """``torch.func.hessian`` of L as a function of the flat vector of all selected parameters."""
    with torch.no_grad():
        out = model.decompose(*inputs)
        others = [i for i, k in enumerate(out.subset) if k not in sel.branches]
        fixed = out.branch_outputs[others].sum(0) + (0 if out.residual is None else out.residual)
        branch_inputs = [model.inputs_of_branch(k, *inputs) for k in sel.branches]
    own = [{n: p.detach() for n, p in model.named_branch_parameters(k).items()} for k in sel.branches]

    def loss_of(flat: Tensor) -> Tensor:
        F = fixed
        for k, xs, params, selected in zip(sel.branches, branch_inputs, own, sel.split(flat)):
            F = F + model.branch_call(k, {**params, **selected}, *xs)
        return mean_loss(F)

    return torch.func.hessian(loss_of)(sel.values(model))


def _structured(model: Branched, inputs: tuple, mean_loss, sel: ParameterSelection, chunk_size: int,
                branches_per_pass: int, show_progress: bool) -> Tensor:
    """Eqs. (13)-(14): J_k and R_k of all branches together, then H = Jᵀ (∂²L/∂F²) J + blockdiag(R_k)."""
    ks = list(sel.branches)
    with torch.no_grad():
        F = model(*inputs)
        per_branch = [model.inputs_of_branch(k, *inputs) for k in ks]
    collaborative = grad(mean_loss)(F)  # ∂L/∂F over the batch

    # every selected branch's parameters, buffers and inputs, stacked for vmap
    params = _stack([{n: p.detach() for n, p in model.named_branch_parameters(k).items()} for k in ks])
    buffers = _stack([dict(model.branches[k].named_buffers()) for k in ks])
    shared = [all(xs[i] is per_branch[0][i] for xs in per_branch) for i in range(len(per_branch[0]))]
    xs = tuple(per_branch[0][i] if s else torch.stack([b[i] for b in per_branch]) for i, s in enumerate(shared))
    x_dims = tuple(None if s else 0 for s in shared)
    template = model.branches[ks[0]]

    def columns(p: dict, b: dict, x: tuple, basis: Tensor):
        """For one branch: R_k e and J_k e for every tangent e in ``basis`` ``[c, per_branch]``."""
        def inner(s: dict):
            v = functional_call(template, ({**p, **s}, b), x)
            return (collaborative * v).sum(), v  # ⟨∂L/∂F, v_k⟩ and v_k

        grad_inner = grad(inner, has_aux=True)
        point = {n: p[n] for n in sel.names}

        def one(e: Tensor):
            _, (r, j) = jvp(grad_inner, (point,), (sel.unflatten(e),))
            return torch.cat([t.reshape(-1) for t in r.values()]), j

        return vmap(one)(basis)

    all_branches = vmap(columns, in_dims=(0, 0, x_dims, None))
    n = sel.per_branch
    eye = torch.eye(n, dtype=F.dtype, device=F.device)
    passes = [(g, c) for g in range(0, len(ks), branches_per_pass) for c in range(0, n, chunk_size)]
    R_cols: list[list[Tensor]] = [[] for _ in range(0, len(ks), branches_per_pass)]
    J_cols: list[list[Tensor]] = [[] for _ in range(0, len(ks), branches_per_pass)]
    for g, start in tqdm(passes, desc="Hessian (structured)", unit="pass", disable=not show_progress):
        part = slice(g, g + branches_per_pass)
        r, j = all_branches({k: t[part] for k, t in params.items()}, {k: t[part] for k, t in buffers.items()},
                            tuple(x if d is None else x[part] for x, d in zip(xs, x_dims)), eye[start:start + chunk_size])
        R_cols[g // branches_per_pass].append(r)  # [K', c, n]
        J_cols[g // branches_per_pass].append(j)  # [K', c, B, *out]
    R = torch.cat([torch.cat(r, 1) for r in R_cols]).transpose(1, 2)  # [K, n, n]: column e of R_k is R_k e
    J = torch.cat([torch.cat(j, 1) for j in J_cols]).reshape(len(ks) * n, -1)  # [P, B·out]: J = [J_1 ... J_K]

    # ∂²L/∂F² applied to each column of J (Hessian-vector products in the output space)
    def output_hvp(t: Tensor) -> Tensor:
        return jvp(grad(mean_loss), (F,), (t.view_as(F),))[1].reshape(-1)

    HJ = torch.cat([vmap(output_hvp)(J[a:a + 256]) for a in range(0, J.shape[0], 256)])
    H = J @ HJ.T  # Eq. (14) for every pair of blocks, and the Gauss-Newton part of the own blocks
    for i in range(len(ks)):
        H[i * n:(i + 1) * n, i * n:(i + 1) * n] += R[i]  # Eq. (13): the second-order term of branch i
    return H


def _stack(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.stack([d[name] for d in dicts]) for name in dicts[0]}


# ------------------------------------------------------------------------------------------ block structure
def _block_ids(block_sizes, n: int) -> Tensor:
    sizes = [int(s) for s in block_sizes]
    if n != sum(sizes):
        raise BranchspecError(f"a square matrix of side {sum(sizes)} (the sum of the block sizes) is needed, got "
                              f"side {n}.")
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def block_squared_norms(H: Tensor, block_sizes) -> Tensor:
    """‖H_kl‖_F² for every pair of blocks: ``[M, M]`` (float64)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise BranchspecError(f"a square matrix is needed, got shape {tuple(H.shape)}.")
    block = _block_ids(block_sizes, H.shape[0]).to(H.device)
    m = int(block.max()) + 1
    sq = H.detach().double().pow(2)
    rows = torch.zeros(m, sq.shape[1], dtype=sq.dtype, device=sq.device).index_add_(0, block, sq)
    return torch.zeros(m, m, dtype=sq.dtype, device=sq.device).index_add_(1, block, rows).cpu()


def mass_ratio(squared_norms: Tensor) -> float:
    """The share of the squared Frobenius mass inside the diagonal blocks: Σ_k ‖H_kk‖² / Σ_kl ‖H_kl‖²."""
    total = float(squared_norms.sum())
    return float(torch.diagonal(squared_norms).sum()) / total if total > 0 else float("nan")


def block_mass_ratio(H: Tensor, block_sizes) -> float:
    """The block-diagonality score: 1 for a block-diagonal matrix, about 1/M for one without structure."""
    return mass_ratio(block_squared_norms(H, block_sizes))


def permuted_block_mass_ratios(H: Tensor, block_sizes, permutations: int = 10, seed: int = 0) -> Tensor:
    """The baseline: the score of P H Pᵀ for ``permutations`` random permutations P of the parameters (the
    same as scoring H with its parameters dealt into the blocks at random)."""
    gen = torch.Generator().manual_seed(int(seed))
    sq = H.detach().double().pow(2).cpu()
    block = _block_ids(block_sizes, sq.shape[0])
    total = float(sq.sum())
    ratios = []
    for _ in range(int(permutations)):
        dealt = block[torch.randperm(len(block), generator=gen)]
        ratios.append(float(sq[dealt[:, None] == dealt[None, :]].sum()) / total)
    return torch.tensor(ratios, dtype=torch.float64)


def block_coupling(H: Tensor, block_sizes) -> Tensor:
    """The normalized cross-block coupling ‖H_kl‖_F / √(‖H_kk‖_F ‖H_ll‖_F) for every pair of blocks, ``[M, M]``
    (1 on the diagonal; 0 between blocks of a block-diagonal matrix; about 1 for a matrix without structure).
    Unlike the block-mass ratio it does not depend on how many blocks there are, so networks with different
    block counts compare."""
    norms = block_squared_norms(H, block_sizes).sqrt()
    d = torch.diagonal(norms)
    denom = torch.sqrt(d[:, None] * d[None, :])
    return torch.where(denom > 0, norms / denom.clamp_min(1e-300), torch.zeros_like(norms))


def mean_coupling(coupling: Tensor) -> float:
    """The mean of :func:`block_coupling` over the pairs k ≠ l."""
    m = coupling.shape[0]
    off = ~torch.eye(m, dtype=torch.bool)
    return float(coupling[off].mean()) if m > 1 else float("nan")


def pseudo_block_sizes(n: int, size: int) -> list[int]:
    """A dense layer's ``n`` parameters dealt in order into blocks of ``size`` (the last one smaller): the
    pseudo-branches of a network that has none, to score it like a branched one (the dense control)."""
    if size < 1 or n < 1:
        raise BranchspecError(f"pseudo-blocks need a positive size and parameter count, got {size} and {n}.")
    return [size] * (n // size) + ([n % size] if n % size else [])
