"""The U-Score's classes follow the calibration data, not the model's number of outputs."""
import itertools
import random

import pytest
import torch

import fair_pruner as fp
from fair_pruner.calibrate import _DataClasses
from helpers import TinyCNN, TinyMLP, batches

KW = dict(projections=4, progress=False)


def _w1(a, b):
    return (a.sort().values - b.sort().values).abs().mean()


def _direct_u(model, x, y, classes):
    """U of fc1's units by brute force: max over pairs of ``classes`` of the exact 1-D W1."""
    with torch.no_grad():
        h = model.fc1(x)
    return torch.stack([
        torch.stack([_w1(h[y == a, j], h[y == b, j])
                     for a, b in itertools.combinations(classes, 2)]).max()
        for j in range(h.shape[1])]).double()


def _data(labels, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    return torch.randn(len(y), d_in, generator=g) + y[:, None].float() * 0.1, y


def test_model_with_more_outputs_than_the_data_has_classes():
    torch.manual_seed(0)
    model = TinyMLP(d_in=5, hidden=9, num_classes=20).eval()
    x, y = _data([3, 7, 11] * 10)
    book = fp.score(model, batches(x, y, 7), samples_per_class=10, **KW)
    assert book.meta["classes_used"] == [3, 7, 11]
    assert book.meta["classes"] == [3, 7, 11] and book.meta["class_counts"] == [10, 10, 10]
    assert book.meta["labels_found"] == 3 and book.meta["num_classes"] == 20
    torch.testing.assert_close(book.groups[0].u, _direct_u(model, x, y, [3, 7, 11]),
                               rtol=1e-5, atol=1e-6)


def test_all_present_classes_under_max_classes_are_used():
    torch.manual_seed(0)
    model = TinyMLP(d_in=5, hidden=6, num_classes=1000).eval()
    present = sorted(random.Random(1).sample(range(1000), 80))
    labels = present * 2
    random.Random(2).shuffle(labels)
    x, y = _data(labels)
    book = fp.score(model, batches(x, y, 32), samples_per_class=2, max_classes=100, **KW)
    assert book.meta["classes_used"] == present
    assert book.meta["labels_found"] == 80


def test_a_seeded_subset_when_the_data_has_more_classes_than_max_classes():
    torch.manual_seed(0)
    model = TinyMLP(d_in=5, hidden=6, num_classes=50).eval()
    labels = [c for c in range(30) for _ in range(3)]
    random.Random(0).shuffle(labels)
    x, y = _data(labels)
    kw = dict(samples_per_class=3, max_classes=8, **KW)
    used = {}
    for seed in range(4):
        book = fp.score(model, batches(x, y, 9), seed=seed, **kw)
        used[seed] = book.meta["classes_used"]
        assert len(used[seed]) == 8 and set(used[seed]) <= set(range(30))
        # Exactly those classes' samples (all of them: 3 per class) make the U-Score.
        torch.testing.assert_close(book.groups[0].u, _direct_u(model, x, y, used[seed]),
                                   rtol=1e-5, atol=1e-6)
    assert len({tuple(v) for v in used.values()}) > 1          # the seed picks the subset
    # The subset depends on the seed and the labels present, not on batch sizes or order.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    for bs, (xx, yy) in ((1, (x, y)), (90, (x, y)), (9, (x[perm], y[perm]))):
        book = fp.score(model, batches(xx, yy, bs), seed=0, **kw)
        assert book.meta["classes_used"] == used[0]
        torch.testing.assert_close(book.groups[0].u, _direct_u(model, x, y, used[0]),
                                   rtol=1e-5, atol=1e-6)


def test_book_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=30).eval()
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 25, (120,), generator=g)
    loader = batches(torch.randn(120, 3, 8, 8, generator=g), y, 16)
    kw = dict(samples_per_class=3, max_classes=6, projections=4, progress=False)
    a, b = fp.score(model, loader, seed=4, **kw), fp.score(model, loader, seed=4, **kw)
    c = fp.score(model, loader, seed=5, **kw)
    assert a.meta["classes_used"] == b.meta["classes_used"]
    for ga, gb in zip(a.groups, b.groups):
        for s in ga.signals:
            assert torch.equal(ga.signals[s], gb.signals[s]), (ga.name, s)
    assert (a.meta["classes_used"] != c.meta["classes_used"]
            or any(not torch.equal(ga.u, gc.u) for ga, gc in zip(a.groups, c.groups)))
    # Later U passes replay exactly the samples pass 1 kept (none of a class pushed out).
    with pytest.warns(UserWarning):
        many = fp.score(model, loader, seed=4, memory_budget=100, **kw)
    assert many.meta["u_passes"] > 1
    for ga, gm in zip(a.groups, many.groups):
        torch.testing.assert_close(ga.u, gm.u)


def test_several_u_passes_use_the_classes_found():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=20).eval()
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([2, 9, 13, 17] * 10)
    loader = batches(torch.randn(40, 3, 8, 8, generator=g), y, 8)
    kw = dict(samples_per_class=3, projections=8, progress=False, seed=3)
    one = fp.score(model, loader, **kw)
    with pytest.warns(UserWarning):
        many = fp.score(model, loader, memory_budget=100, **kw)
    assert many.meta["u_passes"] > 1 and many.meta["classes_used"] == [2, 9, 13, 17]
    for ga, gb in zip(one.groups, many.groups):
        torch.testing.assert_close(ga.u, gb.u)


def test_one_class_is_a_clear_error():
    model = TinyCNN(num_classes=10).eval()
    with pytest.raises(fp.CalibrationDataError,
                       match=r"at least two classes.*has 1 distinct label \(samples per label: "
                             r"\{4: 8\}\).*at least two classes"):
        fp.score(model, [(torch.randn(8, 3, 8, 8), torch.full((8,), 4))],
                 samples_per_class=3, **KW)


def test_too_small_max_classes_names_the_option():
    """The two labels the seed keeps have one sample each, others have plenty."""
    model = TinyMLP(d_in=5, hidden=4, num_classes=10).eval()
    res = _DataClasses(2, 3, seed=0)
    lo = sorted(range(10), key=res._key)
    labels = lo[:2] + [lo[5]] * 4 + [lo[6]] * 4
    x, y = _data(labels)
    with pytest.raises(fp.CalibrationDataError, match=r"has 4 distinct labels.*raise max_classes"):
        fp.score(model, batches(x, y, 5), samples_per_class=3, max_classes=2, **KW)
