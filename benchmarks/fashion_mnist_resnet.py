"""Does ToD help on a deep network? A CIFAR-style ResNet-20 on Fashion-MNIST (issue 12 item 6).

Per seed: train a ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64, 1x1-conv shortcuts at
the stride-2 stages, 28x28 inputs) with Adam on a seeded training subset; score it once (640
training images, reconstruction statistics on); then for each target (30 / 50 / 70% of the
parameters, and 50% of the MACs) compare
  tod        fp.allocate(book, target)                     (default: ToD over the U-Score)
  uniform    the same fraction of every group, same U ranking inside a group
  magnitude  the same fraction of every group, lowest L1 weight norm first
each one-shot and after a short fine-tune, without and with weight reconstruction
(``fp.prune(..., book=book, reconstruct="affine")``), test accuracy on a fixed test subset.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/fashion_mnist_resnet.py [--seeds 0 1 2] [--json out.json]

Prints one table row per (target, allocation, reconstruction): mean and spread (min-max) over
the seeds. Bounded for 2 CPU cores: the defaults take about half an hour there.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import fair_pruner as fp
from fair_pruner import data


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=3, num_classes=10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


STRATEGIES = {"tod": {}, "uniform": {"strategy": "uniform"},
              "magnitude": {"strategy": "uniform", "signal": "l1"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train", type=int, default=20000, help="training images per seed")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--test", type=int, default=2000, help="test images (fixed subset)")
    ap.add_argument("--calib", type=int, default=640)
    ap.add_argument("--ft-images", type=int, default=4000, help="fine-tune: one epoch over these")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--macs-target", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train_all, test_all = data.fashion_mnist()
    test = Subset(test_all, list(range(a.test)))
    rows, dense = [], []
    t_start = time.perf_counter()
    for seed in a.seeds:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train_all), generator=g).tolist()
        train = Subset(train_all, perm[:a.train])
        torch.manual_seed(seed)
        model = ResNet20()
        t0 = time.perf_counter()
        data.train(model, train, epochs=a.epochs, lr=2e-3, batch_size=128, seed=seed)
        acc0 = data.accuracy(model, test)
        dense.append(acc0)
        calib = DataLoader(Subset(train_all, perm[a.train:a.train + a.calib]), batch_size=64)
        book = fp.score(model, calib, seed=seed, progress=False, reconstruction=True)
        print(f"seed {seed}: dense {data.count_params(model):,} params, acc {acc0:.2%} "
              f"(train {time.perf_counter() - t0:.0f} s), {len(book.groups)} groups", flush=True)
        ft = Subset(train_all, perm[:a.ft_images])
        targets = [("params", t) for t in a.targets] + [("flops", a.macs_target)]
        for kind, t in targets:
            for sname, kw in STRATEGIES.items():
                plan = fp.allocate(book, **{kind: t}, **kw)
                for rec in (None, "affine"):
                    pruned = fp.prune(model, plan, book=book, reconstruct=rec)
                    one = data.accuracy(pruned, test)
                    tuned = data.train(copy.deepcopy(pruned), ft, epochs=1, lr=1e-3,
                                       batch_size=128, seed=seed + 1)
                    after = data.accuracy(tuned, test)
                    rows.append({"seed": seed, "target": f"{kind}={t:.0%}", "allocation": sname,
                                 "reconstruct": rec or "none", "one_shot": one,
                                 "finetuned": after, "params_removed": plan.params_reduction,
                                 "macs_removed": plan.flops_reduction})
                    print(f"  {kind}={t:.0%} {sname:9s} rec={rec or 'none':6s} params "
                          f"-{plan.params_reduction:.1%} MACs -{plan.flops_reduction:.1%} "
                          f"one-shot {one:.2%} +FT {after:.2%}", flush=True)
    print(f"\n{len(a.seeds)} seeds in {time.perf_counter() - t_start:.0f} s; dense accuracy "
          f"{statistics.mean(dense):.2%} ({min(dense):.2%}-{max(dense):.2%})\n")
    print("| target | allocation | reconstruct | params removed | MACs removed | one-shot acc "
          "(min-max) | + FT acc (min-max) |")
    print("|---|---|---|---:|---:|---|---|")
    keys = []
    for r in rows:
        k = (r["target"], r["allocation"], r["reconstruct"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in rows if (r["target"], r["allocation"], r["reconstruct"]) == k]

        def cell(f):
            v = [r[f] for r in rs]
            return f"{statistics.mean(v):.2%} ({min(v):.2%}-{max(v):.2%})"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {statistics.mean(r['params_removed'] for r in rs):.1%}"
              f" | {statistics.mean(r['macs_removed'] for r in rs):.1%} | {cell('one_shot')} | "
              f"{cell('finetuned')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dense": dense, "rows": rows, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
