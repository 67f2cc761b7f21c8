"""Nothing silently wrong on the model side: what fair_pruner accepts it prunes exactly (pruned ==
masked on jittered weights, plan params == real params); what it cannot, it refuses before
scoring with an UnsupportedModelError (or CalibrationDataError) naming the module and the fix."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fair_pruner as fp
from helpers import randomize_bn
from fair_pruner import calibrate

KW = dict(samples_per_class=3, projections=4, progress=False)


def _jitter(model, seed=0):
    """Non-trivial weights everywhere (zero heads / zero GRN gammas would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return randomize_bn(model, seed).eval()


def _loader(shape, n=24, classes=4, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % classes
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


class _Spy(nn.Module):
    """Counts forwards on calibration batches (the probe and the trace use one sample), so a
    test can tell a refusal came before any calibration work."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += int(x.shape[0] > 1)
        return self.model(x)


def _refused(model, loader, match, **kw):
    with pytest.raises(fp.UnsupportedModelError, match=match) as e:
        fp.score(model, loader, **{**KW, **kw})
    return str(e.value)


def _exact(model, loader, x, target=0.3):
    book = fp.score(model, loader, **KW)
    plan = fp.allocate(book, params=target)
    pruned, masked = fp.prune(model, plan), fp.mask(model, plan, book)
    with torch.no_grad():
        a, b = pruned(x), masked(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * b.abs().max().clamp(min=1e-3)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    return book, plan, pruned


# --------------------------------------------------------------------------------------------
# Item 1: the real classifier head is protected, wherever the logits come from
# --------------------------------------------------------------------------------------------

class LogSoftmaxWithAux(nn.Module):
    """The real head goes through log_softmax; an auxiliary head with as many outputs runs
    after it (the old fallback protected the aux head and pruned the real one)."""

    def __init__(self, nc=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, nc)
        self.aux = nn.Linear(6, nc)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return F.log_softmax(self.fc(h), -1), self.aux(h)


class Temperature(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, nc)
        self.proj = nn.Linear(6, nc)      # runs last, num_classes outputs, feeds the logits

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(h) / 2.0 + 0.5 * self.proj(h)


@pytest.mark.parametrize("cls", [LogSoftmaxWithAux, Temperature])
def test_real_head_is_protected(cls):
    torch.manual_seed(0)
    model = _jitter(cls())
    x = torch.randn(3, 3, 6, 6)
    book, plan, pruned = _exact(model, _loader((3, 6, 6)), x)
    names = {g.name for g in book.groups}
    assert "fc" not in names and book.meta["output_layer"] == "fc"
    assert pruned.fc.out_features == 4
    protected = "aux" if cls is LogSoftmaxWithAux else "proj"
    assert protected in book.meta["output_layers"] and getattr(pruned, protected).out_features == 4


def test_frozen_model_head_found():
    torch.manual_seed(0)
    model = _jitter(Temperature()).requires_grad_(False)
    book = fp.score(model, _loader((3, 6, 6)), **KW)
    assert set(book.meta["output_layers"]) == {"fc", "proj"}


class DictFeatures(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv = nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6, nc)

    def forward(self, x):
        h = F.relu(self.conv(F.relu(self.conv0(x)))).mean((2, 3))
        return {"features": h, "scores": self.fc(h)}


def test_dict_output_without_logits_is_refused():
    spy = _Spy(DictFeatures().eval())
    msg = _refused(spy, _loader((3, 6, 6)), "no 'logits'")
    assert "loss_fn" in msg and "features" in msg
    assert spy.calls == 0


def test_dict_output_with_loss_fn_and_num_classes():
    torch.manual_seed(0)
    model = _jitter(DictFeatures())
    book = fp.score(model, _loader((3, 6, 6)), num_classes=4,
                    loss_fn=lambda out, y: F.cross_entropy(out["scores"], y, reduction="sum"),
                    **KW)
    # every layer feeding a returned tensor (the features too) keeps its width
    assert set(book.meta["output_layers"]) == {"fc", "conv"}
    assert [g.name for g in book.groups] == ["conv0"]


# --------------------------------------------------------------------------------------------
# Item 2: U-Scores never come from uninitialised memory; a changing loader is detected
# --------------------------------------------------------------------------------------------

class _Shrinking:
    """Yields all batches on the first pass, fewer afterwards."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes == 1 else self.batches[:1])


class _Augmenting:
    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        g = torch.Generator().manual_seed(self.passes)
        return iter([(x + 0.01 * torch.randn(x.shape, generator=g), y) for x, y in self.batches])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(),
                         nn.Linear(7, 3)).eval()


def _mlp_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g), torch.arange(30) % 3
    return [(x[i:i + 6], y[i:i + 6]) for i in range(0, 30, 6)]


SMALL_BUDGET = 200        # bytes: each layer's U samples in a pass of its own


def test_extra_passes_used_and_match():
    a = fp.score(_mlp(), _mlp_loader(), memory_budget=SMALL_BUDGET, **KW)
    b = fp.score(_mlp(), _mlp_loader(), **KW)
    assert a.meta["u_passes"] > 1
    for ga, gb in zip(a.groups, b.groups):
        torch.testing.assert_close(ga.u, gb.u)
        assert float(ga.u.abs().max()) < 1e3


def test_fewer_batches_on_a_later_pass():
    with pytest.raises(fp.CalibrationDataError, match="batches on a later pass") as e:
        fp.score(_mlp(), _Shrinking(_mlp_loader()), memory_budget=SMALL_BUDGET, **KW)
    assert "shuffle=False" in str(e.value) and "memory_budget" in str(e.value)


def test_augmenting_loader_detected():
    with pytest.raises(fp.CalibrationDataError, match="other inputs.*augmentation"):
        fp.score(_mlp(), _Augmenting(_mlp_loader()), memory_budget=SMALL_BUDGET, **KW)


def test_one_shot_generator_needing_passes():
    gen = (b for b in _mlp_loader())
    with pytest.raises(fp.CalibrationDataError, match="one-shot"):
        fp.score(_mlp(), gen, memory_budget=SMALL_BUDGET, **KW)


@pytest.mark.parametrize("budget", [-1, 0, float("nan"), float("inf"), True, "4GB"])
def test_bad_memory_budget(budget):
    with pytest.raises(fp.CalibrationDataError, match="memory_budget"):
        fp.score(_mlp(), _mlp_loader(), memory_budget=budget, **KW)


def test_unfilled_sample_places_raise():
    """The engine refuses to compute U from sample places no pass stored."""
    from fair_pruner.engine import Reservoir, Sampling, SketchTap, finish_u, store_samples

    class T(SketchTap):
        def to_units_last(self, z):
            return z[:, :, None]

    res = Reservoir([0, 1], 4, 0)
    rows = res.offer([0, 0, 1, 1, 0, 1], 0)
    t = T("t")
    store_samples(t, torch.randn(6, 3), [r for r in rows if r[0] < 4],
                  Sampling((0, 1), 4, 1, "sliced", 0))          # rows 4, 5 never stored
    with pytest.raises(fp.CalibrationDataError, match="not all collected"):
        finish_u(t, res, [0, 1])


def test_sample_buffers_hold_the_samples_found_and_give_the_same_book(monkeypatch):
    """U buffers grow with the samples found, not to samples_per_class (S = 32 here); U passes
    after pass 1 are planned for and hold the fullest class's count; the book equals the one
    with full S-row buffers (Q = S quantiles either way), with one pass or many."""
    import fair_pruner.engine as engine
    kw = dict(KW, samples_per_class=32)
    rows = []
    real_finish = engine.finish_u

    def finish(p, res, classes):
        rows.append(p.buf.shape[1])
        return real_finish(p, res, classes)
    monkeypatch.setattr(engine, "finish_u", finish)     # finish_u_all calls it
    grown = fp.score(_mlp(), _mlp_loader(), **kw)
    # 30 samples, 3 classes, batches of 2 per class: pass 1 doubles 2 -> 4 -> 8 -> 16; a later
    # pass (the small budget) allocates the 10 it needs
    assert rows and set(rows) == {16}
    rows.clear()
    fp.score(_mlp(), _mlp_loader(), memory_budget=SMALL_BUDGET, **kw)
    assert rows[0] == 16 and set(rows[1:]) == {10}
    rows.clear()
    real_grow = engine.SketchTap.grow_samples
    monkeypatch.setattr(engine.SketchTap, "grow_samples",
                        lambda self, r, *a: real_grow(self, 32, *a))
    full = fp.score(_mlp(), _mlp_loader(), **kw)
    assert set(rows[len(rows) // 2:]) == {32}
    many = fp.score(_mlp(), _mlp_loader(), memory_budget=SMALL_BUDGET, **kw)
    for a, b, c in zip(grown.groups, full.groups, many.groups):
        assert torch.equal(a.u, b.u)
        # a U pass forwards the selected samples only: the same to float rounding
        torch.testing.assert_close(a.u, c.u, rtol=1e-6, atol=1e-7)
        assert torch.equal(a.r, b.r)


# --------------------------------------------------------------------------------------------
# Items 4 and 6, issue 12: attention, recurrent, transposed conv, GroupNorm: refused up front
# --------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                                    batch_first=True), 1)
        self.fc = nn.Linear(8, nc)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x)).mean(1))


class WithMHA(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, nc)

    def forward(self, x):
        h = self.emb(x)
        return self.fc((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize("cls, name", [(Encoder, "enc.layers.0.self_attn"), (WithMHA, "attn")])
def test_multihead_attention_refused_before_scoring(cls, name):
    spy = _Spy(cls().eval())
    msg = _refused(spy, _loader((3, 5)), "MultiheadAttention")
    assert name in msg and "not supported yet" in msg and "ignore=" in msg
    assert spy.calls == 0


class Recurrent(nn.Module):
    def __init__(self, kind, nc=4):
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.rnn = kind(8, 6, batch_first=True)
        self.fc = nn.Linear(6, nc)

    def forward(self, x):
        return self.fc(self.rnn(F.relu(self.emb(x)))[0][:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_refused(kind):
    spy = _Spy(Recurrent(kind).eval())
    msg = _refused(spy, _loader((3, 5)), "recurrent")
    assert f"rnn ({kind.__name__})" in msg
    assert spy.calls == 0


class Transposed(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.c2 = nn.Conv2d(5, 7, 3)
        self.fc = nn.Linear(7, nc)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.up(F.relu(self.c1(x)))))).mean((2, 3)))


def test_conv_transpose_refused_and_fix_works():
    torch.manual_seed(0)
    model = _jitter(Transposed())
    loader = _loader((3, 6, 6))
    msg = _refused(model, loader, "up \\(ConvTranspose2d\\)")
    assert "ignore=['c1']" in msg
    book = fp.score(model, loader, ignore=["c1"], **KW)
    plan = fp.allocate(book, params=0.1)
    assert sum(p.numel() for p in fp.prune(model, plan).parameters()) == plan.params_after


class WithGroupNorm(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, nc)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.gn(self.c1(x))))).mean((2, 3)))


def test_group_norm_refused():
    msg = _refused(WithGroupNorm().eval(), _loader((3, 6, 6)), "gn \\(nn.GroupNorm\\)")
    assert "ignore=['c1']" in msg


# --------------------------------------------------------------------------------------------
# Item 7: shared weights and modules called twice
# --------------------------------------------------------------------------------------------

class Tied(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.fc0 = nn.Linear(5, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, nc)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(torch.relu(self.fc0(x)))))))


class Twice(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.fc0 = nn.Linear(5, 6)
        self.mid = nn.Linear(6, 6)
        self.fc = nn.Linear(6, nc)

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return self.fc(torch.relu(self.mid(h)) + torch.relu(self.mid(2 * h)))


def test_tied_weights_refused():
    spy = _Spy(Tied().eval())
    msg = _refused(spy, _loader((5,)), "shares a parameter")
    assert "model.b shares a parameter with ['model.a']" in msg
    assert spy.calls == 0


def test_module_called_twice_refused():
    msg = _refused(Twice().eval(), _loader((5,)), "mid runs 2 times per forward")
    assert "ignore=" in msg


def test_dead_branch_refused():
    class Dead(LogSoftmaxWithAux):
        def forward(self, x):
            h = F.relu(self.conv(x)).mean((2, 3))
            self.aux(h)
            return self.fc(h)
    _refused(Dead().eval(), _loader((3, 6, 6)), "aux.*dead branch")


# --------------------------------------------------------------------------------------------
# Issue 12: cheap operations that remove more than the group, cross-channel norms
# --------------------------------------------------------------------------------------------

class Ghost(nn.Module):
    """GhostNet's module: primary conv, a depthwise 'cheap' conv on its output, concatenated and
    sliced to ``oup`` channels (an odd oup makes the slice drop a cheap channel)."""

    def __init__(self, inp, oup, ratio=2):
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / ratio)
        self.primary = nn.Sequential(nn.Conv2d(inp, init, 1, bias=False), nn.BatchNorm2d(init),
                                     nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init * (ratio - 1), 3, 1, 1, groups=init,
                                             bias=False), nn.BatchNorm2d(init), nn.ReLU())

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.oup]


class GhostNet(nn.Module):
    def __init__(self, oup=11, nc=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g = Ghost(8, oup)
        self.c = nn.Conv2d(oup, 6, 3, padding=1)
        self.fc = nn.Linear(6, nc)

    def forward(self, x):
        return self.fc(F.relu(self.c(self.g(F.relu(self.stem(x))))).mean((2, 3)))


def test_ghost_module_slice_refused():
    torch.manual_seed(0)
    msg = _refused(_jitter(GhostNet(oup=11)), _loader((3, 6, 6)), "not exact")
    assert "g.cheap.0" in msg and "ignore=" in msg


def test_ghost_module_without_slice_is_exact():
    torch.manual_seed(0)
    _exact(_jitter(GhostNet(oup=12)), _loader((3, 6, 6)), torch.randn(3, 3, 6, 6))


class GRN(nn.Module):
    """timm's GlobalResponseNorm (channels last): normalises across channels."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))    # zero init, as timm
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return x * (self.weight * nx + 1) + self.bias


class ConvNeXtV2Block(nn.Module):
    def __init__(self, nc=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw1 = nn.Linear(8, 12)
        self.grn = GRN(12)
        self.pw2 = nn.Linear(12, 8)
        self.fc = nn.Linear(8, nc)

    def forward(self, x):
        h = self.stem(x)
        y = self.pw2(self.grn(F.gelu(self.pw1(h.permute(0, 2, 3, 1)))))
        return self.fc((h + y.permute(0, 3, 1, 2)).mean((2, 3)))


@pytest.mark.parametrize("trained", [False, True])
def test_global_response_norm_refused(trained):
    """Refused even with timm's zero init (the self-check jitters the weights)."""
    model = ConvNeXtV2Block().eval()
    if trained:
        model = _jitter(model)
    msg = _refused(model, _loader((3, 6, 6)), "pw1.*not exact")
    assert "through ['grn.weight', 'grn.bias']" in msg and "ignore=['pw1']" in msg


def test_prune_checks_params_against_the_plan(monkeypatch):
    """Surgery that removes other channels than the plan counts raises, never returns."""
    from fair_pruner import graph, surgery
    torch.manual_seed(0)
    model = _jitter(GhostNet(oup=12))
    book = fp.score(model, _loader((3, 6, 6)), **KW)
    plan = fp.allocate(book, params=0.3)
    real = graph.prune_units

    def more(model, DG, roots, removed, *args):    # an op that also removes one more channel
        real(model, DG, roots, {k: (list(v) + [max(set(range(plan.sizes[k])) - set(v))]
                                    if v else v) for k, v in removed.items()}, *args)
    monkeypatch.setattr(surgery, "prune_units", more)
    with pytest.raises(fp.UnsupportedModelError, match="plan counts"):
        fp.prune(model, plan)


def test_group_search_past_its_time_limit_is_a_clear_error(monkeypatch):
    """Torch-Pruning's group search runs for hours on some models (Swin): scoring stops at
    FAIR_PRUNER_GROUP_SEARCH_S with an error naming the way out, and leaves no alarm set."""
    import signal
    import time
    import torch_pruning as tp

    def endless(self, *a, **k):
        while True:
            time.sleep(0.01)
            yield from ()
    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", endless)
    monkeypatch.setenv("FAIR_PRUNER_GROUP_SEARCH_S", "0.3")
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(fp.UnsupportedModelError, match="did not finish in 0.3 s.*ignore=.*"
                                                       "FAIR_PRUNER_GROUP_SEARCH_S"):
        fp.score(_mlp(), _mlp_loader(), **KW)
    assert time.perf_counter() - t0 < 10
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) is before


def test_group_search_past_its_memory_limit_is_a_clear_error(monkeypatch):
    """A search that keeps allocating (Swin's went past 8 GB) stops once the process has grown
    by FAIR_PRUNER_GROUP_SEARCH_MIB, not at an out-of-memory kill."""
    import signal
    import time
    import torch_pruning as tp
    held = []

    def hungry(self, *a, **k):
        for _ in range(256):            # at most 2 GiB if the limit never fired
            held.append(torch.ones(8 << 20, dtype=torch.uint8))    # touched: resident
            time.sleep(0.005)
        yield from ()
    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", hungry)
    monkeypatch.setenv("FAIR_PRUNER_GROUP_SEARCH_MIB", "96")
    with pytest.raises(fp.UnsupportedModelError, match=r"grew this process by [\d,]+ MiB, past "
                                                       "its limit of 96 MiB.*ignore=.*"
                                                       "FAIR_PRUNER_GROUP_SEARCH_MIB"):
        fp.score(_mlp(), _mlp_loader(), **KW)
    assert 96 // 8 <= len(held) < 256
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    held.clear()


def test_shufflenet_prunes_inner_channels_exactly_and_keeps_shuffled_ones_whole():
    import io
    import torchvision
    from helpers import assert_same, count_macs, randomize_bn, snapshot
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.shufflenet_v2_x0_5(num_classes=4)).eval()
    snap = snapshot(model)
    loader = _loader((3, 32, 32), n=16)
    with pytest.warns(UserWarning, match="channel shuffles"):
        book = fp.score(model, loader, **KW)
    assert_same(model, snap)
    names = [g.name for g in book.groups]
    assert "stage2.1.branch2.3+1" in names and "conv5.0" in names
    # the shuffled block outputs are not groups: kept whole, and listed
    assert not any(n.endswith("branch2.5") or "branch1" in n for n in names)
    assert "stage3.0.branch1.2" in book.meta["ignored"]
    plan = fp.allocate(book, params=0.3)
    pruned, masked = fp.prune(model, plan), fp.mask(model, plan, book)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = pruned(x), masked(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert float((a - model(x)).abs().max()) > 1e-3      # something was removed
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    assert count_macs(pruned, x[:1]) == plan.flops_after
    assert type(pruned.stage2[0]).__name__ == "ShuffleResidual"
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x), a)


def test_channel_shuffle_node_has_the_inverse_gradient():
    from fair_pruner.graph import _ChannelShuffle, _shuffle
    import torchvision.models.shufflenetv2 as sv2
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(_shuffle(x, 2), sv2.channel_shuffle(x, 2))
    assert torch.autograd.gradcheck(lambda t: _ChannelShuffle.apply(t, 2), (x,))


def test_window_attention_models_refused_before_the_search():
    """timm's GCViT (its own window attention) is refused at once; torchvision's Swin and
    MaxViT and timm's Swin / Swin-V2 / MaxViT are converted and pruned (tests/test_vit_heads.py)."""
    import time
    timm = pytest.importorskip("timm")
    model = _Spy(timm.create_model("gcvit_xxtiny", pretrained=False, num_classes=4,
                                   img_size=64).eval())
    t0 = time.perf_counter()
    msg = _refused(model, _loader((3, 64, 64), n=8), "window-attention layers")
    assert "WindowAttentionGlobal" in msg and model.calls == 0
    assert time.perf_counter() - t0 < 60        # was: hours inside Torch-Pruning's search


class CachesAutogradResults(nn.Module):
    """Like timm's LeViT: eval mode caches a tensor computed with grad in a dict attribute
    (copy.deepcopy refuses non-leaf tensors)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.fc = nn.Linear(6, 4)
        self.cache = {}

    def forward(self, x):
        if self.training or "s" not in self.cache:
            self.cache["s"] = self.scale * 2.0         # non-leaf, with autograd history
        return self.fc(F.relu(self.conv(x) * self.cache["s"]).mean((2, 3)))


def test_model_with_cached_autograd_tensors_is_copied_and_pruned():
    torch.manual_seed(0)
    model = _jitter(CachesAutogradResults())
    model(torch.randn(1, 3, 6, 6))                  # fills the cache with a non-leaf tensor
    cached = model.cache["s"]
    assert not cached.is_leaf
    with pytest.raises(RuntimeError):
        import copy
        copy.deepcopy(model)
    book = fp.score(model, _loader((3, 6, 6)), **KW)
    plan = fp.allocate(book, params=0.3)
    pruned = fp.prune(model, plan)
    assert model.cache["s"] is cached                # the caller's model untouched
    assert pruned.conv.out_channels == 6 - len(plan.removed["conv"])


def test_self_check_runs_in_float64_and_falls_back_where_a_model_cannot():
    """The exactness self-check compares pruned and masked copies in float64 (deep nets with
    jittered weights amplify fp32 summation-order noise into false refusals), and in the
    model's own dtype where it does not run in float64."""
    from fair_pruner.graph import _in_float64
    from fair_pruner.engine import call_model
    m = _mlp()
    x = torch.randn(1, 5)
    m64, x64 = _in_float64(m, x, call_model)
    assert x64.dtype == torch.float64 and all(p.dtype == torch.float64 for p in m64.parameters())

    class Fp32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            if x.dtype != torch.float32:
                raise TypeError("float32 kernels only")
            return self.fc(x)
    f = Fp32Only()
    f32, x32 = _in_float64(f, x, call_model)
    assert x32 is x and f32.fc.weight.dtype == torch.float32 and f32.fc.bias.dtype == torch.float32


def test_self_check_confirms_in_float64_only_what_fp32_finds(monkeypatch):
    """The check runs in the model's dtype first (it is on every CNN's scoring path) and
    repeats in float64 only to confirm a difference: a model that prunes exactly never pays
    for the float64 copy; a real error (GRN) is still refused after the float64 pass."""
    from fair_pruner import graph
    calls = []
    real = graph._in_float64

    def counting(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(graph, "_in_float64", counting)
    monkeypatch.setattr(graph, "_CHECKED", type(graph._CHECKED)())
    fp.score(_jitter(_mlp()), _mlp_loader(), **KW)
    assert calls == []
    _refused(_jitter(ConvNeXtV2Block().eval()), _loader((3, 6, 6)), "pw1.*not exact")
    assert calls


def test_self_check_fp32_noise_is_not_a_refusal(monkeypatch):
    """A difference seen in fp32 but not in float64 (summation-order noise amplified by a
    deep jittered net) is no refusal."""
    from fair_pruner import graph
    real = graph._exact_errors

    seen = []

    def noisy(ref, ex, specs, cost, call, removed, tol, outputs=True, in64=False, **kw):
        seen.append(in64)
        if not in64:
            return ["pruned and masked outputs differ by 0.36 (scale 1)"]
        return real(ref, ex, specs, cost, call, removed, tol, outputs, in64, **kw)
    monkeypatch.setattr(graph, "_exact_errors", noisy)
    monkeypatch.setattr(graph, "_CHECKED", type(graph._CHECKED)())
    book = fp.score(_jitter(_mlp()), _mlp_loader(), **KW)
    assert [g.name for g in book.groups] == ["0", "2"] and seen == [False, True]


def test_self_check_prunes_the_jittered_copy_itself(monkeypatch):
    """Each round of the self-check measures the masked reference on a copy of the jittered
    model, then prunes the jittered model itself (one model copy less at the check's peak, 2.4
    GB for a 600M-parameter model); the float64 round and the naming of culprits each start
    from a fresh, equal jittered model."""
    from fair_pruner import graph
    real_errors, real_mask, real_prune = graph._exact_errors, graph.mask_units, graph.prune_units
    calls, masked, pruned = [], [], []

    def errors(ref, ex, specs, cost, call, removed, tol, outputs=True, in64=False, **kw):
        calls.append((ref, in64, kw.get("consume", False),
                      [p.detach().clone() for p in ref.parameters()]))
        return real_errors(ref, ex, specs, cost, call, removed, tol, outputs, in64, **kw)

    def mask(model, specs, removed):
        masked.append(model)
        return real_mask(model, specs, removed)

    def prune(model, *a):
        pruned.append(model)
        return real_prune(model, *a)
    monkeypatch.setattr(graph, "_exact_errors", errors)
    monkeypatch.setattr(graph, "mask_units", mask)
    monkeypatch.setattr(graph, "prune_units", prune)
    monkeypatch.setattr(graph, "_CHECKED", type(graph._CHECKED)())
    fp.score(_jitter(_mlp()), _mlp_loader(), **KW)
    [(ref, in64, consume, _)] = calls
    assert consume and not in64 and pruned == [ref] and masked[0] is not ref

    # a real difference (the masked reference keeps one unit too many): confirmed in float64,
    # then the culprits are named, each from a fresh jittered model equal to the first
    calls.clear()
    monkeypatch.setattr(graph, "mask_units",
                        lambda m, specs, removed: real_mask(m, specs, {k: v[1:] for k, v in
                                                                      removed.items()}))
    monkeypatch.setattr(graph, "_CHECKED", type(graph._CHECKED)())
    with pytest.raises(fp.UnsupportedModelError, match="is not exact"):
        fp.score(_jitter(_mlp()), _mlp_loader(), **KW)
    assert [(c[1], c[2]) for c in calls[:2]] == [(False, True), (True, True)]
    assert len(calls) > 2 and not any(c[2] for c in calls[2:])
    assert len({id(c[0]) for c in calls[:3]}) == 3
    for c in calls[1:]:
        assert next(c[0].parameters()).dtype == torch.float32 or c[0] is calls[1][0]
        for a, b in zip(calls[0][3], c[3]):
            assert torch.equal(a, b)                  # the same seeded jitter


def test_self_check_runs_once_per_structure(monkeypatch):
    """A structure whose check passed is not checked again in the process (the check is the
    largest fixed cost of scoring a small CNN); another structure, a changed module attribute
    or a refused model is always checked."""
    from fair_pruner import graph
    calls = []
    real = graph._exact_errors

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(graph, "_exact_errors", counting)
    monkeypatch.setattr(graph, "_CHECKED", type(graph._CHECKED)())
    m = _jitter(_mlp())
    b1 = fp.score(m, _mlp_loader(), **KW)
    assert len(calls) == 1
    b2 = fp.score(_jitter(_mlp()), _mlp_loader(), **KW)         # same structure
    assert len(calls) == 1 and fp.allocate(b1, params=0.3).sizes == fp.allocate(
        b2, params=0.3).sizes
    other = _jitter(_mlp())
    other[1] = nn.Softsign()                                     # another module class
    fp.score(other, _mlp_loader(), **KW)
    assert len(calls) == 2
    flagged = _jitter(_mlp())
    flagged[0].some_flag = True                                  # a plain attribute
    fp.score(flagged, _mlp_loader(), **KW)
    assert len(calls) == 3
    for _ in range(2):
        _refused(_jitter(ConvNeXtV2Block().eval()), _loader((3, 6, 6)), "pw1.*not exact")
    assert len(calls) > 5                                        # never cached: checked twice


def test_float64_check_that_cannot_run_leaves_the_copy_in_its_own_dtypes():
    """graph._in_float64 on a model that fails in float64: parameters and buffers (which
    .double() replaces by new tensors) are back in their dtypes, so the check runs as it was."""
    from fair_pruner import graph

    class Fp32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("codes", torch.ones(2, dtype=torch.float16))

        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("no float64 kernel")
            return self.lin(x) * self.scale

    m = Fp32Only()
    out, ex = graph._in_float64(m, torch.randn(4, 3), lambda mod, x: mod(x))
    assert out is m and ex.dtype == torch.float32
    assert m.lin.weight.dtype == m.scale.dtype == torch.float32 and m.codes.dtype == torch.float16
    m(ex)
