"""Peak memory per rank of scoring a synthetic ~1B-parameter Llama: unsharded vs FSDP2 (CPU, gloo).

    python benchmarks/bench_fsdp.py --make /tmp/llama1b                        # write the model
    python benchmarks/bench_fsdp.py --model /tmp/llama1b --out /tmp/fsdp1     # 1 process, whole
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py --model /tmp/llama1b --out /tmp/fsdp2 \\
        --sharded                                                             # 2 ranks, FSDP2
    python benchmarks/bench_fsdp.py --model /tmp/llama1b --out /tmp/fsdp1 --prune whole
    python benchmarks/bench_fsdp.py --model /tmp/llama1b --out /tmp/fsdp1 --prune layered
    python benchmarks/bench_fsdp.py --model /tmp/llama1b --out /tmp/ck0 --seq 512 --batches 2 \\
        --threads 2 [--checkpointing]                                  # activation checkpointing

The model (hidden 2048, 20 layers, 16 heads / 4 KV heads, MLP 5632, vocab 32000, untied head:
1.03B parameters, fp32) has random weights: scoring cost and memory do not depend on what the
weights have learned. Every run scores the same ``--batches`` random token batches (ids < 16,
so the 8 next-token classes fill; the sharded run splits them across ranks, and since a sharded
forward is a collective each rank gets the same number) with ``reconstruction=False`` (the Gram
matrices are replicated on every rank whatever the sharding: 20 x (5632^2 + 2048^2) x 4 B =
2.9 GB here; see docs/scale.md). Each rank reports its load time, scoring time, parameter bytes
it holds and peak RSS (``ru_maxrss``); rank 0 writes a JSON summary and the book to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time

import torch

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
              num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
              max_position_embeddings=512, tie_word_embeddings=False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make(path: str) -> int:
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    print(f"wrote {path}: {n / 1e9:.3f}B parameters")
    return 0


def prune(args) -> int:
    import fair_pruner as fp
    torch.set_num_threads(2)
    book = fp.ScoreBook.load(os.path.join(args.out, "book.safetensors"))
    plan = fp.allocate(book, params=0.3)
    dest = os.path.join(args.out, args.prune)
    t0 = time.perf_counter()
    if args.prune == "layered":
        fp.llm.prune_checkpoint(args.model, plan, dest, book=book, progress=False)
    else:
        fp.save_pretrained(fp.prune(fp.from_pretrained(args.model), plan, book=book), dest)
    print(json.dumps({"prune": args.prune, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(peak_rss_mb()),
                      "params_removed": round(plan.params_reduction, 4)}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make", metavar="DIR", help="write the synthetic model here and exit")
    ap.add_argument("--model", help="the --make directory")
    ap.add_argument("--out")
    ap.add_argument("--sharded", action="store_true", help="fp.llm.load_sharded (FSDP2)")
    ap.add_argument("--offload", action="store_true", help="with --sharded: CPU offload policy")
    ap.add_argument("--prune", choices=("whole", "layered"), default=None,
                    help="instead of scoring: prune --model with the book in --out at params=0.3 "
                         "and write it to --out/<mode>; whole = from_pretrained + prune + "
                         "save_pretrained, layered = fp.llm.prune_checkpoint")
    ap.add_argument("--checkpointing", action="store_true",
                    help="score with activation checkpointing (fp.score(..., checkpointing=True))")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    if args.make:
        return make(args.make)
    if args.prune:
        return prune(args)
    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    import fair_pruner as fp
    from fair_pruner.distributed import gather_objects, world
    rank, size = world()
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if args.sharded:
        model = fp.llm.load_sharded(args.model, cpu_offload=args.offload)
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    else:
        model = fp.from_pretrained(args.model)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 16, (1, args.seq), generator=g)}
               for _ in range(args.batches)][rank::size]
    t0 = time.perf_counter()
    book = fp.score(model, batches, classes=8, samples_per_class=8, projections=16,
                    reconstruction=False, progress=False, checkpointing=args.checkpointing)
    score_s = time.perf_counter() - t0
    mine = {"rank": rank, "load_s": round(load_s, 1), "score_s": round(score_s, 1),
            "param_bytes_held_mb": round(held / 2 ** 20), "peak_rss_after_load_mb":
            round(rss_loaded), "peak_rss_mb": round(peak_rss_mb()), "rss_at_start_mb": round(rss0)}
    ranks = gather_objects(mine) if size > 1 else [mine]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        book.save(os.path.join(args.out, "book.safetensors"))
        summary = {"world_size": size, "sharded": args.sharded, "offload": args.offload,
                   "checkpointing": args.checkpointing, "threads": args.threads,
                   "batches": args.batches, "seq": args.seq, "torch": torch.__version__,
                   "ranks": ranks}
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        print(json.dumps(summary))
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
