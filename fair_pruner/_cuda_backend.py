"""CUDA C++ backend: the ``cuda`` kernels of ``unit_stats`` and ``pairwise_w1_max``.

``fair_pruner._cuda`` (built from ``csrc/cuda/`` by setup.py when a CUDA torch and nvcc are
present, or with FAIR_PRUNER_BUILD_CUDA=1); the other ops use the Triton kernels on CUDA.
Importing this module raises ImportError when the extension is not built.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _cuda  # noqa: F401  (importing registers torch.ops.fair_pruner_cuda)
from .ops import max_over_class_blocks, positions_3d

_lib = torch.ops.fair_pruner_cuda
MAX_CLASSES = 100  # K (K-1) / 2 pair sums + the staged rows fit one block's 48 KiB


def unit_stats(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [4, C] per-unit sums of z*g, |z|, z, z^2 (CUDA kernel)."""
    if z.dtype == torch.float64:  # the kernels read fp32/fp16/bf16; fp64 sums go through fp32
        z, g = z.float(), g.float()
    z, g, (A, C, I), sz, sg = positions_3d(z, g, dim)
    return _lib.unit_stats_3d(z, g, A, C, I, list(sz), list(sg), True)


def _w1(sk: Tensor) -> Tensor:
    return _lib.pairwise_w1_max(sk.float() if sk.dtype == torch.float64 else sk)


def pairwise_w1_max(sk: Tensor) -> Tensor:
    """fp32 [U] max pairwise W1 (CUDA kernel; K > 100 classes in blocks of 50 pairs of blocks)."""
    return max_over_class_blocks(sk, _w1, MAX_CLASSES)


KERNELS = {"unit_stats": unit_stats, "pairwise_w1_max": pairwise_w1_max}
