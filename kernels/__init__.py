"""Triton kernels for the GPU paths of fair_pruner.ops (installed as ``fair_pruner.kernels``).

Importing this package registers the Triton implementations with :mod:`fair_pruner.ops`.
"""
raise ImportError("Triton kernels are not implemented yet")
