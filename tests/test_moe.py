"""Routed-expert pruning: tiny random Qwen2-MoE / Mixtral / Qwen3-MoE models (no downloads).

Both expert storages: transformers 5's fused 3-D expert parameters, and a ModuleList of expert
MLPs with an nn.Linear router (the transformers 4.x / remote-code layout, rebuilt here from the
fused weights with the 4.x routing code).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fair_pruner as fp
from fair_pruner.errors import FairPrunerError, TargetError, UnsupportedModelError
from fair_pruner.scorebook import GroupSpec
from fair_pruner.scorebook import Group, ScoreBook

try:
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
except ImportError:  # pragma: no cover - the llm extra is not installed
    pytest.skip("transformers is not installed (pip install -e '.[llm]')", allow_module_level=True)

from fair_pruner import llm  # noqa: E402
from fair_pruner.llm import moe  # noqa: E402

VOCAB = 53


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

class LegacyMLP(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        inter = down.shape[1]
        self.gate_proj = nn.Linear(down.shape[0], inter, bias=False)
        self.up_proj = nn.Linear(down.shape[0], inter, bias=False)
        self.down_proj = nn.Linear(inter, down.shape[0], bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inter])
            self.up_proj.weight.copy_(gate_up[inter:])
            self.down_proj.weight.copy_(down)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LegacySparseMoeBlock(nn.Module):
    """transformers 4.x's Qwen2MoeSparseMoeBlock / MixtralSparseMoeBlock routing, verbatim."""

    def __init__(self, fused: nn.Module, norm_topk_prob):
        super().__init__()
        E, H = fused.gate.weight.shape
        self.num_experts, self.top_k = E, fused.gate.top_k
        if norm_topk_prob is not None:
            self.norm_topk_prob = norm_topk_prob
        self._norm = True if norm_topk_prob is None else norm_topk_prob  # Mixtral: always
        self.gate = nn.Linear(H, E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(fused.gate.weight)
        ex = fused.experts
        self.experts = nn.ModuleList(LegacyMLP(ex.gate_up_proj[e].detach(), ex.down_proj[e].detach())
                                     for e in range(E))
        for name in ("shared_expert", "shared_expert_gate"):
            if hasattr(fused, name):
                setattr(self, name, copy.deepcopy(getattr(fused, name)))

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if self._norm:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)
        final = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            if top_x.numel():
                out = self.experts[e](x[top_x]) * routing_weights[top_x, idx, None]
                final.index_add_(0, top_x, out.to(x.dtype))
        if hasattr(self, "shared_expert"):
            final = final + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return final.reshape(b, s, h)


def tiny(arch: str, storage: str = "fused", seed: int = 0):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "qwen2_moe":   # Qwen1.5-MoE: shared expert + gate, a dense layer in the middle
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=16, num_local_experts=6,
                               num_experts_per_tok=2)
    else:
        cfg = tf.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=48,
                                moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                norm_topk_prob=True)
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # random init is tiny; spread router logits and expert outputs
        for n, p in m.named_parameters():
            if "embed" not in n and p.dim() >= 2:
                p.mul_(6.0 if ".gate." in n else 3.0)
    if storage == "modulelist":
        norm = {"qwen2_moe": False, "mixtral": None, "qwen3_moe": True}[arch]
        for layer in m.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp = LegacySparseMoeBlock(layer.mlp, norm)
    return m


VARIANTS = [("qwen2_moe", "fused"), ("mixtral", "fused"), ("qwen3_moe", "fused"),
            ("qwen2_moe", "modulelist"), ("mixtral", "modulelist")]
X = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def batches(n=3, b=2, t=20, seed=1, high=16):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, high, (b, t), generator=g)} for _ in range(n)]


def score(model):
    return fp.score(model, batches(), classes=6, samples_per_class=6, projections=8,
                    progress=False)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Layout, surgery and the masked reference
# --------------------------------------------------------------------------------------------

def test_legacy_block_matches_fused():
    """The ModuleList fixture computes what the fused model computes (so both test one thing)."""
    for arch in ("qwen2_moe", "mixtral", "qwen3_moe"):
        a, b = tiny(arch), tiny(arch, "modulelist")
        torch.testing.assert_close(logits(a), logits(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,storage", VARIANTS)
def test_layout_detection(arch, storage):
    m = tiny(arch, storage)
    layers = moe.find_moe_layers(m)
    E = 6 if arch == "mixtral" else 8
    assert [l.layer_index for l in layers] == ([0, 2] if arch == "qwen2_moe" else [0, 1, 2])
    assert {l.storage for l in layers} == {storage}
    assert {l.num_experts for l in layers} == {E}
    assert {l.top_k for l in layers} == {3 if arch == "qwen3_moe" else 2}
    assert all(bool(l.shared) == (arch == "qwen2_moe") for l in layers)


@pytest.mark.parametrize("arch,storage", VARIANTS)
def test_pruned_equals_masked_original(arch, storage):
    m = tiny(arch, storage)
    before = state(m)
    layers = moe.find_moe_layers(m)
    removed = {l.group_name: [i for i in range(l.num_experts) if (i * 7 + j) % 3 == 0][: l.num_experts - l.top_k]
               for j, l in enumerate(layers)}
    pruned = moe.prune_experts(m, removed)
    ref = moe.mask_experts(m, removed)
    out, want, orig = logits(pruned), logits(ref), logits(m)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - orig).abs().max() > 1e-3            # the removal did change the model
    for l in moe.find_moe_layers(pruned):
        n = next(x.num_experts for x in layers if x.block == l.block) - len(removed[l.group_name])
        assert l.num_experts == n
        assert pruned.get_submodule(l.router).weight.shape[0] == n
    # survivors keep their router rows (re-indexed in order): their logits are unchanged
    l0 = layers[0]
    keep = [i for i in range(l0.num_experts) if i not in removed[l0.group_name]]
    torch.testing.assert_close(pruned.get_submodule(l0.router).weight,
                               m.get_submodule(l0.router).weight[keep])
    for k, v in state(m).items():                     # the caller's model is untouched
        assert torch.equal(v, before[k])
    pruned.generate(X[:, :4], max_new_tokens=3, do_sample=False)


def test_prune_rejects_fewer_than_top_k():
    m = tiny("qwen3_moe")                              # top_k = 3 of 8
    g = moe.find_moe_layers(m)[0].group_name
    with pytest.raises(TargetError, match="fewer than top_k=3"):
        moe.prune_experts(m, {g: list(range(6))})
    with pytest.raises(TargetError, match="fewer than top_k"):
        moe.mask_experts(m, {g: list(range(6))})


def test_unknown_moe_layout_is_a_clear_error():
    m = tiny("mixtral")
    blk = m.model.layers[1].mlp
    blk.experts = nn.ModuleDict({"e0": nn.Linear(4, 4), "e1": nn.Linear(4, 4)})
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp.*ModuleDict"):
        moe.find_moe_layers(m)
    m = tiny("mixtral")
    m.model.layers[2].mlp.gate = nn.Identity()        # no router beside the experts
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.2\.mlp.*router"):
        fp.score(m, batches(), progress=False)


# --------------------------------------------------------------------------------------------
# Scores, allocation, surgery through the public API
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,storage", VARIANTS)
def test_score_allocate_prune(arch, storage):
    m = tiny(arch, storage)
    before = state(m)
    book = score(m)
    for k, v in state(m).items():
        assert torch.equal(v, before[k])
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    eg = [g for g in book.groups if g.kind == "expert"]
    assert len(eg) == len(moe.find_moe_layers(m))
    for g in eg:
        assert {"u", "r", "freq", "reap", "l2"} <= set(g.signals)
        assert g.meta["top_k"] == (3 if arch == "qwen3_moe" else 2)
        assert float(g.signals["freq"].sum()) == pytest.approx(g.meta["top_k"])   # k slots/token
        assert float(g.signals["r"].sum()) > 0 and float(g.signals["u"].sum()) > 0
    total = sum(g.size for g in eg)
    for frac in (0.25, 0.5):
        for strategy in ("tod", "uniform"):
            plan = fp.allocate(book, experts=frac, strategy=strategy)
            n_rm = {g.name: len(plan.removed[g.name]) for g in eg}
            assert sum(n_rm.values()) == round(frac * total)
            assert all(g.size - n_rm[g.name] >= g.meta["top_k"] for g in eg)
            if strategy == "uniform" and round(frac * total) % len(eg) == 0:
                assert len(set(n_rm.values())) == 1
            assert all(not v for g, v in plan.removed.items() if not g.endswith(".experts"))
    plan = fp.allocate(book, experts=0.5, signal="freq")
    pruned = fp.prune(m, plan)
    torch.testing.assert_close(logits(pruned), logits(llm.mask(m, plan)), rtol=1e-5, atol=1e-5)
    counts = {l.group_name: l.num_experts for l in moe.find_moe_layers(pruned)}
    assert counts == {g.name: g.size - len(plan.removed[g.name]) for g in eg}
    assert plan.params_after < plan.params_before


def test_r_score_is_the_taylor_term_of_each_expert():
    """R_e = |sum <y_e, dL/dy_e>| equals the loss's derivative w.r.t. a scale on expert e."""
    m = tiny("mixtral")
    data = batches(n=1)
    book = fp.score(m, data, classes=6, samples_per_class=6, projections=8, progress=False)
    g = next(g for g in book.groups if g.kind == "expert")
    layer = moe.find_moe_layers(m)[0]
    assert g.name == layer.group_name
    scale = torch.ones(layer.num_experts, requires_grad=True)
    experts = m.get_submodule(layer.experts)
    orig = type(experts).forward

    def fwd(self, h, idx, w):                     # y_e -> scale_e * y_e
        return orig(self, h, idx, w * scale[idx])
    experts.forward = fwd.__get__(experts)
    ids = data[0]["input_ids"]
    lg = m(input_ids=ids).logits
    loss = F.cross_entropy(lg[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, [scale])
    torch.testing.assert_close(g.signals["r"], grad.abs().double(), rtol=1e-3, atol=1e-6)


def test_mixed_model_prunes_dense_layers_in_the_same_run():
    m = tiny("qwen2_moe")
    book = score(m)
    kinds = {g.name: g.kind for g in book.groups}
    assert kinds["model.layers.1.mlp"] == "neuron" and kinds["model.layers.0.mlp.experts"] == "expert"
    plan = fp.allocate(book, experts=0.25, tod=0.3)
    assert plan.removed["model.layers.1.mlp"], "dense MLP pruned at tod=0.3"
    assert plan.meta["experts"]["dense_tod"] == 0.3
    pruned = fp.prune(m, plan)
    torch.testing.assert_close(logits(pruned), logits(llm.mask(m, plan)), rtol=1e-5, atol=1e-5)


def test_save_reload_per_layer_expert_counts(tmp_path):
    m = tiny("qwen2_moe")
    book = score(m)
    plan = fp.allocate(book, experts=0.375, tod=0.2)   # 6 of 16: layers get different counts
    pruned = fp.prune(m, plan)
    counts = [l.num_experts for l in moe.find_moe_layers(pruned)]
    fp.save_pretrained(pruned, tmp_path / "m")
    back = fp.from_pretrained(tmp_path / "m")
    assert type(back) is type(pruned)
    assert [l.num_experts for l in moe.find_moe_layers(back)] == counts
    torch.testing.assert_close(logits(back), logits(pruned), rtol=0, atol=0)
    a = pruned.generate(X[:, :4], max_new_tokens=4, do_sample=False)
    b = back.generate(X[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# The experts= budget on synthetic books
# --------------------------------------------------------------------------------------------

def synthetic_book(sizes, top_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for i, n in enumerate(sizes):
        sig = {"u": torch.rand(n, generator=g, dtype=torch.float64) * (i + 1),
               "r": torch.rand(n, generator=g, dtype=torch.float64)}
        groups.append(Group(f"layers.{i}.mlp.experts", n, sig, GroupSpec(f"l{i}", n, []),
                            "expert", {"top_k": top_k}, min_keep=top_k, roundable=False))
    return ScoreBook(groups, _ExpertCost(sizes), {"kind": "llm", "fingerprint": "x"})


class _ExpertCost:
    """100 params per expert, no MACs (the book's cost model interface: evaluate(removed))."""

    def __init__(self, sizes):
        self.sizes = torch.tensor(sizes, dtype=torch.float64)

    def evaluate(self, removed):
        p = 100.0 * (self.sizes - removed.double()).sum(-1)
        return p, torch.zeros_like(p)


@pytest.mark.parametrize("seed", range(12))
def test_experts_budget_is_exact_and_tod_shaped(seed):
    from fair_pruner.tod import ToDCurves, m_hat_capped

    book = synthetic_book([16, 16, 12, 16, 8], top_k=2, seed=seed)
    total = sum(g.size for g in book.groups)
    for frac in (0.1, 0.25, 0.5, 0.7):
        plan = fp.allocate(book, experts=frac)
        m = [len(plan.removed[g.name]) for g in book.groups]
        assert sum(m) == round(frac * total)
        assert all(g.size - k >= 2 for g, k in zip(book.groups, m))
        info = plan.meta["experts"]
        assert info["budget"] == sum(m) and info["budget_adjust"]["topped_up"] == 0
        # removed = the lowest-U experts of each layer
        for g, k in zip(book.groups, m):
            assert plan.removed[g.name] == sorted(torch.argsort(g.u, stable=True)[:k].tolist())
        # ToD at the plan's alpha (per-layer cap n - top_k) removes >= m, exactly m + trimmed
        curves = ToDCurves([g.u for g in book.groups], [g.r for g in book.groups], 0.99)
        at = [m_hat_capped(curves.curve(i), g.size - 2, plan.alpha)
              for i, g in enumerate(book.groups)]
        assert all(a >= k for a, k in zip(at, m))
        assert sum(at) - sum(m) == info["budget_adjust"]["trimmed"]
        assert fp.allocate(book, experts=frac).removed == plan.removed     # deterministic
        assert plan.units_reduction == pytest.approx(sum(m) / total)


def test_experts_budget_errors():
    book = synthetic_book([8, 8], top_k=2)
    with pytest.raises(TargetError, match="keeps >= top_k"):
        fp.allocate(book, experts=0.8)                  # 13 of 16 > 2 * (8 - 2)
    with pytest.raises(TargetError, match=r"\(0, 1\)"):
        fp.allocate(book, experts=1.5)
    with pytest.raises(TargetError, match="not be combined"):
        fp.allocate(book, experts=0.25, params=0.2)
    dense = ScoreBook([Group("mlp", 4, {"u": torch.rand(4, dtype=torch.float64),
                                        "r": torch.rand(4, dtype=torch.float64)},
                             GroupSpec("mlp", 4, []), "neuron")], book.cost, {})
    with pytest.raises(TargetError, match="no(ne)?"):
        fp.allocate(dense, experts=0.25)
    plan = fp.allocate(book, experts=0.75, strategy="uniform")     # 12 = 6 + 6: the bound
    assert [len(v) for v in plan.removed.values()] == [6, 6]


def test_generic_targets_keep_top_k_experts_per_layer():
    book = synthetic_book([8, 8, 6], top_k=2)
    plan = fp.allocate(book, units=0.7)                 # ToD with a units target
    assert all(g.size - len(plan.removed[g.name]) >= 2 for g in book.groups)
    with pytest.raises(TargetError, match="cannot be reached"):
        fp.allocate(book, units=0.8, strategy="uniform")   # 18 of 22 > 16 removable


# --------------------------------------------------------------------------------------------
# Expert merging (reconstruction of the mixture)
# --------------------------------------------------------------------------------------------

def _cochoice_brute_force(model, layer, xs):
    """cochoice[e, j] per token from the router's own softmax over the calibration tokens."""
    router = model.get_submodule(layer.router)
    E, k = layer.num_experts, layer.top_k
    seen = []
    h = model.get_submodule(layer.block).register_forward_pre_hook(
        lambda mod, args, kwargs=None: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in xs:
            model(**b, use_cache=False)
    h.remove()
    x = torch.cat(seen).double()
    p = F.softmax(x @ router.weight.detach().double().T, dim=-1)
    top = torch.topk(p, k, dim=-1).indices
    want = torch.zeros(E, E, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in top[t].tolist():
            for j in range(E):
                if j not in top[t].tolist():
                    want[e, j] += float(p[t, j])
    return want / x.shape[0]


@pytest.mark.parametrize("arch,storage", VARIANTS)
def test_cochoice_statistics_equal_brute_force(arch, storage, tmp_path):
    m = tiny(arch, storage)
    book = score(m)
    book.save(tmp_path / "b.safetensors")
    book = fp.ScoreBook.load(tmp_path / "b.safetensors")      # stored with the book
    for layer in moe.find_moe_layers(m):
        got = book.group(layer.group_name).tensors["cochoice"].double()
        torch.testing.assert_close(got, _cochoice_brute_force(m, layer, batches()),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,storage", VARIANTS)
def test_merged_pruned_equals_its_masked_reference(arch, storage, tmp_path):
    m = tiny(arch, storage)
    before = state(m)
    book = score(m)
    plan = fp.allocate(book, experts=0.3)
    pruned = fp.prune(m, plan, book=book, expert_merge=True)
    ref = fp.mask(m, plan, book=book, expert_merge=True)
    torch.testing.assert_close(logits(pruned), logits(ref), rtol=1e-5, atol=1e-5)
    plain = fp.prune(m, plan, book=book)
    assert (logits(pruned) - logits(plain)).abs().max() > 1e-4, "merging changed nothing"
    merged = pruned._fair_pruner_expert_merge
    assert merged and all(set(t) <= set(plan.removed[g]) for g, t in merged.items())
    for g, targets in merged.items():           # each target is a kept expert
        assert all(j not in plan.removed[g] for j in targets.values())
    for k, v in state(m).items():
        assert torch.equal(v, before[k])
    if storage == "fused":                      # merged weights survive save / reload
        fp.save_pretrained(pruned, tmp_path / "out")
        torch.testing.assert_close(logits(fp.from_pretrained(tmp_path / "out")), logits(pruned))


def test_merge_is_the_frequency_weighted_average():
    m = tiny("mixtral")
    layer = moe.find_moe_layers(m)[0]
    E = layer.num_experts
    freq = torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    co = torch.zeros(E, E, dtype=torch.float64)
    co[1, 3], co[1, 0], co[2, 3], co[5, 0] = 0.2, 0.1, 0.5, 0.3   # 1 -> 3, 2 -> 3, 5 -> 0
    experts = m.get_submodule(layer.experts)
    w0 = {n: p.detach().clone() for n, p in experts.named_parameters()}
    targets = moe.merge_experts(m, layer, [1, 2, 5], freq, co)
    assert targets == {1: 3, 2: 3, 5: 0}
    for n, p in experts.named_parameters():
        want3 = (0.3 * w0[n][3] + 0.1 * w0[n][1] + 0.2 * w0[n][2]) / 0.6
        torch.testing.assert_close(p[3], want3.to(p.dtype))
        torch.testing.assert_close(p[0], w0[n][0])          # expert 5 never routed: weight 0
        torch.testing.assert_close(p[4], w0[n][4])          # not a target: unchanged


def test_expert_merge_needs_the_statistics():
    m = tiny("qwen2_moe")
    book = score(m)
    plan = fp.allocate(book, experts=0.3)
    with pytest.raises(FairPrunerError, match="needs the score book"):
        fp.prune(m, plan, expert_merge=True)
    for g in book.groups:
        g.tensors.pop("cochoice", None)
    before = state(m)
    with pytest.raises(FairPrunerError, match="co-choice"):
        fp.prune(m, plan, book=book, expert_merge=True, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in state(m).items())   # refused before changes
    layer = moe.find_moe_layers(m)[0]
    with pytest.raises(FairPrunerError, match="routing statistics"):
        moe.merge_experts(m, layer, [0], torch.ones(3), torch.zeros(8, 8))
