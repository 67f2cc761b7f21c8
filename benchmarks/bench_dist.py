"""Data-parallel scoring of SmolLM2-135M on the CPU: 1 process vs N processes (1 thread each).

    python benchmarks/bench_dist.py --out /tmp/dist1 --seqs 16                       # 1 process
    torchrun --nproc_per_node 2 benchmarks/bench_dist.py --out /tmp/dist2 --seqs 16   # 2 ranks

Every rank loads the model, takes every N-th of the first ``--seqs`` 512-token sequences of
*Sense and Sensibility* and runs ``fp.score`` (reconstruction statistics included); each rank
reports its scoring time and peak RSS, rank 0 writes the book and a JSON summary to ``--out``.
Compare the two books with ``--compare DIR1 DIR2``.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import austen, smollm2_gguf  # noqa: E402


def compare(a: str, b: str) -> int:
    import fair_pruner as fp
    x = fp.ScoreBook.load(os.path.join(a, "book.safetensors"))
    y = fp.ScoreBook.load(os.path.join(b, "book.safetensors"))
    same_u = all(torch.equal(g.u, h.u) for g, h in zip(x.groups, y.groups))
    r = max(float(((g.r - h.r).abs() / h.r.abs().clamp_min(1e-30)).max())
            for g, h in zip(x.groups, y.groups))
    plans = all(fp.allocate(x, params=p).removed == fp.allocate(y, params=p).removed
                for p in (0.1, 0.2, 0.3))
    print(json.dumps({"u_identical": same_u, "r_max_rel_diff": r, "same_plans_10_20_30": plans}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--austen", default="/tmp/janeausten")
    ap.add_argument("--compare", nargs=2, metavar="DIR")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    torch.set_num_threads(1)
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    import fair_pruner as fp
    from fair_pruner.distributed import gather_objects, world
    from fair_pruner.llm import load_model, text_batches

    rank, size = world()
    model, tok = load_model(smollm2_gguf())
    ids = torch.tensor(tok(austen(args.austen, "sensesensibility"),
                           add_special_tokens=False)["input_ids"])
    batches = text_batches(ids, 512, args.seqs)[rank::size]
    t = time.perf_counter()
    book = fp.score(model, batches, progress=False)
    secs = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    ranks = gather_objects({"rank": rank, "seconds": secs, "peak_rss_mb": rss,
                            "sequences": len(batches)})
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        book.save(os.path.join(args.out, "book.safetensors"))
        res = {"world_size": size, "threads_per_rank": 1, "total_sequences": args.seqs,
               "ranks": ranks}
        with open(os.path.join(args.out, "result.json"), "w") as fh:
            json.dump(res, fh, indent=2)
        print(json.dumps(res))
    if size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
