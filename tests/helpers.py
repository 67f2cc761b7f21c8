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
    """Conv/Linear MACs of one forward on x (batch 1): weight numel x output positions."""
    total = [0]

    def hook(m, i, o):
        units = o.shape[1] if isinstance(m, nn.Conv2d) else o.shape[-1]
        total[0] += m.weight.numel() * (o.numel() // (o.shape[0] * units))

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
                n_inner=48, ffn_dim=48, num_layers=2, d_model=32, moe_intermediate_size=16,
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
    "dbrx": dict(ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 6, "moe_top_k": 2},
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0}, max_seq_len=64),
    "deepseek_v2": dict(head_dim=4),
    "deepseek_v3": dict(head_dim=4),
}


def tiny_lm(model_type, seed=0, perturb=True, **overrides):
    """A random 2-layer model of ``model_type`` with widths from LM_SMALL, weights perturbed so
    norms, biases and near-zero inits are not trivial (else pruned == masked compares little)."""
    from fair_pruner.llm import transformers_module
    tf = transformers_module()
    over = {**LM_OVERRIDES.get(model_type, {}), **overrides}
    # nested sub-configs (DBRX) go to the constructor; plain fields are set after
    cfg = tf.AutoConfig.for_model(model_type, **{k: v for k, v in over.items()
                                                 if isinstance(v, dict)})
    for k, v in {**LM_SMALL, **over}.items():
        if not isinstance(v, dict) and hasattr(cfg, k):
            try:
                setattr(cfg, k, v)
            except (AttributeError, TypeError):
                pass
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
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
