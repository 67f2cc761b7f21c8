"""The command line: help for every command, the demo end to end, re-planning from a book."""
import subprocess
import sys

import pytest

from fair_pruner.cli import build_parser, main


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "allocate", "prune-lm"):
        assert cmd in out
    for cmd in ("demo", "allocate", "prune-lm"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage" in capsys.readouterr().out


def test_demo_and_allocate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png, book = tmp_path / "kept.png", tmp_path / "book.safetensors"
    assert main(["demo", "--epochs", "3", "--finetune", "1", "--calib", "200", "--params", "0.4",
                 "--plot", str(png), "--save-book", str(book)]) == 0
    out = capsys.readouterr().out
    assert "pruned (one-shot)" in out and "features.0" in out and "params" in out
    assert "+ reconstruction" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["allocate", str(book), "--tod", "0.1", "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "alpha=0.1" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.safetensors", "kept.png", "plan.json"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["allocate", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fair-pruner: error:") and "Traceback" not in err


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "fair_pruner.cli", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "demo" in r.stdout
