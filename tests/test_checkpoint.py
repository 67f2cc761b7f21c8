"""fp.llm.prune_checkpoint (one decoder layer at a time from disk) equals prune + save_pretrained."""
import json

import pytest
import torch

import fair_pruner as fp

from helpers import tiny_lm, token_batches

pytest.importorskip("transformers")


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True),
                                             ("qwen2_moe", False)])
def test_prune_checkpoint_equals_prune_then_save(model_type, tied, tmp_path):
    m = tiny_lm(model_type)
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    m.save_pretrained(tmp_path / "src")
    m = fp.from_pretrained(tmp_path / "src")          # what the checkpoint holds
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False, reconstruction=True)
    kw = {"experts": 0.25} if model_type == "qwen2_moe" else {"params": 0.3}
    plan = fp.allocate(book, **kw)
    assert any(plan.removed.values())
    want = fp.prune(m, plan, book=book)
    fp.save_pretrained(want, tmp_path / "whole")
    out = fp.llm.prune_checkpoint(tmp_path / "src", plan, tmp_path / "layered", book=book,
                                  progress=False)
    got = fp.from_pretrained(out)
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(got, x), logits(want, x), rtol=1e-5, atol=1e-5)
    a = json.loads((tmp_path / "whole" / "config.json").read_text())["fair_pruner"]
    b = json.loads((tmp_path / "layered" / "config.json").read_text())["fair_pruner"]
    assert a == b                                     # same widths, biases, architecture delta
    index = json.loads((tmp_path / "layered" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == len(m.model.layers) + 1      # one shard per decoder layer + the rest
    assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in want.parameters())
    assert (tmp_path / "layered" / "fair_pruner_plan.json").exists()
    if model_type == "llama":                        # stock transformers reads the index too
        from fair_pruner.llm import transformers_module
        stock = transformers_module().AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=True).eval()
        torch.testing.assert_close(logits(stock, x), logits(want, x), rtol=1e-5, atol=1e-5)


def test_prune_checkpoint_with_expert_merge_equals_prune_then_save(tmp_path):
    m = tiny_lm("qwen2_moe")
    m.save_pretrained(tmp_path / "src")
    m = fp.from_pretrained(tmp_path / "src")
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False, reconstruction=True)
    plan = fp.allocate(book, experts=0.25)
    want = fp.prune(m, plan, book=book, expert_merge=True)
    assert any(want._fair_pruner_expert_merge.values())           # something was merged
    plain = fp.prune(m, plan, book=book)
    out = fp.llm.prune_checkpoint(tmp_path / "src", plan, tmp_path / "layered", book=book,
                                  expert_merge=True, progress=False)
    got = fp.from_pretrained(out)
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(got, x), logits(want, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(got, x), logits(plain, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(fp.FairPrunerError, match="needs the score book"):
        fp.llm.prune_checkpoint(tmp_path / "src", plan, tmp_path / "o", expert_merge=True,
                                reconstruct=None, progress=False)
    assert not (tmp_path / "o").exists()


def test_prune_checkpoint_refuses_before_reading(tmp_path):
    m = tiny_lm("llama")
    m.save_pretrained(tmp_path / "src")
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False)
    plan = fp.allocate(book, params=0.3)
    with pytest.raises(fp.FairPrunerError, match="out must differ"):
        fp.llm.prune_checkpoint(tmp_path / "src", plan, tmp_path / "src", book=book)
    other = fp.allocate(fp.score(tiny_lm("qwen2"), token_batches(), classes=8,
                                 samples_per_class=8, projections=16, progress=False),
                        params=0.3)
    with pytest.raises(fp.FairPrunerError):
        fp.llm.prune_checkpoint(tmp_path / "src", other, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(FileNotFoundError):
        fp.llm.prune_checkpoint(tmp_path / "nothing", plan, tmp_path / "o3")
