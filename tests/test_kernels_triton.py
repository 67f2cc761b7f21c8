"""Triton kernels against the PyTorch reference.

On CPU they run under TRITON_INTERPRET=1 (set in conftest.py before any kernel module is
imported) on small hypothesis inputs; a subprocess compiles every kernel for sm_90 without a GPU;
with CUDA the same comparisons run on device (``gpu`` mark).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

from fair_pruner import ops
from helpers import (ALPHAS, _assert_sums, _oracle, activation, groups, samples,
                     sketches)

triton = pytest.importorskip("triton")
INTERP = settings(max_examples=10, deadline=None, derandomize=True)
# The interpreter runs kernels in numpy, ~2000x slower than torch: small inputs only.
SMALL = dict(act=activation(sides=(0, 1, 2, 3, 5, 7)),
             samples=samples(max_s=12, units=(0, 1, 3, 7), max_q=9),
             sketches=sketches(max_k=5, qs=(1, 3, 40)), groups=groups(sides=(0, 1, 2, 5, 17, 65)))
ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEV = "cpu" if ON_CPU else "cuda"


def _k(name):
    return importlib.import_module(f"fair_pruner.kernels.{name}")


@INTERP
@given(SMALL["act"])
def test_unit_stats_kernel(case):
    z, g, dim = case
    exact, scale = _oracle(z, g, dim)
    K = _k("taylor")
    _assert_sums(K.unit_stats(z.to(DEV), g.to(DEV), dim % z.dim()).cpu(), exact, scale)


@INTERP
@given(SMALL["samples"])
def test_class_quantiles_kernel(case):
    x, counts, q = case
    got = _k("quantiles").class_quantiles(x.to(DEV), counts.to(DEV), q).cpu()
    torch.testing.assert_close(got, ops.class_quantiles_ref(x, counts, q), rtol=0, atol=0,
                               equal_nan=True)


@INTERP
@given(SMALL["sketches"])
def test_pairwise_w1_max_kernel(sk):
    got = _k("w1").pairwise_w1_max(sk.to(DEV)).cpu()
    torch.testing.assert_close(got, ops.pairwise_w1_max_ref(sk), rtol=2e-5, atol=1e-6,
                               equal_nan=True)


@INTERP
@given(SMALL["groups"])
def test_tod_kernels(case):
    u, r, offsets = case
    K = _k("tod")
    ref = ops.tod_overlap_ref(u, r, offsets)
    got = K.tod_overlap(u.to(DEV), r.to(DEV), offsets.to(DEV)).cpu()
    assert torch.equal(got, ref)
    for cap in (0.99, 0.5):
        sel = K.tod_select(ref.to(DEV), offsets.to(DEV), ALPHAS.to(DEV), cap).cpu()
        assert torch.equal(sel, ops.tod_select_ref(ref, offsets, ALPHAS, cap))


def test_kernels_register_with_ops():
    import fair_pruner._triton_backend  # noqa: F401
    for op in ops.OP_NAMES:
        assert "triton" in ops.implementations(op), op


@pytest.mark.skipif(not ON_CPU, reason="compile check is for machines without a GPU")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fair_pruner.kernels.compile_check", "90"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from fair_pruner.kernels.compile_check import cases
    for label, *_ in cases():
        assert f"compiled {label} for sm_90" in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_dispatch_on_gpu(monkeypatch):
    monkeypatch.setenv("FAIR_PRUNER_BACKEND", "triton")
    z = torch.randn(8, 64, 7, 7, device="cuda").to(memory_format=torch.channels_last)
    g = torch.randn_like(z)
    torch.testing.assert_close(ops.unit_stats(z, g, 1), ops.unit_stats_ref(z, g, 1),
                               rtol=1e-4, atol=1e-3)
    sk = torch.randn(10, 33, 4, 8, device="cuda")
    torch.testing.assert_close(ops.pairwise_w1_max(sk), ops.pairwise_w1_max_ref(sk))
