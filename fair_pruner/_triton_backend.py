"""Triton backend: registers the kernels of ``fair_pruner.kernels`` (``kernels/``) with ops.

Importing this module imports Triton and decorates the kernels (raises ImportError without
Triton, and ops then uses the next backend in line).
"""
from __future__ import annotations

from .kernels.quantiles import class_quantiles
from .kernels.taylor import taylor_sum, unit_stats
from .kernels.tod import tod_overlap, tod_select
from .kernels.w1 import pairwise_w1_max
from .ops import register_impl

for _name, _fn in (("taylor_sum", taylor_sum), ("unit_stats", unit_stats),
                   ("class_quantiles", class_quantiles), ("pairwise_w1_max", pairwise_w1_max),
                   ("tod_overlap", tod_overlap), ("tod_select", tod_select)):
    register_impl(_name, "triton", _fn)
