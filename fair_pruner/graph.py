"""Coupled-unit groups of a CNN, found with Torch-Pruning's DependencyGraph.

A :class:`GroupSpec` is the structural part of a group: which modules produce its units (their
outputs are tapped for U and R), which consume them (their inputs are masked in the exactness
reference), and how many parameters / MACs each removed unit takes along. The cost model is exact
and bilinear: a Conv whose input channels belong to group A and output channels to group B keeps
(n_A - m_A) * (n_B - m_B) * k * k weights.
"""
from __future__ import annotations

import hashlib
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

    Each term is one parameter tensor: const * prod_d (size_d - m[g_d] * w_d) over at most two
    group-controlled dims (g_d = -1: not controlled). MAC terms carry the output positions of
    their Conv/Linear in ``const``.
    """
    const: torch.Tensor   # float64 [T]
    size: torch.Tensor    # float64 [T, 2]
    group: torch.Tensor   # int64 [T, 2]
    width: torch.Tensor   # float64 [T, 2]
    is_mac: torch.Tensor  # bool [T]

    def evaluate(self, removed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """removed: [G] or [A, G] units removed per group -> (params, macs), each [] or [A]."""
        r = removed.to(torch.float64)
        squeeze = r.dim() == 1
        if squeeze:
            r = r[None]
        padded = torch.cat([r, torch.zeros(r.shape[0], 1, dtype=r.dtype)], dim=1)  # -1 -> zero
        m = padded[:, self.group]  # [A, T, 2]
        left = (self.size[None] - m * self.width[None]).prod(dim=2) * self.const[None]  # [A, T]
        params = left[:, ~self.is_mac].sum(dim=1)
        macs = left[:, self.is_mac].sum(dim=1)
        return (params[0], macs[0]) if squeeze else (params, macs)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {"cost.const": self.const, "cost.size": self.size, "cost.group": self.group,
                "cost.width": self.width, "cost.is_mac": self.is_mac.to(torch.uint8)}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "CostModel":
        return cls(t["cost.const"], t["cost.size"], t["cost.group"], t["cost.width"],
                   t["cost.is_mac"].bool())


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer name with its shape, and every module's type."""
    h = hashlib.sha256()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__name__};".encode())
    return h.hexdigest()[:16]


def build_dependency_graph(model: nn.Module, example_inputs: Any):
    """Torch-Pruning DependencyGraph of ``model`` traced on ``example_inputs`` (no side effects)."""
    import torch_pruning as tp

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                         verbose=False)
        except Exception as exc:
            raise UnsupportedModelError(
                f"Torch-Pruning could not trace this model ({type(exc).__name__}: {exc}). "
                "Make sure the model runs on the calibration inputs, or pass the offending "
                "modules in `ignore=`.") from exc


def _role(DG, module, handler) -> Optional[str]:
    out = DG.is_out_channel_pruning_fn(handler)
    if isinstance(module, PRODUCER_TYPES):
        return "producer" if out else "consumer"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and out:
        return "norm"
    return None


def find_groups(model: nn.Module, DG, ignored: Sequence[nn.Module]) -> List[GroupSpec]:
    """All prunable coupled groups, in module order, excluding groups touching ``ignored``."""
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    specs = []
    for g in DG.get_all_groups(ignored_layers=list(ignored),
                               root_module_types=PRODUCER_TYPES):
        root = g[0].dep.target.module
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
    import torch_pruning as tp  # noqa: F401  (DG items refer to its handlers)

    name_of = {m: n for n, m in model.named_modules()}
    pname_of = {p: n for n, p in model.named_parameters()}
    control: Dict[str, Dict[int, Tuple[int, float]]] = {}
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
                    control.setdefault(pname, {})[dims[""]] = (gi, width)
                continue
            prefix = name_of.get(mod)
            if prefix is None:
                continue
            for attr, d in dims.items():
                p = getattr(mod, attr, None)
                if isinstance(p, torch.Tensor) and p is not None:
                    control.setdefault(f"{prefix}.{attr}" if prefix else attr, {})[d] = (gi, width)

    const, size, group, width, is_mac = [], [], [], [], []

    def add(shape, ctrl, positions, mac):
        c, s, g, w = 1.0, [1.0, 1.0], [-1, -1], [0.0, 0.0]
        slot = 0
        for d, n in enumerate(shape):
            if d in ctrl and slot < 2:
                s[slot], (g[slot], w[slot]) = float(n), ctrl[d]
                slot += 1
            else:
                c *= float(n)
        const.append(c * positions)
        size.append(s), group.append(g), width.append(w), is_mac.append(mac)

    for pname, p in model.named_parameters():
        ctrl = control.get(pname, {})
        add(p.shape, ctrl, 1.0, False)
        mod_name, _, attr = pname.rpartition(".")
        if attr == "weight" and mod_name in out_positions:
            add(p.shape, ctrl, float(out_positions[mod_name]), True)
    return CostModel(torch.tensor(const, dtype=torch.float64),
                     torch.tensor(size, dtype=torch.float64).reshape(-1, 2),
                     torch.tensor(group, dtype=torch.int64).reshape(-1, 2),
                     torch.tensor(width, dtype=torch.float64).reshape(-1, 2),
                     torch.tensor(is_mac, dtype=torch.bool))
