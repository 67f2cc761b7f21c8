"""Routed-expert pruning for Mixture-of-Experts causal LMs (Qwen2-MoE, Mixtral, Qwen3-MoE, ...).

Unit = one routed expert of one MoE layer; one group per MoE layer (``kind="expert"``). Shared
experts and the shared-expert gate are never touched. Everything here works by structure, not by
class name; a module that looks like an MoE block but cannot be mapped is a clear error.

Layouts (transformers 5.x and earlier / remote-code models):

* **fused**: ``block.experts`` holds 3-D parameters with the expert in dim 0 (``gate_up_proj``
  ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, optional biases ``[E, ...]``), called as
  ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``; the router
  (``block.gate``) holds ``weight [E, H]`` and returns ``(logits, top_k_weights, top_k_index)``.
* **module list**: ``block.experts`` is an ``nn.ModuleList`` of E identical MLPs and the router is
  an ``nn.Linear(H, E)`` whose logits the block turns into softmax -> top-k (-> renormalise).
* **dense dispatch** (Llama-4): fused 3-D parameters called as ``experts(routed_in [E * N, H])``:
  every expert runs on every token, its input pre-scaled by the router's score (0 when the token
  is not routed to it); the tap is the experts' output itself.

Routing semantics kept by surgery: the router row of a removed expert goes away and the remaining
rows keep their values, so every surviving expert's logit is unchanged; softmax / top-k then run
over the survivors, as the model's own code does. The reference it must equal
(:func:`mask_experts`) is the original model with the removed experts' logits set to ``-inf``,
computed by the model's own routing code.

    import fair_pruner as fp
    book = fp.score(moe_model, token_batches)          # experts, plus heads / dense MLPs
    plan = fp.allocate(book, experts=0.25)             # exactly 25% of the routed experts
    plan = fp.allocate(book, experts=0.25, strategy="uniform")   # same count per layer
    plan = fp.allocate(book, experts=0.25, signal="freq")        # or "reap", "l2", ...
    small = fp.prune(moe_model, plan)                  # per-layer expert counts
    fp.save_pretrained(small, "out/"); fp.from_pretrained("out/")

Limits: group-limited routers (DeepSeek-V3 ``n_group``) and ModuleDict experts are refused;
a pruned model with different counts per layer cannot compute transformers' load-balancing aux
loss (``output_router_logits=True``, training only); save/reload rebuilds the transformers class,
i.e. the fused storage (a ModuleList-layout model prunes and masks, but is not reloaded).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..engine import recomputing
from ..errors import FairPrunerError, TargetError, UnsupportedModelError
from .layout import CostTerm, UnitFamily, register_family

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")
GROUPED_ROUTING_ATTRS = ("n_group", "topk_group")


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

@dataclass
class MoELayer:
    """Where one MoE block's routed experts and router live (module names inside the model)."""
    block: str
    router: str
    experts: str
    storage: str                 # "fused", "dense" (Llama-4) or "modulelist"
    num_experts: int
    top_k: int
    hidden: int
    layer_index: Optional[int] = None
    shared: List[str] = field(default_factory=list)

    @property
    def group_name(self) -> str:
        """Name of this layer's unit group in score books and plans."""
        return self.experts


def _direct_tensors(mod: nn.Module) -> Dict[str, Tensor]:
    out = dict(mod.named_parameters(recurse=False))
    out.update({n: b for n, b in mod.named_buffers(recurse=False) if b is not None})
    return out


def _looks_like_moe(mod: nn.Module) -> bool:
    """A block with an ``experts`` child module (its layout is checked by :func:`_map_block`)."""
    return isinstance(getattr(mod, "experts", None), nn.Module)


def _layer_index(name: str) -> Optional[int]:
    for part in reversed(name.split(".")):
        if part.isdigit():
            return int(part)
    return None


def _top_k(block: nn.Module, router: nn.Module, config) -> Optional[int]:
    for obj in (router, block):
        for attr in ("top_k", "num_experts_per_tok"):
            v = getattr(obj, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    v = getattr(config, "num_experts_per_tok", None)
    return v if isinstance(v, int) and v > 0 else None


def _map_block(config, name: str, block: nn.Module) -> MoELayer:
    where = f"MoE block {name!r} ({type(block).__name__})"
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise UnsupportedModelError(f"{where}: no `experts` module; fair_pruner's MoE support "
                                    "expects `block.experts` (fused 3-D parameters or a ModuleList)")
    prefix = f"{name}." if name else ""
    if isinstance(experts, nn.ModuleList):
        storage = "modulelist"
        E = len(experts)
        kinds = {type(e) for e in experts}
        shapes = {tuple((n, tuple(p.shape)) for n, p in e.named_parameters()) for e in experts}
        if E < 2 or len(kinds) != 1 or len(shapes) != 1:
            raise UnsupportedModelError(f"{where}: `experts` must be a ModuleList of >= 2 "
                                        "identical expert MLPs")
    elif isinstance(experts, nn.ModuleDict):
        raise UnsupportedModelError(f"{where}: experts in a ModuleDict (Switch/NLLB-style) are "
                                    "not supported; supported layouts are fused 3-D expert "
                                    "parameters and a ModuleList of experts")
    elif _flat_expert_count(experts) is not None:
        # DBRX: experts.mlp.{w1, v1, w2} [E * I, H], expert e owning rows e*I .. (e+1)*I
        storage = "flat"
        E = _flat_expert_count(experts)
    else:
        storage = "fused"
        t = _direct_tensors(experts)
        if any(list(c.parameters()) for c in experts.children()):
            raise UnsupportedModelError(f"{where}: `{prefix}experts` has parameterised "
                                        "submodules; expected fused 3-D expert parameters")
        three_d = {n: p for n, p in t.items() if p.dim() == 3}
        if "down_proj" not in three_d or not ({"gate_up_proj", "up_proj"} & set(three_d)):
            raise UnsupportedModelError(
                f"{where}: `{prefix}experts` ({type(experts).__name__}) has no fused "
                "gate_up_proj/up_proj and down_proj [E, ., .] parameters; cannot map its experts")
        import inspect
        try:
            n_args = len(inspect.signature(experts.forward).parameters)
        except (TypeError, ValueError):
            n_args = 0
        if n_args == 1 and isinstance(getattr(block, "router", None), nn.Linear):
            # Llama-4: experts(routed_in [E * N, H]) runs every expert on every token, inputs
            # pre-scaled by the router's (sigmoid) score, 0 where a token is not routed.
            storage = "dense"
        elif n_args < 3:
            raise UnsupportedModelError(
                f"{where}: `{prefix}experts` ({type(experts).__name__}) is not called as "
                "experts(hidden, top_k_index, top_k_weights) nor as Llama-4's dense dispatch "
                "experts(routed_in); this routed-expert layout is not supported")
        E = int(three_d["down_proj"].shape[0])
        bad = [n for n, p in t.items() if p.dim() == 0 or p.shape[0] != E]
        if bad:
            raise UnsupportedModelError(f"{where}: expert parameters {bad} do not have the "
                                        f"expert count {E} in dim 0")
    routers = []
    for cname, child in block.named_children():
        if cname == "experts" or cname in SHARED_NAMES:
            continue
        w = getattr(child, "weight", None)
        if isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] == E:
            routers.append((cname, child))
            continue
        # a router module wrapping its Linear (DBRX's router.layer)
        inner = [(f"{cname}.{n}", m) for n, m in child.named_modules()
                 if n and isinstance(m, nn.Linear) and m.out_features == E]
        if len(inner) == 1 and sum(p.numel() for p in child.parameters()) == sum(
                p.numel() for p in inner[0][1].parameters()):
            routers.append(inner[0])
    if len(routers) != 1:
        found = [c for c, _ in routers]
        raise UnsupportedModelError(
            f"{where}: expected exactly one router (a child with weight [{E}, hidden]) beside "
            f"`experts`, found {found or 'none'}; cannot map this MoE layout")
    rname, router = routers[0]
    for attr in GROUPED_ROUTING_ATTRS:
        v = getattr(router, attr, getattr(block, attr, None))
        if isinstance(v, int) and v > 1:
            raise UnsupportedModelError(f"{where}: group-limited routing ({attr}={v}) is not "
                                        "supported: removing experts would break the expert "
                                        "groups")
    if storage == "modulelist" and not isinstance(router, nn.Linear):
        raise UnsupportedModelError(f"{where}: with a ModuleList of experts the router "
                                    f"`{rname}` must be an nn.Linear, got {type(router).__name__}")
    k = _top_k(block, router, config)
    if k is None:
        raise UnsupportedModelError(f"{where}: cannot find top_k (router.top_k, block.top_k or "
                                    "config.num_experts_per_tok)")
    shared = [f"{prefix}{c}" for c, _ in block.named_children() if c in SHARED_NAMES]
    return MoELayer(block=name, router=f"{prefix}{rname}", experts=f"{prefix}experts",
                    storage=storage, num_experts=E, top_k=k, hidden=int(router.weight.shape[1]),
                    layer_index=_layer_index(name), shared=shared)


def find_moe_layers(model: nn.Module) -> List[MoELayer]:
    """Every MoE block of ``model``, in module order (empty for a dense model).

    A module with an ``experts`` child that cannot be mapped raises
    :class:`~fair_pruner.UnsupportedModelError` naming it.
    """
    layers = []
    for name, mod in model.named_modules():
        if _looks_like_moe(mod):
            layers.append(_map_block(getattr(model, "config", None), name, mod))
    return layers


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------

def _flat_expert_count(experts: nn.Module) -> Optional[int]:
    """E for experts whose parameters all stack the experts' rows in dim 0 ([E * rows, ...],
    every parameter in submodules, called as experts(hidden, top_k_index, top_k_weights));
    None for any other layout."""
    import inspect
    E = getattr(experts, "num_experts", None)
    params = list(experts.named_parameters())
    if not isinstance(E, int) or E < 2 or not params or list(experts.parameters(recurse=False)):
        return None
    try:
        if len(inspect.signature(experts.forward).parameters) < 3:
            return None
    except (TypeError, ValueError):
        return None
    if all(p.dim() == 2 and p.shape[0] % E == 0 and p.shape[0] > E for _, p in params):
        return E
    return None


def _slice_experts(experts: nn.Module, keep: Tensor, E: int) -> None:
    """Keep experts ``keep`` of every parameter (recursively) that stacks E experts in dim 0,
    as [E, ...] or as [E * rows, ...]."""
    for mod in experts.modules():
        for n, p in list(mod.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] % E == 0 and p.shape[0] > E:
                rows = p.shape[0] // E
                data = p.detach().reshape(E, rows, *p.shape[1:])
                data = data.index_select(0, keep.to(p.device)).reshape(-1, *p.shape[1:])
                setattr(mod, n, nn.Parameter(data.clone(), requires_grad=p.requires_grad))
        _slice_dim0(mod, keep, E)


def _slice_dim0(mod: nn.Module, keep: Tensor, E: int) -> None:
    for n, p in list(mod.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == E:
            new = nn.Parameter(p.detach().index_select(0, keep.to(p.device)).clone(),
                               requires_grad=p.requires_grad)
            setattr(mod, n, new)
    for n, b in list(mod.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == E:
            persistent = n not in getattr(mod, "_non_persistent_buffers_set", set())
            mod.register_buffer(n, b.index_select(0, keep.to(b.device)).clone(),
                                persistent=persistent)


def _set_counts(objs: Iterable[Any], old: int, new: int) -> None:
    for obj in objs:
        for attr in EXPERT_COUNT_ATTRS:
            if getattr(obj, attr, None) == old:
                setattr(obj, attr, new)
        if isinstance(obj, nn.Linear) and obj.out_features == old:
            obj.out_features = new


def check_removal(layer: MoELayer, removed: Sequence[int]) -> List[int]:
    """Sorted kept expert indices of ``layer`` after removing ``removed`` (validated)."""
    rem = sorted(set(int(i) for i in removed))
    if rem and (rem[0] < 0 or rem[-1] >= layer.num_experts):
        raise FairPrunerError(f"{layer.group_name}: expert indices {rem} out of range "
                              f"[0, {layer.num_experts})")
    keep = [i for i in range(layer.num_experts) if i not in set(rem)]
    if len(keep) < layer.top_k:
        raise TargetError(
            f"{layer.group_name}: removing {len(rem)} of {layer.num_experts} experts leaves "
            f"{len(keep)}, fewer than top_k={layer.top_k} (every token is routed to top_k "
            "experts). Remove fewer experts from this layer")
    return keep


def prune_experts(model: nn.Module, removed: Dict[str, Sequence[int]], inplace: bool = False,
                  layers: Optional[Sequence[MoELayer]] = None) -> nn.Module:
    """Physically remove routed experts: ``removed`` maps a layer's group name (its experts
    module) to expert indices. Router rows go with them; survivors are re-indexed in order."""
    target = model if inplace else copy.deepcopy(model)
    layers = list(layers) if layers is not None else find_moe_layers(target)
    by_group = {l.group_name: l for l in layers}
    unknown = [g for g in removed if g not in by_group]
    if unknown:
        raise FairPrunerError(f"no MoE layer named {unknown[:3]} in this model (it has "
                              f"{list(by_group)[:3]}...)")
    counts = {}
    for g, idxs in removed.items():
        layer = by_group[g]
        keep = check_removal(layer, idxs)       # validate every layer before changing anything
        counts[g] = keep
    for g, keep in counts.items():
        layer = by_group[g]
        if len(keep) == layer.num_experts:
            continue
        block = target.get_submodule(layer.block)
        router = target.get_submodule(layer.router)
        experts = target.get_submodule(layer.experts)
        kt = torch.tensor(keep, dtype=torch.long)
        _slice_dim0(router, kt, layer.num_experts)
        if layer.storage != "modulelist":
            _slice_experts(experts, kt, layer.num_experts)
        else:
            new = nn.ModuleList([experts[i] for i in keep])
            parent, _, attr = layer.experts.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, attr, new)
            experts = new
        _set_counts((block, router) + tuple(experts.modules()), layer.num_experts, len(keep))
    return target


# --------------------------------------------------------------------------------------------
# Expert merging (reconstruction of the mixture)
# --------------------------------------------------------------------------------------------

def merge_targets(cochoice: Tensor, removed: Sequence[int], E: int) -> Dict[int, int]:
    """Removed expert -> the kept expert that takes most of its tokens over: the one with the
    largest router probability on the tokens routed to it but not to the kept one
    (``cochoice[e, j]``). Experts that served no tokens are not merged."""
    rem = sorted(set(int(i) for i in removed))
    keep = [j for j in range(E) if j not in set(rem)]
    out: Dict[int, int] = {}
    for e in rem:
        row = cochoice[e, keep]
        if keep and float(row.max()) > 0:
            out[e] = keep[int(torch.argmax(row))]          # ties: the lowest index
    return out


def _expert_stacks(experts: nn.Module, layer: MoELayer) -> List[List[Tensor]]:
    """Every expert tensor as a list of E per-expert views (writable)."""
    E = layer.num_experts
    if layer.storage == "modulelist":
        return [list(ps) for ps in zip(*[[p.data for p in ex.parameters()] for ex in experts])]
    stacks = []
    for mod in experts.modules():
        for _, p in mod.named_parameters(recurse=False):
            if p.dim() >= 1 and p.shape[0] % E == 0:
                v = p.data.view(E, p.shape[0] // E, *p.shape[1:])
                stacks.append([v[i] for i in range(E)])
    return stacks


def merge_experts(model: nn.Module, layer: MoELayer, removed: Sequence[int], freq: Tensor,
                  cochoice: Tensor) -> Dict[int, int]:
    """In place, before the removed experts go: each kept expert that takes a removed expert's
    tokens over (:func:`merge_targets`) becomes the routing-frequency-weighted average of itself
    and the experts merged into it (every weight and bias; HC-SMoE's frequency-weighted merge,
    Chen et al. 2024, without neuron alignment). Router rows are unchanged. Returns the targets."""
    E = layer.num_experts
    freq = torch.as_tensor(freq, dtype=torch.float64).reshape(-1)
    cochoice = torch.as_tensor(cochoice, dtype=torch.float64)
    if freq.numel() != E or tuple(cochoice.shape) != (E, E) or \
            not (torch.isfinite(freq).all() and torch.isfinite(cochoice).all()) or \
            bool((freq < 0).any()) or bool((cochoice < 0).any()):
        raise FairPrunerError(f"{layer.group_name}: the book's routing statistics do not fit "
                              f"{E} experts (freq {tuple(freq.shape)}, cochoice "
                              f"{tuple(cochoice.shape)}) or are negative / not finite; wrong book")
    targets = merge_targets(cochoice, removed, E)
    clusters: Dict[int, List[int]] = {}
    for e, j in targets.items():
        clusters.setdefault(j, [j]).append(e)
    stacks = _expert_stacks(model.get_submodule(layer.experts), layer)
    with torch.no_grad():
        for j, members in clusters.items():
            w = freq[members]
            if float(w.sum()) <= 0:
                continue
            w = w / w.sum()
            for per in stacks:
                acc = sum(float(wi) * per[m].double() for wi, m in zip(w, members))
                per[j].copy_(acc.to(per[j].dtype))
    return targets


# --------------------------------------------------------------------------------------------
# The masked reference
# --------------------------------------------------------------------------------------------

class _MaskLogits(torch.overrides.TorchFunctionMode):
    """While active, F.linear(x, router.weight, ...) gets -inf at the removed experts' logits."""

    def __init__(self, weight: Tensor, idx: Tensor):
        super().__init__()
        self.weight, self.idx, self.hits = weight, idx, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        w = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
        if func is F.linear and w is self.weight:
            self.hits += 1
            out = out.index_fill(-1, self.idx.to(out.device), float("-inf"))
        return out


def mask_router(router: nn.Module, removed: Sequence[int], name: str = "router") -> None:
    """Hook ``router`` so the experts ``removed`` get ``-inf`` logits in the model's own routing."""
    idx = torch.tensor(sorted(set(int(i) for i in removed)), dtype=torch.long)
    state: Dict[str, Any] = {}

    def pre(mod, args):
        state["mode"] = _MaskLogits(mod.weight, idx)
        state["mode"].__enter__()

    def post(mod, args, out):
        mode = state.pop("mode")
        mode.__exit__(None, None, None)
        if mode.hits == 0:
            raise UnsupportedModelError(f"router {name!r} does not compute its logits with "
                                        "F.linear(x, weight): cannot mask it")
    router.register_forward_pre_hook(pre)
    router.register_forward_hook(post)


def mask_experts(model: nn.Module, removed: Dict[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose removed experts are never selected: their router logits are
    ``-inf`` inside the model's own routing code. :func:`prune_experts` must equal it."""
    masked = copy.deepcopy(model)
    by_group = {l.group_name: l for l in find_moe_layers(masked)}
    for g, idxs in removed.items():
        if idxs:
            check_removal(by_group[g], idxs)
            mask_router(masked.get_submodule(by_group[g].router), idxs, by_group[g].router)
    return masked


# --------------------------------------------------------------------------------------------
# The unit family: calibration taps, signals, cost, surgery and widths for fair_pruner.llm
# --------------------------------------------------------------------------------------------

class _Calibration:
    """One calibration run's hooks and routing statistics (the family itself is structure)."""

    def __init__(self, E: int):
        self.hs: List[Any] = []
        self.freq = torch.zeros(E, dtype=torch.float64)     # tokens routed to each expert
        self.reap = torch.zeros(E, dtype=torch.float64)     # sum of routed ||y_e||
        # cochoice[e, j]: router probability of j, summed over the tokens routed to e but not
        # to j (who takes e's tokens over when e is gone; expert merging reads it)
        self.cochoice = torch.zeros(E, E, dtype=torch.float64)
        self.has_cochoice = False
        self.tokens = 0
        self.checked = False

    def add_cochoice(self, probs: Tensor, idx: Tensor) -> None:
        """probs [N, E] router probabilities, idx [N, k] the experts each token was routed to."""
        if recomputing():
            return
        with torch.no_grad():
            E = self.cochoice.shape[0]
            routed = torch.zeros(probs.shape[0], E, dtype=torch.float64)
            routed.scatter_(1, idx.detach().reshape(probs.shape[0], -1).cpu(), 1.0)
            p = probs.detach().double().cpu()
            self.cochoice += routed.T @ (p * (1.0 - routed))
            self.has_cochoice = True

    def remove(self):
        for h in self.hs:
            h.remove()

    def reduce(self, sum_) -> None:
        """Sum the routing statistics over data-parallel ranks (``sum_``: in-place all-reduce)."""
        sum_(self.freq)
        sum_(self.reap)
        sum_(self.cochoice)
        self.tokens = int(sum_(torch.tensor([self.tokens], dtype=torch.float64)).item())

    def extra_signals(self) -> Dict[str, Tensor]:
        """Alternative removal signals: routing frequency and REAP (mean routed ||y_e||)."""
        return {"freq": self.freq / max(1, self.tokens),
                "reap": self.reap / self.freq.clamp_min(1.0)}

    def extra_tensors(self) -> Dict[str, Tensor]:
        """Book tensors: the co-choice matrix [E, E] per token, where the layout exposes the
        router's logits."""
        return {"cochoice": self.cochoice / max(1, self.tokens)} if self.has_cochoice else {}


class RoutedExperts(UnitFamily):
    """The routed experts of one MoE block (a decoder layer's feed-forward child).

    Tap: ``y`` [batch, seq, E * H], the router-weighted output of every expert for every token
    (zero where the token is not routed to it); the block's output is rebuilt as
    ``out + (sum_e y_e - sum_e y_e.detach())`` so its value is unchanged and dL/dy_e is the
    gradient at the block output. Hence R_e = |sum <y_e, dL/dy_e>| (the calibrator's Taylor sum)
    and U_e = class-conditional sliced W1 of y_e over H (its reservoir samples). Also recorded:
    ``freq`` (routed fraction of tokens) and ``reap`` (mean ||y_e|| over routed tokens, REAP).
    """

    role, kind = "ffn", "expert"

    def __init__(self, layer: int, name: str, block: nn.Module, config):
        super().__init__(layer, name)
        self.moe = _map_block(config, name, block)
        self.size = self.n_sub = self.moe.num_experts
        self.feat = self.moe.hidden
        self.top_k = self.moe.top_k
        self.tap = self.moe.experts

    @classmethod
    def match(cls, layer, name, module, config, options):
        return cls(layer, name, module, config) if _looks_like_moe(module) else None

    @property
    def group_name(self) -> str:
        return self.moe.group_name

    # ---- calibration ----------------------------------------------------------------------
    def _pair_outputs(self, model: nn.Module, h: Tensor, idx: Tensor, w: Tensor,
                      run: _Calibration) -> Tensor:
        """[N, E, H] router-weighted expert outputs (zero where not routed), no grad."""
        N, k = idx.shape
        E, H = self.size, h.shape[-1]
        tok = torch.arange(N, device=h.device).repeat_interleave(k)
        e = idx.reshape(-1)
        experts = model.get_submodule(self.moe.experts)
        with torch.no_grad():
            hs = h.detach()[tok]
            if self.moe.storage in ("fused", "flat"):
                o = experts.forward(hs, e[:, None], torch.ones_like(w.reshape(-1, 1)))
                o = o.reshape(-1, H)
            else:
                o = torch.zeros_like(hs)
                for j in torch.unique(e).tolist():
                    sel = (e == j).nonzero().flatten()
                    o[sel] = experts[j](hs[sel]).to(o.dtype)
            y = torch.zeros(N, E, H, dtype=h.dtype, device=h.device)
            y[tok, e] = (o.float() * w.detach().reshape(-1, 1).float()).to(y.dtype)
            if recomputing():     # activation checkpointing: counted in the first forward
                return y
            run.freq += torch.bincount(e, minlength=E).double().cpu()
            run.reap.index_add_(0, e.cpu(), y[tok, e].float().norm(dim=-1).double().cpu())
            run.tokens += N
        return y

    def _check(self, y: Tensor, ref: Tensor, what: str, run: _Calibration) -> None:
        if run.checked:
            return
        run.checked = True
        s, ref = y.sum(dim=1).float(), ref.detach()
        tol = 1e-3 * float(ref.float().abs().max().clamp_min(1e-6))
        if not torch.allclose(s, ref.float(), rtol=1e-3, atol=tol):
            raise UnsupportedModelError(
                f"{self.name}: the per-expert outputs fair_pruner computes do not add up to the "
                f"{what} (max diff {float((s - ref.float()).abs().max()):.3g}); this MoE block "
                "routes in a way fair_pruner does not reproduce")

    def install_tap(self, model: nn.Module, on_input):
        block = model.get_submodule(self.name)
        experts = model.get_submodule(self.moe.experts)
        router = model.get_submodule(self.moe.router)
        state: Dict[str, Any] = {}
        E = self.size
        run = _Calibration(E)

        def rebuild(out: Tensor, y: Tensor) -> Tensor:
            B, T = state["shape"][:2]
            z = on_input(y.reshape(B, T, -1))
            s = z.reshape(-1, E, y.shape[-1]).sum(dim=1)
            return out + (s - s.detach()).reshape(out.shape).to(out.dtype)

        def block_pre(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            state["shape"] = tuple(x.shape)
            state["rows"] = torch.zeros(E, dtype=torch.long)

        hs = [block.register_forward_pre_hook(block_pre, with_kwargs=True)]
        if self.moe.storage == "dense":
            def dense_post(mod, args, out):
                N, H = out.shape[0] // E, out.shape[-1]
                y = out.reshape(E, N, H).transpose(0, 1)          # [N, E, H], 0 if not routed
                with torch.no_grad():
                    norms = y.detach().float().norm(dim=-1)        # [N, E]
                    routed = norms > 0
                    if not recomputing():
                        run.freq += routed.sum(0).double().cpu()
                        run.reap += norms.sum(0).double().cpu()
                        run.tokens += N
                z = on_input(y.reshape(*state["shape"][:-1], E * H))
                return z.reshape(N, E, H).transpose(0, 1).reshape(E * N, H).to(out.dtype)
            hs.append(experts.register_forward_hook(dense_post))
        elif self.moe.storage in ("fused", "flat"):
            def fused_router_post(mod, args, out):
                logits = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(logits, Tensor) and logits.shape[-1] == E:
                    state["logits"] = logits

            def experts_post(mod, args, kwargs, out):
                a = list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index",
                                                          "top_k_weights")][len(args):]
                h, idx, w = a[0].reshape(-1, a[0].shape[-1]), a[1], a[2]   # DBRX: [B, T, H]
                logits = state.pop("logits", None)
                if logits is not None and logits.numel() == h.shape[0] * E:
                    run.add_cochoice(F.softmax(logits.detach().float().reshape(-1, E), -1),
                                     idx.reshape(h.shape[0], -1))
                y = self._pair_outputs(model, h, idx, w, run)
                self._check(y, out.reshape(-1, y.shape[-1]), "experts module's output", run)
                return rebuild(out, y)
            hs.append(router.register_forward_hook(fused_router_post))
            hs.append(experts.register_forward_hook(experts_post, with_kwargs=True))
        else:
            def router_post(mod, args, out):
                state["logits"] = out
            norm = getattr(block, "norm_topk_prob", getattr(router, "norm_topk_prob", True))

            def count(j):
                def pre(mod, args):
                    if "rows" in state:
                        state["rows"][j] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
                return pre

            def block_post(mod, args, kwargs, out):
                x = args[0] if args else kwargs.get("hidden_states")
                rows = state.pop("rows")
                main = out[0] if isinstance(out, tuple) else out
                probs = F.softmax(state.pop("logits").float().reshape(-1, E), dim=-1)
                w, idx = torch.topk(probs, self.top_k, dim=-1)
                run.add_cochoice(probs, idx)
                if norm:
                    w = w / w.sum(dim=-1, keepdim=True)
                y = self._pair_outputs(model, x.reshape(-1, x.shape[-1]), idx,
                                       w.to(x.dtype), run)
                got = torch.bincount(idx.reshape(-1).cpu(), minlength=E)
                if not torch.equal(got, rows):
                    raise UnsupportedModelError(
                        f"{self.name}: softmax/top-{self.top_k} routing reproduced from "
                        f"{self.moe.router} sends {got.tolist()} tokens to the experts, the "
                        f"block sent {rows.tolist()}; unsupported routing")
                if not self.moe.shared:
                    self._check(y, main.reshape(-1, y.shape[-1]), "block's output", run)
                new = rebuild(main, y)
                return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
            hs.append(router.register_forward_hook(router_post))
            hs += [ex.register_forward_pre_hook(count(j)) for j, ex in enumerate(experts)]
            hs.append(block.register_forward_hook(block_post, with_kwargs=True))
        run.hs = hs
        return run

    def extra_meta(self) -> Dict[str, Any]:
        return {"top_k": self.top_k, "storage": self.moe.storage, "router": self.moe.router,
                "experts": self.moe.experts, "shared": self.moe.shared}

    # ---- signals on weights -----------------------------------------------------------------
    def unit_weights(self, model: nn.Module) -> Tensor:
        experts = model.get_submodule(self.moe.experts)
        if self.moe.storage != "modulelist":
            parts = [p.detach().reshape(self.size, -1) for p in experts.parameters()]
        else:
            parts = [torch.stack([torch.cat([p.detach().reshape(-1) for p in ex.parameters()])
                                  for ex in experts])]
        return torch.cat([p.float().cpu() for p in parts], dim=1)

    def tap_column_sq(self, model: nn.Module) -> Tensor:
        # y_e is added to the residual stream unchanged: its consumer is the identity.
        return torch.ones(self.size * self.feat, dtype=torch.float64)

    tap_column_abs = tap_column_sq

    # ---- cost -----------------------------------------------------------------------------
    def cost_terms(self, model: nn.Module, context: float) -> List[CostTerm]:
        """Params: every expert tensor and router row goes with its expert. MACs per token:
        router H per kept expert; routed experts top_k x (expert MACs), which expert removal
        does not change; the shared expert(s) and their gate are constant terms."""
        E = self.size
        experts = model.get_submodule(self.moe.experts)
        router = model.get_submodule(self.moe.router)
        terms: List[CostTerm] = []
        if self.moe.storage == "modulelist":
            per = [(E,) + tuple(p.shape) for p in experts[0].parameters()]
        else:
            per = [tuple(p.shape) for p in experts.parameters()]
        expert_macs = 0.0
        for shp in per:
            rows = shp[0] / E                      # 1, or an expert's rows of a flat tensor
            terms.append(CostTerm(shp, {0: rows}))
            if len(shp) == 3:
                expert_macs += float(shp[1] * shp[2])
            elif len(shp) == 2 and rows > 1:
                expert_macs += float(rows * shp[1])
        if self.moe.storage == "dense":   # every kept expert runs on every token
            terms.append(CostTerm((E,), {0: 1.0}, macs=expert_macs, params=False))
        else:
            terms.append(CostTerm((1,), {}, macs=self.top_k * expert_macs, params=False))
        for n, p in router.named_parameters():
            if p.shape and p.shape[0] == E:
                terms.append(CostTerm(tuple(p.shape), {0: 1.0}, macs=1.0 if p.dim() == 2 else 0.0))
            else:
                terms.append(CostTerm(tuple(p.shape), {}))
        for sname in self.moe.shared:
            for n, p in model.get_submodule(sname).named_parameters():
                terms.append(CostTerm(tuple(p.shape), {}, macs=1.0 if p.dim() == 2 else 0.0))
        return terms

    # ---- surgery ----------------------------------------------------------------------------
    def check_removal(self, removed: Sequence[int]) -> None:
        check_removal(self.moe, removed)
        super().check_removal(removed)

    def prune(self, model: nn.Module, keep: Tensor) -> None:
        keep_set = set(keep.tolist())
        removed = [i for i in range(self.size) if i not in keep_set]
        prune_experts(model, {self.group_name: removed}, inplace=True, layers=[self.moe])

    def merge_removed(self, model: nn.Module, removed: Sequence[int], group) -> Dict[int, int]:
        """:func:`merge_experts` from the book ``group``'s routing statistics."""
        if "cochoice" not in group.tensors or "freq" not in group.signals:
            raise FairPrunerError(
                f"{self.group_name}: expert merging needs the co-choice statistics that "
                "fp.score records for routers whose logits it sees; this book has none (an "
                "older book, or this MoE layout): rescore, or prune without expert_merge")
        check_removal(self.moe, removed)
        return merge_experts(model, self.moe, removed, group.signals["freq"],
                             group.tensors["cochoice"])

    def mask_units(self, masked: nn.Module, removed: Sequence[int]) -> None:
        """The masked reference: removed experts' router logits are -inf."""
        check_removal(self.moe, removed)
        mask_router(masked.get_submodule(self.moe.router), removed, self.moe.router)

    # ---- persistence --------------------------------------------------------------------------
    def widths(self, model: nn.Module) -> dict:
        blk = model.get_submodule(self.name)
        return {"num_experts": _map_block(getattr(model, "config", None), "", blk).num_experts}

    def min_keep(self) -> int:
        return self.top_k

    def resize(self, model: nn.Module, widths: dict) -> None:
        n = int(widths["num_experts"])
        if n < self.moe.num_experts:
            prune_experts(model, {self.group_name: list(range(n, self.moe.num_experts))},
                          inplace=True, layers=[self.moe])
        elif n > self.moe.num_experts:
            raise FairPrunerError(f"saved width {n} experts exceeds the {self.moe.num_experts} "
                                  "the config builds; the config and weights do not match")


class ParallelExperts(RoutedExperts):
    """JetMoE's feed-forward experts: ``input_linear`` / ``output_linear`` (``weight`` [E, out,
    in], called with the tokens sorted by expert and the per-expert counts) behind a
    ``router.layer`` Linear; a shared ``bias`` is added to the block output and never pruned.
    Same unit, signals, surgery and masked reference as :class:`RoutedExperts`; the tap
    reproduces the per-expert outputs from the block's own router and experts and checks them
    against the block output.
    """

    PARTS = ("input_linear", "output_linear")

    def __init__(self, layer: int, name: str, block: nn.Module, config):
        UnitFamily.__init__(self, layer, name)
        router = block.router
        E = int(router.layer.out_features)
        for part in self.PARTS:
            w = getattr(block, part).weight
            if w.dim() != 3 or w.shape[0] != E:
                raise UnsupportedModelError(f"{name}.{part}: weight {tuple(w.shape)} does not "
                                            f"hold {E} experts in dim 0")
        extra = [n for n, c in block.named_children() if n not in self.PARTS + ("router",)
                 and any(True for _ in c.parameters())]
        if extra or [n for n, _ in block.named_parameters(recurse=False) if n != "bias"]:
            raise UnsupportedModelError(f"cannot prune {name} exactly: unexpected parameters "
                                        f"in {extra or 'the block'}")
        self.moe = MoELayer(block=name, router=f"{name}.router.layer", experts=name,
                            storage="parallel", num_experts=E, top_k=int(router.top_k),
                            hidden=int(router.layer.in_features), layer_index=layer)
        self.size = self.n_sub = E
        self.feat = self.moe.hidden
        self.top_k = self.moe.top_k
        self.tap = name

    @classmethod
    def match(cls, layer, name, module, config, options):
        router = getattr(module, "router", None)
        ok = (all(isinstance(getattr(getattr(module, p, None), "weight", None), Tensor)
                  for p in cls.PARTS) and isinstance(getattr(router, "layer", None), nn.Linear))
        return cls(layer, name, module, config) if ok else None

    @property
    def group_name(self) -> str:
        return f"{self.name}.experts"

    def _expert_outputs(self, block: nn.Module, x: Tensor, run: _Calibration) -> Tensor:
        """[N, E, H] gate-weighted outputs of every expert (zero where not routed), no grad."""
        E, H = self.size, x.shape[-1]
        with torch.no_grad():
            _, batch_index, gates, expert_size, _ = block.router(x)
            h = block.input_linear(x[batch_index], expert_size)
            a, b = h.chunk(2, dim=-1)
            eo = block.output_linear(block.activation(a) * b, expert_size) * gates[:, None]
            e = torch.repeat_interleave(torch.arange(E, device=x.device),
                                        torch.tensor(expert_size, device=x.device))
            y = torch.zeros(x.shape[0], E, H, dtype=x.dtype, device=x.device)
            y[batch_index, e] = eo.to(y.dtype)
            run.freq += torch.bincount(e, minlength=E).double().cpu()
            run.reap.index_add_(0, e.cpu(), eo.float().norm(dim=-1).double().cpu())
            run.tokens += x.shape[0]
        return y

    def install_tap(self, model: nn.Module, on_input):
        block = model.get_submodule(self.name)
        run = _Calibration(self.size)

        def post(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("layer_input")
            y = self._expert_outputs(mod, x.reshape(-1, x.shape[-1]), run)
            self._check(y, (out - mod.bias).reshape(-1, y.shape[-1]), "block's output", run)
            z = on_input(y.reshape(*x.shape[:-1], -1))
            s = z.reshape(-1, self.size, y.shape[-1]).sum(dim=1)
            return out + (s - s.detach()).reshape(out.shape).to(out.dtype)
        run.hs = [block.register_forward_hook(post, with_kwargs=True)]
        return run

    def unit_weights(self, model: nn.Module) -> Tensor:
        block = model.get_submodule(self.name)
        return torch.cat([getattr(block, p).weight.detach().reshape(self.size, -1).float().cpu()
                          for p in self.PARTS], dim=1)

    def cost_terms(self, model: nn.Module, context: float) -> List[CostTerm]:
        block = model.get_submodule(self.name)
        shapes = [tuple(getattr(block, p).weight.shape) for p in self.PARTS]
        terms = [CostTerm(s, {0: 1.0}) for s in shapes]
        terms.append(CostTerm((1,), {}, macs=self.top_k * sum(float(s[1] * s[2]) for s in shapes),
                              params=False))
        router = block.router.layer
        terms.append(CostTerm(tuple(router.weight.shape), {0: 1.0}, macs=1.0))
        terms.append(CostTerm(tuple(block.bias.shape), {}))
        return terms

    def prune(self, model: nn.Module, keep: Tensor) -> None:
        block = model.get_submodule(self.name)
        kt = keep.to(torch.long)
        _slice_dim0(block.router.layer, kt, self.size)
        for p in self.PARTS:
            _slice_dim0(getattr(block, p), kt, self.size)
        _set_counts([block, block.router, block.router.layer] + [getattr(block, p)
                                                                 for p in self.PARTS],
                    self.size, int(kt.numel()))

    def widths(self, model: nn.Module) -> dict:
        return {"num_experts": int(model.get_submodule(self.name).router.layer.out_features)}

    def resize(self, model: nn.Module, widths: dict) -> None:
        n = int(widths["num_experts"])
        if n > self.size:
            raise FairPrunerError(f"saved width {n} experts exceeds the {self.size} the config "
                                  "builds; the config and weights do not match")
        self.prune(model, torch.arange(n))


register_family(RoutedExperts)
register_family(ParallelExperts)
