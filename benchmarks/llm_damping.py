"""Ridge damping and held-out text for the LLM reconstruction (issue 9): from a score book saved
by ``bench_llm.py --book``, prune SmolLM2-135M with the default plan at each target, reconstruct
with least squares with and without an intercept ("affine" / "lstsq") at each damping, and
report perplexity on the first 40,000 characters of *Emma* (a second held-out text) and of
*Pride and Prejudice* (the text of bench_llm.py's table).

    python benchmarks/llm_damping.py --book /tmp/book.safetensors --targets 0.3 \\
        --damps 1e-3,1e-2,1e-1 --methods affine,lstsq
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import austen, smollm2_gguf  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--book", required=True, help="a score book from bench_llm.py --book")
    ap.add_argument("--austen", default="/tmp/janeausten", help="dpkg -x root of janeaustenr")
    ap.add_argument("--targets", default="0.1,0.2,0.3")
    ap.add_argument("--damps", default="1e-3,1e-2,1e-1")
    ap.add_argument("--methods", default="affine,lstsq")
    ap.add_argument("--eval-chars", type=int, default=40_000)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    import fair_pruner as fp
    from fair_pruner.llm import load_model, perplexity

    model, tok = load_model(smollm2_gguf())

    def ids(name):
        text = austen(args.austen, name)[: args.eval_chars]
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    texts = {"Emma": ids("emma"), "Pride and Prejudice": ids("prideprejudice")}
    book = fp.ScoreBook.load(args.book)
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        plan = fp.allocate(book, params=target)
        for method in args.methods.split(","):
            for damp in (float(d) for d in args.damps.split(",")):
                pruned = fp.prune(model, plan, reconstruct=method, book=book, damp=damp)
                ppl = {k: perplexity(pruned, v, 1024) for k, v in texts.items()}
                rows.append({"target": target, "reconstruct": method, "damp": damp, **ppl})
                print(f"{target:.0%} {method:6s} damp {damp:g}: " +
                      "  ".join(f"{k} {v:.3f}" for k, v in ppl.items()), flush=True)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
