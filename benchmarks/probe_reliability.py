"""Reliability probe (issue 14): bad inputs, odd models, files and native ops, each case in its
own process, through the public API only, the way a new user would hit them.

    python benchmarks/probe_reliability.py            # all cases, 2 at a time
    python benchmarks/probe_reliability.py -k plan    # cases whose name contains "plan"
    python benchmarks/probe_reliability.py -v         # also print each case's last line

Each case either finishes and checks its own result (``ok()`` or ``wrong(why)``) or raises.
Outcome classes, counted in the summary:
  ok        finished, and the result is right (pruned == masked, plan == real params, ...)
  clear     a fair_pruner.FairPrunerError subclass (or FileNotFoundError) naming the problem
  RAW       any other exception: a traceback from inside, not a clear error
  WRONG     finished with a wrong result and no error (the worst kind)
  CRASH     the process died without a Python exception (segfault, abort, sanitizer report)
  HANG      did not finish within the per-case timeout
Exit status 0 when no case is WRONG, CRASH or HANG and at most 3 are RAW.
Native memory safety is checked separately by benchmarks/asan_check.sh (CI runs it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = r'''
import json, math, os, sys, copy
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
import fair_pruner as fp
torch.manual_seed(0)
KW = dict(samples_per_class=3, projections=4, progress=False)

class _Done(BaseException):
    pass

def ok(note=""):
    print("@@OK", note); sys.stdout.flush(); raise _Done

def wrong(why):
    print("@@WRONG", why); sys.stdout.flush(); raise _Done

def loader(shape=(3, 8, 8), n=24, classes=4, bs=8, seed=0, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (torch.arange(n) % classes).to(label_dtype)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]

def jitter(model, seed=0):
    """Non-trivial weights and BN statistics everywhere (zero heads hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()

def cnn(nc=4):
    return jitter(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, nc)))

def params(m):
    return sum(p.numel() for p in m.parameters())

def exact(model, ld, x, target=0.3, **score_kw):
    """score -> allocate -> prune; ok() when pruned == masked and plan params == real."""
    book = fp.score(model, ld, **{**KW, **score_kw})
    plan = fp.allocate(book, params=target)
    pruned, masked = fp.prune(model, plan), fp.mask(model, plan, book)
    with torch.no_grad():
        a, b = pruned(x), masked(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    if a.shape != b.shape:
        wrong(f"pruned output shape {tuple(a.shape)} != masked {tuple(b.shape)}")
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-3))
    if err > 1e-4:
        wrong(f"pruned != masked (relative {err:.2e})")
    if params(pruned) != plan.params_after:
        wrong(f"plan params {plan.params_after} != real {params(pruned)}")
    if sum(len(v) for v in plan.removed.values()) == 0:
        wrong("nothing was pruned, so nothing was compared")
    ok(f"pruned == masked ({err:.1e}), {params(pruned)} params as planned")

def book_and_plan(model=None):
    model = model or cnn()
    book = fp.score(model, loader(), **KW)
    return model, book, fp.allocate(book, params=0.3)

def rewrite_book(book, path, edit_tensors=None, edit_header=None):
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
    from helpers import rewrite_safetensors
    book.save(path + ".orig")
    return rewrite_safetensors(path + ".orig", path, edit_tensors, edit_header)

def tiny_lm(vocab=64):
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m

def tokens(n=4, b=2, t=16, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (b, t), generator=g)} for _ in range(n)]

LMKW = dict(classes=4, samples_per_class=2, projections=2, progress=False)
'''

# name -> code. The code runs after PRELUDE in a fresh process whose working directory is an
# empty temporary directory (PROBE_DIR in the environment is another one for files).
CASES = {}


def case(name, code):
    assert name not in CASES, name
    CASES[name] = textwrap.dedent(code)


# ---------------------------------------------------------------- silently wrong, class 1: heads
case("head_log_softmax_with_aux", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.conv = nn.Conv2d(3, 6, 3, padding=1)
        s.fc = nn.Linear(6, 4); s.aux = nn.Linear(6, 4)
    def forward(s, x):
        h = F.relu(s.conv(x)).mean((2, 3))
        return F.log_softmax(s.fc(h), -1), s.aux(h)
m = jitter(M())
book = fp.score(m, loader((3, 6, 6)), **KW)
p = fp.prune(m, fp.allocate(book, params=0.3))
if p.fc.out_features != 4: wrong(f"real head pruned to {p.fc.out_features} classes")
ok()
''')
case("head_temperature", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.conv = nn.Conv2d(3, 6, 3, padding=1)
        s.fc = nn.Linear(6, 4); s.proj = nn.Linear(6, 4)
    def forward(s, x):
        h = F.relu(s.conv(x)).mean((2, 3))
        return s.fc(h) / 2.0 + 0.5 * s.proj(h)
m = jitter(M())
book = fp.score(m, loader((3, 6, 6)), **KW)
p = fp.prune(m, fp.allocate(book, params=0.3))
if p.fc.out_features != 4 or p.proj.out_features != 4: wrong("an output layer was pruned")
ok()
''')
DICT_MODEL = '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.c0 = nn.Conv2d(3, 5, 3, padding=1); s.c1 = nn.Conv2d(5, 6, 3, padding=1)
        s.fc = nn.Linear(6, 4)
    def forward(s, x):
        h = F.relu(s.c1(F.relu(s.c0(x)))).mean((2, 3))
        return {"features": h, KEY: s.fc(h)}
'''
case("head_dict_without_logits", DICT_MODEL.replace("KEY", '"scores"') + '''
fp.score(jitter(M()), loader((3, 6, 6)), **KW)
wrong("features were taken as logits")
''')
case("head_dict_with_logits", DICT_MODEL.replace("KEY", '"logits"') + '''
m = jitter(M())
book = fp.score(m, loader((3, 6, 6)), **KW)
p = fp.prune(m, fp.allocate(book, params=0.3))
if p.fc.out_features != 4: wrong("head pruned")
ok()
''')

# ------------------------------------------------- silently wrong, class 2: U over extra passes
MLP = '''
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).eval()
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(30, 5, generator=g), torch.arange(30) % 3
LD = [(X[i:i + 6], Y[i:i + 6]) for i in range(0, 30, 6)]
'''
case("passes_match_one_pass", MLP + '''
a = fp.score(mlp(), LD, memory_budget=200, **KW); b = fp.score(mlp(), LD, **KW)
if a.meta["u_passes"] < 2: wrong("the budget did not force extra passes")
for ga, gb in zip(a.groups, b.groups):
    if not torch.allclose(ga.u, gb.u): wrong(f"U differs across pass counts in {ga.name}")
ok()
''')
case("passes_loader_shrinks", MLP + '''
class Shrink:
    def __init__(s): s.n = 0
    def __iter__(s):
        s.n += 1; return iter(LD if s.n == 1 else LD[:2])
b = fp.score(mlp(), Shrink(), memory_budget=200, **KW)
wrong(f"accepted; U max {max(float(g.u.abs().max()) for g in b.groups):.3g}")
''')
case("passes_augmenting_loader", MLP + '''
class Aug:
    def __init__(s): s.n = 0
    def __iter__(s):
        s.n += 1; return iter([(x + 0.01 * torch.randn_like(x), y) for x, y in LD])
fp.score(mlp(), Aug(), memory_budget=200, **KW)
wrong("inputs that change between passes were accepted")
''')
case("passes_one_shot_generator", MLP + '''
fp.score(mlp(), (b for b in LD), memory_budget=200, **KW)
wrong("a one-shot generator was re-iterated silently")
''')
for _name, _v in [("negative", "-1"), ("nan", "float('nan')"), ("zero", "0")]:
    case(f"memory_budget_{_name}", MLP + f'''
fp.score(mlp(), LD, memory_budget={_v}, **KW)
wrong("memory_budget={_v} accepted")
''')

# ---------------------------------------------------------- silently wrong, class 3: native ops
case("allocate_experts_cap_1_5", '''
_, book, _ = book_and_plan()
fp.allocate(book, experts=0.3, tod=0.1, cap=1.5)
wrong("cap=1.5 accepted")
''')
case("ops_tod_select_cap_1_5", '''
from fair_pruner import ops
ov = torch.rand(10, dtype=torch.float64); off = torch.tensor([0, 4, 10])
ops.tod_select(ov, off, torch.tensor([0.5, 0.5], dtype=torch.float64), 1.5)
wrong("cap 1.5 accepted by ops.tod_select")
''')
case("ops_tod_select_bad_offsets", '''
from fair_pruner import ops
ov = torch.rand(10, dtype=torch.float64)
ops.tod_select(ov, torch.tensor([0, 12]), torch.tensor([0.5], dtype=torch.float64), 0.9)
wrong("offsets beyond the data accepted")
''')
case("ops_tod_overlap_vs_reference", '''
from fair_pruner import ops
torch.manual_seed(3)
for n in [(1,), (2, 3), (17, 0, 5), (300, 65)]:
    off = torch.tensor([0] + list(np.cumsum(n)))
    u = torch.rand(int(off[-1]), dtype=torch.float64)[::1]; r = torch.rand(int(off[-1]), dtype=torch.float64)
    a = ops.tod_overlap(u, r, off); b = ops.tod_overlap_ref(u, r, off)
    if not torch.equal(a, b): wrong(f"tod_overlap != reference for sizes {n}")
ok()
''')
case("ops_unit_stats_fp16_noncontiguous", '''
from fair_pruner import ops
torch.manual_seed(0)
z = torch.randn(7, 5, 9).half().transpose(0, 2); g = torch.randn(7, 5, 9).half().transpose(0, 2)
a = ops.unit_stats(z, g, 1); b = ops.unit_stats_ref(z.float(), g.float(), 1)
if not torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2): wrong("unit_stats fp16 differs")
ok()
''')
case("ops_gram_empty", '''
from fair_pruner import ops
a = ops.gram(torch.zeros(0, 5))
if a.shape != (5, 5) or a.abs().sum() != 0: wrong(f"gram of no rows: {a}")
ok()
''')

# ------------------------------------------------- silently wrong, class 4-7: model layer types
case("multihead_attention", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.inp = nn.Linear(6, 16); s.att = nn.MultiheadAttention(16, 2, batch_first=True)
        s.fc = nn.Linear(16, 4)
    def forward(s, x):
        h = s.inp(x); h = s.att(h, h, h)[0]; return s.fc(h.mean(1))
m = jitter(M()); exact(m, loader((5, 6)), torch.randn(3, 5, 6))
''')
case("transformer_encoder", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.inp = nn.Linear(6, 16)
        s.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        s.fc = nn.Linear(16, 4)
    def forward(s, x):
        return s.fc(s.enc(s.inp(x)).mean(1))
m = jitter(M()); exact(m, loader((5, 6)), torch.randn(3, 5, 6))
''')
case("conv_transpose2d", '''
m = jitter(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)))
exact(m, loader(), torch.randn(3, 3, 8, 8))
''')
for _rnn in ("LSTM", "GRU", "RNN"):
    case(f"recurrent_{_rnn.lower()}", f'''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.inp = nn.Linear(6, 10); s.rnn = nn.{_rnn}(10, 12, batch_first=True)
        s.fc = nn.Linear(12, 4)
    def forward(s, x):
        return s.fc(s.rnn(s.inp(x))[0][:, -1])
exact(jitter(M()), loader((5, 6)), torch.randn(3, 5, 6))
''')
case("shared_weights_tied", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(6, 6); s.b = nn.Linear(6, 6); s.b.weight = s.a.weight
        s.fc = nn.Linear(6, 4)
    def forward(s, x):
        return s.fc(F.relu(s.b(F.relu(s.a(x)))))
exact(jitter(M()), loader((6,)), torch.randn(3, 6))
''')
case("module_called_twice", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(6, 9); s.b = nn.Linear(9, 9); s.fc = nn.Linear(9, 4)
    def forward(s, x):
        h = F.relu(s.a(x)); h = F.relu(s.b(h)); h = F.relu(s.b(h)); return s.fc(h)
exact(jitter(M()), loader((6,)), torch.randn(3, 6))
''')
case("conv1d", '''
m = jitter(nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4)))
exact(m, loader((3, 12)), torch.randn(3, 3, 12))
''')
case("conv3d", '''
m = jitter(nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(), nn.Conv3d(6, 6, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 4)))
exact(m, loader((2, 5, 5, 5)), torch.randn(3, 2, 5, 5, 5))
''')
case("depthwise_conv", '''
m = jitter(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4)))
exact(m, loader(), torch.randn(3, 3, 8, 8))
''')
case("embedding_bag_model", '''
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.emb = nn.Embedding(20, 8); s.h = nn.Linear(8, 12); s.fc = nn.Linear(12, 4)
    def forward(s, x):
        return s.fc(F.relu(s.h(s.emb(x).mean(1))))
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 20, (24, 5), generator=g); y = torch.arange(24) % 4
exact(jitter(M()), [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)], torch.randint(0, 20, (3, 5)))
''')
case("group_norm", '''
m = jitter(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
exact(m, loader(), torch.randn(3, 3, 8, 8))
''')
case("layer_norm_mlp", '''
m = jitter(nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 4)))
exact(m, loader((6,)), torch.randn(3, 6))
''')
case("residual_cnn", '''
class B(nn.Module):
    def __init__(s):
        super().__init__(); s.c1 = nn.Conv2d(8, 8, 3, padding=1); s.b1 = nn.BatchNorm2d(8)
        s.c2 = nn.Conv2d(8, 8, 3, padding=1); s.b2 = nn.BatchNorm2d(8)
    def forward(s, x): return F.relu(x + s.b2(s.c2(F.relu(s.b1(s.c1(x))))))
m = jitter(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), B(), B(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
exact(m, loader(), torch.randn(3, 3, 8, 8))
''')
case("torchvision_resnet18", '''
import torchvision
exact(jitter(torchvision.models.resnet18(num_classes=4)), loader((3, 32, 32)), torch.randn(2, 3, 32, 32))
''')
case("torchvision_vit", '''
import torchvision
m = jitter(torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                               hidden_dim=32, mlp_dim=48, num_classes=4))
exact(m, loader((3, 32, 32)), torch.randn(2, 3, 32, 32))
''')

# -------------------------------------------------------- silently wrong, class 5: plan indices
for _name, _idx in [("repeated", "[2, 2, 2]"), ("beyond", "[0, 1, 99]"), ("negative", "[-1]"),
                    ("every_unit", "list(range(8))"), ("float", "[1.0]")]:
    case(f"plan_indices_{_name}", f'''
m, book, plan = book_and_plan()
name = book.groups[0].name
plan.removed[name] = {_idx}
fp.prune(m, plan)
wrong("prune accepted removed = {_idx}")
''')
case("plan_sizes_edited", '''
m, book, plan = book_and_plan()
plan.sizes[book.groups[0].name] += 3
fp.prune(m, plan)
wrong("a plan whose sizes do not match the model was accepted")
''')
case("plan_of_another_model", '''
_, _, plan = book_and_plan()
other = jitter(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
fp.prune(other, plan)
wrong("a plan of another model was applied")
''')

# ------------------------------------------------------ silently wrong, class 8: score book file
case("book_round_trip", '''
m, book, plan = book_and_plan()
p = os.path.join(os.environ["PROBE_DIR"], "b.safetensors"); book.save(p)
if fp.allocate(fp.ScoreBook.load(p), params=0.3).removed != plan.removed: wrong("plan changed after reload")
ok()
''')
for _name, _edit in [
        ("nan_score", "t['g0.u'] = t['g0.u'].clone().index_fill_(0, torch.tensor([0]), float('nan'))"),
        ("short_signal", "t['g0.u'] = t['g0.u'][:-1].clone()"),
        ("zeroed_cost", "t['cost.const'] = torch.zeros_like(t['cost.const']); "
                        "t['cost.c_width'] = torch.zeros_like(t['cost.c_width'])")]:
    case(f"book_file_{_name}", f'''
m, book, plan = book_and_plan()
def edit(t): {_edit}
p = rewrite_book(book, os.path.join(os.environ["PROBE_DIR"], "b.safetensors"), edit_tensors=edit)
b = fp.ScoreBook.load(p)
new = fp.allocate(b, params=0.3)
wrong(f"a damaged book was loaded and allocated ({{sum(map(len, new.removed.values()))}} units)")
''')
case("book_file_broken_json", '''
m, book, plan = book_and_plan()
def edit(h): h["groups"] = h["groups"][:-5]
fp.ScoreBook.load(rewrite_book(book, os.path.join(os.environ["PROBE_DIR"], "b.safetensors"), edit_header=edit))
wrong("broken JSON accepted")
''')
case("book_file_renamed_key", '''
m, book, plan = book_and_plan()
def edit(h): h["groups"] = h["groups"].replace('"name"', '"nom"')
fp.ScoreBook.load(rewrite_book(book, os.path.join(os.environ["PROBE_DIR"], "b.safetensors"), edit_header=edit))
wrong("renamed keys accepted")
''')
case("book_file_not_a_book", '''
p = os.path.join(os.environ["PROBE_DIR"], "x.safetensors"); open(p, "wb").write(b"hello world")
fp.ScoreBook.load(p)
wrong("garbage accepted as a book")
''')
case("book_file_missing", '''
fp.ScoreBook.load(os.path.join(os.environ["PROBE_DIR"], "nothing.safetensors"))
wrong("a missing file loaded")
''')
case("mask_with_book_of_another_model", '''
m, book, plan = book_and_plan()
other = cnn(); other[0] = nn.Conv2d(3, 8, 5, padding=2)
_, book2, _ = book_and_plan(jitter(other))
fp.mask(m, plan, book2)
wrong("mask accepted a book of another model")
''')
case("prune_with_book_of_another_model", '''
m, book, plan = book_and_plan()
other = cnn(); other[0] = nn.Conv2d(3, 8, 5, padding=2)
_, book2, _ = book_and_plan(jitter(other))
fp.prune(m, plan, book=book2)
wrong("prune accepted a book of another model")
''')

# ------------------------------------------------------------ silently wrong, class 9: targets
case("tod_true", '''
_, book, _ = book_and_plan(); fp.allocate(book, tod=True); wrong("tod=True accepted")
''')
case("params_true", '''
_, book, _ = book_and_plan(); fp.allocate(book, params=True); wrong("params=True accepted")
''')
case("numpy_float_target", '''
_, book, plan = book_and_plan()
if fp.allocate(book, params=np.float32(0.3)).removed != plan.removed: wrong("np.float32 target gave another plan")
ok()
''')
case("params_above_one", '''
_, book, _ = book_and_plan(); fp.allocate(book, params=1.5); wrong("params=1.5 accepted")
''')
case("params_nan", '''
_, book, _ = book_and_plan(); fp.allocate(book, params=float("nan")); wrong("params=nan accepted")
''')
case("unknown_strategy", '''
_, book, _ = book_and_plan(); fp.allocate(book, params=0.3, strategy="magic"); wrong("accepted")
''')
case("round_to_zero", '''
_, book, _ = book_and_plan(); fp.allocate(book, params=0.3, round_to=0); wrong("round_to=0 accepted")
''')
case("two_targets", '''
_, book, _ = book_and_plan(); fp.allocate(book, params=0.3, flops=0.3); wrong("two targets accepted")
''')
case("params_zero_prunes_nothing", '''
m, book, _ = book_and_plan(); plan = fp.allocate(book, params=0.0)
if any(plan.removed.values()): wrong("params=0 removed units")
if params(fp.prune(m, plan)) != params(m): wrong("params changed")
ok()
''')

# ---------------------------------------------------------- silently wrong, class 10: files
case("file_mode_book_plan_plot", '''
import stat
os.umask(0o022)
m, book, plan = book_and_plan()
d = os.environ["PROBE_DIR"]; modes = {}
bp = os.path.join(d, "b.safetensors"); open(bp, "w").close(); os.chmod(bp, 0o644)
book.save(bp); modes["book"] = stat.S_IMODE(os.stat(bp).st_mode)
pp = os.path.join(d, "p.json"); plan.save(pp); modes["plan"] = stat.S_IMODE(os.stat(pp).st_mode)
q = os.path.join(d, "p.png"); plan.plot(q); modes["plot"] = stat.S_IMODE(os.stat(q).st_mode)
bad = {k: oct(v) for k, v in modes.items() if v != 0o644}
if bad: wrong(f"modes {bad} (umask 022 expects 0o644)")
left = [n for n in os.listdir(d) if n.startswith(".tmp")]
if left: wrong(f"temporary files left: {left}")
ok(str({k: oct(v) for k, v in modes.items()}))
''')
case("save_failure_leaves_no_tmp", '''
m, book, plan = book_and_plan()
d = os.environ["PROBE_DIR"]; import safetensors.torch as st
real = st.save_file
def boom(t, path, metadata=None):
    open(path, "wb").write(b"partial"); raise OSError("disk full")
st.save_file = boom
try:
    book.save(os.path.join(d, "b.safetensors"))
except OSError:
    pass
left = os.listdir(d)
if left: wrong(f"left behind: {left}")
ok()
''')
case("nothing_written_to_cwd", '''
m, book, plan = book_and_plan(); fp.prune(m, plan); fp.mask(m, plan, book)
left = os.listdir(".")
if left: wrong(f"wrote {left} to the working directory")
ok()
''')
case("caller_model_untouched", '''
m = cnn(); before = {k: v.clone() for k, v in m.state_dict().items()}
book = fp.score(m, loader(), **KW); plan = fp.allocate(book, params=0.3); fp.prune(m, plan); fp.mask(m, plan, book)
for k, v in m.state_dict().items():
    if not torch.equal(v, before[k]): wrong(f"{k} changed")
if m.training: wrong("mode changed")
ok()
''')
case("deterministic_books", '''
m = cnn(); a = fp.score(m, loader(), seed=3, **KW); b = fp.score(copy.deepcopy(m), loader(), seed=3, **KW)
for ga, gb in zip(a.groups, b.groups):
    for s in ga.signals:
        if not torch.equal(ga.signals[s], gb.signals[s]): wrong(f"{ga.name}.{s} differs")
ok()
''')

# ------------------------------------------------------------------- raw tracebacks: CNN inputs
case("labels_int32", '''
m = cnn(); a = fp.score(m, loader(label_dtype=torch.int32), **KW); b = fp.score(m, loader(), **KW)
if any(not torch.equal(x.u, y.u) for x, y in zip(a.groups, b.groups)): wrong("int32 labels gave another book")
ok()
''')
case("labels_uint8", '''
fp.score(cnn(), loader(label_dtype=torch.uint8), **KW); ok()
''')
case("labels_float", '''
fp.score(cnn(), loader(label_dtype=torch.float32), **KW); wrong("float labels accepted")
''')
case("label_count_mismatch", '''
ld = [(x, y[:-1]) for x, y in loader()]
fp.score(cnn(), ld, **KW); wrong("accepted")
''')
case("label_out_of_range", '''
ld = [(x, y + 10) for x, y in loader()]
fp.score(cnn(), ld, **KW); wrong("accepted")
''')
case("unlabelled_batches", '''
fp.score(cnn(), [x for x, _ in loader()], **KW); wrong("accepted")
''')
case("empty_loader", '''
fp.score(cnn(), [], **KW); wrong("accepted")
''')
case("nan_inputs", '''
ld = loader(); ld[0][0][0, 0, 0, 0] = float("nan")
fp.score(cnn(), ld, **KW); wrong("NaN inputs accepted")
''')
case("model_fails_on_data", '''
fp.score(cnn(), loader((5, 8, 8)), **KW); wrong("accepted")
''')
case("bn_train_batch_1", '''
fp.score(cnn(), loader(bs=1), bn_mode="train", **KW); ok("scored")
''')
case("bn_mode_unknown", '''
fp.score(cnn(), loader(), bn_mode="frozen", **KW); wrong("accepted")
''')
case("device_cuda_without_gpu", '''
if torch.cuda.is_available(): ok("has a GPU: not applicable")
fp.score(cnn(), loader(), device="cuda", **KW); wrong("accepted")
''')
case("meta_tensors", '''
with torch.device("meta"):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
fp.score(m, loader(), **KW); wrong("meta model accepted")
''')
case("unknown_ignore_name", '''
fp.score(cnn(), loader(), ignore=["nope"], **KW); wrong("accepted")
''')
case("samples_per_class_zero", '''
fp.score(cnn(), loader(), samples_per_class=0, projections=4, progress=False); wrong("accepted")
''')
case("not_a_module", '''
fp.score(lambda x: x, loader(), **KW); wrong("accepted")
''')
case("prune_not_a_plan", '''
fp.prune(cnn(), {"a": [1]}); wrong("accepted")
''')
case("plan_load_garbage", '''
p = os.path.join(os.environ["PROBE_DIR"], "p.json"); open(p, "w").write("{not json")
fp.Plan.load(p); wrong("accepted")
''')
case("plan_load_wrong_json", '''
p = os.path.join(os.environ["PROBE_DIR"], "p.json"); open(p, "w").write(json.dumps({"removed": 3}))
fp.Plan.load(p); wrong("accepted")
''')
case("plan_load_missing", '''
fp.Plan.load(os.path.join(os.environ["PROBE_DIR"], "none.json")); wrong("accepted")
''')

# ------------------------------------------------------------------------ raw tracebacks: LLM
case("llm_token_id_beyond_vocab", '''
t = tokens(); t[1]["input_ids"][0, 3] = 64 + 5
fp.score(tiny_lm(), t, **LMKW); wrong("accepted")
''')
case("llm_pipeline_exact", '''
m = tiny_lm(); book = fp.score(m, tokens(), **LMKW); plan = fp.allocate(book, params=0.3)
p, mk = fp.prune(m, plan), fp.mask(m, plan)
x = tokens(1, seed=9)[0]["input_ids"]
with torch.no_grad(): a, b = p(x).logits, mk(x).logits
err = float((a - b).abs().max() / b.abs().max())
if err > 1e-4: wrong(f"pruned != masked ({err:.1e})")
# LLM plans count the attention+MLP parameters (embeddings, norms and head are never pruned)
if params(m) - params(p) != plan.params_before - plan.params_after:
    wrong(f"plan removes {plan.params_before - plan.params_after} params, real {params(m) - params(p)}")
d = os.path.join(os.environ["PROBE_DIR"], "lm"); fp.llm.save_pretrained(p, d)
import transformers as tf
q = fp.llm.from_pretrained(d)
with torch.no_grad(): c = q(x).logits
if not torch.allclose(a, c, atol=1e-5): wrong("reloaded model differs")
ok(f"{err:.1e}")
''')
case("llm_empty_text_batches", '''
fp.score(tiny_lm(), [{"input_ids": torch.zeros(2, 0, dtype=torch.long)}], **LMKW); wrong("accepted")
''')
case("cli_prune_lm_not_a_model", '''
from fair_pruner.cli import main
d = os.path.join(os.environ["PROBE_DIR"], "d"); os.mkdir(d)
txt = os.path.join(os.environ["PROBE_DIR"], "c.txt"); open(txt, "w").write("some text " * 50)
rc = main(["prune-lm", d, "--calib-text", txt, "--out", os.path.join(os.environ["PROBE_DIR"], "o"), "--params", "0.2", "-q"])
if rc == 0: wrong("exit 0")
ok(f"exit {rc}")
''')
case("cli_prune_lm_not_gguf", '''
from fair_pruner.cli import main
g = os.path.join(os.environ["PROBE_DIR"], "m.gguf"); open(g, "wb").write(b"not a gguf")
txt = os.path.join(os.environ["PROBE_DIR"], "c.txt"); open(txt, "w").write("some text " * 50)
rc = main(["prune-lm", g, "--calib-text", txt, "--out", os.path.join(os.environ["PROBE_DIR"], "o"), "--params", "0.2", "-q"])
if rc == 0: wrong("exit 0")
ok(f"exit {rc}")
''')
case("cli_unknown_command", '''
from fair_pruner.cli import main
try:
    rc = main(["frobnicate"])
except SystemExit as e:
    rc = e.code
if rc == 0: wrong("exit 0")
ok(f"exit {rc}")
''')


def run_case(name, code, timeout, verbose):
    """One case in a fresh interpreter, in an empty working directory."""
    wrapped = PRELUDE + "\ntry:\n" + textwrap.indent(code, "    ") + textwrap.dedent('''
        print("@@NORESULT")
    except _Done:
        pass
    except (fp.FairPrunerError, FileNotFoundError) as e:
        print("@@CLEAR", type(e).__name__ + ": " + str(e).splitlines()[0][:160])
    except BaseException as e:
        import traceback
        tb = traceback.extract_tb(e.__traceback__)[-1]
        print("@@RAW", type(e).__name__ + ": " + str(e).splitlines()[0][:120]
              + f" [{os.path.basename(tb.filename)}:{tb.lineno}]")
    ''')
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PROBE_DIR": tmp, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
               "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-c", wrapped], cwd=cwd, env=env, timeout=timeout,
                               capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return name, "HANG", f"no result in {timeout} s", time.perf_counter() - t0
        dt = time.perf_counter() - t0
        lines = [l for l in r.stdout.splitlines() if l.startswith("@@")]
        if r.returncode != 0 or not lines:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            return name, "CRASH", f"exit {r.returncode}: {tail[:160]}", dt
        tag, _, msg = lines[-1][2:].partition(" ")
        outcome = {"OK": "ok", "CLEAR": "clear", "RAW": "RAW", "WRONG": "WRONG",
                   "NORESULT": "WRONG"}[tag]
        if tag == "NORESULT":
            msg = "the case finished without checking its result"
        return name, outcome, msg, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("-j", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    ap.add_argument("-v", action="store_true", help="print every case's message")
    a = ap.parse_args(argv)
    todo = {n: c for n, c in CASES.items() if a.k in n}
    t0 = time.perf_counter()
    results = []
    with cf.ThreadPoolExecutor(a.j) as ex:
        futs = [ex.submit(run_case, n, c, a.timeout, a.v) for n, c in todo.items()]
        for f in cf.as_completed(futs):
            name, outcome, msg, dt = f.result()
            results.append((name, outcome, msg))
            print(f"{outcome:6s} {name:38s} {dt:5.1f}s  {msg if a.v or outcome not in ('ok', 'clear') else ''}",
                  flush=True)
    counts = {k: sum(o == k for _, o, _ in results) for k in
              ("ok", "clear", "RAW", "WRONG", "CRASH", "HANG")}
    print(f"\n{len(results)} cases in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))
    bad = counts["WRONG"] + counts["CRASH"] + counts["HANG"]
    return 0 if bad == 0 and counts["RAW"] <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
