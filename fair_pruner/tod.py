"""Tolerance of Difference: exact O(n) overlap curves and the units each group may lose.

For a group of n units ordered by U ascending (removal prefix) and R descending (protected
prefix), ToD(m) = |lowU(m) ∩ highR(m)| / m and m̂(α) = max{m <= floor(cap n) : ToD(m) <= α}
(0 if none). All groups are handled in one ragged call through :mod:`fair_pruner.ops`; the O(n)
overlap curve and the per-round bound are explained in docs/method.md ("Tolerance of
Difference").
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .errors import FairPrunerError


class ToDCurves:
    """Overlap curves of ragged groups; answers m̂ for any tolerances in one call."""

    def __init__(self, u: Sequence[Tensor], r: Sequence[Tensor], cap: float = 0.99):
        cap = ops.check_cap(cap, "ToDCurves: cap")
        u, r = list(u), list(r)
        if len(u) != len(r) or any(int(a.numel()) != int(b.numel()) for a, b in zip(u, r)):
            raise FairPrunerError(
                f"ToDCurves: removal and protection scores must pair up group by group with "
                f"equal lengths, got {[int(t.numel()) for t in u][:8]} and "
                f"{[int(t.numel()) for t in r][:8]}")
        sizes = [int(t.numel()) for t in u]
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        if sizes:
            self.offsets[1:] = self.sizes.cumsum(0)
        self.cap = float(cap)
        uu = torch.cat([t.reshape(-1).double() for t in u]) if sizes else torch.zeros(0)
        rr = torch.cat([t.reshape(-1).double() for t in r]) if sizes else torch.zeros(0)
        self.overlap = ops.tod_overlap(uu, rr, self.offsets)

    def curve(self, g: int) -> Tensor:
        """int64 [n_g + 1]: overlap for m = 0..n_g of group g."""
        s = int(self.offsets[g]) + g
        return self.overlap[s: s + int(self.sizes[g]) + 1]

    def m_hat(self, alphas) -> Tensor:
        """int64 [G] for a scalar alpha, or [A, G] for a sequence of alphas."""
        a = torch.as_tensor(alphas, dtype=torch.float64)
        out = ops.tod_select(self.overlap, self.offsets, a.reshape(-1), self.cap).T  # [A, G]
        return out[0] if a.dim() == 0 else out

    def breakpoints(self, groups: Optional[Tensor] = None) -> Tensor:
        """Sorted distinct tolerances at which some m̂ changes: the ratios overlap(m) / m (of
        the groups where the bool mask ``groups`` is set; default all)."""
        ratios: List[Tensor] = []
        for g in range(len(self.sizes)):
            if groups is not None and not bool(groups[g]):
                continue
            n = int(self.sizes[g])
            mmax = int(self.cap * n)
            if mmax < 1:
                continue
            c = self.curve(g)[1: mmax + 1].double()
            ratios.append(c / torch.arange(1, mmax + 1, dtype=torch.float64))
        if not ratios:
            return torch.zeros(1, dtype=torch.float64)
        return torch.unique(torch.cat(ratios + [torch.zeros(1, dtype=torch.float64)]))


def m_hat_capped(overlap: Tensor, cap_m: int, alpha: float) -> int:
    """max{1 <= m <= cap_m : overlap(m) / m <= alpha} (0 if none) for one group's curve
    (``overlap`` as :meth:`ToDCurves.curve` returns it), with an explicit per-group cap."""
    cap_m = min(int(cap_m), int(overlap.numel()) - 1)     # never past the curve's end
    if cap_m < 1:
        return 0
    m = torch.arange(1, cap_m + 1, dtype=torch.float64)
    ok = (overlap[1: cap_m + 1].double() <= alpha * m + 1e-12).nonzero()
    return int(ok[-1]) + 1 if ok.numel() else 0


def brute_force_m_hat(u: Tensor, r: Tensor, alpha: float, cap: float = 0.99) -> int:
    """The rule as the authors' package computes it (O(n^2)); a test oracle."""
    n = u.numel()
    low_u = torch.argsort(u.double(), stable=True).tolist()
    high_r = torch.argsort(-r.double(), stable=True).tolist()
    for k in range(int(cap * n), 0, -1):
        if len(set(low_u[:k]) & set(high_r[:k])) / k <= alpha:
            return k
    return 0
