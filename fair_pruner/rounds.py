"""Several score -> prune -> fine-tune rounds for high compression.

One ToD round can take at most about n / (2 - α) units from a group (|A ∩ B| >= 2m - n), so deep
cuts are spread over rounds: round i aims at (1 - target)^(i / rounds) of the original size,
rescoring the pruned model each time.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch.nn as nn

from . import adapters
from .errors import TargetError
from .plan import Plan, allocate


def prune_in_rounds(model: nn.Module, loader, *, params: Optional[float] = None,
                    flops: Optional[float] = None, rounds: int = 2,
                    finetune: Optional[Callable[[nn.Module, int], None]] = None,
                    strategy: str = "tod", round_to: int = 1,
                    **score_kwargs) -> Tuple[nn.Module, List[Plan]]:
    """Prune ``model`` to remove ``params`` (or ``flops``) of the original in ``rounds`` rounds.

    ``finetune(pruned_model, round_index)`` runs after each round but the last one (train it in
    place). Returns the pruned copy and the plan of every round. ``model`` is not changed.
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
        if finetune is not None and i < rounds:
            finetune(current, i)
    return current, plans
