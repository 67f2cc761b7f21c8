"""Command line: ``fair-pruner demo | allocate | prune-lm``."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional


def _demo(args) -> int:
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


def _allocate(args) -> int:
    import fair_pruner as fp

    book = fp.ScoreBook.load(args.book)
    kw = {k: getattr(args, k) for k in ("params", "flops", "units") if getattr(args, k) is not None}
    plan = fp.allocate(book, tod=args.tod, strategy=args.strategy, round_to=args.round_to, **kw)
    print(plan.table())
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        plan.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _prune_lm(args) -> int:
    try:
        from fair_pruner.llm import cli_prune_lm
    except ImportError as exc:
        print(f"prune-lm needs the LLM extras: pip install -e '.[llm]' ({exc})", file=sys.stderr)
        return 2
    return cli_prune_lm(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-pruner",
        description="FAIR-Pruner: automatic layer-wise structured pruning via Tolerance of "
                    "Difference (arXiv 2508.02291).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small CNN on bundled real data (sklearn digits), "
                                    "prune it with ToD and report before/after",
                       description="Train a small CNN on sklearn's bundled digits, score it on "
                                   "calibration images, prune it to a parameter target with ToD "
                                   "and print accuracy, params, MACs and the per-group table.")
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
    d.set_defaults(func=_demo)

    a = sub.add_parser("allocate", help="re-plan from a saved score book (no recalibration)",
                       description="Load a score book and print the plan for a tolerance or "
                                   "a target; optionally save the plan (JSON) and a plot.")
    a.add_argument("book", help="score book file (.safetensors) from fp.ScoreBook.save")
    a.add_argument("--tod", type=float, default=None, help="tolerance alpha in [0, 1]")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--params", type=float, help="fraction of parameters to remove")
    g.add_argument("--flops", type=float, help="fraction of MACs to remove")
    g.add_argument("--units", type=float, help="fraction of prunable units to remove")
    a.add_argument("--strategy", choices=("tod", "uniform"), default="tod")
    a.add_argument("--round-to", type=int, default=1, dest="round_to")
    a.add_argument("--out", metavar="FILE", help="write the plan as JSON")
    a.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of kept ratios")
    a.set_defaults(func=_allocate)

    lm = sub.add_parser("prune-lm", help="prune a Hugging Face causal LM (MLP neurons, heads)",
                        description="Calibrate a causal LM on a text file, allocate with ToD "
                                    "and save the pruned model with fp.save_pretrained.")
    lm.add_argument("model", help="a transformers model directory or a .gguf file")
    lm.add_argument("--calib-text", required=True, metavar="FILE", help="calibration text file")
    t = lm.add_mutually_exclusive_group()
    t.add_argument("--params", type=float, help="fraction of MLP+attention params to remove")
    t.add_argument("--tod", type=float, help="tolerance alpha in [0, 1]")
    lm.add_argument("--out", required=True, metavar="DIR", help="output directory")
    lm.add_argument("--seq-len", type=int, default=512, dest="seq_len")
    lm.add_argument("--num-seqs", type=int, default=64, dest="num_seqs")
    lm.add_argument("--round-to", type=int, default=1, dest="round_to")
    lm.add_argument("--reconstruct", choices=("auto", "affine", "lstsq", "bias", "none"),
                    default="auto",
                    help="update each down_proj / o_proj after removal from the calibration "
                         "statistics: affine (least squares with a bias), lstsq (without), bias "
                         "(FLAP's mean compensation), none; auto (default): affine when the "
                         "Gram matrices fit in --gram-memory, else bias")
    lm.add_argument("--gram-memory", type=float, default=4.0, dest="gram_memory", metavar="GIB",
                    help="memory budget for the reconstruction Gram matrices (default 4 GiB)")
    lm.add_argument("--strategy", choices=("tod", "uniform", "global"), default="tod",
                    help="tod (default), uniform (same fraction per group) or global (FLAP)")
    lm.add_argument("--signal", default=None,
                    help="removal signal (default: the book's recommendation per unit kind); "
                         "u, wanda, fluctuation, obs, taylor, activation, l1, l2, random")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of kept ratios")
    lm.add_argument("-q", "--quiet", action="store_true")
    lm.set_defaults(func=_prune_lm)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a clear one-line error for bad input, not a traceback
        from fair_pruner.errors import FairPrunerError
        if isinstance(exc, (FairPrunerError, FileNotFoundError)):
            print(f"fair-pruner: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
