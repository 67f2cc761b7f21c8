"""The architecture table: where each Hugging Face decoder-only family keeps its prunable units.

One :class:`Arch` entry per ``config.model_type`` says, per decoder layer, which child is the
attention block and which the feed-forward block, and how their weights hold the units:

* attention (:class:`AttnSpec`): separate ``q``/``k``/``v`` projections or one fused ``qkv``
  projection (``"concat"``: rows ``[q | k | v]``, Phi-3 / GPT-2; ``"per_head"``: rows
  ``[q_h k_h v_h]`` per head, GPT-NeoX), the output projection ``o``, ``nn.Linear`` or GPT-2's
  transposed ``Conv1D``, per-head norms (``q_norm``/``k_norm`` over ``head_dim``, untouched by
  surgery), per-head parameters sliced with their heads, and the module attributes that must
  follow the new head counts. ``frozen`` keeps every head (and says why): e.g. OLMo2's
  ``q_norm`` normalises over *all* heads, Bloom's ALiBi slopes are fixed per head index.
* feed-forward (:class:`MLPSpec`): the projections whose output rows are the neurons (gated
  ``gate``/``up``, plain ``fc1``, fused ``gate_up`` with ``[gate | up]`` halves), the projection
  that consumes them, and whether the block is the decoder layer itself (OPT). A block with an
  ``experts`` child is a routed-MoE block (:mod:`fair_pruner.llm.moe`) whatever the entry says.

A family whose blocks match an existing shape is one entry here and one test. Model types not in
the table fall back to the Llama layout found by structure, and are accepted only after a
self-check (:func:`fair_pruner.llm.layout.verify_fallback`). Anything that cannot be pruned
exactly is refused before scoring with an :class:`~fair_pruner.UnsupportedModelError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class AttnSpec:
    block: str = "self_attn"                 # child of the decoder layer
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: Optional[str] = None                # fused projection (then q/k/v are unused)
    # "concat" [q | k | v]; "per_head" [q_h k_h v_h] per head (MHA); "grouped" per KV group
    # [q_g1 .. q_grep k_g v_g] (Falcon's new decoder architecture)
    qkv_layout: str = "concat"
    head_norms: Tuple[str, ...] = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
    head_params: Tuple[str, ...] = ()        # direct [n_heads] parameters sliced per query head
    # attribute of the attention module -> quantity ("nq", "nkv", "rep", "nq*hd", "nkv*hd");
    # "config.X" sets X on a per-module copy of the config (for forwards that read the config).
    attrs: Tuple[Tuple[str, str], ...] = (("num_key_value_groups", "rep"), ("num_heads", "nq"),
                                          ("num_attention_heads", "nq"),
                                          ("num_key_value_heads", "nkv"))
    frozen: Optional[str] = None             # reason the heads cannot be pruned exactly


@dataclass(frozen=True)
class MLPSpec:
    block: str = "mlp"                       # child of the decoder layer; "" = the layer itself
    up: Tuple[str, ...] = ("gate_proj", "up_proj")   # output row j (or rows j, I + j) = neuron j
    down: str = "down_proj"                  # input column j = neuron j (the tap)
    halves: int = 1                          # 2: fused gate_up, neuron j = rows j and I + j
    attrs: Tuple[str, ...] = ("intermediate_size",)
    frozen: Optional[str] = None


@dataclass(frozen=True)
class Arch:
    attn: AttnSpec = field(default_factory=AttnSpec)
    mlp: MLPSpec = field(default_factory=MLPSpec)
    refuse: Optional[str] = None             # the whole family cannot be pruned (and why)


LLAMA = Arch()
_FULL_QK_NORM = ("q_norm/k_norm normalise over all heads at once (not per head), so removing a "
                 "head changes every other head's output")
_NOT_GATED = MLPSpec(up=("up_proj",))
_FC = MLPSpec(up=("fc1",), down="fc2")
_ALIBI = "ALiBi slopes are fixed per head index by the model's global head count"
_MLA = ("multi-head latent attention shares one compressed key/value projection across heads "
        "(head pruning of MLA is not implemented)")
_H4H = MLPSpec(up=("dense_h_to_4h",), down="dense_4h_to_h", attrs=())


def _falcon(config) -> Arch:
    """Falcon: fused query_key_value whose layout depends on the config."""
    if getattr(config, "alibi", False):
        return Arch(attn=AttnSpec(block="self_attention", frozen=_ALIBI), mlp=_H4H)
    if getattr(config, "new_decoder_architecture", False):
        layout = "grouped"
    elif getattr(config, "multi_query", True):
        layout = "concat"              # [q heads | one k | one v]
    else:
        layout = "per_head"
    return Arch(attn=AttnSpec(block="self_attention", qkv="query_key_value", qkv_layout=layout,
                              o="dense", attrs=(("num_heads", "nq"), ("num_kv_heads", "nkv"))),
                mlp=_H4H)
_GATE_UP = MLPSpec(up=("gate_up_proj",), halves=2)

# model_type -> Arch. Every entry is exercised by tests/test_arch.py (score -> allocate -> prune
# -> pruned == masked -> save -> reload -> logits equal -> generate).
ARCHITECTURES: Dict[str, Arch] = {
    # Llama layout: q/k/v/o + gate/up/down (biases and per-head q/k norms allowed)
    **{t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                          "qwen3_moe", "gemma", "gemma2", "granite", "stablelm", "cohere",
                          "ernie4_5", "olmo", "helium", "smollm3")},
    "starcoder2": Arch(mlp=MLPSpec(up=("c_fc",), down="c_proj")),
    "nemotron": Arch(mlp=_NOT_GATED),
    "arcee": Arch(mlp=_NOT_GATED),
    "dbrx": Arch(attn=AttnSpec(block="norm_attn_norm.attn", qkv="Wqkv", o="out_proj",
                               attrs=(("num_heads", "nq"), ("num_key_value_heads", "nkv"),
                                      ("num_key_value_groups", "rep"), ("hidden_size", "nq*hd"))),
                 mlp=MLPSpec(block="ffn")),
    "granitemoe": Arch(mlp=MLPSpec(block="block_sparse_moe")),
    "gpt_neo": Arch(attn=AttnSpec(block="attn.attention", o="out_proj",
                                  attrs=(("num_heads", "nq"), ("embed_dim", "nq*hd"))),
                    mlp=MLPSpec(up=("c_fc",), down="c_proj", attrs=())),
    "jetmoe": Arch(attn=AttnSpec(block="self_attention", frozen=(
                       "JetMoE's attention is itself a mixture of attention-head experts "
                       "(head pruning of MoA is not implemented)"))),
    "glm": Arch(mlp=_GATE_UP),
    "glm4": Arch(mlp=_GATE_UP),
    "phi": Arch(attn=AttnSpec(o="dense"), mlp=_FC),
    "phi3": Arch(attn=AttnSpec(qkv="qkv_proj",
                               attrs=(("num_key_value_groups", "rep"),
                                      ("num_key_value_heads", "nkv"),
                                      ("config.num_attention_heads", "nq"),
                                      ("config.num_key_value_heads", "nkv"))),
                 mlp=_GATE_UP),
    "gpt2": Arch(attn=AttnSpec(block="attn", qkv="c_attn", o="c_proj",
                               attrs=(("num_heads", "nq"), ("split_size", "nq*hd"),
                                      ("embed_dim", "nq*hd"))),
                 mlp=MLPSpec(up=("c_fc",), down="c_proj", attrs=())),
    "gpt_neox": Arch(attn=AttnSpec(block="attention", qkv="query_key_value",
                                   qkv_layout="per_head", o="dense"),
                     mlp=MLPSpec(up=("dense_h_to_4h",), down="dense_4h_to_h", attrs=())),
    "gptj": Arch(attn=AttnSpec(block="attn", o="out_proj",
                               attrs=(("num_attention_heads", "nq"), ("embed_dim", "nq*hd"))),
                 mlp=MLPSpec(up=("fc_in",), down="fc_out", attrs=())),
    "opt": Arch(attn=AttnSpec(o="out_proj", attrs=(("num_heads", "nq"), ("embed_dim", "nq*hd"))),
                mlp=MLPSpec(block="", up=("fc1",), down="fc2", attrs=())),
    "bloom": Arch(attn=AttnSpec(block="self_attention", frozen=_ALIBI), mlp=_H4H),
    "falcon": _falcon,
    "mpt": Arch(attn=AttnSpec(block="attn", frozen=_ALIBI),
                mlp=MLPSpec(block="ffn", up=("up_proj",), attrs=())),
    "codegen": Arch(attn=AttnSpec(block="attn", frozen=(
                        "qkv_proj interleaves heads over model-parallel shards")),
                    mlp=MLPSpec(up=("fc_in",), down="fc_out", attrs=())),
    "deepseek_v2": Arch(attn=AttnSpec(frozen=_MLA)),
    "deepseek_v3": Arch(attn=AttnSpec(frozen=_MLA)),
    "glm4_moe_lite": Arch(attn=AttnSpec(frozen=_MLA)),
    "llama4_text": Arch(mlp=MLPSpec(block="feed_forward")),
    "olmo2": Arch(attn=AttnSpec(frozen=_FULL_QK_NORM)),
    "olmo3": Arch(attn=AttnSpec(frozen=_FULL_QK_NORM)),
    "olmoe": Arch(attn=AttnSpec(frozen=_FULL_QK_NORM)),
    "gpt_oss": Arch(attn=AttnSpec(head_params=("sinks",))),
    # Refused up front: the structure looks prunable but the computation is not per unit.
    "bitnet": Arch(refuse="BitNet's attn_sub_norm / ffn_sub_norm normalise over all heads and "
                          "all MLP neurons, so no unit can be removed exactly"),
    "diffllama": Arch(refuse="DiffLlama's differential attention pairs heads and normalises "
                             "them with a group norm over all heads"),
}


def arch_for(config) -> Optional[Arch]:
    """The table entry of ``config.model_type`` (None when it is not in the table). An entry may
    be a function of the config, for families whose layout depends on it (Falcon)."""
    entry = ARCHITECTURES.get(getattr(config, "model_type", None))
    return entry(config) if callable(entry) else entry


def register_architecture(model_type: str, arch: Arch, *, replace_existing: bool = False) -> None:
    """Add a family to the table (e.g. a remote-code model with a known block shape)."""
    if model_type in ARCHITECTURES and not replace_existing:
        raise ValueError(f"model_type {model_type!r} is already in the architecture table")
    ARCHITECTURES[model_type] = arch


__all__ = ["Arch", "AttnSpec", "MLPSpec", "ARCHITECTURES", "LLAMA", "arch_for",
           "register_architecture", "replace"]
