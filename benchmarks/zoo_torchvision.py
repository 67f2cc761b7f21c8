"""Every torchvision classifier through score -> allocate -> prune, checked like a new user
would hope (issue 12): pruned == masked, plan params / MACs == the pruned model's.

    python benchmarks/zoo_torchvision.py                  # every classification model
    python benchmarks/zoo_torchvision.py -k resnet,regnet # names containing any of these
    python benchmarks/zoo_torchvision.py --json out.json
    python benchmarks/zoo_torchvision.py --timm           # 70 timm models (timm==1.0.31)
    python benchmarks/zoo_torchvision.py --budget --bn-from-data --json budget.json
                          # fp.score's defaults at 224x224: time and peak RSS vs fwd + bwd

Each model runs in its own process (random weights jittered so that zero-initialised heads,
tiny layer scales and default BN statistics cannot hide a difference; 10 classes, 20 images,
2 samples per class, 8 projections, 64x64 inputs unless the model needs another size), with a
wall-clock limit per model. Outcomes:
  exact    pruned == masked (1e-4 of the output scale, in float64), plan params and MACs == the pruned
           model's, something removed
  refused  a fair_pruner.FairPrunerError before pruning (the model or a layer it cannot prune
           exactly, named in the message)
  WRONG    pruned != masked, or counts differ, with no error
  RAW      any other exception
  LIMIT    past the time limit or killed (memory)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56, "timm:levit_128s": 224,
         "timm:inception_v3": 96, "timm:coatnet_0_rw_224": 224, "timm:maxvit_tiny_rw_224": 224,
         "timm:swin_tiny_patch4_window7_224": 224, "timm:xcit_nano_12_p16_224": 64,
         "timm:efficientformer_l1": 224,
         "timm:swin_small_patch4_window7_224": 224, "timm:swinv2_tiny_window8_256": 256,
         "timm:maxvit_rmlp_pico_rw_256": 256, "timm:maxvit_tiny_tf_224": 224,
         "timm:gcvit_xxtiny": 224, "timm:coatnet_nano_rw_224": 224,
         "timm:vit_small_patch16_rope_224": 224, "timm:vit_medium_patch16_rope_reg1_gap_256": 256,
         "timm:eva02_tiny_patch14_224": 224}

# Diverse timm families (pretrained=False): residual, inverted residual, NAS, dense, grouped,
# ghost, CSP, RepVGG-style, ConvNeXt (v1 / v2), transformers and hybrids.
TIMM = ["resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnety_002",
        "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv2_100", "mnasnet_100",
        "mixnet_s", "ghostnet_100", "rexnet_100", "densenet121", "dla34", "dpn48b",
        "cspresnet50", "cspdarknet53", "hrnet_w18_small", "repvgg_a0", "vgg11_bn",
        "convnext_atto", "convnextv2_atto", "efficientformer_l1", "levit_128s", "edgenext_xx_small",
        "mobilevit_xxs", "deit_tiny_patch16_224", "vit_tiny_patch16_224", "poolformer_s12",
        "mixer_s16_224", "resmlp_12_224", "tf_efficientnetv2_b0", "lcnet_050", "fbnetc_100",
        # added 2026-12-02 (chosen before they were run): more NAS / mobile nets, VoVNet, SelecSLS,
        # Inception, GENet, MobileOne, CSP-3, Res2Net, SK / ECA / GC / ResNeSt attention,
        # normaliser-free, GhostNet-V2, MobileNet-V4, HGNet-V2, pre-activation ResNet
        "regnetx_002", "efficientnet_lite0", "mobilenetv3_large_100", "spnasnet_100",
        "hardcorenas_a", "tinynet_a", "selecsls42b", "ese_vovnet19b_dw", "inception_v3",
        "gernet_s", "mobileone_s0", "cs3darknet_s", "res2net50_14w_8s", "skresnet18",
        "ecaresnet26t", "nf_resnet26", "ghostnetv2_100", "legacy_seresnet18", "dla46_c",
        "mobilenetv4_conv_small", "hgnetv2_b0", "resnetv2_50", "gcresnet33ts", "resnest14d",
        # added 2026-12-03 with attention-head units: the ViT-B/16 and DeiT-S, DeiT-III
        # (layer scale), ViT-S
        "vit_base_patch16_224", "deit_small_patch16_224", "deit3_small_patch16_224",
        "vit_small_patch16_224",
        # added 2026-12-03 with timm Swin / Swin-V2 heads (graph.TimmWindowAttention(V2))
        "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swinv2_tiny_window8_256",
        # and timm MaxViT heads (graph.TimmAttentionCl: three position biases, both qkv layouts)
        "maxvit_tiny_rw_224", "maxvit_rmlp_pico_rw_256", "maxvit_tiny_tf_224",
        # a window attention still refused (GCViT's global query)
        "gcvit_xxtiny",
        # CoAtNet: NCHW attention with 1x1-conv q/k/v (graph.TimmAttention2d)
        "coatnet_nano_rw_224",
        # added 2026-12-04 with timm EVA heads (graph.TimmEvaAttention: RoPE, q/v biases):
        # timm's RoPE ViTs and EVA-02 (SwiGLU MLP)
        "vit_small_patch16_rope_224", "vit_medium_patch16_rope_reg1_gap_256",
        "eva02_tiny_patch14_224"]

BUILD = r'''
import json, sys, time, warnings
import torch, torch.nn as nn, torchvision
import fair_pruner as fp
sys.path.insert(0, sys.argv[3])
from helpers import count_macs, randomize_bn
warnings.simplefilter("ignore")
torch.set_num_threads(2)
name, size = sys.argv[1], int(sys.argv[2])
res = {"model": name, "size": size}
def done(**kw):
    res.update(kw); print("@@" + json.dumps(res)); sys.exit(0)
torch.manual_seed(0)
if name.startswith("timm:"):
    import timm
    res["timm"] = timm.__version__
    try:
        model = timm.create_model(name[5:], pretrained=False, num_classes=10, img_size=size)
    except TypeError:                      # convnets take no img_size
        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
else:
    kw = {"num_classes": 10}
    if name.startswith("vit_"):
        kw["image_size"] = size
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
    model = getattr(torchvision.models, name)(**kw)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        if p.is_floating_point():
            s = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * max(0.05, 0.1 * s))
model = randomize_bn(model)
res["params"] = sum(p.numel() for p in model.parameters())
x = torch.randn(20, 3, size, size, generator=g)
y = torch.arange(20) % 10
if "--bn-from-data" in sys.argv:
    # BN statistics of the data (as in a trained model): with default or random statistics a
    # deep random net's activations overflow (ResNet-101: inf gradients), which tells nothing.
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats(); m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1
model.eval()
loader = [(x[i:i + 10], y[i:i + 10]) for i in (0, 10)]
'''

CHECK = r'''
t0 = time.perf_counter()
try:
    book = fp.score(model, loader, samples_per_class=2, projections=8, progress=False)
except fp.FairPrunerError as e:
    done(outcome="refused", error=type(e).__name__, message=str(e)[:300],
         seconds=round(time.perf_counter() - t0, 1))
res["score_s"] = round(time.perf_counter() - t0, 1)
res["groups"] = len(book.groups)
res["skipped_groups"] = len(book.meta.get("skipped_groups", []))
res["interleaved_groups"] = sum(gr.spec.interleave > 1 for gr in book.groups)
try:
    plan = fp.allocate(book, params=0.3)
    pruned, masked = fp.prune(model, plan), fp.mask(model, plan, book)
except fp.FairPrunerError as e:
    done(outcome="refused", error=type(e).__name__, message=str(e)[:300], stage="surgery")
xe = torch.randn(2, 3, size, size, generator=g)


def in64(m):
    """m's output in float64, one model in float64 at a time (ViT-H: 5 GB each)."""
    with torch.no_grad():
        out = m.double()(xe.double())
    m.float()
    return out


real_p = sum(p.numel() for p in pruned.parameters())
real_m = count_macs(pruned, xe[:1])
# Compared in float64: in fp32 a deep net with jittered weights amplifies summation-order
# differences (EfficientNet-V2-L: 36% in fp32, 2e-7 in fp64).
with torch.no_grad():
    a, b = pruned(xe), masked(xe)
    err32 = float((a - b).abs().max() / b.abs().max().clamp(min=1e-3)) if a.shape == b.shape else None
    a, b = in64(pruned), in64(masked)
err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-3)) if a.shape == b.shape else None
res.update(rel_err=err, rel_err_fp32=err32, plan_params=plan.params_after, real_params=real_p,
           plan_macs=plan.flops_after, real_macs=real_m,
           removed=sum(len(v) for v in plan.removed.values()),
           heads_removed={gr.name: f"{len(plan.removed[gr.name])}/{gr.size}" for gr in book.groups
                          if gr.kind == "head"},
           params_removed=round(plan.params_reduction, 4))
bad = []
if err is None or not err <= 1e-4:
    bad.append(f"pruned != masked ({err})")
if real_p != plan.params_after:
    bad.append(f"params {real_p} != plan {plan.params_after}")
if real_m != plan.flops_after:
    bad.append(f"MACs {real_m} != plan {plan.flops_after}")
if res["removed"] == 0:
    bad.append("nothing removed")
if res["heads_removed"]:
    # Head groups are tier 1: a 30% target is met by neurons and channels alone. One alpha over
    # every group (tiers=False) cuts heads too: that plan is checked the same way.
    plan = fp.allocate(book, params=0.3, tiers=False)
    pruned, masked = fp.prune(model, plan), fp.mask(model, plan, book)
    real_p, real_m = sum(p.numel() for p in pruned.parameters()), count_macs(pruned, xe[:1])
    with torch.no_grad():
        a, b = in64(pruned), in64(masked)
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-3))
    heads = {gr.name: len(plan.removed[gr.name]) for gr in book.groups if gr.kind == "head"}
    res.update(one_alpha_rel_err=err, one_alpha_heads_removed=sum(heads.values()),
               heads_total=sum(gr.size for gr in book.groups if gr.kind == "head"))
    if not err <= 1e-4:
        bad.append(f"tiers=False: pruned != masked ({err})")
    if real_p != plan.params_after:
        bad.append("tiers=False: params differ from the plan")
    if real_m != plan.flops_after:
        bad.append("tiers=False: MACs differ from the plan")
done(outcome="WRONG" if bad else "exact", problems=bad)
'''

# --budget (issue 12, item 4): what scoring costs at 224x224 with fp.score's defaults, against a
# plain forward + backward over the same two batches (each in its own process, so that the peak
# RSS of one says nothing about the other). "peak" is ru_maxrss, the process's high-water mark.
BUDGET = r'''
import resource
import torch.nn.functional as F
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10     # MiB
res["peak_loaded_mib"] = peak()
if sys.argv[4] == "plain":
    t0 = time.perf_counter()
    for xb, yb in loader:
        F.cross_entropy(model(xb), yb, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    done(outcome="plain", seconds=round(time.perf_counter() - t0, 2), peak_mib=peak())
from fair_pruner import calibrate
phases = {}
def timed(fn, key):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            ph = phases.setdefault(key, {"s": 0.0})
            ph["s"] = round(ph["s"] + time.perf_counter() - t, 2)
            ph["peak_mib"] = peak()                     # high-water mark when the phase ended
    return wrapper
for fn, key in (("build_dependency_graph", "trace"), ("find_groups", "group_search"),
                ("build_cost_model", "cost_model"), ("check_exact", "exactness_check"),
                ("_pass_one", "pass_1"), ("_u_pass", "u_passes")):
    setattr(calibrate, fn, timed(getattr(calibrate, fn), key))
t0 = time.perf_counter()
try:
    book = fp.score(model, loader, progress=False)          # the defaults
except fp.FairPrunerError as e:
    done(outcome="refused", error=type(e).__name__, message=str(e)[:300],
         seconds=round(time.perf_counter() - t0, 1), peak_mib=peak(), phases=phases)
done(outcome="scored", seconds=round(time.perf_counter() - t0, 2), peak_mib=peak(),
     phases=phases, groups=len(book.groups), u_passes=book.meta["u_passes"])
'''


def run(name: str, limit: float, bn_from_data: bool = False, budget: str = "") -> dict:
    """One model in a fresh process: the exactness check, or with ``budget`` ("plain" /
    "score") the cost of a plain forward + backward / of fp.score at 224x224."""
    size = 224 if budget else SIZES.get(name, 64)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", BUILD + (BUDGET if budget else CHECK), name,
                            str(size), os.path.join(ROOT, "tests"), budget or "check"]
                           + (["--bn-from-data"] if bn_from_data else []),
                           capture_output=True, text=True,
                           timeout=limit, env={**os.environ, "PYTHONPATH": ROOT})
    except subprocess.TimeoutExpired:
        return {"model": name, "outcome": "LIMIT", "message": f"over {limit:.0f} s"}
    lines = [l for l in r.stdout.splitlines() if l.startswith("@@")]
    if lines:
        out = json.loads(lines[-1][2:])
    else:
        tail = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        out = {"model": name, "outcome": "LIMIT" if r.returncode < 0 else "RAW",
               "message": tail[:300]}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# The budget fp.score must stay under for every torchvision classifier at 224x224 with its
# defaults (stated before the run): half of this machine's 24 GiB, and the per-model --limit.
BUDGET_PEAK_MIB = 12 << 10


def budget(names, limit: float, bn_from_data: bool, out_json, resume: bool = False) -> int:
    rows = []
    if resume and out_json and os.path.exists(out_json):      # a long run, continued
        with open(out_json) as f:
            rows = json.load(f)
    have = {r["model"] for r in rows}
    for n in names:
        if n in have:
            continue
        plain = run(n, limit, bn_from_data, "plain")
        sc = run(n, limit, bn_from_data, "score")
        row = {"model": n, "params": sc.get("params", plain.get("params")), "plain": plain,
               "score": sc}
        ok = (sc["outcome"] == "scored" and sc.get("peak_mib", 1 << 40) <= BUDGET_PEAK_MIB)
        row["within_budget"] = ok
        rows.append(row)
        ph = sc.get("phases", {})
        ratio = (f"{sc['seconds'] / plain['seconds']:5.2f}x"
                 if sc.get("seconds") and plain.get("seconds") else "  -  ")
        print(f"{'ok  ' if ok else 'OVER'} {n:22s} {sc['outcome']:8s} "
              f"score {sc.get('seconds', float('nan')):7.1f}s ({ratio} plain "
              f"{plain.get('seconds', float('nan')):6.1f}s)  peak {sc.get('peak_mib', 0):6d} MiB "
              f"(plain {plain.get('peak_mib', 0):6d})  search "
              f"{ph.get('group_search', {}).get('s', 0):5.1f}s  check "
              f"{ph.get('exactness_check', {}).get('s', 0):5.1f}s  "
              f"{sc.get('message', '')[:100]}", flush=True)
        if out_json:                        # after every model: a long run keeps what it has
            with open(out_json, "w") as f:
                json.dump(rows, f, indent=1)
    over = [r["model"] for r in rows if not r["within_budget"]]
    print(f"\n{len(rows)} models, {len(rows) - len(over)} within budget"
          + (f"; over: {', '.join(over)}" if over else ""))
    return 1 if over else 0


def main(argv=None) -> int:
    import torchvision
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="comma-separated name fragments")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds per model")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--bn-from-data", action="store_true",
                    help="set BN statistics from the images (one train-mode pass) instead of "
                         "random ones: deep random nets overflow otherwise")
    ap.add_argument("--timm", action="store_true",
                    help="the timm list (TIMM) instead of torchvision (needs timm installed)")
    ap.add_argument("--budget", action="store_true",
                    help="measure instead of check: fp.score with its defaults at 224x224 vs a "
                         "plain forward + backward (time, peak RSS, where the time goes), "
                         f"judged against {BUDGET_PEAK_MIB >> 10} GiB peak RSS and --limit")
    ap.add_argument("--skip", default="",
                    help="comma-separated exact model names to leave out (timm ones with or "
                         "without their timm: prefix)")
    ap.add_argument("--resume", action="store_true",
                    help="--budget: keep the models already in --json and run the rest")
    a = ap.parse_args(argv)
    names = ([f"timm:{n}" for n in TIMM] if a.timm
             else torchvision.models.list_models(module=torchvision.models))
    if a.k:
        names = [n for n in names if any(f in n for f in a.k.split(","))]
    if a.skip:
        skip = set(a.skip.split(","))        # with or without the "timm:" prefix
        names = [n for n in names if n not in skip and n.split(":", 1)[-1] not in skip]
    if a.budget:
        return budget(names, a.limit, a.bn_from_data, a.json, a.resume)
    results = []
    for n in names:
        r = run(n, a.limit, a.bn_from_data)
        results.append(r)
        extra = (f"groups={r.get('groups')} skipped={r.get('skipped_groups')} "
                 f"interleaved={r.get('interleaved_groups')} err={r.get('rel_err')}"
                 if r["outcome"] in ("exact", "WRONG") else r.get("message", "")[:150])
        print(f"{r['outcome']:8s} {n:30s} {r.get('wall_s', 0):6.1f}s  {extra}", flush=True)
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"\n{len(results)} models: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if not counts.get("WRONG") and not counts.get("RAW") else 1


if __name__ == "__main__":
    sys.exit(main())
