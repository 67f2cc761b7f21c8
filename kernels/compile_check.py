"""Compile every Triton kernel for a GPU target without a GPU (a CI check that they lower).

``python -m fair_pruner.kernels.compile_check [arch]`` (default 90, Hopper) compiles each kernel
to a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and prints
one line per kernel. Run it without ``TRITON_INTERPRET`` set (the interpreter replaces the JIT).
"""
from __future__ import annotations

import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import quantiles, taylor, tod, w1


def _sig(names, types):
    return dict(zip(names, types))


def cases():
    """(label, kernel, signature, constexprs) for every kernel and its main dtype variants."""
    out = []
    us_args = ["z_ptr", "g_ptr", "part_ptr", "A", "C", "I", "sza", "szc", "szi", "sga", "sgc",
               "sgi", "per_split", "STATS", "BLOCK_C", "BLOCK_P"]
    for dt in ("fp32", "bf16"):
        out.append((f"unit_stats[{dt}]", taylor.unit_stats_kernel,
                    _sig(us_args, [f"*{dt}", f"*{dt}", "*fp32"] + ["i32"] * 3 + ["i64"] * 6 +
                         ["i32"] + ["constexpr"] * 3),
                    {"STATS": True, "BLOCK_C": 32, "BLOCK_P": 64}))
    out.append(("class_quantiles[fp16]", quantiles.class_quantiles_kernel,
                _sig(["x_ptr", "counts_ptr", "out_ptr", "U", "P", "Q", "sxk", "sxs", "sxu", "sxp",
                      "S_PAD", "Q_PAD", "BLOCK_COL"],
                     ["*fp16", "*i64", "*fp32"] + ["i32"] * 3 + ["i64"] * 4 + ["constexpr"] * 3),
                {"S_PAD": 32, "Q_PAD": 32, "BLOCK_COL": 64}))
    out.append(("pairwise_w1_max[fp32]", w1.pairwise_w1_max_kernel,
                _sig(["sk_ptr", "out_ptr", "K", "L", "Q", "sk_k", "sk_u", "sk_p", "sk_q",
                      "BLOCK_B", "BLOCK_L"],
                     ["*fp32", "*fp32"] + ["i32"] * 3 + ["i64"] * 4 + ["constexpr"] * 2),
                {"BLOCK_B": 16, "BLOCK_L": 256}))
    out.append(("tod_times[fp64]", tod.tod_times_kernel,
                _sig(["u_ptr", "r_ptr", "offsets_ptr", "hist_ptr", "BLOCK_I", "BLOCK_J"],
                     ["*fp64", "*fp64", "*i64", "*i64", "constexpr", "constexpr"]),
                {"BLOCK_I": 64, "BLOCK_J": 64}))
    out.append(("segment_cumsum", tod.segment_cumsum_kernel,
                _sig(["hist_ptr", "offsets_ptr", "BLOCK"], ["*i64", "*i64", "constexpr"]),
                {"BLOCK": 1024}))
    out.append(("tod_select", tod.tod_select_kernel,
                _sig(["overlap_ptr", "offsets_ptr", "mmax_ptr", "alphas_ptr", "out_ptr", "A",
                      "BLOCK_M"], ["*i64", "*i64", "*i64", "*fp64", "*i64", "i32", "constexpr"]),
                {"BLOCK_M": 256}))
    return out


def main(arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    for label, kernel, sig, consts in cases():
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, sig, consts), target=target)
        assert compiled.asm.get("cubin"), f"{label}: no cubin"
        print(f"compiled {label} for sm_{arch} in {time.perf_counter() - t0:.1f} s "
              f"({len(compiled.asm['cubin'])} B cubin)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
