"""Weight reconstruction after removal: the update of one consumer y = W x + b (model-agnostic).

Removing the input channels R of a consumer leaves y ≈ W_K x_K + b. From the calibration
statistics of x (mean μ, token count n and, for the least-squares methods, the Gram matrix
G = Σ x xᵀ) three updates exist (docs/method.md, "Reconstruction"):

* ``"bias"`` (FLAP's bias compensation): b' = b + W_R μ_R; the removed channels' mean
  contribution moves into the bias. Needs only μ.
* ``"lstsq"`` (OBS / "numerical pruning"): W_K' = W_K + W_R G_RK (G_KK + λI)⁻¹, the kept
  columns that reproduce y best in least squares over the calibration data, no intercept.
* ``"affine"``: least squares with an intercept: the same solve on the centred second moment
  S = G - n μ μᵀ, P = S_RK (S_KK + λI)⁻¹, W_K' = W_K + W_R P and b' = b + W_R (μ_R - P μ_K). The
  removed channels are replaced by their best affine prediction from the kept ones, so it is
  never worse than either of the above on the calibration data.

λ = damp · mean(diag) keeps a rank-deficient system (fewer samples than channels, dead channels)
solvable; the solve is a Cholesky in fp64, and if it still fails λ grows 10x up to three times
before a clear error. The adapters collect the statistics and apply the update (LLM consumers:
:mod:`fair_pruner.llm.reconstruct`; CNN Conv/Linear consumers: :mod:`fair_pruner.surgery`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .errors import BookMismatchError, FairPrunerError

METHODS = ("bias", "lstsq", "affine")
NEEDS_GRAM = ("lstsq", "affine")


def resolve(method: Optional[str], book, plan, default: Optional[str],
            needs_stats: Tuple[str, ...] = NEEDS_GRAM, hint: str = "") -> Optional[str]:
    """The method ``fp.prune(model, plan, reconstruct=method, book=book)`` applies.

    ``"auto"`` is ``default`` (the adapter's best choice for ``book``; None without a book).
    Any other method is checked against the book before anything changes: it must exist, the
    book must be given and be the plan's, and the methods in ``needs_stats`` need a book scored
    with ``reconstruction=True`` (``hint`` names an alternative that does not)."""
    if method == "auto":
        method = default if book is not None else None
    if method is None:
        return None
    if method not in METHODS:
        raise FairPrunerError(f"reconstruct={method!r}: choose one of {METHODS}, 'auto' or None")
    if book is None:
        raise FairPrunerError(f"reconstruct={method!r} needs the score book the plan came from: "
                              "fp.prune(model, plan, reconstruct=..., book=book)")
    if method in needs_stats and not book.meta.get("reconstruction_stats"):
        raise FairPrunerError(
            f"reconstruct={method!r} needs reconstruction statistics, and this score book has "
            "none: score with fp.score(model, batches, reconstruction=True) and re-plan from that "
            "book" + (f", {hint}" if hint else ""))
    if book.fingerprint and plan.fingerprint and book.fingerprint != plan.fingerprint:
        raise BookMismatchError("reconstruction needs the score book this plan was made from; "
                                "this book belongs to another model")
    return method


def solve(S: torch.Tensor, rhs: torch.Tensor, damp: float, what: str,
          floor: float = 0.0) -> torch.Tensor:
    """(S + λI)⁻¹ rhs in fp64 for symmetric PSD S [K, K], rhs [K, R];
    λ = damp·mean(diag S) + floor (grown 10x up to three times if S + λI is not PD)."""
    if not torch.isfinite(S).all():
        raise FairPrunerError(f"{what}: the reconstruction Gram matrix is not finite; recalibrate")
    scale = float(S.diagonal().mean().clamp_min(1e-12)) if S.numel() else 1.0
    eye = torch.eye(S.shape[0], dtype=torch.float64)
    S = (S + S.T) / 2
    for k in range(4):
        L, info = torch.linalg.cholesky_ex(S + 10 ** k * (damp * scale + floor) * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, L)
    raise FairPrunerError(f"{what}: the reconstruction Gram matrix is not positive definite even "
                          f"with damping {damp * 1000:g}; raise damp or calibrate on more tokens")


def update(W: torch.Tensor, b: Optional[torch.Tensor], removed: torch.Tensor, method: str, *,
           mean: torch.Tensor, gram: Optional[torch.Tensor] = None, tokens: int = 0,
           damp: float = 1e-2, what: str = "consumer") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W' [out, C], b' [out] or None) for removing input channels ``removed`` of y = W x + b.

    The removed columns of W' equal W's (they are sliced or zeroed afterwards). b' is None only
    for ``"lstsq"`` on a consumer without a bias.
    """
    C = W.shape[1]
    rem = torch.zeros(C, dtype=torch.bool)
    rem[removed] = True
    K, R = (~rem).nonzero().flatten(), rem.nonzero().flatten()
    Wd = W.double()
    bd = b.double() if b is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    mu = mean.double().reshape(-1)
    if method == "bias":
        return W.clone(), (bd + Wd[:, R] @ mu[R]).to(W.dtype)
    if gram is None:
        raise FairPrunerError(f"{what}: reconstruct={method!r} needs a Gram matrix")
    G = gram.double()
    floor = 0.0
    if method == "affine":
        if tokens < 1:
            raise FairPrunerError(f"{what}: reconstruct='affine' needs the calibration token "
                                  "count; rescore with fp.score(..., reconstruction=True)")
        # Centring an fp32-accumulated Gram cancels digits where |mean| >> std (e.g. clipped
        # activations): a floor relative to the uncentred diagonal keeps the system PD.
        floor = 1e-6 * float(G.diagonal()[K].max()) if K.numel() else 0.0
        G = G - tokens * torch.outer(mu, mu)
    P = solve(G[K][:, K], G[K][:, R], damp, what, floor).T      # [R, K]: x_R ≈ P x_K (+ c)
    out = Wd.clone()
    out[:, K] = Wd[:, K] + Wd[:, R] @ P
    if method == "lstsq":
        return out.to(W.dtype), b.clone() if b is not None else None
    return out.to(W.dtype), (bd + Wd[:, R] @ (mu[R] - P @ mu[K])).to(W.dtype)


def lstsq_update(W: torch.Tensor, G: torch.Tensor, removed: torch.Tensor,
                 damp: float = 1e-2) -> torch.Tensor:
    """W' [out, C]: kept columns K = W_K + W_R G_RK (G_KK + λI)⁻¹ (fp64), removed ones as W."""
    return update(W, None, removed, "lstsq", mean=torch.zeros(W.shape[1]), gram=G, damp=damp)[0]


def set_bias(cons: nn.Module, b: torch.Tensor) -> bool:
    """Write ``b`` into ``cons.bias``, creating the parameter if needed (True if created)."""
    if cons.bias is not None:
        with torch.no_grad():
            cons.bias.copy_(b.to(cons.bias.dtype))
        return False
    w = cons.weight
    cons.bias = nn.Parameter(b.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    return True
