"""The score book: per-group scores and costs, saved and loaded without the model.

A book holds, per group, every signal calibration computed (``u``, ``r``, ``l1``, ...), the group's
structure (its producer and consumer modules) and an exact cost model, plus metadata: the model's
fingerprint, seed and calibration sizes. It is all :func:`fair_pruner.allocate` needs, so a user
re-prunes at any tolerance or target in milliseconds without recalibrating.

On disk: one ``.safetensors`` file; tensors are the signals and the cost model, and the JSON
metadata (groups, members, meta) rides in the safetensors header. Written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .errors import BookMismatchError, FairPrunerError
from .cost import CostModel

FORMAT_VERSION = 2


@dataclass
class Member:
    """One module touched by a group: ``idxs`` are its channel indices, aligned to ``root_idxs``."""
    module: str
    role: str            # "producer" (its output carries the units), "consumer" (input), "norm"
    idxs: List[int]
    root_idxs: List[int]


@dataclass
class GroupSpec:
    """The structural part of a group: the modules it touches (producers carry its units in
    their outputs, consumers read them, norms follow them)."""
    name: str            # the root module's name, "+N" when N more modules produce its units
    size: int
    members: List[Member] = field(default_factory=list)
    root: Optional[str] = None   # the module the group is pruned from; None: ``name`` is it

    @property
    def root_module(self) -> str:
        return self.root or self.name

    @property
    def producers(self) -> List[Member]:
        return [m for m in self.members if m.role == "producer"]

    @property
    def consumers(self) -> List[Member]:
        return [m for m in self.members if m.role == "consumer"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer name with its shape, and every module's type."""
    h = hashlib.sha256()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__name__};".encode())
    return h.hexdigest()[:16]


@dataclass
class Group:
    """One coupled group of units: scores are float64 tensors of length ``size``."""
    name: str
    size: int
    signals: Dict[str, Tensor]
    spec: GroupSpec
    kind: str = "channel"          # what a unit is: "channel", "neuron", "head", "expert"
    meta: Dict[str, Any] = field(default_factory=dict)
    # Constraints allocation reads (it never looks at ``kind``):
    min_keep: int = 1              # units every plan keeps (e.g. an MoE layer's top_k)
    roundable: bool = True         # whether ``round_to`` rounds this group's kept width
    frozen: bool = False           # scored, but never pruned
    tier: int = 0                  # targets open higher tiers only when lower ones fall short
    # Calibration statistics beyond per-unit signals, saved with the book: weight reconstruction's
    # "mean" [C] and "gram" [C, C] of an LLM group's consumer input (meta["tokens"] rows), or
    # "mean@<module>" / "gram@<module>" per CNN consumer (meta["tokens@<module>"]).
    tensors: Dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.min_keep, int) and 1 <= self.min_keep <= max(1, self.size)):
            raise FairPrunerError(f"group {self.name}: min_keep={self.min_keep!r} must be an int "
                                  f"in [1, size={self.size}]")

    @property
    def u(self) -> Tensor:
        return self.signals["u"]

    @property
    def r(self) -> Tensor:
        return self.signals["r"]

    @property
    def modules(self) -> List[str]:
        """Every module the group covers (producers first)."""
        seen: List[str] = []
        for m in self.spec.producers + [m for m in self.spec.members if m.role != "producer"]:
            if m.module not in seen:
                seen.append(m.module)
        return seen

    def __repr__(self) -> str:
        return f"Group({self.name!r}, size={self.size}, signals={sorted(self.signals)})"


@dataclass
class ScoreBook:
    groups: List[Group]
    cost: CostModel
    meta: Dict[str, Any]

    # ---- queries -------------------------------------------------------------------------
    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r} in this score book")

    @property
    def signal_names(self) -> List[str]:
        return sorted(set.intersection(*(set(g.signals) for g in self.groups))) if self.groups else []

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint", "")

    def totals(self):
        """(params, MACs) of the unpruned model."""
        p, f = self.cost.evaluate(torch.zeros(len(self.groups), dtype=torch.int64))
        return int(round(float(p))), int(round(float(f)))

    def set_signal(self, name: str, scores: Dict[str, Tensor]) -> None:
        """Add a removal/protection signal computed elsewhere: group name -> [size] scores."""
        missing = [g.name for g in self.groups if g.name not in scores]
        if missing:
            raise FairPrunerError(f"set_signal({name!r}): no scores for groups {missing[:5]}")
        for g in self.groups:
            t = torch.as_tensor(scores[g.name], dtype=torch.float64).reshape(-1)
            if t.numel() != g.size:
                raise FairPrunerError(f"set_signal({name!r}): group {g.name} has {g.size} units, "
                                      f"got {t.numel()} scores")
            if not torch.isfinite(t).all():
                raise FairPrunerError(f"set_signal({name!r}): non-finite scores for {g.name}")
            g.signals[name] = t

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`BookMismatchError` unless ``model`` is the model this book scored."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise BookMismatchError(
                f"this score book was made from another model (book fingerprint "
                f"{self.fingerprint}, model {fp}): recalibrate with fp.score(model, loader) on "
                "this model, or load the book that belongs to it")

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the book to ``path`` (``.safetensors``), atomically."""
        from safetensors.torch import save_file

        tensors = dict(self.cost.to_tensors())
        groups_meta = []
        for i, g in enumerate(self.groups):
            for s, t in g.signals.items():
                tensors[f"g{i}.{s}"] = t.contiguous()
            for s, t in g.tensors.items():
                tensors[f"g{i}.t.{s}"] = t.contiguous()
            groups_meta.append({
                "name": g.name, "size": g.size, "kind": g.kind, "signals": sorted(g.signals),
                "meta": g.meta, "min_keep": g.min_keep, "roundable": g.roundable,
                "frozen": g.frozen, "tier": g.tier, "tensors": sorted(g.tensors),
                "members": [[m.module, m.role, m.idxs, m.root_idxs] for m in g.spec.members],
                **({"root": g.spec.root} if g.spec.root is not None else {}),
            })
        header = {"format": "fair_pruner.scorebook", "version": str(FORMAT_VERSION),
                  "groups": json.dumps(groups_meta), "meta": json.dumps(self.meta)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreBook":
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise FairPrunerError(f"cannot read score book {path}: {exc}") from exc
        if header.get("format") != "fair_pruner.scorebook":
            raise FairPrunerError(f"{path} is not a fair_pruner score book")
        if int(header.get("version", "0")) > FORMAT_VERSION:
            raise FairPrunerError(f"{path} was written by a newer fair_pruner; upgrade to read it")
        groups = []
        for i, gm in enumerate(json.loads(header["groups"])):
            spec = GroupSpec(gm["name"], gm["size"], [Member(*m) for m in gm["members"]],
                             gm.get("root"))
            sig = {s: tensors[f"g{i}.{s}"] for s in gm["signals"]}
            kind, gmeta = gm.get("kind", "channel"), gm.get("meta", {})
            # Books written before a constraint existed: it followed from the unit kind then.
            cons = {"min_keep": int(gmeta.get("top_k", 1)) if kind == "expert" else 1,
                    "roundable": kind in ("channel", "neuron"), "frozen": False,
                    "tier": 1 if kind == "head" else 0}
            cons.update({k: gm[k] for k in cons if k in gm})
            extra = {s: tensors[f"g{i}.t.{s}"] for s in gm.get("tensors", [])}
            groups.append(Group(gm["name"], gm["size"], sig, spec, kind, gmeta, **cons,
                                tensors=extra))
        return cls(groups, CostModel.from_tensors(tensors), json.loads(header["meta"]))

    def __repr__(self) -> str:
        p, f = self.totals() if self.groups else (0, 0)
        return (f"ScoreBook({len(self.groups)} groups, {sum(g.size for g in self.groups)} units, "
                f"params={p:,}, MACs={f:,}, signals={self.signal_names})")


def umask() -> int:
    """The process's file-mode creation mask, read without changing it where the OS tells it
    (Linux ``/proc``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the usual mode of a new file, ``0o666 & ~umask`` (``mkstemp`` creates the
    temporary file 0600), so every file the package writes through here is readable as if
    ``open(path, "w")`` had made it.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
