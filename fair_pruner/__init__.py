"""fair_pruner: fast FAIR-Pruner (arXiv 2508.02291) structured pruning with Tolerance of Difference.

    import fair_pruner as fp
    book = fp.score(model, loader)            # one calibration pass -> ScoreBook
    plan = fp.allocate(book, params=0.5)      # ToD allocation -> Plan
    pruned = fp.prune(model, plan)            # physically smaller copy

Data flows one way: calibrate -> score book -> allocate (ToD) -> plan -> surgery.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import adapters, errors, ops, signals
from .errors import (BookMismatchError, CalibrationDataError, FairPrunerError, NonFiniteError,
                     TargetError, UnsupportedModelError)
from .plan import Plan, allocate
from .rounds import prune_in_rounds
from .scorebook import Group, ScoreBook
from .signals import Signal, UnitStats, signal


def score(model, loader, **kwargs) -> ScoreBook:
    """Calibrate ``model`` on ``loader`` and return its :class:`ScoreBook`.

    The model's adapter (:mod:`fair_pruner.adapters`) does the work: CNNs and MLPs through
    :func:`fair_pruner.calibrate.score`, Hugging Face causal LMs through
    :func:`fair_pruner.llm.score` (see each for its options).
    """
    return adapters.for_model(model).score(model, loader, **kwargs)


def prune(model, plan: Plan, inplace: bool = False, **options):
    """Return ``model`` with the plan's units physically removed (a copy unless ``inplace``).

    With ``book=book`` (the score book the plan came from) each consumer of removed units is
    first updated from the book's calibration statistics: ``reconstruct="auto"`` (default:
    ``"affine"`` least squares when the book has Gram matrices, else ``"bias"`` for LLMs / none
    for CNNs), ``"affine"``, ``"lstsq"``, ``"bias"`` or None (:mod:`fair_pruner.reconstruct`).
    """
    if not isinstance(plan, Plan):
        raise FairPrunerError(f"expected a fair_pruner.Plan, got {type(plan).__name__}; "
                              "make one with fp.allocate(book, ...)")
    return adapters.named(plan.meta.get("kind")).prune(model, plan, inplace=inplace, **options)


def mask(model, plan: Plan, book: ScoreBook = None, **options):
    """The reference a pruned model equals: ``model`` with the removed units zeroed where they
    are consumed (CNN plans need their ``book``; LLM plans carry what they need, and take the
    same ``reconstruct=`` as :func:`prune`)."""
    if not isinstance(plan, Plan):
        raise FairPrunerError(f"expected a fair_pruner.Plan, got {type(plan).__name__}")
    return adapters.named(plan.meta.get("kind")).mask(model, plan, book, **options)


def save_pretrained(model, directory, **kwargs) -> None:
    """Save a pruned Hugging Face model (per-layer widths) so :func:`from_pretrained` reloads it."""
    adapter = adapters.for_model(model)
    if adapter.save is None:
        raise FairPrunerError(f"save_pretrained saves Hugging Face models; a {type(model).__name__} "
                              f"({adapter.name} adapter) is a plain nn.Module: save it with "
                              "torch.save(model, path) (its class must be importable to load)")
    return adapter.save(model, directory, **kwargs)


def from_pretrained(directory, **kwargs):
    """Load a model written by :func:`save_pretrained` into its transformers class."""
    return adapters.named("llm").load(directory, **kwargs)


__all__ = ["save_pretrained", "from_pretrained", "prune_in_rounds", "score", "allocate", "prune", "mask", "ScoreBook", "Group", "Plan", "Signal", "adapters",
           "UnitStats", "signal", "ops", "signals", "errors", "FairPrunerError",
           "CalibrationDataError", "NonFiniteError", "UnsupportedModelError", "TargetError",
           "BookMismatchError", "__version__"]
