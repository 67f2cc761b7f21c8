"""``fair-pruner prune-lm``: calibrate a causal LM on a text file, allocate, prune and save.

Also the helpers the CLI and the benchmarks share: :func:`text_batches` (a text file's tokens as
calibration sequences), :func:`perplexity` (non-overlapping windows), :func:`layer_table` and
:func:`plan_warnings` (what a plan's granularity did to a target, from the book's groups and
cost model).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..errors import CalibrationDataError, FairPrunerError, TargetError


def text_batches(ids: torch.Tensor, seq_len: int, num_seqs: int, batch_size: int = 1
                 ) -> List[dict]:
    """Consecutive non-overlapping ``seq_len``-token sequences from a 1-d token tensor, at most
    ``num_seqs`` of them, as ``{"input_ids": [b, seq_len]}`` batches."""
    ids = torch.as_tensor(ids).reshape(-1)
    if seq_len < 2:
        raise CalibrationDataError("seq_len must be >= 2 (next-token labels need two tokens)")
    n = min(num_seqs, ids.numel() // seq_len)
    if n < 1:
        raise CalibrationDataError(f"the calibration text has {ids.numel()} tokens, fewer than "
                                   f"one sequence of {seq_len}; use a longer text or --seq-len")
    seqs = ids[: n * seq_len].reshape(n, seq_len)
    return [{"input_ids": seqs[i:i + batch_size]} for i in range(0, n, batch_size)]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 1024, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping ``window``-token windows of ``ids``."""
    from tqdm.auto import tqdm

    ids = torch.as_tensor(ids).reshape(-1)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    starts = list(range(0, ids.numel() - 1, window))
    for s in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        w = ids[s: s + window][None].to(device)
        if w.shape[1] < 2:
            continue
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
    model.train(was)
    return math.exp(nll / max(1, n))


def layer_table(book, plan) -> str:
    """Per decoder layer: attention units and MLP neurons kept / total."""
    rows = {}
    for g in book.groups:
        rows.setdefault(g.meta.get("layer", g.name), {})[g.meta.get("family", g.kind)] = g
    head = f"{'layer':>5}  {'attention kept':>15}  {'MLP kept':>13}  {'MLP ratio':>9}"
    lines = [head]
    for layer, fams in rows.items():
        cells = []
        for role in ("attention", "ffn"):
            g = fams.get(role)
            cells.append("-" if g is None else f"{plan.kept[g.name]}/{g.size}")
        ffn = fams.get("ffn")
        ratio = f"{plan.ratios[ffn.name]:.2f}" if ffn is not None else "-"
        att = fams.get("attention")
        unit = "" if att is None else (" KV" if att.meta.get("mode") == "kv" else " q")
        lines.append(f"{layer:>5}  {cells[0] + unit:>15}  {cells[1]:>13}  {ratio:>9}")
    a = "-" if plan.alpha is None else f"{plan.alpha:.4g}"
    lines.append(f"strategy={plan.strategy} alpha={a} signal={plan.signal}: attention+MLP params "
                 f"{plan.params_before:,} -> {plan.params_after:,} (-{plan.params_reduction:.1%})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What a plan's granularity did to its target (read from the book's groups and cost model)
# --------------------------------------------------------------------------------------------

def unit_label(g) -> str:
    """What one unit of group ``g`` is, in words ("KV group", "MLP neuron", "channel", ...)."""
    if g.kind == "head":
        return "KV group" if g.meta.get("mode", "kv") == "kv" else "query-head slot"
    return {"neuron": "MLP neuron", "expert": "routed expert", "channel": "channel"}.get(
        g.kind, f"{g.kind} unit")


def _n(n: int, label: str) -> str:
    return f"{n:,} {label}" + ("" if n == 1 else "s")


def _pct(x: float) -> str:
    """A share as a percentage with two significant digits (10%, 0.36%, 0.0017%)."""
    return f"{100 * x:.2g}%"


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def unit_kinds(book, plan) -> Dict[str, dict]:
    """Per unit kind (:func:`unit_label`, in book order): groups, units, units removed, the
    parameters and MACs one more unit of a group takes out at the plan's widths (median over
    the kind's groups; exact, from the book's cost model), and the constraints that set the
    step (``roundable``, ``tier``)."""
    G = len(book.groups)
    m = torch.tensor([len(plan.removed.get(g.name, [])) for g in book.groups], dtype=torch.int64)
    p0, f0 = book.cost.evaluate(m)
    p1, f1 = book.cost.evaluate(m[None] + torch.eye(G, dtype=torch.int64))
    dp, df = (p0 - p1).tolist(), (f0 - f1).tolist()
    kinds: Dict[str, dict] = {}
    for i, g in enumerate(book.groups):
        if g.frozen:
            continue
        k = kinds.setdefault(unit_label(g), {"groups": 0, "units": 0, "removed": 0, "params": [],
                                             "flops": [], "roundable": g.roundable,
                                             "tier": g.tier, "kind": g.kind})
        k["groups"] += 1
        k["units"] += g.size
        k["removed"] += int(m[i])
        k["params"].append(dp[i])
        k["flops"].append(df[i])
        k["tier"] = min(k["tier"], g.tier)
    for k in kinds.values():
        k["param"], k["flop"] = _median(k["params"]), _median(k["flops"])
    return kinds


def plan_warnings(book, plan, *, signal: Optional[str] = None,
                  command: str = "prune-lm") -> List[str]:
    """Warnings about ``plan`` made from ``book``, each one string (lines after the first
    indented):

    * the target overshot by more than one percentage point: by how much, why (ToD's step at
      the tolerance found, or already at alpha = 0), the units removed and what one of each is
      worth (attention units also in MLP neurons), the smallest step, and what to change;
    * attention units that ToD removes at alpha = 0 ("free cuts"), how many of how many.

    ``signal`` is the removal signal the plan was allocated with (None: the book's defaults);
    ``command`` (``"prune-lm"``, ``"allocate"`` or ``"score"``) words the suggestions as that
    command's options (what needs rescoring: "rescore with prune-lm ...").
    """
    out: List[str] = []
    kinds = unit_kinds(book, plan)
    if not kinds:
        return out
    scope = "attention+MLP " if book.meta.get("kind") == "llm" else ""
    rescore = "" if command == "prune-lm" else "rescore with prune-lm "
    heads = next((lab for lab, k in kinds.items() if k["kind"] == "head"), None)
    neuron = kinds.get("MLP neuron")

    def worth(lab: str, which: str = "params") -> str:
        """'one KV group = 0.36% of the ... parameters = 192 MLP neurons'."""
        k = kinds[lab]
        key, base, what = (("param", plan.params_before, "parameters") if which != "flops"
                           else ("flop", plan.flops_before, "MACs"))
        s = f"one {lab} = {_pct(k[key] / max(1, base))} of the {scope}{what}"
        if lab == heads and neuron is not None and neuron[key] > 0:
            s += f" = {k[key] / neuron[key]:,.0f} MLP neurons"
        return s

    target = dict(plan.target or {})
    if target and "experts" not in target:
        (which, goal), = target.items()
        reached = {"params": plan.params_reduction, "flops": plan.flops_reduction,
                   "units": plan.units_reduction}[which]
        if reached - goal > 0.01:
            what = {"params": f"of the {scope}parameters", "flops": f"of the {scope}MACs",
                    "units": "of the prunable units"}[which]
            lines = [f"--{which} {goal:g} asked for {goal:.1%} {what}; the plan removes "
                     f"{reached:.1%}, {100 * (reached - goal):.1f} points more."]
            if plan.strategy == "tod" and plan.alpha == 0:
                lines.append(
                    f"Why: ToD removes {reached:.1%} already at alpha = 0, its smallest "
                    "tolerance: 'free cuts', units ranked lowest by the removal signal "
                    f"({plan.signal}) that are none of the most protected ({plan.protect})"
                    + (f", rounded to multiples of {plan.round_to}" if plan.round_to > 1 else "")
                    + "; no tolerance removes less.")
            elif plan.strategy == "tod":
                lines.append(
                    f"Why: units go whole, and at the tolerance found (alpha = {plan.alpha:.4g}) "
                    f"several groups' counts change at once: ToD's first step at or above "
                    f"{goal:.1%} is {reached:.1%}.")
            else:
                lines.append(f"Why: units go whole; with --strategy {plan.strategy} the first "
                             f"step at or above {goal:.1%} is {reached:.1%}.")
            parts = [f"{k['removed']:,} of {k['units']:,} {lab}s"
                     + (f" ({worth(lab, which)})" if which != "units" else "")
                     for lab, k in kinds.items() if k["removed"]]
            if parts:
                lines.append("Removed: " + "; ".join(parts) + ".")
            opened = plan.meta.get("tiers_opened")
            steps = []
            for lab, k in kinds.items():
                if opened is not None and k["tier"] > opened:
                    continue                       # a tier the target did not need to open
                n = plan.round_to if (k["roundable"] and plan.round_to > 1) else 1
                share = {"params": k["param"] / max(1, plan.params_before),
                         "flops": k["flop"] / max(1, plan.flops_before),
                         "units": 1 / max(1, sum(plan.sizes.values()))}[which]
                steps.append((n * share, n, lab))
            if steps:
                share, n, lab = min(steps)
                lines.append(f"Smallest step here: {_n(n, lab)} ({_pct(share)}"
                             + (f", as --round-to {plan.round_to} asks" if n > 1 else "") + ").")
            tries = []
            if heads is not None and kinds[heads]["removed"]:
                tries.append(f"{rescore}--units mlp (keep attention whole)")
                if heads == "KV group":
                    tries.append(f"{rescore}--heads query (cut single query heads, not whole "
                                 "KV groups)")
            replan = "" if command in ("prune-lm", "allocate") else \
                "re-plan with 'fair-pruner allocate BOOK' and "
            if plan.round_to > 1:
                tries.append(f"{replan}--round-to 1")
            if plan.strategy == "tod":
                tries.append(f"{replan}--strategy uniform or --strategy global (finer steps for "
                             "small targets)")
            if tries:
                lines.append("Try: " + "; ".join(tries) + ".")
            out.append("\n  ".join(lines))

    if plan.strategy == "tod" and heads is not None and kinds[heads]["removed"]:
        from ..plan import allocate
        try:
            free = allocate(book, tod=0.0, signal=signal, round_to=plan.round_to, cap=plan.cap)
        except FairPrunerError:
            free = None
        k = kinds[heads]
        n_free = 0 if free is None else sum(
            min(len(free.removed.get(g.name, [])), len(plan.removed.get(g.name, [])))
            for g in book.groups if g.kind == "head" and not g.frozen)
        if n_free:
            hg = next(g for g in book.groups if g.kind == "head" and not g.frozen)
            rem = signal or hg.meta.get("default_signal") or plan.signal
            prot = hg.meta.get("default_protect") or plan.protect
            per = k["units"] // max(1, k["groups"])
            lines = [f"{n_free:,} of the {k['units']:,} {heads}s ({per} per layer) go at ToD "
                     f"alpha = 0 ('free cuts'); the plan removes {_n(k['removed'], heads)} in "
                     "all."]
            lines.append(f"With {per} {heads}s per layer, ToD's rule removes one whenever the "
                         f"lowest by {rem} is not also the highest by {prot}: "
                         "such cuts cost no tolerance, but they are not free in quality ("
                         f"{worth(heads)}).")
            alt = [f"{rescore}--units mlp (keep attention whole)"]
            if heads == "KV group":
                alt.append(f"{rescore}--heads query (cut single query heads)")
            if plan.target is None:
                alt.append("--params F instead of --tod (a target cuts attention only when the "
                           "MLP neurons cannot reach it)")
            lines.append("Try: " + "; ".join(alt) + ".")
            out.append("\n  ".join(lines))
    return out


# --------------------------------------------------------------------------------------------
# prune-lm
# --------------------------------------------------------------------------------------------

def save_dtype(choice: str, source: str) -> str:
    """``--dtype``: the weights' dtype on disk. ``auto``: the source checkpoint's dtype when its
    config names one, ``bfloat16`` for a .gguf source (transformers dequantizes GGUF to fp32),
    else ``auto`` (the model's own dtype as loaded)."""
    if choice != "auto":
        return choice
    if str(source).endswith(".gguf"):
        return "bfloat16"
    try:
        with open(os.path.join(source, "config.json")) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return "auto"
    named = cfg.get("dtype") or cfg.get("torch_dtype")
    return named if named in ("float32", "float16", "bfloat16") else "auto"


@contextlib.contextmanager
def quiet_transformers(on: bool):
    """With ``on``: transformers logs only errors and shows no progress bars (restored after)."""
    if not on:
        yield
        return
    from ._hf import transformers_module
    log = transformers_module().utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _tokens(tok, path: str) -> torch.Tensor:
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _check_args(args) -> None:
    """Bad option combinations and missing files, before anything slow runs."""
    for opt, path in (("--calib-text", args.calib_text), ("--eval-text", args.eval_text)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{opt} {path} not found")
    if args.experts is not None and (args.params is not None or args.flops is not None):
        raise TargetError("--experts cannot be combined with --params/--flops; give --tod for "
                          "the dense groups (MLP neurons, heads) instead, or leave them whole")
    if args.expert_merge and args.experts is None:
        raise FairPrunerError("--expert-merge merges removed routed experts; give --experts F "
                              "(the fraction of experts to remove) with it")
    if args.experts is not None and args.units == "attention":
        raise FairPrunerError("--experts removes routed experts, but --units attention scores "
                              "attention heads only; use --units mlp or all")
    if args.heads is not None and args.units == "mlp":
        raise FairPrunerError(f"--heads {args.heads} sets the attention units, but --units mlp "
                              "prunes MLP neurons only; drop --heads or use --units attention/all")
    if args.signal == "obs" and args.reconstruct in ("none", "bias"):
        raise FairPrunerError(f"--signal obs needs the Gram matrices of the least-squares update;"
                              f" --reconstruct {args.reconstruct} does not collect them: use "
                              "--reconstruct auto, affine or lstsq")
    if args.eval_tokens < 2:
        raise FairPrunerError("--eval-tokens must be >= 2")
    if getattr(args, "fsdp", False):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise FairPrunerError("--fsdp shards the model across the ranks of torchrun: run "
                                  "torchrun --nproc_per_node N -m fair_pruner prune-lm ... --fsdp")
        if not os.path.isdir(args.model):
            raise FairPrunerError(f"--fsdp reads a Hugging Face safetensors directory; "
                                  f"{args.model} is not one")
        for bad, why in ((args.gguf, "--gguf"), (args.eval_text, "--eval-text"),
                         (args.signal == "taylor", "--signal taylor")):
            if bad:
                raise FairPrunerError(f"{why} needs the whole model in one process; drop it or "
                                      "drop --fsdp")


def cli_prune_lm(args) -> int:
    """Entry point of ``fair-pruner prune-lm`` (arguments parsed by :mod:`fair_pruner.cli`)."""
    _check_args(args)
    gguf = None
    if args.gguf:
        try:
            from .gguf_export import save_gguf as gguf
        except ImportError as exc:
            raise FairPrunerError(f"--gguf: GGUF export is not available in this install ({exc});"
                                  " install the LLM extras: pip install -e '.[llm]'") from exc
    owned = _init_distributed()
    try:
        with quiet_transformers(args.quiet):
            return _prune_lm(args, gguf)
    finally:
        if owned:
            import torch.distributed as tdist
            tdist.destroy_process_group()


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL with CUDA, else gloo).
    True when this call created it."""
    import datetime

    import torch.distributed as tdist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return False
    tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                             timeout=datetime.timedelta(minutes=30))
    return True


def _prune_lm(args, gguf) -> int:
    import fair_pruner as fp

    from ..distributed import world
    from .io import load_model

    rank, size = world()
    quiet = args.quiet or rank != 0         # under torchrun rank 0 speaks and writes
    say = (lambda *a, **k: None) if quiet else print

    def warn(msg: str) -> None:
        if not quiet:
            print(f"fair-pruner: warning: {msg}", file=sys.stderr)

    t0 = time.perf_counter()
    say(f"loading {args.model} ..." + (" (FSDP2-sharded)" if args.fsdp else ""))
    if args.fsdp:
        from ._hf import transformers_module
        from .shard import load_sharded
        model = load_sharded(args.model)
        tok = transformers_module().AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = load_model(args.model)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer found with {args.model}; prune-lm needs one to "
                                "tokenize --calib-text")
    if gguf is not None:      # refuse an unexportable model before the long calibration
        from .gguf_export import check_gguf
        check_gguf(model, tokenizer=tok, dtype=args.gguf_dtype,
                   source_gguf=args.model if args.model.endswith(".gguf") else None)
    if args.experts is not None:
        from .layout import find_layout
        if not any(f.kind == "expert" for f in find_layout(model).prunable):
            raise TargetError(f"--experts needs a model with routed MoE experts; this "
                              f"{type(model).__name__} has none: use --params, --flops or --tod")
    ids = _tokens(tok, args.calib_text)
    batches = text_batches(ids, args.seq_len, args.num_seqs)
    if len(batches) < args.num_seqs:
        say(f"note: the text gives only {len(batches)} sequences of {args.seq_len} tokens")
    eval_ids = None
    if args.eval_text:
        if os.path.abspath(args.eval_text) == os.path.abspath(args.calib_text):
            warn("--eval-text is the calibration text: the perplexity is not held out")
        eval_ids = _tokens(tok, args.eval_text)[: args.eval_tokens]
        if eval_ids.numel() < 2:
            raise CalibrationDataError(f"--eval-text {args.eval_text} has fewer than 2 tokens")

    recon = None if args.reconstruct == "none" else args.reconstruct
    roles = {"mlp": ["ffn"], "attention": ["attention"], "all": None}[args.units]
    say(f"calibrating on {len(batches)} x {args.seq_len} tokens"
        + (f", every {size}th sequence on each of {size} ranks" if size > 1 else "") + " ...")
    batches = batches[rank::size]           # this rank's shard; the book is the union's
    book = fp.score(model, batches, seed=args.seed, progress=not quiet,
                    reconstruction={"auto": "auto", None: False, "bias": False}.get(recon, True),
                    gram_memory=args.gram_memory, heads=args.heads or "kv", roles=roles,
                    weight_taylor=args.signal == "taylor", obs_signal=args.signal == "obs",
                    checkpointing=args.checkpointing)
    if args.signal == "obs" and not book.meta.get("obs_signal"):
        raise FairPrunerError("--signal obs needs the Gram matrices; pass --reconstruct auto "
                              "or affine")
    if args.experts is not None:
        kw = {"experts": args.experts, "tod": args.tod}
    elif args.params is not None:
        kw = {"params": args.params}
    elif args.flops is not None:
        kw = {"flops": args.flops}
    elif args.tod is not None:
        kw = {"tod": args.tod}
    else:
        kw = {"params": 0.2}
    plan = fp.allocate(book, strategy=args.strategy, round_to=args.round_to, signal=args.signal,
                       **kw)
    for w in plan_warnings(book, plan, signal=args.signal):
        warn(w)
    if args.fsdp:       # the sharded model cannot be pruned in memory: prune the checkpoint
        return _prune_checkpoint_on_rank0(args, book, plan, recon, tok, rank, say, t0)
    if rank != 0:       # every rank holds the same book and plan; rank 0 prunes and writes
        return 0

    ppl0 = ppl1 = None
    if eval_ids is not None:
        say(f"perplexity of the dense model on {eval_ids.numel():,} tokens ...")
        ppl0 = perplexity(model, eval_ids, window=args.seq_len, progress=not args.quiet)
    pruned = fp.prune(model, plan, reconstruct=recon, book=book, expert_merge=args.expert_merge)
    if eval_ids is not None:
        ppl1 = perplexity(pruned, eval_ids, window=args.seq_len, progress=not args.quiet)
    dtype = save_dtype(args.dtype, args.model)
    fp.save_pretrained(pruned, args.out, tokenizer=tok, plan=plan, dtype=dtype)
    book.save(os.path.join(args.out, "score_book.safetensors"))
    if gguf is not None:
        gguf(pruned, args.gguf, tokenizer=tok, dtype=args.gguf_dtype,
             source_gguf=args.model if args.model.endswith(".gguf") else None,
             progress=not args.quiet)

    added = pruned._fair_pruner_added_params
    say(f"reconstruction: {pruned._fair_pruner_reconstruct or 'none'}"
        + (f" (+{added:,} parameters in the biases it added)" if added else ""))
    say("")
    say(layer_table(book, plan))
    if plan.target and "experts" in plan.target:
        e = plan.meta["experts"]
        say(f"routed experts: removed {e['budget']} of {e['total']} "
            f"({e['fraction_reached']:.1%}); {e['bound']}")
    if ppl0 is not None:
        mem = str(next(model.parameters()).dtype).replace("torch.", "")
        say("")
        say(f"{'':8}{'attention+MLP params':>22}{'perplexity':>12}   held out: "
            f"{os.path.basename(args.eval_text)}, {eval_ids.numel():,} tokens, windows of "
            f"{args.seq_len}")
        say(f"{'dense':8}{plan.params_before:>22,}{ppl0:>12.3f}")
        say(f"{'pruned':8}{plan.params_after + added:>22,}{ppl1:>12.3f}   "
            f"({(ppl1 / ppl0 - 1):+.1%}; {mem} in memory, before --dtype)")
    say(f"calibration {book.meta['seconds']:.1f} s, process peak RSS "
        f"{book.meta['process_peak_rss_mb']:.0f} MB; total {time.perf_counter() - t0:.1f} s")
    shown = dtype if dtype != "auto" else str(next(pruned.parameters()).dtype).replace("torch.", "")
    say(f"wrote {args.out} ({shown} weights; load with fair_pruner.from_pretrained, or with "
        "transformers' AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True))")
    if gguf is not None:
        say(f"wrote {args.gguf} ({args.gguf_dtype})")
    if args.plot:
        from .plot import plot_layers
        plot_layers(book, plan, args.plot)
        say(f"wrote {args.plot}")
    return 0


def _prune_checkpoint_on_rank0(args, book, plan, recon, tok, rank, say, t0) -> int:
    """``--fsdp``: rank 0 prunes the checkpoint layer by layer and writes ``--out``; the other
    ranks wait at a barrier (tearing the group down under a writing rank 0 aborted gloo)."""
    import torch.distributed as tdist

    from .checkpoint import prune_checkpoint
    if rank == 0:
        prune_checkpoint(args.model, plan, args.out, book=book, reconstruct=recon,
                         dtype=save_dtype(args.dtype, args.model), tokenizer=tok,
                         expert_merge=args.expert_merge, progress=not args.quiet)
        book.save(os.path.join(args.out, "score_book.safetensors"))
        say("")
        say(layer_table(book, plan))
        say(f"calibration {book.meta['seconds']:.1f} s (sharded), process peak RSS "
            f"{book.meta['process_peak_rss_mb']:.0f} MB; total {time.perf_counter() - t0:.1f} s")
        say(f"wrote {args.out} (pruned from {args.model} one decoder layer at a time)")
    tdist.barrier()
    return 0
