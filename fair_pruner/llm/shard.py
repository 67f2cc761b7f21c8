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

import os

import torch
import torch.nn as nn

from .. import distributed as dist
from ..errors import UnsupportedModelError
from .checkpoint import checkpoint_reader, fused_expert_sources, meta_model
from .layout import find_layout


def shard(model: nn.Module, *, cpu_offload: bool = False, reshard_after_forward: bool = True
          ) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over the default process group and return it.

    Each decoder layer becomes one FSDP unit (all-gathered for its forward and its backward,
    freed after), so do an untied input embedding and LM head; the rest (final norm, a tied
    embedding) is the root unit. ``cpu_offload`` keeps the shards in CPU memory between uses (``CPUOffloadPolicy``). The caller's model object is
    changed (its classes become ``FSDP<name>``, its parameters DTensors): that is what sharding
    means; score it, keep the book, and prune the checkpoint with the book
    (:func:`fair_pruner.llm.prune_checkpoint`).
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
    units = [model.get_submodule(block.name) for block in layout.layers]
    # Untied input embedding and LM head as units of their own: in the root they would stay
    # gathered for the whole forward + backward (2 x vocab x hidden unsharded on every rank).
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and head is not None and \
            getattr(emb, "weight", None) is not getattr(head, "weight", None):
        units += [emb, head]
    for unit in units:
        fully_shard(unit, offload_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, offload_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def load_sharded(directory, *, dtype=None, cpu_offload: bool = False,
                 device=None) -> nn.Module:
    """Build the causal LM in ``directory`` already FSDP2-sharded, reading from its safetensors
    files only this rank's rows of each parameter: no rank ever holds the whole model.

    The model is constructed with its parameters on the meta device, sharded with
    :func:`shard` (one unit per decoder layer plus the root), materialised as empty local
    shards on ``device`` (default: the current CUDA device, else CPU) and filled from the
    checkpoint slice by slice (``safe_open(...).get_slice``). ``dtype`` defaults to the
    checkpoint's. The result scores with :func:`fair_pruner.score` exactly like
    ``shard(from_pretrained(directory))`` (tests/test_distributed.py). Needs a checkpoint whose
    tensor names are the model's parameter names, or per-expert MoE tensors that transformers
    fuses on load (fused here too, reading only this rank's experts); other on-load renames are
    refused with the name that is missing.
    """
    import torch.distributed as tdist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not (tdist.is_available() and tdist.is_initialized()):
        raise UnsupportedModelError("fair_pruner.llm.load_sharded needs an initialised "
                                    "torch.distributed process group (run under torchrun)")
    directory = os.fspath(directory)
    where, shapes, read = checkpoint_reader(directory)
    model, _ = meta_model(directory, dtype)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    shard(model, cpu_offload=cpu_offload)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    model.to_empty(device="cpu" if cpu_offload else device)
    with torch.no_grad():
        for n, b in model.named_buffers():          # to_empty left them uninitialised
            if n in buffers:
                b.copy_(buffers[n])
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    p.shape, p.device_mesh, p.placements)
                idx = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            else:
                idx = tuple(slice(0, s) for s in p.shape)
            if name in where:
                got = shapes[name]
                if got != tuple(p.shape):
                    raise UnsupportedModelError(
                        f"load_sharded: {name} is {got} in {directory} but {tuple(p.shape)} in "
                        "the model its config builds")
                if local.numel():
                    local.copy_(read(name, idx).to(local.dtype))
                continue
            fused = fused_expert_sources(name, p.shape, where)
            if fused is None:
                raise UnsupportedModelError(
                    f"load_sharded: {directory} has no tensor {name!r} (the checkpoint's names "
                    "differ from the model's: transformers converts them on load, and "
                    "load_sharded knows only per-expert gate/up/down (w1/w3/w2) tensors fused "
                    "into gate_up_proj / down_proj); load the model whole and call "
                    "fair_pruner.llm.shard(model) instead")
            for row, e in enumerate(range(idx[0].start, idx[0].stop)):
                parts = [read(k) for k in fused(e)]
                local[row].copy_(torch.cat(parts, dim=0)[idx[1:]].to(local.dtype))
    return model
