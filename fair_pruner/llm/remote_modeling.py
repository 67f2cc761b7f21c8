"""Modeling code for a causal LM pruned by fair_pruner, for stock transformers.

fair_pruner copies this file into every pruned model directory as ``modeling_fair_pruner.py``,
so the directory loads where fair_pruner is not installed::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

It imports only torch and transformers. A pruned model is its original transformers class
(``BASE_ARCHITECTURE``) with some modules at other widths: each decoder layer may keep its own
number of heads, KV heads and MLP neurons (or experts), and weight reconstruction may have given
``o_proj`` / ``down_proj`` a bias. transformers builds every layer from one global width, so
``config.json`` records the difference from the full-width model (``config.fair_pruner``):

* ``"params"``: ``{parameter or buffer name: shape}`` for every tensor whose shape differs from
  the full-width model's, or that it lacks (an added bias);
* ``"modules"``: ``{module name: {attribute: value}}`` for int/float/bool attributes that differ
  (e.g. ``num_key_value_groups``, ``in_features``); ``{"config": {...}}`` for a module that
  carries its own copy of the config with other head counts;
* ``"lists"``: ``{ModuleList name: length}`` (routed experts removed as whole modules).

The model classes below build the full-width model, then :func:`apply_delta` rebuilds those
tensors empty at their saved shapes (on the device and in the dtype transformers chose), sets the
attributes, and transformers loads the weights as usual. The model type in ``config.json`` is
``fair_pruned_<base type>`` so that loading without ``trust_remote_code=True`` stops with
transformers' request for it instead of a size-mismatch report.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn as nn
import transformers

# Rewritten for each saved directory (fair_pruner.llm.io.save_pretrained).
BASE_ARCHITECTURE = "LlamaForCausalLM"
BASE_CONFIG = "LlamaConfig"
BASE_MODEL_TYPE = "llama"
CONFIG_KEY = "fair_pruner"


def _owner(model: nn.Module, name: str):
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def apply_delta(model: nn.Module, delta: Dict[str, Any]) -> nn.Module:
    """Rebuild ``model`` (built at the config's full widths) at the widths ``delta`` records.

    Tensor contents are left uninitialised (empty): the weights are loaded afterwards.
    """
    for name, n in sorted((delta.get("lists") or {}).items()):
        lst = model.get_submodule(name)
        if not isinstance(lst, nn.ModuleList) or len(lst) < int(n):
            raise ValueError(f"fair_pruner: {name} is not a ModuleList of at least {n} modules")
        owner, leaf = _owner(model, name)
        setattr(owner, leaf, nn.ModuleList(list(lst)[: int(n)]))
    for name, attrs in sorted((delta.get("modules") or {}).items()):
        mod = model.get_submodule(name)
        attrs = dict(attrs)
        own = attrs.pop("config", None)
        if own is not None:
            # The forward of this module reads head counts from its config: give it its own copy.
            mod.config = copy.copy(mod.config)
            for k, v in own.items():
                setattr(mod.config, k, v)
        for k, v in attrs.items():
            setattr(mod, k, v)
    for name, shape in sorted((delta.get("params") or {}).items()):
        owner, leaf = _owner(model, name)
        old = owner._parameters.get(leaf, owner._buffers.get(leaf))
        ref = old if old is not None else next(
            (p for p in owner.parameters(recurse=False) if p is not None), None)
        if ref is None:
            ref = next(model.parameters())
        new = torch.empty(tuple(int(s) for s in shape), dtype=ref.dtype, device=ref.device)
        if leaf in owner._buffers:
            persistent = leaf not in owner._non_persistent_buffers_set
            owner.register_buffer(leaf, new, persistent=persistent)
        else:
            owner._parameters.pop(leaf, None)
            if leaf in owner.__dict__:      # e.g. nn.Linear(bias=False) keeps ``bias = None``
                delattr(owner, leaf)
            owner.register_parameter(leaf, nn.Parameter(
                new, requires_grad=old.requires_grad if old is not None else True))
    return model


class FairPrunedConfig(getattr(transformers, BASE_CONFIG)):
    """The base model's config; ``fair_pruner`` holds the per-module widths."""

    model_type = "fair_pruned_" + BASE_MODEL_TYPE


class FairPrunedForCausalLM(getattr(transformers, BASE_ARCHITECTURE)):
    """``BASE_ARCHITECTURE`` at the per-module widths in ``config.fair_pruner``."""

    config_class = FairPrunedConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_delta(self, getattr(config, CONFIG_KEY, None) or {})
