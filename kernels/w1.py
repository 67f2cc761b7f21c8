"""Triton kernel: max over class pairs of the (sliced) W1 distance between quantile sketches.

Math: for sk [K, U, P, Q], out[u] = max_{a<b} (1/PQ) sum_{p,q} |sk[a,u,p,q] - sk[b,u,p,q]|,
NaN if any pair distance is NaN (as torch.maximum). Grid (U,): the program of unit u walks the
pairs as (a, block of BLOCK_B classes b > a) and the L = P*Q entries in BLOCK_L chunks, keeping
only [BLOCK_B] running maxima: O(U) memory, never the K x K x U tensor.
Reference: ``fair_pruner.ops.pairwise_w1_max_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def pairwise_w1_max_kernel(sk_ptr, out_ptr, K, L, Q, sk_k, sk_u, sk_p, sk_q,
                           BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    u = tl.program_id(0)
    base = sk_ptr + u.to(tl.int64) * sk_u
    best = tl.zeros([BLOCK_B], tl.float32)
    nans = tl.zeros([BLOCK_B], tl.int32)
    for a in range(0, K - 1):
        for b0 in range(a + 1, K, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            bmask = bs < K
            acc = tl.zeros([BLOCK_B], tl.float32)
            for l0 in range(0, L, BLOCK_L):
                ls = l0 + tl.arange(0, BLOCK_L)
                lmask = ls < L
                loff = (ls // Q).to(tl.int64) * sk_p + (ls % Q).to(tl.int64) * sk_q
                xa = tl.load(base + a * sk_k + loff, mask=lmask, other=0.0).to(tl.float32)
                xb = tl.load(base + bs[:, None].to(tl.int64) * sk_k + loff[None, :],
                             mask=bmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(tl.abs(xb - xa[None, :]), axis=1)
            d = acc / L
            nans += (bmask & (d != d)).to(tl.int32)
            best = tl.maximum(best, tl.where(bmask & (d == d), d, 0.0))
    res = tl.max(best, axis=0)
    res = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), res)
    tl.store(out_ptr + u, res)


def pairwise_w1_max(sk: Tensor) -> Tensor:
    """fp32 [U] from sketches sk [K, U, P, Q] (K >= 2, any float dtype and strides)."""
    K, U, P, Q = sk.shape
    out = torch.empty(U, dtype=torch.float32, device=sk.device)
    if U == 0:
        return out
    L = P * Q
    BLOCK_B = min(16, triton.next_power_of_2(K - 1))
    BLOCK_L = max(16, min(256, triton.next_power_of_2(L)))
    pairwise_w1_max_kernel[(U,)](sk, out, K, L, Q, *sk.stride(), BLOCK_B=BLOCK_B,
                                 BLOCK_L=BLOCK_L)
    return out
