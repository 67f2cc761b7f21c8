"""Triton kernels: ToD overlap curves and m̂ for many ragged groups in one launch each.

tod_overlap (u, r float [N]; groups [offsets[g], offsets[g+1])), two kernels:
  1. ``tod_times_kernel``, grid (G, ceil(max n_g / BLOCK_I)): for each unit i of group g, its
     rank a_i by u ascending and b_i by r descending (ties by index, NaN last, -0.0 == 0.0), by
     counting over the group in [BLOCK_I, BLOCK_J] tiles (exact, no sort), then
     hist[offsets[g] + g + max(a_i, b_i) + 1] += 1 (atomic).
  2. ``segment_cumsum_kernel``, grid (G,): curve_g(m) = sum_{t <= m} hist_g(t), m = 0..n_g.
tod_select, ``tod_select_kernel`` grid (G, A):
  m̂ = max{1 <= m <= mmax_g : overlap_g(m) / m <= alpha_a} (fp64 ratio, as the authors' rule) or 0.
References: ``fair_pruner.ops.tod_overlap_ref`` and ``tod_select_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _before(xj, xi, j, i):
    """x_j orders before x_i: smaller, or equal with a smaller index (NaN largest, NaN == NaN)."""
    nj = xj != xj
    ni = xi != xi
    lt = (xj < xi) | (ni & ~nj)
    eq = (xj == xi) | (ni & nj)
    return lt | (eq & (j < i))


@triton.jit
def tod_times_kernel(u_ptr, r_ptr, offsets_ptr, hist_ptr, BLOCK_I: tl.constexpr,
                     BLOCK_J: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    ii = start + tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = ii < end
    if start + tl.program_id(1) * BLOCK_I < end:
        ui = tl.load(u_ptr + ii, mask=imask, other=0.0)
        ri = -tl.load(r_ptr + ii, mask=imask, other=0.0)
        ra = tl.zeros([BLOCK_I], tl.int64)
        rb = tl.zeros([BLOCK_I], tl.int64)
        for j0 in range(start, end, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            jmask = jj < end
            uj = tl.load(u_ptr + jj, mask=jmask, other=0.0)
            rj = -tl.load(r_ptr + jj, mask=jmask, other=0.0)
            valid = jmask[None, :]
            ra += tl.sum((valid & _before(uj[None, :], ui[:, None], jj[None, :], ii[:, None])
                          ).to(tl.int64), axis=1)
            rb += tl.sum((valid & _before(rj[None, :], ri[:, None], jj[None, :], ii[:, None])
                          ).to(tl.int64), axis=1)
        t = tl.maximum(ra, rb) + 1
        tl.atomic_add(hist_ptr + start + g + t, tl.full([BLOCK_I], 1, tl.int64), mask=imask)


@triton.jit
def segment_cumsum_kernel(hist_ptr, offsets_ptr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    lo = tl.load(offsets_ptr + g) + g
    hi = tl.load(offsets_ptr + g + 1) + g + 1
    carry = tl.zeros([1], tl.int64)
    for s in range(lo, hi, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        m = idx < hi
        v = tl.load(hist_ptr + idx, mask=m, other=0)
        c = tl.cumsum(v, axis=0)
        tl.store(hist_ptr + idx, c + carry, mask=m)
        carry += tl.sum(v, axis=0)


@triton.jit
def tod_select_kernel(overlap_ptr, offsets_ptr, mmax_ptr, alphas_ptr, out_ptr, A,
                      BLOCK_M: tl.constexpr):
    g = tl.program_id(0)
    a = tl.program_id(1)
    curve = overlap_ptr + tl.load(offsets_ptr + g) + g
    mmax = tl.load(mmax_ptr + g)
    alpha = tl.load(alphas_ptr + a)
    best = tl.zeros([BLOCK_M], tl.int64)
    for m0 in range(1, mmax + 1, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        mm = ms <= mmax
        ov = tl.load(curve + ms, mask=mm, other=0)
        ok = mm & (ov.to(tl.float64) / ms.to(tl.float64) <= alpha)
        best = tl.maximum(best, tl.where(ok, ms.to(tl.int64), 0))
    tl.store(out_ptr + g * A + a, tl.max(best, axis=0))


def tod_overlap(u: Tensor, r: Tensor, offsets: Tensor) -> Tensor:
    """int64 [N + G] overlap curves (layout as ``fair_pruner.ops.tod_overlap``)."""
    N, G = u.numel(), offsets.numel() - 1
    out = torch.zeros(N + G, dtype=torch.int64, device=u.device)
    if N == 0:
        return out
    if u.dtype != r.dtype:
        u, r = u.double(), r.double()
    u, r = u.contiguous(), r.contiguous()
    offsets = offsets.to(device=u.device, dtype=torch.int64).contiguous()
    nmax = int((offsets[1:] - offsets[:-1]).max())
    BLOCK_I, BLOCK_J = 64, 64
    tod_times_kernel[(G, triton.cdiv(nmax, BLOCK_I))](u, r, offsets, out, BLOCK_I=BLOCK_I,
                                                       BLOCK_J=BLOCK_J)
    segment_cumsum_kernel[(G,)](out, offsets, BLOCK=1024)
    return out


def tod_select(overlap: Tensor, offsets: Tensor, alphas: Tensor, cap: float) -> Tensor:
    """int64 [G, A] units to remove per group and tolerance."""
    G, A = offsets.numel() - 1, alphas.numel()
    out = torch.zeros((G, A), dtype=torch.int64, device=overlap.device)
    if G == 0 or A == 0:
        return out
    offsets = offsets.to(device=overlap.device, dtype=torch.int64).contiguous()
    # floor(cap * n) in fp64 on the host, exactly as int(cap * n) in the reference.
    mmax = (float(cap) * (offsets[1:] - offsets[:-1]).double()).floor().to(torch.int64)
    alphas = alphas.to(device=overlap.device, dtype=torch.float64).contiguous()
    tod_select_kernel[(G, A)](overlap.contiguous(), offsets, mmax, alphas, out, A, BLOCK_M=256)
    return out
