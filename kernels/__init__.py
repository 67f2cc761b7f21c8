"""Triton kernels for the GPU paths of fair_pruner.ops (installed as ``fair_pruner.kernels``).

One kernel per op, each module with its docstring (shapes, math), a ``reference`` and a
``bench`` beside the kernel: ``taylor`` (``unit_stats``, ``taylor_sum``), ``quantiles``
(``class_quantiles``), ``w1`` (``pairwise_w1_max``), ``tod`` (``tod_overlap``, ``tod_select``).
Importing this package registers the Triton implementations with :mod:`fair_pruner.ops` (they
serve CUDA tensors; the tests also run them on CPU tensors under ``TRITON_INTERPRET=1``).
"""
from fair_pruner.ops import register_impl

from .quantiles import class_quantiles
from .tod import tod_overlap, tod_select
from .taylor import taylor_sum, unit_stats
from .w1 import pairwise_w1_max

for _name, _fn in (("taylor_sum", taylor_sum), ("unit_stats", unit_stats),
                   ("class_quantiles", class_quantiles), ("pairwise_w1_max", pairwise_w1_max),
                   ("tod_overlap", tod_overlap), ("tod_select", tod_select)):
    register_impl(_name, "triton", _fn)
