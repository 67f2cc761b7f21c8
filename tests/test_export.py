"""Pruned LLM directories that stock transformers loads (no fair_pruner), and the dtype on disk.

The all-families sweep (tests/test_arch.py) loads every family's pruned directory with
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` in this process; here a
subprocess that cannot import fair_pruner does the same, and the saved format is checked.
"""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

import fair_pruner as fp
from fair_pruner.errors import FairPrunerError

from helpers import LM_VOCAB, tiny_lm, token_batches

try:
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
except ImportError:  # pragma: no cover - the llm extra is not installed
    pytest.skip("transformers is not installed (pip install -e '.[llm]')", allow_module_level=True)

X = torch.randint(0, LM_VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
REMOTE = os.path.join(os.path.dirname(fp.__file__), "llm", "remote_modeling.py")


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.fixture(scope="module")
def pruned():
    m = tiny_lm("llama")
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False)
    plan = fp.allocate(book, params=0.3)
    p = fp.prune(m, plan, book=book)           # affine reconstruction: o_proj/down_proj biases
    widths = fp.llm.layer_widths(p)
    assert widths[0] != widths[1] or widths[0]["ffn"] != {"intermediate_size": 48}
    assert p.model.layers[0].mlp.down_proj.bias is not None
    return m, p


STOCK = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fair_pruner" or name.startswith("fair_pruner."):
            raise ImportError("fair_pruner is not installed in this check")
sys.meta_path.insert(0, Block())
import torch, transformers
out = sys.argv[1]
try:
    transformers.AutoModelForCausalLM.from_pretrained(out)
    no_trust = "loaded"
except ValueError as e:
    no_trust = str(e)
m = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
x = torch.load(out + "/x.pt")
with torch.no_grad():
    torch.save(m(input_ids=x, use_cache=False).logits, out + "/stock_logits.pt")
gen = m.generate(x[:1], max_new_tokens=4, do_sample=False)
print(json.dumps({"no_trust": no_trust, "gen": gen.tolist(), "class": type(m).__name__,
                  "fair_pruner_imported": any(k.startswith("fair_pruner") for k in sys.modules)}))
"""


def test_stock_transformers_without_fair_pruner_loads_the_pruned_directory(pruned, tmp_path):
    _, p = pruned
    out = tmp_path / "out"
    fp.save_pretrained(p, out)
    torch.save(X, out / "x.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-c", STOCK, str(out)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.rindex('{"no_trust"'):])
    assert not res["fair_pruner_imported"]
    assert res["class"] == "FairPrunedForCausalLM"
    assert "trust_remote_code" in res["no_trust"]        # a hint, not a size-mismatch report
    want = logits(p)
    torch.testing.assert_close(torch.load(out / "stock_logits.pt"), want, atol=1e-6, rtol=1e-6)
    ours = p.generate(X[:1], max_new_tokens=4, do_sample=False)
    assert res["gen"] == ours.tolist()


def test_saved_config_records_the_exact_difference(pruned, tmp_path):
    m, p = pruned
    fp.save_pretrained(p, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "fair_pruned_llama"
    assert cfg["architectures"] == ["FairPrunedForCausalLM"]
    entry = cfg["fair_pruner"]
    assert entry["format"] == 3 and entry["base_architecture"] == "LlamaForCausalLM"
    shapes = {n: list(t.shape) for n, t in p.named_parameters()}
    full = {n: list(t.shape) for n, t in m.named_parameters()}
    want = {n: s for n, s in shapes.items() if full.get(n) != s}
    assert entry["params"] == want and want                  # every changed shape, nothing else
    assert "model.layers.0.mlp.down_proj.bias" in entry["params"]
    attn = p.model.layers[0].self_attn
    if attn.num_key_value_groups != m.model.layers[0].self_attn.num_key_value_groups:
        assert entry["modules"]["model.layers.0.self_attn"]["num_key_value_groups"] == \
            attn.num_key_value_groups
    code = (tmp_path / "out" / "modeling_fair_pruner.py").read_text()
    assert 'BASE_ARCHITECTURE = "LlamaForCausalLM"' in code


def test_modeling_file_imports_only_torch_and_transformers():
    tree = ast.parse(open(REMOTE).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the shipped modeling file"
            mods.add(node.module.split(".")[0])
    assert mods <= {"torch", "transformers", "copy", "typing", "__future__"}, mods


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16),
                                               ("float16", torch.float16),
                                               (torch.float32, torch.float32)])
def test_dtype_on_disk(pruned, tmp_path, dtype, torch_dtype):
    from safetensors import safe_open
    _, p = pruned
    fp.save_pretrained(p, tmp_path / "out", dtype=dtype)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        dts = {f.get_tensor(k).dtype for k in f.keys()}
    assert dts == {torch_dtype}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == str(torch_dtype).replace("torch.", "")
    back = fp.from_pretrained(tmp_path / "out")
    assert back.model.layers[0].mlp.down_proj.weight.dtype == torch_dtype
    assert p.model.layers[0].mlp.down_proj.weight.dtype == torch.float32   # caller's untouched
    got, want = logits(back).float(), logits(p)
    tol = {torch.float32: 1e-6, torch.float16: 2e-2, torch.bfloat16: 1e-1}[torch_dtype]
    assert (got - want).abs().max() <= tol * want.abs().max()
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert stock.model.layers[0].mlp.down_proj.weight.dtype == torch_dtype
    torch.testing.assert_close(logits(stock), logits(back))


def test_bad_dtype_is_a_clear_error(pruned, tmp_path):
    with pytest.raises(FairPrunerError, match="float32, float16 or bfloat16"):
        fp.save_pretrained(pruned[1], tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_reloaded_model_saves_again(pruned, tmp_path):
    _, p = pruned
    fp.save_pretrained(p, tmp_path / "a")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    fp.save_pretrained(stock, tmp_path / "b")           # from the remote-code class
    fp.save_pretrained(fp.from_pretrained(tmp_path / "a"), tmp_path / "c")
    for d in ("b", "c"):
        a = json.loads((tmp_path / "a" / "config.json").read_text())["fair_pruner"]
        b = json.loads((tmp_path / d / "config.json").read_text())["fair_pruner"]
        assert a == b
        torch.testing.assert_close(logits(fp.from_pretrained(tmp_path / d)), logits(p))


def test_format_2_directories_still_load(pruned, tmp_path):
    """A directory written before format 3 (widths + biases only, the base model type)."""
    _, p = pruned
    out = tmp_path / "old"
    fp.save_pretrained(p, out)
    cfg = json.loads((out / "config.json").read_text())
    entry = cfg["fair_pruner"]
    cfg["model_type"] = entry["base_model_type"]
    cfg["architectures"] = [entry["base_architecture"]]
    del cfg["auto_map"]
    cfg["fair_pruner"] = {"format": 2, "layers": entry["layers"], "biases": entry["biases"]}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "modeling_fair_pruner.py").unlink()
    torch.testing.assert_close(logits(fp.from_pretrained(out)), logits(p), atol=1e-6, rtol=1e-6)


def test_layer_plot_draws_every_layer_and_kind(pruned, tmp_path):
    from fair_pruner.llm.plot import plot_layers
    m, _ = pruned
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False)
    plan = fp.allocate(book, params=0.3)
    drawn = plot_layers(book, plan, tmp_path / "layers.png")
    want = {(g.meta["layer"], g.meta["family"], plan.kept[g.name], g.size) for g in book.groups}
    assert set(drawn) == want and len(drawn) == len(book.groups)
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
