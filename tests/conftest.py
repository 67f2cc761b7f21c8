import os

# Triton runs on the CPU only in interpreter mode, and the flag must be set before any
# @triton.jit decorates: kernel modules are imported lazily by the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*backend unavailable.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
