"""FSDP2 sharding of a causal LM for scoring models larger than one device.

:func:`shard` wraps every decoder layer, then the whole model, with PyTorch's own
``torch.distributed.fsdp.fully_shard`` (one FSDP unit per decoder layer, parameters split
across the ranks of the default process group; optionally offloaded to CPU memory). A sharded
model is scored by :func:`fair_pruner.score` like any other: the taps sit on submodules, so
their hooks see the unsharded forward, and the weight-aware signals gather one layer at a time
(:func:`fair_pruner.distributed.full_params`). The book equals the unsharded model's book
(tests/test_distributed.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed as dist
from ..errors import UnsupportedModelError
from .layout import find_layout


def shard(model: nn.Module, *, cpu_offload: bool = False, reshard_after_forward: bool = True
          ) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over the default process group and return it.

    Each decoder layer becomes one FSDP unit (all-gathered for its forward and its backward,
    freed after), the rest (embeddings, final norm, head) the root unit. ``cpu_offload`` keeps
    the shards in CPU memory between uses (``CPUOffloadPolicy``). The caller's model object is
    changed (its classes become ``FSDP<name>``, its parameters DTensors): that is what sharding
    means; score it, keep the book, and prune the unsharded checkpoint with the book.
    """
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        raise UnsupportedModelError("fair_pruner.llm.shard needs an initialised torch.distributed "
                                    "process group (run under torchrun and call "
                                    "torch.distributed.init_process_group first)")
    if dist.is_sharded(model):
        raise UnsupportedModelError(f"{type(model).__name__} is already sharded with FSDP2")
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    layout = find_layout(model)
    # pinned host memory needs a CUDA driver; on a CPU-only machine the shards are host memory anyway
    policy = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
              else OffloadPolicy())
    for block in layout.layers:
        fully_shard(model.get_submodule(block.name), offload_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, offload_policy=policy, reshard_after_forward=reshard_after_forward)
    return model

