"""Coupled-unit groups of a CNN, found with Torch-Pruning's DependencyGraph.

:func:`find_groups` turns the graph's pruning groups into :class:`~fair_pruner.scorebook.GroupSpec`
objects (which modules produce a group's units, which consume them, which norms follow them) and
:func:`build_cost_model` states every parameter's size in terms of the units removed per group
(:mod:`fair_pruner.cost`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .cost import CostBuilder, CostModel
from .errors import UnsupportedModelError
from .scorebook import GroupSpec, Member

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRODUCER_TYPES = CONV_TYPES + (nn.Linear,)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


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


def group_name(root: str, producers: Sequence[str]) -> str:
    """The name of a group: its root module's, with ``+N`` appended when N other modules'
    outputs carry the same units (a residual stream: ``layer4.0.downsample.0+2`` is that conv,
    ``layer4.0.conv2`` and ``layer4.1.conv2``; a depthwise conv after its pointwise one), so a
    plan says which rows cover several layers. A group of one producer keeps the module's name.
    ``Group.modules`` / ``GroupSpec.producers`` list the members."""
    others = len({p for p in producers if p != root})
    return f"{root}+{others}" if others else root


def find_groups(model: nn.Module, DG, ignored: Sequence[nn.Module],
                skipped: Optional[List[str]] = None) -> List[GroupSpec]:
    """All prunable coupled groups, in module order (of their roots), excluding groups touching
    ``ignored``. Names: :func:`group_name` (unique: a module is the root of one group at most).

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
        spec = GroupSpec(name=names[root], size=len(g[0].idxs), root=names[root])
        for item in g.items:
            mod = item.dep.target.module
            role = _role(DG, mod, item.dep.handler)
            if role is None or mod not in names:
                continue
            spec.members.append(Member(names[mod], role, [int(i) for i in item.idxs],
                                       [int(i) for i in item.root_idxs]))
        if not spec.producers:
            continue
        spec.name = group_name(spec.root, [m.module for m in spec.producers])
        specs.append(spec)
    specs.sort(key=lambda s: order[s.root])
    if len({s.name for s in specs}) != len(specs):        # a module named like "x+1"
        raise UnsupportedModelError("two pruning groups would share a name: "
                                    f"{sorted(s.name for s in specs)}")
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
        root = model.get_submodule(spec.root_module)
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
