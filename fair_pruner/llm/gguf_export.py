"""GGUF export of (pruned) Llama-style causal LMs for llama.cpp.

A pruned model has per-layer widths (each decoder layer its own number of query heads, KV heads
and MLP neurons) and, after weight reconstruction, biases on ``o_proj`` / ``down_proj`` that the
original lacked. llama.cpp's ``llama`` architecture reads one global width of each kind; its
``deci`` architecture (DeciLM / Nemotron-NAS, ``src/models/deci.cpp``) reads them per layer and
takes optional q/k/v/o and MLP biases, so :func:`save_gguf` writes ``deci`` for dense and pruned
models alike. See :func:`save_gguf` for what the file holds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import FairPrunerError

ARCH = "deci"
# config.model_types whose decoder layers map onto deci exactly: RMSNorm, q/k/v/o with optional
# biases (deci's create_tensor_qkv takes optional attn_q/k/v.bias, its attn_output.bias and
# ffn_*.bias are optional too), RoPE over the whole head, SwiGLU MLP.
SUPPORTED = ("llama", "mistral", "qwen2")
DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32

# HF parameter name inside a decoder layer -> GGUF tensor name (without "blk.N.").
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}

# BPE pre-tokenizer detection, as llama.cpp's converter does it: the sha256 of the token ids of
# CHKTXT names the pre-tokenizer llama.cpp must use (``tokenizer.ggml.pre``). Table copied from
# llama.cpp b11434 ``conversion/base.py`` ``get_vocab_base_pre`` (generated there by
# ``convert_hf_to_gguf_update.py``; later entries win, as in the converter's chain of ifs).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
          'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
          'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
          '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you '
          'sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
    "4b05e02dad1c5ae07d266fd3342ddb644c6f6be058d728bc0a33af31a1d6ee66": "mmbert",
}


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is in the llm extras
        raise FairPrunerError("save_gguf needs the gguf package: pip install gguf") from exc
    return gguf


# --------------------------------------------------------------------------------------------
# What is exported
# --------------------------------------------------------------------------------------------

def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise FairPrunerError(f"save_gguf exports Hugging Face causal LMs; a "
                              f"{type(model).__name__} has no .config")
    return str(getattr(cfg, "model_type", None))


def _rope(cfg) -> Tuple[float, Dict[str, Any]]:
    """(rope theta, rope parameters) of a transformers 5 config (``rope_parameters``; older
    configs: ``rope_theta`` + ``rope_scaling``)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                  or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(10000.0 if theta is None else theta), params


def _check_config(model: nn.Module) -> None:
    """Refuse what deci cannot represent exactly (raises before anything is written)."""
    mt = _model_type(model)
    if mt not in SUPPORTED:
        raise FairPrunerError(
            f"save_gguf: model type {mt!r} is not supported: only Llama-style decoder layers "
            f"({', '.join(SUPPORTED)}: RMSNorm, q/k/v/o attention with RoPE, SwiGLU MLP) export "
            "to GGUF (llama.cpp's per-layer-width 'deci' architecture). Save this model with "
            "fp.save_pretrained instead")
    cfg = model.config
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise FairPrunerError(f"save_gguf: hidden_act={act!r}; llama.cpp's deci MLP is SwiGLU "
                              "(silu) only")
    _, rp = _rope(cfg)
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rtype not in ("default", "linear", "llama3", "yarn"):
        raise FairPrunerError(f"save_gguf: RoPE type {rtype!r} has no llama.cpp equivalent "
                              "here (supported: default, linear, llama3, yarn)")
    if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FairPrunerError("save_gguf: partial rotary embeddings are not supported by "
                              "llama.cpp's deci architecture (RoPE must cover the whole head)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None):
            raise FairPrunerError(f"save_gguf: config.{key} has no deci equivalent")
    sw = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    uses_sw = (mt == "mistral" and sw is not None) or "sliding_attention" in types
    if uses_sw and sw is not None and sw < int(getattr(cfg, "max_position_embeddings", 0) or 0):
        warnings.warn(f"save_gguf: the model attends within a sliding window of {sw} tokens; "
                      "llama.cpp's deci attends the whole context (as llama.cpp's own converter "
                      f"does for this family), so outputs agree only up to {sw} tokens")


def _layers(model: nn.Module) -> List[Tuple[int, int, int, int]]:
    """Per decoder layer (query heads, KV heads, head_dim, MLP neurons)."""
    from .surgery import layer_widths

    out = []
    for i, w in enumerate(layer_widths(model)):
        att, ffn = w.get("attention"), w.get("ffn")
        if att is None or ffn is None:
            raise FairPrunerError(f"save_gguf: decoder layer {i} has no prunable attention / "
                                  "MLP block (frozen or missing); not a Llama-style layer")
        nq, nkv, hd = (int(att[k]) for k in ("num_attention_heads", "num_key_value_heads",
                                              "head_dim"))
        nff = int(ffn["intermediate_size"])
        if nq == 0 or nff == 0:
            # deci.cpp treats 0 heads as "no attention" but 0 MLP neurons as "skip the layer"
            # (its output, attention included, is dropped); fair_pruner's surgery always keeps
            # one unit per group, so such a layer can only come from elsewhere.
            raise FairPrunerError(f"save_gguf: decoder layer {i} has {nq} attention heads and "
                                  f"{nff} MLP neurons; layers without attention or MLP are not "
                                  "exported")
        if nq % nkv:
            raise FairPrunerError(f"save_gguf: layer {i}: {nq} query heads do not share "
                                  f"{nkv} KV heads evenly")
        if hd % 2:
            raise FairPrunerError(f"save_gguf: head_dim {hd} is odd; RoPE needs pairs")
        out.append((nq, nkv, hd, nff))
    hds = {h for _, _, h, _ in out}
    if len(hds) != 1:
        raise FairPrunerError(f"save_gguf: head_dim differs between layers ({sorted(hds)}); "
                              "llama.cpp reads one key/value length")
    return out


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved pairs (``LlamaModel.permute`` of the
    converter): per head, rows (i, i + hd/2) become rows (2i, 2i + 1)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(model: nn.Module, layers) -> List[Tuple[str, torch.Tensor, int]]:
    """(GGUF name, tensor, heads) for every parameter, ``heads`` > 0 for Q/K rows to permute
    into llama.cpp's order (done while writing, one tensor at a time); anything not mapped is
    refused (so nothing of the model is silently dropped)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    base = getattr(model, "base_model_prefix", "model") or "model"
    emb = params.get(f"{base}.embed_tokens.weight")
    if emb is None:
        raise FairPrunerError("save_gguf: no model.embed_tokens.weight; not a Llama-style model")
    out: List[Tuple[str, torch.Tensor, int]] = [("token_embd.weight", emb, 0)]
    used = {f"{base}.embed_tokens.weight"}
    for i, (nq, nkv, hd, nff) in enumerate(layers):
        pre = f"{base}.layers.{i}."
        for hf, gg in _LAYER_TENSORS.items():
            t = params.get(pre + hf)
            if t is None:
                continue
            used.add(pre + hf)
            role = gg.split(".")[0]
            rows = {"attn_q": nq * hd, "attn_k": nkv * hd, "attn_v": nkv * hd,
                    "ffn_gate": nff, "ffn_up": nff}.get(role)
            cols = {"attn_output": nq * hd, "ffn_down": nff}.get(role)
            if (rows is not None and t.shape[0] != rows) or \
                    (cols is not None and t.dim() == 2 and t.shape[1] != cols):
                raise FairPrunerError(f"save_gguf: {pre + hf} has shape {tuple(t.shape)}, not "
                                      f"what the layer's widths ({nq} heads, {nkv} KV heads, "
                                      f"{nff} MLP neurons) give")
            heads = nq if role == "attn_q" else nkv if role == "attn_k" else 0
            out.append((f"blk.{i}.{gg}", t, heads))
        for req in ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight",
                    "attn_v.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                    "ffn_down.weight"):
            if not any(n == f"blk.{i}.{req}" for n, *_ in out):
                raise FairPrunerError(f"save_gguf: layer {i} has no {req} counterpart; not a "
                                      "Llama-style decoder layer")
    norm = params.get(f"{base}.norm.weight")
    if norm is None:
        raise FairPrunerError("save_gguf: no final model.norm.weight")
    out.append(("output_norm.weight", norm, 0))
    used.add(f"{base}.norm.weight")
    head = params.get("lm_head.weight")
    if head is not None:
        used.add("lm_head.weight")
        tied = head is emb or (head.data_ptr() == emb.data_ptr() and head.shape == emb.shape)
        if not tied:
            out.append(("output.weight", head, 0))
    extra = [n for n in params if n not in used]
    if extra:
        raise FairPrunerError(f"save_gguf: parameters with no GGUF counterpart: {extra[:5]}; "
                              "only Llama-style decoder layers export to GGUF")
    return out


def _rope_freqs(theta: float, hd: int, rp: Dict[str, Any]) -> torch.Tensor:
    """llama3 RoPE as llama.cpp's ``rope_freqs`` tensor (frequency divisors, as the converter's
    ``generate_extra_tensors`` computes them)."""
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    factor = float(rp.get("factor", 8.0))
    lo, hi = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old = float(rp.get("original_max_position_embeddings", 8192))
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - s) / factor + s))
    return torch.tensor(out, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _copy_tokenizer(gguf, src: str) -> List[Tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` key of ``src`` as (key, value, type, sub_type), strings as raw
    bytes so the copy is byte-exact."""
    if not os.path.isfile(src):
        raise FairPrunerError(f"save_gguf: source_gguf {src} is not a file")
    try:
        reader = gguf.GGUFReader(src)
    except Exception as exc:
        raise FairPrunerError(f"save_gguf: cannot read source_gguf {src}: {exc}") from exc
    VT = gguf.GGUFValueType
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = f.types[0]
        if main == VT.ARRAY:
            sub = f.types[-1]
            if len(f.types) != 2:
                raise FairPrunerError(f"save_gguf: {src}: nested array {key} not supported")
            if sub == VT.STRING:
                val = [bytes(f.parts[i]) for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
            if val:
                out.append((key, val, main, sub))
        elif main == VT.STRING:
            out.append((key, bytes(f.parts[f.data[0]]), main, None))
        else:
            out.append((key, f.parts[f.data[0]].tolist()[0], main, None))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise FairPrunerError(f"save_gguf: source_gguf {src} has no tokenizer.ggml.tokens; "
                              "give the GGUF the model was loaded from, or tokenizer=")
    return out


def _hf_tokenizer(model, tokenizer):
    """The tokenizer object to convert: ``tokenizer``, or one loaded from the model's source
    directory; None when there is neither."""
    if tokenizer is not None:
        return tokenizer
    src = getattr(model, "name_or_path", "") or ""
    if src and os.path.isdir(src) and any(os.path.isfile(os.path.join(src, f)) for f in
                                          ("tokenizer.json", "tokenizer_config.json")):
        from ._hf import transformers_module
        try:
            return transformers_module().AutoTokenizer.from_pretrained(src)
        except Exception:
            return None
    return None


def _source_of(model) -> Optional[str]:
    """The .gguf transformers loaded ``model`` from, when it is still there."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    name = qc.get("gguf_file") if isinstance(qc, dict) else getattr(qc, "gguf_file", None)
    src = getattr(model, "name_or_path", "") or ""
    if name and src:
        p = os.path.join(src, name) if os.path.isdir(src) else None
        if p and os.path.isfile(p):
            return p
    return None


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a BPE tokenizer, found by the converter's hash of
    CHKTXT's token ids; ``"default"`` (with a warning) when the hash is not in the table."""
    ids = tokenizer.encode(CHKTXT)
    h = hashlib.sha256(str(ids).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(h)
    if name is None:
        warnings.warn(f"save_gguf: BPE pre-tokenizer not recognised (chkhsh {h}); writing "
                      "tokenizer.ggml.pre='default', so llama.cpp may split text differently "
                      "from transformers. Pass source_gguf= a GGUF of the original model to copy "
                      "llama.cpp's own tokenizer instead")
        name = "default"
    return name


def _build_tokenizer(gguf, tok, n_vocab: int) -> List[Tuple[str, Any, Any, Any]]:
    """A GPT-2 style (byte-level BPE) tokenizer as convert_hf_to_gguf's ``_set_vocab_gpt2``
    writes it: tokens padded to the embedding rows, token types, pre-tokenizer, merges, special
    token ids, add_bos/eos flags and chat template (the last four via ``gguf.SpecialVocab``)."""
    TT = gguf.TokenType
    backend = getattr(tok, "backend_tokenizer", None)
    kind, byte_level = None, False
    if backend is not None:
        j = json.loads(backend.to_str())
        kind = (j.get("model") or {}).get("type")
        byte_level = '"ByteLevel"' in json.dumps([j.get("pre_tokenizer"), j.get("decoder")])
    if kind != "BPE" or not byte_level:
        raise FairPrunerError(
            f"save_gguf: the tokenizer ({type(tok).__name__}, model {kind}) is not a byte-level "
            "BPE (GPT-2 style) tokenizer, the only kind built here; pass source_gguf= a .gguf of "
            "the original model (e.g. written by llama.cpp's convert_hf_to_gguf.py "
            "--vocab-only) to copy its tokenizer")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise FairPrunerError(f"save_gguf: the tokenizer has token id {max(vocab.values())} but "
                              f"the model embeds only {n_vocab} tokens; wrong tokenizer")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        if t in added:
            at = decoder[i]
            if not at.normalized:     # llama.cpp assumes added tokens are pre-normalized
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            looks = (t.startswith("<|") and t.endswith("|>")) or t in ("<pad>", "<mask>")
            if at.special or looks:
                types.append(int(TT.CONTROL))
            else:
                t = t.replace("\u2581", " ")
                types.append(int(TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(t)
    # A throwaway writer collects the keys (never opened: no file is written).
    w = gguf.GGUFWriter(None, ARCH)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    # Merges, special token ids, add_bos/add_eos and the chat template: gguf.SpecialVocab reads
    # them from the saved tokenizer files, as the converter does from the model directory.
    with tempfile.TemporaryDirectory(prefix="fair_pruner_tok-") as d:
        tok.save_pretrained(d)
        gguf.SpecialVocab(d, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    kv = w.kv_data[0]
    if "tokenizer.ggml.merges" not in kv:
        raise FairPrunerError("save_gguf: the tokenizer has no BPE merges; pass source_gguf=")
    return [(k, v.value, v.type, v.sub_type) for k, v in kv.items()
            if k.startswith("tokenizer.")]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _qtype(gguf, name: str, t: torch.Tensor, dtype: str):
    """The GGML type of one tensor: 1-D tensors, norms and rope_freqs stay F32 (as the
    converter keeps them); Q8_0 needs rows (the last dim) divisible by 32, else F16."""
    Q = gguf.GGMLQuantizationType
    if t.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if dtype == "q8_0":
        return Q.Q8_0 if t.shape[-1] % Q8_BLOCK == 0 else Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]


def _encode(gguf, t: torch.Tensor, heads: int, qtype):
    import numpy as np

    t = t.detach().to(device="cpu", dtype=torch.float32)
    if heads:
        t = _permute(t, heads)
    data = t.contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _info(gguf, shape, qtype):
    """(shape, numpy dtype, bytes) as ``GGUFWriter.add_tensor_info`` takes them: quantized
    types (and BF16) as their byte shape in uint8."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dt = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return tuple(shape), dt, int(np.prod(shape)) * dt.itemsize
    bshape = tuple(gguf.quant_shape_to_byte_shape(tuple(shape), qtype))
    return bshape, np.dtype(np.uint8), int(np.prod(bshape))


def _prepare(gguf, model, tokenizer, dtype, source_gguf):
    """Every check, nothing written: (layers, tensors, tokenizer keys)."""
    if dtype not in DTYPES:
        raise FairPrunerError(f"save_gguf: dtype must be one of {DTYPES}, got {dtype!r}")
    _check_config(model)
    layers = _layers(model)
    tensors = _tensors(model, layers)
    n_vocab = int(tensors[0][1].shape[0])
    theta, rp = _rope(model.config)
    if (rp.get("rope_type", rp.get("type")) or "default") == "llama3":
        tensors.append(("rope_freqs.weight", _rope_freqs(theta, layers[0][2], rp), 0))

    # Tokenizer, resolved before anything is written.
    if source_gguf is not None:
        tok_kv = _copy_tokenizer(gguf, os.fspath(source_gguf))
    else:
        tok = _hf_tokenizer(model, tokenizer)
        auto = _source_of(model) if tok is None else None
        if tok is not None:
            tok_kv = _build_tokenizer(gguf, tok, n_vocab)
        elif auto is not None:
            tok_kv = _copy_tokenizer(gguf, auto)
        else:
            raise FairPrunerError(
                "save_gguf: no tokenizer: pass tokenizer= (a transformers tokenizer) or "
                "source_gguf= (the .gguf the model was loaded from); the model's source "
                f"{getattr(model, 'name_or_path', '') or '(none)'} has no tokenizer files")
    n_tok = next(len(v) for k, v, *_ in tok_kv if k == "tokenizer.ggml.tokens")
    if n_tok != n_vocab:
        raise FairPrunerError(f"save_gguf: the tokenizer lists {n_tok} tokens but the model "
                              f"embeds {n_vocab}; llama.cpp needs them equal (wrong tokenizer)")
    return layers, tensors, tok_kv


def check_gguf(model: nn.Module, *, tokenizer=None, dtype: str = "f16",
               source_gguf: Optional[str] = None) -> None:
    """Raise the :class:`~fair_pruner.FairPrunerError` :func:`save_gguf` would raise for these
    arguments, without writing anything (e.g. on the dense model, before a long calibration:
    pruning keeps the model type, and every layer keeps at least one head and one neuron)."""
    _prepare(_gguf(), model, tokenizer, dtype, source_gguf)


def save_gguf(model: nn.Module, path, *, tokenizer=None, dtype: str = "f16",
              source_gguf: Optional[str] = None, progress: bool = True) -> str:
    """Write ``model`` (pruned or dense) as a llama.cpp GGUF file; returns the path.

    The file uses llama.cpp's ``deci`` architecture, which reads the widths per layer:

    * hyper-parameters: ``deci.block_count``, ``deci.context_length``
      (``max_position_embeddings``), ``deci.embedding_length``, ``deci.vocab_size``, the
      per-layer arrays ``deci.attention.head_count`` / ``deci.attention.head_count_kv`` /
      ``deci.feed_forward_length`` (equal to :func:`fair_pruner.llm.layer_widths`),
      ``deci.attention.key_length`` / ``value_length`` and ``deci.rope.dimension_count``
      (head_dim), ``deci.rope.freq_base``, RoPE scaling (linear, yarn; llama3 as a
      ``rope_freqs`` tensor), ``deci.attention.layer_norm_rms_epsilon``, ``general.file_type``;
    * tensors with llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``blk.N.ffn_down``,
      ``output_norm``, ``output``), Q and K rows permuted from transformers' rotate-half order
      to llama.cpp's interleaved RoPE pairs (weights and biases, per layer with that layer's
      head counts, as ``convert_hf_to_gguf.py`` does), every bias the model has (q/k/v of
      Qwen2, the ``o_proj`` / ``down_proj`` biases weight reconstruction added);
      ``output.weight`` only when the LM head is not tied to the embeddings;
    * the tokenizer (``tokenizer.*`` keys): copied verbatim from ``source_gguf`` (a .gguf the
      model was loaded from: llama.cpp's own tokenizer of it); else built from ``tokenizer``
      (or the tokenizer files in ``model.name_or_path``) for byte-level BPE tokenizers, as
      the converter's ``_set_vocab_gpt2`` does; else copied from the .gguf transformers
      loaded the model from, when its config still names it.

    Args:
        model: a transformers causal LM whose decoder layers are Llama-style (model types
            ``llama``, ``mistral``, ``qwen2``), e.g. from :func:`fair_pruner.prune`.
        path: the .gguf file to write (parent directories are created), replaced atomically
            with the usual file mode.
        tokenizer: a transformers tokenizer (byte-level BPE), used when ``source_gguf`` is None.
        dtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the 2-D weights; 1-D tensors
            and norms stay f32 (as the converter does). ``q8_0`` quantizes rows in blocks of 32:
            a weight whose rows (input features, e.g. a pruned ``down_proj`` with a number of
            neurons not divisible by 32) do not split into blocks is written as f16 instead.
        source_gguf: a .gguf path whose ``tokenizer.*`` keys are copied.
        progress: show a progress bar while writing.

    Raises:
        FairPrunerError: before anything is written, for an unsupported model type or layer
            (gpt2, phi3, MoE, per-head q/k norms, non-SwiGLU MLPs, partial RoPE, unknown
            RoPE scaling, a layer with 0 heads or 0 MLP neurons), an unknown ``dtype``, or no
            usable tokenizer.

    The file loads in llama.cpp (e.g. ``llama-perplexity -m FILE``). A sliding attention window
    (Mistral) is not represented (llama.cpp's own converter drops it too): outputs agree up to
    that many tokens.
    """
    gguf = _gguf()
    layers, tensors, tok_kv = _prepare(gguf, model, tokenizer, dtype, source_gguf)
    cfg = model.config
    hd = layers[0][2]
    n_vocab, n_embd = (int(x) for x in tensors[0][1].shape)
    theta, rp = _rope(cfg)
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"

    plan = []
    for name, t, heads in tensors:
        q = _qtype(gguf, name, t, dtype)
        plan.append((name, t, heads, q) + _info(gguf, tuple(t.shape), q))

    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    os.close(fd)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
        name = getattr(cfg, "_model_name_or_path", None) or os.path.basename(
            str(getattr(model, "name_or_path", "") or "").rstrip("/")) or "model"
        pruned = getattr(cfg, "fair_pruner", None) is not None
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(f"{name} (pruned by fair_pruner)" if pruned else str(name))
        w.add_block_count(len(layers))
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048) or 2048))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length([nff for *_, nff in layers])
        w.add_head_count([nq for nq, *_ in layers])
        w.add_head_count_kv([nkv for _, nkv, *_ in layers])
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(theta)
        if rtype == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rp["factor"]))
        elif rtype == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rp["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings")
                                                or cfg.max_position_embeddings))
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rp.get(key) is not None:
                    add(float(rp[key]))
        w.add_layer_norm_rms_eps(float(getattr(cfg, "rms_norm_eps", 1e-6)))
        w.add_vocab_size(n_vocab)
        w.add_file_type(int(ftype))
        if dtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, val, vt, sub in tok_kv:
            w.add_key_value(key, val, vt, sub)
        for name, _, _, q, shape, npdt, nb in plan:
            w.add_tensor_info(name, shape, npdt, nb, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from tqdm.auto import tqdm
        for name, t, heads, q, _, _, nb in tqdm(plan, desc="gguf", disable=not progress,
                                                leave=False):
            data = _encode(gguf, t, heads, q)
            if data.nbytes != nb:      # the header already promised nb bytes
                raise RuntimeError(f"save_gguf: {name} encodes to {data.nbytes} bytes, "
                                   f"expected {nb}")
            w.write_tensor_data(data)
        w.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if w is not None:
            w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["save_gguf", "check_gguf", "pre_tokenizer", "SUPPORTED", "DTYPES", "ARCH"]
