"""Importing Hugging Face ``transformers`` lazily, and recognising its models without importing it."""
from __future__ import annotations

from typing import Any

_TF = None


def transformers_module():
    """``import transformers`` (once; fair_pruner never imports it at package import time)."""
    global _TF
    if _TF is None:
        import transformers
        _TF = transformers
    return _TF


def is_hf_model(model: Any) -> bool:
    """A transformers ``PreTrainedModel`` (checked by class module, without importing it)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)
