"""A small transformer classifier, and a synthetic sequence task it solves with attention (the heads demo).

The task (:func:`marker_task`): a sequence of ``length`` tokens over ``vocab`` symbols holds one marker token (0)
somewhere before the end; the label is the token right after the marker. Solving it needs attention: find
the marker, then read the token next to it.

:class:`TinyTransformer`: token and position embeddings, ``layers`` pre-norm blocks of ``nn.MultiheadAttention``
(``heads`` heads, batch-first) and an MLP, then a linear read-out of the mean over positions. Its attention
modules are named ``blocks.<i>.attention`` (the sites of :class:`branchspec.parts.AttentionHeads`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 8, length: int = 8, d_model: int = 32, heads: int = 4, layers: int = 2,
                 num_classes: int | None = None):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Parameter(torch.randn(length, d_model) * 0.1)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes or vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tokens(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def marker_task(n: int, vocab: int = 8, length: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``[n, length]`` of tokens 1..vocab−1 with one marker (0) at a random position before the
    last, and their labels: the token after the marker."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=g)
    where = torch.randint(0, length - 1, (n,), generator=g)
    x[torch.arange(n), where] = 0
    return x, x[torch.arange(n), where + 1]


def train_tiny_transformer(steps: int = 400, seed: int = 0, **kw) -> tuple[TinyTransformer, dict]:
    """A TinyTransformer trained on :func:`marker_task` (Adam, batch 128): the model and its accuracies."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyTransformer(**kw)
    vocab, length = kw.get("vocab", 8), kw.get("length", 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y = marker_task(128, vocab, length, seed=seed * 100_003 + step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    x, y = marker_task(1024, vocab, length, seed=-1 - seed)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return model, {"test_accuracy": acc, "steps": steps}
