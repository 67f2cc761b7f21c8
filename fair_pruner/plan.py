"""Allocation: score book -> :class:`Plan` (which units of which group to remove).

``strategy="tod"`` gives each group its own depth from one shared tolerance α (FAIR-Pruner);
``strategy="uniform"`` removes the same fraction of every group (the ablation baseline);
``strategy="global"`` ranks every unit of the model on its removal signal and removes the lowest
ones, one threshold for all groups (FLAP's adaptive structure search, An et al. 2024, with its
standardised ``flap`` signal). A target
(``params=``, ``flops=`` or ``units=``, fractions of the whole model removed) is met by searching
α (or the uniform fraction) over the exact breakpoints of the step function it drives, without
rescoring: the plan reports the α found and the reduction actually reached (docs/method.md,
"Targets"). Allocation reads only the book: each group's signals and constraints (``min_keep``,
``roundable``, ``frozen``) and the exact cost model; it knows nothing about model kinds.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .errors import BookMismatchError, FairPrunerError, InvalidPlanError, TargetError
from .ops import check_cap, is_real as _is_real
from .scorebook import ScoreBook, atomic_write, model_fingerprint
from .tod import ToDCurves, m_hat_capped


STRATEGIES = ("tod", "uniform", "global")


def _is_int(x) -> bool:
    """An int (Python or NumPy / torch integer scalar), never a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class Plan:
    """Units to remove per group, with the tolerance and the reductions they give."""
    alpha: Optional[float]
    strategy: str
    removed: Dict[str, List[int]]
    sizes: Dict[str, int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    signal: str = "u"
    protect: str = "r"
    target: Optional[Dict[str, float]] = None
    cap: float = 0.99
    round_to: int = 1
    fingerprint: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidPlanError` unless the plan keeps its own invariants: ``sizes``
        maps group names to ints >= 1, ``removed`` names only those groups and lists, per group,
        distinct int unit indices in [0, size) leaving at least one unit. (Surgery would
        otherwise wrap ``-1`` to the last unit, remove a repeated index's neighbours or leave
        a zero-channel layer.) Runs on construction, on load and in :meth:`check`."""
        if not isinstance(self.sizes, dict) or not isinstance(self.removed, dict):
            raise InvalidPlanError("plan.sizes and plan.removed must be dicts keyed by group "
                                   "name; make plans with fp.allocate(book, ...)")
        for g, n in self.sizes.items():
            if not isinstance(g, str) or not _is_int(n) or n < 1:
                raise InvalidPlanError(f"plan.sizes[{g!r}] = {n!r}: a group size must be an int "
                                       ">= 1; re-allocate the plan with fp.allocate(book, ...)")
        extra = [g for g in self.removed if g not in self.sizes]
        if extra:
            raise InvalidPlanError(f"plan.removed names groups {extra[:5]} that plan.sizes does "
                                   "not; every group of a plan needs its size")
        for g, idxs in self.removed.items():
            n = self.sizes[g]
            if not isinstance(idxs, (list, tuple)):
                raise InvalidPlanError(f"plan.removed[{g!r}] must be a list of unit indices, got "
                                       f"{type(idxs).__name__}")
            bad = [i for i in idxs if not _is_int(i) or not 0 <= i < n]
            if bad:
                raise InvalidPlanError(
                    f"plan.removed[{g!r}] has unit indices {bad[:5]} outside [0, {n}) (indices "
                    "are ints from 0; no negative indices). Fix the plan or re-allocate it with "
                    "fp.allocate(book, ...)")
            if len(set(idxs)) != len(idxs):
                dup = sorted({i for i in idxs if list(idxs).count(i) > 1})
                raise InvalidPlanError(f"plan.removed[{g!r}] repeats unit indices {dup[:5]}; "
                                       "list each unit to remove once")
            if len(idxs) > n - 1:
                raise InvalidPlanError(
                    f"the plan removes every unit of {g} ({len(idxs)} of {n}); a layer must "
                    "keep at least one. Remove fewer (fp.allocate's cap < 1 always keeps one)")
        for k in ("params_before", "params_after", "flops_before", "flops_after"):
            v = getattr(self, k)
            if not _is_int(v) or v < 0:
                raise InvalidPlanError(f"plan.{k} = {v!r} must be an int >= 0")
        if self.alpha is not None and not (_is_real(self.alpha) and math.isfinite(self.alpha)):
            raise InvalidPlanError(f"plan.alpha = {self.alpha!r} must be a finite number or None")

    def check_book(self, book, model=None) -> None:
        """Raise unless ``book`` is the score book this plan was allocated from (same model
        fingerprint, every planned group in it with the same size, no unit beyond its
        ``min_keep``), and, with ``model``, the book was scored on ``model``."""
        if not isinstance(book, ScoreBook):
            raise FairPrunerError(f"expected the fair_pruner.ScoreBook the plan came from, got "
                                  f"{type(book).__name__}")
        if model is not None and book.fingerprint:
            book.check_model(model)
        if self.fingerprint and book.fingerprint and self.fingerprint != book.fingerprint:
            raise BookMismatchError(
                f"this score book (fingerprint {book.fingerprint}) is not the one the plan was "
                f"allocated from (plan fingerprint {self.fingerprint}); pass the plan's own book")
        groups = {g.name: g for g in book.groups}
        for name, n in self.sizes.items():
            g = groups.get(name)
            if g is None or g.size != n:
                raise BookMismatchError(
                    f"plan group {name!r} ({n} units) is "
                    f"{'not in' if g is None else f'{g.size} units in'} this score book; pass "
                    "the book the plan was allocated from")
            k = len(self.removed.get(name, []))
            if k > g.size - (g.size if g.frozen else g.min_keep):
                raise InvalidPlanError(
                    f"plan removes {k} of {g.size} units of {name}, which must keep "
                    f"{g.size if g.frozen else g.min_keep}; re-allocate with fp.allocate")

    @property
    def kept(self) -> Dict[str, int]:
        return {g: n - len(self.removed.get(g, [])) for g, n in self.sizes.items()}

    @property
    def ratios(self) -> Dict[str, float]:
        """Kept fraction per group."""
        return {g: k / self.sizes[g] for g, k in self.kept.items()}

    @property
    def params_reduction(self) -> float:
        # (before - after) / before, not 1 - after / before: exact for exact fractions
        return (self.params_before - self.params_after) / max(1, self.params_before)

    @property
    def flops_reduction(self) -> float:
        return (self.flops_before - self.flops_after) / max(1, self.flops_before)

    @property
    def units_reduction(self) -> float:
        total = sum(self.sizes.values())
        return sum(len(v) for v in self.removed.values()) / max(1, total)

    def table(self) -> str:
        """A readable per-group table: units before/after and kept ratio, then totals."""
        w = max([len(g) for g in self.sizes] + [5])
        lines = [f"{'group':<{w}}  {'units':>6}  {'kept':>6}  {'ratio':>6}"]
        for g, n in self.sizes.items():
            k = self.kept[g]
            lines.append(f"{g:<{w}}  {n:>6}  {k:>6}  {k / n:>6.2f}")
        a = "-" if self.alpha is None else f"{self.alpha:.4g}"
        lines.append(f"strategy={self.strategy} alpha={a} signal={self.signal} "
                     f"units removed {self.units_reduction:.1%}")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} "
                     f"(-{self.params_reduction:.1%}); MACs {self.flops_before:,} -> "
                     f"{self.flops_after:,} (-{self.flops_reduction:.1%})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        a = "-" if self.alpha is None else f"{self.alpha:.4g}"
        return (f"Plan(strategy={self.strategy}, alpha={a}, params -{self.params_reduction:.1%}, "
                f"MACs -{self.flops_reduction:.1%}, units -{self.units_reduction:.1%})")

    @staticmethod
    def check(plan, model, book=None) -> None:
        """Raise unless ``plan`` is a valid :class:`Plan` (its own invariants, see
        :meth:`validate`; it may have been edited since it was made) made from ``model``'s
        score book; with ``book``, also unless ``book`` is that score book, scored on
        ``model`` (:meth:`check_book`). Surgery calls it before changing anything."""
        if not isinstance(plan, Plan):
            raise FairPrunerError(f"expected a fair_pruner.Plan, got {type(plan).__name__}; "
                                  "make one with fp.allocate(book, ...)")
        plan.validate()
        if book is not None:
            plan.check_book(book, model)
        fp = model_fingerprint(model)
        if plan.fingerprint and fp != plan.fingerprint:
            raise BookMismatchError(
                f"this plan was made from another model's score book (plan fingerprint "
                f"{plan.fingerprint}, model {fp}); score this model with fp.score first")

    def save(self, path) -> None:
        """Write the plan as JSON to ``path``, atomically, mode ``0o666 & ~umask``."""
        text = json.dumps(asdict(self), indent=1)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)
        atomic_write(path, write)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan written by :meth:`save`; a missing, unreadable or malformed file, or a
        plan breaking its invariants, is an :class:`InvalidPlanError`."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise InvalidPlanError(f"no plan file at {path}: write one with plan.save(path) "
                                   "(or fair-pruner allocate --out)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidPlanError(f"{path} is not a fair_pruner plan (not readable JSON: "
                                   f"{exc}); give a file written by plan.save") from None
        if not isinstance(data, dict):
            raise InvalidPlanError(f"{path} is not a fair_pruner plan (JSON "
                                   f"{type(data).__name__}, not an object); give a file written "
                                   "by plan.save")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING}
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise InvalidPlanError(
                f"{path} is not a fair_pruner plan: "
                + "; ".join(([f"missing keys {missing}"] if missing else [])
                            + ([f"unknown keys {unknown}"] if unknown else []))
                + ". Give a file written by plan.save (or re-allocate from the score book)")
        try:
            return cls(**data)
        except InvalidPlanError as exc:
            raise InvalidPlanError(f"{path}: {exc}") from None
        except (TypeError, AttributeError) as exc:
            raise InvalidPlanError(f"{path} is not a valid fair_pruner plan ({exc}); give a "
                                   "file written by plan.save") from None

    def plot(self, path, title: Optional[str] = None) -> None:
        """Write a PNG bar chart of the kept ratio per group to ``path``, atomically, mode
        ``0o666 & ~umask``. Draws on its own figure (not through pyplot), so the caller's
        matplotlib backend and open figures are left alone."""
        from matplotlib.figure import Figure

        names = list(self.sizes)
        fig = Figure(figsize=(max(6, 0.35 * len(names) + 2), 4))
        ax = fig.subplots()
        ax.bar(range(len(names)), [self.ratios[n] for n in names], color="#3b75af")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept ratio")
        ax.set_title(title or f"{self.strategy}: params -{self.params_reduction:.1%}")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def allocate(book: ScoreBook, tod: Optional[float] = None, *, params: Optional[float] = None,
             flops: Optional[float] = None, units: Optional[float] = None,
             experts: Optional[float] = None, strategy: str = "tod", round_to: int = 1,
             cap: float = 0.99, signal: Optional[str] = None, protect: Optional[str] = None,
             tiers: bool = True) -> Plan:
    """Choose the units to remove.

    Args:
        book: a :class:`ScoreBook` from :func:`fair_pruner.score` (or loaded from disk).
        tod: the shared tolerance α in [0, 1] (default 0.05 when no target is given).
        params, flops, units: instead of ``tod``, a fraction in (0, 1) of the model's
            parameters / MACs / prunable units to remove; α is searched to reach it.
        strategy: ``"tod"``, ``"uniform"`` (same fraction per group; needs a target) or
            ``"global"`` (one threshold on the removal signal over all groups, as FLAP does
            with its ``flap`` signal, which is standardised per layer; needs a target; the
            signal must be comparable across groups).
        round_to: keep a multiple of this many units per group (rounded up; never 0).
        cap: at most floor(cap * n) units of a group are removed.
        signal / protect: names of the removal and protection signals in the book, for every
            group. Default: each group's own recommendation (``group.meta["default_signal"]`` /
            ``["default_protect"]``, set by the adapter that scored it, e.g. ``fluctuation`` /
            ``u`` for LLM neurons and heads), else ``"u"`` / ``"r"`` (the paper's U- and R-Scores).
        tiers: with a ToD target, meet it with the lowest ``Group.tier`` that can reach it
            (LLM attention heads are tier 1: cut only when the MLP neurons cannot reach the
            target; see docs/method.md). ``tiers=False``: one α over every group at once.
        experts: a fraction in (0, 1) of the routed MoE experts to remove, exactly, model-wide
            (ToD picks the per-layer counts, each layer keeps >= top_k; see
            :func:`fair_pruner.llm.moe.allocate_experts`). Dense groups of the book are pruned
            at ``tod`` if given, else kept.
    """
    # Every argument is checked before any branch (the experts= path included) and before any
    # work: a bad cap would otherwise reach the native kernels.
    if not isinstance(book, ScoreBook):
        raise FairPrunerError(f"allocate needs a fair_pruner.ScoreBook, got {type(book).__name__}"
                              "; make one with fp.score(model, loader) or fp.ScoreBook.load(path)")
    targets = {k: v for k, v in (("params", params), ("flops", flops), ("units", units))
               if v is not None}
    if experts is not None and targets:
        raise TargetError("experts= cannot be combined with params=/flops=/units=; give "
                          "tod= for the dense groups instead")
    if len(targets) > 1:
        raise TargetError(f"give at most one target, got {sorted(targets)}")
    if targets and tod is not None:
        raise TargetError("give either tod= or a target (params=/flops=/units=), not both")
    if tod is not None:
        if not (_is_real(tod) and 0.0 <= float(tod) <= 1.0):
            raise TargetError(f"tod (the tolerance of difference) must be a number in [0, 1], got "
                              f"{tod!r}" + (" (a bool is not a tolerance: tod=1.0 removes the "
                                            "most)" if isinstance(tod, bool) or
                                            type(tod).__name__ == "bool_" else ""))
        tod = float(tod)
    for k, v in targets.items():
        if not (_is_real(v) and 0.0 < float(v) < 1.0):
            raise TargetError(f"{k}= is the fraction to remove and must be a number in (0, 1), "
                              f"got {v!r}")
        targets[k] = float(v)
    if experts is not None:
        if not (_is_real(experts) and 0.0 < float(experts) < 1.0):
            raise TargetError(f"experts= is the fraction of routed experts to remove and must be "
                              f"a number in (0, 1), got {experts!r}")
        experts = float(experts)
    if not (isinstance(strategy, str) and strategy in STRATEGIES):
        raise TargetError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if experts is not None and strategy not in ("tod", "uniform"):
        raise TargetError(f"with experts=, strategy must be 'tod' or 'uniform', got {strategy!r}")
    if experts is None and strategy != "tod" and not targets:
        raise TargetError(f"strategy={strategy!r} needs a target: params=, flops= or units=")
    if not (_is_int(round_to) and round_to >= 1):
        raise TargetError(f"round_to must be an int >= 1, got {round_to!r}")
    round_to = int(round_to)
    if not (_is_real(cap) and 0.0 < float(cap) < 1.0):
        raise TargetError(f"cap (the largest fraction of a group one round may remove) must be a "
                          f"number in (0, 1), got {cap!r}")
    cap = check_cap(cap)
    if not book.groups:
        raise FairPrunerError("the score book has no groups")
    sig_of = _resolve_signals(book, signal, protect)
    book.validate(need_macs="flops" in targets, structure=False)
    if experts is not None:
        return _allocate_experts(book, experts, strategy=strategy, cap=cap, sig_of=sig_of,
                                 tod=tod)
    if tod is None and not targets:
        tod = 0.05
    for g in book.groups:
        for s in sig_of[g.name]:
            if s not in g.signals:
                raise FairPrunerError(f"signal {s!r} is not in this score book for group "
                                      f"{g.name} (it has {sorted(g.signals)}); add it with "
                                      "book.set_signal()")

    sizes = torch.tensor([g.size for g in book.groups], dtype=torch.int64)
    # Each group carries its own constraints (see Group): round_to only for widths, a floor of
    # kept units, frozen groups never pruned.
    roundable = torch.tensor([g.roundable for g in book.groups])
    min_keep = torch.tensor([g.size if g.frozen else g.min_keep for g in book.groups],
                            dtype=torch.int64)
    base_p, base_f = book.cost.evaluate(torch.zeros_like(sizes))
    total_units = int(sizes.sum())

    def rounded(m: Tensor, floor: Tensor = min_keep) -> Tensor:
        kept = sizes - m
        if round_to > 1:
            up = torch.minimum(sizes, (kept + round_to - 1) // round_to * round_to)
            kept = torch.where(roundable, up, kept)
        return sizes - torch.maximum(kept, floor)

    def reduction(m: Tensor, which: str) -> Tensor:
        if which == "units":
            return m.sum(-1).double() / total_units
        p, f = book.cost.evaluate(m)
        return (base_p - p) / base_p if which == "params" else (base_f - f) / base_f

    opened = None
    cap_m = torch.floor(cap * sizes.double()).to(torch.int64)
    if strategy == "tod":
        curves = ToDCurves([g.signals[sig_of[g.name][0]] for g in book.groups],
                           [g.signals[sig_of[g.name][1]] for g in book.groups], cap)
        counts_at: Callable = lambda a: rounded(curves.m_hat(a))
        if targets:
            # Tiers (docs/method.md, "Targets"): a target is met with the lowest tiers that can
            # reach it; a higher tier (e.g. attention heads) is cut only when the budget needs it.
            tier = torch.tensor([g.tier for g in book.groups], dtype=torch.int64)
            levels = sorted(set(tier.tolist())) if tiers else [int(tier.max())]
            which, goal = next(iter(targets.items()))
            for t in levels:
                shut = tier > t
                floor = torch.where(shut, sizes, min_keep)
                counts_at = lambda a, floor=floor: rounded(curves.m_hat(a), floor)
                cands = curves.breakpoints(~shut)
                if t == levels[-1] or float(reduction(counts_at(float(cands[-1])), which)) \
                        + 1e-12 >= goal:
                    opened = t
                    break
            alpha = _search(cands, counts_at, reduction, targets)
        else:
            alpha = float(tod)
    elif strategy == "global":
        zs = [torch.sort(g.signals[sig_of[g.name][0]].double()).values for g in book.groups]
        counts_at = lambda t: rounded(torch.minimum(torch.stack([
            torch.searchsorted(v, torch.tensor([float(t)], dtype=torch.float64),
                               right=True)[0] for v in zs]), cap_m))
        cands = torch.unique(torch.cat([torch.tensor([-math.inf], dtype=torch.float64)] + zs))
        alpha_f = _search(cands, counts_at, reduction, targets)
        alpha = None
    else:
        counts_at = lambda f: rounded(torch.minimum(
            torch.floor(torch.as_tensor(f, dtype=torch.float64) * sizes.double()).to(torch.int64),
            cap_m))
        fr = sorted({0.0} | {k / int(n) for n in sizes.tolist() for k in range(1, int(n) + 1)
                             if k <= int(cap * n)})
        alpha_f = _search(torch.tensor(fr, dtype=torch.float64), counts_at, reduction, targets)
        alpha = None
    m = counts_at(alpha if strategy == "tod" else alpha_f)

    removed = {}
    for g, k in zip(book.groups, m.tolist()):
        removed[g.name] = _lowest(g, sig_of[g.name][0], k)
    return _make_plan(book, removed, alpha=alpha, strategy=strategy,
                      **_signal_fields(book, sig_of), target=targets or None, cap=cap,
                      round_to=round_to,
                      meta={"uniform_fraction": float(alpha_f) if strategy == "uniform"
                            else None,
                            "global_threshold": float(alpha_f) if strategy == "global" else None,
                            "tiers_opened": opened})


def _resolve_signals(book: ScoreBook, signal: Optional[str], protect: Optional[str]):
    """Group name -> (removal, protection) signal names: the caller's, else the group's
    recommendation, else the book's, else U / R."""
    out = {}
    for g in book.groups:
        out[g.name] = (signal or g.meta.get("default_signal")
                       or book.meta.get("default_signal") or "u",
                       protect or g.meta.get("default_protect")
                       or book.meta.get("default_protect") or "r")
    return out


def _signal_fields(book: ScoreBook, sig_of) -> Dict[str, Any]:
    """Plan.signal / Plan.protect: the name, or ``a|b`` when groups use different ones (each
    group's own follow from its ``meta["default_signal"]``)."""
    names = [sorted({sig_of[g.name][i] for g in book.groups}) for i in (0, 1)]
    return {"signal": "|".join(names[0]), "protect": "|".join(names[1])}


def _lowest(g, signal: str, k: int) -> List[int]:
    """The ``k`` units of group ``g`` with the lowest removal signal (ties by index), sorted."""
    return sorted(torch.argsort(g.signals[signal], stable=True)[:k].tolist())


def _make_plan(book: ScoreBook, removed: Dict[str, List[int]], *, meta: Dict[str, Any],
               **fields) -> Plan:
    """A :class:`Plan` for ``removed`` with the exact costs of the book's cost model."""
    removed = {g.name: removed.get(g.name, []) for g in book.groups}
    mvec = torch.tensor([len(removed[g.name]) for g in book.groups], dtype=torch.int64)
    base_p, base_f = book.cost.evaluate(torch.zeros_like(mvec))
    p_after, f_after = book.cost.evaluate(mvec)
    full_meta = {"input_spec": book.meta.get("input_spec"), "kind": book.meta.get("kind"),
                 "ignored": book.meta.get("ignored", [])}
    roots = {g.name: g.spec.root for g in book.groups if g.spec.root not in (None, g.name)}
    if roots:              # groups named "root+N" (several producers): the module to prune from
        full_meta["roots"] = roots
    interleave = {g.name: g.spec.interleave for g in book.groups if g.spec.interleave != 1}
    if interleave:         # channels per unit (grouped convolutions): surgery expands units
        full_meta["interleave"] = interleave
    full_meta.update(meta)
    return Plan(removed=removed, sizes={g.name: g.size for g in book.groups},
                params_before=int(round(float(base_p))), params_after=int(round(float(p_after))),
                flops_before=int(round(float(base_f))), flops_after=int(round(float(f_after))),
                fingerprint=book.fingerprint, meta=full_meta, **fields)


def _search(cands: Tensor, counts_at, reduction, targets) -> float:
    """Smallest candidate whose reduction reaches the target (binary search; monotone)."""
    (which, goal), = targets.items()
    top = float(cands[-1])
    best = float(reduction(counts_at(top), which))
    if best + 1e-12 < goal:
        raise TargetError(
            f"{which}={goal:.4g} cannot be reached: at most {best:.4f} of the {which} can be "
            f"removed in one round with cap and round_to as given. Lower the target, raise cap, "
            "or prune in several rounds (score -> prune -> fine-tune)")
    lo, hi = 0, cands.numel() - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if float(reduction(counts_at(float(cands[mid])), which)) + 1e-12 >= goal:
            hi = mid
        else:
            lo = mid + 1
    return float(cands[lo])


def _allocate_experts(book: ScoreBook, fraction: float, *, strategy: str = "tod",
                      cap: float = 0.99, sig_of: Dict[str, Any],
                      tod: Optional[float] = None) -> Plan:
    """:func:`allocate` with ``experts=fraction``: an exact count of units over the expert groups.

    Removes exactly ``round(fraction * E_total)`` units over all groups whose units are routed
    experts (``kind == "expert"``). ToD (one shared α, each group capped at ``n - min_keep`` and
    ``floor(cap * n)``) picks the per-group counts: α is the smallest tolerance at which ToD
    removes at least the budget; any surplus from groups that jumped at that α is trimmed one
    unit at a time, dropping the marginal unit with the highest U relative to its group's mean U
    (ties, e.g. never-routed experts with U = 0: the group that loses the largest fraction, then
    the later group). ``strategy="uniform"`` removes the same count from every group (the
    remainder, if the budget does not divide, goes one each to the groups whose next unit has the
    lowest relative U). Other groups are pruned at ``tod`` if given, else left intact.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
        raise TargetError(f"experts= is the fraction of routed experts to remove and must lie in "
                          f"(0, 1), got {fraction!r}")
    if strategy not in ("tod", "uniform"):
        raise TargetError(f"strategy must be 'tod' or 'uniform', got {strategy!r}")
    egroups = [g for g in book.groups if g.kind == "expert" and not g.frozen]
    if not egroups:
        raise TargetError("experts= needs routed-expert groups in the score book; this book has "
                          "none (score an MoE model with fp.score)")
    for g in egroups:
        for s in sig_of[g.name] if strategy == "tod" else sig_of[g.name][:1]:
            if s not in g.signals:
                raise FairPrunerError(f"signal {s!r} is missing for expert group {g.name} (it "
                                      f"has {sorted(g.signals)}); add it with book.set_signal()")
    sizes = [g.size for g in egroups]
    floor = [g.min_keep for g in egroups]
    cap_m = [max(0, min(int(math.floor(cap * n)), n - k)) for n, k in zip(sizes, floor)]
    total = sum(sizes)
    budget = int(round(fraction * total))
    if budget < 1:
        raise TargetError(f"experts={fraction} of {total} routed experts rounds to 0; raise it")
    if budget > sum(cap_m):
        raise TargetError(
            f"experts={fraction} asks for {budget} of {total} routed experts, but at most "
            f"{sum(cap_m)} can go while every layer keeps >= top_k experts (top_k per layer "
            f"{sorted(set(floor))}, cap={cap}). Lower the target")
    u = [g.signals[sig_of[g.name][0]].double() for g in egroups]
    rel = [x / x.mean() if float(x.mean()) > 0 else torch.zeros_like(x) for x in u]
    order = [torch.argsort(x, stable=True) for x in u]

    def marginal(gi: int, pos: int) -> float:
        return float(rel[gi][order[gi][pos]])

    alpha = None
    G = len(egroups)
    if strategy == "tod":
        curves = ToDCurves(u, [g.signals[sig_of[g.name][1]] for g in egroups], cap)
        overlaps = [curves.curve(i) for i in range(G)]
        cands = sorted({0.0} | {float(overlaps[i][m]) / m for i in range(G)
                                for m in range(1, cap_m[i] + 1)})
        counts_at = lambda a: [m_hat_capped(overlaps[i], cap_m[i], a) for i in range(G)]
        lo, hi = 0, len(cands) - 1                       # smallest α reaching the budget
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(counts_at(cands[mid])) >= budget:
                hi = mid
            else:
                lo = mid + 1
        alpha = cands[lo]
        m = counts_at(alpha)
        below = counts_at(cands[lo - 1]) if lo > 0 else [0] * G
        moved = 0
        while sum(m) > budget:          # trim the surplus among groups that jumped at α
            cand = [i for i in range(G) if m[i] > below[i]]
            i = max(cand, key=lambda i: (marginal(i, m[i] - 1), m[i] / sizes[i], i))
            m[i] -= 1
            moved += 1
        adjust = {"trimmed": moved, "topped_up": 0}
    else:
        m = [min(budget // G, c) for c in cap_m]
        moved = 0
        while sum(m) < budget:          # remainder / capped groups: lowest relative U first
            cand = [i for i in range(G) if m[i] < cap_m[i]]
            i = min(cand, key=lambda i: (marginal(i, m[i]), m[i] / sizes[i], i))
            m[i] += 1
            moved += 1
        adjust = {"trimmed": 0, "topped_up": moved}

    removed: Dict[str, List[int]] = {g.name: sorted(order[i][: m[i]].tolist())
                                     for i, g in enumerate(egroups)}
    dense_alpha = None
    others = [g for g in book.groups if g.name not in removed and not g.frozen]
    if others and tod is not None:
        dcurves = ToDCurves([g.signals[sig_of[g.name][0]] for g in others],
                            [g.signals[sig_of[g.name][1]] for g in others], cap)
        for g, k in zip(others, dcurves.m_hat(float(tod)).tolist()):
            removed[g.name] = _lowest(g, sig_of[g.name][0], min(k, g.size - g.min_keep))
        dense_alpha = float(tod)
    kept = {g.name: g.size - len(removed[g.name]) for g in egroups}
    return _make_plan(
        book, removed, alpha=alpha, strategy=strategy, **_signal_fields(book, sig_of),
        target={"experts": float(fraction)}, cap=cap, round_to=1,
        meta={"uniform_fraction": None,
              "experts": {"budget": budget, "total": total, "fraction_reached": budget / total,
                          "kept_per_layer": kept,
                          "min_kept_per_layer": {g.name: k for g, k in zip(egroups, floor)},
                          "bound": "every MoE layer keeps >= top_k experts "
                                   f"(top_k={sorted(set(floor))}) and at most "
                                   f"floor(cap * n) are removed (cap={cap})",
                          "budget_adjust": adjust, "dense_tod": dense_alpha}})
