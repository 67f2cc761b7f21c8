"""Triton backend: ``cuda`` kernels of :mod:`fair_pruner.ops` from ``fair_pruner.kernels``.

Importing this module imports Triton and decorates the kernels (ImportError without Triton).
Under ``TRITON_INTERPRET=1`` the same functions also run on CPU tensors (the tests do that).
"""
from __future__ import annotations

from .kernels.quantiles import class_quantiles
from .kernels.taylor import unit_stats
from .kernels.tod import tod_overlap, tod_select
from .kernels.w1 import pairwise_w1_max
from .ops import class_w1_max_composed

# class_w1_max: no fused Triton kernel; the two ops through the dispatcher, so pairwise_w1_max
# runs the CUDA C++ kernel where it is built (the sketch is formed).
KERNELS = {"unit_stats": unit_stats, "class_quantiles": class_quantiles,
           "pairwise_w1_max": pairwise_w1_max, "class_w1_max": class_w1_max_composed,
           "tod_overlap": tod_overlap, "tod_select": tod_select}
