"""Model adapters: how one kind of model is scored, pruned, masked and saved.

Every model reaches the same public calls (:func:`fair_pruner.score`, :func:`~fair_pruner.prune`,
:func:`~fair_pruner.mask`) through one :class:`Adapter`:

* ``"cnn"`` (:mod:`fair_pruner.calibrate`, :mod:`fair_pruner.surgery`): any ``nn.Module`` of
  Conv/Linear layers; unit groups from Torch-Pruning's dependency graph. The fallback.
* ``"llm"`` (:mod:`fair_pruner.llm`): Hugging Face decoder-only causal LMs; unit groups from the
  architecture table (:mod:`fair_pruner.llm.arch`).

An adapter turns its model into :class:`~fair_pruner.scorebook.Group` objects with their own
constraints and an exact cost model; allocation (:mod:`fair_pruner.plan`) reads only those, so
it knows nothing about adapters. The score book records the adapter's name
(``book.meta["kind"]``) and every plan carries it back to the adapter's surgery.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .errors import FairPrunerError, UnsupportedModelError


@dataclass(frozen=True)
class Adapter:
    name: str
    detect: Callable        # detect(model) -> bool
    score: Callable         # score(model, loader, **options) -> ScoreBook
    prune: Callable         # prune(model, plan, inplace=False) -> model
    mask: Callable          # mask(model, plan, book) -> masked reference model
    save: Optional[Callable] = None   # save(model, directory, **options): a loadable artifact
    load: Optional[Callable] = None   # load(directory, **options) -> model
    # score() combines the ranks of an initialised torch.distributed group (fair_pruner.distributed)
    data_parallel: bool = False


_ADAPTERS: Dict[str, Adapter] = {}
_ORDER: List[str] = []
# Optional adapters: imported on first use; a missing dependency (transformers) is fine.
_OPTIONAL = ("fair_pruner.llm",)
_loaded = False


def register(adapter: Adapter, fallback: bool = False) -> None:
    """Register an adapter; detection tries adapters in order, the fallback last."""
    _ADAPTERS[adapter.name] = adapter
    if adapter.name in _ORDER:
        _ORDER.remove(adapter.name)
    if fallback:
        _ORDER.append(adapter.name)
    else:
        _ORDER.insert(0, adapter.name)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("fair_pruner.surgery")    # registers the CNN adapter
    for mod in _OPTIONAL:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def for_model(model) -> Adapter:
    _load()
    for name in _ORDER:
        if _ADAPTERS[name].detect(model):
            return _ADAPTERS[name]
    raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def named(name: Optional[str]) -> Adapter:
    _load()
    name = name or "cnn"
    if name not in _ADAPTERS:
        raise FairPrunerError(f"no adapter named {name!r} (this plan or book was made by a "
                              f"model kind this install does not support; have {sorted(_ADAPTERS)})")
    return _ADAPTERS[name]
