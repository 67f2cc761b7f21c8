"""Exact parameter / MAC counts of a model as a function of the units removed per group.

Every adapter describes its model's parameters (and the MACs of its projections) as terms of a
:class:`CostModel`, built with :class:`CostBuilder`; allocation evaluates it for any removal
vector without the model. The model is bilinear and exact: a Conv whose input channels belong to
group A and output channels to group B keeps (n_A - m_A) * (n_B - m_B) * k * k weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch


@dataclass
class CostModel:
    """Exact parameter / MAC counts as a function of units removed per group.

    Each term is one parameter tensor (or the MACs of one Conv/Linear):
    ``const * prod over its <= 2 controlled dims of (size_d - sum_g m[g] * width_{g,d})``.
    A dim may be shared by several groups (a concatenation feeding one conv). Build it with
    :class:`CostBuilder`.
    """
    const: torch.Tensor   # float64 [T]
    factor: torch.Tensor  # int64 [T, 2]: controlled-dim ids, -1 = none
    is_mac: torch.Tensor  # bool [T]
    fsize: torch.Tensor   # float64 [F]: full size of each controlled dim
    c_factor: torch.Tensor  # int64 [C]: contribution -> dim id
    c_group: torch.Tensor   # int64 [C]: contribution -> group
    c_width: torch.Tensor   # float64 [C]: elements of that dim per removed unit

    def evaluate(self, removed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """removed: [G] or [A, G] units removed per group -> (params, macs), each [] or [A]."""
        r = removed.to(torch.float64)
        squeeze = r.dim() == 1
        if squeeze:
            r = r[None]
        A = r.shape[0]
        cut = torch.zeros((A, self.fsize.numel()), dtype=torch.float64)
        if self.c_group.numel():
            cut.index_add_(1, self.c_factor, r[:, self.c_group] * self.c_width[None])
        fval = torch.cat([self.fsize[None] - cut, torch.ones((A, 1), dtype=torch.float64)], 1)
        left = fval[:, self.factor].prod(dim=2) * self.const[None]   # -1 picks the ones column
        params = left[:, ~self.is_mac].sum(dim=1)
        macs = left[:, self.is_mac].sum(dim=1)
        return (params[0], macs[0]) if squeeze else (params, macs)

    _FIELDS = ("const", "factor", "is_mac", "fsize", "c_factor", "c_group", "c_width")

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {f"cost.{k}": (getattr(self, k).to(torch.uint8) if k == "is_mac" else getattr(self, k))
                for k in self._FIELDS}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "CostModel":
        vals = {k: t[f"cost.{k}"] for k in cls._FIELDS}
        vals["is_mac"] = vals["is_mac"].bool()
        return cls(**vals)


class CostBuilder:
    """Collects cost terms. A dim is named by a hashable key so several groups can share it.

        b = CostBuilder()
        b.dim("layer3.conv1.weight:1", size=512, group=4, width=1)     # a group controls a dim
        b.term(const=9.0, dims=["layer3.conv1.weight:0", "layer3.conv1.weight:1"])
        cost = b.build()
    """

    def __init__(self):
        self._dims: Dict[Any, int] = {}
        self._fsize: List[float] = []
        self._contrib: List[Tuple[int, int, float]] = []
        self._terms: List[Tuple[float, List[int], bool]] = []

    def dim(self, key: Any, size: int, group: int, width: float) -> None:
        if key not in self._dims:
            self._dims[key] = len(self._fsize)
            self._fsize.append(float(size))
        self._contrib.append((self._dims[key], int(group), float(width)))

    def has_dim(self, key: Any) -> bool:
        return key in self._dims

    def term(self, const: float, dims: Sequence[Any] = (), mac: bool = False) -> None:
        ids = [self._dims[k] for k in dims if k in self._dims]
        if len(ids) > 2:
            raise ValueError("a cost term has at most two group-controlled dims")
        self._terms.append((float(const), ids + [-1] * (2 - len(ids)), bool(mac)))

    def build(self) -> CostModel:
        c = self._contrib
        return CostModel(
            const=torch.tensor([t[0] for t in self._terms], dtype=torch.float64),
            factor=torch.tensor([t[1] for t in self._terms], dtype=torch.int64).reshape(-1, 2),
            is_mac=torch.tensor([t[2] for t in self._terms], dtype=torch.bool),
            fsize=torch.tensor(self._fsize, dtype=torch.float64),
            c_factor=torch.tensor([x[0] for x in c], dtype=torch.int64),
            c_group=torch.tensor([x[1] for x in c], dtype=torch.int64),
            c_width=torch.tensor([x[2] for x in c], dtype=torch.float64))
