"""Saving and reloading pruned causal LMs with per-layer widths.

transformers (5.x) builds every decoder layer from one global config width, so a pruned model
cannot round-trip through its own ``save_pretrained``/``from_pretrained``. A directory written
by :func:`save_pretrained` holds:

* ``config.json``: the model's config plus a ``"fair_pruner"`` entry
  ``{"format": 1, "layers": [{role: widths, ...}, ...]}`` (format 2 adds ``"biases"``: the
  modules weight reconstruction gave a bias) (e.g. ``{"attention":
  {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64}, "ffn":
  {"intermediate_size": 1200}}``), one dict per decoder layer;
* ``model.safetensors``: the weights (tied weights stored once);
* ``fair_pruner_plan.json``: the plan that produced the model (when known);
* ``generation_config.json`` and the tokenizer files, when present.

Every file is written atomically. :func:`from_pretrained` builds the transformers class from the
config, rebuilds each layer's modules at its saved widths through the unit families' ``resize``
(``fair_pruner.llm.layout``; a new family, e.g. MoE experts, adds its own role key and
``resize``), then loads the weights - never by unpickling a model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import FairPrunerError
from ..scorebook import atomic_write
from ._hf import transformers_module
from .layout import find_layout
from .surgery import CONFIG_KEY, FORMAT, config_entry

WEIGHTS = "model.safetensors"
PLAN = "fair_pruner_plan.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def _chmod(path: str) -> None:
    """The usual file mode (atomic writes go through mkstemp, whose files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _atomic(path: str, write) -> None:
    atomic_write(path, write)
    _chmod(path)


def _write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    _atomic(path, w)


def _config_dict(model: nn.Module) -> Dict[str, Any]:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)        # e.g. GGUF: the weights are dequantized here
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = [type(model).__name__]
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    cfg[CONFIG_KEY] = config_entry(model)
    return cfg


def save_pretrained(model: nn.Module, directory, tokenizer=None, plan=None) -> None:
    """Write ``model`` (pruned or not) to ``directory`` for :func:`from_pretrained`.

    Args:
        model: a Llama-style transformers causal LM, e.g. from :func:`fair_pruner.prune`.
        directory: created if needed; files are replaced atomically one by one.
        tokenizer: saved along when given; otherwise tokenizer files found in the model's source
            directory (``model.name_or_path``) are copied.
        plan: the plan to store; default: the one :func:`fair_pruner.prune` attached.
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config"):
        raise FairPrunerError("save_pretrained needs a transformers model (it has no .config)")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = _config_dict(model)
    # Weights: contiguous CPU copies, tied tensors stored once (aliases recorded in the header).
    tensors: Dict[str, torch.Tensor] = {}
    seen: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    header = {"format": "pt", "fair_pruner_aliases": json.dumps(aliases)}
    _atomic(os.path.join(directory, WEIGHTS),
                 lambda tmp: save_file(tensors, tmp, metadata=header))
    _write_text(os.path.join(directory, "config.json"), json.dumps(cfg, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        _write_text(os.path.join(directory, "generation_config.json"), gen.to_json_string())
    plan = plan if plan is not None else getattr(model, "_fair_pruner_plan", None)
    if plan is not None:
        plan.save(os.path.join(directory, PLAN))
        _chmod(os.path.join(directory, PLAN))
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            for f in os.listdir(tmp):
                if os.path.isfile(os.path.join(tmp, f)):
                    os.replace(os.path.join(tmp, f), os.path.join(directory, f))
    else:
        src = getattr(model, "name_or_path", "") or ""
        if src and os.path.isdir(src) and os.path.abspath(src) != os.path.abspath(directory):
            for f in TOKENIZER_FILES:
                p = os.path.join(src, f)
                if os.path.isfile(p):
                    _atomic(os.path.join(directory, f),
                                 lambda tmp, p=p: shutil.copyfile(p, tmp))


def from_pretrained(directory, device=None, dtype=None) -> nn.Module:
    """Load a model written by :func:`save_pretrained` into its transformers class (eval mode)."""
    from safetensors import safe_open

    tf = transformers_module()
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory} has no config.json; save with "
                                "fair_pruner.save_pretrained(model, directory)")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    entry = cfg.pop(CONFIG_KEY, None)
    if entry is None:   # a plain transformers directory
        model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto")
        return model.to(device).eval() if device is not None else model.eval()
    if int(entry.get("format", 0)) > FORMAT:
        raise FairPrunerError(f"{directory} was saved by a newer fair_pruner (format "
                              f"{entry['format']}); upgrade fair_pruner to load it")
    config = tf.AutoConfig.for_model(**cfg)
    setattr(config, CONFIG_KEY, entry)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    saved_dtype = getattr(torch, str(cfg.get("dtype", "float32")), torch.float32)
    dtype = dtype or (saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32)
    # Built at the config's full widths in ``dtype`` (transformers decides which buffers stay
    # fp32, as its own loader does), then resized below.
    if cls is not None and hasattr(cls, "_from_config"):
        model = cls._from_config(config, dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = find_layout(model)
    if len(entry["layers"]) != len(layout.layers):
        raise FairPrunerError(f"{directory}: config has {len(layout.layers)} decoder layers but "
                              f"the saved widths list {len(entry['layers'])}")
    for layer, widths in zip(layout.layers, entry["layers"]):
        fams = {f.role: f for f in layer.families}
        for role, w in widths.items():
            if role not in fams:
                raise FairPrunerError(f"{directory}: layer {layer.index} has no {role} block to "
                                      "resize")
            fams[role].resize(model, w)
    for name in entry.get("biases", []):      # added by weight reconstruction
        mod = model.get_submodule(name)
        if getattr(mod, "bias", None) is None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    with safe_open(os.path.join(directory, WEIGHTS), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("fair_pruner_aliases", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    for alias, orig in aliases.items():
        state[alias] = state[orig]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise FairPrunerError(f"{directory}: weights do not match the rebuilt model (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        model.generation_config = tf.GenerationConfig.from_pretrained(directory)
    plan_path = os.path.join(directory, PLAN)
    if os.path.isfile(plan_path):
        from ..plan import Plan
        model._fair_pruner_plan = Plan.load(plan_path)
    model.name_or_path = directory
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_model(path: str, dtype=None) -> Tuple[Any, Optional[Any]]:
    """(model, tokenizer) from a transformers directory, a fair_pruner pruned directory, or a
    ``.gguf`` file (dequantized by transformers; needs ``gguf``). The tokenizer is None when the
    directory has none."""
    tf = transformers_module()
    dtype = dtype or torch.float32
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}: give a transformers model directory or a "
                                ".gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise FileNotFoundError(f"{path} is a file but not a .gguf model; give a directory "
                                    "or a .gguf file")
        d, f = os.path.split(os.path.abspath(path))
        tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
        return model.eval(), tok
    cfg_path = os.path.join(path, "config.json")
    tok = None
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
    except Exception:  # a weights-only directory is fine
        tok = None
    if os.path.exists(cfg_path):
        with open(cfg_path) as fh:
            if CONFIG_KEY in json.load(fh):
                return from_pretrained(path), tok
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tok
