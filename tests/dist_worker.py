"""One rank of a distributed scoring test (run by tests/test_distributed.py under torchrun)."""
import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fair_pruner as fp  # noqa: E402
from helpers import tiny_lm, token_batches  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bad-rank", type=int, default=-1)
    ap.add_argument("--budget", type=int, default=4 << 30, help="CNN memory_budget (bytes)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, size = dist.get_rank(), dist.get_world_size()
    if a.model == "cnn":
        from helpers import cnn_case
        model, loader, kw = cnn_case(a.budget)
        try:
            book = fp.score(model, loader[rank::size], **kw)
        except fp.FairPrunerError as exc:
            with open(f"{a.out}.rank{rank}.err", "w") as fh:
                fh.write(str(exc))
            return 3
        if rank == 0:
            book.save(a.out)
        dist.destroy_process_group()
        return 0
    m = tiny_lm(a.model)
    batches = token_batches(n=7)[rank::size]
    if rank == a.bad_rank:
        batches[0] = {"input_ids": batches[0]["input_ids"].float()}    # not token ids
    try:
        book = fp.score(m, batches, classes=8, samples_per_class=8, projections=16,
                        progress=False)
    except fp.FairPrunerError as exc:
        with open(f"{a.out}.rank{rank}.err", "w") as fh:
            fh.write(str(exc))
        return 3
    if rank == 0:
        book.save(a.out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
