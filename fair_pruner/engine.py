"""The calibration engine every adapter runs: one forward + backward per batch for all taps.

An adapter (CNNs through Torch-Pruning's graph in :mod:`fair_pruner.calibrate`, Hugging Face
causal LMs in :mod:`fair_pruner.llm.calibrate`) turns its loader into :class:`Batch` objects and
its units into :class:`SketchTap` objects, and :func:`gradient_pass` does the rest, so a signal
means the same thing everywhere (see ``docs/method.md``):

* :func:`split_batch` / :func:`call_model` / :func:`logits_of`: what a batch and an output are.
* :class:`Reservoir`: seeded per-class reservoirs of sample slots, replayable on later passes.
* :func:`store_samples` -> :func:`finish_u`: the U-Score of a *sketch tap* (anything with
  ``name``, ``to_units_last(z) -> [rows, units, D]``, ``directions``, ``buf`` and ``u``; see
  :class:`SketchTap`): the selected rows are projected onto P seeded directions (sliced W1; D = 1
  needs none) as they arrive, then sorted into per-class quantile sketches and reduced to the
  max over class pairs of W1.
* :func:`preserved` / :func:`working_model`: the caller's model is left exactly as it was.
"""
from __future__ import annotations

import copy
import random
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .distributed import active as distributed_active, gathered, is_sharded, world
from .errors import CalibrationDataError, NonFiniteError, UnsupportedModelError


@dataclass(frozen=True)
class Sampling:
    """How U samples are drawn and sketched: K classes x S slots, P projections."""
    classes: Tuple[int, ...]
    per_class: int          # S
    projections: int        # P
    u_mode: str             # "sliced" or "pooled"
    seed: int
    rows: Optional[int] = None  # sample rows per class once known (after pass 1): <= S

    @property
    def K(self) -> int:
        return len(self.classes)


@dataclass
class Batch:
    """One calibration batch as the engine sees it (an adapter builds these from its loader)."""
    inputs: Any                          # what the model is called with (call_model)
    labels: List[int]                    # the class of each sample row (see Tap.sample_rows)
    loss: Callable[[Any], Tensor]        # model output -> scalar (summed) loss
    valid: Optional[Tensor] = None       # adapter data for Tap.accumulate (e.g. a token mask)


class SketchTap:
    """A tap: where one set of units is observed, and everything accumulated there.

    An adapter subclasses it for its kind of unit. ``install`` hooks the model so that the
    engine sees the tapped tensor ``z`` (and may hand the model a replacement); ``sample_rows``
    lays ``z`` out as one row per labelled sample; ``to_units_last`` splits a row into units and
    features; ``accumulate`` folds one batch's ``z`` and ``dL/dz`` into the tap's statistics.
    ``buf`` / ``directions`` / ``u`` hold the U samples, the sliced-W1 directions and the U-Score.
    """

    def __init__(self, name: str):
        self.name = name
        self.directions: Optional[Tensor] = None
        self.buf: Optional[Tensor] = None   # [K, <= S, units, P] projected class samples
        self.filled: Optional[Tensor] = None  # [K, <= S] bool: which places were stored
        self.u: Optional[Tensor] = None
        self.ran = False

    where: str = ""                         # for messages, e.g. "the output of conv1"

    def grow_samples(self, rows: int, shape: Tuple[int, int, int], dtype: torch.dtype,
                     device) -> None:
        """Give ``buf`` [K, rows, C, P] (and ``filled`` [K, rows]) at least ``rows`` slots per
        class, keeping what is stored. New slots are left unwritten in one process (zero-filling
        a ResNet-18's 640 MB of buffers at 32 samples per class cost a third of its forward +
        backward): only stored slots are ever read (quantiles read each class's first
        counts[k] rows, and finish_u checks ``filled`` for them). Under torch.distributed they
        are zeros, as the ranks' buffers are summed slot by slot."""
        if self.buf is not None and self.buf.shape[1] >= rows:
            return
        K, C, P = shape
        alloc = torch.zeros if distributed_active() else torch.empty
        buf = alloc((K, rows, C, P), dtype=dtype, device=device)
        filled = torch.zeros((K, rows), dtype=torch.bool)
        if self.buf is not None:
            buf[:, :self.buf.shape[1]] = self.buf
            filled[:, :self.filled.shape[1]] = self.filled
        self.buf, self.filled = buf, filled

    def install(self, model: nn.Module, on_tensor: Callable[[Tensor], Tensor]):
        """Hook ``model``; ``on_tensor(z)`` returns what the model uses in place of ``z``.
        Returns a handle with ``remove()``."""
        raise NotImplementedError  # pragma: no cover - interface

    def sample_rows(self, z: Tensor, rows: Optional[int] = None) -> Tensor:
        """[rows, ...]: ``z`` with one row per entry of the batch's ``labels`` (``rows`` of
        them, when known)."""
        return z

    def to_units_last(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        """[rows, units, D]: one row per sample, D features per unit."""
        raise NotImplementedError

    def downstream(self, z: Tensor) -> Tensor:
        """What the model computes on from ``z`` (a copy where a later in-place op would
        overwrite the tapped tensor)."""
        return z

    def accumulate(self, z: Tensor, g: Tensor, batch: Batch, bi: int) -> None:
        raise NotImplementedError  # pragma: no cover - interface


def recomputing() -> bool:
    """True while autograd runs a backward (e.g. activation checkpointing recomputing a layer's
    forward): forward hooks must then repeat their tensor ops but record nothing again."""
    return torch._C._current_graph_task_id() != -1


def _never_unpacked(_):
    raise RuntimeError("internal: a graph traced for its structure was differentiated")


def structure_only():
    """Autograd records the graph (``grad_fn`` nodes with their shapes, dims and split sizes)
    but saves none of the tensors a backward would need: for forwards whose graph is only
    walked (Torch-Pruning's trace, the probe), whose saved activations would otherwise live as
    long as the graph does (~0.8 GB for one 224x224 image through ViT-H/14)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: None, _never_unpacked)


def gradient_pass(model: nn.Module, taps: Sequence[SketchTap], batches: Iterable[Batch],
                  res: Reservoir, sampling: Sampling, sketch: Sequence[SketchTap] = (),
                  progress: bool = True, total: Optional[int] = None,
                  desc: str = "fair_pruner: calibrating", params: Sequence[Tensor] = (),
                  on_param_grads: Optional[Callable[[Sequence[Optional[Tensor]]], None]] = None
                  ) -> int:
    """One forward + backward per batch feeds every tap (the R-Score's Taylor terms and the
    moments, via ``Tap.accumulate``) and stores the reservoir-selected U samples of the taps in
    ``sketch``. Gradients come from ``torch.autograd.grad`` w.r.t. the tapped tensors only (and
    the leaf tensors in ``params``, handed per batch to ``on_param_grads``), so no parameter's
    ``.grad`` is touched. Returns the number of sample rows seen."""
    from tqdm.auto import tqdm

    live: Dict[int, Tensor] = {}
    rows_now: List[Tuple[int, int, int]] = []
    n_rows = [0]                          # the current batch's sample rows (its labels)
    sketched = {id(t) for t in sketch}

    def make(i: int, tap: SketchTap):
        def on_tensor(x: Tensor) -> Tensor:
            z = x if x.requires_grad else x.detach().requires_grad_(True)
            if recomputing():       # the gradient flows to the z of the first forward
                return tap.downstream(z)
            live[i] = z
            if rows_now and id(tap) in sketched:
                with torch.no_grad():
                    store_samples(tap, tap.sample_rows(z.detach(), n_rows[0]), rows_now,
                                  sampling, n_rows[0])
            return tap.downstream(z)
        return on_tensor

    handles = [t.install(model, make(i, t)) for i, t in enumerate(taps)]
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    seen = 0
    try:
        for bi, batch in enumerate(batches):
            rows_now[:] = res.offer(batch.labels, seen)
            n_rows[0] = len(batch.labels)
            seen += len(batch.labels)
            live.clear()
            with torch.enable_grad():
                out = call_model(model, batch.inputs)
                loss = batch.loss(out)
                if not torch.isfinite(loss):
                    bad = next((t for i, t in enumerate(taps) if i in live
                                and not torch.isfinite(live[i]).all()), None)
                    if bad is not None:
                        raise NonFiniteError(f"NaN/inf activations at {bad.where} on batch {bi}: "
                                             "check the model weights and the calibration inputs")
                    raise NonFiniteError(f"the loss is {loss.item()} on batch {bi}: check the "
                                         "model, the inputs and the labels (label out of range?)")
                order = [i for i in range(len(taps)) if i in live]
                grads = torch.autograd.grad(loss, [live[i] for i in order] + list(params),
                                            allow_unused=True)
            del out, loss
            if params:
                on_param_grads(grads[len(order):])
                grads = grads[:len(order)]
            for i, g in zip(order, grads):
                z = live[i].detach()
                taps[i].ran = True
                taps[i].accumulate(z, torch.zeros_like(z) if g is None else g, batch, bi)
            live.clear()
            del grads
            bar.update(1)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    for t in taps:
        if not t.ran:
            raise UnsupportedModelError(f"{t.name} never ran during calibration; pass it in "
                                        "ignore= or fix the model's forward")
    return seen


_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_INPUT_KEYS = ("inputs", "input", "x", "pixel_values", "images", "image")


def split_batch(batch: Any) -> Tuple[Any, Optional[Tensor]]:
    """(inputs, labels) from a tuple/list ``(inputs, labels, ...)`` or a dict; labels may be None."""
    if isinstance(batch, dict):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        rest = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        key = next((k for k in _INPUT_KEYS if k in rest), None)
        return (rest[key] if key is not None and len(rest) == 1 else rest), labels
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        return batch[0] if batch else batch, None
    return batch, None


def map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def first_tensor(obj: Any) -> Optional[Tensor]:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits_of(out: Any) -> Tensor:
    """The logits tensor of a model output (tensor, tuple, dict or ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out:
            return out["logits"]
    t = first_tensor(out if not hasattr(out, "to_tuple") else out.to_tuple())
    if t is None:
        raise UnsupportedModelError("the model's output holds no tensor; pass a loss_fn that "
                                    "takes the raw output")
    return t


class Reservoir:
    """Seeded per-class reservoir of sample slots, decided sample by sample in arrival order."""

    def __init__(self, classes: Sequence[int], per_class: int, seed: int):
        self.index = {int(c): k for k, c in enumerate(classes)}
        self.per_class = per_class
        self.seen = [0] * len(classes)
        self.rng = random.Random(seed)
        self.final: Dict[int, Tuple[int, int]] = {}   # global sample index -> (class k, slot)
        self._slot_owner: Dict[Tuple[int, int], int] = {}

    def offer(self, labels: List[int], first_index: int) -> List[Tuple[int, int, int]]:
        """Rows of this batch to store now: (row, class k, slot)."""
        rows = []
        for row, y in enumerate(labels):
            k = self.index.get(y)
            if k is None:
                continue
            self.seen[k] += 1
            n = self.seen[k]
            slot = n - 1 if n <= self.per_class else self.rng.randrange(n)
            if slot < self.per_class:
                gidx = first_index + row
                old = self._slot_owner.get((k, slot))
                if old is not None:
                    del self.final[old]
                    if old >= first_index:
                        # Replaced within this batch: store the slot once (an indexed write of
                        # two rows to one slot keeps an unspecified one of them on a GPU).
                        rows[:] = [r for r in rows if r[1:] != (k, slot)]
                self._slot_owner[(k, slot)] = gidx
                self.final[gidx] = (k, slot)
                rows.append((row, k, slot))
        return rows

    def counts(self) -> List[int]:
        return [min(n, self.per_class) for n in self.seen]


@contextmanager
def preserved(model: nn.Module, restore_buffers: bool):
    """Restore every module's train/eval flag (and buffers if asked) on exit."""
    modes = {m: m.training for m in model.modules()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()} if restore_buffers else None
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t  # per module: model.train(t) would overwrite children's own flags
        if bufs is not None:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(bufs[n])


def module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def check_sampling(samples_per_class, projections) -> None:
    """Shared argument checks of every scorer's U-Score sampling."""
    if not isinstance(samples_per_class, int) or samples_per_class < 2:
        raise CalibrationDataError("samples_per_class must be an int >= 2")
    if not isinstance(projections, int) or projections < 1:
        raise CalibrationDataError("projections must be an int >= 1")


def copy_model(model: nn.Module, share_tensors: bool = False) -> nn.Module:
    """``copy.deepcopy(model)``, also for models that cache autograd results in attributes
    (timm's LeViT keeps non-leaf attention-bias tensors in a dict, which deepcopy refuses):
    those tensors are copied detached; the model itself is not touched. ``share_tensors``:
    a new module tree over the same parameter and buffer tensors (for a structural rewrite
    of a copy that never writes them: no second copy of a large model's weights)."""
    memo: Dict[int, Any] = {}
    if share_tensors:
        for t in list(model.parameters()) + list(model.buffers()):
            memo[id(t)] = t
    for m in model.modules():
        for v in vars(m).values():
            vals = list(v.values()) if isinstance(v, dict) else (
                list(v) if isinstance(v, (list, tuple)) else [v])
            for t in vals:
                if isinstance(t, Tensor) and not t.is_leaf:
                    memo[id(t)] = t.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be copied with copy.deepcopy ({exc}); fair_pruner "
            "copies the model to leave yours untouched. Make it deep-copyable (e.g. no "
            "tensors with autograd history or open handles in module attributes)") from None


def working_model(model: nn.Module, device) -> Tuple[nn.Module, torch.device]:
    """The model to calibrate on ``device`` (default: where it lives): the model itself, or a
    copy when it lives elsewhere, so the caller's model is never moved."""
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{len(meta)} parameters/buffers of this model are on the meta device (e.g. "
            f"{meta[0]!r}): they hold no values to calibrate on. Load the weights first (e.g. "
            "model.to_empty(device=...) then load_state_dict, or fp.llm.load_sharded for a "
            "checkpoint)")
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        device = torch.device(device) if device is not None else model_device
    except (RuntimeError, TypeError) as exc:
        raise CalibrationDataError(f"device={device!r} is not a torch device ({exc}); pass "
                                   "e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type != "cpu" and device != model_device:
        mod = getattr(torch, device.type, None)
        ok = mod is not None and getattr(mod, "is_available", lambda: True)()
        if ok and device.index is not None and hasattr(mod, "device_count"):
            ok = device.index < mod.device_count()
        if not ok:
            raise CalibrationDataError(
                f"device={str(device)!r} is not available on this machine (torch sees "
                f"{torch.cuda.device_count()} CUDA devices); pass device='cpu' or leave "
                "device= unset to calibrate where the model lives")
    if device != model_device and is_sharded(model):
        raise UnsupportedModelError(
            f"device={str(device)!r}: an FSDP2-sharded model is scored where its shards live "
            f"({model_device}); a sharded model cannot be copied to another device. Drop device= "
            "(or shard it there)")
    return (model if device == model_device else copy_model(model).to(device)), device


def stored_dim(D: int, projections: int, u_mode: str) -> int:
    """Coordinates stored per unit and sample for D features: 1 (a scalar, or ``pooled``), the
    D features themselves where D <= P (projected onto the P directions only in
    :func:`finish_u`: storing P > D projections of a D-vector costs P / D times the memory and
    the writes), else the P projections."""
    if D == 1 or u_mode == "pooled":
        return 1
    return D if D <= projections else projections


def sketch_features(p: "SketchTap", z: Tensor, projections: int, u_mode: str, seed: int) -> Tensor:
    """[B, C, stored_dim] what is stored of each sample: its scalar, its D features (D <= P,
    projected later), or its projections onto P seeded directions (sliced W1)."""
    zz = p.to_units_last(z.detach())
    D = zz.shape[-1]
    if D == 1:
        return zz
    if u_mode == "pooled":
        return zz.float().mean(dim=-1, keepdim=True)
    if p.directions is None or p.directions.shape[0] != D:
        g = torch.Generator().manual_seed(module_seed(seed, p.name))
        theta = torch.randn(D, projections, generator=g)
        p.directions = F.normalize(theta, dim=0).to(device=z.device)
    if stored_dim(D, projections, u_mode) == D:        # projected in finish_u
        return zz
    return torch.matmul(zz.to(p.directions.dtype), p.directions)


def store_samples(p: "SketchTap", z: Tensor, rows: List[Tuple[int, int, int]],
                  sampling: "Sampling", batch_rows: Optional[int] = None) -> None:
    """Project the selected rows of ``z`` (only those) into their (class, slot) sample places.
    ``batch_rows``: the rows the batch holds (its labels); ``z`` must have exactly that many,
    else the samples would be read from the wrong rows.

    Finiteness is not checked here: pass 1 checks every activation it stores through the fused
    unit statistics, and later passes replay the same samples.
    """
    if batch_rows is not None and z.shape[0] != batch_rows:
        raise UnsupportedModelError(
            f"{p.where or p.name}: {z.shape[0]} rows where the batch holds {batch_rows} "
            "samples (a layer that folds tokens or windows into the batch dim): its U samples "
            "cannot be told apart. Keep it whole with ignore=[...]")
    if not rows:
        return
    if len(rows) != z.shape[0] or any(r[0] != i for i, r in enumerate(rows)):
        z = z.index_select(0, torch.tensor([x[0] for x in rows], device=z.device))
    feats = sketch_features(p, z, sampling.projections, sampling.u_mode, sampling.seed)
    need = max(x[2] for x in rows) + 1
    if p.buf is None or p.buf.shape[1] < need:
        # Slots fill in order (the reservoir's slot < min(count, S)), so in pass 1 the buffer
        # grows by doubling up to S rows (a small calibration set never pays for S samples per
        # class); later passes know the rows they need.
        have = 0 if p.buf is None else p.buf.shape[1]
        dtype = feats.dtype if feats.dtype in (torch.float16, torch.bfloat16) else torch.float32
        p.grow_samples(max(need, sampling.rows or min(sampling.per_class, 2 * have)),
                       (sampling.K, feats.shape[1], feats.shape[2]), dtype, feats.device)
    k = torch.tensor([x[1] for x in rows], device=feats.device)
    s = torch.tensor([x[2] for x in rows], device=feats.device)
    p.buf[k, s] = feats.to(p.buf.dtype)
    if getattr(p, "filled", None) is not None:
        p.filled[k.cpu(), s.cpu()] = True


FUSED_TILE_BYTES = 64 << 20


def finish_u(p: "SketchTap", res: Reservoir, classes: List[int]) -> None:
    """Turn the producer's class samples into its U-Score and free them."""
    counts = torch.tensor(res.counts())
    keep = (counts >= 2).nonzero().flatten()
    dropped = [classes[i] for i in range(len(classes)) if 0 < int(counts[i]) < 2]
    if dropped and not getattr(res, "_warned", False):
        warnings.warn(f"fair_pruner: classes {dropped[:10]} have fewer than 2 calibration "
                      "samples and are left out of the U-Score")
        res._warned = True
    if keep.numel() < 2:
        raise CalibrationDataError(
            f"the U-Score needs at least two classes with >= 2 samples each; the calibration "
            f"data has {keep.numel()} (class counts {res.counts()[:20]}). Use more or more "
            "varied calibration samples")
    filled = getattr(p, "filled", None)
    if p.buf is None or p.buf.shape[1] < int(counts[keep].max()) or (
            filled is not None and not all(bool(filled[int(k), :int(counts[k])].all())
                                           for k in keep)):
        raise CalibrationDataError(
            f"the U samples of {p.name} were not all collected: the loader yielded fewer or "
            "other samples on a later pass than on the first. Use a deterministic, re-iterable "
            "loader (a list, or a DataLoader with shuffle=False and no random augmentation), or "
            "raise memory_budget so that one pass suffices")
    buf = p.buf if keep.numel() == p.buf.shape[0] else p.buf.index_select(0, keep.to(p.buf.device))
    c = counts[keep]
    # Q = S quantiles whatever the buffer's rows (it holds max(counts) <= S of them): the U-Score
    # does not depend on how the buffer grew.
    q = res.per_class
    dirs = p.directions
    raw = dirs is not None and buf.shape[3] > 1 and buf.shape[3] == dirs.shape[0] <= dirs.shape[1]
    width = dirs.shape[1] if raw else buf.shape[3]       # coordinates per unit once projected
    # Bound the fp32 sketch memory: units in chunks.
    C = buf.shape[2]
    step = max(1, int((256 << 20) // max(1, buf.shape[0] * max(buf.shape[1], q) * width * 4)))
    # One op where a tile of units' sketches (<= K Q max(P, 64) floats per thread) is small:
    # the fused kernel never writes the [K, U, P, Q] sketch; else the two ops.
    fused = buf.shape[0] * q * max(width, 64) * 4 <= FUSED_TILE_BYTES
    out = []
    for s in range(0, C, step):
        part = buf[:, :, s:s + step]
        if raw:             # stored D <= P features: their projections onto the directions
            part = torch.matmul(part.to(dirs.dtype), dirs)
        if fused:
            out.append(ops.class_w1_max(part, c, q))
        else:
            out.append(ops.pairwise_w1_max(ops.class_quantiles(part, c, q)))
    p.u = torch.cat(out).double().cpu()
    p.buf = p.filled = None
    if not torch.isfinite(p.u).all():
        raise NonFiniteError(f"non-finite U-Score at {p.name}: NaN/inf activations")


def finish_u_all(taps: Sequence["SketchTap"], res: Reservoir, classes: List[int]) -> None:
    """:func:`finish_u` for every tap. Data parallel, each tap's U-Score is computed on the rank
    its samples were summed onto (``tap.u_rank``, set by
    :func:`fair_pruner.distributed.sum_samples`) and then shared, so the ranks split the work;
    a failure on any rank raises on every rank."""
    rank, size = world()
    if size == 1:
        for p in taps:
            finish_u(p, res, classes)
        return

    def mine() -> Dict[int, Tensor]:
        out = {}
        for i, p in enumerate(taps):
            if getattr(p, "u_rank", rank) == rank:
                finish_u(p, res, classes)
                out[i] = p.u
            p.buf = p.filled = None
        return out
    for part in gathered(mine):
        for i, u in part.items():
            taps[i].u = u


def len_or_none(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None
