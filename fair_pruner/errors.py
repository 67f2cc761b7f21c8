"""Errors raised for bad input: each names the problem and the fix."""


class FairPrunerError(ValueError):
    """Base class of every error fair_pruner raises for bad input."""


class CalibrationDataError(FairPrunerError):
    """The calibration data cannot be used (no labels, too few classes, bad batches)."""


class NonFiniteError(FairPrunerError):
    """NaN or inf appeared in activations, gradients or scores."""


class UnsupportedModelError(FairPrunerError):
    """The model has a layer or layout fair_pruner cannot score or prune."""


class TargetError(FairPrunerError):
    """An allocation target or tolerance that is out of range or cannot be reached."""


class BookMismatchError(FairPrunerError):
    """A score book or plan used with a model it was not made from."""


class InvalidPlanError(FairPrunerError):
    """A plan that breaks its own invariants (unit indices out of range, repeated, or every unit
    of a group) or a plan file that cannot be read."""


class InvalidBookError(FairPrunerError):
    """A score book (or its file) that breaks its own invariants: signal lengths, non-finite
    scores, a degenerate cost model, a renamed key or a broken header."""


class ConfigError(FairPrunerError):
    """An environment variable fair_pruner reads (``FAIR_PRUNER_*``) with a value it cannot use."""


def env_float(name: str, default: float) -> float:
    """``float(os.environ[name])``, or ``default`` when unset or empty; a value that is not a
    finite number raises :class:`ConfigError` naming the variable."""
    import math
    import os
    raw = os.environ.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a number: set it to a number "
                          f"(default {default:g}) or unset it")
    return value
