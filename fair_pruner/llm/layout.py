"""Where the prunable units of a decoder-only transformer live, found by structure.

A Llama-style causal LM (Llama, Mistral, Qwen2, Qwen3 and anything with the same module layout)
is a ``ModuleList`` of decoder layers; each layer holds an attention block with ``q_proj``,
``k_proj``, ``v_proj`` and ``o_proj`` ``nn.Linear`` children and a feed-forward block with
``gate_proj``, ``up_proj`` and ``down_proj``. Class names are never consulted, and widths are
read off the module shapes, so an already-pruned model (per-layer widths) is mapped as well.

Every layer yields a list of :class:`UnitFamily` objects, one per kind of unit it holds
(``role`` ``"attention"`` and ``"ffn"``). A family knows its units' tap (the ``nn.Linear`` whose
*input* carries them), how tap channels group into units, its exact parameter/MAC cost terms,
physical surgery, the masked reference, and how to rebuild its modules at saved widths.

Extension point (e.g. routed MoE experts): subclass :class:`UnitFamily`, implement ``match`` and
the methods below, and :func:`register_family` it (``before=MLPNeurons`` to claim sparse-MoE
blocks first). The calibrator, surgery, masking and :mod:`fair_pruner.llm.io` only talk to
families through this interface; a family whose units are not channels of one Linear's input
overrides :meth:`UnitFamily.install_tap` (the calibrator hands it a callback taking the tapped
tensor, and uses the returned tensor for the gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import FairPrunerError, UnsupportedModelError

ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class CostTerm:
    """One parameter tensor of a family: ``shape``; ``ctrl`` maps a dim to the number of entries
    of that dim each removed unit takes away; ``macs`` = MACs per token per kept entry
    (0 for tensors that do no multiply-accumulate, e.g. biases)."""
    shape: Tuple[int, ...]
    ctrl: Dict[int, float]
    macs: float = 0.0
    params: bool = True


class UnitFamily:
    """The prunable units of one kind in one decoder layer (see the module docstring)."""

    role: str = ""        # "attention" | "ffn": one family of each role per decoder layer
    kind: str = ""        # the score-book group kind ("neuron", "head", "expert")

    def __init__(self, layer: int, name: str):
        self.layer = layer          # decoder layer index
        self.name = name            # module name of the block (also the group name base)

    # ---- detection --------------------------------------------------------------------
    @classmethod
    def match(cls, layer: int, name: str, module: nn.Module, config, options: dict
              ) -> Optional["UnitFamily"]:
        """A family for ``module`` (a direct child of a decoder layer), or None."""
        raise NotImplementedError

    # ---- structure ----------------------------------------------------------------------
    @property
    def group_name(self) -> str:
        return self.name

    size: int = 0             # units in the group
    n_sub: int = 0            # sub-units at the tap (neurons, query heads)
    feat: int = 1             # tap features per sub-unit (1, or head_dim)
    tap: str = ""             # module name of the Linear whose input carries the sub-units

    def sub_of_unit(self) -> Tensor:
        """int64 [size, k]: the sub-units forming each unit (identity for scalar units)."""
        return torch.arange(self.size)[:, None]

    def install_tap(self, model: nn.Module, on_input: Callable[[Tensor], Tensor]):
        """Hook the tap; ``on_input(x)`` returns the tensor to use in place of the tap input.
        Returns a handle with ``remove()``."""
        mod = model.get_submodule(self.tap)

        def pre(m, args):
            x = on_input(args[0])
            return None if x is args[0] else (x,) + tuple(args[1:])
        return mod.register_forward_pre_hook(pre)

    # ---- signals ------------------------------------------------------------------------
    def unit_weights(self, model: nn.Module) -> Tensor:
        """fp32 [size, fan]: every weight entry a unit owns, flattened (for l1/l2 signals)."""
        raise NotImplementedError

    def tap_column_sq(self, model: nn.Module) -> Tensor:
        """fp64 [n_sub * feat]: squared L2 norm of each input column of the tap Linear (FLAP)."""
        w = model.get_submodule(self.tap).weight.detach()
        return w.double().pow(2).sum(dim=0).cpu()

    # ---- cost ---------------------------------------------------------------------------
    def cost_terms(self, model: nn.Module, context: float) -> List[CostTerm]:
        raise NotImplementedError

    # ---- surgery ------------------------------------------------------------------------
    def check_removal(self, removed: Sequence[int]) -> None:
        if len(set(removed)) >= self.size:
            raise FairPrunerError(
                f"the plan removes every unit of {self.group_name} ({self.size} of {self.size}); "
                "a layer must keep at least one. Re-allocate with fp.allocate (cap < 1 keeps one), "
                "or edit the plan")
        bad = [i for i in removed if not 0 <= i < self.size]
        if bad:
            raise FairPrunerError(f"plan units {bad[:5]} out of range for {self.group_name} "
                                  f"({self.size} units)")

    def prune(self, model: nn.Module, keep: Tensor) -> None:
        """Physically keep only units ``keep`` (sorted int64) in ``model``."""
        raise NotImplementedError

    def removed_channels(self, removed: Sequence[int]) -> Tensor:
        """Tap input channels carrying the removed units (zeroed by the masked reference)."""
        subs = self.sub_of_unit()[torch.as_tensor(list(removed), dtype=torch.int64)].flatten()
        ch = subs[:, None] * self.feat + torch.arange(self.feat)[None]
        return ch.flatten()

    # ---- persistence --------------------------------------------------------------------
    def widths(self, model: nn.Module) -> dict:
        """This block's widths, for the saved config (``fair_pruner.layers[i][role]``)."""
        raise NotImplementedError

    @staticmethod
    def resize(block: nn.Module, widths: dict) -> None:
        """Rebuild ``block`` (freshly built at the config's full widths) at ``widths``."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Linear helpers
# --------------------------------------------------------------------------------------------

def linear_like(lin: nn.Linear, out_f: int, in_f: int) -> nn.Linear:
    """An uninitialised-size copy of ``lin``'s kind: same dtype/device/bias/requires_grad."""
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    new.weight.requires_grad_(lin.weight.requires_grad)
    if lin.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    new.train(lin.training)
    return new


def slice_linear(lin: nn.Linear, idx: Tensor, dim: int) -> nn.Linear:
    """``lin`` keeping output rows (dim 0) or input columns (dim 1) ``idx``."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, idx)
    new = linear_like(lin, w.shape[0], w.shape[1])
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach().index_select(0, idx) if dim == 0 else lin.bias)
    return new


def _linears(module: nn.Module, names: Sequence[str]) -> Optional[List[nn.Linear]]:
    mods = [getattr(module, n, None) for n in names]
    return mods if all(isinstance(m, nn.Linear) for m in mods) else None


# --------------------------------------------------------------------------------------------
# MLP neurons
# --------------------------------------------------------------------------------------------

class MLPNeurons(UnitFamily):
    """Neuron j = row j of gate_proj and up_proj and column j of down_proj (tap: down_proj input)."""

    role, kind, feat = "ffn", "neuron", 1

    def __init__(self, layer: int, name: str, module: nn.Module):
        super().__init__(layer, name)
        gate, up, down = _linears(module, MLP_NAMES)
        n = down.in_features
        if gate.out_features != n or up.out_features != n:
            raise UnsupportedModelError(
                f"{name}: gate_proj/up_proj have {gate.out_features}/{up.out_features} outputs but "
                f"down_proj takes {n} inputs; cannot map its neurons")
        self.size = self.n_sub = n
        self.hidden = down.out_features
        self.tap = f"{name}.down_proj"

    @classmethod
    def match(cls, layer, name, module, config, options):
        return cls(layer, name, module) if _linears(module, MLP_NAMES) else None

    def _mods(self, model):
        block = model.get_submodule(self.name)
        return block, block.gate_proj, block.up_proj, block.down_proj

    def unit_weights(self, model):
        _, g, u, d = self._mods(model)
        parts = [g.weight.detach(), u.weight.detach(), d.weight.detach().T]
        for lin in (g, u):
            if lin.bias is not None:
                parts.append(lin.bias.detach()[:, None])
        return torch.cat([p.float().cpu() for p in parts], dim=1)

    def cost_terms(self, model, context):
        _, g, u, d = self._mods(model)
        terms = []
        for lin in (g, u):
            terms.append(CostTerm(tuple(lin.weight.shape), {0: 1.0}, macs=1.0))
            if lin.bias is not None:
                terms.append(CostTerm(tuple(lin.bias.shape), {0: 1.0}))
        terms.append(CostTerm(tuple(d.weight.shape), {1: 1.0}, macs=1.0))
        if d.bias is not None:
            terms.append(CostTerm(tuple(d.bias.shape), {}))
        return terms

    def prune(self, model, keep):
        block, g, u, d = self._mods(model)
        block.gate_proj = slice_linear(g, keep, 0)
        block.up_proj = slice_linear(u, keep, 0)
        block.down_proj = slice_linear(d, keep, 1)
        if hasattr(block, "intermediate_size"):
            block.intermediate_size = int(keep.numel())

    def widths(self, model):
        return {"intermediate_size": model.get_submodule(self.tap).in_features}

    @staticmethod
    def resize(block, widths):
        n = int(widths["intermediate_size"])
        for nm in ("gate_proj", "up_proj"):
            lin = getattr(block, nm)
            setattr(block, nm, linear_like(lin, n, lin.in_features))
        block.down_proj = linear_like(block.down_proj, block.down_proj.out_features, n)
        if hasattr(block, "intermediate_size"):
            block.intermediate_size = n


# --------------------------------------------------------------------------------------------
# Attention heads (GQA-aware)
# --------------------------------------------------------------------------------------------

def _head_dim(module: nn.Module, config) -> int:
    hd = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    if not hd:
        hd = config.hidden_size // config.num_attention_heads
    return int(hd)


class AttentionHeads(UnitFamily):
    """Attention heads; the tap is o_proj's input, split into query heads of ``head_dim``.

    ``mode="kv"`` (default): unit = one key/value head with the query heads sharing it, so the
    model stays a valid GQA model (q_proj/o_proj lose ``rep * head_dim`` rows/columns per unit,
    k_proj/v_proj ``head_dim`` rows). ``mode="query"``: unit j = query-head slot j of *every* KV
    group (heads ``g * rep + j``), so each KV group loses the same number of query heads and
    k_proj/v_proj are untouched. head_dim, hidden size and q_norm/k_norm are never pruned.
    """

    role, kind = "attention", "head"

    def __init__(self, layer: int, name: str, module: nn.Module, config, mode: str):
        super().__init__(layer, name)
        q, k, v, o = _linears(module, ATTN_NAMES)
        hd = _head_dim(module, config)
        if q.out_features % hd or k.out_features % hd or o.in_features != q.out_features:
            raise UnsupportedModelError(
                f"{name}: q_proj/k_proj/o_proj shapes ({q.out_features}, {k.out_features}, "
                f"{o.in_features}) are not whole heads of head_dim {hd}; cannot map its heads")
        self.head_dim = hd
        self.n_heads = q.out_features // hd
        self.n_kv = k.out_features // hd
        if v.out_features != k.out_features or self.n_heads % self.n_kv:
            raise UnsupportedModelError(
                f"{name}: {self.n_heads} query heads cannot share {self.n_kv} key/value heads "
                f"(v_proj has {v.out_features // hd}); not a GQA layout")
        self.rep = self.n_heads // self.n_kv
        if mode not in ("kv", "query"):
            raise FairPrunerError(f"heads= must be 'kv' (prune whole KV groups) or 'query' "
                                  f"(query heads within every KV group), got {mode!r}")
        self.mode = mode
        self.size = self.n_kv if mode == "kv" else self.rep
        self.n_sub, self.feat = self.n_heads, hd
        self.tap = f"{name}.o_proj"

    @classmethod
    def match(cls, layer, name, module, config, options):
        if _linears(module, ATTN_NAMES) is None:
            return None
        return cls(layer, name, module, config, options.get("heads", "kv"))

    @property
    def group_name(self) -> str:
        return self.name if self.mode == "kv" else f"{self.name}.query_heads"

    def sub_of_unit(self):
        g = torch.arange(self.n_kv)
        j = torch.arange(self.rep)
        heads = g[:, None] * self.rep + j[None, :]        # [n_kv, rep]
        return heads if self.mode == "kv" else heads.T.contiguous()   # [rep, n_kv]

    def _mods(self, model):
        block = model.get_submodule(self.name)
        return block, block.q_proj, block.k_proj, block.v_proj, block.o_proj

    def _rows(self, heads: Tensor) -> Tensor:
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)[None]).flatten()

    def unit_weights(self, model):
        _, q, k, v, o = self._mods(model)
        out = []
        for heads in self.sub_of_unit():
            rows = self._rows(heads)
            parts = [q.weight.detach()[rows].flatten(), o.weight.detach()[:, rows].flatten()]
            if q.bias is not None:
                parts.append(q.bias.detach()[rows])
            if self.mode == "kv":
                kv = self._rows(torch.unique(heads // self.rep))
                for lin in (k, v):
                    parts.append(lin.weight.detach()[kv].flatten())
                    if lin.bias is not None:
                        parts.append(lin.bias.detach()[kv])
            out.append(torch.cat([p.float().cpu() for p in parts]))
        return torch.stack(out)

    def cost_terms(self, model, context):
        _, q, k, v, o = self._mods(model)
        hd = self.head_dim
        qw = float(self.rep * hd if self.mode == "kv" else self.n_kv * hd)
        kvw = float(hd) if self.mode == "kv" else None
        terms = [CostTerm(tuple(q.weight.shape), {0: qw}, macs=1.0)]
        if q.bias is not None:
            terms.append(CostTerm(tuple(q.bias.shape), {0: qw}))
        for lin in (k, v):
            terms.append(CostTerm(tuple(lin.weight.shape), {0: kvw} if kvw else {}, macs=1.0))
            if lin.bias is not None:
                terms.append(CostTerm(tuple(lin.bias.shape), {0: kvw} if kvw else {}))
        terms.append(CostTerm(tuple(o.weight.shape), {1: qw}, macs=1.0))
        if o.bias is not None:
            terms.append(CostTerm(tuple(o.bias.shape), {}))
        block = model.get_submodule(self.name)
        for nm in ("q_norm", "k_norm"):
            w = getattr(getattr(block, nm, None), "weight", None)
            if isinstance(w, Tensor):
                terms.append(CostTerm(tuple(w.shape), {}))
        # QK^T and AV: 2 * context MACs per query-head channel per token (no parameters).
        terms.append(CostTerm((q.out_features,), {0: qw}, macs=2.0 * context, params=False))
        return terms

    def prune(self, model, keep):
        block, q, k, v, o = self._mods(model)
        heads = self.sub_of_unit()[keep.cpu()]
        heads = torch.sort(heads.flatten()).values
        rows = self._rows(heads)
        block.q_proj = slice_linear(q, rows, 0)
        block.o_proj = slice_linear(o, rows, 1)
        if self.mode == "kv":
            kv_rows = self._rows(keep.cpu())
            block.k_proj = slice_linear(k, kv_rows, 0)
            block.v_proj = slice_linear(v, kv_rows, 0)
            n_kv = int(keep.numel())
        else:
            n_kv = self.n_kv
        _set_head_attrs(block, int(heads.numel()), n_kv)

    def widths(self, model):
        _, q, k, _, _ = self._mods(model)
        return {"num_attention_heads": q.out_features // self.head_dim,
                "num_key_value_heads": k.out_features // self.head_dim,
                "head_dim": self.head_dim}

    @staticmethod
    def resize(block, widths):
        hd = int(widths["head_dim"])
        nh, nkv = int(widths["num_attention_heads"]), int(widths["num_key_value_heads"])
        hidden = block.q_proj.in_features
        block.q_proj = linear_like(block.q_proj, nh * hd, hidden)
        block.k_proj = linear_like(block.k_proj, nkv * hd, hidden)
        block.v_proj = linear_like(block.v_proj, nkv * hd, hidden)
        block.o_proj = linear_like(block.o_proj, block.o_proj.out_features, nh * hd)
        _set_head_attrs(block, nh, nkv)


def _set_head_attrs(block: nn.Module, n_heads: int, n_kv: int) -> None:
    """Keep the attention module's own head counts consistent with its new projections."""
    if n_heads % n_kv:
        raise FairPrunerError(f"{n_heads} query heads cannot share {n_kv} KV heads")
    block.num_key_value_groups = n_heads // n_kv
    for attr, val in (("num_heads", n_heads), ("num_attention_heads", n_heads),
                      ("num_key_value_heads", n_kv)):
        if isinstance(getattr(block, attr, None), int):
            setattr(block, attr, val)


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

FAMILIES: List[Type[UnitFamily]] = [AttentionHeads, MLPNeurons]


def register_family(cls: Type[UnitFamily], before: Optional[Type[UnitFamily]] = None) -> None:
    """Add a unit family (tried in order on each direct child of every decoder layer)."""
    if cls in FAMILIES:
        return
    FAMILIES.insert(FAMILIES.index(before) if before in FAMILIES else len(FAMILIES), cls)


@dataclass
class DecoderLayer:
    index: int
    name: str
    families: List[UnitFamily] = field(default_factory=list)

    def family(self, role: str) -> UnitFamily:
        return next(f for f in self.families if f.role == role)


@dataclass
class Layout:
    layers_name: str
    layers: List[DecoderLayer]

    @property
    def families(self) -> List[UnitFamily]:
        return [f for layer in self.layers for f in layer.families]

    def by_group(self) -> Dict[str, UnitFamily]:
        return {f.group_name: f for f in self.families}


_HINTS = {"attention": ("attn", "attention"), "ffn": ("mlp", "feed_forward", "ffn", "moe",
                                                      "experts")}


def _layer_list(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    cfg = getattr(model, "config", None)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    for n, m in lists:    # the first list whose items hold a q/k/v/o attention block
        if any(_linears(c, ATTN_NAMES) for c in m[0].children()):
            return n, m
    cands = [(n, m) for n, m in lists if n_layers is None or len(m) == n_layers]
    if cands:
        n, m = cands[0]
        sub = next((f"{n}.0.{cn}" for cn, c in m[0].named_children()
                    if any(h in cn.lower() for h in _HINTS["attention"])), f"{n}.0")
        kids = ", ".join(cn for cn, _ in model.get_submodule(sub).named_children()) or "none"
        raise UnsupportedModelError(
            f"unsupported layout: cannot map attention module {sub} "
            f"({type(model.get_submodule(sub)).__name__}, children: {kids}); fair_pruner.llm "
            "needs Llama-style q_proj/k_proj/v_proj/o_proj nn.Linear children (fused qkv or "
            "Conv1D projections are not supported)")
    raise UnsupportedModelError(
        f"unsupported layout: {type(model).__name__} has no ModuleList of decoder layers with a "
        "q_proj/k_proj/v_proj/o_proj attention block; fair_pruner.llm supports Llama-style "
        "causal LMs (Llama, Mistral, Qwen2, Qwen3, ...)")


def find_layout(model: nn.Module, heads: str = "kv") -> Layout:
    """Map every decoder layer of ``model`` to its unit families (see the module docstring).

    Raises :class:`~fair_pruner.errors.UnsupportedModelError` naming the first module that could
    not be mapped.
    """
    config = getattr(model, "config", None)
    options = {"heads": heads}
    lname, layers = _layer_list(model)
    out = []
    for i, layer in enumerate(layers):
        lpath = f"{lname}.{i}"
        dl = DecoderLayer(i, lpath)
        for cname, child in layer.named_children():
            for fam in FAMILIES:
                f = fam.match(i, f"{lpath}.{cname}", child, config, options)
                if f is not None:
                    dl.families.append(f)
                    break
        for role in ("attention", "ffn"):
            n = sum(f.role == role for f in dl.families)
            if n == 1:
                continue
            if n > 1:
                raise UnsupportedModelError(f"{lpath} has {n} {role} blocks; only one is supported")
            sub = next((f"{lpath}.{cn}" for cn, _ in layer.named_children()
                        if any(h in cn.lower() for h in _HINTS[role])), lpath)
            kids = ", ".join(cn for cn, _ in model.get_submodule(sub).named_children()) or "none"
            want = ("q_proj/k_proj/v_proj/o_proj" if role == "attention"
                    else "gate_proj/up_proj/down_proj")
            raise UnsupportedModelError(
                f"unsupported layout: cannot map {role} module {sub} "
                f"({type(model.get_submodule(sub)).__name__}, children: {kids}); expected "
                f"{want} nn.Linear children (or register a UnitFamily for it)")
        out.append(dl)
    return Layout(lname, out)
