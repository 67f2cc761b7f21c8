"""``fair-pruner demo``: a small CNN trained on sklearn's bundled digits, pruned, reported.

By default the CNN is the trained checkpoint shipped with the package
(``fair_pruner/demo_cnn.safetensors``, 12 epochs from seed 0 on one thread, stored in fp16); the
demo then scores, prunes, reconstructs and fine-tunes it in seconds. ``--train`` (or a
``--seed``/``--epochs`` other than the checkpoint's) trains it from scratch instead, and
``fair-pruner demo --train --save-model fair_pruner/demo_cnn.safetensors`` rebuilds the shipped
file.

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
    d.add_argument("--train", action="store_true",
                   help="train the CNN from scratch instead of loading the trained checkpoint "
                        "shipped with the package")
    d.add_argument("--epochs", type=int, default=None,
                   help="training epochs with --train (default 12, the checkpoint's; giving it "
                        "implies --train)")
    d.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after pruning")
    d.add_argument("--calib", type=int, default=640, help="calibration images (default 640)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split, training and calibration (default 0, "
                        "the checkpoint's; another seed implies --train)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a model this small one thread is faster "
                        "than several, most of all on shared cores)")
    d.add_argument("--save-model", metavar="FILE", dest="save_model",
                   help="write the dense trained CNN as a demo checkpoint (.safetensors, fp16)")
    d.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of kept ratios")
    d.add_argument("--save-book", metavar="FILE", help="write the score book (.safetensors)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars or output")


def run(args) -> int:
    import torch

    from fair_pruner.errors import FairPrunerError

    if args.threads < 1:
        raise FairPrunerError(f"--threads {args.threads}: give a number of threads >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)        # the caller's setting (run() may be called in-process)


def _run(args) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    import fair_pruner as fp
    from fair_pruner import data

    say = print if not args.quiet else (lambda *a, **k: None)
    t0 = time.perf_counter()
    train, test = data.digits(seed=args.seed)
    say(f"data: sklearn digits, {len(train)} train / {len(test)} test images (8x8, 10 classes)")
    recipe = dict(data.DEMO_RECIPE, seed=args.seed, threads=args.threads)
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    why = ("--train" if args.train else "--epochs" if args.epochs is not None
           else f"--seed {args.seed}" if args.seed != data.DEMO_RECIPE["seed"] else None)
    if why is None:
        model, recipe = data.load_demo_checkpoint()
        say(f"model: the shipped trained checkpoint ({recipe['epochs']} epochs, seed "
            f"{recipe['seed']}; --train to train it here)")
    else:
        t1 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = data.demo_model(**recipe)
        data.train(model, train, epochs=recipe["epochs"], lr=recipe["lr"],
                   batch_size=recipe["batch_size"], seed=args.seed, progress=not args.quiet)
        say(f"model: trained from scratch ({why}): {recipe['epochs']} epochs in "
            f"{time.perf_counter() - t1:.1f} s")
    torch.manual_seed(args.seed)
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
    if args.save_model:
        data.save_demo_checkpoint(model, args.save_model, recipe)
        say(f"wrote {args.save_model}")
    return 0
