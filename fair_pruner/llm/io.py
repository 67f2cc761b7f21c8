"""Saving and reloading pruned causal LMs with per-layer widths.

transformers (5.x) builds every decoder layer from one global config width, so a pruned model
cannot round-trip through its own class's ``save_pretrained``/``from_pretrained``. A directory
written by :func:`save_pretrained` holds:

* ``config.json``: the model's config with model type ``fair_pruned_<type>``, an ``auto_map`` to
  the modeling file below, and a ``"fair_pruner"`` entry (format 3): ``"layers"``, one dict of
  widths per decoder layer (e.g. ``{"attention": {"num_attention_heads": 6,
  "num_key_value_heads": 2, "head_dim": 64}, "ffn": {"intermediate_size": 1200}}``),
  ``"biases"`` (modules weight reconstruction gave a bias), ``"base_architecture"`` /
  ``"base_model_type"``, and the exact difference from the full-width model that rebuilds it
  (``"params"``, ``"modules"``, ``"lists"``: :mod:`fair_pruner.llm.remote_modeling`);
* ``modeling_fair_pruner.py``: that module, so stock transformers loads the directory with
  ``trust_remote_code=True`` where fair_pruner is not installed;
* ``model.safetensors``: the weights (tied weights stored once);
* ``fair_pruner_plan.json``: the plan that produced the model (when known);
* ``generation_config.json`` and the tokenizer files, when present.

Every file is written atomically. :func:`from_pretrained` builds the base transformers class from
the config, applies the same difference (one implementation for both loaders), then loads the
weights - never by unpickling a model. Directories of formats 1 and 2 (widths only) still load,
through the unit families' ``resize`` (:mod:`fair_pruner.llm.layout`).
"""
from __future__ import annotations

import json
import os
import re
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
INDEX = "model.safetensors.index.json"   # weights in several files (prune_checkpoint)
REMOTE_MODULE = "modeling_fair_pruner"      # the modeling file a saved directory carries
REMOTE_CLASS = "FairPrunedForCausalLM"
REMOTE_TYPE_PREFIX = "fair_pruned_"
PLAN = "fair_pruner_plan.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def _write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, w)


def _transformers_ancestor(cls: type, having: str = "__module__") -> Optional[type]:
    """The first class in ``cls``'s MRO defined by transformers itself with attribute
    ``having`` (a reloaded pruned model is an instance of the directory's own subclass)."""
    return next((c for c in cls.__mro__
                 if c.__module__.startswith("transformers.") and hasattr(c, having)), None)


def _base_class(model: nn.Module) -> type:
    """The transformers class a (possibly reloaded) pruned model is an instance of."""
    base = _transformers_ancestor(type(model), "config_class")
    if base is None:
        raise FairPrunerError(f"save_pretrained saves transformers models; "
                              f"{type(model).__name__} does not derive from a transformers "
                              "model class")
    return base


def _base_config(model: nn.Module):
    """(base config as a dict, the transformers model class): ``config.fair_pruner`` dropped,
    the original model type restored for a reloaded pruned model."""
    cfg = model.config.to_dict()
    entry = cfg.pop(CONFIG_KEY, None) or {}
    for k in ("quantization_config", "_name_or_path", "auto_map", "torch_dtype",
              "architectures", "transformers_version"):
        cfg.pop(k, None)           # e.g. GGUF: the weights are dequantized here
    base = _base_class(model)
    cfg["model_type"] = (entry.get("base_model_type") or cfg.get("model_type")
                         or base.config_class.model_type)
    return cfg, base


def _base_config_class(model: nn.Module, base: type) -> str:
    return (_transformers_ancestor(type(model.config)) or base.config_class).__name__


def _simple(v) -> bool:
    return isinstance(v, (bool, int, float)) and not (isinstance(v, float) and v != v)


def _attr_diff(mod: nn.Module, ref: nn.Module, is_shared_config) -> dict:
    out = {}
    for k, v in vars(mod).items():
        if k.startswith("_") or k == "training" or not _simple(v):
            continue
        if not hasattr(ref, k) or getattr(ref, k) != v:
            out[k] = v
    cfg = getattr(mod, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and not is_shared_config(cfg):
        rc = getattr(ref, "config", None)
        own = {k: v for k, v in vars(cfg).items()
               if not k.startswith("_") and _simple(v) and getattr(rc, k, None) != v}
        if own:
            out["config"] = own
    return out


def architecture_delta(model: nn.Module) -> dict:
    """How ``model`` differs from its class built at the config's full widths: tensor shapes,
    module attributes and ModuleList lengths (see :mod:`fair_pruner.llm.remote_modeling`)."""
    tf = transformers_module()
    cfg, base = _base_config(model)
    config = tf.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        ref = base._from_config(config)
    lists = {}
    ref_mods = dict(ref.named_modules())
    for name, m in model.named_modules():
        r = ref_mods.get(name)
        if isinstance(r, nn.ModuleList) and isinstance(m, nn.ModuleList) and len(m) != len(r):
            if len(m) > len(r):
                raise FairPrunerError(f"{name} has more modules ({len(m)}) than the model's "
                                      f"config builds ({len(r)}); cannot save it")
            lists[name] = len(m)
    from .remote_modeling import apply_delta
    apply_delta(ref, {"lists": lists})      # compare against the truncated reference
    ref_mods = dict(ref.named_modules())
    shared = model.config
    modules, params = {}, {}
    for name, m in model.named_modules():
        r = ref_mods.get(name)
        if r is None:
            raise FairPrunerError(f"module {name} ({type(m).__name__}) does not exist in "
                                  f"{base.__name__} built from its config; cannot save it")
        d = _attr_diff(m, r, lambda c: c is shared)
        if d:
            modules[name] = d
        for own, theirs in ((m._parameters, r._parameters), (m._buffers, r._buffers)):
            for leaf, t in own.items():
                if t is None:
                    continue
                full = f"{name}.{leaf}" if name else leaf
                rt = theirs.get(leaf)
                if rt is None or tuple(rt.shape) != tuple(t.shape):
                    params[full] = list(t.shape)
    return {"params": params, "modules": modules, "lists": lists}


def config_dict(model: nn.Module, dtype: torch.dtype) -> Dict[str, Any]:
    cfg, base = _base_config(model)
    entry = dict(config_entry(model))
    entry.update(architecture_delta(model))
    entry.update({"format": FORMAT, "base_model_type": cfg["model_type"],
                  "base_architecture": base.__name__,
                  "base_config": _base_config_class(model, base)})
    cfg["model_type"] = REMOTE_TYPE_PREFIX + cfg["model_type"]
    cfg["architectures"] = [REMOTE_CLASS]
    cfg["auto_map"] = {"AutoConfig": f"{REMOTE_MODULE}.FairPrunedConfig",
                       "AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg[CONFIG_KEY] = entry
    return cfg


def _remote_code(entry: dict) -> str:
    """``remote_modeling.py`` with this model's base classes filled in."""
    src_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_modeling.py")
    with open(src_path) as fh:
        src = fh.read()
    for const, val in (("BASE_ARCHITECTURE", entry["base_architecture"]),
                       ("BASE_CONFIG", entry["base_config"]),
                       ("BASE_MODEL_TYPE", entry["base_model_type"])):
        src, n = re.subn(rf'^{const} = ".*"$', f'{const} = "{val}"', src, count=1, flags=re.M)
        if n != 1:
            raise FairPrunerError(f"remote_modeling.py lost its {const} line")
    return src


def weights_dtype(dtype, model: nn.Module) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return next((p.dtype for p in model.parameters()), torch.float32)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FairPrunerError(f"dtype={dtype!r}: save_pretrained writes float32, float16 or "
                              "bfloat16 weights (or 'auto': the model's own dtype)")
    return dtype


def tensors_for_disk(items, dtype: torch.dtype) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(name -> contiguous CPU copy, floating point in ``dtype``; alias name -> stored name) for
    ``(name, tensor)`` items: tied tensors are stored once, their other names are aliases."""
    tensors: Dict[str, torch.Tensor] = {}
    seen: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in items:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        t = t.detach().to("cpu")
        tensors[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return tensors, aliases


def save_pretrained(model: nn.Module, directory, tokenizer=None, plan=None, dtype=None) -> None:
    """Write ``model`` (pruned or not) to ``directory``.

    The directory loads with :func:`from_pretrained`, and with stock transformers where
    fair_pruner is not installed: ``AutoModelForCausalLM.from_pretrained(directory,
    trust_remote_code=True)`` (it carries ``modeling_fair_pruner.py``, which needs only torch
    and transformers; see :mod:`fair_pruner.llm.remote_modeling`).

    Args:
        model: a transformers causal LM, e.g. from :func:`fair_pruner.prune`.
        directory: created if needed; files are replaced atomically one by one.
        tokenizer: saved along when given; otherwise tokenizer files found in the model's source
            directory (``model.name_or_path``) are copied.
        plan: the plan to store; default: the one :func:`fair_pruner.prune` attached.
        dtype: weights' dtype on disk: ``"float32"``, ``"float16"``, ``"bfloat16"`` (or the
            torch dtype); default ``None`` / ``"auto"``: the model's own. Buffers that are not
            floating point, and the model in memory, are unchanged.
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config"):
        raise FairPrunerError("save_pretrained needs a transformers model (it has no .config)")
    dtype = weights_dtype(dtype, model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = config_dict(model, dtype)
    tensors, aliases = tensors_for_disk(model.state_dict(keep_vars=False).items(), dtype)
    header = {"format": "pt", "fair_pruner_aliases": json.dumps(aliases)}
    atomic_write(os.path.join(directory, WEIGHTS),
            lambda tmp: save_file(tensors, tmp, metadata=header))
    write_metadata(model, directory, cfg, plan=plan, tokenizer=tokenizer)


def write_metadata(model: nn.Module, directory: str, cfg: Dict[str, Any], *, plan=None,
                   tokenizer=None) -> None:
    """Everything of a saved directory but the weights: ``config.json`` (``cfg``, from
    :func:`config_dict`), the remote modeling file, the generation config, the plan and the
    tokenizer (given, or copied from ``model.name_or_path``). Shared by :func:`save_pretrained`
    and :func:`fair_pruner.llm.prune_checkpoint`."""
    _write_text(os.path.join(directory, REMOTE_MODULE + ".py"), _remote_code(cfg[CONFIG_KEY]))
    _write_text(os.path.join(directory, "config.json"), json.dumps(cfg, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        _write_text(os.path.join(directory, "generation_config.json"), gen.to_json_string())
    plan = plan if plan is not None else getattr(model, "_fair_pruner_plan", None)
    if plan is not None:
        plan.save(os.path.join(directory, PLAN))
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
                    atomic_write(os.path.join(directory, f),
                                 lambda tmp, p=p: shutil.copyfile(p, tmp))


def from_pretrained(directory, device=None, dtype=None) -> nn.Module:
    """Load a model written by :func:`save_pretrained` into its transformers class (eval mode).

    ``dtype`` (default: the saved one) and ``device`` apply to the loaded model."""
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
    fmt = int(entry.get("format", 0))
    if fmt >= 3:
        cfg["model_type"] = entry["base_model_type"]
        for k in ("auto_map", "architectures"):
            cfg.pop(k, None)
        cfg["architectures"] = [entry["base_architecture"]]
    config = tf.AutoConfig.for_model(**cfg)
    setattr(config, CONFIG_KEY, entry)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    saved_dtype = getattr(torch, str(cfg.get("dtype", "float32")), torch.float32)
    if dtype is not None and dtype != "auto":
        dtype = weights_dtype(dtype, None)
    else:
        dtype = None
    dtype = dtype or (saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32)
    # Built at the config's full widths in ``dtype`` (transformers decides which buffers stay
    # fp32, as its own loader does), then resized below.
    if cls is not None and hasattr(cls, "_from_config"):
        model = cls._from_config(config, dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if fmt >= 3:
        from .remote_modeling import apply_delta
        apply_delta(model, entry)
    else:
        _resize_layers(model, entry, directory)
    _load_weights(model, directory)
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


def _resize_layers(model: nn.Module, entry: dict, directory: str) -> None:
    """Formats 1-2: rebuild each layer at its saved widths through the families' ``resize``."""
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


def _load_weights(model: nn.Module, directory: str) -> None:
    from safetensors import safe_open

    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):           # written layer by layer (fair_pruner.llm.prune_checkpoint)
        with open(index) as fh:
            idx = json.load(fh)
        aliases = dict(idx.get("metadata", {}).get("fair_pruner_aliases", {}))
        state = {}
        for name in sorted(set(idx["weight_map"].values())):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    else:
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


def load_model(path: str, dtype=None) -> Tuple[Any, Optional[Any]]:
    """(model, tokenizer) from a transformers directory, a fair_pruner pruned directory, or a
    ``.gguf`` file (dequantized by transformers; needs ``gguf``). The tokenizer is None when the
    directory has none. A path that is none of these is a :class:`FileNotFoundError` (nothing
    there) or an :class:`~fair_pruner.errors.UnsupportedModelError` naming what is wrong,
    checked before any weights are read."""
    from ..errors import UnsupportedModelError

    tf = transformers_module()
    dtype = dtype or torch.float32
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}: give a transformers model directory or a "
                                ".gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UnsupportedModelError(f"{path} is a file but not a .gguf model; give a "
                                        "transformers model directory or a .gguf file")
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise UnsupportedModelError(f"cannot read {path}: {exc}") from None
        if magic != b"GGUF":
            raise UnsupportedModelError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes; got "
                f"{magic!r}): give a llama.cpp .gguf model or a transformers model directory")
        d, f = os.path.split(os.path.abspath(path))
        try:
            tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=f)
            model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
        except ImportError:
            raise
        except Exception as exc:
            raise UnsupportedModelError(
                f"{path} could not be loaded as a GGUF causal LM ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]}); give a GGUF of an architecture transformers "
                "reads, or its transformers model directory") from exc
        return model.eval(), tok
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        hint = (f"; it holds {ggufs[:3]}: give the .gguf file itself" if ggufs else
                ": give a directory with config.json and weights (model.save_pretrained) or a "
                ".gguf file")
        raise UnsupportedModelError(f"{path} is not a transformers model directory (no "
                                    f"config.json){hint}")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedModelError(f"{cfg_path} is not readable JSON ({exc}); the model "
                                    "directory is damaged") from None
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"{cfg_path} is not a transformers config (a JSON object)")
    tok = None
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
    except Exception:  # a weights-only directory is fine
        tok = None
    try:
        if CONFIG_KEY in cfg:
            return from_pretrained(path), tok
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (FairPrunerError, ImportError):
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"{path} could not be loaded as a causal LM ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); give a transformers causal-LM directory "
            "(config.json and its weights) or a .gguf file") from exc
    return model.eval(), tok
