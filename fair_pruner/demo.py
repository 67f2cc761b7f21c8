"""``fair-pruner demo``: train a small CNN on sklearn's bundled digits, prune it, report.

The command line (fair_pruner/cli.py) calls :func:`add_arguments` to build the ``demo``
subparser and :func:`run` to execute it. Heavy imports (torch, the package) happen inside
:func:`run` so ``fair-pruner --help`` stays fast.
"""
from __future__ import annotations

import time


def add_arguments(d) -> None:
    """Add the demo's options to the argparse (sub)parser ``d``."""
    d.add_argument("--params", type=float, default=0.5,
                   help="fraction of parameters to remove (default 0.5)")
    d.add_argument("--tod", type=float, default=None,
                   help="use this tolerance alpha in [0, 1] instead of a parameter target")
    d.add_argument("--strategy", choices=("tod", "uniform"), default="tod",
                   help="allocation: ToD (default) or uniform (same fraction per group)")
    d.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    d.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after pruning")
    d.add_argument("--calib", type=int, default=640, help="calibration images (default 640)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of kept ratios")
    d.add_argument("--save-book", metavar="FILE", help="write the score book (.safetensors)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars or output")


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    import fair_pruner as fp
    from fair_pruner import data

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    say = print if not args.quiet else (lambda *a, **k: None)
    t0 = time.perf_counter()
    train, test = data.digits(seed=args.seed)
    say(f"data: sklearn digits, {len(train)} train / {len(test)} test images (8x8, 10 classes)")
    model = data.SmallCNN(in_ch=1, num_classes=10, widths=(32, 64, 128), hidden=128)
    data.train(model, train, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    acc0 = data.accuracy(model, test)
    p0 = data.count_params(model)

    calib = Subset(train, list(range(min(args.calib, len(train)))))
    book = fp.score(model, DataLoader(calib, batch_size=64), seed=args.seed,
                    progress=not args.quiet, reconstruction=True)
    if args.tod is not None:
        plan = fp.allocate(book, tod=args.tod, strategy="tod")
    else:
        plan = fp.allocate(book, params=args.params, strategy=args.strategy)
    pruned = fp.prune(model, plan, reconstruct=None)
    acc1 = data.accuracy(pruned, test)
    p1 = data.count_params(pruned)
    rebuilt = fp.prune(model, plan, book=book)       # + affine least-squares reconstruction
    acc_r = data.accuracy(rebuilt, test)
    data.train(pruned, train, epochs=args.finetune, lr=1e-3, seed=args.seed)
    acc2 = data.accuracy(pruned, test)

    say("")
    say(plan.table())
    say("")
    say(f"{'':22}{'params':>10}{'MACs':>12}{'test acc':>10}")
    say(f"{'dense':22}{p0:>10,}{plan.flops_before:>12,}{acc0:>10.2%}")
    say(f"{'pruned (one-shot)':22}{p1:>10,}{plan.flops_after:>12,}{acc1:>10.2%}")
    say(f"{'  + reconstruction':22}{data.count_params(rebuilt):>10,}{'':>12}{acc_r:>10.2%}")
    say(f"{f'pruned + {args.finetune} ep fine-tune':22}{p1:>10,}{plan.flops_after:>12,}"
        f"{acc2:>10.2%}")
    say(f"calibration {book.meta['seconds']:.2f} s on {book.meta['calibration_samples']} images;"
        f" total {time.perf_counter() - t0:.1f} s")
    if args.plot:
        plan.plot(args.plot, title=f"FAIR-Pruner demo: kept ratio per group "
                                   f"(params -{plan.params_reduction:.0%})")
        say(f"wrote {args.plot}")
    if args.save_book:
        book.save(args.save_book)
        say(f"wrote {args.save_book}")
    return 0
