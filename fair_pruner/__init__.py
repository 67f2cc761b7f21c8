"""fair_pruner: fast FAIR-Pruner (arXiv 2508.02291) structured pruning with Tolerance of Difference.

    import fair_pruner as fp
    book = fp.score(model, loader)            # one calibration pass -> ScoreBook
    plan = fp.allocate(book, params=0.5)      # ToD allocation -> Plan
    pruned = fp.prune(model, plan)            # physically smaller copy

Data flows one way: calibrate -> score book -> allocate (ToD) -> plan -> surgery.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import errors, ops, signals
from .errors import (BookMismatchError, CalibrationDataError, FairPrunerError, NonFiniteError,
                     TargetError, UnsupportedModelError)
from .plan import Plan, allocate
from .rounds import prune_in_rounds
from .scorebook import Group, ScoreBook
from .signals import Signal, UnitStats, signal
from .surgery import mask, prune


def score(model, loader, **kwargs) -> ScoreBook:
    """Calibrate ``model`` on ``loader`` and return its :class:`ScoreBook`.

    CNNs and MLPs go through :func:`fair_pruner.calibrate.score` (see it for every argument);
    registered model families (e.g. Hugging Face causal LMs) through their own scorer.
    """
    from . import _registry
    from .calibrate import score as cnn_score

    family = _registry.scorer_for(model)
    return (family or cnn_score)(model, loader, **kwargs)


def save_pretrained(model, directory, **kwargs) -> None:
    """Save a pruned Hugging Face model (per-layer widths) so :func:`from_pretrained` reloads it."""
    from .llm.io import save_pretrained as _save
    return _save(model, directory, **kwargs)


def from_pretrained(directory, **kwargs):
    """Load a model written by :func:`save_pretrained` into its transformers class."""
    from .llm.io import from_pretrained as _load
    return _load(directory, **kwargs)


__all__ = ["save_pretrained", "from_pretrained", "prune_in_rounds", "score", "allocate", "prune", "mask", "ScoreBook", "Group", "Plan", "Signal",
           "UnitStats", "signal", "ops", "signals", "errors", "FairPrunerError",
           "CalibrationDataError", "NonFiniteError", "UnsupportedModelError", "TargetError",
           "BookMismatchError", "__version__"]
