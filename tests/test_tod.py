"""ToD allocation: the O(n) event-time curve equals the authors' brute-force rule."""
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fair_pruner import ops
from fair_pruner.tod import ToDCurves, brute_force_m_hat


def _scores(rng, n, ties):
    if ties:
        return torch.tensor([float(rng.randint(0, 3)) for _ in range(n)])
    return torch.tensor([rng.random() for _ in range(n)])


@pytest.mark.parametrize("seed", range(300))
def test_curve_matches_brute_force(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(0, 40) for _ in range(rng.randint(1, 4))]
    ties = seed % 2 == 0
    us = [_scores(rng, n, ties) for n in sizes]
    rs = [_scores(rng, n, ties) for n in sizes]
    cap = rng.choice([0.99, 0.5, 0.9])
    curves = ToDCurves(us, rs, cap)
    alphas = [0.0, 0.05, rng.random(), 0.5, 1.0]
    got = curves.m_hat(alphas)
    for gi, (u, r) in enumerate(zip(us, rs)):
        for ai, a in enumerate(alphas):
            assert int(got[ai, gi]) == brute_force_m_hat(u, r, a, cap), (sizes, gi, a)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.floats(0, 1))
def test_overlap_curve_definition(vals, alpha):
    """overlap(m) is |lowU(m) ∩ highR(m)| for every m (ties by index)."""
    u = torch.tensor(vals, dtype=torch.float64)
    r = torch.tensor(list(reversed(vals)), dtype=torch.float64)
    curve = ToDCurves([u], [r]).curve(0)
    low = torch.argsort(u, stable=True).tolist()
    high = torch.argsort(-r, stable=True).tolist()
    for m in range(len(vals) + 1):
        assert int(curve[m]) == len(set(low[:m]) & set(high[:m]))


def test_monotone_in_alpha():
    g = torch.Generator().manual_seed(1)
    us = [torch.rand(50, generator=g) for _ in range(5)]
    rs = [torch.rand(50, generator=g) for _ in range(5)]
    m = ToDCurves(us, rs).m_hat(torch.linspace(0, 1, 101))
    assert (m[1:] >= m[:-1]).all()


def test_empty_and_single_groups():
    curves = ToDCurves([torch.zeros(0), torch.ones(1)], [torch.zeros(0), torch.ones(1)])
    assert curves.m_hat(1.0).tolist() == [0, 0]  # floor(0.99 * 1) = 0: never empty a group


def test_matches_authors_rule():
    """Same U and R vectors into network-pruner's get_ratios and ours: same per-layer counts."""
    pytest.importorskip("Network_Pruner")
    from Network_Pruner import get_ratios

    g = torch.Generator().manual_seed(3)
    sizes = [16, 37, 64, 128, 9]
    us = [torch.rand(n, generator=g) for n in sizes]
    rs = [torch.rand(n, generator=g) for n in sizes]
    results = {}
    for j, (u, r) in enumerate(zip(us, rs)):
        results[f"D_{j}_s2b_idx"] = torch.argsort(u).tolist()
        results[f"RE_{j}_hat_s2b_idx"] = torch.argsort(r).tolist()
    for alpha in (0.0, 0.05, 0.2, 0.5):
        theirs = get_ratios(None, results, layers2prune=list(range(len(sizes))), ToD_level=alpha)
        ours = ToDCurves(us, rs).m_hat(alpha).tolist()
        assert ours == theirs, alpha
