"""Surgery on real architectures: pruned == masked original, exact param/MAC accounting."""
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fair_pruner as fp
from helpers import TinyCNN, TinyMLP, assert_same, batches, count_macs, randomize_bn, snapshot

ARCHS = ["vgg11_bn", "resnet18", "resnet50", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
         "efficientnet_b0", "regnet_y_400mf", "convnext_tiny"]


def _calib(n=20, size=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return batches(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes, 10)


def _check(model, loader, x, target):
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        book = fp.score(model, loader, samples_per_class=2, projections=8, progress=False)
    assert_same(model, snap)
    plan = fp.allocate(book, params=target)
    assert plan.params_reduction >= target
    pruned = fp.prune(model, plan)
    assert_same(model, snap)
    masked = fp.mask(model, plan, book)
    with torch.no_grad():
        a, b = pruned(x), masked(x)
    scale = b.abs().max().clamp(min=1e-3)
    assert (a - b).abs().max() <= 1e-4 * scale, (a - b).abs().max()
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    assert count_macs(pruned, x[:1]) == plan.flops_after
    assert count_macs(model, x[:1]) == plan.flops_before
    assert sum(p.numel() for p in model.parameters()) == plan.params_before
    assert any(plan.removed.values())
    return book, plan, pruned


@pytest.mark.parametrize("arch", [a if a == "resnet18" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHS])
def test_torchvision_exact(arch):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
    x = torch.randn(3, 3, 32, 32)
    book, plan, pruned = _check(model, _calib(), x, 0.3)
    # The output layer is never pruned.
    assert pruned(x).shape == (3, 10)
    out_name = book.meta["output_layer"]
    assert all(out_name != g.name for g in book.groups)


def test_plain_cnn_and_mlp():
    torch.manual_seed(0)
    cnn = randomize_bn(TinyCNN(num_classes=4)).eval()
    x = torch.randn(3, 3, 8, 8)
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    _check(cnn, loader, x, 0.2)
    mlp = TinyMLP().eval()
    loader = batches(torch.randn(30, 5), torch.arange(30) % 3, 10)
    _check(mlp, loader, torch.randn(4, 5), 0.2)


def test_train_mode_and_frozen_model_untouched():
    """A frozen model in train mode: flags, BN stats and mode survive score and prune."""
    torch.manual_seed(0)
    model = randomize_bn(TinyCNN())
    model.train()
    for p in model.fc1.parameters():
        p.requires_grad_(False)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    snap = snapshot(model)
    for bn_mode in ("eval", "train"):
        book = fp.score(model, loader, samples_per_class=3, projections=4, progress=False,
                        bn_mode=bn_mode)
        assert_same(model, snap)
    pruned = fp.prune(model, fp.allocate(book, params=0.2))
    assert_same(model, snap)
    assert pruned.training
    assert not pruned.fc1.weight.requires_grad and pruned.conv1.weight.requires_grad


def test_fully_frozen_model_scores():
    torch.manual_seed(0)
    model = randomize_bn(TinyCNN()).eval().requires_grad_(False)
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    book = fp.score(model, loader, samples_per_class=3, projections=4, progress=False)
    assert all(g.r.abs().sum() > 0 for g in book.groups)
    assert not any(p.requires_grad for p in model.parameters())


def test_inplace_prune():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    book = fp.score(model, loader, samples_per_class=3, projections=4, progress=False)
    plan = fp.allocate(book, params=0.3)
    out = fp.prune(model, plan, inplace=True)
    assert out is model
    assert sum(p.numel() for p in model.parameters()) == plan.params_after


def test_inplace_activation_after_tap():
    """A tap followed by an in-place non-ReLU activation still gets the pre-activation z."""
    torch.manual_seed(0)
    a, b = TinyCNN(inplace=True).eval(), TinyCNN(inplace=False).eval()
    b.load_state_dict(a.state_dict())
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    ba = fp.score(a, loader, samples_per_class=3, projections=4, progress=False)
    bb = fp.score(b, loader, samples_per_class=3, projections=4, progress=False)
    for ga, gb in zip(ba.groups, bb.groups):
        torch.testing.assert_close(ga.r, gb.r)
        torch.testing.assert_close(ga.u, gb.u)


# --------------------------------------------------------------------------------------------
# Grouped convolutions (ResNeXt / RegNet): interleaved units, pruned exactly, not skipped
# --------------------------------------------------------------------------------------------

class GroupedBlock(nn.Module):
    """1x1 -> grouped 3x3 (groups=4) -> 1x1 with a residual: both groups around the grouped
    conv (its input and its output channels) need interleaved units."""

    def __init__(self, c=8, w=12, groups=4):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(c, w, 1), nn.BatchNorm2d(w)
        self.b, self.bn_b = nn.Conv2d(w, w, 3, padding=1, groups=groups), nn.BatchNorm2d(w)
        self.c, self.bn_c = nn.Conv2d(w, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))
        h = torch.relu(self.bn_b(self.b(h)))
        return torch.relu(x + self.bn_c(self.c(h)))


def _grouped_net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      GroupedBlock(), GroupedBlock(w=16, groups=2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(8, 10))).eval()


def test_grouped_conv_units_are_interleaved_and_exact(tmp_path):
    model = _grouped_net()
    x = torch.randn(3, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no "kept whole" warning
        book, plan, pruned = _check(model, _calib(size=8), x, 0.3)
    assert book.meta["skipped_groups"] == []
    by = {g.name: g for g in book.groups}
    # 12 channels feeding / leaving a groups=4 conv: 3 units of 4 channels (one per group)
    for name, units, il in [("3.a", 3, 4), ("3.b", 3, 4), ("4.a", 8, 2), ("4.b", 8, 2)]:
        assert (by[name].size, by[name].spec.interleave) == (units, il)
    assert plan.meta["interleave"] == {"3.a": 4, "3.b": 4, "4.a": 2, "4.b": 2}
    assert any(plan.removed[n] for n in plan.meta["interleave"])
    for i, n_units, il in [(3, 3, 4), (4, 8, 2)]:
        b = pruned[i].b
        assert b.in_channels == (n_units - len(plan.removed[f"{i}.a"])) * il
        assert b.out_channels == (n_units - len(plan.removed[f"{i}.b"])) * il
        assert b.groups == il                         # every channel group keeps its width
    # Interleaving survives save / load of the book and of the plan.
    book.save(tmp_path / "b.safetensors")
    back = fp.ScoreBook.load(tmp_path / "b.safetensors")
    assert [g.spec.interleave for g in back.groups] == [g.spec.interleave for g in book.groups]
    plan.save(tmp_path / "p.json")
    again = fp.prune(model, fp.Plan.load(tmp_path / "p.json"))
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_grouped_conv_fed_by_a_concat_of_one_group_is_kept_whole():
    """A producer feeding only some channel groups of a grouped conv cannot lose a position of
    every group: that group is kept whole and listed, the rest is pruned exactly."""
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.q = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            h = torch.cat([torch.relu(self.p(x)), torch.relu(self.q(x))], 1)
            return self.fc(torch.relu(self.g(h)).mean((2, 3)))

    torch.manual_seed(0)
    model = Cat().eval()
    with pytest.warns(UserWarning, match="kept whole"):
        book = fp.score(model, _calib(size=8), samples_per_class=2, projections=8,
                        progress=False)
    assert set(book.meta["skipped_groups"]) == {"p", "q"}
    assert [g.name for g in book.groups] == ["g"]
    assert book.groups[0].spec.interleave == 2


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "regnet_x_400mf"])
def test_torchvision_grouped_conv_families_exact(arch):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    book, plan, _ = _check(model, _calib(), x, 0.3)
    assert book.meta["skipped_groups"] == []
    il = plan.meta["interleave"]
    assert len(il) >= len(book.groups) // 2 and any(plan.removed[n] for n in il)
