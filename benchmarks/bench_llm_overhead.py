"""`fp.score` of SmolLM2-135M against the plain forward + backward it rides on, same tokens.

    python benchmarks/bench_llm_overhead.py --austen /tmp/janeausten --seqs 16 --repeats 2

One process, ``--threads`` threads. Two floors: one plain forward + backward per batch
(``loss.backward()`` of the next-token cross-entropy with the weight gradients a fine-tuning step
computes), and the same passes with the weights frozen (gradients with respect to the
activations only, what scoring needs). `fp.score` is timed with its defaults (reconstruction statistics included: the Gram
matrices) and with ``reconstruction=False``. Each timing is the best of ``--repeats``, the three
kinds interleaved so that a slow phase of a shared machine hits all of them. Prints one JSON
line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import austen, smollm2_gguf  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--austen", default="/tmp/janeausten")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import fair_pruner as fp
    from fair_pruner.llm import load_model, text_batches

    model, tok = load_model(smollm2_gguf())
    ids = torch.tensor(tok(austen(args.austen, "sensesensibility"),
                           add_special_tokens=False)["input_ids"])
    batches = text_batches(ids, args.seq_len, args.seqs)

    def plain() -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        for b in batches:
            x = b["input_ids"]
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   x[:, 1:].reshape(-1))
            loss.backward()
        secs = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return secs

    def activations_only() -> float:
        """The same passes without weight gradients: what scoring needs (dL/d activations)."""
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            t = time.perf_counter()
            for b in batches:
                x = b["input_ids"]
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       x[:, 1:].reshape(-1))
                loss.backward()
            return time.perf_counter() - t
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)

    def scored(**kw) -> float:
        t = time.perf_counter()
        fp.score(model, batches, progress=False, **kw)
        return time.perf_counter() - t

    times = {"fwd_bwd": [], "fwd_bwd_activations": [], "score": [], "score_no_gram": []}
    for _ in range(args.repeats):
        times["fwd_bwd"].append(plain())
        times["fwd_bwd_activations"].append(activations_only())
        times["score"].append(scored())
        times["score_no_gram"].append(scored(reconstruction=False))
    best = {k: min(v) for k, v in times.items()}
    out = {"sequences": len(batches), "seq_len": args.seq_len, "threads": args.threads,
           "best_s": {k: round(v, 2) for k, v in best.items()},
           "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
           "score_over_fwd_bwd": round(best["score"] / best["fwd_bwd"], 2),
           "score_no_gram_over_fwd_bwd": round(best["score_no_gram"] / best["fwd_bwd"], 2),
           "score_over_activations_only": round(best["score"] / best["fwd_bwd_activations"], 2),
           "score_no_gram_over_activations_only":
               round(best["score_no_gram"] / best["fwd_bwd_activations"], 2),
           "load_average": os.getloadavg()[0], "torch": torch.__version__}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
