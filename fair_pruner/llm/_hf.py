"""Importing Hugging Face ``transformers`` safely, and loading models for the CLI/benchmarks.

``transformers`` probes for an optional top-level package named ``kernels`` (Hugging Face's hub
kernels) at import time and *imports* it when no distribution metadata is found. A source checkout
that has a directory called ``kernels/`` on ``sys.path`` (this repository does: the Triton sources,
installed as ``fair_pruner.kernels``; ``python -m pytest`` puts the checkout on ``sys.path``) would
be imported instead and break ``import transformers``. :func:`transformers_module` hides such a
foreign ``kernels`` package while transformers imports and caches its probe, then restores
``sys.modules``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from typing import Any, Optional, Tuple

_TF = None


def _foreign_kernels() -> bool:
    """True when ``import kernels`` would load something that is not HF's ``kernels``."""
    if "kernels" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    try:
        importlib.metadata.version("kernels")
        return False          # the real distribution is installed
    except importlib.metadata.PackageNotFoundError:
        return True


def transformers_module():
    """``import transformers`` (once), immune to a foreign top-level ``kernels`` package."""
    global _TF
    if _TF is not None:
        return _TF
    shield = _foreign_kernels()
    if shield:
        sys.modules["kernels"] = None  # type: ignore[assignment]  # find_spec -> None
    try:
        import transformers
        from transformers.utils import import_utils
        if hasattr(import_utils, "is_kernels_available"):
            import_utils.is_kernels_available()   # lru-cached while the shield is up
        import transformers.activations  # noqa: F401  (imports the hub-kernels integration)
    finally:
        if shield and sys.modules.get("kernels", 0) is None:
            del sys.modules["kernels"]
    _TF = transformers
    return transformers


def is_hf_model(model: Any) -> bool:
    """A transformers ``PreTrainedModel`` (checked by class module, without importing it)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def load_model(path: str, dtype=None) -> Tuple[Any, Optional[Any]]:
    """(model, tokenizer) from a transformers directory, a fair_pruner pruned directory, or a
    ``.gguf`` file (dequantized by transformers; needs ``gguf``). The tokenizer is None when the
    directory has none."""
    import json

    import torch

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
            if "fair_pruner" in json.load(fh):
                from .io import from_pretrained
                return from_pretrained(path), tok
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tok
