"""Architecture disentanglement, NAD (Hu et al., ICCV 2021): per-class sub-architectures of a trained classifier.

A *task* is one class c. For every gated layer l NAD learns one gate logit per channel, m_l^c, while the
network stays frozen (eval mode, BatchNorm on its running statistics). During the search a layer's output a_l
becomes σ(m_l^c) · a_l, channel by channel, with m ~ N(0, 1) at the start. The loss of task c on a batch x of
its images (docs/nad.md; reference/nad_method.md §1.3) is

    loss_c = [ CE(f_gated(x), c) + Σ_l MSE(a_l^gated(x_K), a_l(x_K)) ] / L  +  β · Σ_l mean(σ(m_l^c)²) / L

where K are the batch images the *original* network classifies correctly, L the number of gated layers and the
MSE a mean over all elements. Each layer's gate logits move by the authors' normalized-gradient step
m_l ← m_l − lr · g_l / ‖g_l‖ (lr 0.1), or by Adam; a batch with no correctly classified image is skipped for
that task. After the search the *sub-architecture* of c is the binary mask b_l^c = [σ(m_l^c) > 0.5] of every
layer (:class:`SubArchitectures`, saved as ``masks.npz`` + ``masks.json``).

Gates sit on module outputs through forward hooks (:class:`Gates`), so the model's code is never changed. The
default layers are the residual blocks (``layer1.0 … layer4.1`` of torchvision-style ResNets). For a
:class:`~branchspec.branched.Branched` model a layer is the same block in every branch: its channels are the
branches' channels one branch after another (M·C_l in all), exactly the layout of the fused ResNet
(:class:`~branchspec.nets.resnet.FusedResNet18`), so a mask says which channels of which branch class c keeps.

All classes are searched in one vectorized program: a step stacks B images of each class into one batch of T·B
images, and sample i is gated by the gates of its class. The tasks do not interact (eval mode; the loss is a sum
of per-task losses), so the result equals a search of one class at a time (``classes_per_pass`` trades
memory for speed without changing it). Batches, augmentation and initial gates come from ``(seed, class,
step)`` alone, so a search resumes exactly from its state file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from branchspec.branched import Branched
from branchspec.errors import BranchspecError, Interrupted, StopRequest
from branchspec.rundir import atomic_save_npz, atomic_torch_save, atomic_write_text, to_plain

CHECKPOINT_MINUTES = 10.0  # the search state is also saved after this many minutes of wall-clock

THRESHOLD = 0.5  # the sub-architecture keeps channel j of layer l when σ(m_lj) > 0.5, i.e. m_lj > 0
OPTIMIZERS = ("normalized", "adam")
EXECUTIONS = ("auto", "fused", "loop")  # of a Branched model under the gates (gated_execution)
_BLOCK_NAME = re.compile(r"^layer\d+\.\d+$")  # torchvision-style residual blocks: layer1.0, ..., layer4.1
_BLOCK_TYPES = ("BasicBlock", "Bottleneck")


# ----------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class GateLayer:
    """One gated layer: the outputs of ``modules`` side by side along the channel axis.

    A plain model has one module per layer; a loop-execution Branched has one per branch (``branches.k.<name>``),
    each with ``widths[k]`` channels; the fused ResNet has one module holding all M·C channels. ``branches``
    splits the layer's channels into that many equal consecutive groups (1 for a plain model).
    """

    name: str
    modules: tuple[str, ...]
    widths: tuple[int, ...]
    branches: int = 1

    @property
    def channels(self) -> int:
        return sum(self.widths)

    def branch_of_channel(self) -> np.ndarray:
        """The branch each channel belongs to: ``[channels]`` ints."""
        return np.repeat(np.arange(self.branches), self.channels // self.branches)


def default_layer_names(model: nn.Module) -> list[str]:
    """Each residual block: modules named ``layer<i>.<j>`` (torchvision-style), else BasicBlock/Bottleneck
    modules; names relative to a branch for a Branched model."""
    body = model.branches[0] if isinstance(model, Branched) else model
    names = [n for n, _ in body.named_modules() if _BLOCK_NAME.match(n)]
    if not names:
        names = [n for n, m in body.named_modules() if n and type(m).__name__ in _BLOCK_TYPES]
    if not names:
        raise BranchspecError("the model has no residual blocks to gate by default (modules named like layer1.0 "
                              "or of type BasicBlock/Bottleneck); name the layers to gate, e.g. `layers` "
                              f"{','.join(_suggested_layers(body))}.")
    return names


def _suggested_layers(body: nn.Module, count: int = 3) -> list[str]:
    """A few of the model's own modules that output feature maps (its deepest convolutions, or else any named
    modules), to suggest in an error message."""
    convs = [n for n, m in body.named_modules() if n and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    names = convs or [n for n, _ in body.named_modules() if n]
    if len(names) <= count:
        return names
    return [names[round(i * (len(names) - 1) / count)] for i in range(1, count + 1)]


def check_layer_names(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """``names`` (or :func:`default_layer_names`), each a module of ``model`` (of a branch, for a Branched
    model) and named once; found without running the model, so that a wrong name is reported before any data
    is read."""
    names = list(names) if names else default_layer_names(model)
    body = dict((model.branches[0] if isinstance(model, Branched) else model).named_modules())
    missing = [n for n in names if n not in body or not n]
    if missing:
        some = ", ".join(n for n in list(body)[1:13])
        raise BranchspecError(f"the model has no module(s) named {missing}; choose among its module names "
                              f"({some}, ...).")
    if len(set(names)) != len(names):
        raise BranchspecError(f"layers {names} name a module twice; give each layer once.")
    return names


def find_layers(model: nn.Module, example: Tensor, names: Sequence[str] | None = None) -> list[GateLayer]:
    """The gated layers of ``model`` (``names`` or :func:`default_layer_names`), their widths measured by one
    forward pass of ``example`` (a batch of at least one input)."""
    names = check_layer_names(model, names)
    branched = isinstance(model, Branched)
    num_branches = getattr(model, "num_branches", 1)
    available = dict(model.named_modules())
    modules = {n: [f"branches.{k}.{n}" for k in range(num_branches)] if branched else [n] for n in names}
    widths: dict[str, int] = {}

    def probe(full_name):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor) or output.dim() < 2:
                raise BranchspecError(f"module {full_name} returns {type(output).__name__}, not a tensor "
                                      "[B, C, ...]; choose layers whose output is one feature tensor.")
            widths[full_name] = int(output.shape[1])
        return hook

    handles = [available[m].register_forward_hook(probe(m)) for ms in modules.values() for m in ms]
    try:
        with torch.no_grad(), _loop_execution(model):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    unused = [m for ms in modules.values() for m in ms if m not in widths]
    if unused:
        raise BranchspecError(f"module(s) {unused} are not called in the model's forward pass; choose layers it uses.")
    # a fused branched network (FusedResNet18) has num_branches too: its channels are concatenated branch by branch
    return [GateLayer(n, tuple(ms), tuple(widths[m] for m in ms), int(num_branches)) for n, ms in modules.items()]


def gated_execution(model: nn.Module, execution: str = "auto") -> nn.Module:
    """The network the gates run on, in eval mode.

    A Branched model of slim ResNet18 branches runs fused by default (``"auto"``/``"fused"``): one network of
    grouped convolutions with the same weights, whose layer channels are the branches' channels one branch after
    another, the layout of a Branched layer, so masks are the same either way (``"loop"`` keeps the branches).
    Any other model is returned as it is.
    """
    if execution not in EXECUTIONS:
        raise BranchspecError(f"execution must be one of {EXECUTIONS}, got {execution!r}.")
    from branchspec.nets.resnet import SlimResNet18, fuse

    slim = isinstance(model, Branched) and isinstance(model.branches[0], SlimResNet18) and model.residual_fn is None
    if execution == "fused" and not slim:
        raise BranchspecError("execution 'fused' needs a Branched model of SlimResNet18 branches; use 'loop'.")
    return (fuse(model) if slim and execution != "loop" else model).eval()


class _loop_execution:
    """Run a Branched model with its loop execution (hooks cannot run inside torch.func.vmap)."""

    def __init__(self, model: nn.Module):
        self.model = model if isinstance(model, Branched) else None

    def __enter__(self):
        if self.model is not None:
            self.saved, self.model.execution = self.model.execution, "loop"

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.execution = self.saved


# ------------------------------------------------------------------------------------------------ gates
class Gates:
    """Forward hooks that multiply the gated layers' outputs by per-sample channel gates and record them.

        with Gates(model, layers) as gates:
            logits, acts = gates.run(x, values)   # values[l]: [N or 1, C_l] gates, or None for all ones

    ``acts[l]`` is layer l's gated output (channels of all its modules side by side). Outside the ``with`` block
    the model is untouched: the hooks are removed and a Branched model gets its execution back.
    """

    def __init__(self, model: nn.Module, layers: Sequence[GateLayer]):
        self.model, self.layers = model, list(layers)
        self.values: list[Tensor | None] = [None] * len(self.layers)
        self._outputs: list[list[Tensor | None]] = [[None] * len(layer.modules) for layer in self.layers]
        self._handles: list = []
        self._execution = _loop_execution(model)

    def __enter__(self) -> "Gates":
        named = dict(self.model.named_modules())
        for i, layer in enumerate(self.layers):
            offset = 0
            for j, (name, width) in enumerate(zip(layer.modules, layer.widths)):
                self._handles.append(named[name].register_forward_hook(self._hook(i, j, offset, width)))
                offset += width
        self._execution.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._execution.__exit__()
        self._outputs = [[None] * len(layer.modules) for layer in self.layers]

    def _hook(self, i: int, j: int, offset: int, width: int):
        def hook(module, inputs, output):
            gate = self.values[i]
            if gate is not None:
                g = gate[:, offset:offset + width].to(output.dtype)
                output = output * g.reshape(*g.shape, *([1] * (output.dim() - 2)))
            self._outputs[i][j] = output
            return output
        return hook

    def run(self, x: Tensor, values: Sequence[Tensor | None] | None = None) -> tuple[Tensor, list[Tensor]]:
        """The logits and every gated layer's output for inputs ``x`` under gates ``values`` (None: all ones)."""
        self.values = list(values) if values is not None else [None] * len(self.layers)
        logits = self.model(x)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits  # (logits, aux) models
        acts = [outs[0] if len(outs) == 1 else torch.cat(outs, 1) for outs in self._outputs]
        self._outputs = [[None] * len(layer.modules) for layer in self.layers]
        self.values = [None] * len(self.layers)
        return logits, acts


# ----------------------------------------------------------------------------------------------- search
@dataclass
class SearchSettings:
    """The search (reference/nad_method.md §1.3-1.4): the authors' defaults, β of their ResNet."""

    beta: float | None = None  # sparsity weight (None: 0.02, the authors' ResNet50 value; VGG16: 4.5)
    lr: float = 0.1
    optimizer: str = "normalized"  # "normalized": m_l -= lr · g_l/‖g_l‖ per layer (authors); or "adam"
    epochs: int = 20  # the authors evaluate the gates after epoch 20 ...
    min_steps: int = 1640  # ... of ~82 batches of an ImageNet class: never fewer steps than their search
    steps: int | None = None  # overrides both: this many steps
    batch_size: int = 16  # images of each class per step
    crop_padding: int | None = None  # augmentation: random crop with this zero padding (0: none; None: 4)
    flip: bool | None = None  # augmentation: random horizontal flip (None: yes)
    seed: int = 0
    classes_per_pass: int | None = None  # classes stacked in one program (None: all); does not change the result
    checkpoint_every: int = 100  # steps between saves of the search state

    def resolved(self) -> "SearchSettings":
        """The settings with every None replaced by its default: β = 0.02 (the authors' ResNet50 value), and the
        random crop (padding 4) and flip of CIFAR training (the authors use their ImageNet augmentation,
        RandomResizedCrop and flip). The study fills them from the classifier run first (docs/nad.md)."""
        return dataclasses.replace(self, beta=0.02 if self.beta is None else float(self.beta),
                                   crop_padding=4 if self.crop_padding is None else int(self.crop_padding),
                                   flip=True if self.flip is None else bool(self.flip))

    def check(self) -> "SearchSettings":
        """The resolved settings, checked."""
        s = self.resolved()
        if s.optimizer not in OPTIMIZERS:
            raise BranchspecError(f"optimizer must be one of {OPTIMIZERS}, got {s.optimizer!r}.")
        if not (math.isfinite(s.beta) and s.beta >= 0 and math.isfinite(s.lr) and s.lr > 0):
            raise BranchspecError(f"need a finite beta ≥ 0 and lr > 0, got beta={s.beta} and lr={s.lr}.")
        counts = {"epochs": s.epochs, "min_steps": s.min_steps, "batch_size": s.batch_size,
                  "checkpoint_every": s.checkpoint_every, "steps": 1 if s.steps is None else s.steps,
                  "classes_per_pass": 1 if s.classes_per_pass is None else s.classes_per_pass}
        bad = [k for k, v in counts.items() if int(v) < 1] + (["crop_padding"] if s.crop_padding < 0 else [])
        if bad:
            raise BranchspecError(f"{', '.join(bad)} must be positive (crop_padding: ≥ 0); got {s}.")
        return s

    def total_steps(self, largest_class: int) -> int:
        """``steps``, or ``epochs`` passes over the largest class in batches of ``batch_size`` but at least
        ``min_steps``: a normalized step moves each layer by exactly lr, so the search converges in a number of
        steps, not of epochs, and a small data set needs as many as ImageNet did (docs/nad.md)."""
        return self.steps or max(self.min_steps, self.epochs * math.ceil(largest_class / self.batch_size))


@dataclass
class SubArchitectures:
    """The result of a search: raw gate logits m per layer ``[T, C_l]`` for T classes, and the binary masks.

    ``searched[c]`` is False for a class that could not be searched (no image of it is classified correctly by
    the original network); its logits are 0 and its masks empty. ``info`` holds the metadata written with it.
    """

    layers: list[GateLayer]
    classes: list[str]
    logits: list[Tensor]
    searched: Tensor
    info: dict = field(default_factory=dict)

    @property
    def masks(self) -> list[Tensor]:
        """b_l^c = [σ(m_l^c) > 0.5]: ``[T, C_l]`` bool per layer."""
        return [m > 0 for m in self.logits]  # σ(m) > 0.5  ⟺  m > 0

    def kept(self) -> np.ndarray:
        """Kept channels per class and layer, ``[T, L]``."""
        return np.stack([b.sum(1).numpy() for b in self.masks], 1)

    def save(self, folder: str | Path) -> None:
        """``masks.npz`` (``mask/<layer>`` bool, ``logits/<layer>`` float32 ``[T, C_l]``, ``searched``) and
        ``masks.json`` (layers, classes, threshold, kept channels, metadata), both written atomically."""
        folder = Path(folder)
        arrays = {"searched": self.searched.numpy(), "classes": np.array(self.classes)}
        for layer, m, b in zip(self.layers, self.logits, self.masks):
            arrays[f"mask/{layer.name}"] = b.numpy()
            arrays[f"logits/{layer.name}"] = m.float().numpy()
        atomic_save_npz(folder / "masks.npz", arrays)
        kept = self.kept()
        meta = {
            "layers": [asdict(layer) for layer in self.layers],
            "classes": self.classes,
            "searched": self.searched.tolist(),
            "threshold": THRESHOLD,
            "kept_channels": {c: dict(zip([layer.name for layer in self.layers], row)) for c, row in
                              zip(self.classes, kept.tolist())},
            **self.info,
        }
        atomic_write_text(folder / "masks.json", json.dumps(to_plain(meta), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "SubArchitectures":
        folder = Path(folder)
        if not (folder / "masks.npz").is_file() or not (folder / "masks.json").is_file():
            raise BranchspecError(f"{folder} holds no masks.npz and masks.json; run `branchspec nad search` first.")
        meta = json.loads((folder / "masks.json").read_text())
        layers = [GateLayer(d["name"], tuple(d["modules"]), tuple(d["widths"]), d["branches"]) for d in meta["layers"]]
        with np.load(folder / "masks.npz") as z:
            logits = [torch.from_numpy(z[f"logits/{layer.name}"]) for layer in layers]
            searched = torch.from_numpy(z["searched"])
        written = ("layers", "classes", "searched", "threshold", "kept_channels")
        info = {k: v for k, v in meta.items() if k not in written}
        return cls(layers, list(meta["classes"]), logits, searched, info)


def gate_values(logits: Sequence[Tensor], tasks: Tensor, binary: bool = False) -> list[Tensor]:
    """Per-sample gates: sample i gets task ``tasks[i]``'s σ(m) (search) or [σ(m) > 0.5] (``binary``)."""
    if binary:
        return [(m > 0).to(torch.float32)[tasks] for m in logits]
    return [torch.sigmoid(m)[tasks] for m in logits]


def nad_loss(gates: Gates, x: Tensor, y: Tensor, logits: Sequence[Tensor], beta: float, *,
             autocast: torch.autocast | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The NAD loss of every task on one stacked batch (Sec. 1.3 of reference/nad_method.md).

    ``x`` holds B images of each of the T tasks, task by task (``[T·B, ...]``), ``y`` their labels, ``logits``
    the gate logits ``[T, C_l]`` per layer. Returns ``loss [T]`` (differentiable in the logits), the terms
    ``[T, 3]`` (CE, Σ_l MSE, Σ_l mean σ²; detached) and ``n_correct [T]`` (the images of task t's batch that the
    original network classifies correctly; when there are none, the MSE term is 0 and the step skips t).
    """
    T = logits[0].shape[0]
    B = len(x) // T
    tasks = torch.arange(T, device=x.device).repeat_interleave(B)
    with autocast or nullcontext():
        with torch.no_grad():
            z0, a0 = gates.run(x)
        z, a = gates.run(x, gate_values(logits, tasks))
    correct = (z0.argmax(1) == y).view(T, B)
    n_correct = correct.sum(1)
    ce = F.cross_entropy(z.float(), y, reduction="none").view(T, B).mean(1)
    mse = torch.zeros(T, device=x.device)
    for act, act0 in zip(a, a0):
        se = (act.float() - act0.float()).pow(2).flatten(1).sum(1).view(T, B)  # per image
        mse = mse + (se * correct).sum(1) / (n_correct.clamp_min(1) * act[0].numel())
    sparsity = sum(torch.sigmoid(m).pow(2).mean(1) for m in logits)
    L = len(logits)
    loss = (ce + mse) / L + beta * sparsity / L
    return loss, torch.stack([ce, mse, sparsity], 1).detach(), n_correct


def normalized_step(logits: Sequence[Tensor], grads: Sequence[Tensor], lr: float, update: Tensor) -> None:
    """The authors' step (``F.normalize``): m_l^t ← m_l^t − lr · g_l^t / max(‖g_l^t‖, 1e-12), for each layer l
    and each task t with ``update[t]``; every updated layer moves by exactly lr (when g ≠ 0)."""
    with torch.no_grad():
        for m, g in zip(logits, grads):
            step = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            m.sub_(lr * step * update[:, None])


def initial_logits(layers: Sequence[GateLayer], classes: Sequence[int], seed: int) -> list[Tensor]:
    """m ~ N(0, 1), drawn on the CPU from ``(seed, class)`` alone: ``[len(classes), C_l]`` per layer."""
    rows = []
    for c in classes:
        g = torch.Generator().manual_seed(_mix(seed, c, 0x6A7E))
        rows.append([torch.randn(layer.channels, generator=g) for layer in layers])
    return [torch.stack([r[i] for r in rows]) for i in range(len(layers))]


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def class_batch(index: Tensor, seed: int, cls: int, step: int, batch_size: int) -> Tensor:
    """The ``batch_size`` indices of class ``cls`` at ``step``: its images in an endless sequence of random
    permutations (one per pass, drawn from ``(seed, class, pass)``), read ``batch_size`` at a time."""
    n = len(index)
    positions = step * batch_size + torch.arange(batch_size)
    passes = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for p in passes.unique().tolist():
        sel = passes == p
        out[sel] = index[_permutation(n, seed, cls, p)[positions[sel] % n]]
    return out


@functools.lru_cache(maxsize=8192)
def _permutation(n: int, seed: int, cls: int, p: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, cls, p, 0xBA7C)))


def _augment(x: Tensor, seed: int, cls: int, step: int, settings: SearchSettings) -> Tensor:
    """The classifier's training augmentation, drawn from ``(seed, class, step)``; zero padding is the mean
    colour here, since the images are already normalized."""
    if not settings.crop_padding and not settings.flip:
        return x
    from branchspec.train.classify import augment

    g = torch.Generator(device=x.device).manual_seed(_mix(seed, cls, step, 0xA06))
    return augment(x, g, settings.crop_padding, settings.flip)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, *, batch_size: int = 500, device="cpu", gates: Gates | None = None,
            values: Sequence[Tensor] | None = None, autocast: torch.autocast | None = None,
            desc: str | None = None) -> Tensor:
    """The model's predicted classes for ``images`` (in batches), optionally under ``gates`` with ``values``
    of shape ``[N, C_l]`` (one row per image); ``desc`` shows a progress bar with that label."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
        x = images[i:i + batch_size].to(device)
        with autocast or nullcontext():
            if gates is None:
                z = model(x)
            else:
                z = gates.run(x, None if values is None else [v[i:i + batch_size].to(device) for v in values])[0]
        out.append(z.argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def search(model: nn.Module, images: Tensor, labels: Tensor, *, classes: Sequence[str],
           layers: Sequence[GateLayer], settings: SearchSettings | None = None, tasks: Sequence[int] | None = None,
           device="cpu", precision: str = "32-true", state_path: str | Path | None = None,
           show_progress: bool = True) -> SubArchitectures:
    """Search the sub-architecture of every class (or of ``tasks``) of a frozen classifier.

    ``images`` are the normalized search images ``[N, C, H, W]`` (the training split in the paper), ``labels``
    their classes. ``state_path``: a file where the search state is saved every ``checkpoint_every`` steps and
    from which it resumes. ``precision``: ``"32-true"`` or ``"bf16-mixed"`` (autocast of the forward passes).
    """
    settings = (settings or SearchSettings()).check()
    T = len(classes)
    tasks = list(range(T)) if tasks is None else sorted({int(t) for t in tasks})
    if not tasks or tasks[0] < 0 or tasks[-1] >= T:
        raise BranchspecError(f"classes to search must lie in 0..{T - 1}, got {tasks}.")
    if len(images) != len(labels) or len(images) == 0:
        raise BranchspecError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}.")
    device = torch.device(device)
    autocast = precision_context(device, precision)
    model = model.eval().to(device)

    # which images the original network classifies correctly is seen on the search batches themselves (the MSE
    # term uses them only): no pass over the whole split first
    index = {c: torch.nonzero(labels.cpu() == c).flatten() for c in tasks}
    searchable = [c for c in tasks if len(index[c]) > 0]
    total = settings.total_steps(max([len(index[c]) for c in searchable], default=1))
    pass_size = settings.classes_per_pass or max(1, len(searchable))

    state = _load_state(state_path, layers, T, settings, total)
    logits = state["logits"]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with Gates(model, layers) as gates, tqdm(total=total * len(searchable), desc="nad search", unit="class-step",
                                                 disable=not show_progress) as bar:
            pass_size = _search_in_passes(gates, searchable, pass_size, images, labels, index, state, settings, total,
                                          device, autocast, state_path, bar)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    # a class none of whose search batches held a correctly classified image was never updated: not searched
    unsearched = [c for c in tasks if state["updates"][c] == 0]
    for c in unsearched:
        for m in logits:
            m[c] = 0.0
    searched = torch.zeros(T, dtype=torch.bool)
    searched[[c for c in tasks if c not in unsearched]] = True
    info = {
        "settings": asdict(settings), "steps": total, "precision": precision, "classes_per_pass": pass_size,
        "search_images": {classes[c]: len(index[c]) for c in tasks},
        "search_batches_correct": {classes[c]: state["correct"][c] / max(1, state["seen"][c]) for c in tasks},
        "classes_without_correct": [classes[c] for c in unsearched],
        "updates": {classes[c]: int(state["updates"][c]) for c in tasks},
        "history": {classes[c]: state["history"].get(c, []) for c in searchable},
    }
    return SubArchitectures(list(layers), list(classes), [m.clone() for m in logits], searched, info)


def _search_in_passes(gates, searchable, pass_size, images, labels, index, state, settings, total, device,
                      autocast, state_path, bar) -> int:
    """Search ``searchable`` classes ``pass_size`` at a time; a pass that runs out of memory is redone as smaller
    passes (the result does not depend on the pass size). Returns the pass size that fitted."""
    logits = state["logits"]
    start = 0
    while start < len(searchable):
        group = searchable[start:start + pass_size]
        saved = copy.deepcopy({k: state[k] for k in ("steps_done", "updates", "history", "adam", "correct", "seen")})
        saved_rows = [m[group].clone() for m in logits]
        bar.n = int(sum(min(state["steps_done"][c], total) for c in searchable))
        try:
            _search_group(gates, group, images, labels, index, logits, state, settings, total, device, autocast,
                          state_path, bar)
        except torch.OutOfMemoryError:
            if pass_size == 1:
                raise BranchspecError("out of memory with one class per pass; lower `batch_size` or use "
                                      "`precision` bf16-mixed.") from None
            state.update(saved)  # back to where this pass began, then the same work in smaller passes
            for m, rows in zip(logits, saved_rows):
                m[group] = rows
            pass_size = max(1, pass_size // 2)
            warnings.warn(f"out of memory with {len(group)} classes per pass; going on with {pass_size}.",
                          stacklevel=3)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += len(group)
    return pass_size


def precision_context(device: torch.device, precision: str) -> torch.autocast:
    """Autocast of the forward passes: bf16 for ``"bf16-mixed"``, off for ``"32-true"``."""
    if precision not in ("32-true", "bf16-mixed"):
        raise BranchspecError(f"precision must be '32-true' or 'bf16-mixed', got {precision!r}.")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _search_group(gates, group, images, labels, index, logits, state, settings, total, device, autocast,
                  state_path, bar) -> None:
    """Search the classes of ``group`` together, from the step where they stopped to ``total``."""
    begin = min(state["steps_done"][c] for c in group)
    if begin >= total:
        return
    rows = torch.tensor(group)
    m = [x[rows].to(device).requires_grad_(True) for x in logits]
    opt = None
    if settings.optimizer == "adam":
        opt = torch.optim.Adam(m, lr=settings.lr)
        if state.get("adam") and state["adam"]["group"] == group:
            opt.load_state_dict(state["adam"]["state"])
    record_every = max(1, total // 100)
    done = torch.tensor([state["steps_done"][c] for c in group])
    last_save = time.monotonic()
    with StopRequest() as stop:
        for step in range(begin, total):
            _search_step(gates, group, images, labels, index, m, opt, state, settings, total, device, autocast, done,
                         step, record_every)
            bar.update(len(group))
            due = (step + 1) % settings.checkpoint_every == 0 or step == total - 1 or stop.requested or (
                time.monotonic() - last_save >= 60 * CHECKPOINT_MINUTES)
            if state_path is not None and due:
                for x_all, p in zip(logits, m):
                    x_all[rows] = p.detach().float().cpu()
                state["adam"] = {"group": group, "state": opt.state_dict()} if opt is not None else None
                atomic_torch_save(state, state_path)
                last_save = time.monotonic()
            if stop.requested:
                raise Interrupted(f"interrupted after step {step + 1} of the search"
                                  + (f"; its state is saved in {state_path}: run the same command again to resume it."
                                     if state_path is not None else "."))
    for x_all, p in zip(logits, m):
        x_all[rows] = p.detach().float().cpu()


def _search_step(gates, group, images, labels, index, m, opt, state, settings, total, device, autocast, done, step,
                 record_every) -> None:
    """One step of the search of ``group``: the loss on a batch of every class, the gates' update, the state."""
    B = settings.batch_size
    batch = torch.cat([class_batch(index[c], settings.seed, c, step, B) for c in group])
    x = images[batch.to(images.device)].to(device)
    x = torch.cat([_augment(x[i * B:(i + 1) * B], settings.seed, c, step, settings) for i, c in enumerate(group)])
    y = labels[batch.to(labels.device)].to(device)
    loss, terms, n_correct = nad_loss(gates, x, y, m, settings.beta, autocast=autocast)
    ok = (n_correct > 0) & (done <= step).to(n_correct.device)  # after a resume, a class further along waits
    grads = torch.autograd.grad(loss.sum(), m)
    if opt is None:
        normalized_step(m, grads, settings.lr, ok.to(m[0].dtype))
    else:
        before = [p.detach().clone() for p in m]
        for p, g in zip(m, grads):
            p.grad = g * ok[:, None]
        opt.step()
        with torch.no_grad():
            for p, b in zip(m, before):
                p[~ok] = b[~ok]  # a skipped task keeps its gates
    record = step % record_every == 0 or step == total - 1
    kept = torch.stack([(p > 0).float().mean(1) for p in m], 1).mean(1) if record else None
    for i, c in enumerate(group):
        if done[i] > step:
            continue
        state["steps_done"][c] = step + 1
        state["updates"][c] += int(ok[i])
        state["correct"][c] += int(n_correct[i])
        state["seen"][c] += B
        if record:
            row = [step, float(loss[i].detach()), *terms[i].tolist(), float(kept[i])]
            state["history"].setdefault(c, []).append(row)


HISTORY_COLUMNS = ("step", "loss", "ce", "mse", "sparsity", "kept_fraction")


def _load_state(path, layers, num_classes: int, settings: SearchSettings, total: int) -> dict:
    """The saved search state, or a fresh one (initial logits for every class)."""
    fresh = {
        "layers": [layer.name for layer in layers], "channels": [layer.channels for layer in layers],
        "total": total, "seed": settings.seed,
        "logits": initial_logits(layers, range(num_classes), settings.seed),
        "steps_done": [0] * num_classes, "updates": [0] * num_classes, "history": {}, "adam": None,
        "correct": [0] * num_classes, "seen": [0] * num_classes,  # images of the search batches (correct, all)
    }
    if path is None or not Path(path).is_file():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise BranchspecError(f"cannot read the search state {path} ({err}); delete it to start the search "
                              "over.") from None
    same = all(state.get(k) == fresh[k] for k in ("layers", "channels", "total", "seed"))
    if not same or len(state["steps_done"]) != num_classes:
        raise BranchspecError(f"the search state {path} belongs to another search (layers, length or seed differ); "
                              "choose another output folder or delete it.")
    return state
