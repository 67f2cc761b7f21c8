"""Command line: ``fair-pruner demo | score | allocate | prune-lm`` (and ``--version``).

Importing this module imports neither torch nor any fair_pruner submodule, and ``--help`` /
``--version`` import no torch (the demo's options come from :mod:`fair_pruner.demo`, which
imports torch only when it runs): every command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import warnings
from typing import List, Optional

# Removal signals a score book can hold (--signal). CNN books: u, r, activation, l1, l2, random.
# LLM books add fluctuation, flap, wanda (taylor / obs when asked for); MoE expert groups freq,
# reap. tests/test_cli.py checks this list against real books.
SIGNALS = {
    "u": "U-Score, class separability (the paper's)",
    "r": "R-Score, |first-order Taylor| of the loss",
    "fluctuation": "FLAP's output variance x squared weight norm (LLM default)",
    "flap": "FLAP's fluctuation standardised per layer (for --strategy global)",
    "wanda": "Wanda-sp: |W| x input norm",
    "taylor": "LLM-Pruner's weight Taylor (prune-lm computes it when chosen)",
    "obs": "error left after the least-squares update (prune-lm: needs the Gram matrices)",
    "activation": "mean |activation|",
    "l1": "L1 norm of the unit's weights",
    "l2": "L2 norm of the unit's weights",
    "random": "seeded random (a baseline)",
    "freq": "MoE experts: share of tokens routed",
    "reap": "MoE experts: REAP, mean routed output norm",
}
SIGNAL_EPILOG = "removal signals (--signal NAME):\n" + "\n".join(
    f"  {k:<12} {v}" for k, v in SIGNALS.items())


class _Formatter(argparse.HelpFormatter):
    """Help with each option's default shown (when it has a value and the help does not say
    it); description and epilog paragraphs are wrapped, lines indented by two spaces kept."""

    def _fill_text(self, text, width, indent):
        lines = []
        for para in text.splitlines():
            if para.startswith("  ") or not para.strip():
                lines.append(indent + para)
            else:
                lines.append(textwrap.fill(para, width, initial_indent=indent,
                                           subsequent_indent=indent))
        return "\n".join(lines)

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (action.option_strings and d is not None and d is not False
                and d is not argparse.SUPPRESS and "default" not in h):
            h += " (default: %(default)s)"
        return h


def _number(kind, ok, what: str):
    """An argparse type: ``kind(text)`` that must satisfy ``ok``, else ``what`` explains."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text}: {what}")
        return v
    parse.__name__ = what
    return parse


_fraction = _number(float, lambda v: 0.0 < v < 1.0,
                    "not a fraction in (0, 1); e.g. 0.2 removes 20%")
_tolerance = _number(float, lambda v: 0.0 <= v <= 1.0, "the tolerance alpha lies in [0, 1]")
_positive = _number(int, lambda v: v >= 1, "must be >= 1")


def _say(args):
    return (lambda *a, **k: None) if getattr(args, "quiet", False) else print


def _warn(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"fair-pruner: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _demo(args) -> int:
    from fair_pruner import demo
    return demo.run(args)


def _allocate(args) -> int:
    import fair_pruner as fp
    from fair_pruner.errors import FairPrunerError
    from fair_pruner.llm.cli import plan_warnings

    if not os.path.isfile(args.book):
        raise FileNotFoundError(f"score book {args.book} not found")
    book = fp.ScoreBook.load(args.book)
    if args.signal and not any(args.signal in g.signals for g in book.groups):
        how = {"taylor": "; prune-lm --signal taylor computes it",
               "obs": "; prune-lm --signal obs computes it"}.get(args.signal, "")
        raise FairPrunerError(f"--signal {args.signal}: this score book has no such scores (it "
                              f"has {', '.join(book.signal_names)}){how}")
    kw = {k: getattr(args, k) for k in ("params", "flops", "units", "experts")
          if getattr(args, k) is not None}
    plan = fp.allocate(book, tod=args.tod, strategy=args.strategy, round_to=args.round_to,
                       signal=args.signal, **kw)
    say = _say(args)
    say(plan.table())
    for w in plan_warnings(book, plan, signal=args.signal, command="allocate"):
        _warn(args, w)
    if args.out:
        plan.save(args.out)
        say(f"wrote {args.out}")
    if args.plot:
        plan.plot(args.plot)
        say(f"wrote {args.plot}")
    return 0


def _prune_lm(args) -> int:
    try:
        from fair_pruner.llm import cli_prune_lm
        from fair_pruner.llm import transformers_module
        transformers_module()
    except ImportError as exc:
        from fair_pruner.errors import FairPrunerError
        raise FairPrunerError(f"prune-lm needs the LLM extras: pip install -e '.[llm]' ({exc})")
    return cli_prune_lm(args)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cnn_model(spec: str):
    """MODEL of ``fair-pruner score``: a torchvision name, ``timm:<name>`` or ``file.py:factory``."""
    import torch.nn as nn

    from fair_pruner.errors import FairPrunerError

    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        try:
            import timm
        except ImportError:
            raise FairPrunerError(f"MODEL {spec} needs timm, which is not installed: pip install "
                                  "timm (or give a torchvision name or path.py:factory)") from None
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise FairPrunerError(f"MODEL {spec}: {exc}") from None
    path, sep, fn = spec.rpartition(":")
    if sep and (path.endswith(".py") or os.sep in path) or spec.endswith(".py"):
        if not sep:
            raise FairPrunerError(f"MODEL {spec}: name the function that builds the model too, "
                                  f"e.g. {spec}:make_model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL {spec}: no Python file {path}")
        import importlib.util
        ms = importlib.util.spec_from_file_location("_fair_pruner_user_model", path)
        mod = importlib.util.module_from_spec(ms)
        ms.loader.exec_module(mod)
        factory = getattr(mod, fn, None)
        if not callable(factory):
            have = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
            raise FairPrunerError(f"MODEL {spec}: {path} has no function {fn!r} (it defines "
                                  f"{', '.join(have) or 'none'})")
        model = factory()
        if not isinstance(model, nn.Module):
            raise FairPrunerError(f"MODEL {spec}: {fn}() returned a {type(model).__name__}, not a "
                                  "torch.nn.Module")
        return model
    import torchvision
    names = torchvision.models.list_models()
    if spec not in names:
        import difflib
        close = difflib.get_close_matches(spec, names, n=3)
        raise FairPrunerError(f"MODEL {spec!r} is not a torchvision model name"
                              + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + "; give a torchvision name, timm:<name> or path.py:factory")
    return torchvision.models.get_model(spec, weights=None)


def _load_weights(model, path: str) -> None:
    import torch

    from fair_pruner.errors import FairPrunerError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    elif path.endswith((".pt", ".pth")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FairPrunerError(f"--weights {path} is not a plain state dict (loaded with "
                                  f"weights_only=True: {str(exc).splitlines()[0]}); save "
                                  "model.state_dict() instead of the model") from None
        for key in ("state_dict", "model"):       # common checkpoint layouts
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    else:
        raise FairPrunerError(f"--weights {path}: give a .safetensors, .pt or .pth state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FairPrunerError(f"--weights {path} is not a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):      # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise FairPrunerError(f"--weights {path} does not fit the model: "
                              f"{' '.join(str(exc).split())[:400]}") from None
    if missing or unexpected:
        raise FairPrunerError(f"--weights {path} does not fit the model: {len(missing)} missing "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def _image_folder(args):
    """The calibration subset: --samples-per-class images of at most --max-classes classes."""
    import torch
    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    from fair_pruner.errors import CalibrationDataError

    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data} is not a directory")
    tf = transforms.Compose([transforms.Resize(round(args.image_size / 0.875)),
                             transforms.CenterCrop(args.image_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        ds = datasets.ImageFolder(args.data, transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise CalibrationDataError(f"--data {args.data}: {exc} (an ImageFolder has one "
                                   "sub-directory of images per class)") from None
    by_class = {}
    for i, t in enumerate(ds.targets):
        by_class.setdefault(t, []).append(i)
    classes = sorted(by_class)
    if len(classes) < 2:
        raise CalibrationDataError(f"--data {args.data} has {len(classes)} class folder(s); the "
                                   "U-Score compares classes, give at least 2")
    g = torch.Generator().manual_seed(args.seed)
    if len(classes) > args.max_classes:
        pick = torch.randperm(len(classes), generator=g)[: args.max_classes]
        classes = sorted(classes[i] for i in pick.tolist())
    idx = []
    for c in classes:
        items = by_class[c]
        take = torch.randperm(len(items), generator=g)[: args.samples_per_class]
        idx += [items[i] for i in sorted(take.tolist())]
    return Subset(ds, idx), [ds.classes[c] for c in classes]


def _score(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    import fair_pruner as fp
    from fair_pruner.errors import FairPrunerError
    from fair_pruner.llm.cli import plan_warnings

    if args.params is None and (args.plan_out or args.prune_out):
        raise FairPrunerError("--plan-out / --prune-out need a plan: add --params F")
    if args.prune_out and not args.plan_out:
        raise FairPrunerError("--prune-out needs --plan-out too: the plan rebuilds the pruned "
                              "architecture when the weights are loaded back")
    if args.prune_out and not args.prune_out.endswith((".safetensors", ".pt", ".pth")):
        raise FairPrunerError(f"--prune-out {args.prune_out}: give a .safetensors, .pt or .pth "
                              "file name")
    device = None
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise FairPrunerError(f"--device {args.device}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FairPrunerError(f"--device {args.device}: no CUDA device is available here; "
                                  "drop --device to calibrate on the CPU")
    say = _say(args)
    model = _cnn_model(args.model)
    if args.weights:
        _load_weights(model, args.weights)
    else:
        _warn(args, f"no --weights: scoring {args.model} with its initial (untrained) weights")
    model.eval()
    calib, names = _image_folder(args)
    torch.manual_seed(args.seed)
    loader = DataLoader(calib, batch_size=args.batch_size, shuffle=False)
    book = fp.score(model, loader, samples_per_class=args.samples_per_class,
                    max_classes=args.max_classes, seed=args.seed, device=device,
                    progress=not args.quiet, reconstruction=args.reconstruct)
    book.save(args.out)
    params, macs = book.totals()
    m = book.meta
    say(f"{args.model}: {len(book.groups)} prunable groups, {sum(g.size for g in book.groups):,} "
        f"channels; {params:,} params, {macs:,} MACs per image "
        f"({args.image_size}x{args.image_size})")
    say(f"calibrated on {m['calibration_samples']:,} images of {len(names)} classes in "
        f"{m['seconds']:.1f} s; signals: {', '.join(book.signal_names)}")
    if m.get("skipped_groups"):
        say(f"not prunable (kept whole): {len(m['skipped_groups'])} groups")
    say(f"wrote {args.out} (re-plan with: fair-pruner allocate {args.out} --params 0.3)")
    if args.params is None:
        return 0
    plan = fp.allocate(book, params=args.params)
    say("")
    say(plan.table())
    for w in plan_warnings(book, plan, command="score"):
        _warn(args, w)
    if args.plan_out:
        plan.save(args.plan_out)
        say(f"wrote {args.plan_out}")
    if args.prune_out:
        pruned = fp.prune(model, plan, book=book)
        from fair_pruner.scorebook import atomic_write
        if args.prune_out.endswith(".safetensors"):
            from safetensors.torch import save_model
            atomic_write(args.prune_out, lambda tmp: save_model(pruned, tmp))
        else:
            atomic_write(args.prune_out, lambda tmp: torch.save(pruned.state_dict(), tmp))
        method = "affine" if book.meta.get("reconstruction_stats") else "none"
        say(f"wrote {args.prune_out} ({sum(p.numel() for p in pruned.parameters()):,} params, "
            f"reconstruction: {method}); "
            f"load it into fp.prune(model, fp.Plan.load({args.plan_out!r}), reconstruct=None) "
            "with load_state_dict")
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def _add_signal(p) -> None:
    p.add_argument("--signal", choices=list(SIGNALS), metavar="NAME", default=None,
                   help="removal signal, for every group (default: each group's recommendation, "
                        "stored in the book: fluctuation for LLM neurons and heads, u otherwise);"
                        " the names are listed below")


def build_parser() -> argparse.ArgumentParser:
    import fair_pruner

    p = argparse.ArgumentParser(
        prog="fair-pruner", formatter_class=_Formatter,
        description="FAIR-Pruner: automatic layer-wise structured pruning via Tolerance of "
                    "Difference (arXiv 2508.02291).",
        epilog="examples:\n"
               "  fair-pruner demo\n"
               "  fair-pruner prune-lm MODEL_DIR --calib-text calib.txt --eval-text eval.txt "
               "--params 0.2 --out pruned/\n"
               "  fair-pruner score mobilenet_v3_small --weights w.pth --data imagenet/val "
               "--out book.safetensors\n"
               "  fair-pruner allocate book.safetensors --params 0.3 --out plan.json\n"
               "run 'fair-pruner COMMAND --help' for each command's options")
    p.add_argument("--version", action="version", version=f"fair-pruner {fair_pruner.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from fair_pruner import demo
    d = sub.add_parser("demo", formatter_class=_Formatter,
                       help="prune a small CNN trained on bundled real data (sklearn "
                            "digits) with ToD and report before/after",
                       description="Load the small CNN shipped with the package (trained on "
                                   "sklearn's bundled digits; --train trains it from scratch), "
                                   "score it on calibration images, prune it to a parameter "
                                   "target with ToD and print accuracy, params, MACs and the "
                                   "per-group table.")
    demo.add_arguments(d)
    d.set_defaults(func=_demo)

    s = sub.add_parser(
        "score", formatter_class=_Formatter,
        help="score a CNN on an image folder (one calibration pass) into a score book",
        description="Calibrate a CNN on labelled images and write its score book; with --params "
                    "also print the plan and write it (and the pruned weights).\n"
                    "Images are resized to --image-size / 0.875, center-cropped to --image-size "
                    "and normalised with the ImageNet mean and std.")
    s.add_argument("model", metavar="MODEL",
                   help="a torchvision model name (e.g. mobilenet_v3_small, resnet50), "
                        "timm:<name> (needs timm), or path.py:factory (a Python file and the "
                        "function in it that returns the nn.Module)")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="calibration images as a torchvision ImageFolder (one sub-directory per "
                        "class; label = index of the sorted folder name, so it must match the "
                        "model's output classes)")
    s.add_argument("--out", required=True, metavar="FILE",
                   help="write the score book here (.safetensors); re-plan from it with "
                        "'fair-pruner allocate' in milliseconds")
    s.add_argument("--weights", metavar="FILE",
                   help="state dict to load: .safetensors, or .pt/.pth (torch.load with "
                        "weights_only=True) (default: the model's initial weights, with a "
                        "warning)")
    s.add_argument("--params", type=_fraction, metavar="F",
                   help="also plan: fraction of the parameters to remove; prints the plan table")
    s.add_argument("--plan-out", metavar="FILE", help="write the plan (JSON); needs --params")
    s.add_argument("--prune-out", metavar="FILE",
                   help="write the pruned model's state dict (.safetensors, or .pt/.pth); needs "
                        "--params and --plan-out (load it into fp.prune(model, plan))")
    s.add_argument("--reconstruct", action="store_true",
                   help="collect Gram matrices while scoring so --prune-out updates the "
                        "consumers of removed channels by least squares")
    s.add_argument("--samples-per-class", type=_positive, default=32, metavar="N",
                   help="calibration images per class (seeded choice), and the U-Score's "
                        "samples per class")
    s.add_argument("--max-classes", type=_positive, default=100, metavar="N",
                   help="calibrate on at most N classes (a seeded choice)")
    s.add_argument("--batch-size", type=_positive, default=32, metavar="N", help="batch size")
    s.add_argument("--image-size", type=_positive, default=224, metavar="N",
                   help="input resolution (center crop)")
    s.add_argument("--seed", type=int, default=0, help="seed of image choice and scoring")
    s.add_argument("--device", default=None,
                   help="calibrate there, e.g. cuda (default: cpu, where the model is built)")
    s.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but errors (no progress bars, warnings or tables)")
    s.set_defaults(func=_score)

    a = sub.add_parser("allocate", formatter_class=_Formatter, epilog=SIGNAL_EPILOG,
                       help="re-plan from a saved score book (no recalibration)",
                       description="Load a score book and print the plan for a tolerance or "
                                   "a target; optionally save the plan (JSON) and a plot.")
    a.add_argument("book", help="score book file (.safetensors) from 'fair-pruner score', "
                                "prune-lm's OUT/score_book.safetensors or fp.ScoreBook.save")
    a.add_argument("--tod", type=_tolerance, default=None, metavar="ALPHA",
                   help="tolerance alpha in [0, 1] (default: 0.05 when no target is given); "
                        "with --experts: the tolerance of the dense groups")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--params", type=_fraction, metavar="F",
                   help="fraction of the parameters to remove (alpha is searched)")
    g.add_argument("--flops", type=_fraction, metavar="F", help="fraction of MACs to remove")
    g.add_argument("--units", type=_fraction, metavar="F",
                   help="fraction of the prunable units to remove")
    g.add_argument("--experts", type=_fraction, metavar="F",
                   help="MoE books: fraction of the routed experts to remove, exactly")
    a.add_argument("--strategy", choices=("tod", "uniform", "global"), default="tod",
                   help="tod: one tolerance, per-group depths; uniform: the same fraction per "
                        "group; global: one threshold on the signal over all groups (FLAP). "
                        "uniform and global need a target")
    a.add_argument("--round-to", type=_positive, default=1, dest="round_to", metavar="N",
                   help="keep a multiple of N units per group (channels / MLP neurons)")
    _add_signal(a)
    a.add_argument("--out", metavar="FILE", help="write the plan as JSON")
    a.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of kept ratios")
    a.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    a.set_defaults(func=_allocate)

    lm = sub.add_parser(
        "prune-lm", formatter_class=_Formatter, epilog=SIGNAL_EPILOG,
        help="prune a Hugging Face causal LM (MLP neurons, attention heads, MoE experts)",
        description="Calibrate a causal LM on a text file, allocate with ToD, prune, optionally "
                    "measure held-out perplexity before and after, and save the pruned model "
                    "with fp.save_pretrained (and optionally as GGUF).\n"
                    "Targets are fractions of the attention+MLP parameters (or MACs). With a "
                    "target, attention units are cut only when the MLP neurons cannot reach it; "
                    "prune-lm warns when the plan overshoots the target by more than one point, "
                    "and says why.\n"
                    "Data parallel: `torchrun --nproc_per_node N -m fair_pruner prune-lm ...` "
                    "(or torchrun with the fair-pruner script): each rank calibrates on every "
                    "N-th sequence, the score book is the single-process one, rank 0 prunes and "
                    "writes.")
    lm.add_argument("model", help="a transformers model directory, a fair_pruner pruned "
                                  "directory or a .gguf file")
    lm.add_argument("--calib-text", required=True, metavar="FILE",
                    help="calibration text file (UTF-8)")
    lm.add_argument("--out", required=True, metavar="DIR",
                    help="output directory (model, tokenizer, plan, score_book.safetensors)")
    t = lm.add_mutually_exclusive_group()
    t.add_argument("--params", type=_fraction, metavar="F",
                   help="fraction of the attention+MLP parameters to remove (default: 0.2 when "
                        "no --flops, --tod or --experts is given)")
    t.add_argument("--flops", type=_fraction, metavar="F",
                   help="fraction of the attention+MLP MACs per token to remove")
    t.add_argument("--tod", type=_tolerance, metavar="ALPHA",
                   help="a tolerance alpha in [0, 1] instead of a target (every group, heads "
                        "included, at the paper's rule); with --experts: the dense groups' "
                        "tolerance")
    lm.add_argument("--experts", type=_fraction, metavar="F",
                    help="MoE models: fraction of the routed experts to remove, exactly (each "
                         "layer keeps >= top_k); dense groups are kept unless --tod is given")
    lm.add_argument("--units", choices=("all", "mlp", "attention"), default="all",
                    help="which units may go: mlp (MLP neurons, and routed experts of MoE "
                         "layers), attention (heads) or all; the others are kept whole but "
                         "count in the totals")
    lm.add_argument("--heads", choices=("kv", "query"), default=None,
                    help="attention unit (default: kv): kv = a KV group with its query heads "
                         "(coarse: a layer has few); query = one query head from every KV group "
                         "of the layer at once (finer)")
    _add_signal(lm)
    lm.add_argument("--strategy", choices=("tod", "uniform", "global"), default="tod",
                    help="tod: one tolerance, per-group depths; uniform: the same fraction per "
                         "group; global: one threshold on the signal over all groups (FLAP, "
                         "with --signal flap). uniform and global need a target")
    lm.add_argument("--reconstruct", choices=("auto", "affine", "lstsq", "bias", "none"),
                    default="auto",
                    help="update each down_proj / o_proj after removal from the calibration "
                         "statistics: affine (least squares with a bias), lstsq (without), bias "
                         "(FLAP's mean compensation), none; auto: affine")
    lm.add_argument("--expert-merge", action="store_true", dest="expert_merge",
                    help="with --experts: merge each removed routed expert into the kept expert "
                         "that takes its tokens over (routing-frequency-weighted average of their "
                         "weights) instead of dropping it")
    lm.add_argument("--fsdp", action="store_true",
                    help="under torchrun: build the model already FSDP2-sharded from MODEL (a "
                         "safetensors directory; each rank reads only its rows), score it "
                         "sharded, then rank 0 prunes MODEL on disk one decoder layer at a time "
                         "(fp.llm.prune_checkpoint): no process ever holds the whole model")
    lm.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing while scoring: each decoder layer recomputes "
                         "its forward in the backward (less memory, about one more forward of "
                         "compute; the same book)")
    lm.add_argument("--gram-memory", type=float, default=4.0, dest="gram_memory", metavar="GIB",
                    help="device memory in GiB for the reconstruction Gram matrices; over it they "
                         "are collected in chunks of layers, one extra forward pass per chunk")
    lm.add_argument("--seq-len", type=_positive, default=512, dest="seq_len", metavar="N",
                    help="tokens per calibration sequence (also the perplexity window)")
    lm.add_argument("--num-seqs", type=_positive, default=64, dest="num_seqs", metavar="N",
                    help="calibration sequences (at most; the text may give fewer)")
    lm.add_argument("--round-to", type=_positive, default=1, dest="round_to", metavar="N",
                    help="keep a multiple of N MLP neurons per layer (e.g. 8 or 64 for fast "
                         "kernels; coarser steps)")
    lm.add_argument("--seed", type=int, default=0, help="seed of the U-Score's sampling")
    lm.add_argument("--eval-text", metavar="FILE",
                    help="held-out text: print the perplexity of the model before and after "
                         "pruning side by side")
    lm.add_argument("--eval-tokens", type=_positive, default=8192, metavar="N",
                    help="use at most the first N tokens of --eval-text")
    lm.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                    default="auto",
                    help="dtype of the saved weights; auto: the source checkpoint's dtype when "
                         "its config names one, bfloat16 for a .gguf source (transformers "
                         "dequantizes GGUF to float32), else the model's as loaded")
    lm.add_argument("--gguf", metavar="FILE", help="also write the pruned model as a GGUF file")
    lm.add_argument("--gguf-dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                    dest="gguf_dtype", help="tensor type of --gguf")
    lm.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of kept ratios")
    lm.add_argument("-q", "--quiet", action="store_true",
                    help="print nothing but errors: no progress bars, tables, warnings, "
                         "transformers logging")
    lm.set_defaults(func=_prune_lm)
    return p


@contextlib.contextmanager
def _quiet(on: bool):
    """-q: Python warnings from fair_pruner and transformers are not shown (errors still are)."""
    if not on:
        yield
        return
    with warnings.catch_warnings():
        for mod in ("fair_pruner", "transformers", "huggingface_hub"):
            warnings.filterwarnings("ignore", module=rf"{mod}(\.|$)")
        warnings.filterwarnings("ignore", message="fair_pruner")
        yield


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _quiet(getattr(args, "quiet", False)):
        try:
            return args.func(args)
        except Exception as exc:  # a clear one-line error for bad input, not a traceback
            from fair_pruner.errors import FairPrunerError
            if isinstance(exc, (FairPrunerError, FileNotFoundError)):
                print(f"fair-pruner: error: {' '.join(str(exc).split())}", file=sys.stderr)
                return 2
            raise


if __name__ == "__main__":
    sys.exit(main())
