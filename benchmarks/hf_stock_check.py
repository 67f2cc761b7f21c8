"""A pruned SmolLM2 directory in a Python environment that has only torch + transformers.

Prunes SmolLM2-135M-Instruct (default plan: ToD + affine reconstruction, 20% of the
attention+MLP parameters), saves it with ``fp.save_pretrained`` at float32 and bfloat16, then runs
another interpreter (``--stock-python``, a venv without fair_pruner) that loads each directory
with ``AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)``, computes logits on a
held-out Austen passage and generates. Compares them with ``fp.from_pretrained``'s here.

    python -m venv /tmp/venv_stock && /tmp/venv_stock/bin/pip install torch==2.13.0 \
        transformers==5.23.0
    python benchmarks/hf_stock_check.py --stock-python /tmp/venv_stock/bin/python \
        --book /tmp/book_final.safetensors --out /tmp/smol_stock
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import austen, smollm2_gguf  # noqa: E402

STOCK = r"""
import json, sys, torch, transformers
d, ids = sys.argv[1], torch.load(sys.argv[2])
assert not any(k.startswith("fair_pruner") for k in sys.modules)
try:
    import fair_pruner  # noqa: F401
    have = True
except ImportError:
    have = False
m = transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(m(input_ids=ids, use_cache=False).logits.float(), d + "/stock_logits.pt")
gen = m.generate(ids[:, :32], max_new_tokens=16, do_sample=False)
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "fair_pruner_importable": have, "class": type(m).__name__,
                  "dtype": str(next(m.parameters()).dtype), "gen": gen[0, 32:].tolist()}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stock-python", required=True, help="interpreter without fair_pruner")
    ap.add_argument("--austen", default="/tmp/janeausten")
    ap.add_argument("--book", help="SmolLM2 score book (default: calibrate, ~4 min)")
    ap.add_argument("--params", type=float, default=0.2)
    ap.add_argument("--out", required=True, help="directory for the saved models")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import fair_pruner as fp
    from fair_pruner.llm import load_model, text_batches

    model, tok = load_model(smollm2_gguf())
    if args.book:
        book = fp.ScoreBook.load(args.book)
    else:
        ids = torch.tensor(tok(austen(args.austen, "sensesensibility"),
                               add_special_tokens=False)["input_ids"])
        book = fp.score(model, text_batches(ids, 512, 64))
    plan = fp.allocate(book, params=args.params)
    pruned = fp.prune(model, plan, book=book)
    text = austen(args.austen, "prideprejudice")[:4000]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:256])[None]
    res = {"params": args.params, "plan_reduction": plan.params_reduction, "runs": []}
    for dtype in ("float32", "bfloat16"):
        d = os.path.join(args.out, dtype)
        fp.save_pretrained(pruned, d, tokenizer=tok, dtype=dtype)
        torch.save(ids, os.path.join(d, "ids.pt"))
        ours = fp.from_pretrained(d)
        with torch.no_grad():
            want = ours(input_ids=ids, use_cache=False).logits.float()
        gen = ours.generate(ids[:, :32], max_new_tokens=16, do_sample=False)[0, 32:].tolist()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        r = subprocess.run([args.stock_python, "-c", STOCK, d, os.path.join(d, "ids.pt")],
                           capture_output=True, text=True, env=env, cwd=args.out,
                           stdin=subprocess.DEVNULL)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        stock = json.loads(r.stdout[r.stdout.rindex('{"torch"'):])
        got = torch.load(os.path.join(d, "stock_logits.pt"))
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                   if f.endswith(".safetensors"))
        run = {"dtype": dtype, "weights_mb": size / 2**20,
               "max_abs_logit_diff": float((got - want).abs().max()),
               "same_generation": stock["gen"] == gen, **{k: stock[k] for k in (
                   "torch", "transformers", "fair_pruner_importable", "class")},
               "loaded_dtype": stock["dtype"]}
        res["runs"].append(run)
        print(json.dumps(run))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
