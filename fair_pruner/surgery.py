"""CNN surgery (the ``"cnn"`` adapter): apply a :class:`Plan` through Torch-Pruning's graph.

:func:`prune` physically removes the planned units (and everything coupled to them);
:func:`mask` builds the reference it must equal: the original model with the removed units zeroed
where they are consumed (and channel norms computed over the kept channels only).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import adapters
from .errors import BookMismatchError, FairPrunerError
from .calibrate import consumer_columns
from .graph import build_dependency_graph
from .plan import Plan
from .reconstruct import METHODS, resolve, set_bias, update


def _example_from_spec(spec: Any, device) -> Any:
    if isinstance(spec, dict) and "shape" in spec and "dtype" in spec:
        dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
        return torch.zeros(spec["shape"], dtype=dtype, device=device)
    if isinstance(spec, dict):
        return {k: _example_from_spec(v, device) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_example_from_spec(v, device) for v in spec)
    return spec


def _options(options, plan: Plan):
    """(method or None, book, damp) from ``fp.prune``'s options for a CNN plan; every method
    reads the statistics of ``fp.score(..., reconstruction=True)``."""
    unknown = sorted(set(options) - {"reconstruct", "book", "damp"})
    if unknown:
        raise FairPrunerError(f"unknown option(s) {unknown} for a CNN plan")
    book = options.get("book")
    default = "affine" if book is not None and book.meta.get("reconstruction_stats") else None
    method = resolve(options.get("reconstruct", "auto"), book, plan, default, needs_stats=METHODS)
    return method, book, float(options.get("damp", 1e-2))


def _channels_by_role(book, plan: Plan, role: str) -> Dict[str, List[int]]:
    """Member module of ``role`` -> its channels (a Linear consumer: features) that the plan
    removes."""
    out: Dict[str, List[int]] = {}
    for g in book.groups:
        rem = set(plan.removed.get(g.name, []))
        if not rem:
            continue
        for m in g.spec.members:
            if m.role == role:
                out.setdefault(m.module, []).extend(i for i, r in zip(m.idxs, m.root_idxs)
                                                    if r in rem)
    return {k: sorted(set(v)) for k, v in out.items() if v}


def _reconstruct(model: nn.Module, plan: Plan, book, method: str, damp: float) -> None:
    """Update, in place, every consumer with statistics in ``book`` that loses input channels."""
    stats = {}
    for g in book.groups:
        for key, t in g.tensors.items():
            if key.startswith("gram@"):
                name = key[5:]
                stats[name] = (t, g.tensors[f"mean@{name}"], int(g.meta[f"tokens@{name}"]))
    mods = dict(model.named_modules())
    for name, chans in _channels_by_role(book, plan, "consumer").items():
        if name not in stats:          # not reconstructable (e.g. depthwise) or over budget
            continue
        mod = mods[name]
        gram, mean, n = stats[name]
        W = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        if W.shape[1] != mean.numel():
            raise BookMismatchError(f"{name}: the book's statistics cover {mean.numel()} inputs "
                                    f"but the module has {W.shape[1]}; wrong book")
        b = mod.bias.detach().cpu() if mod.bias is not None else None
        newW, newb = update(W.cpu(), b, consumer_columns(mod, chans), method, mean=mean,
                            gram=gram, tokens=n, damp=damp, what=name)
        with torch.no_grad():
            mod.weight.copy_(newW.reshape(mod.weight.shape).to(mod.weight.device))
        if newb is not None:
            set_bias(mod, newb)


def prune(model: nn.Module, plan: Plan, inplace: bool = False, **options) -> nn.Module:
    """Return ``model`` with the plan's units physically removed (a copy unless ``inplace``).

    Options: ``book=`` and ``reconstruct=`` ("auto" (default): "affine" when ``book`` was scored
    with ``reconstruction=True``, else none; "affine", "lstsq", "bias" or None) update each
    Conv/Linear consumer of removed channels first (:mod:`fair_pruner.reconstruct`).
    """
    Plan.check(plan, model)
    method, book, damp = _options(options, plan)
    target = model if inplace else copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    modes = {n: m.training for n, m in target.named_modules()}
    device = next((p.device for p in target.parameters()), torch.device("cpu"))
    example = _example_from_spec(plan.meta["input_spec"], device)
    was_training = target.training
    target.eval()
    if method is not None:           # before the graph: a consumer may gain a bias
        _reconstruct(target, plan, book, method, damp)
    DG = build_dependency_graph(target, example)
    roots, root_of = {}, plan.meta.get("roots") or {}
    for name in plan.removed:
        try:
            roots[name] = target.get_submodule(root_of.get(name, name))
        except AttributeError:
            raise BookMismatchError(f"plan group {name!r} is not a module of this model") from None
    for name, idxs in plan.removed.items():
        if not idxs:
            continue
        mod = roots[name]
        pruner = DG.get_pruner_of_module(mod)
        n = pruner.get_out_channels(mod)
        if n != plan.sizes[name]:
            raise BookMismatchError(f"group {name} has {n} units in this model but "
                                    f"{plan.sizes[name]} in the plan")
        group = DG.get_pruning_group(mod, pruner.prune_out_channels, list(idxs))
        group.prune()
    for n, p in target.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for n, m in target.named_modules():
        if n in modes:
            m.training = modes[n]
    target.training = was_training
    return target


class _MaskedLayerNorm(nn.Module):
    """LayerNorm over the kept channels only, zero on removed ones (what pruning computes)."""

    def __init__(self, ln: nn.LayerNorm, keep: torch.Tensor, channels_first: bool):
        super().__init__()
        self.ln, self.keep, self.channels_first = ln, keep, channels_first

    def forward(self, x):
        if self.channels_first:
            x = x.permute(0, *range(2, x.dim()), 1)
        k = self.keep.to(x.device)
        w = self.ln.weight[k] if self.ln.weight is not None else None
        b = self.ln.bias[k] if self.ln.bias is not None else None
        y = torch.zeros_like(x)
        y[..., k] = F.layer_norm(x[..., k], (k.numel(),), w, b, self.ln.eps)
        if self.channels_first:
            y = y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
        return y


def mask(model: nn.Module, plan: Plan, book=None, **options) -> nn.Module:
    """A copy of ``model`` where the plan's removed units are zeroed at their consumers.

    Needs the score book's group structure (consumer modules and channel indices). With
    ``reconstruct=`` (as :func:`prune`; "auto" by default) the consumers are updated first.
    """
    if book is None:
        raise FairPrunerError("mask() needs the score book the plan came from: mask(model, plan, book)")
    method, _, damp = _options(dict(options, book=book), plan)
    Plan.check(plan, model)
    masked = copy.deepcopy(model)
    if method is not None:
        _reconstruct(masked, plan, book, method, damp)
    mods = dict(masked.named_modules())
    zero_in = _channels_by_role(book, plan, "consumer")
    norm_keep = _channels_by_role(book, plan, "norm")
    for name, chans in zero_in.items():
        mod = mods[name]
        dim = -1 if isinstance(mod, nn.Linear) else 1
        idx = torch.tensor(chans)

        def pre(module, args, idx=idx, dim=dim):
            x = args[0].clone()
            x.index_fill_(dim % x.dim(), idx.to(x.device), 0)
            return (x,) + tuple(args[1:])
        mod.register_forward_pre_hook(pre)
    for name, removed in norm_keep.items():
        ln = mods[name]
        n, removed = ln.normalized_shape[-1], set(removed)
        keep = torch.tensor([i for i in range(n) if i not in removed])
        channels_first = type(ln).__name__ == "LayerNorm2d"
        parent, _, attr = name.rpartition(".")
        # torchvision's LayerNorm2d normalises dim 1; the wrapper replaces its forward wholesale.
        setattr(mods[parent] if parent else masked, attr, _MaskedLayerNorm(ln, keep, channels_first))
    return masked


def _is_module(model) -> bool:
    return isinstance(model, nn.Module)


def _score(model, loader, **kwargs):
    from .calibrate import score
    return score(model, loader, **kwargs)


adapters.register(adapters.Adapter("cnn", _is_module, _score, prune, mask), fallback=True)
