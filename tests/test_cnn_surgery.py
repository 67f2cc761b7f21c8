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
