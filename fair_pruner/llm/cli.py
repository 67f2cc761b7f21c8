"""``fair-pruner prune-lm``: calibrate a causal LM on a text file, allocate, prune and save.

Also the small helpers the CLI and the benchmarks share: :func:`text_batches` (a text file's
tokens as calibration sequences) and :func:`perplexity` (non-overlapping windows).
"""
from __future__ import annotations

import math
import os
import time
from typing import List

import torch
import torch.nn.functional as F

from ..errors import CalibrationDataError


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
        unit = " KV" if any(g.meta.get("mode") == "kv" for g in fams.values()) else " q"
        lines.append(f"{layer:>5}  {cells[0] + unit:>15}  {cells[1]:>13}  {ratio:>9}")
    a = "-" if plan.alpha is None else f"{plan.alpha:.4g}"
    lines.append(f"strategy={plan.strategy} alpha={a} signal={plan.signal}: attention+MLP params "
                 f"{plan.params_before:,} -> {plan.params_after:,} (-{plan.params_reduction:.1%})")
    return "\n".join(lines)


def cli_prune_lm(args) -> int:
    """Entry point of ``fair-pruner prune-lm`` (arguments parsed by :mod:`fair_pruner.cli`)."""
    import fair_pruner as fp

    from .io import load_model
    from .io import save_pretrained

    say = (lambda *a, **k: None) if args.quiet else print
    t0 = time.perf_counter()
    if not os.path.isfile(args.calib_text):
        raise FileNotFoundError(f"calibration text {args.calib_text} not found")
    say(f"loading {args.model} ...")
    if args.quiet:
        from ._hf import transformers_module
        transformers_module().utils.logging.disable_progress_bar()
    model, tok = load_model(args.model)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer found with {args.model}; prune-lm needs one to "
                                "tokenize --calib-text")
    with open(args.calib_text, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    batches = text_batches(ids, args.seq_len, args.num_seqs)
    if len(batches) < args.num_seqs:
        say(f"note: the text gives only {len(batches)} sequences of {args.seq_len} tokens")
    say(f"calibrating on {len(batches)} x {args.seq_len} tokens ...")
    recon = getattr(args, "reconstruct", "auto")
    recon = None if recon == "none" else recon
    book = fp.score(model, batches, seed=args.seed, progress=not args.quiet,
                    reconstruction={"auto": "auto", None: False, "bias": False}.get(recon, True),
                    gram_memory=getattr(args, "gram_memory", 4.0))
    kw = {"params": args.params} if args.params is not None else {"tod": args.tod}
    if args.params is None and args.tod is None:
        kw = {"params": 0.2}
    plan = fp.allocate(book, strategy=args.strategy, round_to=args.round_to,
                       signal=getattr(args, "signal", None), **kw)
    pruned = fp.prune(model, plan, reconstruct=recon, book=book)
    say(f"reconstruction: {pruned._fair_pruner_reconstruct or 'none'}")
    save_pretrained(pruned, args.out, tokenizer=tok, plan=plan)
    book.save(os.path.join(args.out, "score_book.safetensors"))
    say("")
    say(layer_table(book, plan))
    say(f"calibration {book.meta['seconds']:.1f} s, process peak RSS "
        f"{book.meta['process_peak_rss_mb']:.0f} MB;"
        f" total {time.perf_counter() - t0:.1f} s")
    say(f"wrote {args.out} (load with fair_pruner.from_pretrained)")
    if args.plot:
        plan.plot(args.plot, title=f"kept ratio per group (attention+MLP params "
                                   f"-{plan.params_reduction:.0%})")
        say(f"wrote {args.plot}")
    return 0
