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

from .errors import BookMismatchError, FairPrunerError, InvalidBookError
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
    # Channels per unit: unit j is root channels {j + k * size : k < interleave}, one position
    # in every channel group of a grouped convolution the group feeds (``interleave`` > 1 only
    # there); members' ``root_idxs`` are unit indices.
    interleave: int = 1

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
    """Hash of every parameter and buffer name with its shape, and every module's type (an
    FSDP2-sharded model has its unsharded model's fingerprint: global shapes, own classes)."""
    from .distributed import plain_type
    h = hashlib.sha256()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    for name, m in model.named_modules():
        h.update(f"{name}:{plain_type(m).__name__};".encode())
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

    def validate(self, need_macs: bool = False, structure: bool = True) -> None:
        """Raise :class:`InvalidBookError` unless the book keeps its invariants: distinct group
        names; every signal a finite 1-d tensor with one score per unit; members index units in
        [0, size); and a non-degenerate cost model (finite totals, parameters > 0 and, with
        ``need_macs``, MACs > 0; removing one unit of any group, or every removable unit, never
        costs more than the unpruned model nor less than nothing). :meth:`load` and
        :func:`fair_pruner.allocate` call it, so a corrupt file cannot steer a plan
        (allocation, which never reads members, skips them: ``structure=False``)."""
        if not isinstance(self.groups, list) or not self.groups:
            raise InvalidBookError("the score book has no groups; score the model with fp.score")
        seen = set()
        for g in self.groups:
            if not isinstance(g, Group):
                raise InvalidBookError(f"score book groups must be fair_pruner Groups, got "
                                       f"{type(g).__name__}")
            if g.name in seen:
                raise InvalidBookError(f"group {g.name!r} appears twice in the score book; "
                                       "rescore the model with fp.score")
            seen.add(g.name)
            if not (isinstance(g.size, int) and not isinstance(g.size, bool) and g.size >= 1):
                raise InvalidBookError(f"group {g.name}: size {g.size!r} must be an int >= 1")
            for s, t in g.signals.items():
                if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != g.size:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise InvalidBookError(
                        f"group {g.name}: signal {s!r} has shape {shape} but the group has "
                        f"{g.size} units; the book is corrupt or was edited: rescore with "
                        "fp.score, or set the signal with book.set_signal()")
                if not (t.is_floating_point() or t.dtype in _INT_DTYPES):
                    raise InvalidBookError(f"group {g.name}: signal {s!r} has dtype {t.dtype}; "
                                           "scores are float tensors")
                if not bool(torch.isfinite(t).all()):
                    raise InvalidBookError(
                        f"group {g.name}: signal {s!r} has NaN/inf scores, which would steer the "
                        "plan arbitrarily; the book is corrupt or was edited: rescore with "
                        "fp.score, or set finite scores with book.set_signal()")
            il = g.spec.interleave if structure else 1
            if not (isinstance(il, int) and not isinstance(il, bool) and il >= 1):
                raise InvalidBookError(f"group {g.name}: interleave {il!r} must be an int >= 1; "
                                       "the book is corrupt: rescore")
            for m in (g.spec.members if structure else ()):
                if len(m.idxs) != len(m.root_idxs) or any(
                        not isinstance(i, int) or not 0 <= i < g.size for i in m.root_idxs) \
                        or any(not isinstance(i, int) or i < 0 for i in m.idxs):
                    raise InvalidBookError(
                        f"group {g.name}: member {m.module} has unit indices outside [0, "
                        f"{g.size}) or mismatched index lists; the book is corrupt: rescore")
        _check_costs(self)
        if need_macs:
            _check_macs(self)

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
                **({"interleave": g.spec.interleave} if g.spec.interleave != 1 else {}),
            })
        header = {"format": "fair_pruner.scorebook", "version": str(FORMAT_VERSION),
                  "groups": json.dumps(groups_meta), "meta": json.dumps(self.meta)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreBook":
        """Read a book written by :meth:`save`. Anything unreadable, missing, renamed or breaking
        the book's invariants (:meth:`validate`) is an :class:`InvalidBookError` naming it."""
        from safetensors import safe_open

        if not os.path.exists(os.fspath(path)):
            raise InvalidBookError(f"cannot read score book {path}: no such file; write one with "
                                   "fp.score(model, loader).save(path)")
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise InvalidBookError(f"cannot read score book {path}: {exc}") from exc
        if header.get("format") != "fair_pruner.scorebook":
            raise InvalidBookError(f"{path} is not a fair_pruner score book (its header has no "
                                   "format 'fair_pruner.scorebook'); give a file written by "
                                   "book.save")
        bad = f"{path} is a damaged fair_pruner score book"
        fix = "; rescore with fp.score and save it again"
        try:
            version = int(header.get("version", "0"))
        except ValueError:
            raise InvalidBookError(f"{bad}: version {header.get('version')!r} is not a number"
                                   f"{fix}") from None
        if version > FORMAT_VERSION:
            raise InvalidBookError(f"{path} was written by a newer fair_pruner (format "
                                   f"{version}); upgrade fair_pruner to read it")
        for key in ("groups", "meta"):
            if key not in header:
                raise InvalidBookError(f"{bad}: its header has no {key!r} entry (keys "
                                       f"{sorted(header)}){fix}")
        try:
            groups_meta, meta = json.loads(header["groups"]), json.loads(header["meta"])
        except ValueError as exc:
            raise InvalidBookError(f"{bad}: its JSON header does not parse ({exc}){fix}") from None
        if not isinstance(groups_meta, list) or not isinstance(meta, dict):
            raise InvalidBookError(f"{bad}: header 'groups' must be a JSON list and 'meta' an "
                                   f"object{fix}")
        groups = []
        for i, gm in enumerate(groups_meta):
            where = f"{bad}: group {i}"
            try:
                if not isinstance(gm, dict):
                    raise TypeError("not a JSON object")
                spec = GroupSpec(gm["name"], gm["size"], [Member(*m) for m in gm["members"]],
                                 gm.get("root"), gm.get("interleave", 1))
                for s in gm["signals"]:
                    if f"g{i}.{s}" not in tensors:
                        raise InvalidBookError(f"{where} ({gm['name']}) lists signal {s!r} but "
                                               f"the file has no tensor 'g{i}.{s}'{fix}")
                sig = {s: tensors[f"g{i}.{s}"] for s in gm["signals"]}
                kind, gmeta = gm.get("kind", "channel"), gm.get("meta", {})
                # Books written before a constraint existed: it followed from the unit kind then.
                cons = {"min_keep": int(gmeta.get("top_k", 1)) if kind == "expert" else 1,
                        "roundable": kind in ("channel", "neuron"), "frozen": False,
                        "tier": 1 if kind == "head" else 0}
                cons.update({k: gm[k] for k in cons if k in gm})
                for s in gm.get("tensors", []):
                    if f"g{i}.t.{s}" not in tensors:
                        raise InvalidBookError(f"{where} ({gm['name']}) lists statistic {s!r} "
                                               f"but the file has no tensor 'g{i}.t.{s}'{fix}")
                extra = {s: tensors[f"g{i}.t.{s}"] for s in gm.get("tensors", [])}
                groups.append(Group(gm["name"], gm["size"], sig, spec, kind, gmeta, **cons,
                                    tensors=extra))
            except InvalidBookError:
                raise
            except KeyError as exc:
                raise InvalidBookError(f"{where}: its header entry has no key {exc} (renamed or "
                                       f"removed){fix}") from None
            except (TypeError, ValueError, AttributeError) as exc:
                raise InvalidBookError(f"{where}: malformed header entry ({exc}){fix}") from None
        missing = [f"cost.{k}" for k in CostModel._FIELDS if f"cost.{k}" not in tensors]
        if missing:
            raise InvalidBookError(f"{bad}: the cost model tensors {missing} are missing{fix}")
        _check_cost_tensors(tensors, len(groups), f"{bad}: ", fix)
        book = cls(groups, CostModel.from_tensors(tensors), meta)
        try:
            book.validate()
        except InvalidBookError as exc:
            raise InvalidBookError(f"{path}: {exc}") from None
        return book

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


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_cost_tensors(t: Dict[str, Tensor], G: int, bad: str = "", fix: str = "") -> None:
    """The stored cost model's shapes, dtypes and index ranges (before it is ever evaluated)."""
    def fail(msg):
        raise InvalidBookError(f"{bad}cost model: {msg}{fix}")
    const, factor, is_mac, fsize = t["cost.const"], t["cost.factor"], t["cost.is_mac"], \
        t["cost.fsize"]
    c_factor, c_group, c_width = t["cost.c_factor"], t["cost.c_group"], t["cost.c_width"]
    T, F, C = const.numel(), fsize.numel(), c_factor.numel()
    if const.dim() != 1 or fsize.dim() != 1 or c_factor.dim() != 1:
        fail("const, fsize and c_factor must be 1-d")
    if tuple(factor.shape) != (T, 2) or tuple(is_mac.shape) != (T,):
        fail(f"factor must be [{T}, 2] and is_mac [{T}], got {tuple(factor.shape)} and "
             f"{tuple(is_mac.shape)}")
    if tuple(c_group.shape) != (C,) or tuple(c_width.shape) != (C,):
        fail(f"c_group and c_width must have {C} entries like c_factor")
    for name, x in (("factor", factor), ("c_factor", c_factor), ("c_group", c_group)):
        if x.dtype not in _INT_DTYPES:
            fail(f"{name} must be an integer tensor, got {x.dtype}")
    for name, x in (("const", const), ("fsize", fsize), ("c_width", c_width)):
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
            fail(f"{name} must be finite, non-negative floats")
    if T and (int(factor.min()) < -1 or int(factor.max()) >= F):
        fail(f"factor indexes dims outside [-1, {F})")
    if C and (int(c_factor.min()) < 0 or int(c_factor.max()) >= F):
        fail(f"c_factor indexes dims outside [0, {F})")
    if C and (int(c_group.min()) < 0 or int(c_group.max()) >= G):
        fail(f"c_group names groups outside [0, {G})")


def _check_costs(book: "ScoreBook") -> None:
    """A cost model (any object with ``evaluate``) that a target can trust: see validate()."""
    G = len(book.groups)
    room = torch.tensor([0 if g.frozen else g.size - g.min_keep for g in book.groups],
                        dtype=torch.int64)
    rows = torch.cat([torch.zeros((1, G), dtype=torch.int64),
                      torch.diag((room > 0).to(torch.int64)), room[None]])
    try:
        p, f = book.cost.evaluate(rows)
        p = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
        f = torch.as_tensor(f, dtype=torch.float64).reshape(-1)
    except InvalidBookError:
        raise
    except Exception as exc:
        raise InvalidBookError(f"the score book's cost model cannot be evaluated for its {G} "
                               f"groups ({type(exc).__name__}: {exc}); the book is corrupt: "
                               "rescore with fp.score") from None
    if p.numel() != rows.shape[0] or f.numel() != rows.shape[0]:
        raise InvalidBookError("the score book's cost model returns the wrong number of values; "
                               "rescore with fp.score")
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(f).all())):
        raise InvalidBookError("the score book's cost model gives NaN/inf parameter or MAC "
                               "counts; the book is corrupt: rescore with fp.score")
    if float(p[0]) <= 0:
        raise InvalidBookError(
            f"the score book's cost model counts {float(p[0]):g} parameters for the unpruned "
            "model (zeroed or corrupt), so every params= target would be met by maximal pruning; "
            "rescore with fp.score")
    if float(f[0]) < 0:
        raise InvalidBookError(f"the score book's cost model counts {float(f[0]):g} MACs for the "
                               "unpruned model; rescore with fp.score")
    tol = 1e-9 * (abs(float(p[0])) + abs(float(f[0])) + 1.0)
    if bool((p[1:] > p[0] + tol).any()) or bool((f[1:] > f[0] + tol).any()) \
            or bool((p < -tol).any()) or bool((f < -tol).any()):
        raise InvalidBookError(
            "the score book's cost model is inconsistent: removing units raises the parameter or "
            "MAC count, or drives it below zero; the book is corrupt: rescore with fp.score")


def _check_macs(book: "ScoreBook") -> None:
    _, f = book.cost.evaluate(torch.zeros(len(book.groups), dtype=torch.int64))
    if not float(f) > 0:
        raise InvalidBookError("flops= needs the book's MAC counts, but its cost model counts no "
                               "MACs (0 for the unpruned model); use params= or units=")


def _tmp_tag() -> str:
    """This host's short tag in temporary names (a pid is only meaningful on its own host)."""
    import socket
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_orphans(d: str, base: str, tag: str) -> None:
    """Delete ``.tmp-<tag>-<pid>-*<base>`` files in ``d`` left by a save of ``base`` whose
    process died before it could clean up (SIGKILL, power loss): never a live process's."""
    prefix = f".tmp-{tag}-"
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(base)):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass


class _Terminated(BaseException):
    """SIGTERM / SIGHUP arrived while a file was being written (re-raised as the signal after
    the temporary file is removed)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the usual mode of a new file, ``0o666 & ~umask`` (``mkstemp`` creates the
    temporary file 0600), so every file the package writes through here is readable as if
    ``open(path, "w")`` had made it.

    No temporary file outlives a failed write: any exception (KeyboardInterrupt included)
    removes it; so does SIGTERM / SIGHUP (on the main thread, where their default action is
    set), after which the signal is re-delivered. A process killed outright (SIGKILL) cannot
    clean up; its orphan ``.tmp-*`` file is removed by the next save of the same path.
    """
    import signal as _signal
    import threading

    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    base = os.path.basename(path)[-100:]
    tag = _tmp_tag()
    _remove_orphans(d, "-" + base, tag)
    old = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            raise _Terminated(signum)
        for sig in (_signal.SIGTERM, getattr(_signal, "SIGHUP", None)):
            if sig is not None and _signal.getsignal(sig) == _signal.SIG_DFL:
                try:
                    old[sig] = _signal.signal(sig, on_signal)
                except (ValueError, OSError):
                    pass
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{tag}-{os.getpid()}-", suffix="-" + base,
                                   dir=d)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, _Terminated):
            for sig, h in old.items():
                _signal.signal(sig, h)
            old = {}
            os.kill(os.getpid(), exc.signum)     # die of the signal, as without the handler
        raise
    finally:
        for sig, h in old.items():
            _signal.signal(sig, h)
