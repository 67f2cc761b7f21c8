"""Removal and protection signals: pluggable per-unit scores.

ToD needs one removal signal (low = remove first) and one protection signal (high = keep). The
calibration pass gathers :class:`UnitStats` for every module that produces a group's units; a
:class:`Signal` turns those statistics into one score per unit of that module, and the group's
score combines its producers (``reduce``: max or sum). The score book stores every signal it
computed, so allocation can switch signals without recalibrating.

Built in: ``u`` (class-conditional Wasserstein U-Score), ``r`` (|Taylor| R-Score), ``l1``/``l2``
(weight norm of the unit's filter), ``activation`` (mean |output|), ``random`` (seeded).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor


@dataclass
class UnitStats:
    """What calibration measured for the units of one producer module (all fp64 [units])."""
    module: str
    weight: Tensor                 # [units, fan_in] the unit's filter rows (fp32)
    bias: Optional[Tensor]         # [units] or None
    taylor: Tensor                 # signed sum over samples/positions of z * dL/dz
    act_abs: Tensor                # mean |z| over samples and positions
    act_mean: Tensor               # mean z
    act_sq: Tensor                 # mean z^2
    u: Optional[Tensor] = None     # U-Score (max class-pair W1), if computed
    seed: int = 0


class Signal:
    """A per-unit score. Subclass, or wrap a function with :func:`signal`."""
    name: str = "signal"
    reduce: str = "max"            # how producers of one group combine: "max" or "sum"
    signed_sum_then_abs: bool = False

    def __call__(self, stats: UnitStats) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _FnSignal(Signal):
    def __init__(self, name: str, fn: Callable[[UnitStats], Tensor], reduce: str = "max"):
        self.name, self.fn, self.reduce = name, fn, reduce

    def __call__(self, stats: UnitStats) -> Tensor:
        return self.fn(stats)


def signal(name: str, reduce: str = "max"):
    """Decorator: turn ``fn(stats: UnitStats) -> Tensor[units]`` into a :class:`Signal`."""
    if reduce not in ("max", "sum"):
        raise ValueError("reduce must be 'max' or 'sum'")
    return lambda fn: _FnSignal(name, fn, reduce)


class USignal(Signal):
    """Class-conditional separability: max over class pairs of (sliced) W1 (docs/method.md: U-Score)."""
    name, reduce = "u", "max"

    def __call__(self, stats: UnitStats) -> Tensor:
        if stats.u is None:
            raise RuntimeError("U-Score was not computed for " + stats.module)
        return stats.u


class RSignal(Signal):
    """|first-order Taylor loss change| of removing the unit (docs/method.md: R-Score).

    Producers of one group are removed together, so their signed terms add before the abs.
    """
    name, reduce, signed_sum_then_abs = "r", "sum", True

    def __call__(self, stats: UnitStats) -> Tensor:
        return stats.taylor


class WeightNorm(Signal):
    reduce = "sum"

    def __init__(self, p: int):
        self.p, self.name = p, f"l{p}"

    def __call__(self, stats: UnitStats) -> Tensor:
        """[units] float64: sum over a unit's weights (and bias) of |w|^p, accumulated in
        float64 without a float64 copy of the weights (p = 1, 2: 10x+ faster on big layers)."""
        w, b = stats.weight, stats.bias
        if self.p == 1:
            out = w.abs().sum(dim=1, dtype=torch.float64)
            return out + b.double().abs() if b is not None else out
        if self.p == 2:
            out = torch.linalg.vector_norm(w, 2, dim=1, dtype=torch.float64).square()
            return out + b.double().square() if b is not None else out
        w = w.double()
        if b is not None:
            w = torch.cat([w, b.double()[:, None]], dim=1)
        return w.abs().pow(self.p).sum(dim=1)


class ActivationNorm(Signal):
    name, reduce = "activation", "max"

    def __call__(self, stats: UnitStats) -> Tensor:
        return stats.act_abs


class RandomSignal(Signal):
    name, reduce = "random", "max"

    def __call__(self, stats: UnitStats) -> Tensor:
        g = torch.Generator().manual_seed(stats.seed * 1_000_003 + zlib.crc32(stats.module.encode()))
        return torch.rand(stats.taylor.numel(), generator=g, dtype=torch.float64)


BUILTIN: Dict[str, Signal] = {s.name: s for s in (USignal(), RSignal(), WeightNorm(1), WeightNorm(2),
                                                  ActivationNorm(), RandomSignal())}
