"""Data-parallel calibration on ``torch.distributed``: every rank scores its shard, the book is
the single-process book of the union.

Convention: rank r's loader yields its own shard (``batches[r::world_size]``, or a
``DistributedSampler``). The union is read in *interleaved* order: step i of rank 0, step i of
rank 1, ..., then step i + 1 (ranks may have different numbers of batches). A single process
given that order computes the same book.

* Sums (Taylor terms, moments, Gram matrices, token counts) are all-reduced: equal to the
  single-process sums to float rounding.
* U samples: every rank replays the seeded reservoir over the labels of the whole union (labels
  are cheap to gather; an LM's first pass reads them anyway), so every rank knows which sample
  ends in which (class, slot); each stores only its own final samples, and the sample buffers
  are summed (each slot is written by exactly one rank) onto one rank per tap, which computes
  that tap's U-Score from the same samples as in one process and shares it: the U-Scores are
  split over the ranks, not computed by each.
* A rank that fails tells the others at the next agreement point (:func:`agree`), so every rank
  raises instead of waiting forever in a collective.

Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``, see
:mod:`fair_pruner.llm.shard`) are scored the same way: the taps sit on submodules, so their hooks
see the unsharded forward; what reads weights outside the forward (weight-aware signals, surgery)
gathers one FSDP unit at a time through :func:`full_params`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .errors import FairPrunerError


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    return world()[1] > 1


def agree(error: Optional[BaseException]) -> None:
    """Collective: raise on every rank if any rank failed (with that rank's message)."""
    import torch.distributed as dist
    if not active():
        if error is not None:
            raise error
        return
    rank, size = world()
    msgs: List[Optional[str]] = [None] * size
    dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if error is not None:
        raise error
    if failed:
        r, m = failed[0]
        raise FairPrunerError(f"rank {r} of {size} failed during distributed calibration: {m}")


def guarded(work, reduce=None):
    """``work()``; with ``reduce`` (data parallel), a failure of any rank is raised on every
    rank (:func:`agree`) before ``reduce()`` enters its collectives. Returns ``work()``'s value."""
    failure = result = None
    try:
        result = work()
    except Exception as exc:      # noqa: BLE001 - re-raised on every rank by agree
        if reduce is None:
            raise
        failure = exc
    if reduce is not None:
        agree(failure)
        reduce()
    return result


def check_every_rank_has_data(batches_per_rank: Sequence[int]) -> None:
    """Raise (identically on every rank: the counts were gathered) when a rank has no batches;
    otherwise its empty pass surfaces later as a misleading "never ran" error."""
    empty = [r for r, n in enumerate(batches_per_rank) if n == 0]
    if empty:
        from .errors import CalibrationDataError
        raise CalibrationDataError(
            f"rank {empty[0]} of {len(batches_per_rank)} has no calibration batches (ranks "
            f"without any: {empty}): give every rank at least one, e.g. "
            "batches[rank::world_size] over at least world_size batches")


def gathered(work) -> List[Any]:
    """``work()`` on every rank, the results gathered in rank order; a failure on any rank
    raises on every rank (before the gather)."""
    return gather_objects(guarded(work, (lambda: None) if active() else None))


def sum_samples(taps) -> None:
    """Bring the U sample buffers (``buf``, ``filled``) of sketch taps together, each on the
    one rank that will finish its U-Score (:func:`u_owners`; stored as ``tap.u_rank``): each
    slot was stored by one rank and a rank that stored none of a tap's samples contributes
    zeros, so the sum is the single-process buffer. The other ranks drop their copy:
    :func:`fair_pruner.engine.finish_u_all` then computes each U-Score once, not once per
    rank, and shares the results."""
    rank, size = world()
    shapes = gather_objects([None if t.buf is None else
                             (tuple(t.buf.shape), str(t.buf.dtype), str(t.buf.device))
                             for t in taps])
    agreed = []
    for i in range(len(taps)):
        known = [sh[i] for sh in shapes if sh[i] is not None]
        # buffers grow with the slots a rank stored: every rank takes the largest
        agreed.append(max(known, key=lambda sh: sh[0][1]) if known else None)
    owners = u_owners([0 if sh is None else math.prod(sh[0]) for sh in agreed], size)
    for t, sh, owner in zip(taps, agreed, owners):
        t.u_rank = owner
        if sh is None:          # no rank stored any: finish_u on the owner says so
            continue
        shape, dtype, device = sh
        t.grow_samples(shape[1], (shape[0], shape[2], shape[3]),
                       getattr(torch, dtype.replace("torch.", "")),
                       t.buf.device if t.buf is not None else device)
        sum_(t.buf, owner)
        sum_(t.filled, owner)
        if rank != owner:
            t.buf = t.filled = None


def u_owners(costs: Sequence[int], size: int) -> List[int]:
    """The rank (of ``size``) that finishes each tap's U-Score, given each tap's sample count:
    largest first onto the least-loaded rank (ties to the lower rank), so every rank computes
    the same assignment from the same ``costs``."""
    load = [0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += max(1, costs[i])
    return owner


def gather_objects(obj: Any) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    import torch.distributed as dist
    if not active():
        return [obj]
    out: List[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def sum_(t: Optional[Tensor], dst: Optional[int] = None) -> Optional[Tensor]:
    """All-reduce ``t`` in place (sum) and return it, or with ``dst`` reduce it onto that rank
    only (the others' ``t`` is then unspecified); bool tensors are OR-ed. The reduction runs
    on the tensor's own device (CPU tensors for gloo)."""
    import torch.distributed as dist
    if t is None or not active():
        return t
    op = dist.all_reduce if dst is None else (lambda x: dist.reduce(x, dst=dst))
    if t.dtype == torch.bool:
        x = t.to(torch.uint8)
        op(x)
        t.copy_(x > 0)
        return t
    op(t)
    return t


def sum_many_(tensors: Sequence[Optional[Tensor]]) -> None:
    """All-reduce (sum) several tensors in place with one collective per dtype and device
    instead of one each (a CNN's dozens of per-producer sums): flattened into one buffer."""
    import torch.distributed as dist
    if not active():
        return
    by_kind: Dict[Tuple[torch.dtype, torch.device], List[Tensor]] = {}
    for t in tensors:
        if t is not None:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, _), ts in by_kind.items():
        if dtype == torch.bool:
            for t in ts:
                sum_(t)
            continue
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def interleave(per_rank: Sequence[Sequence[Any]]) -> List[Tuple[int, int, Any]]:
    """The union in interleaved order: (rank, local index, item) for step 0 of every rank, then
    step 1, ..."""
    out = []
    for i in range(max((len(x) for x in per_rank), default=0)):
        for r, items in enumerate(per_rank):
            if i < len(items):
                out.append((r, i, items[i]))
    return out


class ReplayedReservoir:
    """The seeded reservoir of the whole union, replayed on every rank; ``offer`` returns, for
    this rank's batch, only the rows that end in the reservoir (nothing is stored twice)."""

    def __init__(self, reservoir, labels_per_rank: Sequence[Sequence[List[int]]]):
        rank, _ = world()
        starts: Dict[Tuple[int, int], int] = {}
        n = 0
        for r, i, labels in interleave(labels_per_rank):
            starts[(r, i)] = n
            reservoir.offer(labels, n)
            n += len(labels)
        self._res = reservoir
        self._final = reservoir.final
        self._starts = [starts[(rank, i)] for i in range(len(labels_per_rank[rank]))]
        self._batch = 0
        self.total_rows = n
        self.batches = sum(len(x) for x in labels_per_rank)
        # This rank's final samples keyed by its own running sample index (later U passes).
        self.final: Dict[int, Tuple[int, int]] = {}
        off = 0
        for i, labels in enumerate(labels_per_rank[rank]):
            for row in range(len(labels)):
                hit = self._final.get(self._starts[i] + row)
                if hit is not None:
                    self.final[off + row] = hit
            off += len(labels)

    def __getattr__(self, name):        # classes, index, check(), ... of the union's reservoir
        return getattr(self._res, name)

    def offer(self, labels: List[int], first_index: int) -> List[Tuple[int, int, int]]:
        g0 = self._starts[self._batch]
        self._batch += 1
        rows = []
        for row in range(len(labels)):
            hit = self._final.get(g0 + row)
            if hit is not None:
                rows.append((row, hit[0], hit[1]))
        return rows

    def counts(self) -> List[int]:
        return self._res.counts()


# --------------------------------------------------------------------------------------------
# FSDP2-sharded models
# --------------------------------------------------------------------------------------------

def _fsdp_module_class():
    import sys
    if "torch.distributed.fsdp" not in sys.modules:
        # no model can be FSDP2-sharded before FSDP is imported (importing it costs ~0.75 s)
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:         # torch built without distributed
        return None
    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` was wrapped by FSDP2's ``fully_shard``."""
    cls = _fsdp_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def plain_type(module: nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps it for a subclass named ``FSDP<name>``."""
    cls = _fsdp_module_class()
    t = type(module)
    if cls is not None and isinstance(module, cls):
        for base in t.__mro__[1:]:
            if not issubclass(base, cls) and issubclass(base, nn.Module):
                return base
    return t


def fsdp_units(model: nn.Module) -> List[Tuple[nn.Module, Set[int]]]:
    """Every FSDP2 unit of ``model`` with the ids of the parameters it manages: those of its
    subtree outside nested units."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    out = []
    for u in model.modules():
        if isinstance(u, cls):
            nested = {id(p) for v in u.modules() if v is not u and isinstance(v, cls)
                      for p in v.parameters()}
            out.append((u, {id(p) for p in u.parameters()} - nested))
    return out


@contextlib.contextmanager
def full_params(model: nn.Module, module: Optional[nn.Module] = None) -> Iterator[None]:
    """Inside, every parameter of ``module`` (default: the whole model) is a plain, unsharded
    tensor: the FSDP2 units managing them are all-gathered (collective: every rank must enter
    with the same ``module``) and resharded on exit. A no-op for a model that is not sharded."""
    units = fsdp_units(model)
    if not units:
        yield
        return
    mine = {id(p) for p in (model if module is None else module).parameters()}
    need = [m for m, managed in units if managed & mine]
    done = []
    try:
        for m in need:
            m.unshard()
            done.append(m)
        yield
    finally:
        for m in reversed(done):
            m.reshard()


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Surgery and saving copy and slice whole parameters: refuse an FSDP2-sharded model (a
    clear error instead of FSDP's deepcopy assertion), with the way out."""
    if is_sharded(model):
        raise FairPrunerError(
            f"fp.{what} of an FSDP2-sharded model ({plain_type(model).__name__}) is not "
            "supported: it needs whole parameters. Save the book on rank 0 and prune the "
            "checkpoint the model came from with fair_pruner.llm.prune_checkpoint(src, plan, "
            f"out, book=book) (one decoder layer at a time), or load it in one process and call "
            f"fp.{what} there (the book's fingerprint is the unsharded model's)")
