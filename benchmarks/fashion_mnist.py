"""ToD vs uniform allocation on a real dataset: Fashion-MNIST, the 3-conv CNN.

Trains the CNN (seeded), scores it once on 640 training images, then for 30/50/70% of the
parameters removed prunes with ToD and with uniform allocation (same U-Score, same book) and
reports test accuracy one-shot (no fine-tuning) and after one epoch of fine-tuning.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/fashion_mnist.py [--epochs 2] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch.utils.data import DataLoader, Subset

import fair_pruner as fp
from fair_pruner import data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--calib", type=int, default=640)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train, test = data.fashion_mnist()
    t0 = time.perf_counter()
    model = data.SmallCNN(in_ch=1, num_classes=10, widths=tuple(args.widths), hidden=args.hidden,
                          early_pool=True)
    data.train(model, train, epochs=args.epochs, lr=2e-3, batch_size=128, seed=args.seed)
    t_train = time.perf_counter() - t0
    dense_acc = data.accuracy(model, test)
    print(f"dense: {data.count_params(model):,} params, test acc {dense_acc:.2%} "
          f"({args.epochs} epochs, {t_train:.0f} s)")

    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(train), generator=g)[:args.calib].tolist()
    calib = DataLoader(Subset(train, idx), batch_size=64)
    t0 = time.perf_counter()
    book = fp.score(model, calib, seed=args.seed, progress=False)
    t_score = time.perf_counter() - t0
    print(f"score: {t_score:.2f} s on {book.meta['calibration_samples']} images, "
          f"{len(book.groups)} groups")

    rows = []
    for target in args.targets:
        for strategy in ("tod", "uniform"):
            plan = fp.allocate(book, params=target, strategy=strategy)
            pruned = fp.prune(model, plan)
            one_shot = data.accuracy(pruned, test)
            tuned = copy.deepcopy(pruned)
            data.train(tuned, train, epochs=args.finetune_epochs, lr=1e-3, batch_size=128,
                       seed=args.seed + 1)
            ft = data.accuracy(tuned, test)
            rows.append({"target": target, "strategy": strategy, "alpha": plan.alpha,
                         "params_removed": plan.params_reduction,
                         "macs_removed": plan.flops_reduction, "one_shot": one_shot,
                         "finetuned": ft, "kept_ratios": plan.ratios})
            print(f"{target:.0%} {strategy:8s} params -{plan.params_reduction:.1%} "
                  f"MACs -{plan.flops_reduction:.1%}  one-shot {one_shot:.2%}  "
                  f"+{args.finetune_epochs} ep {ft:.2%}  kept "
                  + " ".join(f"{r:.2f}" for r in plan.ratios.values()))

    print("\n| params removed (target) | allocation | params removed | MACs removed | "
          "one-shot acc | + 1 epoch FT | kept ratio per group |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']:.0%} | {r['strategy']} | {r['params_removed']:.1%} | "
              f"{r['macs_removed']:.1%} | {r['one_shot']:.2%} | {r['finetuned']:.2%} | "
              + " / ".join(f"{v:.2f}" for v in r["kept_ratios"].values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_acc": dense_acc, "score_seconds": t_score, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
