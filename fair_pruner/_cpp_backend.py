"""C++/OpenMP CPU backend: the ``cpu`` kernels of :mod:`fair_pruner.ops`.

``fair_pruner._C`` (built from ``csrc/cpu/`` by setup.py) defines the ``torch.ops.fair_pruner_cpp``
ops; importing this module raises ImportError when the extension is not built.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing registers torch.ops.fair_pruner_cpp)
from .ops import OP_NAMES

KERNELS = {name: getattr(torch.ops.fair_pruner_cpp, name).default for name in OP_NAMES}
