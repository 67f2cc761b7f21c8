"""Weight reconstruction after removal (bias compensation, least squares with and without an
intercept, on the consumer's calibration statistics) and the signals built on the same
statistics (Wanda-sp, OBS, LLM-Pruner Taylor)."""
import warnings

import pytest
import torch

import fair_pruner as fp
from fair_pruner.errors import FairPrunerError

from helpers import (TinyCNN, assert_same, batches, count_macs, image_loader, randomize_bn,
                     snapshot, tiny_lm, token_batches)

try:
    from fair_pruner.llm import transformers_module
    transformers_module()
except ImportError:  # pragma: no cover - the llm extra is not installed
    pytest.skip("transformers is not installed (pip install -e '.[llm]')", allow_module_level=True)

from fair_pruner.llm.layout import find_layout  # noqa: E402
from fair_pruner.llm.reconstruct import METHODS, lstsq_update, update  # noqa: E402
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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "qwen2_moe"])
def test_reconstructed_pruned_equals_its_masked_reference(model_type, method, tmp_path):
    m, book, plan = _setup(model_type)
    pruned = fp.prune(m, plan, reconstruct=method, book=book)
    ref = fp.mask(m, plan, book, reconstruct=method)
    torch.testing.assert_close(logits(pruned), logits(ref), atol=1e-4, rtol=1e-3)
    plain = fp.prune(m, plan, reconstruct=None)
    assert not torch.allclose(logits(pruned), logits(plain), atol=1e-5), "nothing was updated"
    fp.save_pretrained(pruned, tmp_path / "out")      # added biases are rebuilt on reload
    again = fp.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(again), logits(pruned), atol=1e-5, rtol=1e-5)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(again.generate(X[:1], **gen), pruned.generate(X[:1], **gen))
    real = sum(p.numel() for p in pruned.parameters())
    base = sum(p.numel() for p in plain.parameters())
    assert real - base == pruned._fair_pruner_added_params    # what the plan does not count
    if method != "lstsq" and model_type == "llama":   # Llama's o_proj/down_proj had no bias
        assert pruned._fair_pruner_added_params > 0
        assert pruned.config.fair_pruner["biases"]
        assert pruned.config.fair_pruner["format"] == 2
        assert m.model.layers[0].mlp.down_proj.bias is None       # the caller's model


def test_auto_picks_the_best_method_the_book_allows():
    m, book, plan = _setup()
    assert fp.prune(m, plan, book=book)._fair_pruner_reconstruct == "affine"
    assert fp.prune(m, plan)._fair_pruner_reconstruct is None          # no book, nothing to use
    old = fp.ScoreBook.load(_save(book))        # a book from before token counts were stored
    for g in old.groups:
        g.meta.pop("tokens", None)
    assert fp.prune(m, plan, book=old)._fair_pruner_reconstruct == "lstsq"
    plain = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                     progress=False, reconstruction=False)
    assert "gram" not in plain.groups[0].tensors and "mean" in plain.groups[0].tensors
    p2 = fp.allocate(plain, params=0.3)
    assert fp.prune(m, p2, book=plain)._fair_pruner_reconstruct == "bias"
    torch.testing.assert_close(logits(fp.prune(m, p2, book=plain)),
                               logits(fp.mask(m, p2, plain)), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("budget_groups", [0.5, 1, 2])
def test_grams_over_the_memory_budget_are_collected_in_chunks(budget_groups):
    """A budget of half, one or two of the largest Grams: extra no-grad passes, same book."""
    m = tiny_lm("llama")
    kw = dict(classes=8, samples_per_class=8, projections=16, progress=False)
    one = fp.score(m, token_batches(), **kw)
    assert one.meta["gram_chunks"] == 1
    sizes = [g.tensors["gram"].numel() * 4 for g in one.groups]
    budget = sorted(sizes)[-1] * budget_groups / 2 ** 30
    with pytest.warns(UserWarning, match="chunks of layers"):
        book = fp.score(m, token_batches(), gram_memory=budget, **kw)
    assert book.meta["gram_chunks"] > 1
    for a, b in zip(one.groups, book.groups):
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            if k == "gram":
                torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=1e-5, atol=1e-4)
                assert b.tensors[k].abs().max() > 0
            else:
                torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=0, atol=0)
    plan = fp.allocate(book, params=0.3)
    assert plan.removed == fp.allocate(one, params=0.3).removed
    torch.testing.assert_close(fp.prune(m, plan, book=book)(input_ids=X).logits,
                               fp.prune(m, plan, book=one)(input_ids=X).logits,
                               rtol=1e-4, atol=1e-4)


def test_no_grams_when_reconstruction_is_off_and_bad_budgets():
    m = tiny_lm("llama")
    kw = dict(classes=8, samples_per_class=8, projections=16, progress=False)
    book = fp.score(m, token_batches(), reconstruction=False, **kw)
    assert not book.meta["reconstruction_stats"]
    assert all("gram" not in g.tensors and "mean" in g.tensors for g in book.groups)
    for bad in (0, -1.0, float("nan"), "4"):
        with pytest.raises(fp.CalibrationDataError, match="gram_memory"):
            fp.score(m, token_batches(), gram_memory=bad, **kw)


def _xw(seed, n=200, c=9, out=5, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g,
                                                                         dtype=torch.float64)
    x = x + shift * torch.randn(c, generator=g, dtype=torch.float64)   # non-zero means
    return x, torch.randn(out, c, generator=g, dtype=torch.float64), \
        torch.randn(out, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_affine_update_is_the_least_squares_fit_with_an_intercept(seed):
    x, W, b = _xw(seed)
    removed = torch.tensor([0, 4, 7])
    keep = torch.tensor([i for i in range(9) if i not in (0, 4, 7)])
    want = x @ W.T + b
    newW, newb = update(W, b, removed, "affine", mean=x.mean(0), gram=x.T @ x, tokens=x.shape[0],
                        damp=1e-10)
    err = (x[:, keep] @ newW[:, keep].T + newb - want).pow(2).sum()
    A = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(A, want).solution                     # the exact optimum
    torch.testing.assert_close(err, (A @ sol - want).pow(2).sum(), rtol=1e-5, atol=1e-8)
    # never worse than the mean compensation alone or the fit without intercept
    bW, bb = update(W, b, removed, "bias", mean=x.mean(0))
    lW, lb = update(W, b, removed, "lstsq", mean=x.mean(0), gram=x.T @ x, damp=1e-10)
    assert err <= (x[:, keep] @ bW[:, keep].T + bb - want).pow(2).sum()
    assert err <= (x[:, keep] @ lW[:, keep].T + lb - want).pow(2).sum()
    assert torch.equal(newW[:, removed], W[:, removed])


def test_bias_update_moves_the_removed_means_into_the_bias():
    x, W, b = _xw(1)
    removed = torch.tensor([2, 3])
    newW, newb = update(W, None, removed, "bias", mean=x.mean(0))
    assert torch.equal(newW, W)
    torch.testing.assert_close(newb, W[:, removed] @ x.mean(0)[removed])
    keep = torch.tensor([i for i in range(9) if i not in (2, 3)])
    torch.testing.assert_close((x[:, keep] @ W[:, keep].T + newb).mean(0), (x @ W.T).mean(0))


def test_too_few_tokens_warns_and_stays_finite():
    m = tiny_lm("llama")
    short = [torch.randint(0, 20, (1, 6), generator=torch.Generator().manual_seed(i))
             for i in range(3)]                                   # 18 tokens < the MLP width
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        book = fp.score(m, short, classes=4, samples_per_class=2, projections=4, progress=False,
                        reconstruction=True)
    plan = fp.allocate(book, params=0.3)
    with pytest.warns(UserWarning, match="rank-deficient"):
        pruned = fp.prune(m, plan, book=book)
    assert torch.isfinite(logits(pruned)).all()


def test_gram_is_the_calibration_second_moment():
    m = tiny_lm("llama")
    batches = token_batches()
    book = fp.score(m, batches, classes=8, samples_per_class=8, projections=16,
                    progress=False, reconstruction=True)
    x = _tap_inputs(m, find_layout(m).layers[0].family("ffn").tap, batches)
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
    with pytest.raises(FairPrunerError, match="not finite"):
        lstsq_update(W, torch.full((4, 4), float("nan")), torch.tensor([3]))
    with pytest.raises(FairPrunerError, match="positive definite"):      # indefinite: no damping
        lstsq_update(W, -torch.eye(4, dtype=torch.float64), torch.tensor([3]), damp=1e-3)


def test_reconstruct_errors_are_clear():
    m, book, plan = _setup()
    with pytest.raises(FairPrunerError, match="needs the score book"):
        fp.prune(m, plan, reconstruct="lstsq")
    with pytest.raises(FairPrunerError, match="choose one of"):
        fp.prune(m, plan, reconstruct="magic", book=book)
    plain = fp.score(m, token_batches(), classes=8, samples_per_class=8, projections=16,
                     progress=False, reconstruction=False)
    with pytest.raises(FairPrunerError, match="reconstruction=True"):
        fp.prune(m, fp.allocate(plain, params=0.3), reconstruct="lstsq", book=plain)
    with pytest.raises(FairPrunerError, match="reconstruction=True"):
        fp.prune(m, fp.allocate(plain, params=0.3), reconstruct="affine", book=plain)
    cnn = TinyCNN()
    cbook = fp.score(cnn, image_loader(), progress=False)
    with pytest.raises(FairPrunerError, match="reconstruction=True"):
        fp.prune(cnn, fp.allocate(cbook, params=0.3), reconstruct="lstsq", book=cbook)
    with pytest.raises(FairPrunerError, match="needs the score book"):
        fp.prune(cnn, fp.allocate(cbook, params=0.3), reconstruct="affine")


# ---- signals on the same statistics ---------------------------------------------------------

def _tap_inputs(m, tap, batches):
    xs = []
    h = m.get_submodule(tap).register_forward_pre_hook(lambda mod, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            m(input_ids=b["input_ids"], use_cache=False)
    h.remove()
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()


def test_wanda_obs_and_taylor_signals_match_their_definitions():
    m = tiny_lm("llama")
    batches = token_batches()
    flags = [p.requires_grad for p in m.parameters()]
    book = fp.score(m, batches, classes=8, samples_per_class=8, projections=16, progress=False,
                    reconstruction=True, weight_taylor=True, obs_signal=True)
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(p.grad is None for p in m.parameters())
    fam = find_layout(m).layers[0].family("ffn")
    g = book.group(fam.group_name)
    x = _tap_inputs(m, fam.tap, batches)
    W = m.get_submodule(fam.tap).weight.detach().double()
    wanda = W.abs().sum(0) * x.pow(2).mean(0).sqrt()
    torch.testing.assert_close(g.signals["wanda"], wanda, rtol=1e-4, atol=1e-7)
    # OBS: the output error of removing unit j alone with the affine LS update, per token
    from fair_pruner.llm.calibrate import _obs
    n = x.shape[0]
    torch.testing.assert_close(g.signals["obs"], _obs(fam, m, x.T @ x, x.mean(0), n),
                               rtol=1e-3, atol=1e-8)                # the book's ridge 1e-2
    exact = _obs(fam, m, x.T @ x, x.mean(0), n, damp=1e-10)
    for j in (0, 3, fam.size - 1):
        newW, newb = update(W, None, torch.tensor([j]), "affine", mean=x.mean(0), gram=x.T @ x,
                            tokens=n, damp=1e-10)
        keep = torch.tensor([i for i in range(fam.size) if i != j])
        err = (x[:, keep] @ newW[:, keep].T + newb - x @ W.T).pow(2).sum() / n
        torch.testing.assert_close(exact[j], err, rtol=1e-4, atol=1e-8)
    # LLM-Pruner element-wise Taylor on the consumer weight: Σ_i |w_ij · Σ_batches dL/dw_ij|
    cons = m.get_submodule(fam.tap)
    grad = torch.zeros_like(cons.weight)
    for b in batches:
        ids = b["input_ids"]
        out = m(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        grad += torch.autograd.grad(loss, cons.weight)[0]
    want = (cons.weight.detach() * grad).abs().sum(0).double()
    torch.testing.assert_close(g.signals["taylor"], want, rtol=1e-3, atol=1e-6)


# ---- CNN consumers --------------------------------------------------------------------------

def _cnn(name):
    import torchvision
    torch.manual_seed(0)
    if name == "tiny":
        return randomize_bn(TinyCNN(num_classes=10)).eval(), 8
    return randomize_bn(getattr(torchvision.models, name)(num_classes=10)).eval(), 32


@pytest.mark.parametrize("name,method", [(n, m) for n in ("tiny", "mobilenet_v2") for m in METHODS]
                         + [("resnet18", "affine"), ("resnet18", "bias")])
def test_cnn_reconstructed_pruned_equals_its_masked_reference(name, method):
    model, size = _cnn(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, size, size, generator=g)
    loader = batches(x, torch.arange(20) % 10, 10)
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        book = fp.score(model, loader, samples_per_class=2, projections=8, progress=False,
                        reconstruction=True)
    assert book.meta["reconstruction_stats"]
    plan = fp.allocate(book, params=0.3)
    pruned = fp.prune(model, plan, reconstruct=method, book=book)
    masked = fp.mask(model, plan, book, reconstruct=method)
    assert_same(model, snap)                                       # the caller's model
    xt = torch.randn(4, 3, size, size, generator=g)
    with torch.no_grad():
        a, b, plain = pruned(xt), masked(xt), fp.prune(model, plan, reconstruct=None)(xt)
    scale = b.abs().max().clamp(min=1e-3)
    assert (a - b).abs().max() <= 1e-4 * scale, (a - b).abs().max()
    assert (a - plain).abs().max() > 1e-4 * scale, "nothing was updated"
    assert count_macs(pruned, xt[:1]) >= plan.flops_after          # added biases cost adds
    if method != "bias":                   # on the calibration data: closer than no update
        with torch.no_grad():
            ref = model(x)
            err = lambda m: (m(x) - ref).pow(2).sum()
            assert err(pruned) < err(fp.prune(model, plan, reconstruct=None))


def test_cnn_depthwise_consumers_are_not_reconstructed_and_budget_skips_the_largest():
    model, size = _cnn("mobilenet_v2")
    x = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        book = fp.score(model, batches(x, torch.arange(10) % 5, 10), samples_per_class=2,
                        projections=8, progress=False, reconstruction=True, gram_memory=0.004)
    assert any("gram_memory" in str(m.message) for m in w)
    keys = {k[5:] for gr in book.groups for k in gr.tensors if k.startswith("gram@")}
    mods = dict(model.named_modules())
    assert keys and all(mods[k].groups == 1 for k in keys if isinstance(mods[k], torch.nn.Conv2d))
    assert book.meta["reconstruction_skipped"] and not keys & set(book.meta["reconstruction_skipped"])


def test_llm_books_recommend_their_default_signals_and_experts_keep_u_r():
    from fair_pruner.llm.calibrate import DEFAULT_SIGNALS
    m, book, _ = _setup()
    for g in book.groups:
        assert (g.meta["default_signal"], g.meta["default_protect"]) == DEFAULT_SIGNALS[g.kind]
    plan = fp.allocate(book, params=0.3)
    same = fp.allocate(book, params=0.3, signal="fluctuation", protect="u")
    assert plan.removed == same.removed and plan.signal == "fluctuation" and plan.protect == "u"
    paper = fp.allocate(book, params=0.3, signal="u", protect="r")
    assert paper.signal == "u" and paper.protect == "r"
    moe = tiny_lm("qwen2_moe")
    mbook = fp.score(moe, token_batches(), classes=8, samples_per_class=8, projections=16,
                     progress=False)
    kinds = {g.kind: (g.meta.get("default_signal"), g.meta.get("default_protect"))
             for g in mbook.groups}
    assert kinds["expert"] == (None, None)                 # resolved to the paper's U / R
    mixed = fp.allocate(mbook, params=0.2)
    assert mixed.signal == "fluctuation|u" and mixed.protect == "r|u"
    ex = fp.allocate(mbook, experts=0.25)
    assert ex.signal == "fluctuation|u"                  # the experts' own choice: u
    assert ex.removed == fp.allocate(mbook, experts=0.25, signal="u", protect="r").removed
    assert sum(map(len, ex.removed.values())) > 0
