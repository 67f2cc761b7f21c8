"""`fp.score` of SmolLM2-135M against the plain forward + backward it rides on, same tokens.

    python benchmarks/bench_llm_overhead.py --austen /tmp/janeausten --seqs 16 --repeats 2

One process, ``--threads`` threads. Two floors: one plain forward + backward per batch
(``loss.backward()`` of the next-token cross-entropy with the weight gradients a fine-tuning step
computes), and the same passes with the weights frozen (gradients with respect to the
activations only, what scoring needs). `fp.score` is timed with its defaults (reconstruction statistics included: the Gram
matrices) and with ``reconstruction=False``. Each timing is the best of ``--repeats``, the three
kinds interleaved so that a slow phase of a shared machine hits all of them. Prints one JSON
line.

With ``--random CONFIG`` the model is built from a known architecture with random weights instead
(no download: the cost of scoring depends on the shapes, not on the weights) and the tokens are
random ids below 512 (so the next-token classes fill), on any ``--device`` / ``--dtype``; on CUDA
each kind's peak allocated memory is reported too. ``benchmarks/gpu_check.sh`` runs it for the
SmolLM2-135M and the Llama-3-8B shapes on the GPU:

    python benchmarks/bench_llm_overhead.py --random llama3-8b --device cuda --dtype bfloat16 \
        --seqs 8 --seq-len 2048 --gram-memory 40
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
    ap.add_argument("--random", choices=sorted(RANDOM), default=None,
                    help="random weights in this architecture's shapes instead of SmolLM2's GGUF")
    ap.add_argument("--layers", type=int, default=0, help="with --random: decoder layers (0: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--gram-memory", type=float, default=4.0, help="fp.score's gram_memory (GiB)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import fair_pruner as fp
    from fair_pruner.llm import load_model, text_batches

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.random:
        model = random_llama(args.random, args.layers, device, dtype)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (args.seqs * args.seq_len + 1,), generator=g)
    else:
        model, tok = load_model(smollm2_gguf())
        model = model.to(device=device, dtype=dtype)
        ids = torch.tensor(tok(austen(args.austen, "sensesensibility"),
                               add_special_tokens=False)["input_ids"])
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in text_batches(ids, args.seq_len, args.seqs)]
    cuda = device.type == "cuda"
    peaks: dict = {}

    def timed(kind, work) -> float:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize()
            peaks[kind] = max(peaks.get(kind, 0), torch.cuda.max_memory_allocated())
        return time.perf_counter() - t

    def passes(frozen: bool) -> None:
        """Forward + backward of every batch; ``frozen``: from the embeddings, so autograd
        computes activation gradients only (the weights are frozen by the caller)."""
        for b in batches:
            x = b["input_ids"]
            if frozen:
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits
            else:
                logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   x[:, 1:].reshape(-1))
            loss.backward()

    def plain() -> float:
        model.zero_grad(set_to_none=True)
        secs = timed("fwd_bwd", lambda: passes(False))
        model.zero_grad(set_to_none=True)
        return secs

    def activations_only() -> float:
        """The same passes without weight gradients: what scoring needs (dL/d activations)."""
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            return timed("fwd_bwd_activations", lambda: passes(True))
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)

    def scored(kind, **kw) -> float:
        return timed(kind, lambda: fp.score(model, batches, progress=False,
                                            gram_memory=args.gram_memory, **kw))

    times = {"fwd_bwd": [], "fwd_bwd_activations": [], "score": [], "score_no_gram": []}
    for _ in range(args.repeats):
        times["fwd_bwd"].append(plain())
        times["fwd_bwd_activations"].append(activations_only())
        times["score"].append(scored("score"))
        times["score_no_gram"].append(scored("score_no_gram", reconstruction=False))
    best = {k: min(v) for k, v in times.items()}
    out = {"model": args.random or "smollm2-135m (GGUF)", "device": str(device),
           "dtype": args.dtype, "layers": model.config.num_hidden_layers,
           "weights_gb": round(sum(p.numel() * p.element_size()
                                   for p in model.parameters()) / 1e9, 3),
           "sequences": len(batches), "seq_len": args.seq_len, "threads": args.threads,
           "best_s": {k: round(v, 2) for k, v in best.items()},
           "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
           "score_over_fwd_bwd": round(best["score"] / best["fwd_bwd"], 2),
           "score_no_gram_over_fwd_bwd": round(best["score_no_gram"] / best["fwd_bwd"], 2),
           "score_over_activations_only": round(best["score"] / best["fwd_bwd_activations"], 2),
           "score_no_gram_over_activations_only":
               round(best["score_no_gram"] / best["fwd_bwd_activations"], 2),
           "load_average": os.getloadavg()[0], "torch": torch.__version__}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_allocated_gb"] = {k: round(v / 1e9, 2) for k, v in peaks.items()}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


# Shapes of real checkpoints (their config.json), built with random weights.
RANDOM = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=600,
                 tie_word_embeddings=False, rope_theta=10000.0),
}


def random_llama(name: str, layers: int, device, dtype):
    """A LlamaForCausalLM with ``name``'s shapes (``layers`` decoder layers if > 0), weights
    drawn N(0, 0.02) directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(RANDOM[name])
    if layers > 0:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)      # built in dtype: a 70B layer never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


if __name__ == "__main__":
    sys.exit(main())
