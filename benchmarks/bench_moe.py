"""MoE expert pruning on a small trained Qwen2-MoE: ToD vs matched-budget baselines, no fine-tuning.

The model comes from ``benchmarks/train_moe.py`` (trained on Emma, Mansfield Park, Northanger Abbey
and Persuasion). Calibrate on *Sense and Sensibility* (``--num-seqs`` x ``--seq-len`` tokens),
evaluate perplexity on the first ``--eval-chars`` characters of *Pride and Prejudice* (held out
from both) in non-overlapping ``--window``-token windows. At 25% and 50% of the routed experts
removed (exactly the same number for every method; ``fp.allocate(book, experts=...)``), compare:

* ToD with the default signals (U removes, R protects): per-layer counts chosen by ToD,
* uniform per-layer counts with the same removal signal (U),
* routing frequency (least-used experts first), uniform per-layer counts and with ToD,
* REAP (mean router-weighted output norm), uniform per-layer counts and with ToD.

Also reports calibration time, peak RSS during calibration and the per-layer counts ToD chose.

    python benchmarks/train_moe.py --out /tmp/fair_pruner_moe/model --minutes 14
    python benchmarks/bench_moe.py --model /tmp/fair_pruner_moe/model --json /tmp/bench_moe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import PeakRSS, austen, rss_now  # noqa: E402
from train_moe import CALIB_NOVEL, EVAL_NOVEL, smollm2_tokenizer  # noqa: E402

METHODS = [  # (label, strategy, removal signal)
    ("ToD, U/R (default)", "tod", "u"),
    ("uniform, U", "uniform", "u"),
    ("uniform, routing frequency", "uniform", "freq"),
    ("ToD, routing frequency", "tod", "freq"),
    ("uniform, REAP", "uniform", "reap"),
    ("ToD, REAP", "tod", "reap"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/fair_pruner_moe/model", help="train_moe.py output")
    ap.add_argument("--austen", default="/tmp/moe/ja", help="dpkg -x root of janeaustenr")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-chars", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--methods", default="", help="only methods whose label contains one of "
                    "these comma-separated words (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--book", default=None, help="reuse (or write) the score book here")
    ap.add_argument("--no-merge", action="store_true", help="skip the expert-merging rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import fair_pruner as fp
    from fair_pruner.llm import perplexity, text_batches

    model = fp.from_pretrained(args.model)
    with open(os.path.join(args.model, "vocab_map.json")) as fh:
        used = torch.tensor(json.load(fh))
    with open(os.path.join(args.model, "train_report.json")) as fh:
        report = json.load(fh)
    tok = smollm2_tokenizer()
    remap = torch.full((len(tok),), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())

    def ids_of(text):
        ids = remap[torch.tensor(tok(text, add_special_tokens=False)["input_ids"])]
        assert (ids >= 0).all(), "a token outside the trained vocabulary"
        return ids

    calib = ids_of(austen(args.austen, CALIB_NOVEL))
    held = ids_of(austen(args.austen, EVAL_NOVEL)[: args.eval_chars])
    batches = text_batches(calib, args.seq_len, args.num_seqs, args.batch)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"trained {report['steps']} steps ({report['tokens']:,} tokens); calibration "
          f"{args.num_seqs}x{args.seq_len} tokens of {CALIB_NOVEL}; eval {held.numel():,} tokens "
          f"of {EVAL_NOVEL}", flush=True)

    t0 = time.perf_counter()
    dense_ppl = perplexity(model, held, args.window)
    eval_s = time.perf_counter() - t0
    print(f"dense perplexity {dense_ppl:.2f} ({eval_s:.0f}s per evaluation)", flush=True)

    base = rss_now()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        reused = bool(args.book and os.path.isfile(args.book))
        if reused:
            book = fp.ScoreBook.load(args.book)
            book.check_model(model)
        else:
            book = fp.score(model, batches, seed=args.seed, progress=False)
            if args.book:
                book.save(args.book)
        calib_s = book.meta["seconds"]
    experts = [g for g in book.groups if g.kind == "expert"]
    total = sum(g.size for g in experts)
    print(f"{'reused book: ' if reused else ''}calibration {calib_s:.1f}s, peak RSS {peak.peak:.0f} MiB (+{peak.peak - base:.0f} "
          f"over the loaded model); {len(experts)} MoE layers, {total} routed experts", flush=True)
    freq = {g.name: [round(float(x), 4) for x in g.signals["freq"]] for g in experts}
    # expert merging (fp.prune(..., expert_merge=True)) needs the routing co-choice statistics
    merging = not args.no_merge and all("cochoice" in g.tensors for g in experts)

    results = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        for label, strategy, sig in METHODS:
            if args.methods and not any(w in label for w in args.methods.split(",")):
                continue
            plan = fp.allocate(book, experts=frac, strategy=strategy, signal=sig)
            for merge in ((False, True) if merging else (False,)):
                t1 = time.perf_counter()
                pruned = fp.prune(model, plan, book=book, expert_merge=merge)
                prune_s = time.perf_counter() - t1
                ppl = perplexity(pruned, held, args.window)
                kept = plan.meta["experts"]["kept_per_layer"]
                name = label + (" + merge" if merge else "")
                row = {"fraction": frac, "method": name, "strategy": strategy, "signal": sig,
                       "expert_merge": merge, "ppl": ppl, "alpha": plan.alpha,
                       "kept_per_layer": list(kept.values()), "prune_seconds": prune_s,
                       "removed_experts": plan.meta["experts"]["budget"],
                       "budget_adjust": plan.meta["experts"]["budget_adjust"],
                       "params_removed": plan.params_reduction}
                results.append(row)
                print(f"  {frac:.0%} {name:<36} ppl {ppl:9.2f}  kept/layer "
                      f"{list(kept.values())}  params -{plan.params_reduction:.1%}  adjust "
                      f"{row['budget_adjust']}  prune {prune_s:.2f}s", flush=True)
                del pruned

    lines = ["| experts removed | method | per-layer experts kept | held-out ppl |",
             "|---|---|---|---|", f"| 0 | dense | {[g.size for g in experts]} | {dense_ppl:.2f} |"]
    for r in results:
        lines.append(f"| {r['fraction']:.0%} ({r['removed_experts']}/{total}) | {r['method']} | "
                     f"{r['kept_per_layer']} | {r['ppl']:.2f} |")
    print("\n".join(lines))
    out = {"args": vars(args), "dense_ppl": dense_ppl, "calibration_seconds": calib_s,
           "peak_rss_mib": peak.peak, "rss_before_mib": base, "book_reused": reused, "results": results,
           "routing_frequency": freq, "train_report": {k: report[k] for k in
                                                       ("steps", "tokens", "train_seconds",
                                                        "heldout_ppl", "expert_load")},
           "torch": torch.__version__, "threads": args.threads}
    if args.json:
        from fair_pruner.scorebook import atomic_write
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(out, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
