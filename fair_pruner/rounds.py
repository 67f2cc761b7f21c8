"""Several score -> prune -> fine-tune rounds for high compression.

One ToD round can take at most about n / (2 - α) units from a group (|A ∩ B| >= 2m - n), so deep
cuts are spread over rounds: round i aims at (1 - target)^(i / rounds) of the original size,
rescoring the pruned model each time.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Tuple

import torch.nn as nn

from . import adapters
from .errors import FairPrunerError, TargetError
from .plan import Plan, allocate


def _finetune_caller(fn) -> Optional[Callable[[nn.Module, int], None]]:
    """``fn`` as ``call(model, round_index)``, whether it takes ``(model)`` or
    ``(model, round_index)``; decided from its signature before any work is done."""
    if fn is None:
        return None
    if not callable(fn):
        raise FairPrunerError(f"finetune must be callable, got a {type(fn).__name__}: give "
                              "fn(model) or fn(model, round_index) that trains the pruned model "
                              "in place")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):         # a builtin without a signature: trust two arguments
        return fn
    for args in ((None, 1), (None,)):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return fn if len(args) == 2 else (lambda model, i: fn(model))
    raise FairPrunerError(
        f"finetune{sig} takes neither fn(model) nor fn(model, round_index): give a function "
        "that trains the pruned model in place, e.g. def finetune(model, round_index): ...")


def prune_in_rounds(model: nn.Module, loader, *, params: Optional[float] = None,
                    flops: Optional[float] = None, rounds: int = 2,
                    finetune: Optional[Callable[..., None]] = None,
                    strategy: str = "tod", round_to: int = 1,
                    **score_kwargs) -> Tuple[nn.Module, List[Plan]]:
    """Prune ``model`` to remove ``params`` (or ``flops``) of the original in ``rounds`` rounds.

    Args:
        model: the model to prune; not changed (every round works on a pruned copy).
        loader: calibration data, scored again at the start of every round.
        params / flops: the fraction of the original's parameters (or MACs) to remove in all;
            give exactly one.
        rounds: round ``i`` (1-based) aims at ``(1 - target) ** (i / rounds)`` of the original.
        finetune: called after every round but the last, with the pruned model to train in
            place: either ``finetune(model)`` or ``finetune(model, round_index)``, where
            ``round_index`` is the 1-based number of the round just finished. Which form is
            decided from its signature before the first round; anything else (not callable,
            or a signature that takes neither) is a :class:`~fair_pruner.FairPrunerError`
            before any scoring. Its return value is ignored.
        strategy, round_to: as in :func:`fair_pruner.allocate`.
        **score_kwargs: passed to every round's scoring (e.g. ``samples_per_class``).

    Returns:
        The pruned copy and the plan of every round.
    """

    which = [k for k, v in (("params", params), ("flops", flops)) if v is not None]
    if len(which) != 1:
        raise TargetError("give exactly one of params= or flops=")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise TargetError("rounds must be an int >= 1")
    key = which[0]
    goal = params if key == "params" else flops
    if not 0.0 < goal < 1.0:
        raise TargetError(f"{key}= must lie in (0, 1), got {goal!r}")
    call_finetune = _finetune_caller(finetune)
    current, plans, base = model, [], None
    for i in range(1, rounds + 1):
        book = adapters.for_model(current).score(current, loader, **score_kwargs)
        before = book.totals()[0 if key == "params" else 1]
        base = base if base is not None else before
        want_left = base * (1.0 - goal) ** (i / rounds)
        frac = 1.0 - want_left / before
        if frac <= 0:
            break
        plan = allocate(book, strategy=strategy, round_to=round_to, **{key: min(frac, 0.999)})
        current = adapters.named(plan.meta.get("kind")).prune(current, plan)
        plans.append(plan)
        if call_finetune is not None and i < rounds:
            call_finetune(current, i)
    return current, plans
