"""Kernel benchmarks: every op on every available backend against the eager PyTorch reference.

Two ways to run (ratios only hold within one run; the machine is shared and noisy):

    python -m pytest benchmarks/bench_ops.py --benchmark-only -q     # pytest-benchmark, grouped
    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--json FILE]   # ratio table

Sizes follow issue 3: ResNet-50 activations [64, 2048, 7, 7] and [64, 256, 56, 56] (NCHW and
channels-last), an LLM MLP [16 x 512 tokens, 14336] in bf16, sketches with K = 100 classes,
Q = 32, P = 128, and ToD over 32 groups x 14336 units. Where the eager reference would take
minutes on a 2-core CPU, the unit count is cut (noted in the case name): both backends are
linear in units, so the ratio carries over. On CUDA the table also gives each kernel's time
against the memory-bandwidth floor (bytes it must move / measured device copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch

from fair_pruner import ops

warnings.filterwarnings("ignore", message=".*backend unavailable.*")

Case = Tuple[str, str, Callable[[str], tuple], Callable[[tuple], int]]


def _act(shape, dtype=torch.float32, channels_last=False, dim=1):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(shape, generator=g).to(dtype)
        gr = torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
            gr = gr.contiguous(memory_format=torch.channels_last)
        return z.to(device), gr.to(device), dim
    return make


def _samples(K, S, U, P, dtype=torch.float32):
    def make(device):
        x = torch.randn(K, S, U, P, dtype=dtype, device=device)
        return x, torch.full((K,), S, device=device), 32
    return make


def _sketches(K, U, P, Q):
    def make(device):
        return (torch.randn(K, U, P, Q, device=device).sort(-1).values,)
    return make


def _tod(G, n):
    def make(device):
        u = torch.rand(G * n, dtype=torch.float64, device=device)
        r = torch.rand(G * n, dtype=torch.float64, device=device)
        return u, r, torch.arange(G + 1, device=device) * n
    return make


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def cases(quick: bool = False, device: str = "cpu") -> List[Case]:
    """(name, op, make_inputs(device), bytes_moved(inputs)) per benchmark case."""
    gpu = device == "cuda"
    k_units = 2048 if gpu else 128      # pairwise W1 / quantiles: eager is minutes on a CPU
    w1_units = 2048 if gpu else 64
    acts = [("[64,2048,7,7] fp32", _act((64, 2048, 7, 7))),
            ("[64,256,56,56] fp32", _act((64, 256, 56, 56))),
            ("[64,256,56,56] fp32 channels-last", _act((64, 256, 56, 56), channels_last=True)),
            ("[8192,14336] bf16 (LLM MLP)", _act((8192, 14336), torch.bfloat16, dim=1))]
    if quick:
        acts = [("[16,256,14,14] fp32", _act((16, 256, 14, 14))),
                ("[512,1024] bf16", _act((512, 1024), torch.bfloat16))]
        k_units, w1_units = 16, 8
    out: List[Case] = []
    for name, make in acts:
        out.append((f"unit_stats {name}", "unit_stats", make, lambda a: _nbytes(a[0], a[1])))
    out.append((f"class_quantiles K=100 S=32 U={k_units} P=128 Q=32", "class_quantiles",
                _samples(100, 32, k_units, 128), lambda a: _nbytes(a[0]) * 2))
    out.append((f"class_quantiles K=64 S=32 U={14336 if not quick else 512} P=1 bf16 (LLM)",
                "class_quantiles", _samples(64, 32, 14336 if not quick else 512, 1, torch.bfloat16),
                lambda a: _nbytes(a[0]) * 3))
    out.append((f"pairwise_w1_max K=100 U={w1_units} P=128 Q=32", "pairwise_w1_max",
                _sketches(100, w1_units, 128, 32), lambda a: _nbytes(a[0])))
    llm_units = 14336 if gpu else 2048
    out.append((f"pairwise_w1_max K=64 U={llm_units if not quick else 512} P=1 Q=32 (LLM)",
                "pairwise_w1_max", _sketches(64, llm_units if not quick else 512, 1, 32),
                lambda a: _nbytes(a[0])))
    # The U-Score of one ResNet-18 layer at 32 samples/class: fused vs the two ops back to back.
    u_units = 512 if not quick else 32
    for op in ("class_w1_max", "quantiles+w1"):
        out.append((f"{op} K=10 S=32 U={u_units} P=128 Q=32", op, _samples(10, 32, u_units, 128),
                    lambda a: _nbytes(a[0])))
    G, n = (32, 14336) if not quick else (4, 1000)
    out.append((f"tod_overlap+select G={G} n={n}", "tod", _tod(G, n),
                lambda a: _nbytes(a[0], a[1]) + a[0].numel() * 8))
    return out


def _runner(op: str, backend: str) -> Callable:
    """A callable(*inputs) for one backend; ``tod`` = overlap then select at one alpha."""
    if op == "tod":
        ov = ops.implementations("tod_overlap")[backend]
        sel = ops.implementations("tod_select")[backend]

        def tod(u, r, off):
            al = torch.tensor([0.05], dtype=torch.float64, device=u.device)
            return sel(ov(u, r, off), off, al, 0.99)
        return tod
    if op == "quantiles+w1":
        quant = ops.implementations("class_quantiles")[backend]
        w1 = ops.implementations("pairwise_w1_max")[backend]
        return lambda x, counts, q: w1(quant(x, counts, q))
    return ops.implementations(op)[backend]


def backends_for(op: str, device: str) -> List[str]:
    name = {"tod": "tod_overlap", "quantiles+w1": "class_quantiles"}.get(op, op)
    avail = ops.implementations(name)
    want = ("torch", "cpp") if device == "cpu" else ("torch", "triton", "cuda")
    return [b for b in want if b in avail]


def _time(fn: Callable, args: tuple, device: str, repeats: int, budget_s: float) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (fewer if over ``budget_s``; a
    first call over 2 s is taken as the only sample: cold-start effects are noise there)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn(*args)
    sync()
    first = time.perf_counter() - t0
    if first > 2.0:
        return first
    ts: List[float] = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < repeats and (not ts or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(device: str) -> float:
    """Device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), (), device, 10, 5.0)
    return 2 * src.numel() * 4 / t


def _agrees(got, ref) -> bool:
    """Backend output equals the reference (exactly for integer results)."""
    if not ref.is_floating_point():
        return bool(torch.equal(got, ref))
    return bool(torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=1e-3, equal_nan=True))


def run(device: str, quick: bool, repeats: int, only: str = "") -> List[Dict]:
    torch.set_num_threads(int(os.environ.get("FAIR_PRUNER_BENCH_THREADS", "2")))
    bw = copy_bandwidth(device) if device == "cuda" else None
    rows = []
    for name, op, make, nbytes in cases(quick, device):
        if only and only not in name:
            continue
        args = make(device)
        moved = nbytes(args)
        base = ref = None
        for backend in backends_for(op, device):
            fn = _runner(op, backend)
            t = _time(fn, args, device, repeats, budget_s=30.0)
            out = fn(*args)
            if backend == "torch":
                base, ref = t, out
            row = {"case": name, "backend": backend, "ms": t * 1e3,
                   "x_vs_eager": (base / t) if base else None, "bytes": moved,
                   "matches_eager": _agrees(out, ref) if ref is not None else None}
            if bw:
                row["floor_ms"] = moved / bw * 1e3
            rows.append(row)
            print(_fmt(row), flush=True)
        del args
    return rows


def _fmt(row: Dict) -> str:
    s = f"{row['case']:<58} {row['backend']:<7} {row['ms']:>10.2f} ms"
    if row.get("x_vs_eager"):
        s += f"  x{row['x_vs_eager']:.2f} vs eager"
    if row.get("matches_eager") is False:
        s += "  MISMATCH vs eager"
    if row.get("floor_ms"):
        s += f"  floor {row['floor_ms']:.2f} ms ({row['floor_ms'] / row['ms'] * 100:.0f}% of bw)"
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    a = ap.parse_args(argv)
    print(f"# device={a.device} threads={os.environ.get('FAIR_PRUNER_BENCH_THREADS', '2')} "
          f"torch={torch.__version__}", flush=True)
    rows = run(a.device, a.quick, a.repeats, a.only)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


# ------------------------------------------------------------------ pytest-benchmark entry

def _params():
    import pytest
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    quick = os.environ.get("FAIR_PRUNER_BENCH_QUICK") == "1"
    for name, op, make, _ in cases(quick, dev):
        for backend in backends_for(op, dev):
            yield pytest.param(name, op, make, backend, dev, id=f"{name}-{backend}")


if "pytest" in sys.modules:
    import pytest

    @pytest.mark.parametrize("name,op,make,backend,device", list(_params()))
    def test_op(benchmark, name, op, make, backend, device):
        torch.set_num_threads(2)
        benchmark.group = name
        args = make(device)
        fn = _runner(op, backend)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        benchmark.pedantic(lambda: (fn(*args), sync()), rounds=3, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
