"""The command line: help and defaults for every option, --help / --version without torch, the
demo end to end, re-planning from a book, `score` for CNNs, `prune-lm`'s options, its warnings
and its -q."""
import argparse
import json
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fair_pruner as fp
from fair_pruner.cli import SIGNALS, build_parser, main

ROOT = os.path.join(os.path.dirname(__file__), "..")
WORDS = ["the", "a", "of", "and", "to", "in", "she", "he", "was", "her", "not", "be"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(ROOT), env.get("PYTHONPATH", "")])
    return env


def _subparsers():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


# --------------------------------------------------------------------------------------------
# Help, defaults, --version, import cost
# --------------------------------------------------------------------------------------------

def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "score", "allocate", "prune-lm"):
        assert cmd in out
    for cmd in ("demo", "score", "allocate", "prune-lm"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["score", "allocate", "prune-lm"])
def test_every_option_has_help_and_shows_its_default(cmd):
    parser = _subparsers()[cmd]
    text = parser.format_help()
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        assert a.help and a.help.strip(), f"{cmd} {a.option_strings[0]} has no help text"
        if a.default is not None and a.default is not False:
            shown = parser._get_formatter()._expand_help(a)
            assert "default" in shown, f"{cmd} {a.option_strings[0]}: default not shown"
    for name in SIGNALS if cmd != "score" else ():
        assert f"  {name} " in text, f"--signal {name} is not listed in {cmd} --help"


def test_prune_lm_has_the_options_a_user_needs():
    opts = {o for a in _subparsers()["prune-lm"]._actions for o in a.option_strings}
    for o in ("--params", "--flops", "--tod", "--experts", "--units", "--heads", "--signal",
              "--strategy", "--reconstruct", "--gram-memory", "--seq-len", "--num-seqs",
              "--round-to", "--seed", "--eval-text", "--eval-tokens", "--dtype", "--gguf",
              "--gguf-dtype", "--expert-merge", "--checkpointing", "-q"):
        assert o in opts, o
    with pytest.raises(SystemExit):      # mutually exclusive targets
        main(["prune-lm", "m", "--calib-text", "c", "--out", "o", "--params", "0.2",
              "--flops", "0.2"])
    with pytest.raises(SystemExit):      # a fraction, not a percentage
        main(["prune-lm", "m", "--calib-text", "c", "--out", "o", "--params", "20"])


def test_help_and_version_do_not_import_torch():
    code = ("import sys, fair_pruner.cli as c\n"
            "for argv in (['--help'], ['--version'], ['demo', '--help'], ['score', '--help'],\n"
            "             ['allocate', '--help'], ['prune-lm', '--help']):\n"
            "    try:\n"
            "        c.main(argv)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (argv, e.code)\n"
            "import fair_pruner\n"
            "print('VERSION', fair_pruner.__version__)\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert f"fair-pruner {fp.__version__}" in r.stdout
    assert "VERSION " + fp.__version__ in r.stdout
    assert "TORCH False" in r.stdout


def test_package_names_resolve_lazily():
    for name in fp.__all__:
        assert getattr(fp, name) is not None
    assert fp.allocate is fp.plan.allocate and fp.ScoreBook is fp.scorebook.ScoreBook
    assert set(fp.__all__) <= set(dir(fp))
    with pytest.raises(AttributeError):
        fp.no_such_name
    ns = {}
    exec("from fair_pruner import *", ns)
    assert ns["Plan"] is fp.Plan and callable(ns["save_pretrained"])


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "fair_pruner.cli", "--help"], capture_output=True,
                       text=True, env=_env())
    assert r.returncode == 0 and "demo" in r.stdout


# --------------------------------------------------------------------------------------------
# demo and allocate
# --------------------------------------------------------------------------------------------

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
    assert main(["allocate", str(book), "--params", "0.3", "--signal", "l1"]) == 0
    assert "signal=l1" in capsys.readouterr().out
    assert main(["allocate", str(book), "--params", "0.3", "--signal", "taylor"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fair-pruner: error: --signal taylor") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["allocate", str(book), "--signal", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["allocate", str(book), "--params", "0.3", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.safetensors", "kept.png", "plan.json"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["allocate", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fair-pruner: error:") and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# score (CNNs)
# --------------------------------------------------------------------------------------------

NET = '''import torch.nn as nn


def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(12, 3))
'''


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog", "fox"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            px = torch.randint(0, 256, (14, 18, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "net.py").write_text(NET)
    return tmp_path


def test_score_command_scores_plans_and_prunes(image_folder, capsys, monkeypatch):
    from safetensors.torch import load_file
    d = image_folder
    monkeypatch.chdir(d / "data")                       # nothing may land in the cwd
    sys.path.insert(0, str(d))
    try:
        import net
    finally:
        sys.path.remove(str(d))
    torch.manual_seed(1)
    model = net.make()
    torch.save(model.state_dict(), d / "w.pth")
    book, plan, pruned = d / "book.safetensors", d / "plan.json", d / "pruned.safetensors"
    assert main(["score", f"{d / 'net.py'}:make", "--weights", str(d / "w.pth"), "--data",
                 str(d / "data"), "--out", str(book), "--image-size", "12",
                 "--samples-per-class", "4", "--batch-size", "8", "--params", "0.3",
                 "--plan-out", str(plan), "--prune-out", str(pruned), "--reconstruct"]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 12 images of 3 classes" in out and "signals: " in out
    assert "params" in out and "strategy=tod" in out and "reconstruction: affine" in out
    b = fp.ScoreBook.load(book)
    assert b.meta["calibration_samples"] == 12 and b.meta["reconstruction_stats"]
    p = fp.Plan.load(plan)
    assert p.params_reduction >= 0.3
    # the saved weights load into the architecture the plan rebuilds, and equal fp.prune's
    rebuilt = fp.prune(model, p, reconstruct=None)
    rebuilt.load_state_dict(load_file(pruned))
    ref = fp.prune(model, p, book=b)
    x = torch.randn(2, 3, 12, 12)
    assert torch.allclose(rebuilt.eval()(x), ref.eval()(x))
    assert sorted(os.listdir(d / "data")) == ["cat", "dog", "fox"]
    for name in b.signal_names:
        assert name in SIGNALS
    # --params alone prints the plan and writes nothing but the book
    assert main(["score", f"{d / 'net.py'}:make", "--data", str(d / "data"), "--out",
                 str(d / "b2.safetensors"), "--image-size", "12", "--params", "0.3"]) == 0
    cap = capsys.readouterr()
    assert "strategy=tod" in cap.out and "no --weights" in cap.err


def test_score_command_errors_are_one_line(image_folder, capsys):
    d = image_folder
    base = ["--data", str(d / "data"), "--out", str(d / "b.safetensors"), "-q"]
    cases = [(["resnet181"], "not a torchvision model name (did you mean resnet18"),
             ([f"{d / 'net.py'}:nope"], "has no function 'nope' (it defines make)"),
             ([f"{d / 'net.py'}"], "name the function"),
             ([f"{d / 'net.py'}:make", "--prune-out", str(d / "x.safetensors"), "--params",
               "0.3"], "--prune-out needs --plan-out"),
             ([f"{d / 'net.py'}:make", "--weights", str(d / "data" / "cat" / "0.png")],
              "give a .safetensors, .pt or .pth"),
             (["mobilenet_v3_small", "--data", str(d / "nope")] + base[2:], "is not a directory")]
    try:
        import timm  # noqa: F401
    except ImportError:
        cases.append((["timm:resnet18"], "pip install timm"))
    for argv, msg in cases:
        args = ["score"] + argv + (base if "--data" not in argv else [])
        assert main(args) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fair-pruner: error:") and msg in err and err.count("\n") == 1, err
    assert not (d / "b.safetensors").exists()


# --------------------------------------------------------------------------------------------
# prune-lm
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny saved Llama (2 layers, 2 KV groups of 2 query heads, 48 MLP neurons per layer),
    its word-level tokenizer, a calibration text and a held-out text."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fair_pruner.llm import transformers_module
    tf = transformers_module()
    d = tmp_path_factory.mktemp("lm")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=61,
                         max_position_embeddings=128, tie_word_embeddings=False, dtype="float16")
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.mul_(3.0)
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    g = torch.Generator().manual_seed(0)
    for name, n in (("calib.txt", 600), ("eval.txt", 300)):
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        (d / name).write_text(" ".join(WORDS[i] for i in idx))
    return d


def _lm_args(d, out, *extra):
    return ["prune-lm", str(d / "model"), "--calib-text", str(d / "calib.txt"), "--out",
            str(out), "--seq-len", "32", "--num-seqs", "8", *extra]


def test_prune_lm_mlp_only_with_eval_and_dtype(lm_dir, tmp_path, capsys):
    d = lm_dir
    out = tmp_path / "out"
    assert main(_lm_args(d, out, "--units", "mlp", "--params", "0.3", "--eval-text",
                         str(d / "eval.txt"), "--eval-tokens", "200", "--dtype", "bfloat16",
                         "--plot", str(tmp_path / "layers.png"))) == 0
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    shown = capsys.readouterr().out
    table = [line.split() for line in shown.splitlines() if line.strip()[:1].isdigit()]
    assert [row[1] for row in table[:2]] == ["-", "-"]          # attention not scored / kept
    rows = {line.split()[0]: line.split() for line in shown.splitlines()
            if line.startswith(("dense", "pruned"))}
    assert rows["dense"][1] == "15,360" and float(rows["dense"][2]) > 1
    assert float(rows["pruned"][2]) > 1 and "200 tokens" in shown
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = fp.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    att = [g for g in fp.ScoreBook.load(out / "score_book.safetensors").groups]
    assert {g.meta["family"] for g in att} == {"ffn"}
    # --dtype auto: the source config's dtype (float16 here)
    assert main(_lm_args(d, tmp_path / "auto", "--params", "0.2", "-q")) == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "float16"


def test_prune_lm_query_heads_and_free_cut_warning(lm_dir, tmp_path, capsys):
    d = lm_dir
    assert main(_lm_args(d, tmp_path / "q", "--heads", "query", "--units", "attention",
                         "--tod", "0.5")) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"\b[0-2]/2 q\b", out)) == 2          # both layers, query slots
    book = fp.ScoreBook.load(tmp_path / "q" / "score_book.safetensors")
    assert {g.meta["mode"] for g in book.groups} == {"query"}
    assert main(_lm_args(d, tmp_path / "kv", "--tod", "0")) == 0
    cap = capsys.readouterr()
    book = fp.ScoreBook.load(tmp_path / "kv" / "score_book.safetensors")
    plan = fp.allocate(book, tod=0.0)
    cut = sum(len(plan.removed[g.name]) for g in book.groups if g.kind == "head")
    assert cut > 0                             # the warning says what the plan did
    assert f"{cut} of the 4 KV groups (2 per layer) go at ToD alpha = 0" in cap.err
    assert "= 16 MLP neurons" in cap.err and "--units mlp" in cap.err
    assert main(_lm_args(d, tmp_path / "mlp", "--tod", "0", "--units", "mlp")) == 0
    assert "free cuts" not in capsys.readouterr().err


def test_overshoot_warning_explains_granularity(lm_dir, tmp_path, capsys):
    d = lm_dir
    assert main(_lm_args(d, tmp_path / "o", "--params", "0.2", "-q")) == 0
    book_path = tmp_path / "o" / "score_book.safetensors"
    book = fp.ScoreBook.load(book_path)
    # 48 neurons kept in multiples of 16: each step takes 16 neurons = 10% of the parameters
    plan = fp.allocate(book, params=0.05, round_to=16)
    assert plan.params_reduction > 0.06
    assert main(["allocate", str(book_path), "--params", "0.05", "--round-to", "16"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("fair-pruner: warning: --params 0.05 asked for 5.0% of the "
                          "attention+MLP parameters")
    assert f"the plan removes {plan.params_reduction:.1%}" in err
    assert f"{100 * (plan.params_reduction - 0.05):.1f} points more" in err
    assert "Smallest step here: 16 MLP neurons (10%" in err and "--round-to 1" in err
    assert main(["allocate", str(book_path), "--params", "0.2"]) == 0     # reached: no warning
    plan = fp.allocate(book, params=0.2)
    assert ("points more" in capsys.readouterr().err) == (plan.params_reduction - 0.2 > 0.01)


def test_prune_lm_experts_with_merge(lm_dir, tmp_path, capsys):
    """A tiny saved Qwen2-MoE (same tokenizer and texts): --experts with --expert-merge prunes,
    saves and reloads, and the merged model differs from the dropped one."""
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
    d = tmp_path / "moe"
    cfg = tf.Qwen2MoeConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, num_experts=8,
                            num_experts_per_tok=2, max_position_embeddings=128,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2 and "embed" not in n:
                p.mul_(6.0 if ".gate." in n else 3.0)
    m.save_pretrained(d)
    tf.AutoTokenizer.from_pretrained(lm_dir / "model").save_pretrained(d)
    outs = {}
    for extra in ((), ("--expert-merge",)):
        out = tmp_path / ("merged" if extra else "dropped")
        args = ["prune-lm", str(d), "--calib-text", str(lm_dir / "calib.txt"), "--out", str(out),
                "--seq-len", "32", "--num-seqs", "8", "--experts", "0.25", "-q", *extra]
        assert main(args) == 0, capsys.readouterr().err
        outs[bool(extra)] = fp.from_pretrained(out)
    x = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = (outs[k](input_ids=x).logits for k in (False, True))
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4


def test_prune_lm_bad_combinations_fail_fast(lm_dir, tmp_path, capsys):
    d = lm_dir
    cases = [(["--experts", "0.3", "--params", "0.2"], "--experts cannot be combined"),
             (["--heads", "query", "--units", "mlp"], "--units mlp prunes MLP neurons only"),
             (["--signal", "obs", "--reconstruct", "bias"], "--signal obs needs the Gram"),
             (["--eval-text", str(tmp_path / "none.txt")], "--eval-text"),
             (["--experts", "0.3"], "needs a model with routed MoE experts"),
             (["--expert-merge"], "give --experts F")]
    for extra, msg in cases:
        assert main(_lm_args(d, tmp_path / "x", *extra, "-q")) == 2
        err = capsys.readouterr().err
        assert err.startswith("fair-pruner: error:") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_prune_lm_gguf_calls_the_exporter(lm_dir, tmp_path, capsys, monkeypatch):
    from fair_pruner.errors import FairPrunerError
    calls = []
    fake = types.ModuleType("fair_pruner.llm.gguf_export")
    checks = []
    fake.save_gguf = lambda model, path, **kw: calls.append((model, path, kw))
    fake.check_gguf = lambda model, **kw: checks.append(kw)
    monkeypatch.setitem(sys.modules, "fair_pruner.llm.gguf_export", fake)
    g = str(tmp_path / "m.gguf")
    assert main(_lm_args(lm_dir, tmp_path / "o", "--gguf", g, "--gguf-dtype", "q8_0", "-q")) == 0
    assert checks and checks[0]["dtype"] == "q8_0"
    (model, path, kw), = calls
    assert path == g and kw["dtype"] == "q8_0" and kw["source_gguf"] is None
    assert kw["progress"] is False                  # -q
    assert kw["tokenizer"] is not None and hasattr(model, "config")

    def refuse(*a, **k):
        raise FairPrunerError("save_gguf: architecture llama-tiny is not supported")
    fake.save_gguf = refuse
    assert main(_lm_args(lm_dir, tmp_path / "o2", "--gguf", g)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "fair-pruner: error: save_gguf: architecture llama-tiny is not supported"
    fake.check_gguf = refuse            # refused up front: before calibration, nothing written
    assert main(_lm_args(lm_dir, tmp_path / "o3", "--gguf", g)) == 2
    assert not (tmp_path / "o3").exists()


def test_save_dtype_auto(tmp_path):
    from fair_pruner.llm.cli import save_dtype
    assert save_dtype("auto", "x/model.Q4_K_M.gguf") == "bfloat16"
    assert save_dtype("float16", "x.gguf") == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert save_dtype("auto", str(tmp_path)) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert save_dtype("auto", str(tmp_path)) == "auto"


def test_signal_names_cover_real_books(lm_dir):
    from fair_pruner.llm import transformers_module
    from helpers import image_loader, TinyCNN, tiny_lm
    transformers_module()
    books = [fp.score(TinyCNN(), image_loader(), progress=False)]
    model = fp.from_pretrained(lm_dir / "model", dtype=torch.float32)
    ids = torch.randint(1, 13, (4, 24), generator=torch.Generator().manual_seed(0))
    books.append(fp.score(model, [ids], classes=4, samples_per_class=4, progress=False,
                          weight_taylor=True, obs_signal=True, reconstruction=True))
    books.append(fp.score(tiny_lm("mixtral"), [ids], classes=4, samples_per_class=4,
                          progress=False))
    names = set().union(*(set(g.signals) for b in books for g in b.groups))
    assert {"taylor", "obs", "freq", "reap", "fluctuation", "u"} <= names
    assert names <= set(SIGNALS), sorted(names - set(SIGNALS))


def test_quiet_silences_everything(lm_dir, tmp_path, capsys):
    d = lm_dir
    # Control: without -q the same run shows progress, tables and fair_pruner's warning (here:
    # the Gram matrices exceed --gram-memory 1e-9 and are collected in chunks).
    with pytest.warns(UserWarning, match="gram_memory"):
        assert main(_lm_args(d, tmp_path / "loud", "--gram-memory", "1e-9", "--eval-text",
                             str(d / "eval.txt"))) == 0
    cap = capsys.readouterr()
    assert "layer" in cap.out and "perplexity" in cap.out and "calibrating" in cap.err
    from fair_pruner.llm import transformers_module
    log = transformers_module().utils.logging
    before = (log.get_verbosity(), log.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(_lm_args(d, tmp_path / "quiet", "--gram-memory", "1e-9", "--eval-text",
                             str(d / "eval.txt"), "-q")) == 0
    assert capsys.readouterr() == ("", "")
    assert not [w for w in seen if "fair_pruner" in f"{w.message} {w.filename}"
                or "transformers" in w.filename]
    assert (log.get_verbosity(), log.is_progress_bar_enabled()) == before     # restored
    # transformers' own logging and progress bars write to the process's streams: a fresh one
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "fair_pruner.cli"]
                       + _lm_args(d, tmp_path / "sub", "--gram-memory", "1e-9", "--eval-text",
                                  str(d / "eval.txt"), "-q"),
                       capture_output=True, text=True, cwd=cwd, env=_env())
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert os.listdir(cwd) == [] and (tmp_path / "sub" / "model.safetensors").exists()
