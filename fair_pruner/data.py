"""Small real datasets and models for the demo, tests and benchmarks (no downloads)."""
from __future__ import annotations

import gzip
import os
import json
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
# The demo's trained SmallCNN (package data; written by `fair-pruner demo --train --save-model`).
DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_cnn.safetensors")
DEMO_RECIPE = {"data": "digits", "seed": 0, "epochs": 12, "lr": 2e-3, "batch_size": 64,
               "threads": 1, "widths": [32, 64, 128], "hidden": 128}


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


def demo_model(**recipe) -> nn.Module:
    """A fresh (untrained) SmallCNN for the digits demo, seeded by ``recipe["seed"]``."""
    r = {**DEMO_RECIPE, **recipe}
    torch.manual_seed(r["seed"])
    return SmallCNN(in_ch=1, num_classes=10, widths=tuple(r["widths"]), hidden=r["hidden"])


def train_demo_model(train_set=None, **recipe) -> nn.Module:
    """Train the demo's SmallCNN from scratch on the digits training split (``train_set``:
    ``digits(seed)[0]``, given or loaded), as the shipped checkpoint was (``DEMO_RECIPE``; one
    thread, so the result does not depend on the core count)."""
    r = {**DEMO_RECIPE, **recipe}
    threads = torch.get_num_threads()
    torch.set_num_threads(r["threads"])
    try:
        model = demo_model(**r)
        train_set = train_set if train_set is not None else digits(seed=r["seed"])[0]
        train(model, train_set, epochs=r["epochs"], lr=r["lr"],
              batch_size=r["batch_size"], seed=r["seed"])
    finally:
        torch.set_num_threads(threads)
    return model


def save_demo_checkpoint(model: nn.Module, path: str, recipe: Optional[Dict[str, Any]] = None
                         ) -> None:
    """Write ``model``'s weights as a demo checkpoint: safetensors, floating tensors as fp16
    (~320 KB), the training recipe in the header. Written atomically, mode 0o666 & ~umask."""
    from safetensors.torch import save_file

    from .scorebook import atomic_write

    tensors = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
               .contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "fair_pruner.demo_cnn", "recipe": json.dumps(recipe or DEMO_RECIPE),
            "torch": torch.__version__}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_demo_checkpoint(path: str = DEMO_CHECKPOINT) -> Tuple[nn.Module, Dict[str, Any]]:
    """(the trained SmallCNN in fp32, eval mode; its training recipe) from a demo checkpoint."""
    from safetensors import safe_open

    from .errors import FairPrunerError

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise FairPrunerError(f"cannot read the demo checkpoint {path} ({exc}); run "
                              "`fair-pruner demo --train` to train the model instead") from exc
    if meta.get("format") != "fair_pruner.demo_cnn":
        raise FairPrunerError(f"{path} is not a fair_pruner demo checkpoint (write one with "
                              "`fair-pruner demo --train --save-model FILE`)")
    recipe = {**DEMO_RECIPE, **json.loads(meta.get("recipe", "{}"))}
    model = demo_model(**recipe)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()})
    return model.eval(), recipe


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
