"""LLM pruning: tiny random Llama / Mistral / Qwen2 / Qwen3 models (no downloads)."""
import json
import os

import pytest
import torch

import fair_pruner as fp
from fair_pruner.errors import (BookMismatchError, CalibrationDataError, FairPrunerError,
                                UnsupportedModelError)

try:
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
except ImportError:  # pragma: no cover - the llm extra is not installed
    pytest.skip("transformers is not installed (pip install -e '.[llm]')", allow_module_level=True)

from fair_pruner import llm  # noqa: E402
from fair_pruner.llm.calibrate import _top_classes  # noqa: E402

VOCAB = 61


def tiny(arch: str = "llama", heads: int = 4, kv: int = 2, layers: int = 2, seed: int = 0):
    common = dict(hidden_size=8 * heads, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
                  vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
    cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "qwen3": tf.Qwen3Config}[arch](**common)
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # random init is tiny; make units differ so signals are informative
        for n, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.mul_(3.0)
    return m


def batches(n=4, b=2, t=24, seed=1, high=20):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, high, (b, t), generator=g)} for _ in range(n)]


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def score(model, heads="kv", **kw):
    kw.setdefault("classes", 8)
    kw.setdefault("samples_per_class", 8)
    kw.setdefault("projections", 16)
    return fp.score(model, batches(), heads=heads, progress=False, **kw)


def attn_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)


X = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------------
# Exactness and structure
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_pruned_equals_masked_original(arch):
    m = tiny(arch)
    book = score(m)
    assert book.meta["kind"] == "llm"
    plan = fp.allocate(book, params=0.3)
    # Force head removals too (ToD on 2 KV groups may keep both): one KV group per layer.
    for g in book.groups:
        if g.kind == "head":
            plan.removed[g.name] = [int(torch.argmin(g.u))]
    pruned = fp.prune(m, plan)
    ref = llm.mask(m, plan)
    out, want = logits(pruned, X), logits(ref, X)
    assert not torch.allclose(want, logits(m, X), atol=1e-4), "the plan removed nothing"
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    removed = torch.tensor([len(plan.removed[g.name]) for g in book.groups])
    params_after, _ = book.cost.evaluate(removed)
    assert attn_params(pruned) == int(params_after)
    assert attn_params(m) == book.totals()[0]
    assert type(pruned) is type(m)
    # The public fp.mask routes an LLM plan to the same reference.
    torch.testing.assert_close(logits(fp.mask(m, plan), X), want)


def test_param_target_is_exact_and_reported():
    m = tiny()
    book = score(m)
    plan = fp.allocate(book, params=0.25)
    pruned = fp.prune(m, plan)
    assert attn_params(pruned) == plan.params_after
    assert plan.params_reduction >= 0.25


def test_gqa_valid_after_head_pruning_and_generate_works():
    m = tiny(heads=6, kv=3)
    book = score(m)
    plan = fp.allocate(book, params=0.3)
    plan.removed["model.layers.0.self_attn"] = [0, 2]
    plan.removed["model.layers.1.self_attn"] = [1]
    pruned = fp.prune(m, plan)
    for i, layer in enumerate(pruned.model.layers):
        a = layer.self_attn
        nq, nkv = a.q_proj.out_features // 8, a.k_proj.out_features // 8
        assert nq % nkv == 0 and a.num_key_value_groups == nq // nkv == 2
        assert a.v_proj.out_features == a.k_proj.out_features
        assert a.o_proj.in_features == a.q_proj.out_features
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 8
    gen = pruned.generate(X[:1], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, X.shape[1] + 5)
    torch.testing.assert_close(logits(pruned, X), logits(llm.mask(m, plan), X), atol=2e-5,
                               rtol=1e-4)


def test_query_head_mode_prunes_same_count_in_every_kv_group():
    m = tiny(heads=6, kv=2)
    book = score(m, heads="query")
    attn = [g for g in book.groups if g.kind == "head"]
    assert all(g.size == 3 and g.name.endswith(".query_heads") for g in attn)
    plan = fp.allocate(book, params=0.2)
    plan.removed[attn[0].name] = [1]
    plan.removed[attn[1].name] = [0, 2]
    pruned = fp.prune(m, plan)
    a0, a1 = pruned.model.layers[0].self_attn, pruned.model.layers[1].self_attn
    assert (a0.q_proj.out_features // 8, a0.k_proj.out_features // 8) == (4, 2)
    assert (a1.q_proj.out_features // 8, a1.k_proj.out_features // 8) == (2, 2)
    assert a0.num_key_value_groups == 2 and a1.num_key_value_groups == 1
    torch.testing.assert_close(logits(pruned, X), logits(llm.mask(m, plan), X), atol=2e-5,
                               rtol=1e-4)
    removed = torch.tensor([len(plan.removed[g.name]) for g in book.groups])
    assert attn_params(pruned) == int(book.cost.evaluate(removed)[0])


def test_round_to_applies_to_mlp_widths_only():
    m = tiny()
    book = score(m)
    plan = fp.allocate(book, params=0.3, round_to=8)
    for g in book.groups:
        if g.kind == "neuron":
            assert plan.kept[g.name] % 8 == 0
    fp.prune(m, plan)


def test_alternative_signals_and_uniform_allocation():
    m = tiny()
    book = score(m)
    assert {"u", "r", "activation", "fluctuation", "l1", "l2", "random"} <= set(book.signal_names)
    for sig in ("activation", "fluctuation", "l2"):
        p = fp.allocate(book, params=0.2, signal=sig)
        assert p.params_reduction >= 0.2
    uni = fp.allocate(book, params=0.2, strategy="uniform", signal="l2")
    mlp = [g.name for g in book.groups if g.kind == "neuron"]
    assert len({uni.kept[n] for n in mlp}) == 1
    fp.prune(m, uni)


def test_custom_signal_plugs_in():
    m = tiny()

    @fp.signal("neg_r", reduce="sum")
    def neg_r(stats):
        return -stats.taylor.abs()

    book = fp.score(m, batches(), classes=8, samples_per_class=8, progress=False,
                    signals=[neg_r])
    for g in book.groups:
        torch.testing.assert_close(g.signals["neg_r"].abs(), g.signals["r"])


# --------------------------------------------------------------------------------------------
# Scores against independent oracles
# --------------------------------------------------------------------------------------------

def test_r_score_matches_scaling_gradient():
    """R_j = |sum z_j dL/dz_j| equals |dL/ds_j| for z -> z * s at s = 1."""
    m = tiny()
    data = batches(n=2)
    book = fp.score(m, data, classes=8, samples_per_class=4, progress=False)
    mlp = m.model.layers[1].mlp
    s = torch.ones(mlp.down_proj.in_features, requires_grad=True)
    h = mlp.down_proj.register_forward_pre_hook(lambda mod, a: (a[0] * s,))
    try:
        total = 0
        for b in data:
            ids = b["input_ids"]
            lg = m(input_ids=ids, use_cache=False).logits
            total = total + torch.nn.functional.cross_entropy(
                lg[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
        (gs,) = torch.autograd.grad(total, [s])
    finally:
        h.remove()
    r = book.group("model.layers.1.mlp").signals["r"]
    torch.testing.assert_close(r, gs.abs().double(), rtol=1e-3, atol=1e-6)


def test_u_score_matches_exact_w1_when_reservoir_holds_every_sample():
    from scipy.stats import wasserstein_distance

    m = tiny(layers=1)
    # Next tokens: 4 classes, each exactly 6 times per ... build sequences by construction.
    g = torch.Generator().manual_seed(3)
    seqs = []
    for _ in range(3):
        body = torch.tensor([1, 2, 3, 4] * 4)[torch.randperm(16, generator=g)]
        seqs.append(torch.cat([torch.tensor([10 + len(seqs)]), body]))
    ids = torch.stack(seqs)            # next tokens: 12 of each of 1..4, plus a few others
    data = [{"input_ids": ids}]
    book = fp.score(m, data, classes=4, samples_per_class=12, progress=False)
    assert book.meta["classes"] == [1, 2, 3, 4]
    acts = []
    hk = m.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda mod, a: acts.append(a[0].detach()))
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    hk.remove()
    z = acts[0][:, :-1].reshape(-1, acts[0].shape[-1])
    y = ids[:, 1:].reshape(-1)
    want = torch.zeros(z.shape[1], dtype=torch.float64)
    for a in range(1, 5):
        for b in range(a + 1, 5):
            for j in range(z.shape[1]):
                w = wasserstein_distance(z[y == a, j].numpy(), z[y == b, j].numpy())
                want[j] = max(want[j], w)
    torch.testing.assert_close(book.group("model.layers.0.mlp").u, want, rtol=1e-4, atol=1e-6)


def test_top_classes_are_most_frequent_next_tokens():
    data = [{"input_ids": torch.tensor([[0, 5, 5, 5, 7, 7, 9]])}]
    cls, n, nb = _top_classes(data, 2)
    assert cls == [5, 7] and n == 6 and nb == 1


# --------------------------------------------------------------------------------------------
# Hygiene: caller's model untouched, determinism, book persistence
# --------------------------------------------------------------------------------------------

def test_callers_model_untouched():
    m = tiny()
    m.model.layers[0].mlp.train()                  # a mixed train/eval state
    m.model.embed_tokens.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    hooks = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())
    book = score(m)
    plan = fp.allocate(book, params=0.3)
    fp.prune(m, plan)
    llm.mask(m, plan)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert flags == {n: p.requires_grad for n, p in m.named_parameters()}
    assert modes == {n: mod.training for n, mod in m.named_modules()}
    assert hooks == sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks)
                        for mod in m.modules())
    assert all(p.grad is None for p in m.parameters())
    assert not hasattr(m.config, "fair_pruner")


def test_inplace_prune_changes_the_model():
    m = tiny()
    plan = fp.allocate(score(m), params=0.3)
    out = fp.prune(m, plan, inplace=True)
    assert out is m and attn_params(m) == plan.params_after


def test_deterministic_given_seed_and_book_roundtrip(tmp_path):
    m = tiny()
    a, b = score(m, seed=3), score(m, seed=3)
    for ga, gb in zip(a.groups, b.groups):
        for k in ga.signals:
            assert torch.equal(ga.signals[k], gb.signals[k]), (ga.name, k)
    a.save(tmp_path / "book.safetensors")
    c = fp.ScoreBook.load(tmp_path / "book.safetensors")
    pa, pc = fp.allocate(a, params=0.3), fp.allocate(c, params=0.3)
    assert pa.removed == pc.removed and pa.params_after == pc.params_after
    pruned = fp.prune(m, pc)
    assert attn_params(pruned) == pc.params_after


# --------------------------------------------------------------------------------------------
# Save / reload
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tied,dtype", [("llama", True, torch.float32),
                                             ("qwen3", False, torch.float32),
                                             ("qwen2", False, torch.bfloat16)])
def test_save_reload_roundtrip(tmp_path, arch, tied, dtype):
    m = tiny(arch).to(dtype)
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    src = tmp_path / "src"
    m.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    m = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    book = score(m)
    plan = fp.allocate(book, params=0.3)
    plan.removed[book.groups[0].name] = [0]
    pruned = fp.prune(m, plan)
    out = tmp_path / "out"
    fp.save_pretrained(pruned, out)
    assert (out / "tokenizer_config.json").exists()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["fair_pruner"]["layers"]) == 2
    assert cfg["fair_pruner"]["layers"][0]["attention"]["num_key_value_heads"] == 1
    re = fp.from_pretrained(out)
    assert type(re) is type(m) and re.dtype == dtype
    torch.testing.assert_close(logits(re, X), logits(pruned, X), atol=1e-6, rtol=1e-6)
    g1 = pruned.generate(X[:1], max_new_tokens=4, do_sample=False)
    g2 = re.generate(X[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(g1, g2)
    assert re._fair_pruner_plan.removed == plan.removed
    if tied:
        assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()
    # A reloaded pruned model can be scored and pruned again (per-layer widths are read off).
    book2 = score(re)
    assert book2.group("model.layers.0.mlp").size == re.model.layers[0].mlp.down_proj.in_features


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------

def test_error_no_labels_possible():
    m = tiny()
    with pytest.raises(CalibrationDataError, match="no labels possible"):
        fp.score(m, [{"input_ids": torch.randn(2, 8)}], progress=False)
    masked = [{"input_ids": torch.randint(0, 9, (2, 8)), "attention_mask": torch.zeros(2, 8)}]
    with pytest.raises(CalibrationDataError, match="no labels possible"):
        fp.score(m, masked, progress=False)


def test_error_sequence_shorter_than_two():
    with pytest.raises(CalibrationDataError, match="at least 2"):
        fp.score(tiny(), [{"input_ids": torch.randint(0, 9, (4, 1))}], progress=False)


def test_error_unknown_layout_names_the_module():
    m = tiny()      # an attention block holding a module fair_pruner does not know
    m.model.layers[0].self_attn.extra = torch.nn.Linear(32, 32)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.extra"):
        fp.score(m, batches(), progress=False)


def test_error_plan_removing_every_head():
    m = tiny()
    plan = fp.allocate(score(m), params=0.2)
    plan.removed["model.layers.1.self_attn"] = [0, 1]
    with pytest.raises(FairPrunerError, match="every unit of model.layers.1.self_attn"):
        fp.prune(m, plan)
    assert m.model.layers[1].self_attn.k_proj.out_features == 16   # nothing was changed


def test_error_plan_from_another_model():
    plan = fp.allocate(score(tiny()), params=0.2)
    with pytest.raises(BookMismatchError):
        fp.prune(tiny(heads=6, kv=3), plan)


def test_error_bad_heads_option():
    with pytest.raises(FairPrunerError, match="heads="):
        score(tiny(), heads="all")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--reconstruct", "none"], ["--reconstruct", "bias"],
                                   ["--strategy", "global", "--signal", "wanda"]])
def test_cli_prune_lm_end_to_end(tmp_path, capsys, extra):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "a", "of", "and", "to", "in", "she", "he", "was", "her", "not", "be"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    src = tmp_path / "model"
    tiny().save_pretrained(src)
    tok.save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=g).tolist())
    (tmp_path / "calib.txt").write_text(text)
    from fair_pruner.cli import main
    out, png = tmp_path / "out", tmp_path / "plan.png"
    rc = main(["prune-lm", str(src), "--calib-text", str(tmp_path / "calib.txt"), "--params",
               "0.2", "--out", str(out), "--seq-len", "32", "--num-seqs", "8", "--plot",
               str(png)] + extra)
    assert rc == 0
    shown = capsys.readouterr().out
    assert "attention kept" in shown and "-2" in shown
    want = extra[1] if extra[:1] == ["--reconstruct"] else "affine"
    assert f"reconstruction: {want}" in shown
    assert png.exists() and (out / "score_book.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    re = fp.from_pretrained(out)
    assert attn_params(re) < attn_params(tiny())
    rc = main(["prune-lm", str(src), "--calib-text", str(tmp_path / "missing.txt"), "--params",
               "0.2", "--out", str(out), "-q"])
    assert rc == 2


def test_attention_mask_and_labels_select_the_labelled_positions():
    m = tiny()
    ids = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 10, dtype=torch.long)
    am[0, 7:] = 0                                   # right padding: 3 pad tokens in row 0
    labels = ids.clone()
    labels[1, :4] = -100                            # HF convention: ignore the first 4 of row 1
    book = fp.score(m, [{"input_ids": ids, "attention_mask": am, "labels": labels}],
                    classes=4, samples_per_class=2, progress=False)
    # row 0: positions 0..5 predict 1..6 (6 labels); row 1: targets 4..9 (6 labels).
    assert book.meta["calibration_tokens"] == 12
    assert book.meta["calibration_sequences"] == 2


def test_roles_and_restrict_keep_the_other_family_whole():
    m = tiny()
    book = score(m)
    mlp_only = llm.restrict(book, m, roles=("ffn",))
    assert [g.kind for g in mlp_only.groups] == ["neuron", "neuron"]
    assert mlp_only.totals() == book.totals()          # attention still counts in the totals
    plan = fp.allocate(mlp_only, params=0.2)
    pruned = fp.prune(m, plan)
    assert attn_params(pruned) == plan.params_after and plan.params_reduction >= 0.2
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 16
    direct = fp.score(m, batches(), classes=8, samples_per_class=8, projections=16,
                      progress=False, roles=("ffn",))
    for g in direct.groups:
        torch.testing.assert_close(g.signals["r"], mlp_only.group(g.name).signals["r"])
    assert fp.allocate(direct, params=0.2).removed == plan.removed
    with pytest.raises(CalibrationDataError, match="roles="):
        llm.restrict(book, m, roles=("experts",))


def test_targets_cut_heads_only_when_the_mlp_cannot_reach_them():
    m = tiny()
    book = score(m)
    heads = [g.name for g in book.groups if g.kind == "head"]
    assert all(book.group(h).tier == 1 for h in heads)
    plan = fp.allocate(book, params=0.3)                      # the MLP neurons suffice
    assert plan.meta["tiers_opened"] == 0 and plan.params_reduction >= 0.3
    assert all(not plan.removed[h] for h in heads)
    deep = fp.allocate(book, params=0.62)                     # MLP is ~60% of the parameters
    assert deep.meta["tiers_opened"] == 1 and deep.params_reduction >= 0.62
    assert any(deep.removed[h] for h in heads)
    flat = fp.allocate(book, params=0.3, tiers=False)         # one alpha over every group
    assert flat.meta["tiers_opened"] == 1                     # the single level: every tier
    assert flat.params_reduction >= 0.3
    torch.testing.assert_close(logits(fp.prune(m, deep), X), logits(llm.mask(m, deep), X),
                               atol=2e-5, rtol=1e-4)
    again = fp.ScoreBook.load(_saved(book))                   # the tier survives save/load
    assert [g.tier for g in again.groups] == [g.tier for g in book.groups]


def _saved(book):
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "book.safetensors")
    book.save(path)
    return path


def test_book_written_before_tiers_loads_with_heads_as_tier_one(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    book = score(tiny())
    path = str(tmp_path / "book.safetensors")
    book.save(path)
    with safe_open(path, framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    groups = json.loads(header["groups"])
    for g in groups:
        g.pop("tier")                                     # as an earlier release wrote it
    header["groups"] = json.dumps(groups)
    save_file(tensors, path, metadata=header)
    again = fp.ScoreBook.load(path)
    assert [g.tier for g in again.groups] == [1 if g.kind == "head" else 0 for g in book.groups]


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_activation_checkpointing_gives_the_same_book(model_type):
    """checkpointing=True recomputes each decoder layer in the backward; the taps record in the
    first forward only, so the book is the one without it (and the model is restored)."""
    from helpers import tiny_lm, token_batches
    m = tiny_lm(model_type)
    kw = dict(classes=8, samples_per_class=8, projections=16, progress=False,
              reconstruction=True)
    import fair_pruner.engine as engine
    stores = []
    real_store = engine.store_samples

    def store(*a, **k):                    # U samples are stored in the first forward only
        stores.append(1)
        return real_store(*a, **k)
    engine.store_samples = store
    calls = []
    from torch.utils import checkpoint as ckpt
    real = ckpt.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    try:
        want = fp.score(m, token_batches(), **kw)
        n_plain = len(stores)
        ckpt.checkpoint = counting
        got = fp.score(m, token_batches(), checkpointing=True, **kw)
    finally:
        ckpt.checkpoint = real
        engine.store_samples = real_store
    assert len(calls) == len(m.model.layers) * len(token_batches())   # every layer, every batch
    assert len(stores) == 2 * n_plain > 0
    assert all("forward" not in layer.__dict__ for layer in m.model.layers)
    for a, b in zip(got.groups, want.groups):
        torch.testing.assert_close(a.u, b.u, rtol=0, atol=0)
        for s in b.signals:
            torch.testing.assert_close(a.signals[s], b.signals[s], rtol=1e-5, atol=1e-8)
        for k in b.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-6)
    assert fp.allocate(got, params=0.3).removed == fp.allocate(want, params=0.3).removed


def test_token_rows_of_a_family_that_flattens_tokens():
    """OPT's MLP runs on [B * T, d]: its sample rows are the same tokens as from [B, T, d]
    (one per position with a next token), not the flat rows cut at the last feature."""
    from fair_pruner.llm.calibrate import _Tap
    tap = _Tap.__new__(_Tap)
    tap.name = "model.layers.0.mlp.down_proj"
    B, T, F_ = 3, 5, 7
    z = torch.randn(B, T, F_)
    want = z[:, :-1].reshape(-1, F_)
    torch.testing.assert_close(tap.sample_rows(z, B * (T - 1)), want)
    torch.testing.assert_close(tap.sample_rows(z.reshape(B * T, F_), B * (T - 1)), want)
    with pytest.raises(fp.UnsupportedModelError, match="token rows"):
        tap.sample_rows(z.reshape(B * T, F_), B * T)
