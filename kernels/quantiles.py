"""Triton kernel: class quantile sketches by an in-register sort of each class sample.

Math: for x [K, S, U, P] and counts n_k, out[k, u, p, i] = sorted(x[k, :n_k, u, p])[j_i] with
j_i = floor((n_k (2i+1) - 1) / 2Q), i < Q; NaN sorts last, as torch.sort. Grid
(K, ceil(U*P / BLOCK_COL)): each program loads a [BLOCK_COL, S_PAD] tile (rows >= n_k padded
with +inf, NaN counted and replaced by +inf), sorts it along the sample axis with ``tl.sort``,
gathers the Q entries j_i (positions past n_k minus the NaN count are NaN) and stores
[BLOCK_COL, Q] of out. Reference: ``fair_pruner.ops.class_quantiles_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def class_quantiles_kernel(x_ptr, counts_ptr, out_ptr, U, P, Q, sxk, sxs, sxu, sxp,
                           S_PAD: tl.constexpr, Q_PAD: tl.constexpr, BLOCK_COL: tl.constexpr):
    k = tl.program_id(0)
    pb = tl.program_id(1)
    n = tl.load(counts_ptr + k).to(tl.int32)
    cols = pb * BLOCK_COL + tl.arange(0, BLOCK_COL)
    cmask = cols < U * P
    u = (cols // P).to(tl.int64)
    p = (cols % P).to(tl.int64)
    s = tl.arange(0, S_PAD)
    m = cmask[:, None] & (s[None, :] < n)  # [BLOCK_COL, S_PAD]: samples on the minor axis
    offs = k.to(tl.int64) * sxk + (u * sxu + p * sxp)[:, None] + s[None, :].to(tl.int64) * sxs
    v = tl.load(x_ptr + offs, mask=m, other=float("inf")).to(tl.float32)
    isnan = v != v
    nnan = tl.sum(isnan.to(tl.int32), axis=1)  # [BLOCK_COL]
    v = tl.sort(tl.where(isnan, float("inf"), v), dim=1)
    lev = tl.arange(0, Q_PAD)
    j = tl.minimum((n * (2 * lev + 1) - 1) // (2 * Q), S_PAD - 1)  # [Q_PAD]
    picked = tl.gather(v, tl.broadcast_to(j[None, :], [BLOCK_COL, Q_PAD]), 1)
    picked = tl.where(j[None, :] >= (n - nnan)[:, None], float("nan"), picked)
    out_offs = (k.to(tl.int64) * U * P + cols[:, None].to(tl.int64)) * Q + lev[None, :]
    tl.store(out_ptr + out_offs, picked, mask=cmask[:, None] & (lev[None, :] < Q))


def class_quantiles(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """fp32 [K, U, P, q] sketches of x [K, S, U, P] (counts int64 [K], 1 <= counts <= S)."""
    K, S, U, P = x.shape
    out = torch.empty((K, U, P, q), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    S_PAD = triton.next_power_of_2(S)
    Q_PAD = triton.next_power_of_2(q)
    BLOCK_COL = max(1, min(64, 8192 // max(S_PAD, Q_PAD)))
    counts = counts.to(device=x.device, dtype=torch.int64).contiguous()
    grid = (K, triton.cdiv(U * P, BLOCK_COL))
    class_quantiles_kernel[grid](x, counts, out, U, P, q, *x.stride(), S_PAD=S_PAD, Q_PAD=Q_PAD,
                                 BLOCK_COL=BLOCK_COL)
    return out
