"""Every compiled CPU backend of fair_pruner.ops against the pure-PyTorch reference.

Inputs come from hypothesis: odd sizes, size-1 and empty dims, non-contiguous and channels-last
layouts, fp16/bf16/fp64, ties and NaN/inf. Sums are checked against an fp64 oracle with a bound
relative to sum |terms|; sorts, ranks and selections must match exactly.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st  # noqa: F401

from fair_pruner import ops
from fair_pruner.errors import NonFiniteError

from helpers import (ALPHAS, _assert_sums, _oracle, activation, groups, samples,  # noqa: F401
                     sketches)

HYP = settings(max_examples=40, deadline=None, derandomize=True)


CPU_BACKENDS = ["torch", "cpp"]


def _need(backend, op):
    """The ``backend`` implementation of ``op``; a missing extension skips the comparison (and
    fails where .ci/run built it: FAIR_PRUNER_REQUIRE_CPP=1)."""
    impls = ops.implementations(op)
    if backend not in impls:
        if backend == "cpp" and os.environ.get("FAIR_PRUNER_REQUIRE_CPP") == "1":
            pytest.fail("the C++ extension fair_pruner._C was built but does not load")
        pytest.skip(f"{backend} backend not built (pip install --no-build-isolation -e .)")
    return impls[backend]


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_stats_match_reference(backend):
    fn = _need(backend, "unit_stats")

    @HYP
    @given(activation())
    def check(case):
        z, g, dim = case
        exact, scale = _oracle(z, g, dim)
        _assert_sums(fn(z, g, dim % z.dim()), exact, scale)
    check()


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_unit_stats_nonfinite_propagates(backend, bad):
    fn = _need(backend, "unit_stats")
    z = torch.randn(3, 4, 5, 5)
    g = torch.randn_like(z)
    z[1, 2, 3, 4] = bad
    got, ref = fn(z, g, 1), ops.unit_stats_ref(z, g, 1)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    assert not torch.isfinite(got[:, 2]).all() and torch.isfinite(got[:, [0, 1, 3]]).all()


@pytest.mark.parametrize("backend", ["cpp"])
def test_unit_stats_mixed_dtypes_and_large_runs(backend):
    fn = _need(backend, "unit_stats")
    z = torch.randn(2, 3, 9000)  # runs longer than one fp32 block
    g = torch.randn(2, 3, 9000, dtype=torch.float64)
    exact, scale = _oracle(z, g.float(), 1)
    _assert_sums(fn(z, g, 1), exact, scale)


# ------------------------------------------------------------------------------ quantiles / W1


@pytest.mark.parametrize("backend", ["cpp"])
def test_class_quantiles_match_reference(backend):
    fn = _need(backend, "class_quantiles")

    @HYP
    @given(samples())
    def check(case):
        x, counts, q = case
        ref = ops.class_quantiles_ref(x, counts, q)
        torch.testing.assert_close(fn(x, counts, q), ref, rtol=0, atol=0, equal_nan=True)
    check()


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_class_quantiles_of_a_slice_with_contiguous_columns(backend, dtype):
    """Outer dims sliced (the kernel's row-copy path: units x projections contiguous), a
    partial last column block (U * P = 133), NaN / inf in some columns."""
    fn = _need(backend, "class_quantiles")
    g = torch.Generator().manual_seed(5)
    big = torch.randn(4, 13, 19, 7, generator=g)
    big[2, 3, 5, 1], big[1, 4, 18, 6], big[3, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    x = big.to(dtype)[1:, 2:]
    assert x.stride(3) == 1 and x.stride(2) == 7 and not x.is_contiguous()
    counts = torch.tensor([11, 1, 6])
    for q in (1, 4, 11, 17):
        torch.testing.assert_close(fn(x, counts, q), ops.class_quantiles_ref(x, counts, q),
                                   rtol=0, atol=0, equal_nan=True)


def test_class_quantiles_level_rule():
    x = torch.arange(10.0).flip(0).reshape(1, 10, 1, 1)
    out = ops.class_quantiles(x, torch.tensor([10]), 4)
    # index floor((10 (2i+1) - 1) / 8) of the sorted sample 0..9: 1, 3, 6, 8
    assert out.flatten().tolist() == [1.0, 3.0, 6.0, 8.0]


@pytest.mark.parametrize("backend", ["cpp"])
def test_pairwise_w1_max_matches_reference(backend):
    fn = _need(backend, "pairwise_w1_max")

    @HYP
    @given(sketches())
    def check(sk):
        ref = ops.pairwise_w1_max_ref(sk)
        torch.testing.assert_close(fn(sk), ref, rtol=2e-5, atol=1e-6, equal_nan=True)
    check()


@pytest.mark.parametrize("backend", ["cpp"])
def test_class_w1_max_matches_reference_and_the_two_ops(backend):
    """The fused U-Score op against the reference (the two references composed) and, bit for
    bit, against the same backend's class_quantiles then pairwise_w1_max."""
    fn = _need(backend, "class_w1_max")
    quant, w1 = _need(backend, "class_quantiles"), _need(backend, "pairwise_w1_max")

    @HYP
    @given(samples())
    def check(case):
        x, counts, q = case
        if x.shape[0] < 2:
            x, counts = torch.cat([x, x]), torch.cat([counts, counts.flip(0)])
        got, two = fn(x, counts, q), w1(quant(x, counts, q))
        torch.testing.assert_close(got, ops.class_w1_max_ref(x, counts, q), rtol=2e-5,
                                   atol=1e-6, equal_nan=True)
        assert torch.equal(got.isnan(), two.isnan())
        torch.testing.assert_close(got, two, rtol=0, atol=0, equal_nan=True)
    check()


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 3, 64, 130])
def test_class_w1_max_tiles(backend, dtype, P):
    """Units in tiles of 64 // P (P < 64) or one unit over several column blocks (P > 64, a
    partial last block), U not a multiple of the tile, unequal class counts, a NaN unit, sliced
    (non-contiguous) samples."""
    fn = _need(backend, "class_w1_max")
    g = torch.Generator().manual_seed(P)
    big = torch.randn(5, 21, 47, P, generator=g)
    big[3, 3, 40, 0] = float("nan")             # class 2 (13 samples), sample 2, unit 38
    x = big.to(dtype)[1:, 1:, 2:]                  # K 4, S 20, U 45
    counts = torch.tensor([20, 1, 13, 7])
    got = fn(x, counts, 9)
    two = ops.pairwise_w1_max(ops.class_quantiles(x, counts, 9))
    torch.testing.assert_close(got, two, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, ops.class_w1_max_ref(x, counts, 9), rtol=2e-5, atol=1e-6,
                               equal_nan=True)
    assert got.isnan().tolist() == [u == 38 for u in range(45)]
    assert fn(x[:, :, :0], counts, 9).shape == (0,)
    empty = torch.randn(2, 3, 4, 0)                       # no coordinates: 0 / 0, as the two ops
    torch.testing.assert_close(fn(empty, torch.tensor([3, 2]), 2),
                               ops.class_w1_max_ref(empty, torch.tensor([3, 2]), 2), equal_nan=True)


def test_score_gives_the_same_u_with_the_fused_op_and_the_two_ops(monkeypatch):
    """engine.finish_u takes the two ops where a tile's sketch would not fit FUSED_TILE_BYTES:
    the book's U-Scores are the same bit for bit either way (sketched and scalar units)."""
    import fair_pruner as fp
    from fair_pruner import engine
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 3)).eval()
    data = [(torch.randn(12, 3, 10, 10), torch.arange(12) % 3) for _ in range(2)]
    fused = fp.score(model, data, samples_per_class=5, projections=16, progress=False)
    monkeypatch.setattr(engine, "FUSED_TILE_BYTES", 0)
    two = fp.score(model, data, samples_per_class=5, projections=16, progress=False)
    assert [g.name for g in fused.groups] == [g.name for g in two.groups]
    for a, b in zip(fused.groups, two.groups):
        assert torch.equal(a.u, b.u), a.name


@pytest.mark.parametrize("K,max_k", [(2, 4), (5, 4), (9, 4), (11, 6), (100, 100), (101, 100)])
def test_max_over_class_blocks_equals_all_pairs(K, max_k):
    """How the CUDA backend serves K > 100 classes with its <= 100-class kernel."""
    sk = torch.randn(K, 7, 2, 5).sort(dim=-1).values
    seen = []

    def kernel(part):
        assert part.shape[0] <= max_k
        seen.append(part.shape[0])
        return ops.pairwise_w1_max_ref(part)
    got = ops.max_over_class_blocks(sk, kernel, max_k)
    assert torch.equal(got, ops.pairwise_w1_max_ref(sk))
    assert len(seen) >= 1


def test_pairwise_w1_max_brute_force():
    sk = torch.randn(5, 4, 3, 6)
    want = torch.zeros(4)
    for u in range(4):
        want[u] = max((sk[a, u] - sk[b, u]).abs().mean() for a in range(5) for b in range(a + 1, 5))
    torch.testing.assert_close(ops.pairwise_w1_max(sk), want)


# ------------------------------------------------------------------------------ ToD


@pytest.mark.parametrize("backend", ["cpp"])
def test_tod_overlap_and_select_match_reference(backend):
    overlap, select = _need(backend, "tod_overlap"), _need(backend, "tod_select")

    @HYP
    @given(groups(), st.sampled_from([0.99, 0.5, 1.0, 0.0]))
    def check(case, cap):
        u, r, offsets = case
        ref = ops.tod_overlap_ref(u, r, offsets)
        assert torch.equal(overlap(u, r, offsets), ref)
        assert torch.equal(select(ref, offsets, ALPHAS, cap), ops.tod_select_ref(ref, offsets,
                                                                                  ALPHAS, cap))
    check()


@pytest.mark.parametrize("pattern", ["clustered", "outlier", "equal", "wide", "float32"])
def test_tod_overlap_large_groups_match_reference(pattern):
    """Groups past the radix passes' bucket counts (2^11), with scores that share the leading
    bits the C++ kernel buckets on: its full-key fix-up, not only the radix passes, decides."""
    _need("cpp", "tod_overlap")
    g = torch.Generator().manual_seed(7)
    n = 5003
    base = torch.rand(n, generator=g, dtype=torch.float64)
    if pattern == "clustered":    # 17 clusters, members 1 ulp-scale apart
        u = (base * 17).floor() + torch.randint(0, 3, (n,), generator=g) * 1e-15
    elif pattern == "outlier":    # one huge score: every other prefix collides
        u = 1.0 + base * 1e-9
        u[123] = 1e300
    elif pattern == "equal":
        u = torch.full((n,), 0.25, dtype=torch.float64)
    elif pattern == "wide":       # signs and magnitudes across the whole double range
        u = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
            -300, 300, (n,), generator=g)
    else:
        u = torch.rand(n, generator=g).half().float()   # float32 input, many exact ties
    r = u.flip(0).clone() if pattern != "equal" else base
    if pattern == "float32":
        r = torch.rand(n, generator=g)
    u2 = torch.cat([u, u[:17]])                        # a second, odd-sized group
    r2 = torch.cat([r, r[:17]])
    off = torch.tensor([0, n, n + 17])
    ref = ops.tod_overlap_ref(u2, r2, off)
    assert torch.equal(ops.implementations("tod_overlap")["cpp"](u2, r2, off), ref)
    strided = torch.stack([u2, torch.zeros_like(u2)], 1)[:, 0]       # non-contiguous view
    assert torch.equal(ops.implementations("tod_overlap")["cpp"](strided, r2, off), ref)


def test_tod_matches_brute_force_rule():
    from fair_pruner.tod import brute_force_m_hat
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 9, 40, 130):
        u = torch.randint(0, 6, (n,), generator=gen).double()
        r = torch.randint(0, 6, (n,), generator=gen).double()
        off = torch.tensor([0, n])
        ov = ops.tod_overlap(u, r, off)
        for a in (0.0, 0.05, 0.2, 0.5):
            assert int(ops.tod_select(ov, off, [a])[0, 0]) == brute_force_m_hat(u, r, a)


# ------------------------------------------------------------------------------ dispatch


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (kernels are chosen once per process)."""
    full = {k: v for k, v in os.environ.items() if k != "FAIR_PRUNER_BACKEND"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=full)


@pytest.mark.parametrize("forced", ["torch", "cpp"])
def test_forced_backend_serves_the_op(forced):
    if forced == "cpp":
        _need("cpp", "unit_stats")
    res = _run("import torch\n"
               "from fair_pruner import ops\n"
               "z, g = torch.randn(4, 6), torch.randn(4, 6)\n"
               f"assert ops.active_backend('unit_stats', 'cpu') == {forced!r}\n"
               "torch.testing.assert_close(ops.unit_stats(z, g, 1), ops.unit_stats_ref(z, g, 1))\n"
               "assert ops.active_backend('tod_overlap', 'cuda') == "
               f"{'torch' if forced == 'cpp' else forced!r}\n",
               FAIR_PRUNER_BACKEND=forced)
    assert res.returncode == 0, res.stderr[-2000:]


def test_bogus_forced_backend_is_a_clear_error():
    res = _run("import torch\nfrom fair_pruner import ops\n"
               "ops.unit_stats(torch.randn(2, 3), torch.randn(2, 3), 1)\n",
               FAIR_PRUNER_BACKEND="bogus")
    assert res.returncode != 0 and "ConfigError: FAIR_PRUNER_BACKEND=" in res.stderr, res.stderr[-2000:]


def test_default_cpu_backend_is_compiled_when_built():
    _need("cpp", "unit_stats")
    assert all(ops.active_backend(op, "cpu") == "cpp" for op in ops.OP_NAMES)
    # the dispatcher runs the cpp kernel for CPU tensors
    z, g = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(torch.ops.fair_pruner.unit_stats(z, g, 1),
                               torch.ops.fair_pruner_cpp.unit_stats(z, g, 1))


def test_cpp_extension_loads_where_ci_built_it():
    if os.environ.get("FAIR_PRUNER_REQUIRE_CPP") != "1":
        pytest.skip("only where .ci/run built the extension (FAIR_PRUNER_REQUIRE_CPP=1)")
    import fair_pruner._C  # noqa: F401
    assert "cpp" in ops.implementations("unit_stats")


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="shape"):
        ops.unit_stats(z, torch.randn(3, 2), 0)
    with pytest.raises(ValueError, match="out of range"):
        ops.unit_stats(z, z, 2)
    with pytest.raises(ValueError, match="floating"):
        ops.unit_stats(z.long(), z.long(), 0)
    with pytest.raises(ValueError, match="two classes"):
        ops.pairwise_w1_max(torch.randn(1, 2, 1, 3))
    with pytest.raises(ValueError, match="two classes"):
        ops.class_w1_max(torch.randn(1, 2, 1, 3), torch.tensor([2]), 2)
    with pytest.raises(ValueError, match=r"counts must lie in \[1, 2\]"):
        ops.class_w1_max(torch.randn(2, 2, 1, 3), torch.tensor([2, 3]), 2)
    with pytest.raises(ValueError, match="offsets"):
        ops.tod_overlap(torch.randn(3), torch.randn(3), torch.tensor([0, 2]))
    if "cpp" in ops.implementations("tod_overlap"):
        with pytest.raises(RuntimeError, match="non-decreasing"):
            torch.ops.fair_pruner_cpp.tod_overlap(torch.randn(3), torch.randn(3),
                                                  torch.tensor([0, 2, 1, 3]))


def test_ops_compile_with_torch_compile():
    fn = torch.compile(lambda z, g: ops.unit_stats(z, g, 1) * 2, backend="eager", fullgraph=True)
    z, g = torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    torch.testing.assert_close(fn(z, g), 2 * ops.unit_stats_ref(z, g, 1))


def test_score_rejects_nan_activations():
    """A NaN activation is a clear calibration error, not a silent NaN score."""
    import fair_pruner as fp
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = math.nan
    x = torch.randn(12, 1, 8, 8)
    y = torch.arange(12) % 3
    with pytest.raises(NonFiniteError):
        fp.score(model, [(x, y)], progress=False)


def test_missing_extension_falls_back_to_reference():
    """With fair_pruner._C unimportable, import works, ops warn once and use the reference."""
    block = "import sys\nsys.modules['fair_pruner._C'] = None  # `from . import _C` raises\n"
    res = _run(block +
               "import warnings, torch, fair_pruner\n"
               "from fair_pruner import ops\n"
               "with warnings.catch_warnings(record=True) as w:\n"
               "    warnings.simplefilter('always')\n"
               "    z = torch.randn(3, 4)\n"
               "    out = ops.unit_stats(z, z, 1)\n"
               "    ops.unit_stats(z, z, 1)\n"
               "assert ops.active_backend('unit_stats', 'cpu') == 'torch'\n"
               "assert torch.allclose(out, ops.unit_stats_ref(z, z, 1))\n"
               "assert sum('cpp backend unavailable' in str(x.message) for x in w) == 1, w\n")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run(block + "import torch\nfrom fair_pruner import ops\n"
               "ops.unit_stats(torch.randn(3, 4), torch.randn(3, 4), 1)\n",
               FAIR_PRUNER_BACKEND="cpp")      # forcing a missing backend is an error
    assert res.returncode != 0 and "FAIR_PRUNER_BACKEND=cpp" in res.stderr, res.stderr[-2000:]


def test_ops_are_not_differentiable_and_a_first_score_stays_light():
    """The ops run below autograd (their outputs never require grad), and a first fp.score of
    a small CNN in a fresh process pulls in neither torch._dynamo (a @custom_op's first call
    would), nor timm / torchvision (Torch-Pruning's FLOP counter), nor FSDP."""
    z = torch.randn(5, 7, requires_grad=True)
    assert not ops.unit_stats(z, torch.randn(5, 7), 1).requires_grad
    x = torch.randn(3, 4, 5, 2, requires_grad=True)
    assert not ops.class_quantiles(x, torch.tensor([4, 2, 1]), 3).requires_grad
    res = _run(
        "import sys, torch, torch.nn as nn\n"
        "import fair_pruner as fp\n"
        "m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(8, 4)).eval()\n"
        "data = [(torch.randn(16, 3, 8, 8), torch.arange(16) % 4)]\n"
        "book = fp.score(m, data, progress=False, samples_per_class=4, projections=8)\n"
        "fp.prune(m, fp.allocate(book, params=0.3))\n"
        "print([k for k in ('torch._dynamo', 'timm', 'torchvision', 'torch.distributed.fsdp')"
        " if k in sys.modules])\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
    # and Torch-Pruning still sees timm when the caller has imported it
    res = _run("import timm, torch\nfrom fair_pruner import graph\ntp = graph._torch_pruning()\n"
               "from torch_pruning.utils import op_counter\nprint(op_counter.has_timm)\n")
    assert res.returncode == 0 and res.stdout.strip().endswith("True"), res.stderr[-2000:]
