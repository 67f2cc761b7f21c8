"""Numeric hot paths of FAIR-Pruner: one ``torch.library`` op each, one kernel per device.

Every op is a ``torch.library`` op in the ``fair_pruner`` namespace (``torch.ops.fair_pruner.*``). Its body
is the pure-PyTorch reference below (the CPU fallback and the test oracle, on any device); a
compiled backend registers its function as the op's kernel for one device type through PyTorch's
dispatcher (``torch.library.Library.impl`` for its dispatch key), the torchao / bitsandbytes
shape:

* ``cpp``    - C++/OpenMP (``fair_pruner._C``, ``csrc/cpu``): the ``cpu`` kernel of every op.
* ``cuda``   - CUDA C++ (``fair_pruner._cuda``, ``csrc/cuda``): the ``cuda`` kernel of
  ``unit_stats`` and ``pairwise_w1_max``.
* ``triton`` - Triton (``fair_pruner.kernels``, ``kernels/``): the ``cuda`` kernel of the rest.

Kernels are chosen once per device type, on the first call with a tensor there: for each op the
first loadable backend in ``_PREFERENCE`` that implements it. A backend never calls another; one
that cannot load warns once and the op keeps the next choice (in the end, the reference).
``FAIR_PRUNER_BACKEND=torch|cpp|triton|cuda`` (read at that first call) restricts the choice to
that backend on the devices it serves (a clear error if it is not available) and to the reference
elsewhere.

Shapes use: B batch, C/U units, S samples per class, K classes, P projections, Q quantile levels,
N total units over G ragged groups.
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
import threading
import warnings
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from .errors import FairPrunerError, TargetError

__all__ = [
    "unit_stats", "class_quantiles", "pairwise_w1_max", "class_w1_max", "tod_overlap",
    "tod_select", "gram", "implementations", "active_backend", "positions_3d", "BACKENDS",
    "OP_NAMES",
]

BACKENDS = ("torch", "cpp", "triton", "cuda")
# Ops with compiled kernels; ``gram`` runs its reference everywhere (a BLAS / cuBLAS GEMM).
OP_NAMES = ("unit_stats", "class_quantiles", "pairwise_w1_max", "class_w1_max", "tod_overlap",
            "tod_select")
# Per device type, fastest first; the reference ("torch") is the op's own body.
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
# Backend -> module exposing KERNELS: {op name: function with the reference's signature}.
_BACKEND_MODULES = {"cpp": "fair_pruner._cpp_backend", "triton": "fair_pruner._triton_backend",
                    "cuda": "fair_pruner._cuda_backend"}

_MODULES: Dict[str, object] = {}     # backend -> loaded module, or None if it failed
_ACTIVE: Dict[Tuple[str, str], str] = {}   # (op, device type) -> backend serving it
_CHOSEN: set = set()                 # device types whose kernels are registered
_LOCK = threading.RLock()


def _backend(backend: str, quiet: bool = False):
    """The backend's module (imported once), or None with one warning if it cannot load."""
    with _LOCK:
        if backend not in _MODULES:
            try:
                _MODULES[backend] = importlib.import_module(_BACKEND_MODULES[backend])
            except Exception as exc:  # a missing extension must never break import
                _MODULES[backend] = None
                if not quiet:
                    warnings.warn(f"fair_pruner: {backend} backend unavailable ({exc}); those "
                                  "ops use the next backend", RuntimeWarning, stacklevel=4)
        return _MODULES[backend]


def implementations(op: str) -> Dict[str, Callable]:
    """Every loadable implementation of ``op`` by backend name (for tests and benchmarks)."""
    out = {"torch": _REFERENCE[op]}
    for b in BACKENDS[1:]:
        mod = _backend(b, quiet=True)
        if mod is not None and op in mod.KERNELS:
            out[b] = mod.KERNELS[op]
    return out


def _forced() -> str:
    forced = os.environ.get("FAIR_PRUNER_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        from .errors import ConfigError
        raise ConfigError(f"FAIR_PRUNER_BACKEND={forced!r} is not one of {BACKENDS}: set one "
                          "of them or unset it")
    return forced


def _choose(device_type: str) -> None:
    """Register the kernels of ``device_type`` with the dispatcher (once)."""
    if device_type in _CHOSEN:
        return
    with _LOCK:
        if device_type in _CHOSEN:
            return
        forced = _forced()
        order = _PREFERENCE.get(device_type, ())
        if forced:
            order = (forced,) if forced in order else ()
        for b in order:
            mod = _backend(b, quiet=bool(forced))
            if mod is None:
                if forced:
                    from .errors import ConfigError
                    raise ConfigError(
                        f"FAIR_PRUNER_BACKEND={forced} was requested but the {forced} backend is "
                        "not available (build the extension with `pip install "
                        "--no-build-isolation -e .`, or unset FAIR_PRUNER_BACKEND)")
                continue
            for op, fn in mod.KERNELS.items():
                if (op, device_type) not in _ACTIVE:
                    _LIB.impl(op, fn, _DISPATCH_KEYS[device_type])
                    _ACTIVE[(op, device_type)] = b
        _CHOSEN.add(device_type)


def active_backend(op: str, device_type: str) -> str:
    """The backend whose kernel ``op`` runs for tensors on ``device_type``."""
    _choose(device_type)
    return _ACTIVE.get((op, device_type), "torch")


# --------------------------------------------------------------------------------------------
# Layout helper shared by the GPU backends
# --------------------------------------------------------------------------------------------

def positions_3d(z: Tensor, g: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tuple[int, int, int],
                                                        Tuple[int, int, int], Tuple[int, int, int]]:
    """View z, g as [A, C, I] (unit dim C in the middle) without copying when the strides allow.

    Position dims (all but ``dim``) of size > 1 are ordered by z stride and coalesced; when more
    than two remain, both tensors are made contiguous (then they always coalesce). Returns
    (z, g, (A, C, I), z strides, g strides) in elements; g is cast to z's dtype.
    """
    if g.dtype != z.dtype:
        g = g.to(z.dtype)
    if z.numel() == 0:
        return z, g, (0, z.shape[dim], 1), (0, 0, 0), (0, 0, 0)
    for attempt in range(2):
        dims = sorted((d for d in range(z.dim()) if d != dim and z.shape[d] != 1),
                      key=lambda d: -z.stride(d))
        merged = []  # [size, z stride, g stride]
        for d in dims:
            n, sz, sg = z.shape[d], z.stride(d), g.stride(d)
            if merged and merged[-1][1] == n * sz and merged[-1][2] == n * sg:
                merged[-1] = [merged[-1][0] * n, sz, sg]
            else:
                merged.append([n, sz, sg])
        if len(merged) <= 2 or attempt == 1:
            break
        z, g = z.contiguous(), g.contiguous()
    while len(merged) < 2:
        merged.insert(0, [1, 0, 0])
    (A, sza, sga), (I, szi, sgi) = merged
    C = z.shape[dim]
    return z, g, (A, C, I), (sza, z.stride(dim), szi), (sga, g.stride(dim), sgi)


# --------------------------------------------------------------------------------------------
# Reference implementations
# --------------------------------------------------------------------------------------------

def _sum_but(x: Tensor, dim: int) -> Tensor:
    """Sum of fp32 ``x`` over every dim but ``dim`` ([x.shape[dim]]; zeros when x is empty)."""
    other = [d for d in range(x.dim()) if d != dim]
    if x.numel() == 0:
        return torch.zeros(x.shape[dim], dtype=torch.float32, device=x.device)
    return x.sum(dim=other) if other else x


def unit_stats_ref(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """Per-unit statistics of one batch, summed over every dim but ``dim``, in fp32.

    z, g: same shape, any float dtype, any strides. Returns fp32 [4, z.shape[dim]]: rows
    sum z*g (the Taylor term), sum |z|, sum z, sum z^2.
    """
    dim = dim % z.dim()
    zf, gf = z.float(), g.float()
    return torch.stack([_sum_but(zf * gf, dim), _sum_but(zf.abs(), dim), _sum_but(zf, dim),
                        _sum_but(zf * zf, dim)])


def class_quantiles_ref(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """Sorted quantile sketches per class.

    x: [K, S, U, P] samples (class k uses rows 0..counts[k]-1), any float dtype.
    counts: int64 [K], 1 <= counts[k] <= S.
    Returns fp32 [K, U, P, Q]: out[k, u, p, i] = the (i + 1/2)/Q quantile of class k's sample
    x[k, :n, u, p] (inverse empirical CDF; index floor((n (2i+1) - 1) / 2Q) of the sorted sample),
    so that for n == Q the sketch is exactly the sorted sample.
    """
    K, S, U, P = x.shape
    out = torch.empty((K, U, P, q), dtype=torch.float32, device=x.device)
    lev = torch.arange(q, device=x.device)
    for k in range(K):
        n = int(counts[k])
        srt = x[k, :n].float().sort(dim=0).values  # [n, U, P]
        idx = (n * (2 * lev + 1) - 1) // (2 * q)
        out[k] = srt.index_select(0, idx).permute(1, 2, 0)
    return out


def pairwise_w1_max_ref(sk: Tensor) -> Tensor:
    """U[u] = max over class pairs a < b of mean over (P, Q) of |sk[a, u] - sk[b, u]|.

    sk: [K, U, P, Q] quantile sketches (K >= 2). Returns fp32 [U]. Never forms K x K x U.
    """
    K, U = sk.shape[0], sk.shape[1]
    best = torch.zeros(U, dtype=torch.float32, device=sk.device)
    # Units in chunks so the [K-a-1, chunk, P, Q] temporaries stay under ~256 MiB.
    step = max(1, (64 << 20) // max(1, K * sk.shape[2] * sk.shape[3]))
    for s in range(0, U, step):
        skf = sk[:, s:s + step].float()
        for a in range(K - 1):
            d = (skf[a + 1:] - skf[a]).abs().mean(dim=(2, 3))  # [K-a-1, chunk]
            best[s:s + step] = torch.maximum(best[s:s + step], d.amax(dim=0))
    return best


def class_w1_max_ref(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """fp32 [U]: the U-Score of class samples x [K, S, U, P] (K >= 2), that is
    ``pairwise_w1_max_ref(class_quantiles_ref(x, counts, q))``; the compiled kernel computes it
    without the [K, U, P, Q] sketch in memory."""
    return pairwise_w1_max_ref(class_quantiles_ref(x, counts, q))


def max_over_class_blocks(sk: Tensor, kernel: Callable[[Tensor], Tensor], max_k: int) -> Tensor:
    """``kernel(sk)`` (the max over class pairs) for any K, calling ``kernel`` on <= ``max_k``
    classes at a time: every pair of classes lies in the union of two blocks of ``max_k // 2``."""
    K = sk.shape[0]
    if K <= max_k:
        return kernel(sk)
    half = max(1, max_k // 2)
    blocks = [torch.arange(s, min(K, s + half), device=sk.device) for s in range(0, K, half)]
    best = None
    for i in range(len(blocks)):
        for j in range(i + 1, len(blocks)):
            got = kernel(sk.index_select(0, torch.cat([blocks[i], blocks[j]])))
            best = got if best is None else torch.maximum(best, got)
    return best


def _segment_ids(offsets: Tensor) -> Tensor:
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=offsets.device), sizes)


def _segment_rank(key: Tensor, seg: Tensor, offsets: Tensor, descending: bool) -> Tensor:
    """Rank (from 0) of each element within its segment, ordered by key, ties by position."""
    k = -key if descending else key
    order = torch.argsort(k, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]  # segments contiguous, key order inside
    rank = torch.empty_like(order)
    pos = torch.arange(order.numel(), device=key.device)
    rank[order] = pos - offsets[seg[order]]
    return rank


def tod_overlap_ref(u: Tensor, r: Tensor, offsets: Tensor) -> Tensor:
    """Overlap curves |lowU(m) ∩ highR(m)| for ragged groups, for every m at once.

    u, r: float [N] removal / protection scores, group g = [offsets[g], offsets[g+1]).
    offsets: int64 [G+1]. Returns int64 [N + G]: group g's curve for m = 0..n_g lives at
    [offsets[g] + g, offsets[g+1] + g]. Unit i is in both sets iff m >= t_i = max(a_i, b_i) + 1
    (a_i its rank by U ascending, b_i by R descending, ties by index), so the curve is the
    cumulative histogram of t.
    """
    N = u.numel()
    G = offsets.numel() - 1
    offsets = offsets.to(torch.int64)
    out = torch.zeros(N + G, dtype=torch.int64, device=u.device)
    if N == 0:
        return out
    seg = _segment_ids(offsets)
    a = _segment_rank(u.double(), seg, offsets, descending=False)
    b = _segment_rank(r.double(), seg, offsets, descending=True)
    t = torch.maximum(a, b) + 1  # in 1..n_g
    # Bin t of group g into slot offsets[g] + g + t; then a segmented cumulative sum.
    out.index_add_(0, offsets[seg] + seg + t, torch.ones_like(t))
    csum = out.cumsum(0)
    starts = offsets[:-1] + torch.arange(G, device=u.device)
    before = torch.cat([csum.new_zeros(1), csum])[starts]  # running total before each group
    sizes = offsets[1:] - offsets[:-1] + 1
    return csum - torch.repeat_interleave(before, sizes)


def tod_select_ref(overlap: Tensor, offsets: Tensor, alphas: Tensor, cap: float) -> Tensor:
    """m̂ per group and alpha: max{1 <= m <= floor(cap n_g) : overlap_g(m) <= alpha m}, else 0.

    overlap: int64 [N + G] from :func:`tod_overlap`; offsets int64 [G+1]; alphas float64 [A].
    Returns int64 [G, A].
    """
    G = offsets.numel() - 1
    A = alphas.numel()
    out = torch.zeros((G, A), dtype=torch.int64, device=overlap.device)
    alphas = alphas.double()
    for g in range(G):
        n = int(offsets[g + 1] - offsets[g])
        mmax = int(cap * n)
        if mmax < 1:
            continue
        start = int(offsets[g]) + g
        curve = overlap[start + 1: start + mmax + 1].double()  # m = 1..mmax
        m = torch.arange(1, mmax + 1, device=overlap.device, dtype=torch.float64)
        # Same comparison as the authors' rule (|A ∩ B| / m <= alpha), so rounding agrees.
        ok = (curve / m)[None, :] <= alphas[:, None]
        idx = torch.where(ok, m[None, :], torch.zeros_like(m)[None, :]).amax(dim=1)
        out[g] = idx.to(torch.int64)
    return out


def gram_ref(x: Tensor) -> Tensor:
    """fp32 [C, C] = xᵀ x for rows x [N, C] (any float dtype), accumulated in fp32 over row
    chunks of 4096 so the fp32 rounding error grows with the chunk, not with N."""
    C = x.shape[-1]
    out = torch.zeros((C, C), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], 4096):
        xs = x[s:s + 4096].float()
        out += xs.T @ xs
    return out


_REFERENCE: Dict[str, Callable] = {
    "unit_stats": unit_stats_ref, "class_quantiles": class_quantiles_ref,
    "pairwise_w1_max": pairwise_w1_max_ref, "class_w1_max": class_w1_max_ref,
    "tod_overlap": tod_overlap_ref,
    "tod_select": tod_select_ref, "gram": gram_ref}


# --------------------------------------------------------------------------------------------
# The ops: the reference is each op's body (CompositeExplicitAutograd: every device), except
# class_w1_max's, which composes the two ops it fuses; backends add per-device kernels (the CPU
# / CUDA dispatch keys take precedence). Argument checks live in the public wrappers below so
# every kernel gets them.
#
# Registered through torch.library.Library rather than the @custom_op decorator: a custom op's
# first call imports torch._dynamo (~1 s, a third of a first small fp.score call); these ops
# dispatch straight to their kernels. They are not differentiable (called on detached tensors).
# --------------------------------------------------------------------------------------------


def class_w1_max_composed(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """``class_w1_max`` where a device has no fused kernel: the two ops through the
    dispatcher, so each runs that device's own kernel (not its reference)."""
    return _pairwise_w1_max_op(_class_quantiles_op(x, counts, q))


_LIB = torch.library.Library("fair_pruner", "DEF")
_SCHEMAS = {
    "unit_stats": ("unit_stats(Tensor z, Tensor g, int dim) -> Tensor", unit_stats_ref,
                   lambda z, g, dim: z.new_empty((4, z.shape[dim]), dtype=torch.float32)),
    "class_quantiles": ("class_quantiles(Tensor x, Tensor counts, int q) -> Tensor",
                        class_quantiles_ref,
                        lambda x, counts, q: x.new_empty((x.shape[0], x.shape[2], x.shape[3], q),
                                                         dtype=torch.float32)),
    "pairwise_w1_max": ("pairwise_w1_max(Tensor sk) -> Tensor", pairwise_w1_max_ref,
                        lambda sk: sk.new_empty((sk.shape[1],), dtype=torch.float32)),
    "class_w1_max": ("class_w1_max(Tensor x, Tensor counts, int q) -> Tensor",
                     class_w1_max_composed,
                     lambda x, counts, q: x.new_empty((x.shape[2],), dtype=torch.float32)),
    "tod_overlap": ("tod_overlap(Tensor u, Tensor r, Tensor offsets) -> Tensor", tod_overlap_ref,
                    lambda u, r, offsets: u.new_empty((u.shape[0] + offsets.shape[0] - 1,),
                                                      dtype=torch.int64)),
    "tod_select": ("tod_select(Tensor overlap, Tensor offsets, Tensor alphas, float cap) -> "
                   "Tensor", tod_select_ref,
                   lambda overlap, offsets, alphas, cap: overlap.new_empty(
                       (offsets.shape[0] - 1, alphas.shape[0]), dtype=torch.int64)),
    "gram": ("gram(Tensor x) -> Tensor", gram_ref,
             lambda x: x.new_empty((x.shape[-1], x.shape[-1]), dtype=torch.float32)),
}


def _below_autograd(name: str):
    """The Autograd kernel of op ``name``: statistics, not differentiable, so the op runs below
    autograd and its output never requires grad, whatever its inputs."""
    def kernel(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return _OPS[name](*args)
    return kernel


for _name, (_schema, _ref, _fake) in _SCHEMAS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, _ref, "CompositeExplicitAutograd")
    _LIB.impl(_name, _below_autograd(_name), "Autograd")
    torch.library.register_fake(f"fair_pruner::{_name}", _fake, lib=_LIB)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# op name -> its OpOverload (torch.ops.fair_pruner.<name>.default)
_OPS = {name: getattr(torch.ops.fair_pruner, name).default for name in _SCHEMAS}
_unit_stats_op, _class_quantiles_op = _OPS["unit_stats"], _OPS["class_quantiles"]
_pairwise_w1_max_op, _tod_overlap_op = _OPS["pairwise_w1_max"], _OPS["tod_overlap"]
_tod_select_op, _gram_op = _OPS["tod_select"], _OPS["gram"]
_class_w1_max_op = _OPS["class_w1_max"]


def is_real(x) -> bool:
    """A real number: int, float or a NumPy / 0-d tensor scalar of either, but never a bool."""
    if isinstance(x, bool) or type(x).__name__ in ("bool_", "bool"):
        return False
    if isinstance(x, Tensor):
        return x.numel() == 1 and x.dim() == 0 and not x.dtype == torch.bool \
            and not x.is_complex()
    return isinstance(x, numbers.Real)


def check_cap(cap, what: str = "cap") -> float:
    """``cap`` as a float in [0, 1] (the largest fraction of a group one round may remove), or
    a :class:`TargetError`: a kernel reads floor(cap n) + 1 entries of an n + 1 curve."""
    if not is_real(cap) or not math.isfinite(float(cap)) or not 0.0 <= float(cap) <= 1.0:
        raise TargetError(f"{what} is the largest fraction of a group one round may remove and "
                          f"must be a number in [0, 1], got {cap!r}")
    return float(cap)


def _checked_offsets(op: str, offsets, n: int, device) -> Tensor:
    """int64 offsets [G + 1] on ``device``: 1-d, from 0 to ``n``, non-decreasing."""
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.numel() < 1 \
            or offsets.is_floating_point() or offsets.dtype == torch.bool:
        raise FairPrunerError(f"{op}: offsets must be a 1-d integer tensor of G + 1 group bounds")
    offsets = offsets.to(device=device, dtype=torch.int64)
    if int(offsets[0]) != 0 or int(offsets[-1]) != n or \
            (offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any())):
        raise FairPrunerError(f"{op}: offsets must start at 0, never decrease and end at {n} "
                              f"(got {offsets.tolist()[:8]}{'...' if offsets.numel() > 8 else ''})")
    return offsets


def _check_pair(op: str, z: Tensor, g: Tensor, dim: int) -> None:
    if z.shape != g.shape:
        raise ValueError(f"{op}: activation shape {tuple(z.shape)} != gradient shape "
                         f"{tuple(g.shape)}")
    if z.device != g.device:
        raise ValueError(f"{op}: activation on {z.device} but gradient on {g.device}")
    if not (z.is_floating_point() and g.is_floating_point()):
        raise ValueError(f"{op}: expected floating-point tensors, got {z.dtype} and {g.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not (-z.dim() <= dim < z.dim()):
        raise ValueError(f"{op}: unit dim {dim!r} out of range for a {z.dim()}-d tensor")


def unit_stats(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [4, z.shape[dim]]: per unit, sums over all other dims of z*g, |z|, z and z^2.

    Row 0 is the Taylor term of each unit (the R-Score's summand); one read of z and g on the
    compiled backends.
    """
    _check_pair("unit_stats", z, g, dim)
    _choose(z.device.type)
    return _unit_stats_op(z, g, dim % z.dim())


def _check_samples(op: str, x: Tensor, counts, q) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: expected [K, S, U, P] samples, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: expected float samples, got {x.dtype}")
    counts = torch.as_tensor(counts)
    if counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(f"{op}: counts must be integers, got {counts.dtype}")
    if counts.dim() != 1 or counts.numel() != x.shape[0]:
        raise ValueError(f"{op}: counts must have one entry per class")
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ValueError(f"{op}: q must be an int >= 1, got {q!r}")
    if x.shape[0] and (int(counts.min()) < 1 or int(counts.max()) > x.shape[1]):
        raise ValueError(f"{op}: counts must lie in [1, {x.shape[1]}]")


def class_quantiles(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """fp32 [K, U, P, Q] quantile sketches of class samples x [K, S, U, P] (see the reference)."""
    _check_samples("class_quantiles", x, counts, q)
    _choose(x.device.type)
    counts = torch.as_tensor(counts).to(device=x.device, dtype=torch.int64)
    return _class_quantiles_op(x, counts, int(q))


def pairwise_w1_max(sk: Tensor) -> Tensor:
    """fp32 [U]: max over class pairs of the (sliced) W1 between sketches sk [K, U, P, Q]."""
    if sk.dim() != 4:
        raise ValueError(f"pairwise_w1_max: expected [K, U, P, Q] sketches, got {tuple(sk.shape)}")
    if sk.shape[0] < 2:
        raise ValueError("pairwise_w1_max: need at least two classes")
    if not sk.is_floating_point():
        raise ValueError(f"pairwise_w1_max: expected float sketches, got {sk.dtype}")
    _choose(sk.device.type)
    return _pairwise_w1_max_op(sk)


def class_w1_max(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """fp32 [U]: ``pairwise_w1_max(class_quantiles(x, counts, q))`` for class samples
    x [K, S, U, P], K >= 2 (the U-Score of each unit), in one op: the CPU kernel sorts and
    compares one tile of units at a time and never holds the [K, U, P, Q] sketch."""
    _check_samples("class_w1_max", x, counts, q)
    if x.shape[0] < 2:
        raise ValueError("class_w1_max: need at least two classes")
    _choose(x.device.type)
    return _class_w1_max_op(x, torch.as_tensor(counts).to(device=x.device, dtype=torch.int64),
                            int(q))


def tod_overlap(u: Tensor, r: Tensor, offsets: Tensor) -> Tensor:
    """int64 [N + G] overlap curves of ragged groups (see the reference for the layout)."""
    if not (isinstance(u, Tensor) and isinstance(r, Tensor)) or u.shape != r.shape \
            or u.dim() != 1:
        raise FairPrunerError("tod_overlap: u and r must be 1-d tensors of equal length")
    if not (u.is_floating_point() and r.is_floating_point()):
        raise FairPrunerError(f"tod_overlap: u and r must be float tensors, got {u.dtype} and "
                              f"{r.dtype}")
    offsets = _checked_offsets("tod_overlap", offsets, u.numel(), u.device)
    _choose(u.device.type)
    return _tod_overlap_op(u, r, offsets)


def tod_select(overlap: Tensor, offsets: Tensor, alphas: Tensor, cap: float = 0.99) -> Tensor:
    """int64 [G, A]: units to remove per group for each tolerance in ``alphas``."""
    if not isinstance(overlap, Tensor) or overlap.dim() != 1 or overlap.is_floating_point() \
            or overlap.dtype == torch.bool or overlap.is_complex():
        raise FairPrunerError("tod_select: overlap must be the 1-d integer tensor tod_overlap "
                              "returns")
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
        raise FairPrunerError("tod_select: offsets must be a 1-d tensor of G + 1 group bounds")
    offsets = _checked_offsets("tod_select", offsets, overlap.numel() - (offsets.numel() - 1),
                               overlap.device)
    cap = check_cap(cap, "tod_select: cap")
    alphas = torch.as_tensor(alphas, dtype=torch.float64, device=overlap.device).reshape(-1)
    _choose(overlap.device.type)
    return _tod_select_op(overlap, offsets, alphas, float(cap))


def gram(x: Tensor) -> Tensor:
    """fp32 [C, C]: xᵀ x of the rows of x [N, C] (the consumer-input Gram matrix that weight
    reconstruction solves with; a BLAS GEMM per 4096-row chunk)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"gram: expected a 2-d float tensor [N, C], got {tuple(x.shape)} {x.dtype}")
    _choose(x.device.type)
    return _gram_op(x)
