"""Shared by the NAD tests: a small torchvision-style ResNet (as a user would bring it), tiny image data, and a
trained copy of the model. Nothing is downloaded; everything is made here."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

@contextmanager
def one_thread():
    """Tiny tensors: one thread avoids contention with other jobs on the two shared cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def single_thread():
    """Imported by the NAD test modules: every test runs on one thread."""
    with one_thread():
        yield


# A user's model file: torchvision's module names (conv1, bn1, layer1.0, ..., fc), written to disk by the tests
# that go through `--model FILE.py:make`.
MODEL_SOURCE = '''
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=4, width=6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make():
    torch.manual_seed(0)
    return TinyResNet()
'''

CLASSES = ["red", "green", "blue", "stripes"]
SIZE = 12


def write_model(folder: Path) -> Path:
    path = Path(folder) / "tiny_resnet.py"
    path.write_text(MODEL_SOURCE)
    return path


def images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[N, 3, S, S]`` of four classes told apart by colour and texture, and their labels."""
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for c in range(len(CLASSES)):
        for _ in range(per_class):
            img = rng.uniform(0, 90, (3, SIZE, SIZE))
            if c < 3:
                img[c] += rng.uniform(120, 160)
            else:
                img[:, ::3] += 150
            out.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return torch.from_numpy(np.stack(out)), torch.tensor(labels)


def normalize(u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (u8.float() / 255 - mean) / std


def write_image_tree(root: Path, per_class: dict[str, int]) -> Path:
    """ROOT/{train,test}/<class>/*.png of the images above."""
    from PIL import Image

    for i, (split, n) in enumerate(per_class.items()):
        u8, labels = images(n, seed=10 + i)
        for k, (img, y) in enumerate(zip(u8, labels)):
            folder = root / split / CLASSES[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{k:03d}.png")
    return root


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 120, seed: int = 0):
    """A few Adam steps of plain CE; the model is returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
