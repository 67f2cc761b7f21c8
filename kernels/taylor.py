"""Triton kernel: per-unit Taylor term and activation moments in one read of z and g.

Math: for z, g viewed as [A, C, I] (unit dim C; see ``fair_pruner.ops.positions_3d``),
    out[0, c] = sum_{a,i} z*g,  out[1, c] = sum |z|,  out[2, c] = sum z,  out[3, c] = sum z^2,
fp32 accumulation. Grid (ceil(C / BLOCK_C), SPLIT): program (pc, ps) sums [BLOCK_C, BLOCK_P]
tiles of its share of the A*I positions and writes partials [SPLIT, 4, C]; the host adds them
(deterministic, no atomics). Reference: ``fair_pruner.ops.unit_stats_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fair_pruner.ops import positions_3d


@triton.jit
def unit_stats_kernel(z_ptr, g_ptr, part_ptr, A, C, I, sza, szc, szi, sga, sgc, sgi, per_split,
                      STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    npos = A * I
    p_lo = ps * per_split
    p_hi = tl.minimum(p_lo + per_split, npos)
    t = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    sa = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    sm = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    sq = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps_ = p0 + tl.arange(0, BLOCK_P)
        pmask = ps_ < p_hi
        a = (ps_ // I).to(tl.int64)
        i = (ps_ % I).to(tl.int64)
        m = cmask[:, None] & pmask[None, :]
        zo = cs[:, None].to(tl.int64) * szc + (a * sza + i * szi)[None, :]
        go = cs[:, None].to(tl.int64) * sgc + (a * sga + i * sgi)[None, :]
        zv = tl.load(z_ptr + zo, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(g_ptr + go, mask=m, other=0.0).to(tl.float32)
        t += zv * gv
        if STATS:
            sa += tl.abs(zv)
            sm += zv
            sq += zv * zv
    base = part_ptr + ps * 4 * C + cs
    tl.store(base, tl.sum(t, axis=1), mask=cmask)
    if STATS:
        tl.store(base + C, tl.sum(sa, axis=1), mask=cmask)
        tl.store(base + 2 * C, tl.sum(sm, axis=1), mask=cmask)
        tl.store(base + 3 * C, tl.sum(sq, axis=1), mask=cmask)


def unit_stats(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [4, C]: sums of z*g, |z|, z, z^2 over every dim but ``dim`` (z, g same shape)."""
    z, g, (A, C, I), sz, sg = positions_3d(z, g, dim)
    npos = A * I
    if C == 0 or npos == 0:
        return torch.zeros((4, C), dtype=torch.float32, device=z.device)
    BLOCK_C, BLOCK_P = 32, 64
    cblocks = triton.cdiv(C, BLOCK_C)
    # Enough programs to fill the GPU (~4 per SM), each with >= 4 tiles of positions.
    sms = torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 4
    split = max(1, min(triton.cdiv(npos, 4 * BLOCK_P), triton.cdiv(4 * sms, cblocks)))
    per_split = triton.cdiv(triton.cdiv(npos, split), BLOCK_P) * BLOCK_P
    split = triton.cdiv(npos, per_split)
    part = torch.empty((split, 4, C), dtype=torch.float32, device=z.device)
    unit_stats_kernel[(cblocks, split)](z, g, part, A, C, I, *sz, *sg, per_split, STATS=True,
                                        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    return part.sum(dim=0)
