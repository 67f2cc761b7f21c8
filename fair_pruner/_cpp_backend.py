"""C++/OpenMP CPU backend: registers the ``fair_pruner._C`` kernels with :mod:`fair_pruner.ops`.

``fair_pruner._C`` (built from ``csrc/cpu/`` by setup.py) defines the ``torch.ops.fair_pruner_cpp``
ops; importing this module raises ImportError when the extension is not built, and ops falls back.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing registers torch.ops.fair_pruner_cpp)
from .ops import OP_NAMES, register_impl

_lib = torch.ops.fair_pruner_cpp

for _name in OP_NAMES:
    register_impl(_name, "cpp", getattr(_lib, _name).default)
