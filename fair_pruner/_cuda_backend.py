"""CUDA C++ backend: registers the ``fair_pruner._cuda`` kernels with :mod:`fair_pruner.ops`.

``fair_pruner._cuda`` (built from ``csrc/cuda/`` by setup.py when a CUDA torch and nvcc are
present, or with FAIR_PRUNER_BUILD_CUDA=1) serves ``taylor_sum``, ``unit_stats`` and
``pairwise_w1_max``; the other ops use the Triton kernels on CUDA. Importing this module raises
ImportError when the extension is not built, and ops falls back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _cuda  # noqa: F401  (importing registers torch.ops.fair_pruner_cuda)
from .ops import pairwise_w1_max_ref, positions_3d, register_impl

_lib = torch.ops.fair_pruner_cuda
_MAX_CLASSES = 100  # K (K-1) / 2 pair sums + the staged rows fit one block's 48 KiB


def _stats(z: Tensor, g: Tensor, dim: int, stats: bool) -> Tensor:
    if z.dtype == torch.float64:  # the kernels read fp32/fp16/bf16; fp64 sums go through fp32
        z, g = z.float(), g.float()
    z, g, (A, C, I), sz, sg = positions_3d(z, g, dim)
    return _lib.unit_stats_3d(z, g, A, C, I, list(sz), list(sg), stats)


def unit_stats(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [4, C] per-unit sums of z*g, |z|, z, z^2 (CUDA kernel)."""
    return _stats(z, g, dim, True)


def taylor_sum(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [C] per-unit sums of z*g (CUDA kernel)."""
    return _stats(z, g, dim, False)[0]


def pairwise_w1_max(sk: Tensor) -> Tensor:
    """fp32 [U] max pairwise W1 (CUDA kernel up to 100 classes, else the next backend)."""
    if sk.shape[0] > _MAX_CLASSES:
        try:
            from .kernels import pairwise_w1_max as triton_w1
            return triton_w1(sk)
        except ImportError:
            return pairwise_w1_max_ref(sk)
    if sk.dtype == torch.float64:
        sk = sk.float()
    return _lib.pairwise_w1_max(sk)


for _name, _fn in (("taylor_sum", taylor_sum), ("unit_stats", unit_stats),
                   ("pairwise_w1_max", pairwise_w1_max)):
    register_impl(_name, "cuda", _fn)
