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


def _linear_book(sigs, unit_cost):
    """A book of groups with one signal 'u' (and 'r') and params = Σ units x unit_cost."""
    from fair_pruner.cost import CostBuilder
    from fair_pruner.scorebook import Group, GroupSpec, ScoreBook

    b = CostBuilder()
    groups = []
    for gi, (v, c) in enumerate(zip(sigs, unit_cost)):
        v = torch.as_tensor(v, dtype=torch.float64)
        b.dim(("g", gi), size=v.numel(), group=gi, width=1.0)
        b.term(float(c), [("g", gi)])
        groups.append(Group(f"g{gi}", v.numel(), {"u": v, "r": v.flip(0)},
                            GroupSpec(f"g{gi}", v.numel())))
    return ScoreBook(groups, b.build(), {"kind": "test"})


def test_global_strategy_is_one_threshold_over_all_groups():
    import fair_pruner as fp
    g = torch.Generator().manual_seed(0)
    sigs = [torch.randn(7, generator=g), torch.randn(20, generator=g) + 1.0,
            torch.randn(1, generator=g)]
    book = _linear_book(sigs, [3.0, 1.0, 5.0])
    for target in (0.1, 0.3, 0.6):
        plan = fp.allocate(book, params=target, strategy="global")
        t = plan.meta["global_threshold"]
        assert plan.params_reduction >= target - 1e-12
        for v, gr in zip(sigs, book.groups):
            want = sorted(torch.nonzero(v.double() <= t).flatten().tolist())
            want = sorted(want, key=lambda i: float(v[i]))[: int(0.99 * v.numel())]
            assert plan.removed[gr.name] == sorted(want)
        # the smallest threshold that reaches the target: the next lower candidate falls short
        below = [float(x) for v in sigs for x in v if float(x) < t]
        if below:
            kept = {gr.name: int((v.double() <= max(below)).sum()) for v, gr in zip(sigs, book.groups)}
            p_rm = sum(min(k, int(0.99 * gr.size)) * c for (gn, k), gr, c in
                       zip(kept.items(), book.groups, [3.0, 1.0, 5.0]))
            assert p_rm / (7 * 3 + 20 + 5) < target
    assert plan.removed["g2"] == []               # 1-unit group: cap 0.99 keeps it
    with pytest.raises(fp.TargetError, match="needs a target"):
        fp.allocate(book, strategy="global")
