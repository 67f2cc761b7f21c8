"""Token-level calibration of a causal LM: one forward + backward per batch scores every layer.

Every token position is a sample; its class is the next token, restricted to the K most frequent
next tokens of the calibration data (ties by token id). Per unit family (see
:mod:`fair_pruner.llm.layout`) the tap is the input of the Linear that consumes the units
(``down_proj`` for MLP neurons, ``o_proj`` for heads), and per batch we accumulate, never keeping
activations beyond the batch:

* the signed Taylor sum ``z * dL/dz`` per sub-unit (R-Score; gradients by
  ``torch.autograd.grad`` w.r.t. the taps, so no ``.grad`` of the caller's model is touched),
* |z| sums and per-channel sums / sums of squares (activation and FLAP fluctuation signals),
* seeded per-class reservoir samples (U-Score): scalars for neurons, and for heads the projection
  of each head's ``head_dim`` output onto P seeded directions (one set per layer; sliced W1).

Units are composed from sub-units (a KV-group unit is its query heads): U takes the max over the
unit's heads, R sums their signed Taylor terms before the absolute value (docs/method.md, "Units and groups").
"""
from __future__ import annotations

import contextlib

import resource
import time
import warnings
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..engine import (Batch, Reservoir, Sampling, SketchTap, call_model, check_sampling,
                      finish_u_all, gradient_pass, preserved, split_batch, working_model)
from .. import distributed as dist
from ..errors import CalibrationDataError, NonFiniteError, UnsupportedModelError
from ..cost import CostBuilder, CostModel
from ..reconstruct import solve
from ..scorebook import Group, GroupSpec, Member, ScoreBook, model_fingerprint

from ..signals import BUILTIN, Signal, UnitStats
from .layout import Layout, UnitFamily, find_layout, is_conv1d, weight_oi
from .verify import checked_layout

KIND = "llm"
# What fp.allocate uses for these unit kinds unless told otherwise (docs/method.md, "Signals for
# language models"): remove by FLAP's fluctuation (the output variance that the default affine
# reconstruction cannot restore), protect by the U-Score (next-token separability). MoE experts
# keep the paper's U / R.
DEFAULT_SIGNALS = {"neuron": ("fluctuation", "u"), "head": ("fluctuation", "u")}


# --------------------------------------------------------------------------------------------
# Batches: token ids and their next-token targets
# --------------------------------------------------------------------------------------------

def _token_batch(batch: Any, bi: int, vocab: Optional[int] = None
                 ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """(input_ids [B, T], attention_mask or None, targets [B, T-1] with -100 = no label).

    Token ids (and labels other than -100) must lie in [0, ``vocab``) (the model's vocabulary
    size, when given; else only >= 0): checked here, before any forward, so a bad id is a
    :class:`CalibrationDataError` rather than an index error deep inside the embedding."""
    inputs, labels = split_batch(batch)
    if isinstance(inputs, dict):
        ids = inputs.get("input_ids")
        mask = inputs.get("attention_mask")
    else:
        ids, mask = inputs, None
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise CalibrationDataError(
            f"batch {bi}: no labels possible: a causal LM is calibrated on token ids (a LongTensor "
            "[batch, seq] or dicts with 'input_ids'), whose next tokens are the labels; got "
            f"{type(ids).__name__ if not isinstance(ids, Tensor) else ids.dtype}. Tokenize the "
            "text first")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise CalibrationDataError(f"batch {bi}: input_ids must be [batch, seq], got shape "
                                   f"{tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise CalibrationDataError(
            f"batch {bi}: sequences of length {ids.shape[1]}; next-token labels need at least 2 "
            "tokens per sequence. Use longer calibration sequences (e.g. 512 tokens)")
    top = f"[0, {vocab})" if vocab is not None else ">= 0"

    def outside(t: Tensor) -> Tensor:
        return (t < 0) if vocab is None else (t < 0) | (t >= vocab)
    bad = ids[outside(ids)]
    if bad.numel():
        raise CalibrationDataError(
            f"batch {bi}: token ids must lie in {top} (the model's vocabulary), got "
            f"{sorted(set(bad.tolist()))[:5]}. Tokenize with the model's own tokenizer")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.numel() != ids.numel():
            raise CalibrationDataError(f"batch {bi}: attention_mask shape {tuple(mask.shape)} "
                                       f"!= input_ids shape {tuple(ids.shape)}")
        mask = mask.reshape(ids.shape).to(torch.bool)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != ids.shape:
            raise CalibrationDataError(f"batch {bi}: labels shape {tuple(labels.shape)} != "
                                       f"input_ids shape {tuple(ids.shape)} (HF convention: "
                                       "labels aligned with input_ids, -100 = ignore)")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise CalibrationDataError(f"batch {bi}: labels must be integer token ids, got "
                                       f"{labels.dtype}")
        lab = labels[labels != -100]
        bad = lab[outside(lab)]
        if bad.numel():
            raise CalibrationDataError(
                f"batch {bi}: labels must be -100 (ignore) or token ids in {top}, got "
                f"{sorted(set(bad.tolist()))[:5]}")
        tgt = labels[:, 1:].to(torch.int64).clone()
    else:
        tgt = ids[:, 1:].to(torch.int64).clone()
    if mask is not None:
        tgt[~(mask[:, 1:] & mask[:, :-1])] = -100
    return ids, mask, tgt


def _union_classes(loader: Iterable, k: int, vocab: Optional[int] = None):
    """Distributed :func:`_top_classes`: the k most frequent next tokens of the union of the
    ranks' shards, and every rank's per-batch row labels (for the replayed reservoir)."""
    def local():
        counts: Counter = Counter()
        labels: List[List[int]] = []
        n = 0
        for bi, batch in enumerate(loader):
            _, _, tgt = _token_batch(batch, bi, vocab)
            t = tgt[tgt >= 0]
            vals, c = torch.unique(t, return_counts=True)
            counts.update(dict(zip(vals.tolist(), c.tolist())))
            labels.append(tgt.reshape(-1).tolist())
            n += int(t.numel())
        return counts, labels, n

    parts = dist.gathered(local)
    total: Counter = Counter()
    for c, _, _ in parts:
        total.update(c)
    n = sum(p[2] for p in parts)
    nb = sum(len(p[1]) for p in parts)
    return _most_frequent(total, n, nb, k), n, nb, [p[1] for p in parts]


@contextlib.contextmanager
def _checkpointed(model: nn.Module, layers: Sequence[str]):
    """While active, each module in ``layers`` runs its forward under non-reentrant activation
    checkpointing (an instance ``forward`` wrapping the class's; restored after)."""
    from torch.utils.checkpoint import checkpoint
    saved = []
    for name in layers:
        mod = model.get_submodule(name)
        saved.append((mod, mod.__dict__.get("forward")))
        inner = mod.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        mod.forward = forward
    try:
        yield
    finally:
        for mod, old in saved:
            if old is None:
                del mod.forward
            else:
                mod.forward = old


def _reduce_taps(taps: Sequence["_Tap"]) -> None:
    """Sum every tap's statistics over the ranks; each U-sample slot was stored by one rank."""
    dist.sum_samples(taps)
    tokens = torch.tensor([tp.tokens for tp in taps], dtype=torch.float64)
    # one collective per dtype for every tap's sums (Grams: after their passes)
    dist.sum_many_([getattr(tp, name) for tp in taps
                    for name in ("taylor", "act_abs", "ch_sum", "ch_sq", "wgrad")] + [tokens])
    for tp, n in zip(taps, tokens.tolist()):
        tp.tokens = int(n)
        if hasattr(tp.handle, "reduce"):      # a family's own run statistics (MoE routing)
            tp.handle.reduce(dist.sum_)


def _materialize(loader: Iterable) -> Iterable:
    """A loader we may iterate twice (one-shot iterators become a list of batches)."""
    if iter(loader) is loader:
        return list(loader)
    return loader


def _top_classes(loader: Iterable, k: int, vocab: Optional[int] = None
                 ) -> Tuple[List[int], int, int]:
    """The k most frequent next tokens (ties by id), number of labelled positions, batches."""
    counts: Counter = Counter()
    n = nb = 0
    for bi, batch in enumerate(loader):
        _, _, tgt = _token_batch(batch, bi, vocab)
        t = tgt[tgt >= 0]
        vals, c = torch.unique(t, return_counts=True)
        counts.update(dict(zip(vals.tolist(), c.tolist())))
        n += int(t.numel())
        nb += 1
    return _most_frequent(counts, n, nb, k), n, nb


def _most_frequent(counts: Counter, n: int, nb: int, k: int) -> List[int]:
    """The k most frequent next tokens (ties by id), sorted; errors for no data / no labels."""
    if nb == 0:
        raise CalibrationDataError("the calibration loader is empty")
    if n == 0:
        raise CalibrationDataError(
            "no labels possible: every next-token position is masked out (attention_mask / "
            "labels == -100). Give unpadded token sequences of length >= 2")
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return sorted(t for t, _ in top)


# --------------------------------------------------------------------------------------------
# Per-family accumulators
# --------------------------------------------------------------------------------------------

class _Tap(SketchTap):
    """Running statistics of one family's tap (an LM sketch tap: token rows, sub-units)."""

    def __init__(self, fam: UnitFamily):
        super().__init__(fam.tap)
        self.fam = fam
        self.taylor = torch.zeros(fam.n_sub, dtype=torch.float64)
        self.act_abs = torch.zeros(fam.n_sub, dtype=torch.float64)
        self.ch_sum = torch.zeros(fam.n_sub * fam.feat, dtype=torch.float64)
        self.ch_sq = torch.zeros(fam.n_sub * fam.feat, dtype=torch.float64)
        self.tokens = 0
        self.handle = None         # what the family's install_tap returned (per-run state)
        self.gram: Optional[Tensor] = None   # [C, C] fp32 sum of z zᵀ, when reconstruction asks
        self.wgrad: Optional[Tensor] = None  # consumer weight's summed gradient (taylor signal)

    @property
    def where(self) -> str:
        return f"the input of {self.name}"

    def install(self, model: nn.Module, on_tensor):
        self.handle = self.fam.install_tap(model, on_tensor)
        return self.handle

    def sample_rows(self, z: Tensor, rows: Optional[int] = None) -> Tensor:
        """[B * (T - 1), channels]: one row per token that has a next token (its label), from
        z [B, T, channels] or, where the family flattens the tokens (OPT's MLP), [B * T,
        channels] with B = (B * T) - rows."""
        if z.dim() == 2:
            B = z.shape[0] - rows if rows is not None else 0
            if B <= 0 or z.shape[0] % B:
                raise UnsupportedModelError(
                    f"{self.where}: {z.shape[0]} token rows for {rows} labelled tokens; cannot "
                    "tell the sequences apart")
            z = z.reshape(B, z.shape[0] // B, z.shape[-1])
        return z[:, :-1].reshape(-1, z.shape[-1])

    def to_units_last(self, z: Tensor) -> Tensor:
        """[r, n_sub, feat]: token rows split into sub-units (heads are projected onto P seeded
        directions over head_dim: sliced W1)."""
        return z.reshape(z.shape[0], self.fam.n_sub, self.fam.feat)

    def accumulate(self, z: Tensor, g: Tensor, batch: Batch, bi: int) -> None:
        zv, gv = z.reshape(-1, z.shape[-1]), g.reshape(-1, z.shape[-1])
        if batch.valid is not None:          # padding positions are not calibration tokens
            zv, gv = zv[batch.valid], gv[batch.valid]
        st = ops.unit_stats(zv, gv, 1).double().cpu()   # per channel: zg, |z|, z, z^2
        if not torch.isfinite(st).all():
            raise NonFiniteError(f"NaN/inf activations or gradients at {self.where} on batch "
                                 f"{bi}: check the model weights")
        shape = (self.fam.n_sub, self.fam.feat)
        self.taylor += st[0].reshape(shape).sum(dim=1)
        self.act_abs += st[1].reshape(shape).sum(dim=1)
        self.ch_sum += st[2]
        self.ch_sq += st[3]
        self.tokens += zv.shape[0]
        if self.gram is not None:     # fp32 on the calibration device: a GEMM per batch
            self.gram += ops.gram(zv.detach())


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def score(model: nn.Module, loader: Iterable, *, classes: int = 64, samples_per_class: int = 32,
          projections: int = 128, heads: str = "kv", seed: int = 0, device=None,
          progress: bool = True, signals: Sequence[Signal] = (),
          roles: Optional[Sequence[str]] = None, reconstruction="auto",
          gram_memory: float = 4.0, weight_taylor: bool = False,
          obs_signal: bool = False, checkpointing: bool = False) -> ScoreBook:
    """Calibrate a Hugging Face causal LM on token batches and return its :class:`ScoreBook`.

    Args:
        model: a Llama-style causal LM (Llama, Mistral, Qwen2, Qwen3, same layout); left exactly
            as it was (weights, buffers, requires_grad, train/eval flags, no hooks left).
        loader: iterable of token batches: LongTensors [batch, seq], or dicts with ``input_ids``
            and optionally ``attention_mask`` / ``labels`` (HF convention, -100 = ignore). It is
            read twice (token counts, then calibration); a one-shot iterator is materialised.
        classes: K, the number of most frequent next tokens used as U-Score classes.
        samples_per_class: reservoir size per class (seeded).
        projections: sliced-W1 directions over head_dim for attention heads.
        heads: ``"kv"`` (unit = a KV group with its query heads) or ``"query"`` (unit = query-head
            slot within every KV group; every group loses the same number of query heads).
        seed: reservoir sampling and projection directions.
        device: calibrate there (a model elsewhere is deep-copied, never moved).
        progress: tqdm progress bar.
        signals: extra :class:`~fair_pruner.signals.Signal` objects evaluated on each group's
            :class:`~fair_pruner.signals.UnitStats` and stored in the book.
        roles: which unit families to score and prune (``"attention"``, ``"ffn"``; default:
            every one the architecture table lets this model prune); the others are kept whole
            but still count in the parameter/MAC totals (see :func:`restrict`).
        reconstruction: also accumulate, per group, the Gram matrix Σ x xᵀ of the consumer's
            input channels (``group.tensors["gram"]``; the channel means ``["mean"]`` and the
            token count ``meta["tokens"]`` are always stored), so ``fp.prune(..., book=book)``
            can update the kept weights by least squares (:mod:`fair_pruner.llm.reconstruct`).
            Costs C² fp32 per group, on the calibration device while scoring and in the book
            (C = the consumer's input width: d_ff for an MLP, heads x head_dim for attention):
            0.32 GB for SmolLM2-135M, 28.5 GB for a 7B Llama (32 x (14336² + 4096²) x 4 B);
            MoE expert groups have no consumer to update. ``"auto"`` (default) and True:
            collect them; False: only the means (the ``"bias"`` reconstruction still works).
        gram_memory: the budget (GiB) for the Gram matrices on the calibration device. When
            they need more, they are collected in chunks of consecutive layers that fit: the
            first chunk in the gradient pass, each further chunk in one extra no-grad forward
            pass, each finished chunk moved to CPU memory (a 7B Llama at the default 4 GiB:
            28.5 GB in 8 chunks, 7 extra forward passes, 28.5 GB of host memory and book).
        weight_taylor: also compute LLM-Pruner's element-wise first-order Taylor importance of
            the consumer's weights, Σ |w · Σ_batches ∂L/∂w| over each unit's weight columns
            (signal ``"taylor"``; costs the consumer weights' gradient GEMMs and one fp32 copy
            of those weights).
        obs_signal: with the Gram matrices, also compute the ``"obs"`` signal (the output error
            the affine update leaves when a unit alone is removed; a C x C inverse per group:
            O(C³), minutes per layer at 7B widths on a CPU).
        checkpointing: activation checkpointing in the gradient pass: each decoder layer keeps
            only its input and recomputes its forward in the backward
            (``torch.utils.checkpoint``, non-reentrant), so activation memory is one layer's
            instead of every layer's, for about one more forward of compute. The taps record in
            the first forward only; the book is the same (tests/test_llm.py). Composes with an
            FSDP2-sharded model (the checkpoint is inside each layer's FSDP unit).

    The book stores, per group, ``u``, ``r``, ``l1``, ``l2``, ``activation``, ``random`` and
    ``fluctuation`` (FLAP: variance of each tap channel times the squared norm of the weight
    column consuming it, summed over the unit's channels). Costs cover the attention and MLP
    projections (parameters, and MACs per token with attention over the calibration length).
    """

    t0 = time.perf_counter()
    if not isinstance(classes, int) or classes < 2:
        raise CalibrationDataError("classes must be an int >= 2 (the K most frequent next tokens)")
    check_sampling(samples_per_class, projections)
    layout = checked_layout(model, heads=heads)
    if roles is None:      # every role this model can prune (a frozen block is kept whole)
        roles = sorted({f.role for f in layout.prunable})
    _check_roles(layout, roles)
    sharded = dist.is_sharded(model)
    if sharded and weight_taylor:
        raise UnsupportedModelError(
            "weight_taylor=True needs the consumer weights' gradients, which FSDP2 reduce-scatters "
            "into the sharded parameters' .grad (the caller's state): score the sharded model "
            "without it, or the unsharded model with it")
    work, device = working_model(model, device)
    fingerprint = model_fingerprint(model)

    loader = _materialize(loader)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    rank, size = dist.world()
    if size > 1:        # data parallel: classes and reservoir of the union of the ranks' shards
        cls, n_labelled, n_batches, labels = _union_classes(loader, classes, vocab)
        per_rank = [len(x) for x in labels]
        dist.check_every_rank_has_data(per_rank)
        if sharded and len(set(per_rank)) > 1:
            # every forward of a sharded model is a collective (all-gathers per layer)
            raise CalibrationDataError(
                f"an FSDP2-sharded model needs the same number of batches on every rank, got "
                f"{per_rank} (ranks 0..{size - 1}): give each rank an equal share (e.g. "
                "DistributedSampler(drop_last=True) or a batch count divisible by the world size)")
        res = dist.ReplayedReservoir(Reservoir(cls, samples_per_class, seed), labels)
    else:
        cls, n_labelled, n_batches = _top_classes(loader, classes, vocab)
        res = Reservoir(cls, samples_per_class, seed)
    taps = [_Tap(f) for f in layout.prunable if f.role in roles]
    reconstruction = _gram_wanted(reconstruction)
    chunks = _gram_chunks(taps, gram_memory) if reconstruction else []
    for tp in (chunks[0] if chunks else ()):
        tp.gram = _zeros_gram(tp, device)
    seq_lens: List[int] = []
    params, on_grads = _weight_grads(work, taps) if weight_taylor else ((), None)

    sampling = Sampling(tuple(cls), samples_per_class, projections, "sliced", seed)
    # Only the Taylor signal needs weight gradients; every other parameter is frozen for the
    # pass: autograd then keeps no weight-gradient state, and FSDP2 (which reduce-scatters the
    # gradient of every parameter that requires one) none either.
    wanted = {id(p) for p in params}
    everything = list(work.parameters())
    flags = [p.requires_grad for p in everything]
    with preserved(work, restore_buffers=False):
        work.eval()
        try:
            for p in everything:
                p.requires_grad_(id(p) in wanted)
            with _checkpointed(work, [b.name for b in layout.layers] if checkpointing
                               else []):
                dist.guarded(lambda: gradient_pass(
                    work, taps, _batches(loader, device, seq_lens), res, sampling, sketch=taps,
                    progress=progress and rank == 0, total=n_batches if size == 1 else None,
                    desc="fair_pruner: calibrating LM", params=params,
                    on_param_grads=on_grads),
                    (lambda: _reduce_taps(taps)) if size > 1 else None)
        finally:
            for p, f in zip(everything, flags):
                p.requires_grad_(f)
    if size > 1:
        seq_lens = [t for part in dist.gather_objects(seq_lens) for t in part]
    finish_u_all(taps, res, cls)
    if chunks:
        _gram_passes(work, chunks, loader, device, progress and rank == 0)
    for tp in taps:
        dist.sum_(tp.gram)

    context = (max(seq_lens) + 1) / 2.0          # mean causal context of a calibration sequence
    all_signals: Dict[str, Signal] = dict(BUILTIN)
    for s in signals:
        all_signals[s.name] = s
    groups = []
    for block in layout.layers:        # FSDP2: one decoder layer gathered at a time
        mine = [tp for tp in taps if tp.fam.layer == block.index]
        if mine:
            with dist.full_params(work, work.get_submodule(block.name)):
                groups += [_group(work, tp, all_signals, seed, obs_signal) for tp in mine]
    if len(groups) != len(taps):
        raise UnsupportedModelError("internal: a scored family is not in any decoder layer")
    cost = _cost_model(work, layout, context, [tp.fam for tp in taps])
    counts = res.counts()
    meta = {
        "fingerprint": fingerprint, "seed": seed, "kind": KIND, "heads": heads,
        "roles": list(roles),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "architecture": type(model).__name__, "layers_module": layout.layers_name,
        "in_architecture_table": layout.in_table, "frozen": layout.frozen(),
        "reconstruction_stats": bool(reconstruction), "gram_chunks": len(chunks),
        "weight_taylor": bool(weight_taylor),
        "obs_signal": bool(obs_signal and reconstruction),
        "num_layers": len(layout.layers), "classes": cls, "class_counts": counts,
        "classes_used": [c for c, n in zip(cls, counts) if n >= 2],
        "samples_per_class": samples_per_class, "projections": projections,
        "calibration_sequences": len(seq_lens), "calibration_tokens": n_labelled,
        "batches": n_batches, "seq_len": max(seq_lens), "mac_context": context,
        "world_size": size,
        "cost_scope": "attention+mlp projections; MACs per token",
        "seconds": time.perf_counter() - t0,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch": torch.__version__,
    }
    return ScoreBook(groups, cost, meta)


def _gram_wanted(reconstruction) -> bool:
    if reconstruction not in ("auto", True, False):
        raise CalibrationDataError(f"reconstruction must be 'auto', True or False, got "
                                   f"{reconstruction!r}")
    return bool(reconstruction)


def _gram_bytes(tp: _Tap) -> int:
    return (tp.fam.n_sub * tp.fam.feat) ** 2 * 4


def _zeros_gram(tp: _Tap, device) -> Tensor:
    C = tp.fam.n_sub * tp.fam.feat
    return torch.zeros((C, C), dtype=torch.float32, device=device)


def _gram_chunks(taps: Sequence[_Tap], gram_memory: float) -> List[List[_Tap]]:
    """The taps with a consumer to update, in model order, cut into chunks whose Gram matrices
    fit ``gram_memory`` GiB on the calibration device together. The first chunk is collected in
    the gradient pass; each further chunk costs one extra no-grad forward pass."""
    if not (isinstance(gram_memory, (int, float)) and gram_memory > 0):
        raise CalibrationDataError(f"gram_memory must be a positive number of GiB, got "
                                   f"{gram_memory!r}")
    budget = gram_memory * 2 ** 30
    chunks: List[List[_Tap]] = []
    used = budget + 1
    for tp in taps:
        if tp.fam.kind == "expert":            # experts feed the residual stream directly
            continue
        b = _gram_bytes(tp)
        if used + b > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(tp)
        used += b
    total = sum(_gram_bytes(tp) for c in chunks for tp in c)
    big = [tp.name for c in chunks for tp in c if _gram_bytes(tp) > budget]
    if big:
        warnings.warn(f"fair_pruner: the Gram matrix of {big[0]} alone needs "
                      f"{_gram_bytes(next(t for c in chunks for t in c if t.name == big[0])) / 2**30:.2f}"
                      f" GiB (> gram_memory={gram_memory:g}); collected on its own")
    if len(chunks) > 1:
        warnings.warn(f"fair_pruner: the reconstruction Gram matrices need {total / 2**30:.2f} GiB "
                      f"(> gram_memory={gram_memory:g} GiB on the calibration device): collecting "
                      f"them in {len(chunks)} chunks of layers, {len(chunks) - 1} extra forward "
                      "pass(es) over the calibration data; each finished chunk moves to CPU "
                      "memory (the book holds all of them). Raise gram_memory for fewer passes, "
                      "or pass reconstruction=False to skip them ('bias' reconstruction only)")
    return chunks


@torch.no_grad()
def _gram_passes(model: nn.Module, chunks: List[List[_Tap]], loader, device,
                 progress: bool) -> None:
    """Move the first chunk's Grams to the CPU, then collect every further chunk in one
    no-grad forward pass each, the taps hooked only to add ``zᵀ z`` of the valid tokens."""
    from tqdm.auto import tqdm

    for tp in chunks[0]:
        tp.gram = tp.gram.cpu()
    for ci, chunk in enumerate(chunks[1:], start=2):
        state: Dict[str, Optional[Tensor]] = {"valid": None}
        handles = []
        for tp in chunk:
            tp.gram = _zeros_gram(tp, device)

            def add(x: Tensor, tp=tp) -> Tensor:
                zv = x.reshape(-1, x.shape[-1])
                if state["valid"] is not None:
                    zv = zv[state["valid"]]
                tp.gram += ops.gram(zv.detach())
                return x
            handles.append(tp.fam.install_tap(model, add))
        try:
            for batch in tqdm(list(_batches(loader, device, [])), disable=not progress,
                              desc=f"fair_pruner: Gram chunk {ci}/{len(chunks)}", leave=False):
                state["valid"] = batch.valid
                call_model(model, batch.inputs)
        finally:
            for h in handles:
                h.remove()
        for tp in chunk:
            tp.gram = tp.gram.cpu()


def _weight_grads(model: nn.Module, taps: Sequence[_Tap]):
    """The consumer weights of the taps and a callback summing their gradients (fp32)."""
    params = []
    for tp in taps:
        cons = model.get_submodule(tp.fam.tap)
        if tp.fam.kind == "expert" or not isinstance(getattr(cons, "weight", None), Tensor):
            continue
        tp.wgrad = torch.zeros_like(cons.weight, dtype=torch.float32)
        params.append((tp, cons.weight))

    def on_grads(grads):
        for (tp, _), g in zip(params, grads):
            if g is not None:
                tp.wgrad += g.detach().float()
    return [p for _, p in params], on_grads


def _batches(loader: Iterable, device, seq_lens: List[int]) -> Iterable[Batch]:
    """Token batches as engine batches: every position with a next token is a labelled row;
    the loss is the summed next-token cross-entropy."""
    for bi, batch in enumerate(loader):
        ids, mask, tgt = _token_batch(batch, bi)
        B, T = ids.shape
        seq_lens.extend([T] * B)
        inputs = {"input_ids": ids.to(device), "use_cache": False}
        if mask is not None:
            inputs["attention_mask"] = mask.to(device=device, dtype=torch.long)
        tgt_d = tgt.to(device).reshape(-1)

        def loss(out, tgt_d=tgt_d):
            logits = out.logits if hasattr(out, "logits") else out[0]
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt_d,
                                   ignore_index=-100, reduction="sum")
        yield Batch(inputs, tgt.reshape(-1).tolist(), loss,
                    mask.reshape(-1).to(device) if mask is not None else None)


# --------------------------------------------------------------------------------------------
# Signals, groups, costs
# --------------------------------------------------------------------------------------------

def _group(model, tp: _Tap, all_signals: Dict[str, Signal], seed: int,
           obs_signal: bool = False) -> Group:
    fam = tp.fam
    subs = fam.sub_of_unit()                      # [size, k]
    k = subs.shape[1]
    ntok = max(1, tp.tokens)
    taylor = tp.taylor[subs].sum(dim=1)           # signed sum over the unit's heads
    u = tp.u.double()[subs].amax(dim=1)
    act_abs = tp.act_abs[subs].sum(dim=1) / (ntok * fam.feat * k)
    ch_mean = tp.ch_sum / ntok
    ch_var = (tp.ch_sq / ntok - ch_mean * ch_mean).clamp_min(0)
    per_unit = lambda ch: ch.reshape(fam.n_sub, fam.feat).sum(dim=1)[subs].sum(dim=1)
    flap_ch = ch_var * fam.tap_column_sq(model)
    flap = per_unit(flap_ch)
    # Wanda-sp (An et al., FLAP paper): Σ_i |W_ij| · ||x_j||₂ over the unit's channels j.
    wanda = per_unit(fam.tap_column_abs(model) * (tp.ch_sq / ntok).sqrt())
    # Unit-level moments (means over the unit's channels) for user signals.
    ch_sq_u = (tp.ch_sq / ntok).reshape(fam.n_sub, fam.feat).mean(dim=1)[subs].mean(dim=1)
    ch_mean_u = ch_mean.reshape(fam.n_sub, fam.feat).mean(dim=1)[subs].mean(dim=1)
    stats = UnitStats(fam.group_name, fam.unit_weights(model), None, taylor, act_abs,
                      ch_mean_u, ch_sq_u, u, seed)
    sigs: Dict[str, Tensor] = {}
    for name, sig in all_signals.items():
        v = torch.as_tensor(sig(stats), dtype=torch.float64).reshape(-1).cpu()
        if sig.signed_sum_then_abs:
            v = v.abs()
        if v.numel() != fam.size:
            raise UnsupportedModelError(f"signal {name!r} returned {v.numel()} scores for "
                                        f"{fam.group_name}, which has {fam.size} units")
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"signal {name!r} is not finite for group {fam.group_name}")
        sigs[name] = v
    sigs["fluctuation"] = flap
    # FLAP's cross-layer score (An et al. 2024, its code's AL-AM structure): the channels'
    # fluctuation standardised over the whole tap, then averaged over each unit's channels.
    z = (flap_ch - flap_ch.mean()) / flap_ch.std().clamp_min(1e-300) if flap_ch.numel() > 1 \
        else torch.zeros_like(flap_ch)
    sigs["flap"] = z.reshape(fam.n_sub, fam.feat).mean(dim=1)[subs].mean(dim=1)
    sigs["wanda"] = wanda
    if tp.wgrad is not None:         # LLM-Pruner element-wise first-order Taylor (consumer)
        cons = model.get_submodule(fam.tap)
        imp = (cons.weight.detach().float() * tp.wgrad).abs()
        sigs["taylor"] = per_unit((imp.T if is_conv1d(cons) else imp).double().sum(dim=0).cpu())
    if obs_signal and tp.gram is not None and fam.kind != "expert":
        sigs["obs"] = _obs(fam, model, tp.gram.double().cpu(), tp.ch_sum / ntok, ntok)
    if hasattr(tp.handle, "extra_signals"):       # e.g. MoE experts: routing freq, REAP
        sigs.update({k: v.double().cpu() for k, v in tp.handle.extra_signals().items()})
    members = [Member(m, role, [], []) for m, role in fam.members(model)]
    spec = GroupSpec(fam.group_name, fam.size, members)
    meta = {"layer": fam.layer, "family": fam.role, "module": fam.name, "tap": fam.tap,
            "sub_units": fam.n_sub, "features": fam.feat}
    if hasattr(fam, "extra_meta"):                # e.g. MoE experts: top_k, router
        meta.update(fam.extra_meta())
    if fam.kind in DEFAULT_SIGNALS:
        meta["default_signal"], meta["default_protect"] = DEFAULT_SIGNALS[fam.kind]
    if fam.kind == "head":
        meta.update({"head_dim": fam.head_dim, "num_heads": fam.n_heads,
                     "num_kv_heads": fam.n_kv, "mode": fam.mode})
    # Consumer-input statistics for weight reconstruction (fair_pruner.llm.reconstruct): the
    # channel means always (C floats), the Gram matrix when asked (C² floats).
    extra = {} if fam.kind == "expert" else {"mean": (tp.ch_sum / ntok).float()}
    meta["tokens"] = int(tp.tokens)
    if tp.gram is not None:
        extra["gram"] = tp.gram.float().cpu()
    if hasattr(tp.handle, "extra_tensors"):       # e.g. MoE experts: routing co-choice
        extra.update({k: v.float().cpu() for k, v in tp.handle.extra_tensors().items()})
    return Group(fam.group_name, fam.size, sigs, spec, fam.kind, meta,
                 min_keep=min(fam.min_keep(), fam.size), roundable=fam.round_to_applies,
                 tier=fam.tier,
                 tensors=extra)


def _obs(fam: UnitFamily, model, gram: Tensor, mean: Tensor, n: int, damp: float = 1e-2) -> Tensor:
    """Per unit: the consumer-output error (per token) left after removing the unit alone and
    reconstructing it by affine least squares (OBS): tr(W_U [(S + λI)⁻¹]_UU⁻¹ W_Uᵀ) with S the
    channels' covariance and U the unit's channels (for one channel: ||W_j||² / [S⁻¹]_jj).
    FLAP's fluctuation, var(x_j) ||W_j||², is the same quantity with the correlations ignored."""
    S = gram / max(1, n) - torch.outer(mean, mean)
    Sinv = solve(S, torch.eye(S.shape[0], dtype=torch.float64), damp, fam.tap)   # (S + λI)⁻¹
    W = weight_oi(model.get_submodule(fam.tap)).detach().double().cpu()
    chans = torch.stack([fam.removed_channels([u]) for u in range(fam.size)])   # [size, c]
    if chans.shape[1] == 1:
        c = chans[:, 0]
        return W[:, c].pow(2).sum(dim=0) / Sinv.diagonal()[c]
    out = torch.empty(fam.size, dtype=torch.float64)
    for u in range(fam.size):
        c = chans[u]
        Wu = W[:, c]
        out[u] = (Wu @ torch.linalg.inv(Sinv[c][:, c]) * Wu).sum()
    return out


def _check_roles(layout: Layout, roles: Sequence[str]) -> None:
    have = {f.role for f in layout.prunable}
    bad = [r for r in roles if r not in have]
    if not roles or bad:
        frozen = sorted({f"{f.role} ({f.frozen})" for f in layout.families if f.frozen})
        raise CalibrationDataError(
            f"roles={list(roles)}: choose one or more of {sorted(have)}"
            + (f"; kept whole in this model: {'; '.join(frozen)}" if frozen else ""))


def restrict(book: ScoreBook, model: nn.Module, roles: Sequence[str]) -> ScoreBook:
    """The same scores with only the families of ``roles`` prunable (no recalibration).

    The other families' parameters still count in the totals, so ``params=0.2`` still means
    20% of the attention+MLP parameters (e.g. ``roles=("ffn",)``: reach it with MLP neurons).
    """
    book.check_model(model)
    layout = find_layout(model, heads=book.meta.get("heads", "kv"))
    _check_roles(layout, roles)
    fams = [f for f in layout.prunable if f.role in roles]
    groups = [book.group(f.group_name) for f in fams]
    meta = dict(book.meta, roles=list(roles))
    return ScoreBook(groups, _cost_model(model, layout, book.meta["mac_context"], fams), meta)


def _cost_model(model, layout: Layout, context: float,
                prunable: Sequence[UnitFamily]) -> CostModel:
    """Exact params / MACs-per-token of every family's cost terms, as a :class:`CostModel`;
    only the ``prunable`` families (group index = position in that list) control dims."""
    b = CostBuilder()
    index = {id(f): gi for gi, f in enumerate(prunable)}
    for fam in layout.families:
        gi = index.get(id(fam))
        for ti, term in enumerate(fam.cost_terms(model, context)):
            const, keys = 1.0, []
            for d, n in enumerate(term.shape):
                if d in term.ctrl and gi is not None:
                    key = (fam.group_name, ti, d)
                    b.dim(key, size=n, group=gi, width=term.ctrl[d])
                    keys.append(key)
                else:
                    const *= float(n)
            if term.params:
                b.term(const, keys)
            if term.macs:
                b.term(const * term.macs, keys, mac=True)
    return b.build()
