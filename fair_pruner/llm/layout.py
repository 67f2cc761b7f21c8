"""Where the prunable units of a decoder-only transformer live: the table entry applied to a model.

:func:`find_layout` reads ``config.model_type``, takes its :class:`~fair_pruner.llm.arch.Arch`
from the architecture table (or the Llama layout for a type not in the table, see
:func:`verify_fallback`), and maps every decoder layer to its unit families, one per role:

* :class:`AttentionHeads` (``role="attention"``, group kind ``"head"``): units are KV groups (a
  key/value head with the query heads sharing it) or, with ``heads="query"``, query-head slots of
  every KV group. Tap: the input of the output projection, split into heads of ``head_dim``.
* :class:`MLPNeurons` (``role="ffn"``, kind ``"neuron"``): unit j = output row j of every up
  projection (rows j and I + j of a fused gate_up) and input column j of the down projection
  (the tap).
* routed MoE experts (kind ``"expert"``, :mod:`fair_pruner.llm.moe`), registered with
  :func:`register_family` and tried first on the feed-forward block.
* :class:`FrozenBlock`: a block that is kept whole (the table says why); it still counts in the
  parameter and MAC totals.

Widths are read off module shapes, never off the global config, so an already-pruned model
(per-layer widths) maps too. Every parameterised child of a layer and block must be understood;
anything else is refused with an :class:`~fair_pruner.UnsupportedModelError` naming the module.
Projections may be ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored transposed).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import FairPrunerError, UnsupportedModelError
from .arch import LLAMA, Arch, AttnSpec, MLPSpec, arch_for


@dataclass
class CostTerm:
    """One parameter tensor of a family: ``shape``; ``ctrl`` maps a dim to the number of entries
    of that dim each removed unit takes away; ``macs`` = MACs per token per kept entry
    (0 for tensors that do no multiply-accumulate, e.g. biases)."""
    shape: Tuple[int, ...]
    ctrl: Dict[int, float]
    macs: float = 0.0
    params: bool = True


# --------------------------------------------------------------------------------------------
# Projections: nn.Linear and transformers' Conv1D (weight [in, out])
# --------------------------------------------------------------------------------------------

def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def is_proj(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def n_out(m: nn.Module) -> int:
    return int(m.weight.shape[1] if is_conv1d(m) else m.weight.shape[0])


def n_in(m: nn.Module) -> int:
    return int(m.weight.shape[0] if is_conv1d(m) else m.weight.shape[1])


def out_dim(m: nn.Module) -> int:
    """The weight dim that indexes outputs (0 for Linear, 1 for Conv1D)."""
    return 1 if is_conv1d(m) else 0


def weight_oi(m: nn.Module) -> Tensor:
    """The weight as [out, in] (a view)."""
    w = m.weight.detach()
    return w.T if is_conv1d(m) else w


def proj_like(m: nn.Module, out_f: int, in_f: int) -> nn.Module:
    """An uninitialised projection of ``m``'s kind, dtype, device, bias and flags."""
    w = m.weight
    if is_conv1d(m):
        with torch.device(w.device):
            new = type(m)(out_f, in_f).to(dtype=w.dtype)
    else:
        new = nn.Linear(in_f, out_f, bias=m.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.requires_grad_(w.requires_grad)
    if m.bias is not None:
        new.bias.requires_grad_(m.bias.requires_grad)
    new.train(m.training)
    return new


def slice_proj(m: nn.Module, idx: Tensor, side: str) -> nn.Module:
    """``m`` keeping outputs (``side="out"``) or inputs (``"in"``) ``idx``."""
    idx = idx.to(m.weight.device)
    w = weight_oi(m)
    w = w.index_select(0 if side == "out" else 1, idx)
    new = proj_like(m, w.shape[0], w.shape[1])
    with torch.no_grad():
        new.weight.copy_(w.T if is_conv1d(m) else w)
        if m.bias is not None:
            new.bias.copy_(m.bias.detach().index_select(0, idx) if side == "out" else m.bias)
    return new


def _proj_terms(m: nn.Module, side: str, per_unit: float) -> List[CostTerm]:
    """Cost terms of a projection whose outputs (or inputs) lose ``per_unit`` entries a unit."""
    d = out_dim(m) if side == "out" else 1 - out_dim(m)
    terms = [CostTerm(tuple(m.weight.shape), {d: per_unit} if per_unit else {}, macs=1.0)]
    if m.bias is not None:
        terms.append(CostTerm(tuple(m.bias.shape), {0: per_unit} if side == "out" and per_unit
                              else {}))
    return terms


def _param_children(block: nn.Module) -> Dict[str, nn.Module]:
    return {n: c for n, c in block.named_children() if any(True for _ in c.parameters())}


def _strict(where: str, block: nn.Module, known: Sequence[str], direct_ok: Sequence[str] = ()
            ) -> None:
    """Refuse a block holding parameters fair_pruner does not know how to keep consistent."""
    extra = [n for n in _param_children(block) if n not in known]
    direct = [n for n, _ in block.named_parameters(recurse=False) if n not in direct_ok]
    if extra or direct:
        what = ", ".join([f"{where}.{n} ({type(getattr(block, n)).__name__})" for n in extra] +
                         [f"parameter {where}.{n}" for n in direct])
        raise UnsupportedModelError(
            f"cannot prune {where} ({type(block).__name__}) exactly: it holds {what}, which "
            "fair_pruner does not know how to keep consistent with removed units. Add an "
            "architecture entry (fair_pruner.llm.arch.register_architecture) or a unit family "
            "for it")


# --------------------------------------------------------------------------------------------
# Unit families
# --------------------------------------------------------------------------------------------

class UnitFamily:
    """The prunable units of one kind in one decoder layer."""

    role: str = ""        # "attention" | "ffn": one family of each role per decoder layer
    kind: str = ""        # the score-book group kind ("neuron", "head", "expert")
    frozen: Optional[str] = None     # reason the family is kept whole (not scored)
    round_to_applies: bool = False   # whether allocation's round_to rounds this group's width
    tier: int = 0                    # targets cut tier 1 (heads) only when tier 0 falls short

    def __init__(self, layer: int, name: str):
        self.layer = layer          # decoder layer index
        self.name = name            # module name of the block

    @classmethod
    def match(cls, layer: int, name: str, module: nn.Module, config, options: dict
              ) -> Optional["UnitFamily"]:
        """A family for ``module`` (a decoder layer's block for ``cls.role``), or None."""
        raise NotImplementedError

    @property
    def group_name(self) -> str:
        return self.name

    size: int = 0             # units in the group
    n_sub: int = 0            # sub-units at the tap (neurons, query heads)
    feat: int = 1             # tap features per sub-unit (1, or head_dim)
    tap: str = ""             # module name of the projection whose input carries the sub-units

    def min_keep(self) -> int:
        """Units every plan must keep in this group."""
        return 1

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

    def unit_weights(self, model: nn.Module) -> Tensor:
        """fp32 [size, fan]: the weights (and biases) that produce each unit's output, flattened:
        the same meaning as a CNN filter, for the l1/l2 signals (docs/method.md)."""
        raise NotImplementedError

    def tap_column_sq(self, model: nn.Module) -> Tensor:
        """fp64 [n_sub * feat]: squared L2 norm of each input column of the tap (FLAP)."""
        return weight_oi(model.get_submodule(self.tap)).double().pow(2).sum(dim=0).cpu()

    def tap_column_abs(self, model: nn.Module) -> Tensor:
        """fp64 [n_sub * feat]: L1 norm of each input column of the tap (Wanda-sp)."""
        return weight_oi(model.get_submodule(self.tap)).double().abs().sum(dim=0).cpu()

    def cost_terms(self, model: nn.Module, context: float) -> List[CostTerm]:
        raise NotImplementedError

    def members(self, model: nn.Module) -> List[Tuple[str, str]]:
        """(module, role) pairs the group covers: ``producer`` or ``consumer`` (the tap)."""
        block = model.get_submodule(self.name)
        return [(f"{self.name}.{n}", "consumer" if f"{self.name}.{n}" == self.tap else "producer")
                for n, c in block.named_children() if is_proj(c)]

    def check_removal(self, removed: Sequence[int]) -> None:
        bad = [i for i in removed if not 0 <= i < self.size]
        if bad:
            raise FairPrunerError(f"plan units {bad[:5]} out of range for {self.group_name} "
                                  f"({self.size} units)")
        k = len(set(removed))
        if self.size - k < self.min_keep():
            what = "every unit" if k >= self.size else f"{k} units"
            raise FairPrunerError(
                f"the plan removes {what} of {self.group_name} ({k} of {self.size}); a layer "
                f"must keep at least {self.min_keep()}. Re-allocate with fp.allocate (cap < 1 "
                "keeps one), or edit the plan")

    def prune(self, model: nn.Module, keep: Tensor) -> None:
        """Physically keep only units ``keep`` (sorted int64) in ``model``."""
        raise NotImplementedError

    def mask_units(self, model: nn.Module, removed: Sequence[int]) -> None:
        """The masked reference: zero the removed units' channels at the tap's input."""
        ch = self.removed_channels(removed)

        def pre(mod, args, ch=ch):
            x = args[0].clone()
            x.index_fill_(x.dim() - 1, ch.to(x.device), 0)
            return (x,) + tuple(args[1:])
        model.get_submodule(self.tap).register_forward_pre_hook(pre)

    def removed_channels(self, removed: Sequence[int]) -> Tensor:
        """Tap input channels carrying the removed units (zeroed by the masked reference)."""
        subs = self.sub_of_unit()[torch.as_tensor(list(removed), dtype=torch.int64)].flatten()
        ch = subs[:, None] * self.feat + torch.arange(self.feat)[None]
        return ch.flatten()

    def widths(self, model: nn.Module) -> dict:
        """This block's widths, for the saved config (``fair_pruner.layers[i][role]``)."""
        raise NotImplementedError

    def resize(self, model: nn.Module, widths: dict) -> None:
        """Rebuild this block (freshly built at the config's full widths) at ``widths``."""
        raise NotImplementedError


class FrozenBlock(UnitFamily):
    """A block kept whole; its parameters (and MACs of its 2-D weights) are constant costs."""

    kind = "frozen"

    def __init__(self, layer: int, name: str, role: str, reason: str):
        super().__init__(layer, name)
        self.role, self.frozen = role, reason

    def cost_terms(self, model, context):
        return [CostTerm(tuple(p.shape), {}, macs=1.0 if p.dim() == 2 else 0.0)
                for p in model.get_submodule(self.name).parameters()] if self.name else []

    def resize(self, model, widths):
        if widths:
            raise FairPrunerError(f"saved widths {widths} for {self.name}, which this "
                                  "fair_pruner keeps whole; the config and weights do not match")


class MLPNeurons(UnitFamily):
    """Neuron j = output row j of each up projection and input column j of the down projection."""

    role, kind, feat, round_to_applies = "ffn", "neuron", 1, True

    def __init__(self, layer: int, name: str, block: nn.Module, spec: MLPSpec, inline: bool):
        super().__init__(layer, name)
        self.spec, self.inline = spec, inline
        mods = [getattr(block, n, None) for n in spec.up + (spec.down,)]
        missing = [n for n, m in zip(spec.up + (spec.down,), mods) if not is_proj(m)]
        if missing:
            kids = ", ".join(n for n, _ in block.named_children()) or "none"
            raise UnsupportedModelError(
                f"unsupported layout: cannot map feed-forward module {name} "
                f"({type(block).__name__}, children: {kids}); expected projections "
                f"{'/'.join(spec.up + (spec.down,))}")
        if not inline:
            _strict(name, block, spec.up + (spec.down,))
        down = mods[-1]
        n = n_in(down)
        for nm, m in zip(spec.up, mods[:-1]):
            if n_out(m) != n * spec.halves:
                raise UnsupportedModelError(
                    f"{name}: {nm} has {n_out(m)} outputs but {spec.down} takes {n} inputs "
                    f"({spec.halves} row(s) per neuron); cannot map its neurons")
        self.size = self.n_sub = n
        self.tap = f"{name}.{spec.down}"

    @property
    def group_name(self) -> str:
        return f"{self.name}.ffn" if self.inline else self.name

    def _block(self, model):
        return model.get_submodule(self.name)

    def _rows(self, neurons: Tensor) -> Tensor:
        if self.spec.halves == 1:
            return neurons
        return torch.cat([neurons + h * self.size for h in range(self.spec.halves)])

    def members(self, model):
        return ([(f"{self.name}.{n}", "producer") for n in self.spec.up] +
                [(self.tap, "consumer")])

    def unit_weights(self, model):
        block = self._block(model)
        parts = []
        for nm in self.spec.up:
            m = getattr(block, nm)
            w = weight_oi(m).reshape(self.spec.halves, self.size, -1)
            parts.append(w.permute(1, 0, 2).reshape(self.size, -1))
            if m.bias is not None:
                parts.append(m.bias.detach().reshape(self.spec.halves, self.size).T)
        return torch.cat([p.float().cpu() for p in parts], dim=1)

    def cost_terms(self, model, context):
        block = self._block(model)
        terms = []
        for nm in self.spec.up:
            terms += _proj_terms(getattr(block, nm), "out", float(self.spec.halves))
        terms += _proj_terms(getattr(block, self.spec.down), "in", 1.0)
        return terms

    def _set_attrs(self, block, n: int) -> None:
        if self.inline:
            return
        for a in self.spec.attrs:
            if isinstance(getattr(block, a, None), int):
                setattr(block, a, n)

    def prune(self, model, keep):
        block = self._block(model)
        rows = torch.sort(self._rows(keep)).values
        for nm in self.spec.up:
            setattr(block, nm, slice_proj(getattr(block, nm), rows, "out"))
        setattr(block, self.spec.down, slice_proj(getattr(block, self.spec.down), keep, "in"))
        self._set_attrs(block, int(keep.numel()))

    def widths(self, model):
        return {"intermediate_size": self.size}

    def resize(self, model, widths):
        n = int(widths["intermediate_size"])
        block = self._block(model)
        for nm in self.spec.up:
            m = getattr(block, nm)
            setattr(block, nm, proj_like(m, n * self.spec.halves, n_in(m)))
        d = getattr(block, self.spec.down)
        setattr(block, self.spec.down, proj_like(d, n_out(d), n))
        self._set_attrs(block, n)


def _head_dim(block: nn.Module, config) -> int:
    for obj, attr in ((block, "head_dim"), (block, "head_size"), (config, "head_dim")):
        v = getattr(obj, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return int(config.hidden_size // config.num_attention_heads)


class AttentionHeads(UnitFamily):
    """Attention heads of one layer; the tap is the output projection's input, in head_dim heads.

    ``mode="kv"`` (default): unit = one key/value head with the query heads sharing it, so the
    model stays a valid GQA model. ``mode="query"``: unit j = query-head slot j of *every* KV
    group (heads ``g * rep + j``), so each KV group loses the same number of query heads and the
    key/value projections are untouched. head_dim, the hidden size and per-head norms are never
    pruned.
    """

    role, kind, tier = "attention", "head", 1

    def __init__(self, layer: int, name: str, block: nn.Module, config, mode: str,
                 spec: AttnSpec):
        super().__init__(layer, name)
        if mode not in ("kv", "query"):
            raise FairPrunerError(f"heads= must be 'kv' (prune whole KV groups) or 'query' "
                                  f"(query heads within every KV group), got {mode!r}")
        self.spec, self.mode = spec, mode
        names = (spec.qkv,) if spec.qkv else (spec.q, spec.k, spec.v)
        mods = [getattr(block, n, None) for n in names + (spec.o,)]
        if not all(is_proj(m) for m in mods):
            kids = ", ".join(n for n, _ in block.named_children()) or "none"
            raise UnsupportedModelError(
                f"unsupported layout: cannot map attention module {name} "
                f"({type(block).__name__}, children: {kids}); expected projections "
                f"{'/'.join(names + (spec.o,))}")
        hd = _head_dim(block, config)
        o = mods[-1]
        if n_in(o) % hd:
            raise UnsupportedModelError(f"{name}: {spec.o} takes {n_in(o)} inputs, not whole "
                                        f"heads of head_dim {hd}; cannot map its heads")
        nq = n_in(o) // hd
        if spec.qkv:
            total = n_out(mods[0])
            if spec.qkv_layout == "per_head":
                nkv = nq
                ok = total == 3 * nq * hd
            else:                              # "concat" and "grouped": nq + 2 nkv heads
                nkv = (total // hd - nq) // 2
                ok = total == (nq + 2 * nkv) * hd and nkv >= 1
        else:
            q, k, v = mods[:3]
            nkv = n_out(k) // hd
            ok = n_out(q) == nq * hd and n_out(k) == n_out(v) == nkv * hd and nkv >= 1
        if not ok or nq % max(nkv, 1):
            raise UnsupportedModelError(
                f"{name}: projection shapes {[tuple(weight_oi(m).shape) for m in mods]} are not "
                f"{nq} query heads sharing whole key/value heads of head_dim {hd}; not a GQA "
                "layout fair_pruner can map")
        norms = [n for n in spec.head_norms if n in _param_children(block)]
        for n in norms:
            numel = sum(p.numel() for p in getattr(block, n).parameters())
            if numel != hd:
                raise UnsupportedModelError(
                    f"cannot prune {name}.{n} exactly: it has {numel} parameters, not one per "
                    f"head_dim channel ({hd}), so it normalises across heads")
        for p in spec.head_params:
            t = getattr(block, p, None)
            if not isinstance(t, Tensor) or t.shape[:1] != (nq,):
                raise UnsupportedModelError(f"{name}.{p} is not a [{nq}] per-head parameter")
        _strict(name, block, names + (spec.o,) + tuple(norms), spec.head_params)
        self.head_dim, self.n_heads, self.n_kv = hd, nq, nkv
        self.rep = nq // nkv
        self.size = self.n_kv if mode == "kv" else self.rep
        self.n_sub, self.feat = self.n_heads, hd
        self.tap = f"{name}.{spec.o}"

    @property
    def group_name(self) -> str:
        return self.name if self.mode == "kv" else f"{self.name}.query_heads"

    def sub_of_unit(self):
        heads = torch.arange(self.n_kv)[:, None] * self.rep + torch.arange(self.rep)[None, :]
        return heads if self.mode == "kv" else heads.T.contiguous()   # [n_kv, rep] | [rep, n_kv]

    def _rows(self, heads: Tensor) -> Tensor:
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)[None]).flatten()

    def _in_projections(self, heads: Tensor, kvs: Tensor) -> List[Tuple[str, Tensor]]:
        """(projection, output rows) holding query ``heads`` and key/value heads ``kvs``."""
        s, hd = self.spec, self.head_dim
        if not s.qkv:
            return [(s.q, self._rows(heads)), (s.k, self._rows(kvs)), (s.v, self._rows(kvs))]
        if s.qkv_layout == "per_head":      # [q_h k_h v_h] per head; MHA, so kvs == heads
            rows = (heads[:, None] * 3 * hd + torch.arange(3 * hd)[None]).flatten()
        elif s.qkv_layout == "grouped":     # [q_g,1 .. q_g,rep k_g v_g] per KV group g
            w = (self.rep + 2) * hd
            slot = [(h // self.rep) * w + (h % self.rep) * hd for h in heads.tolist()]
            slot += [g * w + (self.rep + j) * hd for g in kvs.tolist() for j in (0, 1)]
            rows = (torch.tensor(slot, dtype=torch.long)[:, None] + torch.arange(hd)[None]).flatten()
        else:
            q = self.n_heads * hd
            rows = torch.cat([self._rows(heads), q + self._rows(kvs),
                              q + self.n_kv * hd + self._rows(kvs)])
        return [(s.qkv, torch.sort(rows).values)]

    def _kv_of(self, heads: Tensor) -> Tensor:
        return torch.unique(heads // self.rep) if self.mode == "kv" else torch.zeros(0, dtype=torch.long)

    def members(self, model):
        s = self.spec
        return [(f"{self.name}.{n}", "producer") for n in ((s.qkv,) if s.qkv else (s.q, s.k, s.v))
                ] + [(self.tap, "consumer")]

    def unit_weights(self, model):
        block = model.get_submodule(self.name)
        out = []
        for heads in self.sub_of_unit():
            parts = []
            for nm, rows in self._in_projections(heads, self._kv_of(heads)):
                m = getattr(block, nm)
                parts.append(weight_oi(m)[rows].flatten())
                if m.bias is not None:
                    parts.append(m.bias.detach()[rows])
            out.append(torch.cat([p.float().cpu() for p in parts]))
        return torch.stack(out)

    def _widths_per_unit(self) -> Tuple[float, float]:
        hd = self.head_dim
        if self.mode == "kv":
            return float(self.rep * hd), float(hd)
        return float(self.n_kv * hd), 0.0

    def cost_terms(self, model, context):
        block = model.get_submodule(self.name)
        s = self.spec
        qw, kvw = self._widths_per_unit()
        terms: List[CostTerm] = []
        if s.qkv:
            terms += _proj_terms(getattr(block, s.qkv), "out", qw + 2 * kvw)
        else:
            terms += _proj_terms(getattr(block, s.q), "out", qw)
            for nm in (s.k, s.v):
                terms += _proj_terms(getattr(block, nm), "out", kvw)
        terms += _proj_terms(getattr(block, s.o), "in", qw)
        for nm in s.head_norms:
            for p in (getattr(block, nm).parameters() if nm in _param_children(block) else ()):
                terms.append(CostTerm(tuple(p.shape), {}))
        for nm in s.head_params:
            t = getattr(block, nm)
            terms.append(CostTerm(tuple(t.shape), {0: qw / self.head_dim}))
        # QK^T and AV: 2 * context MACs per query-head channel per token (no parameters).
        terms.append(CostTerm((self.n_heads * self.head_dim,), {0: qw}, macs=2.0 * context,
                              params=False))
        return terms

    def _set_attrs(self, block: nn.Module, nq: int, nkv: int) -> None:
        if nq % nkv:
            raise FairPrunerError(f"{nq} query heads cannot share {nkv} KV heads")
        val = {"nq": nq, "nkv": nkv, "rep": nq // nkv, "nq*hd": nq * self.head_dim,
               "nkv*hd": nkv * self.head_dim}
        for attr, what in self.spec.attrs:
            if attr.startswith("config."):
                # The forward reads head counts from the config, which all layers share: give
                # this module its own copy.
                if getattr(block, "config", None) is None:
                    continue
                if not getattr(block, "_fair_pruner_own_config", False):
                    block.config = copy.copy(block.config)
                    block._fair_pruner_own_config = True
                setattr(block.config, attr[len("config."):], val[what])
            elif isinstance(getattr(block, attr, None), int):
                setattr(block, attr, val[what])

    def _apply(self, block: nn.Module, heads: Tensor, kvs: Tensor, build) -> None:
        for nm, rows in self._in_projections(heads, kvs):
            setattr(block, nm, build(getattr(block, nm), rows, "out"))
        setattr(block, self.spec.o, build(getattr(block, self.spec.o), self._rows(heads), "in"))
        for nm in self.spec.head_params:
            t = getattr(block, nm)
            new = t.detach().index_select(0, heads.to(t.device)).clone()
            setattr(block, nm, nn.Parameter(new, requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter) else new)
        self._set_attrs(block, int(heads.numel()), int(kvs.numel()))

    def prune(self, model, keep):
        heads = torch.sort(self.sub_of_unit()[keep.cpu()].flatten()).values
        kvs = keep.cpu() if self.mode == "kv" else torch.arange(self.n_kv)
        self._apply(model.get_submodule(self.name), heads, kvs, slice_proj)

    def widths(self, model):
        return {"num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv,
                "head_dim": self.head_dim}

    def resize(self, model, widths):
        if int(widths["head_dim"]) != self.head_dim:
            raise FairPrunerError(f"saved head_dim {widths['head_dim']} != {self.head_dim} of "
                                  f"the rebuilt {self.name}; the config and weights do not match")
        nh, nkv = int(widths["num_attention_heads"]), int(widths["num_key_value_heads"])
        # The first nh query heads / nkv KV heads: only the shapes matter, weights load after.
        heads, kvs = torch.arange(nh), torch.arange(nkv)
        self._apply(model.get_submodule(self.name), heads, kvs, self._empty_like)

    def _empty_like(self, m: nn.Module, rows: Tensor, side: str) -> nn.Module:
        n = int(rows.numel())
        return proj_like(m, n, n_in(m)) if side == "out" else proj_like(m, n_out(m), n)


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

# Families registered by other modules (e.g. routed MoE experts), tried before the table's.
FAMILIES: List[Type[UnitFamily]] = []


def register_family(cls: Type[UnitFamily], before: Optional[Type[UnitFamily]] = None) -> None:
    """Add a unit family, tried on each decoder layer's block of ``cls.role`` before the
    architecture table's own families (``before`` orders it among registered ones)."""
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
    model_type: Optional[str] = None
    in_table: bool = True         # False: the Llama layout found by structure (fallback)

    @property
    def families(self) -> List[UnitFamily]:
        return [f for layer in self.layers for f in layer.families]

    @property
    def prunable(self) -> List[UnitFamily]:
        return [f for f in self.families if not f.frozen]

    def by_group(self) -> Dict[str, UnitFamily]:
        return {f.group_name: f for f in self.prunable}

    def frozen(self) -> Dict[str, str]:
        """Blocks kept whole: module name -> reason."""
        return {f.name: f.frozen for f in self.families if f.frozen}


def _num_layers(config) -> Optional[int]:
    for a in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, a, None)
        if isinstance(v, int):
            return v
    return None


def _layer_list(model: nn.Module, arch: Arch) -> Tuple[str, nn.ModuleList]:
    n_layers = _num_layers(getattr(model, "config", None))
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0
             and (n_layers is None or len(m) == n_layers)]
    for n, m in lists:
        if all(_child(layer, arch.attn.block) is not None for layer in m):
            return n, m
    if lists:
        n, m = lists[0]
        kids = ", ".join(f"{cn} ({type(c).__name__})" for cn, c in m[0].named_children())
        raise UnsupportedModelError(
            f"unsupported layout: {type(model).__name__} (model_type "
            f"{getattr(model.config, 'model_type', None)!r}): decoder layer {n}.0 has no "
            f"attention child {arch.attn.block!r} in every layer (children: {kids}). Hybrid, "
            "encoder-decoder and non-attention layers are not supported; a new family needs an "
            "entry in fair_pruner.llm.arch")
    raise UnsupportedModelError(
        f"unsupported layout: {type(model).__name__} has no ModuleList of decoder layers; "
        "fair_pruner.llm supports the decoder-only causal LMs of its architecture table")


def _child(layer: nn.Module, path: str) -> Optional[nn.Module]:
    """The block at dotted ``path`` under ``layer`` ("" = the layer itself), or None."""
    try:
        return layer.get_submodule(path) if path else layer
    except AttributeError:
        return None


def _check_extras(lpath: str, layer: nn.Module, blocks: Sequence[str], inline: Sequence[str],
                  hidden: Optional[int]) -> None:
    """Every parameterised module of the layer outside its blocks (and the containers on the
    way to them) must be a hidden-size norm: anything else may read the units we remove."""
    on_path = {".".join(b.split(".")[:i]) for b in blocks if b for i in range(1, b.count(".") + 1)}
    for cpath in sorted({""} | on_path):
        container = _child(layer, cpath)
        for cn, c in _param_children(container).items():
            full = f"{cpath}.{cn}" if cpath else cn
            if full in blocks or full in on_path or (not cpath and cn in inline):
                continue
            if any(p.dim() != 1 or (hidden and p.numel() != hidden) for p in c.parameters()):
                raise UnsupportedModelError(
                    f"cannot prune {lpath} exactly: its child {lpath}.{full} "
                    f"({type(c).__name__}) is neither the attention, the feed-forward block nor "
                    "a hidden-size norm. Add an architecture entry for this family")


def _family(role: str, layer: int, name: str, block: nn.Module, config, options: dict,
            arch: Arch) -> UnitFamily:
    for fam in FAMILIES:
        if fam.role == role:
            f = fam.match(layer, name, block, config, options)
            if f is not None:
                return f
    if role == "attention":
        if arch.attn.frozen:
            return FrozenBlock(layer, name, role, arch.attn.frozen)
        return AttentionHeads(layer, name, block, config, options.get("heads", "kv"), arch.attn)
    if arch.mlp.frozen:
        return FrozenBlock(layer, name, role, arch.mlp.frozen)
    return MLPNeurons(layer, name, block, arch.mlp, inline=not arch.mlp.block)


def find_layout(model: nn.Module, heads: str = "kv") -> Layout:
    """Map every decoder layer of ``model`` to its unit families (see the module docstring).

    Raises :class:`~fair_pruner.errors.UnsupportedModelError` naming the first module that could
    not be mapped, or the reason the family is refused.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = arch_for(config)
    in_table = arch is not None
    if arch is not None and arch.refuse:
        raise UnsupportedModelError(f"{type(model).__name__} (model_type {model_type!r}) cannot "
                                    f"be pruned exactly: {arch.refuse}")
    arch = arch or LLAMA
    options = {"heads": heads}
    lname, layers = _layer_list(model, arch)
    out = []
    for i, layer in enumerate(layers):
        lpath = f"{lname}.{i}"
        attn = _child(layer, arch.attn.block)
        ffn = _child(layer, arch.mlp.block)
        if ffn is None:
            kids = ", ".join(f"{cn} ({type(c).__name__})" for cn, c in layer.named_children())
            raise UnsupportedModelError(
                f"unsupported layout: decoder layer {lpath} has no feed-forward child "
                f"{arch.mlp.block!r} (children: {kids})")
        fpath = f"{lpath}.{arch.mlp.block}" if arch.mlp.block else lpath
        dl = DecoderLayer(i, lpath, [
            _family("attention", i, f"{lpath}.{arch.attn.block}", attn, config, options, arch),
            _family("ffn", i, fpath, ffn, config, options, arch)])
        inline = arch.mlp.up + (arch.mlp.down,) if not arch.mlp.block else ()
        _check_extras(lpath, layer, (arch.attn.block, arch.mlp.block), inline,
                      getattr(config, "hidden_size", None))
        out.append(dl)
    return Layout(lname, out, model_type, in_table)
