"""Weight reconstruction after removal: update each consumer's kept input columns.

A group's units reach the rest of the model through one consumer projection (``down_proj`` for
MLP neurons, ``o_proj`` for heads), y = W x with x the consumer's input channels. Removing the
channels R of x leaves y ≈ W_K x_K. With the calibration Gram matrix G = Σ x xᵀ (collected by
``fp.score(..., reconstruction=True)``), the kept columns that reproduce y best in least squares
over the calibration tokens are the closed form

    W_K' = W_K + W_R G_RK (G_KK + λ I)⁻¹,      λ = damp · mean(diag G_KK)

(the OBS / "numerical pruning" update: the removed channels' contribution is carried by their
linear prediction from the kept ones). λ keeps a rank-deficient G_KK (fewer tokens than channels,
dead channels) solvable; the solve is a Cholesky in fp64. ``method="lstsq"`` applies it;
``method=None`` leaves the weights as they are.

Exactness: :func:`fair_pruner.llm.prune` and :func:`~fair_pruner.llm.mask` apply the same update
before slicing / zeroing, so a reconstructed pruned model equals its masked reference.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ..errors import FairPrunerError
from .layout import UnitFamily, is_conv1d, weight_oi

METHODS = ("lstsq",)


def check_method(method: Optional[str], book) -> None:
    if method is None:
        return
    if method not in METHODS:
        raise FairPrunerError(f"reconstruct={method!r}: choose one of {METHODS} or None")
    if book is None:
        raise FairPrunerError(f"reconstruct={method!r} needs the score book the plan came from: "
                              "fp.prune(model, plan, reconstruct=..., book=book)")
    if not book.meta.get("reconstruction_stats"):
        raise FairPrunerError(
            "this score book has no reconstruction statistics: score with "
            "fp.score(model, batches, reconstruction=True), then re-plan from that book")


def lstsq_update(W: torch.Tensor, G: torch.Tensor, removed: torch.Tensor,
                 damp: float = 1e-2) -> torch.Tensor:
    """W' [out, C] equal to W except kept columns K = W_K + W_R G_RK (G_KK + λI)⁻¹ (fp64)."""
    C = W.shape[1]
    rem = torch.zeros(C, dtype=torch.bool)
    rem[removed] = True
    K, R = (~rem).nonzero().flatten(), rem.nonzero().flatten()
    G = G.double()
    if not torch.isfinite(G).all():
        raise FairPrunerError("the reconstruction Gram matrix is not finite; recalibrate")
    Gkk = G[K][:, K]
    lam = damp * float(Gkk.diagonal().mean().clamp_min(1e-12))
    L, info = torch.linalg.cholesky_ex(Gkk + lam * torch.eye(K.numel(), dtype=torch.float64))
    if int(info) != 0:
        raise FairPrunerError("the reconstruction Gram matrix is not positive definite even "
                              f"with damping {damp}; raise damp or calibrate on more tokens")
    X = torch.cholesky_solve(G[K][:, R], L)                      # [K, R] = G_KK⁻¹ G_KR
    Wd = W.double()
    out = Wd.clone()
    out[:, K] = Wd[:, K] + Wd[:, R] @ X.T
    return out.to(W.dtype)


def reconstruct(model: nn.Module, fams: Dict[str, UnitFamily], removed: Dict[str, list],
                book, method: Optional[str], damp: float = 1e-2) -> None:
    """Apply ``method`` in place to the consumer of every group in ``fams`` that loses units."""
    if method is None:
        return
    for name, fam in fams.items():
        if not removed.get(name):
            continue
        g = book.group(name)
        if "gram" not in g.tensors:        # e.g. MoE experts: no consumer projection
            continue
        cons = model.get_submodule(fam.tap)
        ch = fam.removed_channels(removed[name])
        W = weight_oi(cons)
        if tuple(g.tensors["gram"].shape) != (W.shape[1],) * 2:
            raise FairPrunerError(f"{name}: the book's Gram matrix is {tuple(g.tensors['gram'].shape)} "
                                  f"but {fam.tap} takes {W.shape[1]} inputs; wrong book")
        new = lstsq_update(W.cpu(), g.tensors["gram"], ch, damp).to(W.device)
        with torch.no_grad():
            cons.weight.copy_(new.T if is_conv1d(cons) else new)
