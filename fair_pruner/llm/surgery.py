"""Surgery for causal LMs: apply a :class:`~fair_pruner.plan.Plan` to a Llama-style model.

:func:`prune` physically removes MLP neurons and attention heads (per-layer widths; the model
stays the same transformers class and a valid GQA model). :func:`mask` builds the reference it must
equal: the original model with the removed units' channels zeroed at the input of the Linear that
consumes them (``down_proj`` / ``o_proj``).
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn as nn

from ..errors import BookMismatchError, FairPrunerError
from ..plan import Plan
from .layout import Layout, UnitFamily, find_layout
from .reconstruct import (check_expert_merge, merge_removed_experts,
                          reconstruct as apply_reconstruction, resolve_method)

CONFIG_KEY = "fair_pruner"
FORMAT = 3   # saved directories: 2 may list "biases"; 3 adds the exact architecture delta
              # and the modeling file for stock transformers (fair_pruner.llm.io)


def _heads_mode(plan: Plan) -> str:
    return "query" if any(g.endswith(".query_heads") for g in plan.sizes) else "kv"


def resolve_families(model: nn.Module, plan: Plan) -> Dict[str, UnitFamily]:
    """Plan group -> family of ``model``, after checking sizes and removals (nothing changed)."""
    Plan.check(plan, model)
    fams = find_layout(model, heads=_heads_mode(plan)).by_group()
    out = {}
    for name, removed in plan.removed.items():
        fam = fams.get(name)
        if fam is None:
            raise BookMismatchError(f"plan group {name!r} is not a prunable block of this model "
                                    f"(its groups are e.g. {list(fams)[:3]})")
        if plan.sizes.get(name, fam.size) != fam.size:
            raise BookMismatchError(f"group {name} has {fam.size} units in this model but "
                                    f"{plan.sizes[name]} in the plan")
        fam.check_removal(removed)
        out[name] = fam
    return out


def layer_widths(model: nn.Module, layout: Layout = None) -> List[dict]:
    """Per decoder layer: {role: widths} (e.g. ``{"attention": {...}, "ffn": {...}}``)."""
    layout = layout or find_layout(model)
    return [{f.role: f.widths(model) for f in layer.families if not f.frozen}
            for layer in layout.layers]


def added_biases(model: nn.Module) -> List[str]:
    """Modules that reconstruction gave a bias the model's config does not declare."""
    entry = getattr(getattr(model, "config", None), CONFIG_KEY, None) or {}
    return [n for n in entry.get("biases", [])
            if getattr(model.get_submodule(n), "bias", None) is not None]


def config_entry(model: nn.Module, added=()) -> dict:
    """``config.fair_pruner``: per-layer widths, plus the added biases when there are any."""
    biases = added_biases(model)
    biases += [n for n in added if n not in biases]
    entry = {"format": 2 if biases else 1, "layers": layer_widths(model)}
    if biases:
        entry["biases"] = biases
    return entry


def apply_removals(model: nn.Module, fams: Dict[str, UnitFamily], removed: Dict[str, list],
                   book, method, damp: float) -> List[str]:
    """In place: reconstruct the consumers of ``fams`` (``method``, see
    :mod:`fair_pruner.llm.reconstruct`), then slice their removed units out. Returns the
    modules that gained a bias. :func:`prune` runs it on every family at once,
    :func:`fair_pruner.llm.prune_checkpoint` one decoder layer at a time."""
    added = apply_reconstruction(model, fams, removed, book, method, damp)
    for name, fam in fams.items():
        gone = set(removed[name])
        if gone:
            keep = torch.tensor([i for i in range(fam.size) if i not in gone], dtype=torch.int64)
            fam.prune(model, keep)
    return added


def prune(model: nn.Module, plan: Plan, inplace: bool = False, *, reconstruct: str = "auto",
          book=None, damp: float = 1e-2, expert_merge: bool = False) -> nn.Module:
    """Return ``model`` with the plan's units removed (a deep copy unless ``inplace``).

    ``reconstruct`` first updates each consumer of removed units from the book's calibration
    statistics (:mod:`fair_pruner.llm.reconstruct`): ``"affine"`` (least squares with a bias;
    needs a book scored with ``reconstruction=True``), ``"lstsq"``, ``"bias"`` (FLAP's mean
    compensation) or None. ``"auto"`` (default) is ``"affine"`` when ``book`` has the Gram
    matrices, ``"bias"`` when it has only channel means, and None without a ``book``. The result
    records its per-layer widths (and any bias reconstruction added) in ``config.fair_pruner``
    (what :func:`fair_pruner.save_pretrained` writes) and keeps the plan as ``_fair_pruner_plan``
    (and the method as ``_fair_pruner_reconstruct``). ``plan.params_after`` counts the kept units'
    weights only; the parameters of biases the reconstruction added (one per consumer that had
    none, e.g. 30 x 576 = 17,280 on SmolLM2-135M) are in ``_fair_pruner_added_params``.

    ``expert_merge=True`` (MoE plans, needs ``book``) first merges each removed routed expert
    into the kept expert that takes its tokens over, weighted by routing frequency
    (:func:`fair_pruner.llm.moe.merge_experts`); the targets are kept as
    ``_fair_pruner_expert_merge``.
    """
    fams = resolve_families(model, plan)          # validates everything before any change
    reconstruct = resolve_method(reconstruct, book, plan)
    merging = check_expert_merge(fams, plan, book) if expert_merge else []
    target = model if inplace else copy.deepcopy(model)
    if not inplace:
        fams = resolve_families(target, plan)
    merged = merge_removed_experts(target, fams, merging, plan.removed, book)
    added = apply_removals(target, fams, plan.removed, book, reconstruct, damp)
    cfg = getattr(target, "config", None)
    if cfg is not None:
        setattr(cfg, CONFIG_KEY, config_entry(target, added))
    target._fair_pruner_plan = plan
    target._fair_pruner_reconstruct = reconstruct
    target._fair_pruner_expert_merge = merged
    target._fair_pruner_added_params = sum(target.get_submodule(n).bias.numel() for n in added)
    return target


def mask(model: nn.Module, plan: Plan, *, reconstruct: str = "auto", book=None,
         damp: float = 1e-2, expert_merge: bool = False) -> nn.Module:
    """A copy of ``model`` whose removed units are zeroed at their consumer's input (after the
    same reconstruction and expert merging as :func:`prune`, resolved the same way)."""
    if not isinstance(plan, Plan):
        raise FairPrunerError(f"expected a fair_pruner.Plan, got {type(plan).__name__}")
    reconstruct = resolve_method(reconstruct, book, plan)
    masked = copy.deepcopy(model)
    fams = resolve_families(masked, plan)
    merge_removed_experts(masked, fams, check_expert_merge(fams, plan, book)
                          if expert_merge else [], plan.removed, book)
    apply_reconstruction(masked, fams, plan.removed, book, reconstruct, damp)
    for name, fam in fams.items():
        if plan.removed[name]:
            fam.mask_units(masked, plan.removed[name])
    return masked
