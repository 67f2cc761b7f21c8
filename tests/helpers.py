"""Small models and loaders shared by the tests."""
import torch
import torch.nn as nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes=4, inplace=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.act = nn.SiLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(5 * 4, 7)
        self.fc2 = nn.Linear(7, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.act(self.conv2(x))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class TinyMLP(nn.Module):
    def __init__(self, d_in=5, hidden=9, num_classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def image_loader(n=24, classes=4, size=8, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    return batches(x, y, bs)


def cnn_case(memory_budget=4 << 30):
    """A small CNN with randomised BN, its 13 batches of 6 images (7 classes, uneven counts)
    and score options with reconstruction statistics (the data-parallel tests)."""
    torch.manual_seed(3)
    m = TinyCNN(num_classes=7).eval()
    randomize_bn(m)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(78, 3, 8, 8, generator=g)
    y = torch.randint(0, 7, (78,), generator=g)
    return m, batches(x, y, 6), dict(samples_per_class=4, projections=8, progress=False,
                                     reconstruction=True, memory_budget=memory_budget)


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "mode": {n: m.training for n, m in model.named_modules()},
        "grad": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
    }


def assert_same(model, snap):
    now = snapshot(model)
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"
    assert now["req"] == snap["req"], "requires_grad flags changed"
    assert now["mode"] == snap["mode"], "train/eval mode changed"
    for k, v in snap["grad"].items():
        w = now["grad"][k]
        assert (v is None) == (w is None) and (v is None or torch.equal(v, w)), f"{k}.grad changed"


def count_macs(model, x):
    """Conv/Linear MACs per sample of one forward on x: weight numel x output positions
    (rows included: windowed attention folds its windows into the batch dim)."""
    total = [0]

    def hook(m, i, o):
        units = o.shape[1] if isinstance(m, nn.Conv2d) else o.shape[-1]
        total[0] += m.weight.numel() * (o.numel() // units // x.shape[0])

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0]


# --------------------------------------------------------------------------------------------
# Tiny Hugging Face causal LMs of any family (no downloads)
# --------------------------------------------------------------------------------------------

LM_VOCAB = 61
LM_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=LM_VOCAB,
                max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                n_inner=48, ffn_dim=48, ffn_hidden_size=48, num_layers=2, d_model=32, moe_intermediate_size=16,
                shared_expert_intermediate_size=16, n_routed_experts=6, num_experts=6,
                num_local_experts=6, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
                qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, rotary_dim=4,
                decoder_sparse_step=1, mlp_only_layers=[], moe_layer_freq=1)
# Per family: what the generic small config gets wrong.
LM_OVERRIDES = {
    "falcon": dict(num_kv_heads=2, new_decoder_architecture=True),
    "gpt_neox": dict(rotary_pct=0.5),
    "phi": dict(partial_rotary_factor=0.5),
    "llama4_text": dict(intermediate_size_mlp=48, interleave_moe_layer_step=1,
                        no_rope_layers=[1, 1]),
    "dbrx": dict(ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 6, "moe_top_k": 2,
                             "hidden_size": 32},
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 max_seq_len=64, init={"d_model": 32}),
    "deepseek_v2": dict(head_dim=4),
    "deepseek_v3": dict(head_dim=4),
}


def tiny_lm(model_type, seed=0, perturb=True, **overrides):
    """A random 2-layer model of ``model_type`` with widths from LM_SMALL, weights perturbed so
    norms, biases and near-zero inits are not trivial (else pruned == masked compares little)."""
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
    over = {**LM_OVERRIDES.get(model_type, {}), **overrides}
    # nested sub-configs (DBRX) and "init" fields go to the constructor; the rest is set after
    init = dict(over.pop("init", {}))
    cfg = tf.AutoConfig.for_model(model_type, **init, **{k: v for k, v in over.items()
                                                         if isinstance(v, dict)})
    n_full = getattr(cfg, "num_hidden_layers", None)
    for k, v in {**LM_SMALL, **over}.items():
        if not isinstance(v, dict) and hasattr(cfg, k):
            try:
                setattr(cfg, k, v)
            except (AttributeError, TypeError):
                pass
    n = getattr(cfg, "num_hidden_layers", None)
    for k, v in cfg.to_dict().items():      # per-layer lists (layer_types, ...) follow n
        if isinstance(v, list) and n_full and len(v) == n_full and k not in over:
            try:
                setattr(cfg, k, v[:n])
            except (AttributeError, TypeError):
                pass
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v >= LM_VOCAB:
            setattr(cfg, k, 0)
    if hasattr(cfg, "tie_word_embeddings"):
        cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    if not perturb:
        return m
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.is_floating_point():
                scale = 3.0 if p.dim() == 2 and "embed" not in n else 1.0
                p.mul_(scale).add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def token_batches(n=4, b=2, t=24, seed=1, high=20):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, high, (b, t), generator=g)} for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Hypothesis strategies and checks shared by the kernel tests (every backend vs the reference)
# --------------------------------------------------------------------------------------------

from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def activation(draw, sides=(0, 1, 2, 3, 5, 7, 16, 33)):
    """(z, g, dim) in a random layout: contiguous, channels-last, transposed or sliced."""
    nd = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from(sides)) for _ in range(nd)]
    if draw(st.integers(0, 9)) > 0:  # mostly non-empty
        shape = [max(1, s) for s in shape]
    dim = draw(st.integers(-nd, nd - 1))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contig", "channels_last", "transposed", "sliced", "expanded"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ties = draw(st.booleans())

    def make():
        full = list(shape)
        if layout == "sliced":
            full = [s * 2 for s in shape]
        t = torch.randn(full, generator=gen)
        if ties:
            t = t.round()
        t = t.to(dtype)
        if layout == "sliced":
            t = t[tuple(slice(None, None, 2) for _ in shape)]
        elif layout == "channels_last" and nd == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed" and nd >= 2:
            t = t.transpose(0, nd - 1).contiguous().transpose(0, nd - 1)
        elif layout == "expanded" and nd >= 2 and shape[0] > 0:
            t = t[:1].expand(shape)
        return t

    return make(), make(), dim


def _oracle(z, g, dim):
    """fp64 rows (z*g, |z|, z, z^2) and their |.| scale for the tolerance."""
    d = dim % z.dim()
    other = [i for i in range(z.dim()) if i != d]
    zd, gd = z.double(), g.double()
    terms = [zd * gd, zd.abs(), zd, zd * zd]
    if z.numel() == 0:
        zero = torch.zeros(z.shape[d], dtype=torch.float64)
        return torch.stack([zero] * 4), torch.stack([zero] * 4)
    red = (lambda x: x.sum(dim=other)) if other else (lambda x: x)
    return torch.stack([red(t) for t in terms]), torch.stack([red(t.abs()) for t in terms])


def _assert_sums(got, exact, scale):
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    bound = 2e-5 * scale + 1e-6
    assert bool((err <= bound).all()), f"max err {float((err - bound).max())} over the bound"


@st.composite
def samples(draw, max_s=40, units=(0, 1, 2, 3, 7, 65), max_q=40):
    K = draw(st.integers(1, 4))
    S = draw(st.integers(1, max_s))
    U = draw(st.sampled_from(units))
    P = draw(st.sampled_from([1, 2, 3, 5]))
    q = draw(st.integers(1, max_q))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(K, S, U, P, generator=gen)
    if draw(st.booleans()):
        x = x.round()  # ties
    if draw(st.booleans()) and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=gen)
        flat[idx] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x = x.to(dtype)
    if draw(st.booleans()):
        x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # non-contiguous
    counts = torch.randint(1, S + 1, (K,), generator=gen)
    return x, counts, q


@st.composite
def sketches(draw, max_k=7, qs=(1, 3, 32, 600)):  # Q = 600: more than one staged chunk
    K = draw(st.integers(2, max_k))
    U = draw(st.sampled_from([0, 1, 3, 10]))
    P = draw(st.sampled_from([1, 2, 5]))
    Q = draw(st.sampled_from(qs))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sk = torch.randn(K, U, P, Q, generator=gen).sort(dim=-1).values
    if draw(st.booleans()):
        sk = sk.round()
    if draw(st.integers(0, 4)) == 0 and sk.numel():
        sk.view(-1)[torch.randint(0, sk.numel(), (1,), generator=gen)] = float("nan")
    sk = sk.to(dtype)
    if draw(st.booleans()):
        sk = sk.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    return sk


@st.composite
def groups(draw, sides=(0, 1, 2, 5, 17, 64, 65, 300)):
    sizes = draw(st.lists(st.sampled_from(sides), min_size=1, max_size=6))
    N = sum(sizes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["float", "ties", "tiny_diff"]))
    if kind == "ties":
        u = torch.randint(0, 5, (N,), generator=gen).double()
        r = torch.randint(-3, 3, (N,), generator=gen).double()
    elif kind == "tiny_diff":  # equal top bits, different low bits: the radix fix-up path
        u = 1.0 + torch.randint(0, 50, (N,), generator=gen).double() * 1e-15
        r = -1.0 - torch.randint(0, 50, (N,), generator=gen).double() * 1e-15
    else:
        u = torch.randn(N, generator=gen, dtype=torch.float64)
        r = torch.randn(N, generator=gen, dtype=torch.float64).exp()
    if draw(st.booleans()) and N:
        u[torch.randint(0, N, (2,), generator=gen)] = float("nan")
        r[torch.randint(0, N, (1,), generator=gen)] = -0.0
    if draw(st.booleans()):
        u, r = u.float(), r.float()
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes).cumsum(0)
    return u, r, offsets


ALPHAS = torch.tensor([0.0, 0.001, 0.01, 0.05, 0.1, 1 / 3, 0.5, 0.99, 1.0, 2.0, float("nan")],
                      dtype=torch.float64)


def rewrite_safetensors(src, dst, edit_tensors=None, edit_header=None):
    """Copy a saved book / plan file, changing its tensors and/or header (what a corrupt file
    holds): ``edit_tensors(dict)`` and ``edit_header(dict)`` edit in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    save_file(tensors, str(dst), metadata=header)
    return dst
