"""Numeric hot paths of FAIR-Pruner, one dispatch point per device.

Every op here is a ``torch.library`` custom op (namespace ``fair_pruner``) whose body picks an
implementation by device type:

* ``torch``  - the pure-PyTorch reference below: the CPU fallback and the test oracle.
* ``cpp``    - C++/OpenMP kernels (``fair_pruner._C``, built from ``csrc/cpu``), CPU, all ops;
  registered as ``torch.ops.fair_pruner_cpp.*``.
* ``triton`` - Triton kernels (``fair_pruner.kernels``), CUDA, all ops.
* ``cuda``   - CUDA C++ kernels (``fair_pruner._cuda``, ``csrc/cuda``), CUDA: ``taylor_sum``,
  ``unit_stats``, ``pairwise_w1_max`` (preferred over Triton where present).

Compiled backends register themselves with :func:`register_impl`; a backend that fails to load
warns once and the next one in line is used. ``FAIR_PRUNER_BACKEND=torch|cpp|triton|cuda`` forces
one backend for the device types it serves (a clear error if it is unavailable).

Shapes use: B batch, C/U units, S samples per class, K classes, P projections, Q quantile levels,
N total units over G ragged groups.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

__all__ = [
    "taylor_sum", "unit_stats", "class_quantiles", "pairwise_w1_max", "tod_overlap", "tod_select",
    "register_impl", "implementations", "active_backend", "positions_3d", "BACKENDS", "OP_NAMES",
]

BACKENDS = ("torch", "cpp", "triton", "cuda")
OP_NAMES = ("taylor_sum", "unit_stats", "class_quantiles", "pairwise_w1_max", "tod_overlap",
            "tod_select")
# Preference per device type when nothing is forced: fastest first, reference last.
_PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
# Where each compiled backend lives; importing the module registers its implementations.
_BACKEND_MODULES = {"cpp": "fair_pruner._cpp_backend", "triton": "fair_pruner._triton_backend",
                    "cuda": "fair_pruner._cuda_backend"}

_IMPLS: Dict[str, Dict[str, Callable]] = {}
_LOADED: Dict[str, bool] = {}
_LOCK = threading.Lock()


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as the ``backend`` implementation of op ``op`` (same signature)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn


def _load_backend(backend: str) -> bool:
    """Import a compiled backend once; warn once and return False if it is missing or broken."""
    if backend == "torch":
        return True
    with _LOCK:
        if backend not in _LOADED:
            try:
                importlib.import_module(_BACKEND_MODULES[backend])
                _LOADED[backend] = True
            except Exception as exc:  # missing extension must never break import
                _LOADED[backend] = False
                # A forced backend gets a clear error from active_backend instead of a warning.
                if os.environ.get("FAIR_PRUNER_BACKEND") != backend:
                    warnings.warn(f"fair_pruner: {backend} backend unavailable ({exc}); "
                                  "falling back to the next backend", RuntimeWarning, stacklevel=3)
        return _LOADED[backend]


def implementations(op: str) -> Dict[str, Callable]:
    """All loadable implementations of ``op`` by backend name (tries loading every backend)."""
    for b in BACKENDS:
        _load_backend(b)
    return dict(_IMPLS.get(op, {}))


def active_backend(op: str, device_type: str) -> str:
    """The backend that ``op`` runs on for tensors on ``device_type``."""
    forced = os.environ.get("FAIR_PRUNER_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FAIR_PRUNER_BACKEND={forced!r} is not one of {BACKENDS}")
        if forced == "torch":
            return "torch"
        served = forced in _PREFERENCE.get(device_type, ())
        if not served:
            # A forced backend that cannot serve this device (e.g. cpp for CUDA) is not an error:
            # the reference runs there. Forcing only picks among the backends of a device.
            return "torch"
        if not _load_backend(forced):
            raise RuntimeError(
                f"FAIR_PRUNER_BACKEND={forced} was requested but the {forced} implementation of "
                f"{op} is not available (build the extension with `pip install --no-build-isolation "
                f"-e .`, or unset FAIR_PRUNER_BACKEND)")
        if forced in _IMPLS.get(op, {}):
            return forced
        # A partial backend (cuda has no quantile / ToD kernels): the usual order for this op.
    for b in _PREFERENCE.get(device_type, ("torch",)):
        if _load_backend(b) and b in _IMPLS.get(op, {}):
            return b
    return "torch"


def _call(op: str, device: torch.device, *args):
    return _IMPLS[op][active_backend(op, device.type)](*args)


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


def taylor_sum_ref(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """sum over every dim but ``dim`` of z * g, accumulated in fp32.

    z, g: same shape, any float dtype, any strides. Returns fp32 [z.shape[dim]].
    """
    return _sum_but(z.float() * g.float(), dim % z.dim())


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


for _name, _fn in (("taylor_sum", taylor_sum_ref), ("unit_stats", unit_stats_ref),
                   ("class_quantiles", class_quantiles_ref),
                   ("pairwise_w1_max", pairwise_w1_max_ref), ("tod_overlap", tod_overlap_ref),
                   ("tod_select", tod_select_ref)):
    register_impl(_name, "torch", _fn)


# --------------------------------------------------------------------------------------------
# Custom ops: the single dispatch point. Argument checks live here so every backend gets them.
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fair_pruner::taylor_sum", mutates_args=())
def _taylor_sum_op(z: Tensor, g: Tensor, dim: int) -> Tensor:
    return _call("taylor_sum", z.device, z, g, dim)


@_taylor_sum_op.register_fake
def _(z, g, dim):
    return z.new_empty((z.shape[dim],), dtype=torch.float32)


@torch.library.custom_op("fair_pruner::unit_stats", mutates_args=())
def _unit_stats_op(z: Tensor, g: Tensor, dim: int) -> Tensor:
    return _call("unit_stats", z.device, z, g, dim)


@_unit_stats_op.register_fake
def _(z, g, dim):
    return z.new_empty((4, z.shape[dim]), dtype=torch.float32)


@torch.library.custom_op("fair_pruner::class_quantiles", mutates_args=())
def _class_quantiles_op(x: Tensor, counts: Tensor, q: int) -> Tensor:
    return _call("class_quantiles", x.device, x, counts, q)


@_class_quantiles_op.register_fake
def _(x, counts, q):
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3], q), dtype=torch.float32)


@torch.library.custom_op("fair_pruner::pairwise_w1_max", mutates_args=())
def _pairwise_w1_max_op(sk: Tensor) -> Tensor:
    return _call("pairwise_w1_max", sk.device, sk)


@_pairwise_w1_max_op.register_fake
def _(sk):
    return sk.new_empty((sk.shape[1],), dtype=torch.float32)


@torch.library.custom_op("fair_pruner::tod_overlap", mutates_args=())
def _tod_overlap_op(u: Tensor, r: Tensor, offsets: Tensor) -> Tensor:
    return _call("tod_overlap", u.device, u, r, offsets)


@_tod_overlap_op.register_fake
def _(u, r, offsets):
    return u.new_empty((u.shape[0] + offsets.shape[0] - 1,), dtype=torch.int64)


@torch.library.custom_op("fair_pruner::tod_select", mutates_args=())
def _tod_select_op(overlap: Tensor, offsets: Tensor, alphas: Tensor, cap: float) -> Tensor:
    return _call("tod_select", overlap.device, overlap, offsets, alphas, cap)


@_tod_select_op.register_fake
def _(overlap, offsets, alphas, cap):
    return overlap.new_empty((offsets.shape[0] - 1, alphas.shape[0]), dtype=torch.int64)


def taylor_sum(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [z.shape[dim]]: sum over all other dims of z * g (the Taylor term of each unit)."""
    _check_pair("taylor_sum", z, g, dim)
    return _taylor_sum_op(z, g, dim % z.dim())


def _check_pair(op: str, z: Tensor, g: Tensor, dim: int) -> None:
    if z.shape != g.shape:
        raise ValueError(f"{op}: activation shape {tuple(z.shape)} != gradient shape "
                         f"{tuple(g.shape)}")
    if z.device != g.device:
        raise ValueError(f"{op}: activation on {z.device} but gradient on {g.device}")
    if not (z.is_floating_point() and g.is_floating_point()):
        raise ValueError(f"{op}: expected floating-point tensors, got {z.dtype} and {g.dtype}")
    if not (-z.dim() <= dim < z.dim()):
        raise ValueError(f"{op}: unit dim {dim} out of range for a {z.dim()}-d tensor")


def unit_stats(z: Tensor, g: Tensor, dim: int) -> Tensor:
    """fp32 [4, z.shape[dim]]: per unit, sums over all other dims of z*g, |z|, z and z^2.

    One read of z and g on the compiled backends (the fused form of :func:`taylor_sum` plus the
    activation moments calibration keeps).
    """
    _check_pair("unit_stats", z, g, dim)
    return _unit_stats_op(z, g, dim % z.dim())


def class_quantiles(x: Tensor, counts: Tensor, q: int) -> Tensor:
    """fp32 [K, U, P, Q] quantile sketches of class samples x [K, S, U, P] (see the reference)."""
    if x.dim() != 4:
        raise ValueError(f"class_quantiles: expected [K, S, U, P] samples, got shape {tuple(x.shape)}")
    counts = counts.to(device=x.device, dtype=torch.int64)
    if counts.numel() != x.shape[0]:
        raise ValueError("class_quantiles: counts must have one entry per class")
    if q < 1:
        raise ValueError("class_quantiles: q must be >= 1")
    if x.shape[0] and (int(counts.min()) < 1 or int(counts.max()) > x.shape[1]):
        raise ValueError(f"class_quantiles: counts must lie in [1, {x.shape[1]}]")
    return _class_quantiles_op(x, counts, int(q))


def pairwise_w1_max(sk: Tensor) -> Tensor:
    """fp32 [U]: max over class pairs of the (sliced) W1 between sketches sk [K, U, P, Q]."""
    if sk.dim() != 4:
        raise ValueError(f"pairwise_w1_max: expected [K, U, P, Q] sketches, got {tuple(sk.shape)}")
    if sk.shape[0] < 2:
        raise ValueError("pairwise_w1_max: need at least two classes")
    return _pairwise_w1_max_op(sk)


def tod_overlap(u: Tensor, r: Tensor, offsets: Tensor) -> Tensor:
    """int64 [N + G] overlap curves of ragged groups (see the reference for the layout)."""
    if u.shape != r.shape or u.dim() != 1:
        raise ValueError("tod_overlap: u and r must be 1-d tensors of equal length")
    offsets = offsets.to(device=u.device, dtype=torch.int64)
    if offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != u.numel():
        raise ValueError("tod_overlap: offsets must start at 0 and end at len(u)")
    return _tod_overlap_op(u, r, offsets)


def tod_select(overlap: Tensor, offsets: Tensor, alphas: Tensor, cap: float = 0.99) -> Tensor:
    """int64 [G, A]: units to remove per group for each tolerance in ``alphas``."""
    offsets = offsets.to(device=overlap.device, dtype=torch.int64)
    alphas = torch.as_tensor(alphas, dtype=torch.float64, device=overlap.device).reshape(-1)
    return _tod_select_op(overlap, offsets, alphas, float(cap))
