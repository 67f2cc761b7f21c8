"""CNN surgery (the ``"cnn"`` adapter): apply a :class:`Plan` through Torch-Pruning's graph.

:func:`prune` physically removes the planned units (and everything coupled to them);
:func:`mask` builds the reference it must equal: the original model with the removed units zeroed
where they are consumed (and channel norms computed over the kept channels only).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

from . import adapters
from .errors import BookMismatchError, FairPrunerError, UnsupportedModelError
from .calibrate import consumer_columns
from .engine import copy_model
from .graph import (build_dependency_graph, channels_by_role, convert_blocks, head_attention,
                    mask_units, prune_units, restore_timm_classes)
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
    return channels_by_role([g.spec for g in book.groups], plan.removed, role)


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
    Plan.check(plan, model, options.get("book"))
    method, book, damp = _options(options, plan)
    target = model if inplace else copy_model(model)
    convert_blocks(target)        # as fp.score saw it (torchvision ViT: SelfAttention)
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    modes = {n: m.training for n, m in target.named_modules()}
    device = next((p.device for p in target.parameters()), torch.device("cpu"))
    example = _example_from_spec(plan.meta["input_spec"], device)
    was_training = target.training
    target.eval()
    before = {n for n, _ in target.named_parameters()}
    if method is not None:           # before the graph: a consumer may gain a bias
        _reconstruct(target, plan, book, method, damp)
    added = {n for n, _ in target.named_parameters()} - before
    DG = build_dependency_graph(target, example)
    roots, root_of = {}, plan.meta.get("roots") or {}
    for name in plan.sizes:          # plan.removed names only these (Plan.validate)
        try:
            roots[name] = target.get_submodule(root_of.get(name, name))
        except AttributeError:
            raise BookMismatchError(f"plan group {name!r} is not a module of this model") from None
    # Every group's size, also of groups with nothing removed: a plan edited or made for
    # another width is refused whole rather than applied where it happens to fit.
    interleave = plan.meta.get("interleave") or {}
    for name in plan.sizes:
        mod = roots[name]
        n = (mod.num_heads if head_attention(mod)
             else DG.get_pruner_of_module(mod).get_out_channels(mod))
        il = interleave.get(name, 1)
        if n != plan.sizes[name] * il:
            raise BookMismatchError(
                f"group {name} has {n} units in this model but {plan.sizes[name]} in the plan"
                + (f" (of {il} channels each)" if il != 1 else ""))
    prune_units(target, DG, roots, plan.removed, plan.sizes, interleave)
    # Never silently wrong: the pruned model must hold exactly the parameters the plan counts
    # (biases added by reconstruction aside).
    real = sum(p.numel() for n, p in target.named_parameters() if n not in added)
    if real != plan.params_after:
        raise UnsupportedModelError(
            f"the pruned model has {real:,} parameters but the plan counts {plan.params_after:,}: "
            "Torch-Pruning removed a different set of channels than the plan's groups hold "
            "(an unsupported op couples them); keep the groups involved whole with ignore= "
            "when scoring, and please report the model")
    for n, p in target.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for n, m in target.named_modules():
        if n in modes:
            m.training = modes[n]
    target.training = was_training
    target._fair_pruner_added_params = sum(p.numel() for n, p in target.named_parameters()
                                           if n in added)
    return restore_timm_classes(target)      # loadable with timm alone where timm's forward fits


def mask(model: nn.Module, plan: Plan, book=None, **options) -> nn.Module:
    """A copy of ``model`` where the plan's removed units are zeroed at their consumers.

    Needs the score book's group structure (consumer modules and channel indices). With
    ``reconstruct=`` (as :func:`prune`; "auto" by default) the consumers are updated first.
    """
    if book is None:
        raise FairPrunerError("mask() needs the score book the plan came from: mask(model, plan, book)")
    method, _, damp = _options(dict(options, book=book), plan)
    Plan.check(plan, model, book)
    masked = convert_blocks(copy_model(model))
    if method is not None:
        _reconstruct(masked, plan, book, method, damp)
    mask_units(masked, [g.spec for g in book.groups], plan.removed)
    return masked


def _is_module(model) -> bool:
    return isinstance(model, nn.Module)


def _score(model, loader, **kwargs):
    from .calibrate import score
    return score(model, loader, **kwargs)


adapters.register(adapters.Adapter("cnn", _is_module, _score, prune, mask, data_parallel=True),
                  fallback=True)
