"""Calibration: one forward + backward per batch feeds every group's R and U statistics.

Flow: probe the model on one sample (shapes, output layer, in-place ops) -> build the dependency
graph -> pass 1 over the loader with taps on every producer module (Taylor terms for R, running
activation moments, and per-class projected samples for the first chunk of U sketches; the
classes are the labels the data holds, at most ``max_classes``, see :class:`_DataClasses`) ->
extra no-grad passes over only the reservoir-selected samples for U chunks that did not fit the
memory budget -> per-producer signals -> per-group scores -> :class:`ScoreBook`.

The caller's model is left exactly as it was: hooks are removed, train/eval flags restored, no
``requires_grad`` flag or ``.grad`` is touched (gradients are taken with ``torch.autograd.grad``
with respect to the tapped activations only), and with ``bn_mode="train"`` BatchNorm buffers are
restored afterwards.
"""
from __future__ import annotations

import math
import numbers
import random
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from . import distributed as dist
from .engine import (Batch, Reservoir, Sampling, SketchTap, call_model, check_sampling, copy_model,
                     finish_u_all, first_tensor, gradient_pass, len_or_none, logits_of, map_tensors,
                     preserved, split_batch, store_samples, stored_dim, structure_only,
                     working_model)
from .errors import CalibrationDataError, NonFiniteError, UnsupportedModelError
from .graph import (PRODUCER_TYPES, build_cost_model, build_dependency_graph, check_exact,
                    check_model_types, check_traced, convert_blocks, find_groups,
                    glus_by_fc1, head_attention, kept_residual, needs_conversion,
                    shuffle_outputs)
from .scorebook import Group, ScoreBook, model_fingerprint
from .signals import BUILTIN, Signal, UnitStats

# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def _default_loss(out: Any, y: Tensor) -> Tensor:
    """Summed cross-entropy of the model's logits against the class labels."""
    logits = logits_of(out)
    if logits.dim() < 1 or logits.shape[0] != y.shape[0]:
        raise CalibrationDataError(
            f"the model gives {tuple(logits.shape)} logits for a batch with {y.shape[0]} labels: "
            "give one label per sample (or pass loss_fn= for another layout)")
    return F.cross_entropy(logits.float(), y, reduction="sum")


def _check_labels(labels: Optional[Tensor], batch_idx: int,
                  num_classes: Optional[int] = None) -> Tensor:
    if labels is None:
        raise CalibrationDataError(
            "the calibration loader yields unlabelled data: FAIR-Pruner needs class labels for "
            "the U-Score and the loss. Yield (inputs, labels) tuples or dicts with a 'labels' key.")
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise CalibrationDataError(
            f"batch {batch_idx}: labels must be a 1-d integer tensor of class indices, got "
            f"dtype={labels.dtype} shape={tuple(labels.shape)} (convert one-hot labels with "
            "labels.argmax(1))")
    if num_classes is not None and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CalibrationDataError(
            f"batch {batch_idx}: labels must lie in [0, {num_classes}) for a model with "
            f"{num_classes} outputs, got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()        # int32 / uint8 class indices are fine; the loss wants int64


# --------------------------------------------------------------------------------------------
# Sample selection: seeded per-class reservoirs over the classes the data holds
# --------------------------------------------------------------------------------------------

class _DataClasses(Reservoir):
    """Per-class reservoirs for the U-Score classes: at most ``max_classes`` of the labels the
    calibration data actually holds, whatever the model's number of outputs.

    The labels are known only as the data is read (a 1000-output model may be calibrated on
    images of 10 classes), so classes are taken as they appear, without an extra pass: every
    label gets a seeded priority, and the U-Score keeps the ``max_classes`` present labels of
    lowest priority, a seeded uniform subset that depends only on the seed and on the set of
    labels present. A class pushed out of that set by a later label of lower priority gives up
    its slot and its samples; since the set's highest priority only falls, every class kept
    holds its slot from its first sample on. Each class draws its reservoir slots from its own
    seeded generator, so its samples do not depend on which other classes are present.
    ``classes[k]`` is the class of slot ``k``; ``label_counts`` counts every label seen.
    """

    def __init__(self, max_classes: int, per_class: int, seed: int):
        super().__init__([], per_class, seed)
        self.max_classes, self.seed = max_classes, seed
        self.classes: List[int] = []
        self.label_counts: Dict[int, int] = {}
        self._keys: List[Tuple[float, int]] = []
        self._rngs: List[random.Random] = []

    def _key(self, c: int) -> Tuple[float, int]:
        return random.Random(f"fair_pruner.classes:{self.seed}:{c}").random(), c

    def _admit(self, c: int, rows: List[Tuple[int, int, int]]) -> Optional[int]:
        """Slot of a label seen for the first time, or None when it is not among the kept."""
        key = self._key(c)
        rng = random.Random(f"fair_pruner.reservoir:{self.seed}:{c}")
        if len(self.classes) < self.max_classes:
            self.classes.append(c)
            self.seen.append(0)
            self._keys.append(key)
            self._rngs.append(rng)
            k = len(self.classes) - 1
        else:
            k = max(range(len(self.classes)), key=lambda i: self._keys[i])
            if key > self._keys[k]:
                return None
            del self.index[self.classes[k]]              # evict: free its slots and samples
            for slot in range(self.per_class):
                owner = self._slot_owner.pop((k, slot), None)
                if owner is not None:
                    del self.final[owner]
            rows[:] = [r for r in rows if r[1] != k]
            self.classes[k], self.seen[k], self._keys[k], self._rngs[k] = c, 0, key, rng
        self.index[c] = k
        return k

    def offer(self, labels: List[int], first_index: int) -> List[Tuple[int, int, int]]:
        rows: List[Tuple[int, int, int]] = []
        for row, y in enumerate(labels):
            n_label = self.label_counts.get(y, 0) + 1
            self.label_counts[y] = n_label
            k = self.index.get(y)
            if k is None:
                # Only a label's first sample can admit it: the kept set's bar only falls.
                k = self._admit(y, rows) if n_label == 1 else None
                if k is None:
                    continue
            self.seen[k] += 1
            n = self.seen[k]
            slot = n - 1 if n <= self.per_class else self._rngs[k].randrange(n)
            if slot < self.per_class:
                gidx = first_index + row
                old = self._slot_owner.get((k, slot))
                if old is not None:
                    del self.final[old]
                    if old >= first_index:          # replaced within this batch: store once
                        rows[:] = [r for r in rows if r[1:] != (k, slot)]
                self._slot_owner[(k, slot)] = gidx
                self.final[gidx] = (k, slot)
                rows.append((row, k, slot))
        return rows

    def check(self) -> None:
        """Raise a :class:`CalibrationDataError` unless two kept classes have >= 2 samples."""
        if sum(1 for n in self.counts() if n >= 2) >= 2:
            return
        found = self.label_counts
        shown = ", ".join(f"{c}: {n}" for c, n in sorted(found.items())[:10])
        shown += ", ..." if len(found) > 10 else ""
        what = (f"{len(found)} distinct label{'s' if len(found) != 1 else ''} "
                f"(samples per label: {{{shown}}})")
        if sum(1 for n in found.values() if n >= 2) >= 2:
            fix = (f"max_classes={self.max_classes} kept labels {sorted(self.classes)[:10]}, "
                   f"fewer than two of them with >= 2 samples: raise max_classes (the data has "
                   f"{len(found)} labels) or give more samples of each class")
        else:
            fix = ("calibrate on labelled samples of at least two classes, two or more each "
                   "(e.g. a class-balanced subset of the training data)")
        raise CalibrationDataError(
            "the U-Score compares classes and needs at least two classes with >= 2 samples "
            f"each; the calibration data has {what}: {fix}")

# --------------------------------------------------------------------------------------------
# Taps
# --------------------------------------------------------------------------------------------

class _Producer(SketchTap):
    """The output of one Conv/Linear whose channels belong to a group (a CNN sketch tap)."""

    def __init__(self, name: str, module: nn.Module, group: int, idxs, root_idxs):
        super().__init__(name)
        self.module, self.group = module, group
        self.idxs, self.root_idxs = idxs, root_idxs
        self.unit_dim = 1 if not isinstance(module, nn.Linear) else -1
        self.units = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        self.clone = False
        self.taylor: Optional[Tensor] = None
        self.act_abs = self.act_sum = self.act_sq = None
        self.positions = 0          # samples x positions seen (for the means)
        # Rows of z per sample: > 1 where the model folds windows or patches into the batch
        # dim, sample-major ([B * fold, ..., units]); verified by _check_folds.
        self.fold = 1

    @property
    def where(self) -> str:
        return f"the output of {self.name}"

    @property
    def probe_key(self) -> str:
        """The module whose output the probe recorded for this tap."""
        return self.name

    def sample_rows(self, z: Tensor, rows: Optional[int] = None) -> Tensor:
        """``z`` with one row per sample: [B, fold * ..., units] where windows are folded."""
        return z if self.fold == 1 else z.reshape(z.shape[0] // self.fold, -1, z.shape[-1])

    def install(self, model: nn.Module, on_tensor):
        def hook(mod, inp, out):
            if not isinstance(out, Tensor):
                raise UnsupportedModelError(f"{self.name} returned a {type(out).__name__}, not "
                                            "a tensor")
            new = on_tensor(out)
            return new if new is not out else None
        return self.module.register_forward_hook(hook)

    def features(self, probe) -> int:
        """Flattened positions per unit of one sample (D)."""
        return (int(math.prod(probe["feature_shapes"][self.name])) * self.fold
                // max(1, self.units))

    def unit_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """([units, fan_in], [units] or None): the weights each unit owns (UnitStats)."""
        w = self.module.weight.detach()
        b = self.module.bias
        return (w.reshape(w.shape[0], -1).float().cpu(),
                b.detach().float().cpu() if b is not None else None)

    def downstream(self, z: Tensor) -> Tensor:
        # A later in-place op (e.g. SiLU(inplace=True)) would overwrite z: hand the model a copy.
        return z.clone() if self.clone else z

    def to_units_last(self, z: Tensor) -> Tensor:
        """[B, C, D]: units in dim 1, every other non-batch dim flattened into D."""
        if self.unit_dim == 1:
            return z.reshape(z.shape[0], z.shape[1], -1)
        zz = z.reshape(z.shape[0], -1, z.shape[-1])  # [B, D, C]
        return zz.transpose(1, 2)

    def accumulate(self, z: Tensor, g: Tensor, batch, bi: int) -> None:
        # One read of z and g: per-unit sums of z*g (Taylor), |z|, z and z^2.
        st = ops.unit_stats(z, g, self.unit_dim).double()
        self._add(st, z, g, bi)
        self.positions += z.numel() // max(1, z.shape[self.unit_dim])

    def _add(self, st: Tensor, z: Tensor, g: Tensor, bi: int) -> None:
        """Fold one batch's [4, units] sums (Taylor, |z|, z, z^2) into the totals."""
        if not torch.isfinite(st).all():
            bad = "activations" if not torch.isfinite(z).all() else "gradients"
            raise NonFiniteError(f"NaN/inf {bad} at {self.name} on batch {bi}: check the model "
                                 "weights, inputs and loss (e.g. lower the loss scale or fix "
                                 "the diverged model)")
        t, a, s1, s2 = st.unbind(0)
        if self.taylor is None:
            self.taylor, self.act_abs, self.act_sum, self.act_sq = t, a, s1, s2
        else:
            self.taylor += t
            self.act_abs += a
            self.act_sum += s1
            self.act_sq += s2


class _Heads(_Producer):
    """The heads of one attention (:func:`~fair_pruner.graph.head_attention`), observed at the
    input of its ``proj``: z [B, N, H * head_dim], the concatenated head outputs. A head's U
    sample is its whole [N, head_dim] output (sliced W1 over tokens x features), its R-Score
    the summed Taylor term of those features (what zeroing the head changes to first order)."""

    def __init__(self, name: str, attn: nn.Module, group: int):
        heads = torch.arange(attn.num_heads)
        super().__init__(name, attn.proj, group, heads, heads)
        self.attn, self.units, self.head_dim = attn, attn.num_heads, attn.head_dim

    @property
    def where(self) -> str:
        return f"the head outputs of {self.name} (the input of {self.name}.proj)"

    @property
    def probe_key(self) -> str:
        return f"{self.name}.proj"          # rows: proj's output has its input's rows

    def features(self, probe) -> int:
        shape = probe["feature_shapes"][self.probe_key]
        tokens = shape[1:] if self.unit_dim == 1 else shape[:-1]     # NCHW (CoAtNet) or NLC
        return int(math.prod(tokens)) * self.fold * self.head_dim

    def install(self, model: nn.Module, on_tensor):
        def hook(mod, args):
            new = on_tensor(args[0])
            return None if new is args[0] else (new,) + tuple(args[1:])
        return self.attn.proj.register_forward_pre_hook(hook)

    def to_units_last(self, z: Tensor) -> Tensor:
        """[B, H, N * head_dim]."""
        B = z.shape[0]
        if self.unit_dim == 1:               # [B, H * head_dim, *positions]: heads first
            return z.reshape(B, self.units, -1)
        zz = z.reshape(B, -1, self.units, self.head_dim).transpose(1, 2)
        return zz.reshape(B, self.units, -1)

    def accumulate(self, z: Tensor, g: Tensor, batch, bi: int) -> None:
        st = ops.unit_stats(z, g, self.unit_dim % z.dim()).double()   # [4, H * head_dim]
        self._add(st.reshape(4, self.units, self.head_dim).sum(-1), z, g, bi)
        self.positions += z.numel() // self.units     # a head's means: over tokens x features

    def unit_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """[H, 3 * head_dim * (dim + bias) + dim * head_dim]: a head's q/k/v rows (with their
        biases) and its proj columns."""
        H, hd = self.units, self.head_dim
        w = self.attn.qkv.weight.detach().float().cpu()
        w = w.reshape(w.shape[0], -1)                # a 1x1 conv's [out, in, 1, 1] too
        if self.attn.qkv.bias is not None:
            w = torch.cat([w, self.attn.qkv.bias.detach().float().cpu()[:, None]], dim=1)
        qkv = (w.reshape(H, -1) if getattr(self.attn, "qkv_heads_first", False)
               else w.reshape(3, H, hd, -1).transpose(0, 1).reshape(H, -1))
        proj = self.attn.proj.weight.detach().float().cpu()     # [dim, H * hd] (, 1, 1)
        proj = proj.reshape(proj.shape[0], H, hd).transpose(0, 1).reshape(H, -1)
        return torch.cat([qkv, proj], dim=1), None


class _GluHidden(_Producer):
    """The units of one timm ``GluMlp`` (:func:`~fair_pruner.graph.glu_mlp`), observed at the
    input of its ``fc2``: z [..., H] (NLC) or [B, H, ...] (1x1 convs), the gated hidden
    ``act(x1) * x2``. Removing unit j zeroes exactly hidden channel j, so its U sample is that
    channel and its R-Score that channel's Taylor term, as for an LM's MLP neuron at
    ``down_proj``; fc1's two halves observed apart would score the gate and the value, not the
    unit."""

    def __init__(self, name: str, glu: nn.Module, fc2_name: str, group: int):
        fc2 = glu.fc2
        H = fc2.in_features if isinstance(fc2, nn.Linear) else fc2.in_channels
        units = torch.arange(H)
        super().__init__(name, fc2, group, units, units)
        self.glu, self.fc2_name, self.units = glu, fc2_name, H
        self.out_units = fc2.out_features if isinstance(fc2, nn.Linear) else fc2.out_channels

    @property
    def where(self) -> str:
        return f"the gated hidden units of {self.name} (the input of {self.fc2_name})"

    @property
    def probe_key(self) -> str:
        return self.fc2_name               # fc2's output has its input's rows and positions

    def features(self, probe) -> int:
        return (int(math.prod(probe["feature_shapes"][self.fc2_name])) * self.fold
                // max(1, self.out_units))

    def install(self, model: nn.Module, on_tensor):
        def hook(mod, args):
            new = on_tensor(args[0])
            return None if new is args[0] else (new,) + tuple(args[1:])
        return self.module.register_forward_pre_hook(hook)

    def unit_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """[H, 2 * (fan_in + bias) + out]: a unit's two fc1 rows (with their biases) and its fc2
        column."""
        H, fc1 = self.units, self.glu.fc1
        w = fc1.weight.detach().float().cpu()
        w = w.reshape(w.shape[0], -1)                      # a 1x1 conv's [2H, C, 1, 1] too
        if fc1.bias is not None:
            w = torch.cat([w, fc1.bias.detach().float().cpu()[:, None]], dim=1)
        rows = w.reshape(2, H, -1).transpose(0, 1).reshape(H, -1)
        col = self.module.weight.detach().float().cpu()
        col = col.reshape(col.shape[0], H).t()
        return torch.cat([rows, col], dim=1), None


def _check_folds(model: nn.Module, producers: List[_Producer], probe: Dict[str, Any],
                 inputs: Any, device) -> None:
    """Set ``fold`` of every tap whose tensor has more than one row per sample (windowed
    attention, MobileViT's patches: [B * fold, tokens, units]) after checking, on the first two
    samples of ``inputs``, that the rows are sample-major (the first sample's rows come first),
    so that its U samples are read from the right rows; else refuse naming the layer."""
    rows = probe["feature_rows"]
    folded = [p for p in producers if rows.get(p.probe_key, 1) > 1]
    if not folded:
        return
    first = folded[0]
    x = first_tensor(inputs)
    if x is None or x.dim() < 2:
        raise CalibrationDataError(
            f"{first.where} folds {rows[first.probe_key]} rows per sample into the batch dim; "
            "telling the samples' rows apart needs batched tensor inputs")
    if x.shape[0] < 2:          # a batch of one: the sample and its mirror image as the pair
        inputs = map_tensors(inputs, lambda t: torch.cat([t[:1], t[:1].flip(-1)])
                             if t.is_floating_point() and t.dim() >= 2 else t[:1].repeat(
                                 2, *([1] * (t.dim() - 1))))
    seen: Dict[Tuple[int, int], Tensor] = {}

    def record(p: _Producer, n: int):
        def on_tensor(z: Tensor) -> Tensor:
            seen.setdefault((n, id(p)), z.detach())
            return z
        return on_tensor
    for n in (1, 2):
        hooks = [p.install(model, record(p, n)) for p in folded]
        try:
            with torch.no_grad():
                call_model(model, map_tensors(inputs, lambda t: t[:n].to(device)))
        finally:
            for h in hooks:
                h.remove()
    for p in folded:
        k = rows[p.probe_key]
        one, two = seen.get((1, id(p))), seen.get((2, id(p)))
        ok = (p.unit_dim == -1 and one is not None and two is not None and one.shape[0] == k
              and two.shape[0] == 2 * k)
        if ok:
            one, two = one.float(), two.float()
            atol = 1e-5 * max(1.0, float(one.abs().max()))
            ok = torch.allclose(two[:k], one, rtol=1e-3, atol=atol)
            if ok and torch.allclose(two[k:], one, rtol=1e-3, atol=atol):
                raise CalibrationDataError(
                    f"{p.where} folds {k} rows per sample into the batch dim, and the first two "
                    "calibration samples (or, in a batch of one, the first and its mirror "
                    "image) give the same rows there, so their order cannot be checked: start "
                    "the calibration data with two different samples")
        if not ok:
            raise UnsupportedModelError(
                f"{p.where} has {k} rows per sample, folded into the batch dim in an order "
                "fair_pruner cannot attribute to samples (it reads the first sample's rows "
                f"first): keep it whole with ignore=[{p.name!r}]")
        p.fold = k


def _set_modes(model: nn.Module, bn_mode: str) -> None:
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def score(model: nn.Module, loader: Iterable, *, loss_fn=None, num_classes: Optional[int] = None,
          samples_per_class: int = 32, max_classes: int = 100, projections: int = 128,
          u_mode: str = "sliced", seed: int = 0, device=None, ignore: Sequence = (),
          progress: bool = True, memory_budget: int = 4 << 30, bn_mode: str = "eval",
          signals: Sequence[Signal] = (), reconstruction: bool = False,
          gram_memory: float = 4.0) -> ScoreBook:
    """Calibrate ``model`` on a labelled ``loader`` and return its :class:`ScoreBook`.

    Args:
        model: a trained CNN/MLP (``nn.Module``); left exactly as it was.
        loader: any iterable of ``(inputs, labels)`` or dicts with ``labels``; re-iterated (in
            the same order) only when U sketches need more than one pass.
        loss_fn: ``loss_fn(outputs, labels) -> scalar``; default summed cross-entropy.
        num_classes: number of model outputs (labels must lie in ``[0, num_classes)``);
            default: the logits' last dim.
        samples_per_class: reservoir size per class for the U-Score (also its quantile count).
        max_classes: the U-Score's classes are the labels present in the calibration data; when
            there are more than ``max_classes`` of them, a seeded random subset of that many
            (the same for a given seed and set of labels). A model may have more outputs than
            the data has classes; at least two classes need >= 2 samples each.
        projections: sliced-W1 directions per layer for map units.
        u_mode: ``"sliced"`` (default; docs/method.md) or ``"pooled"`` (GAP then exact 1-D W1).
        seed: makes sample selection, directions and the plan reproducible.
        device: where to calibrate; a model elsewhere is copied there (never moved).
        ignore: modules (or names) never to prune, besides the output layer.
        progress: show tqdm progress bars.
        memory_budget: bytes for the per-class U samples held at once; more passes if exceeded.
        bn_mode: ``"eval"`` (default) or ``"train"`` (batch statistics, as the reference does;
            running stats are restored afterwards).
        signals: extra :class:`~fair_pruner.signals.Signal` objects to compute and store.
        reconstruction: also collect, for every consumer that reads a group's channels
            linearly (``nn.Linear``, or ``nn.Conv2d`` with ``groups=1`` and zero padding), the
            mean and Gram matrix of its input (im2col patches for a conv: (C·kh·kw)² fp32), so
            ``fp.prune(model, plan, book=book)`` can update its kept weights
            (:mod:`fair_pruner.reconstruct`). Consumers over ``gram_memory`` GiB in total are
            left out, largest first, with a warning (``book.meta["reconstruction_skipped"]``).
    """

    t0 = time.perf_counter()
    _validate(samples_per_class, max_classes, projections, u_mode, bn_mode, memory_budget)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work, device = working_model(model, device)
    fingerprint = model_fingerprint(model)
    if needs_conversion(work):      # torchvision ViT / Swin / ShuffleNetV2 (graph.convert_blocks)
        # a new module tree over the same weights; BN statistics updated in train mode are not
        # shared (they are restored afterwards, but the caller's must never change meanwhile)
        work = convert_blocks(copy_model(work, share_tensors=bn_mode == "eval")
                              if work is model else work)
    loss_fn_given = loss_fn
    loss_fn = loss_fn or _default_loss
    all_signals: Dict[str, Signal] = dict(BUILTIN)
    for s in signals:
        all_signals[s.name] = s

    it = iter(loader)
    empty = object()
    # Data parallel: a rank whose loader fails or is empty must fail every rank here, before the
    # first collective, not leave the others waiting for the process group's timeout.
    first = dist.guarded(lambda: next(it, empty), (lambda: None) if dist.active() else None)
    if dist.active():
        dist.check_every_rank_has_data(dist.gather_objects(int(first is not empty)))
    if first is empty:
        raise CalibrationDataError("the calibration loader is empty")
    inputs0, labels0 = split_batch(first)
    _check_labels(labels0, 0)
    x0 = first_tensor(inputs0)
    if x0 is None or x0.shape[0] < 1:
        raise CalibrationDataError("the first calibration batch holds no input tensor")
    example = map_tensors(inputs0, lambda t: t[:1].to(device))

    check_model_types(work)
    with preserved(work, restore_buffers=(bn_mode == "train")):
        _set_modes(work, "eval")
        probe = _probe(work, example)
        if probe["ambiguous"] and (loss_fn_given is None or num_classes is None):
            raise UnsupportedModelError(
                f"the model returns a {type(probe['out']).__name__} with several tensors "
                f"({probe['ambiguous']}) and no 'logits' entry: fair_pruner cannot tell which "
                "are the logits. Return the logits (a tensor, or a dict with a 'logits' key), "
                "or pass loss_fn=(outputs, labels) -> loss and num_classes=")
        if num_classes is None:
            num_classes = probe["num_classes"]
        elif probe["num_classes"] not in (None, num_classes) and not probe["ambiguous"]:
            raise CalibrationDataError(f"num_classes={num_classes} but the model outputs "
                                       f"{probe['num_classes']} logits")
        if num_classes is None or num_classes < 2:
            raise CalibrationDataError("cannot tell the number of classes from the model's "
                                       "output; pass num_classes=")
        out_layers = _output_layers(work, probe, num_classes)
        out_layer = next((m for m in out_layers if _units(m) == num_classes),
                         out_layers[0] if out_layers else None)
        ignored = list(out_layers)
        residual = kept_residual(work)
        if residual:
            ignored.extend(residual)
            warnings.warn(f"fair_pruner: {type(work).__name__}: the residual width (the patch "
                          "embedding or stem, every attention, MLP and conv block output, patch "
                          "merging) and Swin-V2's position-bias MLPs are kept whole "
                          f"({len(residual)} modules, book.meta['ignored']): Torch-Pruning's "
                          "search through its window partitions runs for hours; attention "
                          "heads, MLP neurons and inner conv channels are pruned")
        shuffled = shuffle_outputs(work)
        if shuffled:
            ignored.extend(shuffled)
            warnings.warn(f"fair_pruner: ShuffleNetV2: {len(shuffled)} convs of its blocks "
                          "carry channels that channel shuffles interleave from block to block "
                          "and are kept whole (book.meta['ignored']); each branch's inner "
                          "channels and the last conv are pruned")
        name_to_mod = dict(work.named_modules())
        for m in ignore:
            mod = name_to_mod.get(m) if isinstance(m, str) else m
            if mod is None:
                raise UnsupportedModelError(f"ignore: no module named {m!r}")
            ignored.append(mod)
        DG = build_dependency_graph(work, example)
        # (kept-whole modules need not be traced: V2 Swin's position-bias MLP reads a buffer)
        kept = set(ignored)
        check_traced(work, DG, [m for m in probe["calls"] if m not in kept])
        skipped: List[str] = []
        tp_groups: Dict[str, object] = {}
        specs = find_groups(work, DG, ignored, skipped, calls=probe["calls"],
                            tp_groups=tp_groups)
        if skipped:
            warnings.warn(f"fair_pruner: {len(skipped)} groups touch grouped convolutions "
                          "whose channel groups they do not cover position by position (e.g. "
                          f"{skipped[0]}); they are kept whole (book.meta['skipped_groups'])")
        if not specs:
            raise UnsupportedModelError("found no prunable Conv/Linear groups in this model "
                                        "(only the output layer, or everything is ignored)")
        cost = build_cost_model(work, DG, specs, probe["positions"], tp_groups)
        # Before any calibration work: pruning each group must equal masking it, and the cost
        # model must count what pruning leaves (else refuse, naming the groups).
        check_exact(work, example, specs, cost, call_model, seed, DG=DG)
        producers: List[_Producer] = []
        glus = glus_by_fc1(work)
        for gi, spec in enumerate(specs):
            if head_attention(name_to_mod[spec.root_module]):
                producers.append(_Heads(spec.root_module, name_to_mod[spec.root_module], gi))
                continue
            glu = glus.get(name_to_mod[spec.root_module])
            if glu is not None and spec.interleave == 2:   # graph.glu_spec's group
                fc2 = next(m.module for m in spec.members if m.role == "consumer")
                producers.append(_GluHidden(spec.root_module, glu, fc2, gi))
                continue
            for m in spec.producers:
                p = _Producer(m.module, name_to_mod[m.module], gi,
                              torch.tensor(m.idxs), torch.tensor(m.root_idxs))
                p.clone = m.module in probe["inplace"]
                producers.append(p)
        _check_folds(work, producers, probe, inputs0, device)

        # The U-Score classes are the labels the data holds (at most max_classes of them),
        # known only after pass 1: its sample buffers have room for the most there can be, and
        # the U passes after it are planned for the classes found.
        res = _DataClasses(max_classes, samples_per_class, seed)
        slots = min(max_classes, num_classes)
        rank, size = dist.world()
        if size > 1:
            # Data parallel: every rank replays the class choice and reservoir over the labels
            # of the union (one label-only pass over the data), then stores its own final
            # samples in pass 1, exactly as one process would.
            if hasattr(loader, "__next__"):
                raise CalibrationDataError(
                    "data-parallel scoring reads the calibration labels before pass 1, but the "
                    f"loader is a one-shot iterator ({type(loader).__name__}): pass a list or a "
                    "DataLoader")
            labels = _labels_of(loader, num_classes)
            dist.check_every_rank_has_data([len(x) for x in labels])
            res = dist.ReplayedReservoir(res, labels)
        first_chunk = _plan_chunks(producers, probe, slots, samples_per_class, projections,
                                   u_mode, memory_budget, warn=False)[0]
        _warn_oversize(first_chunk, probe, slots, samples_per_class, projections, u_mode,
                       memory_budget)
        run = _Run(work, producers, loader, loss_fn, num_classes, device, progress, res,
                   Sampling(tuple(range(slots)), samples_per_class, projections, u_mode, seed))
        grams = _ConsumerStats(work, specs, gram_memory) if reconstruction else None
        _set_modes(work, bn_mode)
        try:
            stats = _pass_one(run, first_chunk, first, it,
                              reduce=(lambda: _reduce(producers, grams, first_chunk))
                              if size > 1 else None)
        finally:
            if grams is not None:
                grams.remove()
        _set_modes(work, "eval")
        if size > 1:
            stats = dict(stats, samples=res.total_rows, batches=res.batches)
        run.sampling = replace(run.sampling, classes=tuple(res.classes), rows=_rows(res))
        rest = [p for p in producers if p not in first_chunk]
        # planned for what pass 1 found: the buffers hold max(counts) <= S rows per class
        chunks = [first_chunk] + (_plan_chunks(rest, probe, len(res.classes), run.sampling.rows,
                                               projections, u_mode, memory_budget)
                                  if rest else [])
        if len(chunks) > 1 and hasattr(loader, "__next__"):
            raise CalibrationDataError(
                f"the U-Score needs {len(chunks)} passes over the calibration data under "
                f"memory_budget={memory_budget}, but the loader is a one-shot iterator "
                f"({type(loader).__name__}): pass a re-iterable loader (a list or a DataLoader) "
                f"or raise memory_budget to at least {_need_bytes(producers, probe, run):,} "
                "bytes for one pass")
        for chunk in chunks[1:]:
            _u_pass(run, chunk, stats, _need_bytes(producers, probe, run),
                    reduce=dist.sum_samples if size > 1 else None)

    order = sorted(range(len(res.classes)), key=lambda k: res.classes[k])
    classes = [res.classes[k] for k in order]
    counts = [res.counts()[k] for k in order]
    groups = _assemble(specs, producers, all_signals, seed)
    if grams is not None:
        grams.store(groups)
    meta = {
        "fingerprint": fingerprint, "seed": seed, "num_classes": num_classes,
        "classes": classes, "class_counts": counts, "max_classes": max_classes,
        "classes_used": [int(c) for c, n in zip(classes, counts) if n >= 2],
        "labels_found": len(res.label_counts), "samples_per_class": samples_per_class,
        "calibration_samples": stats["samples"], "batches": stats["batches"],
        "projections": projections, "u_mode": u_mode, "bn_mode": bn_mode,
        "u_passes": len(chunks), "output_layer": probe["names"].get(out_layer),
        "output_layers": [probe["names"][m] for m in out_layers],
        "ignored": [probe["names"].get(m, str(m)) for m in ignored],
        "skipped_groups": skipped,
        "input_spec": map_tensors(example, lambda t: {"shape": list(t.shape), "dtype": str(t.dtype)}),
        "reconstruction_stats": grams is not None,
        "reconstruction_skipped": grams.skipped if grams is not None else [],
        "kind": "cnn", "world_size": dist.world()[1], "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    return ScoreBook(groups, cost, meta)


def consumer_columns(mod: nn.Module, chans: Sequence[int]) -> Tensor:
    """Columns of a consumer's 2-D weight view (and of its input statistics) that carry input
    channels ``chans``: a Conv2d's im2col layout is channel-major (c, kh, kw)."""
    chans = torch.as_tensor(list(chans), dtype=torch.int64)
    if isinstance(mod, nn.Conv2d):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        return (chans[:, None] * k + torch.arange(k)[None]).flatten()
    return chans


def reconstructable(mod: nn.Module) -> bool:
    """Whether ``mod`` reads its input channels linearly, all of them in every output."""
    if isinstance(mod, nn.Linear):
        return True
    return (isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"
            and isinstance(mod.padding, tuple))


class _ConsumerStats:
    """Forward pre-hooks summing each reconstructable consumer's input rows: Σ x, Σ x xᵀ, n."""

    def __init__(self, model: nn.Module, specs, gram_memory: float):
        mods = dict(model.named_modules())
        names = []
        for spec in specs:
            for m in spec.consumers:
                if m.module not in names and reconstructable(mods[m.module]):
                    names.append(m.module)
        width = {n: mods[n].weight[0].numel() for n in names}
        need, self.skipped = sum(width[n] ** 2 * 4 for n in names), []
        for n in sorted(names, key=lambda n: -width[n]):       # drop the largest first
            if need <= gram_memory * 2 ** 30:
                break
            self.skipped.append(n)
            need -= width[n] ** 2 * 4
        if self.skipped:
            warnings.warn(f"fair_pruner: reconstruction statistics of {len(self.skipped)} "
                          f"consumers (e.g. {self.skipped[0]}, {width[self.skipped[0]]} inputs) "
                          f"exceed gram_memory={gram_memory:g} GiB; they will not be updated")
        self.stats: Dict[str, list] = {}
        self.handles = [mods[n].register_forward_pre_hook(self._hook(n))
                        for n in names if n not in self.skipped]

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0].detach()
            if isinstance(mod, nn.Conv2d):
                cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.float()
            st = self.stats.get(name)
            if st is None:
                C = rows.shape[1]
                st = self.stats[name] = [torch.zeros(C, dtype=torch.float64, device=rows.device),
                                         torch.zeros(C, C, device=rows.device), 0]
            st[0] += rows.sum(dim=0).double()
            st[1] += ops.gram(rows)
            st[2] += rows.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def store(self, groups: List[Group]) -> None:
        """Each consumer's statistics go to the first group that lists it."""
        done = set()
        for g in groups:
            for m in g.spec.consumers:
                st = self.stats.get(m.module)
                if st is None or m.module in done:
                    continue
                done.add(m.module)
                g.tensors[f"mean@{m.module}"] = (st[0] / max(1, st[2])).float().cpu()
                g.tensors[f"gram@{m.module}"] = st[1].cpu()
                g.meta[f"tokens@{m.module}"] = int(st[2])


def _validate(spc, maxc, proj, u_mode, bn_mode, budget):
    check_sampling(spc, proj)
    if not isinstance(maxc, int) or maxc < 2:
        raise CalibrationDataError("max_classes must be an int >= 2")
    if u_mode not in ("sliced", "pooled"):
        raise CalibrationDataError(f"u_mode must be 'sliced' or 'pooled', got {u_mode!r}")
    if bn_mode not in ("eval", "train"):
        raise CalibrationDataError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    if (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
            or not math.isfinite(budget) or budget <= 0):
        raise CalibrationDataError(f"memory_budget must be a positive, finite number of bytes, "
                                   f"got {budget!r}")


def _units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _probe(model: nn.Module, example: Any) -> Dict[str, Any]:
    """One forward on one sample (with autograd, no backward): output shapes, order, in-place
    modified outputs, calls per producer, and the autograd node of each producer output (to
    find the producers the outputs depend on directly, :func:`_output_layers`)."""
    names = {m: n for n, m in model.named_modules()}
    seen: List[Tuple[nn.Module, Tensor, int, Any]] = []
    calls: Dict[nn.Module, int] = {}
    hooks = []

    def hook(mod, inp, out):
        calls[mod] = calls.get(mod, 0) + 1
        if not isinstance(out, Tensor):
            return None
        new = None
        if out.grad_fn is None and out.is_floating_point():   # frozen: give it a node to find
            new = out = out.detach().requires_grad_(True).clone()
        seen.append((mod, out, out._version, out.grad_fn))
        return new

    for m in model.modules():
        if isinstance(m, PRODUCER_TYPES):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad(), structure_only():     # its graph is walked, never run
            out = call_model(model, example)
    except Exception as exc:
        raise UnsupportedModelError(f"the model failed on the first calibration batch "
                                    f"({type(exc).__name__}: {exc})") from exc
    finally:
        for h in hooks:
            h.remove()
    ambiguous = None
    if (isinstance(out, dict) or hasattr(out, "keys")) and "logits" not in out:
        keys = [k for k, v in out.items() if isinstance(v, Tensor)]
        if len(keys) > 1:
            ambiguous = keys
    logits = logits_of(out)
    positions, inplace, order = {}, set(), []
    for mod, t, v, _ in seen:
        units = t.shape[1] if not isinstance(mod, nn.Linear) else t.shape[-1]
        # Output positions per sample (the probe runs one sample): counting the rows too, as
        # windowed attention folds its windows into the batch dim ([windows, tokens, dim]).
        positions[names[mod]] = t.numel() // max(1, units)
        if t._version != v:
            inplace.add(names[mod])
        order.append(mod)
    nc = logits.shape[-1] if logits.dim() >= 2 else None
    return {"logits": logits, "out": out, "positions": positions, "inplace": inplace,
            "order": order, "names": names,
            "num_classes": nc, "calls": calls, "ambiguous": ambiguous,
            "nodes": [(mod, node) for mod, _, _, node in seen if node is not None],
            "feature_shapes": {names[mod]: tuple(t.shape[1:]) for mod, t, _, _ in seen},
            "feature_rows": {names[mod]: t.shape[0] for mod, t, _, _ in seen}}


def _output_tensors(out: Any) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "keys"):
        return [t for k in out.keys() for t in _output_tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _output_layers(model, probe, num_classes) -> List[nn.Module]:
    """The Conv/Linear layers whose outputs the model's outputs depend on with no other
    Conv/Linear in between (found by walking the autograd graph back from every output tensor):
    pruning any of them would change what the model returns, so all are protected. The
    logits may pass through log_softmax, a temperature, a sum of heads, ... on the way."""
    node_mod: Dict[Any, List[nn.Module]] = {}
    for mod, node in probe["nodes"]:
        node_mod.setdefault(node, []).append(mod)
    found: List[nn.Module] = []
    stack = [t.grad_fn for t in _output_tensors(probe["out"]) if t.grad_fn is not None]
    visited = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        if fn in node_mod:
            found.extend(m for m in node_mod[fn] if m not in found)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    if found:
        return sorted(found, key=probe["order"].index)
    cands = [m for m in probe["order"] if _units(m) == num_classes]
    if not cands:
        warnings.warn("fair_pruner: no Conv/Linear layer has num_classes outputs; no output "
                      "layer was protected (pass it in ignore= if there is one)")
        return []
    warnings.warn(f"fair_pruner: the model's output does not depend on any Conv/Linear "
                  f"through autograd; protecting {probe['names'][cands[-1]]}, the last layer "
                  "with num_classes outputs (pass the output layer in ignore= if it is another)")
    return [cands[-1]]


def _proj_dim(p: _Producer, probe, projections: int, u_mode: str) -> Tuple[int, int]:
    """(D, P): flattened positions per unit and the number of sketch coordinates."""
    D = p.features(probe)
    return D, stored_dim(D, projections, u_mode)


def _u_bytes(p: _Producer, probe, K, S, P, u_mode) -> int:
    return K * S * p.units * _proj_dim(p, probe, P, u_mode)[1] * 4


def _plan_chunks(producers, probe, K, S, P, u_mode, budget,
                 warn: bool = True) -> List[List[_Producer]]:
    """Split producers into chunks whose U samples fit ``budget`` bytes (one pass each)."""
    chunks: List[List[_Producer]] = [[]]
    used = 0
    for p in producers:
        nbytes = _u_bytes(p, probe, K, S, P, u_mode)
        if chunks[-1] and used + nbytes > budget:
            chunks.append([])
            used = 0
        if warn:
            _warn_oversize([p], probe, K, S, P, u_mode, budget)
        chunks[-1].append(p)
        used += nbytes
    return chunks


def _warn_oversize(producers, probe, K, S, P, u_mode, budget) -> None:
    for p in producers:
        nbytes = _u_bytes(p, probe, K, S, P, u_mode)
        if nbytes > budget:
            warnings.warn(f"fair_pruner: U samples of {p.name} need {nbytes / 2**20:.0f} MiB, "
                          f"over memory_budget; processing it alone")


@dataclass
class _Run:
    """What every pass of one calibration reads (the model is the working copy)."""
    model: nn.Module
    producers: List[_Producer]
    loader: Iterable
    loss_fn: Any
    num_classes: int
    device: torch.device
    progress: bool
    res: _DataClasses
    sampling: Sampling


def _pass_one(run: _Run, chunk: List[_Producer], first: Any, it, reduce=None
              ) -> Dict[str, Any]:
    """Forward + backward over every batch (``first``, then the rest of iterator ``it``): Taylor
    terms and moments for all producers, and U samples for the producers in ``chunk``;
    ``reduce()`` (data parallel) sums them over the ranks before the U-Scores."""
    label_hashes: List[int] = []
    prints: List[tuple] = []

    def batches():
        batch, bi = first, 0
        while batch is not None:
            inputs, labels = split_batch(batch)
            labels = _check_labels(labels, bi, run.num_classes)
            lab_list = labels.tolist()
            x = first_tensor(inputs)
            if x is not None and x.dim() >= 1 and x.shape[0] != len(lab_list):
                raise CalibrationDataError(
                    f"batch {bi} holds {x.shape[0]} samples and {len(lab_list)} labels: give "
                    "one label per sample (the U-Score reads each sample's class)")
            label_hashes.append(hash(tuple(lab_list)))
            prints.append(_input_print(inputs))
            labels = labels.to(run.device)
            yield Batch(map_tensors(inputs, lambda t: t.to(run.device)), lab_list,
                        lambda out, y=labels: run.loss_fn(out, y))
            bi += 1
            batch = next(it, None)

    n = dist.guarded(lambda: gradient_pass(
        run.model, run.producers, batches(), run.res, run.sampling, sketch=chunk,
        progress=run.progress, total=len_or_none(run.loader)), reduce)
    run.res.check()
    finish_u_all(chunk, run.res, list(run.res.classes))
    return {"samples": n, "batches": len(label_hashes), "label_hashes": label_hashes,
            "prints": prints}


def _labels_of(loader: Iterable, num_classes: int) -> List[List[List[int]]]:
    """Every rank's per-batch labels, checked (data parallel: read before pass 1); a bad batch
    raises on every rank."""
    return dist.gathered(lambda: [_check_labels(split_batch(b)[1], bi, num_classes).tolist()
                                  for bi, b in enumerate(loader)])


def _reduce(producers: List[_Producer], grams, chunk: List[_Producer]) -> None:
    """Sum pass 1's statistics over the ranks: producers' sums, consumers' Gram matrices, and
    the U samples of ``chunk`` (each slot stored by one rank)."""
    counts = torch.tensor([p.positions for p in producers], dtype=torch.float64)
    names = sorted(grams.stats) if grams is not None else []
    tokens = torch.tensor([grams.stats[n][2] for n in names], dtype=torch.float64)
    dist.sum_many_([getattr(p, a) for p in producers for a in ("taylor", "act_abs", "act_sum",
                                                                "act_sq")]
                   + [grams.stats[n][0] for n in names] + [counts, tokens])
    for p, c in zip(producers, counts.tolist()):
        p.positions = int(c)
    for n, c in zip(names, tokens.tolist()):
        grams.stats[n][2] = int(c)
        dist.sum_(grams.stats[n][1])
    dist.sum_samples(chunk)


def _input_print(inputs: Any) -> tuple:
    """A cheap checksum of a batch's inputs: per tensor its shape, fp64 sum and 8 strided
    elements, to tell a replayed batch from a reshuffled or re-augmented one."""
    out: List[tuple] = []

    def one(t: Tensor) -> Tensor:
        flat = t.detach().reshape(-1)
        n = flat.numel()
        s = float(flat.sum(dtype=torch.float64)) if n else 0.0
        picks = tuple(flat[::max(1, n // 8)][:8].double().tolist()) if n else ()
        out.append((tuple(t.shape), str(t.dtype), s, picks))
        return t
    map_tensors(inputs, one)
    return tuple(out)


def _same_print(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for (sa, da, ua, pa), (sb, db, ub, pb) in zip(a, b):
        if sa != sb or da != db or pa != pb or not (
                ua == ub or abs(ua - ub) <= 1e-9 * max(abs(ua), abs(ub))):
            return False
    return True


def _rows(res) -> int:
    """Sample rows per class the U buffers need after pass 1: the fullest class's (<= S)."""
    return max([1] + [int(c) for c in res.counts()])


def _need_bytes(producers, probe, run: _Run) -> int:
    """memory_budget for a single pass (all producers' U samples at once), after pass 1."""
    S = run.sampling
    return sum(_u_bytes(p, probe, S.K, S.rows, S.projections, S.u_mode) for p in producers)


def _u_pass(run: _Run, chunk: List[_Producer], first: Dict[str, Any], need: int,
            reduce=None) -> None:
    """No-grad pass that forwards only the reservoir-selected samples, for one U chunk; with
    ``reduce`` (data parallel) the ranks' samples are summed before the U-Scores."""
    dist.guarded(lambda: _u_samples(run, chunk, first, need),
                 (lambda: reduce(chunk)) if reduce is not None else None)
    finish_u_all(chunk, run.res, list(run.res.classes))


def _u_samples(run: _Run, chunk: List[_Producer], first: Dict[str, Any], need: int) -> None:
    from tqdm.auto import tqdm
    model, loader, res, device = run.model, run.loader, run.res, run.device
    rows_now: List[Tuple[int, int, int]] = []

    def storing(p: _Producer):
        def on_tensor(z: Tensor) -> Tensor:
            store_samples(p, p.sample_rows(z, len(rows_now)), rows_now, run.sampling,
                          len(rows_now))
            return z
        return on_tensor

    label_hashes, prints = first["label_hashes"], first["prints"]
    hooks = [p.install(model, storing(p)) for p in chunk]
    bar = tqdm(total=len(label_hashes), desc="fair_pruner: U pass", disable=not run.progress,
               leave=False)
    fix = ("the U-Score needed more than one pass over the data (memory_budget) and requires "
           "a deterministic, re-iterable loader: a list, or a DataLoader with shuffle=False and "
           f"no random augmentation; or raise memory_budget to at least {need:,} bytes for one "
           "pass")
    try:
        start, nb = 0, 0
        for bi, batch in enumerate(loader):
            nb = bi + 1
            inputs, labels = split_batch(batch)
            labels = _check_labels(labels, bi)
            lab = labels.tolist()
            if bi >= len(label_hashes):
                raise CalibrationDataError(f"the loader yielded more than the {len(label_hashes)}"
                                           f" batches of the first pass on a later pass: {fix}")
            if hash(tuple(lab)) != label_hashes[bi]:
                raise CalibrationDataError(f"the loader yielded other labels in batch {bi} on a "
                                           f"later pass than on the first: {fix}")
            if not _same_print(_input_print(inputs), prints[bi]):
                raise CalibrationDataError(f"the loader yielded other inputs in batch {bi} on a "
                                           "later pass than on the first (random augmentation "
                                           f"or shuffling?): {fix}")
            sel = [(row, *res.final[start + row]) for row in range(len(lab))
                   if start + row in res.final]
            start += len(lab)
            bar.update(1)
            if not sel:
                continue
            idx = torch.tensor([s[0] for s in sel])
            rows_now[:] = [(i, k, s) for i, (_, k, s) in enumerate(sel)]
            sub = map_tensors(inputs, lambda t: t.index_select(0, idx.to(t.device)).to(device))
            with torch.no_grad():
                call_model(model, sub)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    if nb != len(label_hashes):
        raise CalibrationDataError(f"the loader yielded {nb} batches on a later pass but "
                                   f"{len(label_hashes)} on the first: {fix}")


def _assemble(specs, producers: List[_Producer], all_signals: Dict[str, Signal],
              seed: int) -> List[Group]:
    """Per-producer signals -> per-group scores (mapped to root unit indices)."""
    by_group: Dict[int, List[_Producer]] = {}
    for p in producers:
        by_group.setdefault(p.group, []).append(p)
    groups = []
    for gi, spec in enumerate(specs):
        n = spec.size
        members = [(p, _stats(p, seed)) for p in by_group[gi]]
        sigs: Dict[str, Tensor] = {}
        for name, sig in all_signals.items():
            if name == "u" and any(st.u is None for _, st in members):
                continue
            acc = None
            for p, st in members:
                v = torch.as_tensor(sig(st), dtype=torch.float64).cpu()
                full = torch.full((n,), -math.inf if sig.reduce == "max" else 0.0,
                                  dtype=torch.float64)
                if sig.reduce == "max":
                    full.scatter_reduce_(0, p.root_idxs, v[p.idxs], reduce="amax")
                    acc = full if acc is None else torch.maximum(acc, full)
                else:
                    full.index_add_(0, p.root_idxs, v[p.idxs])
                    acc = full if acc is None else acc + full
            if acc is None:
                continue
            if sig.signed_sum_then_abs:
                acc = acc.abs()
            acc = torch.where(torch.isinf(acc), torch.zeros_like(acc), acc)
            if not torch.isfinite(acc).all():
                raise NonFiniteError(f"signal {name!r} is not finite for group {spec.name}")
            sigs[name] = acc
        if isinstance(by_group[gi][0], _Heads):
            # As an LM's heads: whole heads (no rounding), cut only when the channels and
            # neurons cannot reach a target (tier 1, docs/method.md "Targets").
            groups.append(Group(spec.name, n, sigs, spec, kind="head", roundable=False, tier=1))
        else:
            groups.append(Group(spec.name, n, sigs, spec))
    return groups


def _stats(p: _Producer, seed: int) -> UnitStats:
    w, b = p.unit_weights()
    npos = max(1, p.positions)
    return UnitStats(p.name, w, b, p.taylor.cpu(), (p.act_abs / npos).cpu(),
                     (p.act_sum / npos).cpu(), (p.act_sq / npos).cpu(), p.u, seed)
