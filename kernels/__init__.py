"""Triton kernels for the GPU paths of fair_pruner.ops (installed as ``fair_pruner.kernels``).

One kernel per op, each module with its docstring (shapes, math) and the reference it is tested
against: ``taylor`` (``unit_stats``), ``quantiles`` (``class_quantiles``), ``w1``
(``pairwise_w1_max``), ``tod`` (``tod_overlap``, ``tod_select``). ``fair_pruner._triton_backend``
registers them with :mod:`fair_pruner.ops`.

This file deliberately imports nothing: from a source checkout on ``sys.path`` this directory is
also visible as a top-level ``kernels`` package, which transformers probes for (Hugging Face's
hub ``kernels``). Imported that way it is inert and has no version, so the probe reports it as
unavailable instead of running our kernels.
"""
