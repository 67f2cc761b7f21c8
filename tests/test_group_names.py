"""Group names: a module's name for an ordinary group, ``root+N`` when N more producers share it."""
import pytest
import torch
import torch.nn as nn

import fair_pruner as fp
from fair_pruner.graph import group_name
from helpers import TinyCNN, batches

KW = dict(samples_per_class=3, projections=4, progress=False)


class Residual(nn.Module):
    """A stem and two residual blocks: stem, a2 and b2 write the same stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 5, 3, padding=1), nn.Conv2d(5, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = Residual().eval()
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    return model, loader, fp.score(model, loader, **KW)


def test_group_name():
    assert group_name("conv1", ["conv1"]) == "conv1"
    assert group_name("conv1", ["conv1", "conv1"]) == "conv1"
    assert group_name("layer4.0.downsample.0",
                      ["layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"]) == \
        "layer4.0.downsample.0+2"


def test_residual_stream_name_says_it_covers_several_layers(scored):
    model, loader, book = scored
    stream = [g for g in book.groups if len(g.spec.producers) > 1]
    assert len(stream) == 1
    g = stream[0]
    assert {m.module for m in g.spec.producers} == {"stem", "a2", "b2"}
    assert g.spec.root in {"stem", "a2", "b2"} and g.name == f"{g.spec.root}+2"
    singles = [g for g in book.groups if len(g.spec.producers) == 1]
    assert sorted(g.name for g in singles) == ["a1", "b1"]
    assert all(g.spec.root == g.name for g in singles)         # ordinary names unchanged
    again = fp.score(model, loader, **KW)
    assert [g.name for g in again.groups] == [g.name for g in book.groups]


def test_plan_and_book_on_disk_prune_the_stream(scored, tmp_path):
    model, _, book = scored
    book.save(tmp_path / "book.safetensors")
    loaded = fp.ScoreBook.load(tmp_path / "book.safetensors")
    assert [(g.name, g.spec.root) for g in loaded.groups] == \
        [(g.name, g.spec.root) for g in book.groups]
    plan = fp.allocate(loaded, units=0.4, strategy="uniform")
    stream = next(g for g in book.groups if "+" in g.name)
    assert plan.removed[stream.name], "the uniform plan removes stream channels"
    plan.save(tmp_path / "plan.json")
    plan = fp.Plan.load(tmp_path / "plan.json")
    pruned = fp.prune(model, plan)
    left = 8 - len(plan.removed[stream.name])
    assert pruned.stem.out_channels == pruned.a2.out_channels == pruned.b2.out_channels == left
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), fp.mask(model, plan, book)(x), rtol=1e-4,
                                   atol=1e-5)


def test_plans_of_ordinary_groups_carry_no_roots():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    book = fp.score(model, batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8), **KW)
    plan = fp.allocate(book, params=0.3)
    assert all(g.name == g.spec.root for g in book.groups) and "roots" not in plan.meta
    assert sum(p.numel() for p in fp.prune(model, plan).parameters()) == plan.params_after
