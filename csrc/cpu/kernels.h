// C++/OpenMP CPU kernels behind fair_pruner.ops (torch-free interfaces; bound in bindings.cpp).
//
// Scalars T are float, double, c10::Half or c10::BFloat16; every sum accumulates in fp32 inside
// short runs and in fp64 across runs. Work is split with at::parallel_for, so
// torch.set_num_threads bounds the threads used.
#pragma once
#include <cstdint>

namespace fair_pruner {

constexpr int kMaxDims = 8;

// A strided walk over the positions of a tensor (every dim but the unit dim), outer to inner:
// position i has multi-index (i_0..i_{n-1}) and element offsets sum_d i_d * sz[d] (z) and
// sum_d i_d * sg[d] (g). Dims are coalesced and size-1 dims dropped by the caller.
struct Walk {
  int ndim = 0;
  int64_t size[kMaxDims];
  int64_t sz[kMaxDims];
  int64_t sg[kMaxDims];
};

// out[0, c] = sum z*g; with stats, also out[1, c] = sum |z|, out[2, c] = sum z, out[3, c] =
// sum z^2 (out is fp32 [1 or 4, C], sums over every position of unit c; the unit's element
// offsets are c * uz (z) and c * ug (g)).
template <typename T>
void unit_stats(const T* z, const T* g, int64_t C, int64_t uz, int64_t ug, const Walk& pos,
                bool stats, float* out);

// x: [K, S, U, P] with element strides xs[4]; counts[k] in [1, S]. out: contiguous fp32
// [K, U, P, Q], out[k, u, p, i] = sorted(x[k, :n_k, u, p])[floor((n_k (2i+1) - 1) / 2Q)],
// NaN sorting last (as torch.sort).
template <typename T>
void class_quantiles(const T* x, const int64_t* xs, const int64_t* counts, int64_t K, int64_t S,
                     int64_t U, int64_t P, int64_t Q, float* out);

// sk: [K, U, P, Q] with element strides ss[4]. out: fp32 [U], out[u] = max over a < b of
// mean over (P, Q) of |sk[a, u] - sk[b, u]|.
template <typename T>
void pairwise_w1_max(const T* sk, const int64_t* ss, int64_t K, int64_t U, int64_t P, int64_t Q,
                     float* out);

// x, counts as class_quantiles (K >= 2). out: fp32 [U] = pairwise_w1_max(class_quantiles(x,
// counts, Q)), bit for bit, without materialising the sketch.
template <typename T>
void class_w1_max(const T* x, const int64_t* xs, const int64_t* counts, int64_t K, int64_t S,
                  int64_t U, int64_t P, int64_t Q, float* out);

// u, r: [N] scores of G ragged groups [offsets[g], offsets[g+1]). out: int64 [N + G], group
// g's overlap curve for m = 0..n_g at out[offsets[g] + g + m] (see ops.tod_overlap).
template <typename T>
void tod_overlap(const T* u, const T* r, const int64_t* offsets, int64_t G, int64_t* out);

// out: int64 [G, A], out[g, a] = max{1 <= m <= floor(cap n_g) : overlap_g(m) / m <= alphas[a]}
// or 0 (see ops.tod_select).
void tod_select(const int64_t* overlap, const int64_t* offsets, int64_t G, const double* alphas,
                int64_t A, double cap, int64_t* out);

}  // namespace fair_pruner
