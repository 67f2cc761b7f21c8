"""Bad input gets a clear error that names the problem and the fix."""
import pytest
import torch
import torch.nn as nn

import fair_pruner as fp
from helpers import TinyCNN, TinyMLP, batches

KW = dict(samples_per_class=3, projections=4, progress=False)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN(num_classes=4).eval()


@pytest.fixture
def loader():
    return batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)


@pytest.fixture
def book(model, loader):
    return fp.score(model, loader, **KW)


def test_unlabelled_data(model):
    with pytest.raises(fp.CalibrationDataError, match="unlabelled"):
        fp.score(model, [torch.randn(8, 3, 8, 8)], **KW)


def test_float_labels(model):
    with pytest.raises(fp.CalibrationDataError, match="integer"):
        fp.score(model, [(torch.randn(8, 3, 8, 8), torch.rand(8))], **KW)


def test_empty_loader(model):
    with pytest.raises(fp.CalibrationDataError, match="empty"):
        fp.score(model, [], **KW)


def test_fewer_than_two_classes(model):
    with pytest.raises(fp.CalibrationDataError, match="two classes"):
        fp.score(model, [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))], **KW)


def test_class_with_one_sample_is_dropped_with_warning(model):
    with pytest.warns(UserWarning, match="fewer than 2"):
        book = fp.score(model, [(torch.randn(8, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 0, 1, 3]))],
                        **KW)
    assert 2 not in book.meta["classes_used"] and 3 not in book.meta["classes_used"]


def test_nan_inputs(model):
    x = torch.randn(8, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(fp.NonFiniteError, match="NaN/inf activations at the output of conv1"):
        fp.score(model, [(x, torch.arange(8) % 4)], **KW)


def test_nan_gradients_with_finite_loss(model, loader):
    def bad_loss(out, y):  # finite value, NaN gradient: d sqrt(u)/du at 0 is inf, times 0
        return torch.sqrt((out * 0).abs()).sum()
    with pytest.raises(fp.NonFiniteError, match="gradients"):
        fp.score(model, loader, loss_fn=bad_loss, **KW)


def test_label_out_of_range(model):
    with pytest.raises(fp.CalibrationDataError, match=r"labels must lie in \[0, 4\)"):
        fp.score(model, [(torch.randn(8, 3, 8, 8), torch.full((8,), 9))], **KW)


def test_num_classes_mismatch(model, loader):
    with pytest.raises(fp.CalibrationDataError, match="num_classes"):
        fp.score(model, loader, num_classes=7, **KW)


def test_nothing_to_prune():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(fp.UnsupportedModelError, match="no prunable"):
        fp.score(model, [(torch.randn(6, 12), torch.arange(6) % 3)], **KW)


def test_model_that_fails_on_the_data(model):
    with pytest.raises(fp.UnsupportedModelError, match="failed on the first"):
        fp.score(model, [(torch.randn(8, 5), torch.arange(8) % 4)], **KW)


def test_unknown_ignore_name(model, loader):
    with pytest.raises(fp.UnsupportedModelError, match="no module named"):
        fp.score(model, loader, ignore=["nope"], **KW)


def test_bad_arguments(model, loader):
    with pytest.raises(fp.CalibrationDataError, match="u_mode"):
        fp.score(model, loader, u_mode="fast", progress=False)
    with pytest.raises(fp.CalibrationDataError, match="samples_per_class"):
        fp.score(model, loader, samples_per_class=1, progress=False)
    with pytest.raises(fp.UnsupportedModelError, match="nn.Module"):
        fp.score(lambda x: x, loader, progress=False)


@pytest.mark.parametrize("tod", [-0.1, 1.5, float("nan")])
def test_tolerance_outside_unit_interval(book, tod):
    with pytest.raises(fp.TargetError, match=r"\[0, 1\]"):
        fp.allocate(book, tod=tod)


def test_unreachable_target(book):
    with pytest.raises(fp.TargetError, match="cannot be reached: at most"):
        fp.allocate(book, params=0.995)


@pytest.mark.parametrize("kw", [dict(params=0.0), dict(flops=1.0), dict(units=-1)])
def test_target_out_of_range(book, kw):
    with pytest.raises(fp.TargetError, match=r"\(0, 1\)"):
        fp.allocate(book, **kw)


def test_conflicting_allocation_arguments(book):
    with pytest.raises(fp.TargetError, match="at most one"):
        fp.allocate(book, params=0.2, flops=0.2)
    with pytest.raises(fp.TargetError, match="not both"):
        fp.allocate(book, tod=0.1, params=0.2)
    with pytest.raises(fp.TargetError, match="needs a target"):
        fp.allocate(book, strategy="uniform")
    with pytest.raises(fp.FairPrunerError, match="not in this score book"):
        fp.allocate(book, signal="nope")


def test_book_from_another_model(book):
    other = TinyMLP(d_in=4, hidden=6, num_classes=4)
    plan = fp.allocate(book, params=0.2)
    with pytest.raises(fp.BookMismatchError, match="another model"):
        fp.prune(other, plan)
    with pytest.raises(fp.BookMismatchError, match="another model"):
        book.check_model(other)


def test_not_a_plan(model, book):
    with pytest.raises(fp.FairPrunerError, match="Plan"):
        fp.prune(model, book)


def test_not_a_book(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(fp.FairPrunerError, match="cannot read score book"):
        fp.ScoreBook.load(p)


def test_save_pretrained_of_a_cnn_is_a_clear_error(tmp_path):
    from helpers import TinyCNN
    with pytest.raises(fp.FairPrunerError, match="torch.save"):
        fp.save_pretrained(TinyCNN(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_integer_labels_of_any_width_and_a_label_count_mismatch():
    """int32 / uint8 class labels are class indices like int64 ones (the same book); a batch
    whose label count differs from the model's outputs is a clear error, not torch's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 4))
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))) for _ in range(3)]
    kw = dict(progress=False, samples_per_class=4, projections=8)
    want = fp.score(m, data, **kw)
    for dt in (torch.int32, torch.uint8):
        got = fp.score(m, [(x, y.to(dt)) for x, y in data], **kw)
        assert all(torch.equal(a.u, b.u) and torch.equal(a.r, b.r)
                   for a, b in zip(got.groups, want.groups))
    with pytest.raises(fp.FairPrunerError, match="one label per sample"):
        fp.score(m, [(x, y[:5]) for x, y in data], **kw)


@pytest.mark.parametrize("var", ["FAIR_PRUNER_GROUP_SEARCH_S", "FAIR_PRUNER_GROUP_SEARCH_MIB"])
@pytest.mark.parametrize("value", ["ten", "nan", "inf"])
def test_environment_variable_that_is_not_a_number(model, loader, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(fp.ConfigError, match=f"{var}='{value}' is not a number"):
        fp.score(model, loader, **KW)
    monkeypatch.setenv(var, " ")                      # empty: the default
    assert fp.score(model, loader, **KW).groups
