"""Every file the package writes gets the usual mode of a new file, 0o666 & ~umask."""
import os
import stat
import sys

import pytest
import torch

import fair_pruner as fp
from fair_pruner.scorebook import atomic_write, umask
from helpers import TinyCNN, batches


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def book():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    loader = batches(torch.randn(24, 3, 8, 8), torch.arange(24) % 4, 8)
    return fp.score(model, loader, samples_per_class=3, projections=4, progress=False)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert os.umask(mask) == mask


def test_atomic_write(tmp_path, mask):
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"x"))
    assert _mode(path) == 0o666 & ~mask
    assert sorted(os.listdir(path.parent)) == ["f.bin"]


def test_replacing_a_file_gives_the_usual_mode(tmp_path, mask):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new"))
    assert _mode(path) == 0o666 & ~mask and path.read_bytes() == b"new"


def test_score_book_plan_and_plot(tmp_path, mask, book):
    plan = fp.allocate(book, params=0.3)
    book.save(tmp_path / "book.safetensors")
    plan.save(tmp_path / "plan.json")
    plan.plot(tmp_path / "plan.png")
    for name in ("book.safetensors", "plan.json", "plan.png"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, name
    assert sorted(os.listdir(tmp_path)) == ["book.safetensors", "plan.json", "plan.png"]
    assert fp.ScoreBook.load(tmp_path / "book.safetensors").fingerprint == book.fingerprint


def test_plot_leaves_the_matplotlib_backend_alone(tmp_path, book):
    import matplotlib
    before = matplotlib.get_backend()
    fp.allocate(book, params=0.3).plot(tmp_path / "p.png")
    assert matplotlib.get_backend() == before
    assert "matplotlib.pyplot" not in sys.modules or not __import__(
        "matplotlib.pyplot").pyplot.get_fignums()


def test_pruned_language_model_files(tmp_path, mask):
    pytest.importorskip("transformers")
    from helpers import tiny_lm, token_batches

    model = tiny_lm("llama")
    book = fp.score(model, token_batches(), samples_per_class=4, projections=4, progress=False)
    pruned = fp.prune(model, fp.allocate(book, params=0.2))
    out = tmp_path / "out"
    fp.save_pretrained(pruned, out)
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files
    for name in files:
        assert _mode(out / name) == 0o666 & ~mask, name
