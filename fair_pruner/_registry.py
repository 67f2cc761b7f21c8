"""Model families beyond plain CNNs (LLMs, MoE) plug into the same public API here.

A family registers a ``detect(model) -> bool``, a scorer with :func:`fair_pruner.score`'s
signature and a surgery function with :func:`fair_pruner.prune`'s; the score book's
``meta["kind"]`` routes a plan back to the right surgery.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

_FAMILIES: List[Tuple[str, Callable, Callable]] = []   # (kind, detect, score)
_SURGERY: Dict[str, Callable] = {}
_MASK: Dict[str, Callable] = {}


def register(kind: str, detect: Callable, score: Callable, surgery: Callable,
             mask: Optional[Callable] = None) -> None:
    """``mask(model, plan)`` builds the masked reference of a plan (see fair_pruner.mask)."""
    _FAMILIES.append((kind, detect, score))
    _SURGERY[kind] = surgery
    if mask is not None:
        _MASK[kind] = mask


def scorer_for(model) -> Optional[Callable]:
    _load_builtin()
    for _, detect, score in _FAMILIES:
        if detect(model):
            return score
    return None


def surgery(kind: str) -> Callable:
    _load_builtin()
    if kind not in _SURGERY:
        from .errors import FairPrunerError
        raise FairPrunerError(f"no surgery registered for model kind {kind!r}")
    return _SURGERY[kind]


def masker(kind: str) -> Callable:
    _load_builtin()
    if kind not in _MASK:
        from .errors import FairPrunerError
        raise FairPrunerError(f"no masked reference registered for model kind {kind!r}")
    return _MASK[kind]


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Import the optional families (they register themselves); a missing dependency is fine."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import importlib
    for mod in ("fair_pruner.llm",):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
