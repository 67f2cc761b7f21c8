"""GGUF export for llama.cpp (fair_pruner.llm.gguf_export.save_gguf).

The file is read back with gguf's own reader and checked against the pruned model: per-layer
widths, every tensor (Q/K permutation undone here), biases, tied embeddings, the dtypes; and a
small pure-torch forward that reads *only* the GGUF keys and tensors with llama.cpp's ``deci``
semantics (interleaved-pair RoPE on the permuted Q/K, per-layer heads, GQA, RMSNorm, SwiGLU,
biases) must give the pruned model's logits. That proves the layout without llama.cpp itself
(benchmarks/llamacpp_check.py runs the real llama.cpp on SmolLM2).
"""
import json
import math
import os
import stat
import warnings

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

import fair_pruner as fp  # noqa: E402
from fair_pruner.errors import FairPrunerError  # noqa: E402
from fair_pruner.llm import layer_widths  # noqa: E402
from fair_pruner.llm.gguf_export import save_gguf  # noqa: E402

from helpers import LM_VOCAB, tiny_lm, token_batches  # noqa: E402

X = torch.randint(0, LM_VOCAB, (1, 13), generator=torch.Generator().manual_seed(7))
Q = gguf.GGMLQuantizationType


def _tok_gguf(path, n=LM_VOCAB):
    """A small GGUF holding only tokenizer keys (the ``source_gguf`` of the tests)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(n)])
    w.add_token_types([1] * n)
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tok_src(tmp_path_factory):
    return _tok_gguf(tmp_path_factory.mktemp("tok") / "tok.gguf")


def _pruned(model_type="llama", **over):
    """A tiny model pruned with the default reconstruction, so that the layers differ in MLP
    width *and* head counts, and o_proj / down_proj gained biases."""
    m = tiny_lm(model_type, **over)
    book = fp.score(m, token_batches(), progress=False)
    plan = fp.allocate(book, params=0.3)
    heads = [g for g in book.groups if g.kind == "head"]
    plan.removed[heads[0].name] = [int(torch.argmin(heads[0].u))]   # layer 0 loses a KV group
    plan.removed[heads[1].name] = []
    return m, fp.prune(m, plan, book=book)


@pytest.fixture(scope="module")
def pruned():
    return _pruned()[1]


# --------------------------------------------------------------------------------------------
# Reading a GGUF back (nothing from the model: keys and tensors only)
# --------------------------------------------------------------------------------------------

def _read(path):
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items()}
    ts, types = {}, {}
    for t in r.tensors:
        shape = tuple(reversed([int(s) for s in t.shape]))      # numpy order [rows, cols]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        ts[t.name] = torch.from_numpy(data.copy()).reshape(shape).double()
        types[t.name] = t.tensor_type
    return kv, ts, types


def _unpermute(w, n_head):
    """Inverse of the export's HF -> llama.cpp Q/K row permutation."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_interleaved(x, pos, base, n_rot, freq_factors=None, freq_scale=1.0):
    """llama.cpp's "normal" RoPE: rotates consecutive pairs (2i, 2i + 1) by pos * base^(-2i/n)
    (divided by rope_freqs[i] when present). x: [T, heads, hd]."""
    i = torch.arange(n_rot // 2, dtype=torch.float64)
    theta = base ** (-2 * i / n_rot)
    if freq_factors is not None:
        theta = theta / freq_factors
    ang = (pos.double()[:, None] * freq_scale) * theta[None]          # [T, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def deci_forward(path, ids):
    """Logits [T, vocab] of a deci GGUF on token ids [T], float64, deci.cpp's graph."""
    kv, ts, _ = _read(path)
    assert kv["general.architecture"] == "deci"
    a = "deci"
    n_layer = kv[f"{a}.block_count"]
    heads, kvh, ffn = (kv[f"{a}.{k}"] for k in ("attention.head_count",
                                                  "attention.head_count_kv",
                                                  "feed_forward_length"))
    hd = kv[f"{a}.attention.key_length"]
    assert kv[f"{a}.attention.value_length"] == hd == kv[f"{a}.rope.dimension_count"]
    eps = kv[f"{a}.attention.layer_norm_rms_epsilon"]
    base = kv.get(f"{a}.rope.freq_base", 10000.0)
    scale = 1.0
    if kv.get(f"{a}.rope.scaling.type") == "linear":
        scale = 1.0 / kv[f"{a}.rope.scaling.factor"]
    factors = ts.get("rope_freqs.weight")
    T = ids.numel()
    pos = torch.arange(T)
    x = ts["token_embd.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for il in range(n_layer):
        p = f"blk.{il}."
        b = lambda n: ts.get(p + n + ".bias")  # noqa: E731
        lin = lambda h, n: h @ ts[p + n + ".weight"].T + (0 if b(n) is None else b(n))  # noqa
        nh, nkv, nff = heads[il], kvh[il], ffn[il]
        h = _rms(x, ts[p + "attn_norm.weight"], eps)
        q = lin(h, "attn_q").reshape(T, nh, hd)
        k = lin(h, "attn_k").reshape(T, nkv, hd)
        v = lin(h, "attn_v").reshape(T, nkv, hd)
        q = _rope_interleaved(q, pos, base, hd, factors, scale)
        k = _rope_interleaved(k, pos, base, hd, factors, scale)
        rep = nh // nkv                     # ggml broadcast: query head j reads KV head j // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, nh * hd)
        x = x + lin(o, "attn_output")
        h = _rms(x, ts[p + "ffn_norm.weight"], eps)
        g = torch.nn.functional.silu(lin(h, "ffn_gate")) * lin(h, "ffn_up")
        assert g.shape[-1] == nff
        x = x + lin(g, "ffn_down")
    x = _rms(x, ts["output_norm.weight"], eps)
    out = ts.get("output.weight", ts["token_embd.weight"])
    return x @ out.T


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0].double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# Layout, widths, tensors
# --------------------------------------------------------------------------------------------

def test_per_layer_widths_tensors_and_biases(pruned, tok_src, tmp_path):
    widths = layer_widths(pruned)
    assert len({w["ffn"]["intermediate_size"] for w in widths}) == 2, "layers should differ"
    assert [w["attention"]["num_key_value_heads"] for w in widths] == [1, 2]
    biases = pruned.config.fair_pruner["biases"]
    assert "model.layers.0.self_attn.o_proj" in biases
    assert any(b.endswith("mlp.down_proj") for b in biases)
    path = save_gguf(pruned, tmp_path / "m.gguf", dtype="f32", source_gguf=tok_src,
                     progress=False)
    kv, ts, types = _read(path)
    assert kv["deci.attention.head_count"] == [w["attention"]["num_attention_heads"]
                                               for w in widths]
    assert kv["deci.attention.head_count_kv"] == [w["attention"]["num_key_value_heads"]
                                                  for w in widths]
    assert kv["deci.feed_forward_length"] == [w["ffn"]["intermediate_size"] for w in widths]
    assert kv["deci.block_count"] == 2 and kv["deci.embedding_length"] == 32
    assert kv["deci.context_length"] == 64 and kv["deci.vocab_size"] == LM_VOCAB
    assert kv["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    # Every tensor equals the model's (Q/K un-permuted with that layer's head counts).
    sd = pruned.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    hf_of = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i, w in enumerate(widths):
        for g, h in hf_of.items():
            for kind in ("weight", "bias"):
                if f"model.layers.{i}.{h}.{kind}" in sd:
                    names[f"blk.{i}.{g}.{kind}"] = f"model.layers.{i}.{h}.{kind}"
    assert set(ts) == set(names), set(ts) ^ set(names)
    assert "blk.0.attn_output.bias" in ts and "blk.0.ffn_down.bias" in ts
    for g, h in names.items():
        t = ts[g]
        i = int(g.split(".")[1]) if g.startswith("blk.") else None
        if g.startswith(f"blk.{i}.attn_q"):
            t = _unpermute(t, widths[i]["attention"]["num_attention_heads"])
        elif g.startswith(f"blk.{i}.attn_k"):
            t = _unpermute(t, widths[i]["attention"]["num_key_value_heads"])
        assert torch.equal(t, sd[h].double()), g
        assert types[g] == Q.F32
    # The permutation is not the identity (else the check above proves nothing about it).
    assert not torch.equal(ts["blk.1.attn_q.weight"], sd["model.layers.1.self_attn.q_proj.weight"]
                           .double())


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_reference_forward_matches_the_pruned_model(model_type, tok_src, tmp_path):
    m, p = _pruned(model_type)
    path = save_gguf(p, tmp_path / "m.gguf", dtype="f32", source_gguf=tok_src, progress=False)
    got = deci_forward(path, X[0])
    want = _logits(p.double(), X)
    assert _rel(got, want) < 1e-5
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # ... and the dense original's export too (no added biases)
    path = save_gguf(m, tmp_path / "d.gguf", dtype="f32", source_gguf=tok_src, progress=False)
    assert _rel(deci_forward(path, X[0]), _logits(m.double(), X)) < 1e-5
    if model_type == "qwen2":          # q/k/v biases present (Q and K biases permuted)
        _, ts, _ = _read(path)
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(ts)


def test_reference_forward_fails_without_the_permutation(pruned, tok_src, tmp_path,
                                                         monkeypatch):
    """The forward check can fail: exporting Q/K in transformers' order gives other logits."""
    from fair_pruner.llm import gguf_export
    monkeypatch.setattr(gguf_export, "_permute", lambda w, n: w)
    path = save_gguf(pruned, tmp_path / "m.gguf", dtype="f32", source_gguf=tok_src,
                     progress=False)
    assert _rel(deci_forward(path, X[0]), _logits(pruned.double(), X)) > 1e-3


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "rope_theta": 500.0,
                                           "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_and_query_head_pruning(rope, tok_src, tmp_path):
    m = tiny_lm("llama", rope_parameters=rope, num_attention_heads=4, num_key_value_heads=2)
    book = fp.score(m, token_batches(), heads="query", progress=False)
    plan = fp.allocate(book, params=0.3)
    g = next(g for g in book.groups if g.kind == "head")
    plan.removed[g.name] = [0]                     # layer 0: 2 of 4 query heads, 2 KV heads
    p = fp.prune(m, plan, book=book)
    assert [w["attention"]["num_attention_heads"] for w in layer_widths(p)] == [2, 4]
    path = save_gguf(p, tmp_path / "m.gguf", dtype="f32", source_gguf=tok_src, progress=False)
    kv, ts, _ = _read(path)
    assert kv["deci.attention.head_count"] == [2, 4]
    assert kv["deci.attention.head_count_kv"] == [2, 2]
    assert kv["deci.rope.freq_base"] == rope["rope_theta"]
    if rope["rope_type"] == "llama3":
        f = ts["rope_freqs.weight"]
        assert f.shape == (4,) and not torch.allclose(f, torch.ones(4, dtype=f.dtype))
    else:
        assert kv["deci.rope.scaling.type"] == "linear"
        assert kv["deci.rope.scaling.factor"] == 4.0 and "rope_freqs.weight" not in ts
    assert _rel(deci_forward(path, X[0]), _logits(p.double(), X)) < 1e-5


def test_tied_embeddings_write_no_output_tensor(tok_src, tmp_path):
    m = tiny_lm("llama")
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight
    path = save_gguf(m, tmp_path / "t.gguf", dtype="f32", source_gguf=tok_src, progress=False)
    _, ts, _ = _read(path)
    assert "output.weight" not in ts
    assert _rel(deci_forward(path, X[0]), _logits(m.double(), X)) < 1e-5
    # untied: the LM head is written as output.weight
    u = tiny_lm("llama")
    _, ts, _ = _read(save_gguf(u, tmp_path / "u.gguf", dtype="f32", source_gguf=tok_src,
                               progress=False))
    assert torch.equal(ts["output.weight"], u.lm_head.weight.detach().double())


@pytest.mark.parametrize("dtype,qtype,bound", [("f16", Q.F16, 5e-4), ("bf16", Q.BF16, 4e-3),
                                               ("q8_0", Q.Q8_0, 1.2e-2)])
def test_dtypes_dequantize_close_to_f32(pruned, tok_src, tmp_path, dtype, qtype, bound):
    _, ref, _ = _read(save_gguf(pruned, tmp_path / "f.gguf", dtype="f32", source_gguf=tok_src,
                                progress=False))
    path = save_gguf(pruned, tmp_path / f"{dtype}.gguf", dtype=dtype, source_gguf=tok_src,
                     progress=False)
    kv, ts, types = _read(path)
    assert set(ts) == set(ref)
    assert kv["general.file_type"] == int({"f16": gguf.LlamaFileType.MOSTLY_F16,
                                           "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                                           "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    for name, t in ts.items():
        if t.dim() == 1 or name.endswith("_norm.weight"):
            assert types[name] == Q.F32 and torch.equal(t, ref[name]), name
            continue
        want = qtype if dtype != "q8_0" or t.shape[-1] % 32 == 0 else Q.F16
        assert types[name] == want, name
        err = _rel(t, ref[name])
        assert 0 < err < bound, (name, err)       # rounded, but the same layout
    # q8_0: rows of 32 quantize, pruned down_proj rows (25, 23 neurons) fall back to f16
    if dtype == "q8_0":
        assert types["blk.0.attn_q.weight"] == Q.Q8_0
        assert types["blk.0.ffn_down.weight"] == Q.F16
    got = deci_forward(path, X[0])
    want = _logits(pruned.double(), X)
    assert _rel(got, want) < 10 * bound


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def test_tokenizer_keys_copied_from_source_gguf(pruned, tok_src, tmp_path):
    path = save_gguf(pruned, tmp_path / "m.gguf", dtype="f16", source_gguf=tok_src,
                     progress=False)
    src, out = gguf.GGUFReader(tok_src), gguf.GGUFReader(path)
    keys = [k for k in src.fields if k.startswith("tokenizer.")]
    assert len(keys) >= 8
    for k in keys:
        assert out.fields[k].contents() == src.fields[k].contents(), k
        assert out.fields[k].types == src.fields[k].types, k


def _bpe_tokenizer(tmp_path, vocab_size):
    """A small byte-level BPE tokenizer (GPT-2 style), trained here."""
    tokenizers = pytest.importorskip("tokenizers")
    from fair_pruner.llm import transformers_module
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 4, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the cat sat on the mat", "a dog and the cat"] * 20, trainer)
    tf = transformers_module()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                      eos_token="<|endoftext|>")


def test_tokenizer_built_from_a_transformers_bpe_tokenizer(tmp_path):
    n = 300
    m = tiny_lm("llama", vocab_size=n)
    tok = _bpe_tokenizer(tmp_path, n)
    assert len(tok) < n                                # padded up to the embedding rows
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        path = save_gguf(m, tmp_path / "m.gguf", tokenizer=tok, dtype="f32", progress=False)
    assert any("pre-tokenizer not recognised" in str(w.message) for w in rec)
    r = gguf.GGUFReader(path)
    f = {k: r.fields[k].contents() for k in r.fields if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "default"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n
    vocab = tok.get_vocab()
    for t, i in vocab.items():
        assert tokens[i] == t
    assert types[vocab["<|endoftext|>"]] == int(gguf.TokenType.CONTROL)
    assert types[vocab["Ġthe"]] == int(gguf.TokenType.NORMAL)
    assert tokens[n - 1] == f"[PAD{n - 1}]" and types[n - 1] == int(gguf.TokenType.UNUSED)
    want = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    want = [" ".join(x) if isinstance(x, list) else x for x in want]
    assert f["tokenizer.ggml.merges"] == want
    assert f["tokenizer.ggml.bos_token_id"] == vocab["<|im_start|>"]
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]


def test_known_pre_tokenizer_hash_is_recognised():
    from fair_pruner.llm.gguf_export import CHKTXT, PRE_TOKENIZERS, pre_tokenizer
    import hashlib

    class Fixed:            # a tokenizer whose ids hash to SmolLM2's entry of the table
        def __init__(self, ids):
            self.ids = ids

        def encode(self, text):
            assert text == CHKTXT
            return self.ids
    ids = [1, 2, 3]
    h = hashlib.sha256(str(ids).encode()).hexdigest()
    PRE_TOKENIZERS[h] = "smollm"
    try:
        assert pre_tokenizer(Fixed(ids)) == "smollm"
    finally:
        del PRE_TOKENIZERS[h]
    assert PRE_TOKENIZERS["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] \
        == "smollm"


def test_no_tokenizer_is_refused_before_writing(tmp_path):
    m = tiny_lm("llama")
    out = tmp_path / "m.gguf"
    with pytest.raises(FairPrunerError, match="tokenizer= .*source_gguf="):
        save_gguf(m, out, progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FairPrunerError, match="lists 10 tokens but the model embeds 61"):
        save_gguf(m, out, source_gguf=_tok_gguf(tmp_path / "small.gguf", n=10), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["small.gguf"]


# --------------------------------------------------------------------------------------------
# Refusals, file handling
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "qwen3", "mixtral"])
def test_unsupported_model_types_are_refused_before_writing(model_type, tok_src, tmp_path):
    m = tiny_lm(model_type)
    with pytest.raises(FairPrunerError, match=rf"{model_type}.*Llama-style"):
        save_gguf(m, tmp_path / "x.gguf", source_gguf=tok_src, progress=False)
    assert os.listdir(tmp_path) == []


def test_check_gguf_refuses_like_save_gguf_without_writing(tok_src, tmp_path):
    from fair_pruner.llm.gguf_export import check_gguf
    with pytest.raises(FairPrunerError, match="'gpt2'.*Llama-style"):
        check_gguf(tiny_lm("gpt2"), source_gguf=tok_src)
    with pytest.raises(FairPrunerError, match="no tokenizer"):
        check_gguf(tiny_lm("llama"))
    check_gguf(tiny_lm("llama"), source_gguf=tok_src, dtype="q8_0")      # fine: no error
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(pruned, tok_src, tmp_path,
                                                              monkeypatch):
    from fair_pruner.llm import gguf_export
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    calls = []
    real = gguf_export._encode

    def encode(*a):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*a)
    monkeypatch.setattr(gguf_export, "_encode", encode)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(pruned, out, source_gguf=tok_src, progress=False)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.gguf"]


def test_bad_dtype_and_activation_are_refused(tok_src, tmp_path):
    m = tiny_lm("llama")
    with pytest.raises(FairPrunerError, match="dtype must be one of"):
        save_gguf(m, tmp_path / "x.gguf", dtype="q4_0", source_gguf=tok_src)
    g = tiny_lm("llama", hidden_act="gelu")
    with pytest.raises(FairPrunerError, match="SwiGLU"):
        save_gguf(g, tmp_path / "x.gguf", source_gguf=tok_src)
    assert os.listdir(tmp_path) == []


def test_file_mode_and_atomic_replace(pruned, tok_src, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "sub" / "m.gguf"
        out.parent.mkdir()
        out.write_bytes(b"old")
        save_gguf(pruned, out, dtype="f16", source_gguf=tok_src, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644       # 0o666 & ~umask, not mkstemp's
    assert out.read_bytes()[:4] == b"GGUF"
    assert os.listdir(out.parent) == ["m.gguf"]              # no temp file left behind


def test_public_names():
    import fair_pruner.llm as llm
    assert "save_gguf" in llm.__all__ and llm.save_gguf is save_gguf
    assert callable(fp.save_gguf)


def test_cli_prune_lm_writes_a_gguf(tmp_path):
    """``fair-pruner prune-lm --gguf FILE --gguf-dtype q8_0``: the GGUF has the saved pruned
    directory's widths and the transformers tokenizer."""
    from fair_pruner.cli import main
    n = 300
    m = tiny_lm("llama", vocab_size=n)
    tok = _bpe_tokenizer(tmp_path, n)
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "and"]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (800,), generator=g).tolist()
    (tmp_path / "calib.txt").write_text(" ".join(words[i] for i in idx))
    out, gg = tmp_path / "out", tmp_path / "m.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["prune-lm", str(tmp_path / "model"), "--calib-text",
                     str(tmp_path / "calib.txt"), "--out", str(out), "--seq-len", "32",
                     "--num-seqs", "8", "--params", "0.3", "--gguf", str(gg),
                     "--gguf-dtype", "q8_0", "-q"]) == 0
    saved = json.loads((out / "config.json").read_text())["fair_pruner"]["layers"]
    kv, ts, types = _read(gg)
    assert kv["deci.feed_forward_length"] == [w["ffn"]["intermediate_size"] for w in saved]
    assert kv["deci.attention.head_count"] == [w["attention"]["num_attention_heads"]
                                               for w in saved]
    assert kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert types["blk.0.attn_q.weight"] == Q.Q8_0
    assert kv["tokenizer.ggml.tokens"][tok.get_vocab()["Ġcat"]] == "Ġcat"
    loaded = fp.from_pretrained(out)
    want = _logits(loaded.double(), X)
    assert _rel(deci_forward(gg, X[0]), want) < 0.08          # q8_0 rounding only
