"""Attention heads of timm vision transformers as pruning units (graph.head_attention).

Every parameter is jittered first: timm zero-initialises biases and the classifier's init is
small, which would let an inexact removal pass unnoticed.
"""
import pytest
import torch
import torch.nn as nn

import fair_pruner as fp
from fair_pruner import graph
from fair_pruner.plan import _make_plan
from helpers import count_macs

timm = pytest.importorskip("timm")   # a dev dependency: installed by .ci/run


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(img_size=24, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2,
                num_classes=5, qkv_bias=True)
    opts.update(kw)
    m = timm.models.vision_transformer.VisionTransformer(**opts).eval()
    _jitter(m, seed + 1)
    return m


def _data(n=30, classes=5, seed=2, size=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    return [(x[i:i + 10], y[i:i + 10]) for i in range(0, n, 10)]


OPTS = dict(samples_per_class=4, projections=8, progress=False)


def _heads_and_every_third_unit(book):
    """A plan removing the first (and, of 4 or more, the last) head of every head group and
    every third unit of the other groups larger than 2."""
    removed = {g.name: [0, g.size - 1][:g.size // 2] for g in book.groups if g.kind == "head"}
    for g in book.groups:
        if g.kind != "head" and g.size > 2:
            removed[g.name] = list(range(0, g.size, 3))
    return _make_plan(book, removed, meta={}, alpha=None, strategy="manual")


def _jitter(m, seed):
    """Add N(0, 0.2) noise to every parameter, in place: zero-initialised heads, biases and
    tables and tiny layer scales would let an inexact removal pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _assert_exact(pruned, ref, plan, x):
    """pruned == its masked reference on x (with outputs far from zero), and the plan's params
    and MACs are the pruned model's."""
    with torch.no_grad():
        a, b = pruned(x), ref(x)
    assert float(b.abs().max()) > 0.1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    assert count_macs(pruned, x[:1]) == plan.flops_after


def test_heads_are_units_of_their_own_groups():
    m = _vit()
    book = fp.score(m, _data(), **OPTS)
    heads = {g.name: g for g in book.groups if g.name.endswith(".attn")}
    assert sorted(heads) == ["blocks.0.attn", "blocks.1.attn"]
    for g in heads.values():
        assert g.size == 4
        assert set(g.signals) >= {"u", "r", "l2"}
        assert all(float(v.abs().sum()) > 0 for v in g.signals.values()
                   if v.dtype.is_floating_point)
    # qkv's rows are not a channel group of their own any more
    assert not any(g.name.endswith("attn.qkv") for g in book.groups)


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True), dict(qkv_bias=False, class_token=False,
                                                                global_pool="avg")])
def test_pruned_heads_equal_masked_and_costs_are_exact(kw):
    m = _vit(**kw)
    book = fp.score(m, _data(), **OPTS)
    names = [g.name for g in book.groups]
    # heads 1 and 3 of block 0, head 0 of block 1, and some MLP neurons and residual channels
    removed = {"blocks.0.attn": [1, 3], "blocks.1.attn": [0]}
    for g in book.groups:
        if not g.name.endswith(".attn"):
            removed[g.name] = list(range(0, g.size, 3))
    plan = _make_plan(book, removed, meta={}, alpha=None, strategy="manual")
    pruned = fp.prune(m, plan, reconstruct=None)
    ref = fp.mask(m, plan, book, reconstruct=None)
    assert [b.attn.num_heads for b in pruned.blocks] == [2, 3]
    qkv = pruned.blocks[0].attn.qkv
    assert qkv.weight.shape == (3 * 2 * 12, qkv.in_features)
    _assert_exact(pruned, ref, plan, torch.randn(3, 3, 24, 24))
    assert plan.params_after < plan.params_before and names


def test_wrong_heads_would_be_caught_by_the_masked_reference():
    """The oracle has teeth: removing other heads than the masked ones differs."""
    m = _vit()
    book = fp.score(m, _data(), **OPTS)
    plan = _make_plan(book, {"blocks.0.attn": [1]}, meta={}, alpha=None, strategy="manual")
    other = _make_plan(book, {"blocks.0.attn": [2]}, meta={}, alpha=None, strategy="manual")
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        d = (fp.prune(m, plan)(x) - fp.mask(m, other, book)(x)).abs().max()
    assert float(d) > 1e-2


def test_allocation_and_reconstruction_with_heads():
    m = _vit(depth=3)
    book = fp.score(m, _data(), reconstruction=True, **OPTS)
    plan = fp.allocate(book, params=0.3)
    pruned = fp.prune(m, plan, book=book)          # default reconstruction: affine
    ref = fp.mask(m, plan, book)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) - pruned._fair_pruner_added_params \
        == plan.params_after
    assert "gram@blocks.0.attn.proj" in next(g for g in book.groups
                                             if g.name == "blocks.0.attn").tensors


def test_attention_variants_that_mix_heads_are_not_head_units():
    """scale_norm normalises across all heads' outputs: not a head group (the self-check then
    refuses the qkv channels, naming them)."""
    m = _vit()
    assert graph.head_attention(m.blocks[0].attn)
    m.blocks[0].attn.norm = nn.LayerNorm(48)          # what Attention(scale_norm=True) builds
    with torch.no_grad():
        m.blocks[0].attn.norm.weight.normal_()
    assert not graph.head_attention(m.blocks[0].attn)
    with pytest.raises(fp.UnsupportedModelError, match="blocks.0.attn.qkv"):
        fp.score(m, _data(), **OPTS)


def test_ignored_attention_keeps_its_heads():
    m = _vit()
    book = fp.score(m, _data(), ignore=["blocks.0.attn"], **OPTS)
    names = [g.name for g in book.groups]
    assert "blocks.0.attn" not in names and "blocks.1.attn" in names


def test_same_seed_same_book():
    m = _vit()
    a = fp.score(m, _data(), seed=3, **OPTS)
    b = fp.score(m, _data(), seed=3, **OPTS)
    for ga, gb in zip(a.groups, b.groups):
        for k in ga.signals:
            assert torch.equal(ga.signals[k], gb.signals[k]), (ga.name, k)


def test_head_groups_are_whole_tier_one_units_and_survive_save(tmp_path):
    m = _vit()
    book = fp.score(m, _data(), **OPTS)
    heads = [g for g in book.groups if g.name.endswith(".attn")]
    assert all(g.kind == "head" and not g.roundable and g.tier == 1 for g in heads)
    book.save(tmp_path / "book")
    again = fp.ScoreBook.load(tmp_path / "book")
    # Tiers: the neurons and channels reach 60% alone, so the heads stay...
    assert not any(fp.allocate(again, params=0.6).removed[g.name] for g in heads)
    # ...unless one alpha runs over every group
    plan = fp.allocate(again, params=0.6, round_to=4, tiers=False)
    assert any(plan.removed[g.name] for g in heads), plan.removed
    pruned = fp.prune(m, plan)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), fp.mask(m, plan, again)(x), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after


# --------------------------------------------------------------------------------------------
# torchvision's ViT: nn.MultiheadAttention converted to graph.SelfAttention
# --------------------------------------------------------------------------------------------

tv = pytest.importorskip("torchvision")


def _tv_vit(seed=0):
    torch.manual_seed(seed)
    m = tv.models.VisionTransformer(image_size=24, patch_size=8, num_layers=2, num_heads=4,
                                    hidden_dim=32, mlp_dim=48, num_classes=5).eval()
    _jitter(m, seed + 1)  # its classifier is zero-initialised: every output would be 0
    return m


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("weights", [None, True, False])
def test_self_attention_equals_multihead_attention(batch_first, weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 3, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    sa = graph.SelfAttention.from_multihead(mha).eval()
    # mha's own tensors, not copies (scoring rewrites a weight-sharing copy of the model)
    assert sa.qkv.weight is mha.in_proj_weight and sa.qkv.bias is mha.in_proj_bias
    assert sa.proj.weight is mha.out_proj.weight and sa.proj.bias is mha.out_proj.bias
    x = torch.randn(5, 7, 24)
    kw = dict(need_weights=False) if weights is None else dict(average_attn_weights=weights)
    with torch.no_grad():
        (a, wa), (b, wb) = mha(x, x, x, **kw), sa(x, x, x, **kw)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if weights is None:
        assert wa is None and wb is None
    else:
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)
    with pytest.raises(fp.UnsupportedModelError, match="self-attention only"):
        sa(x, x + 1, x)
    with pytest.raises(fp.UnsupportedModelError, match="masks"):
        sa(x, x, x, attn_mask=torch.zeros(7, 7))


def test_torchvision_vit_prunes_heads_neurons_and_width_exactly():
    from helpers import assert_same, snapshot
    m = _tv_vit()
    snap = snapshot(m)
    book = fp.score(m, _data(size=24), **OPTS)
    heads = [g for g in book.groups if g.kind == "head"]
    assert [g.name for g in heads] == ["encoder.layers.encoder_layer_0.self_attention",
                                       "encoder.layers.encoder_layer_1.self_attention"]
    width = next(g for g in book.groups if g.size == 32)      # the residual stream
    removed = {heads[0].name: [0, 2], heads[1].name: [3], width.name: [1, 5, 6, 30]}
    for g in book.groups:
        if g.name.endswith("mlp.0"):
            removed[g.name] = list(range(0, g.size, 4))
    plan = _make_plan(book, removed, meta={}, alpha=None, strategy="manual")
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    assert_same(m, snap)                                 # the caller's model is untouched
    assert isinstance(m.encoder.layers[0].self_attention, nn.MultiheadAttention)
    att = [l.self_attention for l in pruned.encoder.layers]
    assert [type(a).__name__ for a in att] == ["SelfAttention"] * 2
    assert [a.num_heads for a in att] == [2, 3] and pruned.hidden_dim == 28
    _assert_exact(pruned, ref, plan, torch.randn(3, 3, 24, 24))


def test_multihead_attention_elsewhere_is_still_refused():
    """Only a known call pattern is converted: a custom model's nn.MultiheadAttention (masks,
    cross-attention possible) stays refused before scoring."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(6, 8)
            self.self_attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = self.emb(x)
            return self.fc((h + self.self_attention(h, h, h, need_weights=False)[0]).mean(1))
    assert not graph.needs_conversion(WithMHA())
    data = [(torch.randn(6, 4, 6), torch.arange(6) % 3)]
    with pytest.raises(fp.UnsupportedModelError, match="MultiheadAttention"):
        fp.score(WithMHA(), data, **OPTS)


# --------------------------------------------------------------------------------------------
# torchvision's Swin / Swin-V2: ShiftedWindowAttention converted to graph.WindowAttention
# --------------------------------------------------------------------------------------------

def _tv_swin(v2: bool, seed=0):
    from torchvision.models import swin_transformer as sw
    torch.manual_seed(seed)
    kw = dict(block=sw.SwinTransformerBlockV2, downsample_layer=sw.PatchMergingV2) if v2 else {}
    m = sw.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=[2, 2], num_classes=5, **kw).eval()
    _jitter(m, seed + 1)  # zero biases, a zero-init bias table: jitter everything
    return m


@pytest.mark.parametrize("v2", [False, True])
def test_window_attention_equals_torchvision(v2):
    m = _tv_swin(v2)
    conv = graph.convert_blocks(fp.engine.copy_model(m))
    assert type(conv.features[1][1].attn).__name__ == "WindowAttention"
    assert conv.features[1][1].attn.shift_size == [1, 1]          # a shifted block too
    for size in (16, 20):                                          # 20: padded windows
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_prunes_heads_and_neurons_exactly(v2):
    from helpers import assert_same, snapshot
    m = _tv_swin(v2)
    snap = snapshot(m)
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=16), **OPTS)
    assert_same(m, snap)
    kinds = {g.name: g.kind for g in book.groups}
    assert kinds == {"features.1.0.attn": "head", "features.1.0.mlp.0": "channel",
                     "features.1.1.attn": "head", "features.1.1.mlp.0": "channel",
                     "features.3.0.attn": "head", "features.3.0.mlp.0": "channel",
                     "features.3.1.attn": "head", "features.3.1.mlp.0": "channel"}
    removed = {"features.1.1.attn": [0], "features.3.0.attn": [1, 2],
               "features.1.0.mlp.0": [0, 5, 7], "features.3.1.mlp.0": list(range(0, 128, 3))}
    plan = _make_plan(book, removed, meta={}, alpha=None, strategy="manual")
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.features[3][0].attn
    assert att.num_heads == 2 and att.qkv.out_features == 3 * 2 * 8
    if v2:
        assert att.logit_scale.shape[0] == 2 and att.cpb_mlp[-1].out_features == 2
    else:
        assert att.relative_position_bias_table.shape[1] == 2
    _assert_exact(pruned, ref, plan, torch.randn(3, 3, 16, 16))


def _tv_maxvit(seed=0):
    torch.manual_seed(seed)
    m = tv.models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                         block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                         stochastic_depth_prob=0.0, num_classes=5).eval()
    _jitter(m, seed + 1)
    from helpers import randomize_bn
    return randomize_bn(m)


def test_maxvit_converted_and_pruned_exactly():
    m = _tv_maxvit()
    conv = graph.convert_blocks(fp.engine.copy_model(m))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), m(x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=32), **OPTS)
    heads = [g for g in book.groups if g.kind == "head"]
    assert len(heads) == 4 and all(g.size in (2, 4) for g in heads)     # window + grid, 2 blocks
    removed = {g.name: [0] for g in heads}
    for g in book.groups:
        if g.kind != "head" and g.size > 2:
            removed[g.name] = list(range(0, g.size, 3))
    plan = _make_plan(book, removed, meta={}, alpha=None, strategy="manual")
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    _assert_exact(pruned, ref, plan, x)


# --------------------------------------------------------------------------------------------
# timm's Swin (V1): WindowAttention class-swapped to graph.TimmWindowAttention (same forward)
# --------------------------------------------------------------------------------------------

def _timm_swin(seed=0):
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(seed)
    m = SwinTransformer(img_size=16, patch_size=4, embed_dim=16, depths=(2, 2),
                        num_heads=(2, 4), window_size=2, num_classes=5).eval()
    _jitter(m, seed + 1)  # zero biases, a near-zero bias table: jitter everything
    return m


@pytest.mark.parametrize("fused", [False, True])
def test_timm_swin_prunes_heads_and_neurons_exactly(tmp_path, fused):
    import subprocess
    import sys
    from helpers import assert_same, snapshot
    m = _timm_swin()
    snap = snapshot(m)
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=16), **OPTS)
    assert_same(m, snap)                                   # the caller's model is not converted
    assert type(m.layers[0].blocks[0].attn).__name__ == "WindowAttention"
    kinds = {g.name: g.kind for g in book.groups}
    assert kinds == {f"layers.{s}.blocks.{b}.{k}": kind for s in (0, 1) for b in (0, 1)
                     for k, kind in (("attn", "head"), ("mlp.fc1", "channel"))}
    removed = {"layers.0.blocks.1.attn": [0], "layers.1.blocks.0.attn": [1, 2],
               "layers.0.blocks.0.mlp.fc1": [0, 5, 7],
               "layers.1.blocks.1.mlp.fc1": list(range(0, 128, 3))}
    plan = _make_plan(book, removed, meta={}, alpha=None, strategy="manual")
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.layers[1].blocks[0].attn
    assert type(att) is timm.models.swin_transformer.WindowAttention     # timm's class again
    assert att.num_heads == 2 and att.qkv.out_features == 3 * 2 * 8
    assert att.relative_position_bias_table.shape[1] == 2 and att.proj.in_features == 16
    for mod in list(pruned.modules()) + list(ref.modules()):
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused                          # timm's SDPA path and its own
    x = torch.randn(3, 3, 16, 16)
    _assert_exact(pruned, ref, plan, x)
    # a pruned model pickles and loads with timm alone (fair_pruner blocked), in a fresh process
    path = tmp_path / "swin.pt"
    torch.save(pruned, path)
    with torch.no_grad():
        torch.save(pruned(x), tmp_path / "y.pt")
    code = ("import sys; sys.modules['fair_pruner'] = None; import torch; "
            "m = torch.load(sys.argv[1], weights_only=False); "
            "x = torch.load(sys.argv[2]); y = torch.load(sys.argv[3]); "
            "torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5); print('ok')")
    torch.save(x, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_timm_swin_costs_count_every_window():
    """Window attention folds its windows into the batch dim: qkv / proj run on every token of
    the image, and the cost model counts all of them (not one window's)."""
    m = _timm_swin()
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=16), **OPTS)
    plan = _make_plan(book, {}, meta={}, alpha=None, strategy="manual")
    tokens = {"patch_embed": 16, "layers.0": 16, "layers.1": 4, "head": 1}
    want = 0
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            key = next(k for k in tokens if name.startswith(k))
            want += mod.weight.numel() * tokens[key]
    assert plan.flops_after == want


# --------------------------------------------------------------------------------------------
# Layers that fold windows / patches into the batch dim ([B * k, tokens, dim])
# --------------------------------------------------------------------------------------------

class _Tokens(nn.Module):
    """A tiny token MLP classifier: [B, 3, 8, 8] -> 16 tokens of 12 -> fc1 (24) -> fc2 -> logits.
    ``fold``: fc1 / fc2 run on the tokens folded into the batch dim, as 4 windows of 4 tokens,
    "sample" = [B * 4, 4, dim] sample-major, "window" = window-major [4 * B, 4, dim]."""

    def __init__(self, fold=None):
        super().__init__()
        self.fold = fold
        self.embed = nn.Linear(12, 12)
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        B = x.shape[0]
        t = x.reshape(B, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, 16, 12)
        t = self.embed(t)
        if self.fold == "sample":
            t = t.reshape(B * 4, 4, 12)
        elif self.fold == "window":
            t = t.reshape(B, 4, 4, 12).transpose(0, 1).reshape(4 * B, 4, 12)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        if self.fold == "sample":
            t = t.reshape(B, 16, 12)
        elif self.fold == "window":
            t = t.reshape(4, B, 4, 12).transpose(0, 1).reshape(B, 16, 12)
        return self.head(t.mean(1))


def _tokens(fold):
    torch.manual_seed(0)
    m = _Tokens(fold).eval()
    _jitter(m, 1)
    return m


def test_rows_folded_sample_major_give_the_unfolded_book():
    data = [(x * 3, y % 3) for x, y in _data(n=30, size=8)]
    books = {f: fp.score(_tokens(f), data, ignore=["embed", "fc2"], **OPTS)
             for f in (None, "sample")}
    a, b = books[None].groups, books["sample"].groups
    assert [g.name for g in a] == [g.name for g in b] == ["fc1"]
    assert float(a[0].u.abs().max()) > 0                   # something to compare
    torch.testing.assert_close(b[0].u, a[0].u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[0].r, a[0].r, rtol=1e-5, atol=1e-6)
    # and the plan's costs count every token in both
    pa = _make_plan(books[None], {}, meta={}, alpha=None, strategy="manual")
    pb = _make_plan(books["sample"], {}, meta={}, alpha=None, strategy="manual")
    assert pa.flops_after == pb.flops_after == 16 * (12 * 12 + 12 * 24 + 24 * 12) + 3 * 12


def test_rows_folded_in_another_order_are_refused_naming_the_layer():
    data = [(x * 3, y % 3) for x, y in _data(n=30, size=8)]
    with pytest.raises(fp.UnsupportedModelError, match=r"the output of fc1 has 4 rows per "
                       r"sample.*ignore=\['fc1'\]"):
        fp.score(_tokens("window"), data, ignore=["embed", "fc2"], **OPTS)
    # batches of one sample: the check pairs the first sample with its mirror image
    one = [(x[i:i + 1], y[i:i + 1]) for x, y in data for i in range(len(y))]
    book = fp.score(_tokens("sample"), one, ignore=["embed", "fc2"], **OPTS)
    ref = fp.score(_tokens(None), one, ignore=["embed", "fc2"], **OPTS)
    torch.testing.assert_close(book.groups[0].u, ref.groups[0].u, rtol=1e-5, atol=1e-6)
    with pytest.raises(fp.UnsupportedModelError, match="rows per sample"):
        fp.score(_tokens("window"), one, ignore=["embed", "fc2"], **OPTS)
    same = [(torch.ones(2, 3, 8, 8), torch.tensor([0, 1]))] + data
    with pytest.raises(fp.CalibrationDataError, match="two different samples"):
        fp.score(_tokens("sample"), same, ignore=["embed", "fc2"], **OPTS)


# --------------------------------------------------------------------------------------------
# timm's MaxViT: AttentionCl class-swapped to graph.TimmAttentionCl (same forward)
# --------------------------------------------------------------------------------------------

def _timm_maxvit(rel_pos: str, head_first: bool, seed=0):
    from timm.models import maxxvit as mx
    torch.manual_seed(seed)
    cfg = mx.MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"),
                        stem_width=8,
                        transformer_cfg=mx.MaxxVitTransformerCfg(
                            dim_head=8, head_first=head_first, rel_pos_type=rel_pos,
                            rel_pos_dim=16, window_size=(2, 2), grid_size=(2, 2)))
    m = mx.MaxxVit(cfg, img_size=32, num_classes=5).eval()
    _jitter(m, seed + 1)  # layer scales of 1e-6, zero biases: jitter everything
    from helpers import randomize_bn
    return randomize_bn(m)


@pytest.mark.parametrize("rel_pos,head_first", [("bias", True), ("mlp", True),
                                                ("bias_tf", False)])
def test_timm_maxvit_prunes_heads_and_neurons_exactly(rel_pos, head_first):
    from helpers import assert_same, snapshot
    m = _timm_maxvit(rel_pos, head_first)
    snap = snapshot(m)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y0 = m(x)
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=32), **OPTS)
    assert_same(m, snap)
    heads = [g for g in book.groups if g.kind == "head"]
    assert len(heads) == 4 and {g.size for g in heads} == {2, 4}   # block + grid, 2 stages
    plan = _heads_and_every_third_unit(book)
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.get_submodule(heads[-1].name)
    assert type(att) is timm.models.maxxvit.AttentionCl and att.num_heads == heads[-1].size - 2
    assert att.qkv.out_features == 3 * 8 * att.num_heads
    rp = att.rel_pos
    assert (rp.bias_shape[0] if rel_pos == "bias_tf" else rp.bias_shape[-1]) == att.num_heads
    _assert_exact(pruned, ref, plan, x)
    with torch.no_grad():                      # the caller's model still gives its output
        torch.testing.assert_close(m(x), y0)


def _timm_swin_v2(seed=0):
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    torch.manual_seed(seed)
    m = SwinTransformerV2(img_size=16, patch_size=4, embed_dim=16, depths=(2, 2),
                          num_heads=(2, 4), window_size=2, num_classes=5).eval()
    _jitter(m, seed + 1)  # zero q / v biases, post-norms: jitter everything
    return m


def test_timm_swin_v2_converted_and_pruned_exactly():
    from helpers import assert_same, snapshot
    m = _timm_swin_v2()
    conv = graph.convert_blocks(fp.engine.copy_model(m))
    assert type(conv.layers[0].blocks[1].attn).__name__ == "TimmWindowAttentionV2"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), m(x), rtol=1e-5, atol=1e-5)
    snap = snapshot(m)
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=16), **OPTS)
    assert_same(m, snap)
    heads = [g for g in book.groups if g.kind == "head"]
    assert len(heads) == 4 and {g.size for g in heads} == {2, 4}
    plan = _heads_and_every_third_unit(book)
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.get_submodule(heads[-1].name)
    assert type(att).__name__ == "TimmWindowAttentionV2"     # timm's forward needs full width
    assert att.num_heads == 2 and att.q_bias.shape[0] == att.k_bias.shape[0] == 2 * att.head_dim
    assert att.logit_scale.shape[0] == 2 and att.cpb_mlp[-1].out_features == 2
    _assert_exact(pruned, ref, plan, x)


def _timm_coatnet(head_first: bool, seed=0):
    from timm.models import maxxvit as mx
    torch.manual_seed(seed)
    cfg = mx.MaxxVitCfg(embed_dim=(16, 32), depths=(1, 2), block_type=("C", "T"), stem_width=8,
                        transformer_cfg=mx.MaxxVitTransformerCfg(
                            dim_head=8, head_first=head_first, rel_pos_type="bias"))
    m = mx.MaxxVit(cfg, img_size=32, num_classes=5).eval()
    _jitter(m, seed + 1)
    from helpers import randomize_bn
    return randomize_bn(m)


@pytest.mark.parametrize("head_first", [True, False])
def test_timm_coatnet_conv_attention_heads_pruned_exactly(head_first):
    """CoAtNet's NCHW attention (q/k/v and the output projection are 1x1 convs): heads are
    units as for the Linear attentions (graph.TimmAttention2d), the residual width kept whole."""
    from helpers import assert_same, snapshot
    m = _timm_coatnet(head_first)
    snap = snapshot(m)
    x = torch.randn(3, 3, 32, 32)
    with pytest.warns(UserWarning, match="residual width"):
        book = fp.score(m, _data(size=32), **OPTS)
    assert_same(m, snap)
    heads = [g for g in book.groups if g.kind == "head"]
    assert len(heads) == 2 and {g.size for g in heads} == {4}
    assert all(float(g.u.abs().max()) > 0 for g in heads)
    removed = {heads[0].name: [1], heads[1].name: [0, 3]}
    for g in book.groups:
        if g.kind != "head" and g.size > 2:
            removed[g.name] = list(range(0, g.size, 3))
    plan = _make_plan(book, removed, meta={}, alpha=None, strategy="manual")
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.get_submodule(heads[1].name)
    assert type(att) is timm.models.maxxvit.Attention2d and att.num_heads == 2
    assert att.qkv.out_channels == 3 * 8 * 2 and att.proj.in_channels == 16
    assert att.rel_pos.relative_position_bias_table.shape[1] == 2
    _assert_exact(pruned, ref, plan, x)
    for mod in list(pruned.modules()) + list(ref.modules()):
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = not mod.fused_attn               # timm's other attention path
    _assert_exact(pruned, ref, plan, x)


def test_timm_efficientformer_heads_with_narrow_keys_pruned_exactly():
    """EfficientFormer's attention: per head q and k of key_dim rows, v of val_dim (4x wider),
    head-major, a row of attention biases per head, an eval-mode bias cache (cleared)."""
    from timm.models import efficientformer as ef
    from helpers import assert_same, randomize_bn, snapshot
    torch.manual_seed(0)
    m = ef.EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32), num_vit=1,
                           num_classes=5).eval()               # attention biases for 224x224
    _jitter(m, 1)
    m = randomize_bn(m)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        m(x)                                   # fills the bias cache, as in any eval use
    snap = snapshot(m)
    book = fp.score(m, _data(size=224), **OPTS)
    assert_same(m, snap)
    heads = [g for g in book.groups if g.kind == "head"]
    assert len(heads) == 1 and heads[0].size == 8
    plan = _make_plan(book, {heads[0].name: [1, 4, 6]}, meta={}, alpha=None, strategy="manual")
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.get_submodule(heads[0].name)
    assert type(att) is ef.Attention and att.num_heads == 5           # timm's class again
    assert att.qkv.out_features == 5 * (2 * 32 + 128) and att.proj.in_features == 5 * 128
    assert att.attention_biases.shape[0] == 5
    _assert_exact(pruned, ref, plan, x)


def _timm_eva(seed=0, **kw):
    from timm.models import eva
    torch.manual_seed(seed)
    opts = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2,
                num_classes=5, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    opts.update(kw)
    m = eva.Eva(**opts).eval()
    _jitter(m, seed + 1)
    return m


@pytest.mark.parametrize("kw", [dict(attn_type="eva"), dict(attn_type="eva", qkv_bias=False),
                                dict(attn_type="rope"), dict(attn_type="rope", qk_norm=True)])
def test_timm_eva_and_rope_vit_heads_pruned_exactly(kw):
    """timm's Eva with RoPE: EvaAttention (q/v biases beside a fused qkv, a zero k-bias buffer;
    our forward) and AttentionRope (timm's own forward, its kv head count kept equal)."""
    from helpers import assert_same, snapshot
    m = _timm_eva(**kw)
    x = torch.randn(3, 3, 32, 32)
    conv = graph.convert_blocks(fp.engine.copy_model(m))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), m(x), rtol=1e-5, atol=1e-5)
    snap = snapshot(m)
    book = fp.score(m, _data(size=32), **OPTS)
    assert_same(m, snap)
    heads = [g for g in book.groups if g.kind == "head"]
    assert len(heads) == 2 and {g.size for g in heads} == {4}
    plan = _heads_and_every_third_unit(book)
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    att = pruned.get_submodule(heads[0].name)
    assert att.num_heads == 2 and att.qkv.out_features == 3 * 2 * att.head_dim
    if kw["attn_type"] == "eva":
        assert type(att).__name__ == "TimmEvaAttention"
        if kw.get("qkv_bias", True):
            assert att.q_bias.shape[0] == att.k_bias.shape[0] == att.v_bias.shape[0] == 24
    else:
        from timm.layers.attention import AttentionRope
        assert type(att) is AttentionRope and att.num_kv_heads == 2 and att.kv_dim == 24
    _assert_exact(pruned, ref, plan, x)


@pytest.mark.parametrize("gate_last", [False, True])
def test_timm_eva02_glu_mlp_units_and_heads_pruned_exactly(gate_last):
    """EVA-02's SwiGLU MLP (timm GluMlp: fc1's two halves gate each other, which Torch-Pruning
    maps onto fc2 wrongly): unit j is fc1 rows j and j + H and fc2 column j (graph.glu_spec);
    pruned with the heads, equal to the masked model, costs exact."""
    from helpers import assert_same, snapshot
    m = _timm_eva(attn_type="eva", swiglu_mlp=True)
    for blk in m.blocks:
        blk.mlp.gate_last = gate_last
    assert type(m.blocks[0].mlp).__name__ == "GluMlp" and m.blocks[0].mlp.fc2.in_features == 96
    snap = snapshot(m)
    book = fp.score(m, _data(size=32), **OPTS)
    assert_same(m, snap)
    glu = [g for g in book.groups if g.name.endswith("mlp.fc1")]
    assert len(glu) == 2 and all(g.size == 96 and g.spec.interleave == 2 for g in glu)
    assert sum(g.kind == "head" for g in book.groups) == 2
    plan = _heads_and_every_third_unit(book)
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan, book)
    mlp = pruned.blocks[0].mlp
    assert mlp.fc2.in_features == 64 and mlp.fc1.out_features == 128
    _assert_exact(pruned, ref, plan, torch.randn(3, 3, 32, 32))
    # reconstructed: fc2 (and every other consumer) updated from its input's statistics; the
    # affine update adds a bias where a consumer has none (EVA's qkv), so outputs only
    book = fp.score(m, _data(size=32), reconstruction=True, **OPTS)
    plan = _heads_and_every_third_unit(book)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = fp.prune(m, plan, reconstruct="affine", book=book)(x)
        b = fp.mask(m, plan, book, reconstruct="affine")(x)
    assert float(b.abs().max()) > 0.1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ignoring fc1 keeps the MLP whole
    book = fp.score(m, _data(size=32), ignore=["blocks.0.mlp.fc1"], **OPTS)
    assert [g.name for g in book.groups if g.name.endswith("mlp.fc1")] == ["blocks.1.mlp.fc1"]


def test_timm_glu_units_are_scored_at_the_gated_hidden():
    """A GluMlp unit is observed where removing it acts, fc2's input act(x1) * x2 (as an LM's
    MLP neuron at down_proj): its activation signal is the mean |hidden| over the calibration
    data, its l2 signal its weights' (fc1 rows j, j + H with biases and fc2 column j), its
    U-Score one per unit."""
    m = _timm_eva(attn_type="eva", swiglu_mlp=True)
    data = _data(size=32)
    seen = {}
    hs = [blk.mlp.fc2.register_forward_pre_hook(
        lambda mod, a, k=k: seen.setdefault(k, []).append(a[0].detach().double()))
        for k, blk in enumerate(m.blocks)]
    with torch.no_grad():
        for x, _ in data:
            m(x)
    for h in hs:
        h.remove()
    book = fp.score(m, data, **OPTS)
    for k, blk in enumerate(m.blocks):
        g = book.group(f"blocks.{k}.mlp.fc1")
        z = torch.cat(seen[k]).reshape(-1, 96)
        torch.testing.assert_close(g.signals["activation"], z.abs().mean(0), rtol=1e-6, atol=0)
        f1, f2 = blk.mlp.fc1, blk.mlp.fc2
        w = torch.cat([f1.weight, f1.bias[:, None]], 1).double()
        l2 = w[:96].square().sum(1) + w[96:].square().sum(1) + f2.weight.double().square().sum(0)
        torch.testing.assert_close(g.signals["l2"], l2, rtol=1e-6, atol=0)
        assert g.signals["u"].shape == (96,) and bool((g.signals["u"] > 0).all())
