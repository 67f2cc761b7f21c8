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
    ap.add_argument("--shard", choices=["none", "fsdp", "offload", "fsdp-ckpt"], default="none",
                    help="FSDP2-shard the LM (fp.llm.shard) before scoring; fsdp-ckpt: and "
                         "score with activation checkpointing")
    ap.add_argument("--batches", type=int, default=0, help="token batches in all (0: default)")
    ap.add_argument("--load-sharded", default=None, metavar="DIR",
                    help="build the LM already sharded from this checkpoint (fp.llm.load_sharded)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, size = dist.get_rank(), dist.get_world_size()
    if a.model == "cnn":
        from helpers import cnn_case
        model, loader, kw = cnn_case(a.budget)
        loader = loader[:a.batches] if a.batches else loader
        return score_and_save(model, loader[rank::size], kw, a.out, rank)
    # a sharded model's forwards are collectives: the same number of batches on every rank
    batches = token_batches(n=a.batches or (7 if a.shard == "none" else 6))[rank::size]
    if rank == a.bad_rank:
        batches[0] = {"input_ids": batches[0]["input_ids"].float()}    # not token ids
    if a.load_sharded:
        import json
        model = fp.llm.load_sharded(a.load_sharded, cpu_offload=a.shard == "offload")
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        with open(f"{a.out}.rank{rank}.json", "w") as fh:
            json.dump({"full_bytes": full, "local_bytes": local, "prune_refused": "n/a"}, fh)
        return score_and_save(model, batches, dict(classes=8, samples_per_class=8,
                                                   projections=16, progress=False), a.out, rank)
    model = tiny_lm(a.model)
    if a.shard != "none":
        shard_and_check(model, a.shard == "offload", a.out, rank)
    kw = dict(classes=8, samples_per_class=8, projections=16, progress=False)
    if a.shard == "fsdp-ckpt":
        kw["checkpointing"] = True
    return score_and_save(model, batches, kw, a.out, rank)


def shard_and_check(model, offload, out, rank):
    """Shard with FSDP2; record this rank's parameter bytes and whether prune is refused."""
    import json
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    fp.llm.shard(model, cpu_offload=offload)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    try:
        fp.prune(model, fp.Plan(alpha=None, strategy="x", removed={}, sizes={}, params_before=0,
                                params_after=0, flops_before=0, flops_after=0))
        refused = ""
    except fp.FairPrunerError as exc:
        refused = str(exc)
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump({"full_bytes": full, "local_bytes": local, "prune_refused": refused}, fh)


def score_and_save(model, batches, kw, out, rank):
    """Score this rank's shard; rank 0 writes the book, a failing rank writes its error."""
    try:
        book = fp.score(model, batches, **kw)
    except fp.FairPrunerError as exc:
        with open(f"{out}.rank{rank}.err", "w") as fh:
            fh.write(str(exc))
        return 3
    if rank == 0:
        book.save(out)
    # every rank past its work before any tears down: gloo aborted a rank ("terminate called
    # without an active exception") when others destroyed the group while rank 0 was saving
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
