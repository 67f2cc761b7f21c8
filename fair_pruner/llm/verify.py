"""Self-check for model types that are not in the architecture table.

A model type missing from :data:`fair_pruner.llm.arch.ARCHITECTURES` is mapped with the Llama
layout found by structure. Matching names and shapes does not prove the forward computes what
surgery assumes (a norm over all heads, positional terms fixed per head, a config read in the
forward), so before such a model is scored or pruned, :func:`verify_fallback` builds a tiny
random model of the same class from a shrunk copy of its config, removes a few units of every
group, and checks pruned == masked on random tokens. A failure refuses the model with an
:class:`~fair_pruner.UnsupportedModelError` naming it; the verdict is cached per model class.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..distributed import plain_type
from ..errors import UnsupportedModelError
from ..plan import Plan
from . import surgery
from .layout import Layout, find_layout

_VERDICT: Dict[type, Optional[str]] = {}   # model class -> None (exact) or the failure
_SMALL = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 2, "vocab_size": 64,
          "max_position_embeddings": 64}


def checked_layout(model: nn.Module, heads: str = "kv") -> Layout:
    """:func:`find_layout`, plus the self-check for a model type not in the table."""
    layout = find_layout(model, heads=heads)
    if not layout.in_table:
        verify_fallback(model)
    return layout


def _tiny(model: nn.Module) -> nn.Module:
    cfg = copy.deepcopy(model.config)
    for k, v in _SMALL.items():
        if isinstance(getattr(cfg, k, None), int):
            setattr(cfg, k, v)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) >= cfg.vocab_size:
            setattr(cfg, k, 0)
    torch.manual_seed(0)
    tiny = plain_type(model)._from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in tiny.named_parameters():      # make units differ (and norms non-trivial)
            p.add_(torch.randn_like(p) * 0.2)
    return tiny


def prune(model: nn.Module, plan, inplace: bool = False, **options) -> nn.Module:
    """:func:`fair_pruner.llm.surgery.prune` of a model whose layout passed the self-check."""
    checked_layout(model)
    return surgery.prune(model, plan, inplace=inplace, **options)


def mask(model: nn.Module, plan, **options) -> nn.Module:
    """:func:`fair_pruner.llm.surgery.mask` of a model whose layout passed the self-check."""
    checked_layout(model)
    return surgery.mask(model, plan, **options)


def _check(model: nn.Module) -> Optional[str]:

    try:
        tiny = _tiny(model)
    except Exception as exc:   # the config cannot be shrunk: cannot verify, so refuse
        return f"a small model of this class could not be built to check it ({exc})"
    layout = find_layout(tiny)
    removed = {}
    for fam in layout.prunable:
        k = min(fam.size - fam.min_keep(), max(1, fam.size // 3))
        removed[fam.group_name] = list(range(k)) if k > 0 else []
    if not any(removed.values()):
        return "no unit of the small check model could be removed"
    plan = Plan(alpha=None, strategy="check", removed=removed,
                sizes={f.group_name: f.size for f in layout.prunable}, params_before=0,
                params_after=0, flops_before=0, flops_after=0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            want = surgery.mask(tiny, plan)(input_ids=ids, use_cache=False).logits
            got = surgery.prune(tiny, plan)(input_ids=ids, use_cache=False).logits
    except Exception as exc:
        return f"the pruned check model fails to run ({type(exc).__name__}: {exc})"
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
        diff = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
        return f"pruned != masked on the check model (max |diff| {diff:.3g})"
    return None


def verify_fallback(model: nn.Module) -> None:
    """Refuse ``model`` unless its structure-matched layout prunes exactly (see module doc)."""
    cls = plain_type(model)
    if cls not in _VERDICT:
        _VERDICT[cls] = _check(model)
    why = _VERDICT[cls]
    if why is not None:
        mt = getattr(model.config, "model_type", None)
        raise UnsupportedModelError(
            f"{cls.__name__} (model_type {mt!r}) is not in fair_pruner's architecture table and "
            f"its layout, matched by structure, is not pruned exactly: {why}. Add an entry with "
            "fair_pruner.llm.arch.register_architecture (and a test), or report the family")
