"""CUDA C++ kernels: an nvcc compile check for sm_90 (no GPU needed) and, with a GPU and the
built extension, every CUDA op against the PyTorch reference (``gpu`` mark)."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

from fair_pruner import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("src", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
def test_cuda_sources_compile_for_sm90(src):
    res = subprocess.run([NVCC, "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90",
                          "-c", src, "-o", os.devnull], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _cuda_impl(op):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    impl = ops.implementations(op).get("cuda")
    if impl is None:
        pytest.skip("fair_pruner._cuda not built")
    return impl


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "linear", "sliced", "empty"])
def test_cuda_unit_stats(dtype, layout):
    fn = _cuda_impl("unit_stats")
    shape = {"nchw": (5, 37, 9, 7), "channels_last": (5, 37, 9, 7), "linear": (3, 17, 301),
             "sliced": (6, 40, 10, 10), "empty": (0, 8, 3, 3)}[layout]
    z = torch.randn(shape, device="cuda").to(dtype)
    g = torch.randn(shape, device="cuda").to(dtype)
    dim = -1 if layout == "linear" else 1
    if layout == "channels_last":
        z, g = (t.contiguous(memory_format=torch.channels_last) for t in (z, g))
    if layout == "sliced":
        z, g = z[::2, ::3, 1:], g[::2, ::3, 1:]
    d = dim % z.dim()
    ref = ops.unit_stats_ref(z, g, d)
    got = fn(z, g, d)
    scale = ops.unit_stats_ref(z.abs(), g.abs(), d).abs() + 1e-3
    assert ((got - ref).abs() <= 1e-4 * scale).all()


@pytest.mark.gpu
@pytest.mark.parametrize("K,U,P,Q", [(2, 1, 1, 1), (7, 33, 3, 40), (100, 20, 128, 32),
                                     (101, 3, 2, 4)])
def test_cuda_pairwise_w1_max(K, U, P, Q):
    fn = _cuda_impl("pairwise_w1_max")
    sk = torch.randn(K, U, P, Q, device="cuda").sort(-1).values
    torch.testing.assert_close(fn(sk), ops.pairwise_w1_max_ref(sk), rtol=1e-5, atol=1e-6)
    nc = sk.transpose(0, 1).contiguous().transpose(0, 1).half()
    torch.testing.assert_close(fn(nc), ops.pairwise_w1_max_ref(nc), rtol=1e-4, atol=1e-5)
    sk[0, 0, 0, 0] = float("nan")
    assert torch.isnan(fn(sk)[0])


@pytest.mark.gpu
def test_default_gpu_backends_match_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(4, 9, 50, 3, device="cuda")
    c = torch.tensor([9, 5, 2, 1], device="cuda")
    torch.testing.assert_close(ops.class_quantiles(x, c, 8), ops.class_quantiles_ref(x, c, 8))
    u = torch.randint(0, 7, (500,), device="cuda").double()
    r = torch.randn(500, device="cuda", dtype=torch.float64)
    off = torch.tensor([0, 3, 300, 500], device="cuda")
    ov = ops.tod_overlap(u, r, off)
    assert torch.equal(ov, ops.tod_overlap_ref(u, r, off))
    al = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64, device="cuda")
    assert torch.equal(ops.tod_select(ov, off, al), ops.tod_select_ref(ov, off, al, 0.99))
