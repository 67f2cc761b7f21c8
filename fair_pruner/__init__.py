"""fair_pruner: fast FAIR-Pruner (arXiv 2508.02291) structured pruning with Tolerance of Difference.

    import fair_pruner as fp
    book = fp.score(model, loader)            # one calibration pass -> ScoreBook
    plan = fp.allocate(book, params=0.5)      # ToD allocation -> Plan
    pruned = fp.prune(model, plan)            # physically smaller copy

Data flows one way: calibrate -> score book -> allocate (ToD) -> plan -> surgery.

Importing the package is cheap (it does not import torch): the public names are resolved on
first access (PEP 562), so ``fair-pruner --help`` and ``fair_pruner.__version__`` stay fast.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the submodule defining it, imported on first access (see __getattr__).
_LAZY = {
    "BookMismatchError": "errors", "CalibrationDataError": "errors",
    "FairPrunerError": "errors", "NonFiniteError": "errors", "TargetError": "errors",
    "UnsupportedModelError": "errors", "InvalidPlanError": "errors", "InvalidBookError": "errors",
    "ConfigError": "errors",
    "Plan": "plan", "allocate": "plan",
    "prune_in_rounds": "rounds",
    "Group": "scorebook", "ScoreBook": "scorebook",
    "Signal": "signals", "UnitStats": "signals", "signal": "signals",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these resolve lazily
    from . import adapters, errors, ops, signals
    from .errors import (BookMismatchError, CalibrationDataError, FairPrunerError,
                         NonFiniteError, TargetError, UnsupportedModelError)
    from .plan import Plan, allocate
    from .rounds import prune_in_rounds
    from .scorebook import Group, ScoreBook
    from .signals import Signal, UnitStats, signal


def __getattr__(name: str):
    """PEP 562: import a public name's submodule (or a submodule itself) on first access."""
    mod = _LAZY.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")     # fp.ops, fp.adapters, fp.llm...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def score(model, loader, **kwargs) -> "ScoreBook":
    """Calibrate ``model`` on ``loader`` and return its :class:`ScoreBook`.

    The model's adapter (:mod:`fair_pruner.adapters`) does the work: CNNs and MLPs through
    :func:`fair_pruner.calibrate.score`, Hugging Face causal LMs through
    :func:`fair_pruner.llm.score` (see each for its options).
    """
    from . import adapters, distributed
    adapter = adapters.for_model(model)
    if distributed.is_sharded(model) and adapter.name != "llm":
        from .errors import UnsupportedModelError
        raise UnsupportedModelError(
            f"{distributed.plain_type(model).__name__} is sharded with FSDP2: fp.score scores "
            "FSDP2-sharded Hugging Face causal LMs (fp.llm.shard) only; score this model unsharded")
    if distributed.active() and not adapter.data_parallel:
        from .errors import UnsupportedModelError
        raise UnsupportedModelError(
            f"fp.score runs inside a torch.distributed group of {distributed.world()[1]} ranks, "
            f"but the {adapter.name} adapter scores one process only (each rank would get the "
            "book of its own shard). Score in a single process; data-parallel scoring is "
            "implemented for Hugging Face causal LMs")
    return adapter.score(model, loader, **kwargs)


def prune(model, plan: "Plan", inplace: bool = False, **options):
    """Return ``model`` with the plan's units physically removed (a copy unless ``inplace``).

    With ``book=book`` (the score book the plan came from) each consumer of removed units is
    first updated from the book's calibration statistics: ``reconstruct="auto"`` (default:
    ``"affine"`` least squares when the book has Gram matrices, else ``"bias"`` for LLMs / none
    for CNNs), ``"affine"``, ``"lstsq"``, ``"bias"`` or None (:mod:`fair_pruner.reconstruct`).
    """
    from . import adapters
    from .errors import FairPrunerError
    from .plan import Plan
    if not isinstance(plan, Plan):
        raise FairPrunerError(f"expected a fair_pruner.Plan, got {type(plan).__name__}; "
                              "make one with fp.allocate(book, ...)")
    from .distributed import refuse_sharded
    refuse_sharded(model, "prune")
    return adapters.named(plan.meta.get("kind")).prune(model, plan, inplace=inplace, **options)


def mask(model, plan: "Plan", book: "ScoreBook" = None, **options):
    """The reference a pruned model equals: ``model`` with the removed units zeroed where they
    are consumed (CNN plans need their ``book``; LLM plans carry what they need, and take the
    same ``reconstruct=`` as :func:`prune`)."""
    from . import adapters
    from .errors import FairPrunerError
    from .plan import Plan
    if not isinstance(plan, Plan):
        raise FairPrunerError(f"expected a fair_pruner.Plan, got {type(plan).__name__}")
    from .distributed import refuse_sharded
    refuse_sharded(model, "mask")
    return adapters.named(plan.meta.get("kind")).mask(model, plan, book, **options)


def save_pretrained(model, directory, **kwargs) -> None:
    """Save a pruned Hugging Face model (per-layer widths) so :func:`from_pretrained` reloads it."""
    from . import adapters
    from .errors import FairPrunerError
    from .distributed import refuse_sharded
    refuse_sharded(model, "save_pretrained")
    adapter = adapters.for_model(model)
    if adapter.save is None:
        raise FairPrunerError(f"save_pretrained saves Hugging Face models; a {type(model).__name__} "
                              f"({adapter.name} adapter) is a plain nn.Module: save it with "
                              "torch.save(model, path) (its class must be importable to load)")
    return adapter.save(model, directory, **kwargs)


def from_pretrained(directory, **kwargs):
    """Load a model written by :func:`save_pretrained` into its transformers class."""
    from . import adapters
    return adapters.named("llm").load(directory, **kwargs)


def save_gguf(model, path, **kw):
    """Write a (pruned) Llama-style Hugging Face model as a llama.cpp GGUF file
    (:func:`fair_pruner.llm.gguf_export.save_gguf`: per-layer widths, arch ``deci``)."""
    from .llm.gguf_export import save_gguf as _save_gguf
    return _save_gguf(model, path, **kw)


__all__ = ["save_pretrained", "from_pretrained", "save_gguf", "prune_in_rounds", "score", "allocate", "prune", "mask", "ScoreBook", "Group", "Plan", "Signal", "adapters",
           "UnitStats", "signal", "ops", "signals", "errors", "FairPrunerError",
           "CalibrationDataError", "NonFiniteError", "UnsupportedModelError", "TargetError",
           "BookMismatchError", "InvalidPlanError", "InvalidBookError", "ConfigError", "__version__"]
