"""FAIR-Pruner for Hugging Face causal LMs: MLP neurons and GQA-aware attention heads.

    import fair_pruner as fp
    book = fp.score(model, token_batches)        # routed here for transformers models
    plan = fp.allocate(book, params=0.2)         # 20% of the attention+MLP parameters
    small = fp.prune(model, plan)                # per-layer widths, same transformers class
    fp.save_pretrained(small, "out/", tokenizer=tok); fp.from_pretrained("out/")

Importing this package does not import transformers (that happens on first use, see
:mod:`fair_pruner.llm._hf`). Modules: :mod:`.layout` (structure detection and unit families, the
extension point for new unit kinds such as MoE experts), :mod:`.calibrate` (token-level scorer),
:mod:`.surgery` (prune / mask), :mod:`.io` (save / reload), :mod:`.cli` (``prune-lm``).
"""
from __future__ import annotations

from .. import _registry
from ._hf import is_hf_model, load_model, transformers_module
from .calibrate import KIND, restrict, score
from .cli import cli_prune_lm, perplexity, text_batches
from .layout import (AttentionHeads, CostTerm, Layout, MLPNeurons, UnitFamily, find_layout,
                     register_family)
from .surgery import layer_widths, mask, prune
from . import moe  # noqa: E402,F401  (registers the routed-expert unit family)


def _detect(model) -> bool:
    return is_hf_model(model)


_registry.register(KIND, _detect, score, prune, mask)

__all__ = ["score", "restrict", "prune", "mask", "find_layout", "register_family", "UnitFamily",
           "MLPNeurons", "AttentionHeads", "CostTerm", "Layout", "layer_widths", "load_model",
           "cli_prune_lm", "text_batches", "perplexity", "transformers_module", "KIND"]
