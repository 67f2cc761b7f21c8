"""Every compiled CPU backend of fair_pruner.ops against the pure-PyTorch reference.

Inputs come from hypothesis: odd sizes, size-1 and empty dims, non-contiguous and channels-last
layouts, fp16/bf16/fp64, ties and NaN/inf. Sums are checked against an fp64 oracle with a bound
relative to sum |terms|; sorts, ranks and selections must match exactly.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fair_pruner import ops
from fair_pruner.errors import NonFiniteError

HYP = settings(max_examples=40, deadline=None, derandomize=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cpu_backends(op):
    impls = ops.implementations(op)
    return [b for b in ("cpp",) if b in impls]


def _need(backend, op):
    impls = ops.implementations(op)
    if backend not in impls:
        pytest.skip(f"{backend} backend not built")
    return impls[backend]


# ------------------------------------------------------------------------------ layouts


@st.composite
def activation(draw, sides=(0, 1, 2, 3, 5, 7, 16, 33)):
    """(z, g, dim) in a random layout: contiguous, channels-last, transposed or sliced."""
    nd = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from(sides)) for _ in range(nd)]
    if draw(st.integers(0, 9)) > 0:  # mostly non-empty
        shape = [max(1, s) for s in shape]
    dim = draw(st.integers(-nd, nd - 1))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contig", "channels_last", "transposed", "sliced", "expanded"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ties = draw(st.booleans())

    def make():
        full = list(shape)
        if layout == "sliced":
            full = [s * 2 for s in shape]
        t = torch.randn(full, generator=gen)
        if ties:
            t = t.round()
        t = t.to(dtype)
        if layout == "sliced":
            t = t[tuple(slice(None, None, 2) for _ in shape)]
        elif layout == "channels_last" and nd == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed" and nd >= 2:
            t = t.transpose(0, nd - 1).contiguous().transpose(0, nd - 1)
        elif layout == "expanded" and nd >= 2 and shape[0] > 0:
            t = t[:1].expand(shape)
        return t

    return make(), make(), dim


def _oracle(z, g, dim):
    """fp64 rows (z*g, |z|, z, z^2) and their |.| scale for the tolerance."""
    d = dim % z.dim()
    other = [i for i in range(z.dim()) if i != d]
    zd, gd = z.double(), g.double()
    terms = [zd * gd, zd.abs(), zd, zd * zd]
    if z.numel() == 0:
        zero = torch.zeros(z.shape[d], dtype=torch.float64)
        return torch.stack([zero] * 4), torch.stack([zero] * 4)
    red = (lambda x: x.sum(dim=other)) if other else (lambda x: x)
    return torch.stack([red(t) for t in terms]), torch.stack([red(t.abs()) for t in terms])


def _assert_sums(got, exact, scale):
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    bound = 2e-5 * scale + 1e-6
    assert bool((err <= bound).all()), f"max err {float((err - bound).max())} over the bound"


@HYP
@given(activation())
def test_unit_stats_and_taylor_match_reference(case):
    z, g, dim = case
    exact, scale = _oracle(z, g, dim)
    for backend in ["torch"] + _cpu_backends("unit_stats"):
        us = ops.implementations("unit_stats")[backend](z, g, dim % z.dim())
        _assert_sums(us, exact, scale)
        ts = ops.implementations("taylor_sum")[backend](z, g, dim % z.dim())
        _assert_sums(ts, exact[0], scale[0])


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


@st.composite
def samples(draw, max_s=40, units=(0, 1, 2, 3, 7, 65), max_q=40):
    K = draw(st.integers(1, 4))
    S = draw(st.integers(1, max_s))
    U = draw(st.sampled_from(units))
    P = draw(st.sampled_from([1, 2, 3, 5]))
    q = draw(st.integers(1, max_q))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(K, S, U, P, generator=gen)
    if draw(st.booleans()):
        x = x.round()  # ties
    if draw(st.booleans()) and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=gen)
        flat[idx] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x = x.to(dtype)
    if draw(st.booleans()):
        x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # non-contiguous
    counts = torch.randint(1, S + 1, (K,), generator=gen)
    return x, counts, q


@HYP
@given(samples())
def test_class_quantiles_match_reference(case):
    x, counts, q = case
    ref = ops.class_quantiles_ref(x, counts, q)
    for backend in _cpu_backends("class_quantiles"):
        got = ops.implementations("class_quantiles")[backend](x, counts, q)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_class_quantiles_level_rule():
    x = torch.arange(10.0).flip(0).reshape(1, 10, 1, 1)
    out = ops.class_quantiles(x, torch.tensor([10]), 4)
    # index floor((10 (2i+1) - 1) / 8) of the sorted sample 0..9: 1, 3, 6, 8
    assert out.flatten().tolist() == [1.0, 3.0, 6.0, 8.0]


@st.composite
def sketches(draw, max_k=7, qs=(1, 3, 32, 600)):  # Q = 600: more than one staged chunk
    K = draw(st.integers(2, max_k))
    U = draw(st.sampled_from([0, 1, 3, 10]))
    P = draw(st.sampled_from([1, 2, 5]))
    Q = draw(st.sampled_from(qs))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sk = torch.randn(K, U, P, Q, generator=gen).sort(dim=-1).values
    if draw(st.booleans()):
        sk = sk.round()
    if draw(st.integers(0, 4)) == 0 and sk.numel():
        sk.view(-1)[torch.randint(0, sk.numel(), (1,), generator=gen)] = float("nan")
    sk = sk.to(dtype)
    if draw(st.booleans()):
        sk = sk.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    return sk


@HYP
@given(sketches())
def test_pairwise_w1_max_matches_reference(sk):
    ref = ops.pairwise_w1_max_ref(sk)
    for backend in _cpu_backends("pairwise_w1_max"):
        got = ops.implementations("pairwise_w1_max")[backend](sk)
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6, equal_nan=True)


def test_pairwise_w1_max_brute_force():
    sk = torch.randn(5, 4, 3, 6)
    want = torch.zeros(4)
    for u in range(4):
        want[u] = max((sk[a, u] - sk[b, u]).abs().mean() for a in range(5) for b in range(a + 1, 5))
    torch.testing.assert_close(ops.pairwise_w1_max(sk), want)


# ------------------------------------------------------------------------------ ToD


@st.composite
def groups(draw, sides=(0, 1, 2, 5, 17, 64, 65, 300)):
    sizes = draw(st.lists(st.sampled_from(sides), min_size=1, max_size=6))
    N = sum(sizes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["float", "ties", "tiny_diff"]))
    if kind == "ties":
        u = torch.randint(0, 5, (N,), generator=gen).double()
        r = torch.randint(-3, 3, (N,), generator=gen).double()
    elif kind == "tiny_diff":  # equal top bits, different low bits: the radix fix-up path
        u = 1.0 + torch.randint(0, 50, (N,), generator=gen).double() * 1e-15
        r = -1.0 - torch.randint(0, 50, (N,), generator=gen).double() * 1e-15
    else:
        u = torch.randn(N, generator=gen, dtype=torch.float64)
        r = torch.randn(N, generator=gen, dtype=torch.float64).exp()
    if draw(st.booleans()) and N:
        u[torch.randint(0, N, (2,), generator=gen)] = float("nan")
        r[torch.randint(0, N, (1,), generator=gen)] = -0.0
    if draw(st.booleans()):
        u, r = u.float(), r.float()
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes).cumsum(0)
    return u, r, offsets


ALPHAS = torch.tensor([0.0, 0.001, 0.01, 0.05, 0.1, 1 / 3, 0.5, 0.99, 1.0, 2.0, float("nan")],
                      dtype=torch.float64)


@HYP
@given(groups(), st.sampled_from([0.99, 0.5, 1.0, 0.0]))
def test_tod_overlap_and_select_match_reference(case, cap):
    u, r, offsets = case
    ref = ops.tod_overlap_ref(u, r, offsets)
    sel_ref = ops.tod_select_ref(ref, offsets, ALPHAS, cap)
    for backend in _cpu_backends("tod_overlap"):
        got = ops.implementations("tod_overlap")[backend](u, r, offsets)
        assert torch.equal(got, ref)
        sel = ops.implementations("tod_select")[backend](ref, offsets, ALPHAS, cap)
        assert torch.equal(sel, sel_ref)


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


def test_forced_backends(monkeypatch):
    z, g = torch.randn(4, 6), torch.randn(4, 6)
    ref = ops.taylor_sum_ref(z, g, 1)
    monkeypatch.setenv("FAIR_PRUNER_BACKEND", "torch")
    assert ops.active_backend("taylor_sum", "cpu") == "torch"
    torch.testing.assert_close(ops.taylor_sum(z, g, 1), ref)
    if "cpp" in ops.implementations("taylor_sum"):
        monkeypatch.setenv("FAIR_PRUNER_BACKEND", "cpp")
        assert ops.active_backend("unit_stats", "cpu") == "cpp"
        torch.testing.assert_close(ops.taylor_sum(z, g, 1), ref)
    monkeypatch.setenv("FAIR_PRUNER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FAIR_PRUNER_BACKEND"):
        ops.taylor_sum(z, g, 1)


def test_default_cpu_backend_is_compiled_when_built():
    if "cpp" in ops.implementations("unit_stats"):
        assert ops.active_backend("unit_stats", "cpu") == "cpp"


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
    import subprocess
    import sys
    code = (
        "import sys, warnings\n"
        "sys.modules['fair_pruner._C'] = None  # makes `from . import _C` raise ImportError\n"
        "import torch, fair_pruner\n"
        "from fair_pruner import ops\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    z = torch.randn(3, 4)\n"
        "    out = ops.unit_stats(z, z, 1)\n"
        "    ops.unit_stats(z, z, 1)\n"
        "assert ops.active_backend('unit_stats', 'cpu') == 'torch'\n"
        "assert torch.allclose(out, ops.unit_stats_ref(z, z, 1))\n"
        "assert sum('cpp backend unavailable' in str(x.message) for x in w) == 1, w\n"
        "import os\n"
        "os.environ['FAIR_PRUNER_BACKEND'] = 'cpp'  # forcing a missing backend is an error\n"
        "try:\n"
        "    ops.unit_stats(z, z, 1)\n"
        "    raise SystemExit('forced missing backend did not raise')\n"
        "except RuntimeError as e:\n"
        "    assert 'FAIR_PRUNER_BACKEND=cpp' in str(e), e\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
