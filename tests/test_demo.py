"""`fair-pruner demo`: the shipped trained checkpoint, and training it from scratch."""
import os
import stat

import pytest
import torch

import fair_pruner as fp
from fair_pruner import data
from fair_pruner.cli import main

DENSE_PARAMS = 160_074


@pytest.fixture
def trainings(monkeypatch):
    """Record every data.train call (params of the model, epochs, threads); train nothing."""
    calls = []

    def fake_train(model, dataset, epochs, *a, **k):
        calls.append((data.count_params(model), epochs, torch.get_num_threads()))
        return model.eval()

    monkeypatch.setattr(data, "train", fake_train)
    return calls


def test_shipped_checkpoint_is_small_trained_fp16():
    assert os.path.getsize(data.DEMO_CHECKPOINT) < 400_000
    from safetensors import safe_open
    with safe_open(data.DEMO_CHECKPOINT, framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    model, recipe = data.load_demo_checkpoint()
    assert recipe["seed"] == 0 and recipe["epochs"] == data.DEMO_RECIPE["epochs"]
    assert data.count_params(model) == DENSE_PARAMS and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _, test = data.digits(seed=recipe["seed"])           # the split it was not trained on
    assert data.accuracy(model, test) > 0.95


def test_default_demo_loads_the_checkpoint(tmp_path, monkeypatch, capsys, trainings):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    assert main(["demo", "--calib", "128", "--finetune", "1", "--params", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "shipped trained checkpoint" in out and "pruned (one-shot)" in out
    assert [c for c in trainings if c[0] == DENSE_PARAMS] == []     # the dense CNN: no training
    assert len(trainings) == 1 and trainings[0][1:] == (1, 1)        # fine-tune, on one thread
    assert torch.get_num_threads() == before
    assert os.listdir(tmp_path) == []                                # nothing written unasked


@pytest.mark.parametrize("argv, epochs, why", [
    (["--train"], 12, "--train"),
    (["--seed", "1"], 12, "--seed 1"),
    (["--epochs", "3"], 3, "--epochs"),
])
def test_training_from_scratch(argv, epochs, why, capsys, trainings):
    assert main(["demo", "--calib", "64", "--finetune", "0"] + argv) == 0
    assert trainings[0] == (DENSE_PARAMS, epochs, 1)
    assert f"trained from scratch ({why})" in capsys.readouterr().out


def test_training_recipe_is_reproducible_and_save_model(tmp_path):
    a = data.train_demo_model(epochs=1)
    b = data.train_demo_model(epochs=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    old = os.umask(0o022)
    try:
        data.save_demo_checkpoint(a, str(tmp_path / "m.safetensors"), dict(data.DEMO_RECIPE,
                                                                          epochs=1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o644
    c, recipe = data.load_demo_checkpoint(str(tmp_path / "m.safetensors"))
    assert recipe["epochs"] == 1
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        want = va.half().float() if va.is_floating_point() else va
        assert torch.equal(want, vc), k


def test_save_model_option(tmp_path, trainings):
    path = tmp_path / "cnn.safetensors"
    assert main(["demo", "-q", "--calib", "64", "--finetune", "0", "--save-model",
                 str(path)]) == 0
    model, _ = data.load_demo_checkpoint(str(path))
    shipped, _ = data.load_demo_checkpoint()
    for (k, va), vb in zip(model.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(va, vb), k                  # the dense model, not the pruned one


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(fp.FairPrunerError, match="--train"):
        data.load_demo_checkpoint(str(tmp_path / "x.safetensors"))
    assert main(["demo", "--threads", "0"]) == 2
    assert "--threads 0" in capsys.readouterr().err
