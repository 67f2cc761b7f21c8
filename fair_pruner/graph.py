"""Coupled-unit groups of a CNN, found with Torch-Pruning's DependencyGraph.

A :class:`GroupSpec` is the structural part of a group: which modules produce its units (their
outputs are tapped for U and R), which consume them (their inputs are masked in the exactness
reference), and how many parameters / MACs each removed unit takes along. The cost model is exact
and bilinear: a Conv whose input channels belong to group A and output channels to group B keeps
(n_A - m_A) * (n_B - m_B) * k * k weights.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import UnsupportedModelError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRODUCER_TYPES = CONV_TYPES + (nn.Linear,)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class Member:
    """One module touched by a group: ``idxs`` are its channel indices, aligned to ``root_idxs``."""
    module: str
    role: str            # "producer" (its output carries the units), "consumer" (input), "norm"
    idxs: List[int]
    root_idxs: List[int]


@dataclass
class GroupSpec:
    name: str            # the root module's name
    size: int
    members: List[Member] = field(default_factory=list)

    @property
    def producers(self) -> List[Member]:
        return [m for m in self.members if m.role == "producer"]

    @property
    def consumers(self) -> List[Member]:
        return [m for m in self.members if m.role == "consumer"]


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


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer name with its shape, and every module's type."""
    h = hashlib.sha256()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__name__};".encode())
    return h.hexdigest()[:16]


def build_dependency_graph(model: nn.Module, example_inputs: Any):
    """Torch-Pruning DependencyGraph of ``model`` traced on ``example_inputs``.

    Tracing follows autograd, so frozen parameters are made trainable for the trace and their
    flags restored before returning (the model ends exactly as it was).
    """
    import torch_pruning as tp

    frozen = [p for p in model.parameters() if not p.requires_grad]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for p in frozen:
                p.requires_grad_(True)
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                         verbose=False)
        except Exception as exc:
            raise UnsupportedModelError(
                f"Torch-Pruning could not trace this model ({type(exc).__name__}: {exc}). "
                "Make sure the model runs on the calibration inputs, or pass the offending "
                "modules in `ignore=`.") from exc
        finally:
            for p in frozen:
                p.requires_grad_(False)


def _role(DG, module, handler) -> Optional[str]:
    out = DG.is_out_channel_pruning_fn(handler)
    if isinstance(module, PRODUCER_TYPES):
        return "producer" if out else "consumer"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and out:
        return "norm"
    return None


def _grouped_conv(m: nn.Module) -> bool:
    """A grouped, not depthwise, convolution: Torch-Pruning 1.6 cannot remove single channels
    of it (the per-group fan-in would break), so groups touching one are kept whole."""
    return isinstance(m, CONV_TYPES) and 1 < m.groups and not (
        m.groups == m.in_channels == m.out_channels)


def find_groups(model: nn.Module, DG, ignored: Sequence[nn.Module],
                skipped: Optional[List[str]] = None) -> List[GroupSpec]:
    """All prunable coupled groups, in module order, excluding groups touching ``ignored``.

    Groups that touch a grouped (non-depthwise) convolution are left out and their root names
    appended to ``skipped``.
    """
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    specs = []
    for g in DG.get_all_groups(ignored_layers=list(ignored),
                               root_module_types=PRODUCER_TYPES):
        root = g[0].dep.target.module
        if any(_grouped_conv(it.dep.target.module) for it in g.items):
            if skipped is not None:
                skipped.append(names[root])
            continue
        spec = GroupSpec(name=names[root], size=len(g[0].idxs))
        for item in g.items:
            mod = item.dep.target.module
            role = _role(DG, mod, item.dep.handler)
            if role is None or mod not in names:
                continue
            spec.members.append(Member(names[mod], role, [int(i) for i in item.idxs],
                                       [int(i) for i in item.root_idxs]))
        if not spec.producers:
            continue
        specs.append(spec)
    specs.sort(key=lambda s: order[s.name])
    return specs


def _param_dims(DG, module: nn.Module, handler) -> Dict[str, int]:
    """Which dim of each parameter of ``module`` a pruning handler shrinks."""
    out = DG.is_out_channel_pruning_fn(handler)
    if isinstance(module, nn.Parameter):
        for up in DG.unwrapped_parameters:
            if up.parameters is module:
                return {"": up.pruning_dim}
        return {}
    if isinstance(module, CONV_TYPES):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if out:
            return {"weight": 0, "bias": 0}
        return {} if module.groups > 1 and depthwise else {"weight": 1}
    if isinstance(module, nn.Linear):
        return {"weight": 0, "bias": 0} if out else {"weight": 1}
    if isinstance(module, NORM_TYPES + (nn.PReLU,)):
        return {"weight": 0, "bias": 0} if out else {}
    if isinstance(module, nn.Embedding):
        return {"weight": 1} if out else {}
    return {}


def build_cost_model(model: nn.Module, DG, groups: Sequence[GroupSpec],
                     out_positions: Dict[str, int]) -> CostModel:
    """Cost terms for every parameter of ``model`` (and MACs of every Conv/Linear)."""
    name_of = {m: n for n, m in model.named_modules()}
    pname_of = {p: n for n, p in model.named_parameters()}
    b = CostBuilder()
    for gi, spec in enumerate(groups):
        root = model.get_submodule(spec.name)
        pruner = DG.get_pruner_of_module(root)
        g = DG.get_pruning_group(root, pruner.prune_out_channels, list(range(spec.size)))
        for item in g.items:
            mod = item.dep.target.module
            dims = _param_dims(DG, mod, item.dep.handler)
            if not dims:
                continue
            width = len(item.idxs) / spec.size
            if isinstance(mod, nn.Parameter):
                pname = pname_of.get(mod)
                if pname is not None:
                    b.dim((pname, dims[""]), mod.shape[dims[""]], gi, width)
                continue
            prefix = name_of.get(mod)
            if prefix is None:
                continue
            for attr, d in dims.items():
                p = getattr(mod, attr, None)
                if isinstance(p, torch.Tensor):
                    pname = f"{prefix}.{attr}" if prefix else attr
                    b.dim((pname, d), p.shape[d], gi, width)

    for pname, p in model.named_parameters():
        keys = [(pname, d) for d in range(p.dim()) if b.has_dim((pname, d))]
        free = math.prod(n for d, n in enumerate(p.shape) if (pname, d) not in keys)
        b.term(free, keys)
        mod_name, _, attr = pname.rpartition(".")
        if attr == "weight" and mod_name in out_positions:
            b.term(free * out_positions[mod_name], keys, mac=True)
    return b.build()
