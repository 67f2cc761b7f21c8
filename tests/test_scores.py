"""U-Score and R-Score against direct computations; determinism; multi-pass U; the book on disk."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fair_pruner as fp
from fair_pruner.engine import module_seed
from helpers import TinyCNN, TinyMLP, batches, randomize_bn


def _w1(a, b):
    return (a.sort().values - b.sort().values).abs().mean()


def _direct_r(model, loader, module, signed=False):
    """R by brute force: full-set gradient of the summed loss w.r.t. the module's output."""
    total = None
    for x, y in loader:
        store = {}
        h = module.register_forward_hook(lambda m, i, o: store.setdefault("z", o))
        out = model(x)
        h.remove()
        z = store["z"]
        g, = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), z)
        dims = [d for d in range(z.dim()) if d != (1 if z.dim() > 2 else 1)]
        t = (z * g).sum(dim=dims).double()
        total = t if total is None else total + t
    return total if signed else total.abs()


def test_scalar_units_exact():
    """Linear units: U = max over class pairs of exact 1-D W1 of the unit's outputs; R exact."""
    torch.manual_seed(0)
    model = TinyMLP(d_in=5, hidden=9, num_classes=3).eval()
    x = torch.randn(30, 5)
    y = torch.arange(30) % 3
    loader = batches(x, y, 7)  # odd batch size
    book = fp.score(model, loader, samples_per_class=10, progress=False)
    g = book.groups[0]
    assert g.name == "fc1" and g.size == 9
    with torch.no_grad():
        h = model.fc1(x)
    want = torch.stack([
        torch.stack([_w1(h[y == a, j], h[y == b, j]) for a, b in itertools.combinations(range(3), 2)]).max()
        for j in range(9)]).double()
    torch.testing.assert_close(g.u, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.r, _direct_r(model, loader, model.fc1), rtol=1e-5, atol=1e-7)


def test_map_units_sliced_w1():
    """Conv channels: sliced W1 with the layer's seeded directions, reproduced by hand."""
    torch.manual_seed(0)
    model = randomize_bn(TinyCNN(num_classes=4)).eval()
    x = torch.randn(24, 3, 8, 8)
    y = torch.arange(24) % 4
    loader = batches(x, y, 8)
    P = 16
    book = fp.score(model, loader, samples_per_class=6, projections=P, seed=5, progress=False)
    g = book.group("conv1")
    with torch.no_grad():
        z = model.conv1(x).reshape(24, 6, -1)
    gen = torch.Generator().manual_seed(module_seed(5, "conv1"))
    theta = F.normalize(torch.randn(64, P, generator=gen), dim=0)
    proj = z @ theta  # [N, C, P]
    want = []
    for c in range(6):
        best = 0.0
        for a, b in itertools.combinations(range(4), 2):
            d = torch.stack([_w1(proj[y == a, c, p], proj[y == b, c, p]) for p in range(P)]).mean()
            best = max(best, float(d))
        want.append(best)
    torch.testing.assert_close(g.u, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.r, _direct_r(model, loader, model.conv1), rtol=1e-4, atol=1e-7)


def test_pooled_mode():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    x = torch.randn(24, 3, 8, 8)
    y = torch.arange(24) % 4
    book = fp.score(model, batches(x, y, 8), samples_per_class=6, u_mode="pooled", progress=False)
    with torch.no_grad():
        pooled = model.conv1(x).mean(dim=(2, 3))
    want = torch.stack([
        torch.stack([_w1(pooled[y == a, c], pooled[y == b, c])
                     for a, b in itertools.combinations(range(4), 2)]).max() for c in range(6)])
    torch.testing.assert_close(book.group("conv1").u, want.double(), rtol=1e-5, atol=1e-6)


def test_residual_group_joint_scores():
    """Coupled producers of a residual stream: R = |sum of members' signed terms|, U = max."""
    import torchvision
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=4)).eval()
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 4
    loader = batches(x, y, 8)
    book = fp.score(model, loader, samples_per_class=2, projections=4, progress=False)
    g = next(g for g in book.groups if g.spec.root == "layer4.0.downsample.0")
    members = {m.module for m in g.spec.producers}
    assert members == {"layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"}
    assert g.name == "layer4.0.downsample.0+2"        # the name says it covers 3 producers
    signed = sum(_direct_r(model, loader, model.get_submodule(m), signed=True) for m in members)
    torch.testing.assert_close(g.r, signed.abs(), rtol=1e-4, atol=1e-6)
    solo = fp.score(model, loader, samples_per_class=2, projections=4, progress=False,
                    ignore=["layer4.1.conv1"])  # an unrelated ignore: U unchanged
    torch.testing.assert_close(solo.group(g.name).u, g.u)


def test_deterministic_and_seeded():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    loader = batches(torch.randn(40, 3, 8, 8), torch.arange(40) % 4, 8)
    kw = dict(samples_per_class=3, projections=8, progress=False)
    a = fp.score(model, loader, seed=1, **kw)
    b = fp.score(model, loader, seed=1, **kw)
    c = fp.score(model, loader, seed=2, **kw)
    for ga, gb in zip(a.groups, b.groups):
        for s in ga.signals:
            assert torch.equal(ga.signals[s], gb.signals[s])
    assert fp.allocate(a, params=0.3).removed == fp.allocate(b, params=0.3).removed
    assert any(not torch.equal(ga.u, gc.u) for ga, gc in zip(a.groups, c.groups))


def test_memory_budget_passes_match_single_pass():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    loader = batches(torch.randn(40, 3, 8, 8), torch.arange(40) % 4, 8)
    kw = dict(samples_per_class=3, projections=8, progress=False, seed=3)
    one = fp.score(model, loader, **kw)
    with pytest.warns(UserWarning):
        many = fp.score(model, loader, memory_budget=100, **kw)
    assert one.meta["u_passes"] == 1 and many.meta["u_passes"] > 1
    for ga, gb in zip(one.groups, many.groups):
        torch.testing.assert_close(ga.u, gb.u)
        torch.testing.assert_close(ga.r, gb.r)


def test_shuffled_loader_with_several_passes_is_an_error():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8), torch.arange(40) % 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    with pytest.raises(fp.CalibrationDataError, match="deterministic"):
        with pytest.warns(UserWarning):
            fp.score(model, loader, samples_per_class=3, projections=4, memory_budget=100,
                     progress=False)


def test_book_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    book = fp.score(model, loader, samples_per_class=3, projections=4, progress=False)
    path = tmp_path / "book.safetensors"
    book.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["book.safetensors"]  # no temp file left
    again = fp.ScoreBook.load(path)
    assert again.meta == book.meta
    for ga, gb in zip(book.groups, again.groups):
        assert ga.name == gb.name and ga.size == gb.size and ga.spec == gb.spec
        for s in ga.signals:
            assert torch.equal(ga.signals[s], gb.signals[s])
    p1, p2 = fp.allocate(book, params=0.3), fp.allocate(again, params=0.3)
    assert p1 == p2
    pruned = fp.prune(model, p2)
    assert sum(p.numel() for p in pruned.parameters()) == p2.params_after


def test_dict_batches_and_dataloader():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    x, y = torch.randn(24, 3, 8, 8), torch.arange(24) % 4
    a = fp.score(model, [{"inputs": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 24, 8)],
                 samples_per_class=3, projections=4, progress=False)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    b = fp.score(model, dl, samples_per_class=3, projections=4, progress=False)
    for ga, gb in zip(a.groups, b.groups):
        torch.testing.assert_close(ga.u, gb.u)
        torch.testing.assert_close(ga.r, gb.r)


def test_custom_signal_plugs_in():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)

    @fp.signal("neg_bias")
    def neg_bias(stats):
        return -stats.bias.double()

    book = fp.score(model, loader, samples_per_class=3, projections=4, progress=False,
                    signals=[neg_bias])
    assert "neg_bias" in book.signal_names
    torch.testing.assert_close(book.group("conv1").signals["neg_bias"],
                               -model.conv1.bias.detach().double())
    for sig in ("neg_bias", "l1", "l2", "activation", "random"):
        plan = fp.allocate(book, params=0.2, signal=sig)
        assert plan.signal == sig and plan.params_reduction >= 0.2
    book.set_signal("mine", {g.name: torch.arange(g.size) for g in book.groups})
    plan = fp.allocate(book, units=0.3, signal="mine", strategy="uniform")
    for g in book.groups:
        k = len(plan.removed[g.name])
        assert plan.removed[g.name] == list(range(k))  # lowest scores first


def test_prune_in_rounds_reaches_target():
    torch.manual_seed(0)
    model = randomize_bn(TinyCNN(num_classes=4)).eval()
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    calls = []
    pruned, plans = fp.prune_in_rounds(model, loader, params=0.6, rounds=2,
                                       finetune=lambda m, i: calls.append(i),
                                       samples_per_class=3, projections=4, progress=False)
    assert len(plans) == 2 and calls == [1]
    p0 = sum(p.numel() for p in model.parameters())
    p1 = sum(p.numel() for p in pruned.parameters())
    assert p1 == plans[-1].params_after and 1 - p1 / p0 >= 0.6
    assert plans[1].params_before == plans[0].params_after


def test_reservoir_stores_a_slot_once_per_batch_and_keeps_the_last_sample():
    from fair_pruner.engine import Reservoir
    res = Reservoir([0], per_class=2, seed=3)
    res.offer([0, 0], 0)                                   # fills both slots
    rows = res.offer([0] * 400, 2)                         # many replacements in one batch
    slots = [(k, s) for _, k, s in rows]
    assert len(slots) == len(set(slots)) and rows
    for row, k, s in rows:                                 # the row stored is the final owner
        assert res.final[2 + row] == (k, s)
    assert sorted(res.final.values()) == [(0, 0), (0, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (5, 0), (0, 4), (33, 301)])
def test_weight_norm_signals_match_the_float64_reference(dtype, shape):
    """l1 / l2 accumulate in float64 without a float64 copy of the weights: equal to summing
    |w|^p of the float64 weights (and bias), on odd, empty and non-contiguous weights."""
    from fair_pruner.signals import UnitStats, WeightNorm
    g = torch.Generator().manual_seed(3)
    full = (torch.randn(shape[1], shape[0], generator=g) * 3).to(dtype)
    w = full.t()                                             # non-contiguous [units, fan_in]
    z = torch.zeros(shape[0], dtype=torch.float64)
    for bias in (None, torch.randn(shape[0], generator=g).to(dtype)):
        st = UnitStats("m", w, bias, z, z, z, z)
        ref_w = w.double() if bias is None else torch.cat([w.double(), bias.double()[:, None]], 1)
        for p in (1, 2, 3):
            got = WeightNorm(p)(st)
            want = ref_w.abs().pow(p).sum(dim=1)
            assert got.dtype == torch.float64 and got.shape == (shape[0],)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_units_with_few_positions_store_features_and_project_at_the_end(monkeypatch):
    """A unit with D <= projections positions keeps its D values per sample and is projected
    onto the same seeded directions when its U-Score is computed: the same U as projecting
    every sample as it arrives, at D / P of the memory."""
    from fair_pruner import engine
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    data = batches(torch.randn(40, 3, 8, 8), torch.arange(40) % 4, 10)
    kw = dict(samples_per_class=5, projections=96, progress=False)   # conv maps: D = 8 x 8
    stored = []
    real = engine.store_samples

    def spy(p, z, rows, sampling, batch_rows=None):
        real(p, z, rows, sampling, batch_rows)
        if p.buf is not None:
            stored.append((p.name, p.buf.shape[-1]))
    monkeypatch.setattr(engine, "store_samples", spy)
    import fair_pruner.calibrate as cal
    monkeypatch.setattr(cal, "store_samples", spy)
    deferred = fp.score(model, data, **kw)
    widths = dict(stored)
    assert any(1 < w < 96 for w in widths.values()), widths      # some unit kept raw features
    orig = engine.sketch_features

    def project_now(p, z, projections, u_mode, seed):
        out = orig(p, z, projections, u_mode, seed)
        if p.directions is not None and out.shape[-1] == p.directions.shape[0] != 1:
            out = torch.matmul(out.to(p.directions.dtype), p.directions)
        return out
    monkeypatch.setattr(engine, "sketch_features", project_now)
    eager = fp.score(model, data, **kw)
    for a, b in zip(deferred.groups, eager.groups):
        assert float(b.u.abs().max()) > 0
        torch.testing.assert_close(a.u, b.u, rtol=1e-6, atol=1e-9)
