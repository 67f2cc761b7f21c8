"""prune_in_rounds: the fine-tune callback takes (model) or (model, round_index)."""
import functools

import pytest
import torch

import fair_pruner as fp
from helpers import TinyCNN, batches, randomize_bn

KW = dict(samples_per_class=3, projections=4, progress=False)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_bn(TinyCNN(num_classes=4)).eval()


@pytest.fixture
def loader():
    return batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)


def _params(m):
    return sum(p.numel() for p in m.parameters())


class _NotToBeScored:
    """A loader that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("the loader was read: scoring started before the check")


def test_finetune_with_the_model_only(model, loader):
    seen = []
    pruned, plans = fp.prune_in_rounds(model, loader, params=0.8, rounds=3,
                                       finetune=lambda m: seen.append(_params(m)), **KW)
    assert len(plans) == 3
    assert seen == [plans[0].params_after, plans[1].params_after]   # the pruned model so far


def test_finetune_with_the_round_index(model, loader):
    calls = []

    def finetune(m, round_index):
        calls.append((round_index, _params(m)))

    _, plans = fp.prune_in_rounds(model, loader, params=0.8, rounds=3, finetune=finetune, **KW)
    assert calls == [(1, plans[0].params_after), (2, plans[1].params_after)]


def test_finetune_that_trains_in_place_changes_the_next_round(model, loader):
    def zero_first_conv(m, round_index=None):
        with torch.no_grad():
            m.conv1.weight.zero_()

    pruned, _ = fp.prune_in_rounds(model, loader, params=0.5, rounds=2, finetune=zero_first_conv,
                                   **KW)
    assert torch.count_nonzero(pruned.conv1.weight) == 0          # round 2 pruned what it got
    assert torch.count_nonzero(model.conv1.weight) > 0             # the caller's model untouched


def test_other_callables(model, loader):
    calls = []

    class Trainer:
        def __call__(self, m):
            calls.append("call")

        def step(self, m, round_index):
            calls.append(round_index)

    fp.prune_in_rounds(model, loader, params=0.5, rounds=2, finetune=Trainer(), **KW)
    fp.prune_in_rounds(model, loader, params=0.5, rounds=2, finetune=Trainer().step, **KW)
    fp.prune_in_rounds(model, loader, params=0.5, rounds=2,
                       finetune=functools.partial(lambda tag, m: calls.append(tag), "partial"),
                       **KW)
    fp.prune_in_rounds(model, loader, params=0.5, rounds=2,
                       finetune=lambda *a: calls.append(len(a)), **KW)
    assert calls == ["call", 1, "partial", 2]


@pytest.mark.parametrize("bad, why", [
    (3, "int"),
    ("train", "str"),
    (lambda: None, r"finetune\(\)"),
    (lambda m, i, extra: None, r"finetune\(m, i, extra\)"),
])
def test_bad_finetune_is_an_error_before_any_scoring(model, bad, why):
    with pytest.raises(fp.FairPrunerError, match=rf"(?s){why}.*fn\(model\).*round_index"):
        fp.prune_in_rounds(model, _NotToBeScored(), params=0.5, rounds=2, finetune=bad, **KW)


def test_keyword_only_argument_without_default_is_an_error(model):
    def finetune(m, *, lr):
        pass

    with pytest.raises(fp.FairPrunerError, match=r"neither fn\(model\) nor fn\(model, round_"):
        fp.prune_in_rounds(model, _NotToBeScored(), params=0.5, rounds=2, finetune=finetune, **KW)
