"""Re-planning cost from a saved LLM score book (no recalibration): load the book, allocate at
10 / 20 / 30% of the attention+MLP parameters, prune with the default reconstruction and without.

    python benchmarks/replan_llm.py /tmp/book_final.safetensors   # a book from bench_llm.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import smollm2_gguf  # noqa: E402


def main(path: str) -> int:
    import fair_pruner as fp
    from fair_pruner.llm import load_model

    model, _ = load_model(smollm2_gguf())
    t = time.perf_counter()
    book = fp.ScoreBook.load(path)
    print(f"load book {time.perf_counter() - t:.2f} s")
    for target in (0.1, 0.2, 0.3):
        t = time.perf_counter()
        plan = fp.allocate(book, params=target)
        ta = time.perf_counter() - t
        t = time.perf_counter()
        rebuilt = fp.prune(model, plan, book=book)
        tr = time.perf_counter() - t
        t = time.perf_counter()
        fp.prune(model, plan, reconstruct=None)
        tn = time.perf_counter() - t
        print(f"{target:.0%}: allocate {ta * 1000:.0f} ms, prune + {rebuilt._fair_pruner_reconstruct} "
              f"{tr:.2f} s, prune without reconstruction {tn:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
