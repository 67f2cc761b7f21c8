"""FAIR-Pruner for Hugging Face causal LMs: MLP neurons, GQA-aware attention heads, MoE experts.

    import fair_pruner as fp
    book = fp.score(model, token_batches)        # routed here for transformers models
    plan = fp.allocate(book, params=0.2)         # 20% of the attention+MLP parameters
    small = fp.prune(model, plan)                # per-layer widths, same transformers class
    fp.save_pretrained(small, "out/", tokenizer=tok); fp.from_pretrained("out/")

Importing this package does not import transformers (that happens on first use, see
:mod:`fair_pruner.llm._hf`). Modules, in the order data flows: :mod:`.arch` (the architecture
table, keyed by ``config.model_type``), :mod:`.layout` (the table applied to a model: unit
families per decoder layer), :mod:`.verify` (self-check of model types not in the table),
:mod:`.moe` (routed-expert family), :mod:`.calibrate` (token-level scorer), :mod:`.surgery`
(prune / mask), :mod:`.io` (save / reload), :mod:`.cli` (``prune-lm``).
"""
from __future__ import annotations

from ._hf import is_hf_model, transformers_module
from .arch import ARCHITECTURES, Arch, AttnSpec, MLPSpec, register_architecture
from .calibrate import KIND, restrict, score
from .cli import cli_prune_lm, perplexity, text_batches
from .io import from_pretrained, load_model, save_pretrained
from .gguf_export import save_gguf
from .layout import (AttentionHeads, CostTerm, FrozenBlock, Layout, MLPNeurons, UnitFamily,
                     find_layout, register_family)
from .surgery import layer_widths
from .checkpoint import prune_checkpoint
from .shard import load_sharded, shard
from .verify import checked_layout, mask, prune
from . import moe  # noqa: E402,F401  (registers the routed-expert unit family)
from .. import adapters


def _mask(model, plan, book=None, **options):
    return mask(model, plan, book=book, **options)


adapters.register(adapters.Adapter(KIND, is_hf_model, score, prune, _mask, save_pretrained,
                                   from_pretrained, data_parallel=True))

__all__ = ["score", "restrict", "prune", "mask", "find_layout", "register_family", "UnitFamily",
           "MLPNeurons", "AttentionHeads", "FrozenBlock", "CostTerm", "Layout", "layer_widths",
           "load_model", "cli_prune_lm", "text_batches", "perplexity", "transformers_module",
           "is_hf_model", "KIND", "ARCHITECTURES", "Arch", "AttnSpec", "MLPSpec",
           "register_architecture", "checked_layout", "save_gguf", "shard", "load_sharded",
           "prune_checkpoint"]
