"""Small real datasets and models for the demo, tests and benchmarks (no downloads)."""
from __future__ import annotations

import gzip
import os
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def digits(seed: int = 0, test_fraction: float = 0.25) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as (train, test) datasets,
    images scaled to [0, 1] with shape [1, 8, 8], split with a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def fashion_mnist(root: str = FASHION_DIR) -> Tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package as (train, test)."""
    def read(name, images):
        for cand in (name, name.replace("-idx", ".idx")):
            p = os.path.join(root, cand)
            for path in (p, p + ".gz"):
                if os.path.exists(path):
                    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
                        data = f.read()
                    arr = np.frombuffer(data, dtype=np.uint8, offset=16 if images else 8)
                    return arr.reshape(-1, 1, 28, 28) if images else arr
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}: run `apt-get install -y dataset-fashion-mnist`")

    def ds(prefix):
        x = torch.tensor(read(f"{prefix}-images-idx3-ubyte", True).copy(), dtype=torch.float32)
        y = torch.tensor(read(f"{prefix}-labels-idx1-ubyte", False).copy(), dtype=torch.int64)
        return TensorDataset((x / 255.0 - 0.2860) / 0.3530, y)

    return ds("train"), ds("t10k")


class SmallCNN(nn.Module):
    """The 3-conv CNN used by the demo and the Fashion-MNIST benchmark."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, widths=(32, 64, 128), hidden=128,
                 early_pool: bool = False):
        super().__init__()
        a, b, c = widths
        # early_pool halves the resolution after the first conv (cheap on 28x28 inputs).
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(),
            nn.MaxPool2d(2) if early_pool else nn.Identity(),
            nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * 4, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def train(model: nn.Module, data, epochs: int, lr: float = 2e-3, batch_size: int = 64,
          seed: int = 0, progress: bool = False) -> nn.Module:
    """Adam training with a seeded shuffle; returns the model (trained in place)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc="training", disable=not progress, leave=False):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 512) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(1, total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
