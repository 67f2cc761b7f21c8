"""Weight reconstruction of LLM consumers (``down_proj`` for MLP neurons, ``o_proj`` for heads).

The update itself is :func:`fair_pruner.reconstruct.update` (``"bias"``, ``"lstsq"``,
``"affine"``; docs/method.md, "Reconstruction"). A consumer without a bias (Llama's
``down_proj``/``o_proj``) gets one: the pruned model records the module names in
``config.fair_pruner["biases"]`` so :func:`fair_pruner.from_pretrained` rebuilds them, and
``generate()`` works as before.

Exactness: :func:`fair_pruner.llm.prune` and :func:`~fair_pruner.llm.mask` apply the same update
before slicing / zeroing, so a reconstructed pruned model equals its masked reference.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import FairPrunerError
from ..reconstruct import METHODS, NEEDS_GRAM, lstsq_update, resolve, set_bias, update
from .layout import UnitFamily, is_conv1d, weight_oi

__all__ = ["METHODS", "default_method", "resolve_method", "reconstruct", "update",
           "lstsq_update", "check_expert_merge", "merge_removed_experts"]


def default_method(book) -> Optional[str]:
    """``"affine"`` for a book scored with reconstruction statistics (``"lstsq"`` for such a book
    from before token counts were stored), else ``"bias"`` when the book has channel means
    (every LLM book from this version), else None."""
    if book is None:
        return None
    dense = [g for g in book.groups if g.kind != "expert"]
    if book.meta.get("reconstruction_stats"):
        return "affine" if all("tokens" in g.meta for g in dense) else "lstsq"
    if dense and all("mean" in g.tensors for g in dense):
        return "bias"
    return None


def resolve_method(reconstruct: Optional[str], book, plan) -> Optional[str]:
    """:func:`fair_pruner.reconstruct.resolve` with this adapter's default, plus the check that
    the book has the channel means every method reads."""
    method = resolve(reconstruct, book, plan, default_method(book), NEEDS_GRAM,
                     hint="or use reconstruct='bias' (needs only the channel means)")
    missing = [g.name for g in book.groups if g.kind != "expert" and "mean" not in g.tensors] \
        if method is not None else []
    if missing:
        raise FairPrunerError(
            f"reconstruct={method!r}: group {missing[0]} has no channel means (a book from an "
            "older fair_pruner): rescore with fp.score")
    return method


def reconstruct(model: nn.Module, fams: Dict[str, UnitFamily], removed: Dict[str, list],
                book, method: Optional[str], damp: float = 1e-2) -> List[str]:
    """Apply ``method`` in place to the consumer of every group in ``fams`` that loses units.

    Returns the consumer modules that gained a bias parameter.
    """
    added: List[str] = []
    if method is None:
        return added
    warned = False
    for name, fam in fams.items():
        if not removed.get(name):
            continue
        g = book.group(name)
        if g.kind == "expert":        # experts feed the residual stream: no consumer projection
            continue
        cons = model.get_submodule(fam.tap)
        ch = fam.removed_channels(removed[name])
        W = weight_oi(cons)
        gram = g.tensors.get("gram")
        if gram is not None and tuple(gram.shape) != (W.shape[1],) * 2 or \
                g.tensors["mean"].numel() != W.shape[1]:
            raise FairPrunerError(f"{name}: the book's statistics cover "
                                  f"{g.tensors['mean'].numel()} channels but {fam.tap} takes "
                                  f"{W.shape[1]} inputs; wrong book")
        tokens = int(g.meta.get("tokens", 0))
        if method in NEEDS_GRAM and tokens <= W.shape[1] - len(ch) and not warned:
            warnings.warn(f"fair_pruner: {tokens} calibration tokens for {W.shape[1]} input "
                          f"channels of {fam.tap}: the least-squares system is rank-deficient "
                          "and only the ridge damping makes it solvable; calibrate on more tokens")
            warned = True
        b = cons.bias.detach().cpu() if cons.bias is not None else None
        newW, newb = update(W.detach().cpu(), b, ch, method, mean=g.tensors["mean"], gram=gram,
                            tokens=tokens, damp=damp, what=fam.tap)
        with torch.no_grad():
            cons.weight.copy_((newW.T if is_conv1d(cons) else newW).to(cons.weight.device))
        if newb is not None and set_bias(cons, newb) and fam.tap not in added:
            added.append(fam.tap)
    return added


def check_expert_merge(fams: Dict[str, UnitFamily], plan, book) -> List[str]:
    """The expert groups ``expert_merge=True`` merges, checked before anything changes: a book
    (the plan's) with routing co-choice statistics for each of them."""
    names = [n for n, f in fams.items() if plan.removed.get(n) and f.kind == "expert"]
    if not names:
        return []
    if book is None:
        raise FairPrunerError("expert_merge=True needs the score book the plan came from: "
                              "fp.prune(model, plan, book=book, expert_merge=True)")
    if book.fingerprint and plan.fingerprint and book.fingerprint != plan.fingerprint:
        from ..errors import BookMismatchError
        raise BookMismatchError("expert_merge needs the score book this plan was made from; "
                                "this book belongs to another model")
    for n in names:
        g = book.group(n)
        if "cochoice" not in g.tensors or "freq" not in g.signals:
            raise FairPrunerError(
                f"{n}: expert merging needs the routing co-choice statistics fp.score records "
                "where it sees the router's logits; this book has none (an older book, or an "
                "MoE layout whose router output it does not see): rescore, or prune without "
                "expert_merge")
    return names


def merge_removed_experts(model: nn.Module, fams: Dict[str, UnitFamily], names: List[str],
                          removed: Dict[str, list], book) -> Dict[str, Dict[int, int]]:
    """Merge every removed expert of ``names`` into the kept expert that takes its tokens over
    (:func:`fair_pruner.llm.moe.merge_experts`), in place. Returns {group: {removed: target}}."""
    return {n: fams[n].merge_removed(model, removed[n], book.group(n)) for n in names}
