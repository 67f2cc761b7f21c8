"""Weight reconstruction after removal (least squares on the consumer's calibration Gram)."""
import pytest
import torch

import fair_pruner as fp
from fair_pruner.errors import FairPrunerError

from helpers import TinyCNN, image_loader, tiny_lm, token_batches

try:
    from fair_pruner.llm import transformers_module
    transformers_module()
except ImportError:  # pragma: no cover - the llm extra is not installed
    pytest.skip("transformers is not installed (pip install -e '.[llm]')", allow_module_level=True)

from fair_pruner.llm.layout import find_layout  # noqa: E402
from fair_pruner.llm.reconstruct import lstsq_update  # noqa: E402
from fair_pruner.ops import gram_ref  # noqa: E402

X = torch.randint(0, 20, (2, 11), generator=torch.Generator().manual_seed(5))


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def _setup(model_type="llama"):
    m = tiny_lm(model_type)
    book = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                    progress=False, reconstruction=True)
    plan = fp.allocate(book, params=0.3)
    for g in book.groups:
        if not plan.removed[g.name] and g.size > g.min_keep:
            plan.removed[g.name] = [int(torch.argmin(g.u))]
    return m, book, plan


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "qwen2_moe"])
def test_reconstructed_pruned_equals_its_masked_reference(model_type, tmp_path):
    m, book, plan = _setup(model_type)
    pruned = fp.prune(m, plan, reconstruct="lstsq", book=book)
    ref = fp.mask(m, plan, book, reconstruct="lstsq")
    torch.testing.assert_close(logits(pruned), logits(ref), atol=1e-4, rtol=1e-3)
    plain = fp.prune(m, plan)
    assert not torch.allclose(logits(pruned), logits(plain), atol=1e-5), "nothing was updated"
    fp.save_pretrained(pruned, tmp_path / "out")        # weights only changed: save/reload works
    torch.testing.assert_close(logits(fp.from_pretrained(tmp_path / "out")), logits(pruned),
                               atol=1e-5, rtol=1e-5)


def test_gram_is_the_calibration_second_moment():
    m = tiny_lm("llama")
    batches = token_batches()
    book = fp.score(m, batches, classes=8, samples_per_class=8, projections=16,
                    progress=False, reconstruction=True)
    tap = find_layout(m).layers[0].family("ffn").tap
    xs = []
    h = m.get_submodule(tap).register_forward_pre_hook(lambda mod, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            m(input_ids=b["input_ids"], use_cache=False)
    h.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    g = book.group("model.layers.0.mlp")
    torch.testing.assert_close(g.tensors["gram"].double(), x.T @ x, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(g.tensors["mean"].double(), x.mean(0), rtol=1e-4, atol=1e-5)
    again = fp.ScoreBook.load(_save(book))                     # stored with the book
    assert torch.equal(again.group("model.layers.0.mlp").tensors["gram"], g.tensors["gram"])


def _save(book):
    import tempfile
    path = tempfile.mkdtemp() + "/book.safetensors"
    book.save(path)
    return path


@pytest.mark.parametrize("seed", range(5))
def test_lstsq_update_minimises_the_consumer_output_error(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 9, generator=g,
                                                                           dtype=torch.float64)
    W = torch.randn(5, 9, generator=g, dtype=torch.float64)
    removed = torch.tensor([1, 4, 7])
    G = gram_ref(x).double()
    new = lstsq_update(W, G, removed, damp=1e-9)
    keep = torch.tensor([i for i in range(9) if i not in (1, 4, 7)])
    want = x @ W.T
    err_new = (x[:, keep] @ new[:, keep].T - want).pow(2).sum()
    err_old = (x[:, keep] @ W[:, keep].T - want).pow(2).sum()
    sol = torch.linalg.lstsq(x[:, keep], want).solution.T           # the exact optimum
    err_opt = (x[:, keep] @ sol.T - want).pow(2).sum()
    assert err_new < err_old
    torch.testing.assert_close(err_new, err_opt, rtol=1e-5, atol=1e-8)
    assert torch.equal(new[:, removed], W[:, removed])              # removed columns untouched


def test_rank_deficient_gram_is_damped_not_fatal():
    W = torch.randn(3, 4, dtype=torch.float64)
    G = torch.zeros(4, 4, dtype=torch.float64)
    G[0, 0] = 1.0                                                    # dead channels
    new = lstsq_update(W, G, torch.tensor([3]))
    assert torch.isfinite(new).all()


def test_reconstruct_errors_are_clear():
    m, book, plan = _setup()
    with pytest.raises(FairPrunerError, match="needs the score book"):
        fp.prune(m, plan, reconstruct="lstsq")
    with pytest.raises(FairPrunerError, match="choose one of"):
        fp.prune(m, plan, reconstruct="magic", book=book)
    plain = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                     progress=False)
    with pytest.raises(FairPrunerError, match="reconstruction=True"):
        fp.prune(m, fp.allocate(plain, params=0.3), reconstruct="lstsq", book=plain)
    cnn = TinyCNN()
    cbook = fp.score(cnn, image_loader(), progress=False)
    with pytest.raises(FairPrunerError, match="Hugging Face LM plans only"):
        fp.prune(cnn, fp.allocate(cbook, params=0.3), reconstruct="lstsq", book=cbook)
