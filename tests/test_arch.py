"""Every decoder-only family: the full pipeline, or a refusal before scoring (tiny random models).

Full pipeline: score -> allocate -> prune -> pruned == masked (and the plan's parameter count ==
the pruned model's) -> save -> reload -> logits equal -> generate.
"""
import pytest
import torch

import fair_pruner as fp
from fair_pruner.errors import UnsupportedModelError

from helpers import LM_VOCAB, tiny_lm, token_batches

try:
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
except ImportError:  # pragma: no cover - the llm extra is not installed
    pytest.skip("transformers is not installed (pip install -e '.[llm]')", allow_module_level=True)

from fair_pruner.llm import ARCHITECTURES  # noqa: E402
from fair_pruner.llm.verify import checked_layout  # noqa: E402

X = torch.randint(0, LM_VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))

# (model_type, config overrides) -> the kinds of unit groups its book must have
PASS = {
    ("llama", ()): {"head", "neuron"}, ("mistral", ()): {"head", "neuron"},
    ("qwen2", ()): {"head", "neuron"}, ("qwen3", ()): {"head", "neuron"},
    ("gemma", ()): {"head", "neuron"}, ("gemma2", ()): {"head", "neuron"},
    ("granite", ()): {"head", "neuron"}, ("stablelm", ()): {"head", "neuron"},
    ("cohere", ()): {"head", "neuron"}, ("ernie4_5", ()): {"head", "neuron"},
    ("olmo", ()): {"head", "neuron"}, ("helium", ()): {"head", "neuron"},
    ("smollm3", ()): {"head", "neuron"}, ("arcee", ()): {"head", "neuron"},
    ("gpt2", ()): {"head", "neuron"}, ("gpt_neox", ()): {"head", "neuron"},
    ("gptj", ()): {"head", "neuron"}, ("phi", ()): {"head", "neuron"},
    ("phi3", ()): {"head", "neuron"}, ("opt", ()): {"head", "neuron"},
    ("starcoder2", ()): {"head", "neuron"}, ("nemotron", ()): {"head", "neuron"},
    ("glm", ()): {"head", "neuron"}, ("glm4", ()): {"head", "neuron"},
    ("falcon", ()): {"head", "neuron"},                                  # grouped qkv (GQA)
    ("falcon", (("new_decoder_architecture", False), ("multi_query", True))): {"head", "neuron"},
    ("falcon", (("new_decoder_architecture", False), ("multi_query", False),
                ("num_kv_heads", 4))): {"head", "neuron"},
    ("falcon", (("new_decoder_architecture", False), ("alibi", True))): {"neuron"},
    ("bloom", ()): {"neuron"}, ("mpt", ()): {"neuron"}, ("codegen", ()): {"neuron"},
    ("olmo2", ()): {"neuron"}, ("olmo3", ()): {"neuron"},
    ("mixtral", ()): {"head", "expert"}, ("qwen2_moe", ()): {"head", "expert"},
    ("qwen3_moe", ()): {"head", "expert"}, ("olmoe", ()): {"expert"},
    ("gpt_oss", ()): {"head", "expert"}, ("llama4_text", ()): {"head", "expert"},  # dense dispatch
    ("dbrx", ()): {"head", "expert"},                             # nested attention, flat experts
    ("jetmoe", ()): {"expert"},                                   # parallel experts; MoA frozen
    ("granitemoe", ()): {"head", "expert"}, ("gpt_neo", ()): {"head", "neuron"},
    ("deepseek_v2", ()): {"neuron", "expert"}, ("deepseek_v3", ()): {"neuron", "expert"},
    ("glm4_moe_lite", ()): {"neuron", "expert"},
}
REFUSED = {
    "bitnet": "sub_norm", "diffllama": "group norm",
    "ernie4_5_moe": "not pruned exactly",          # caught by the fallback self-check
    "jamba": "no attention child", "qwen3_next": "no attention child",   # hybrids
}


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def full_pipeline(m, tmp_path):
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False)
    plan = fp.allocate(book, tod=0.3)
    for g in book.groups:     # every group loses a unit (ToD on 2 KV groups may keep both)
        if not plan.removed[g.name] and g.size > g.min_keep:
            plan.removed[g.name] = [int(torch.argmin(g.u))]
    pruned, ref = fp.prune(m, plan), fp.mask(m, plan)
    out, want = logits(pruned), logits(ref)
    assert not torch.allclose(want, logits(m), atol=1e-4), "the plan removed nothing"
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-3)
    removed = torch.tensor([len(plan.removed[g.name]) for g in book.groups])
    grew = sum(p.numel() for p in pruned.parameters()) - sum(p.numel() for p in m.parameters())
    assert grew == int(book.cost.evaluate(removed)[0]) - book.totals()[0]
    assert type(pruned) is type(m)
    fp.save_pretrained(pruned, tmp_path / "out")
    again = fp.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(again), out, atol=1e-5, rtol=1e-5)
    gen = again.generate(X[:1], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, X.shape[1] + 3)
    # Stock transformers, through the modeling file the directory carries.
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert stock.config.model_type == "fair_pruned_" + m.config.model_type
    torch.testing.assert_close(logits(stock.eval()), out, atol=1e-5, rtol=1e-5)
    return book


@pytest.mark.parametrize("model_type,overrides", list(PASS),
                         ids=[f"{t}{''.join('-' + k for k, _ in o)}" for t, o in PASS])
def test_family_full_pipeline(model_type, overrides, tmp_path):
    m = tiny_lm(model_type, **dict(overrides))
    book = full_pipeline(m, tmp_path)
    assert {g.kind for g in book.groups} == PASS[(model_type, overrides)]
    assert book.meta["in_architecture_table"]
    for name, why in book.meta["frozen"].items():     # a kept-whole block says why
        assert why and name not in {g.name for g in book.groups}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_family_refused_before_scoring(model_type):
    m = tiny_lm(model_type)
    calls = []
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedModelError, match=REFUSED[model_type]):
        fp.score(m, token_batches(), progress=False)
    assert not calls, "the model was run before it was refused"


def test_every_table_entry_is_tested():
    tested = {t for t, _ in PASS} | set(REFUSED)
    assert set(ARCHITECTURES) <= tested, sorted(set(ARCHITECTURES) - tested)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert set(ARCHITECTURES) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_fallback_self_check_accepts_a_llama_like_type(monkeypatch, tmp_path):
    monkeypatch.delitem(ARCHITECTURES, "mistral")
    m = tiny_lm("mistral")
    assert not checked_layout(m).in_table           # matched by structure, then verified
    book = full_pipeline(m, tmp_path)
    assert not book.meta["in_architecture_table"]


def test_fallback_refuses_what_it_cannot_prune_exactly(monkeypatch):
    monkeypatch.delitem(ARCHITECTURES, "olmo2")     # q_norm over all heads
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.q_norm"):
        fp.score(tiny_lm("olmo2"), token_batches(), progress=False)


def test_register_architecture_is_one_entry(monkeypatch, tmp_path):
    """A family with a known block shape is one table entry (Phi-3's, under a new name)."""
    from fair_pruner.llm import register_architecture
    phi3 = ARCHITECTURES["phi3"]
    monkeypatch.delitem(ARCHITECTURES, "phi3")           # restored after the test
    with pytest.raises(UnsupportedModelError):           # fused qkv: the fallback cannot map it
        fp.score(tiny_lm("phi3"), token_batches(), progress=False)
    register_architecture("phi3", phi3)
    full_pipeline(tiny_lm("phi3"), tmp_path)
    with pytest.raises(ValueError, match="already"):
        register_architecture("phi3", phi3)


@pytest.mark.slow
def test_every_causal_lm_family_passes_or_is_refused(tmp_path):
    """Every decoder-only causal LM type of the pinned transformers that builds from the small
    config: the full pipeline passes, or it is refused before scoring. Nothing else."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    passed, refused, skipped = [], [], []
    for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with torch.device("meta"):
                meta = tiny_lm(t, perturb=False)
            big = sum(p.numel() for p in meta.parameters()) > 3_000_000
        except Exception:
            big = True
        if big:     # the small config does not apply (nested configs, fixed vocabularies)
            skipped.append(t)
            continue
        try:
            m = tiny_lm(t)
        except Exception:
            skipped.append(t)
            continue
        calls = []
        h = m.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            checked_layout(m)
        except UnsupportedModelError:
            refused.append(t)
            assert not calls
            continue
        h.remove()
        full_pipeline(m, tmp_path / t)
        passed.append(t)
    assert len(passed) >= 30, passed
    print(f"\n{len(passed)} passed: {' '.join(passed)}\n{len(refused)} refused: "
          f"{' '.join(refused)}\n{len(skipped)} not built small: {' '.join(skipped)}")
