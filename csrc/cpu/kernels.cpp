// C++/OpenMP CPU kernels behind fair_pruner.ops; semantics in kernels.h and fair_pruner/ops.py.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Hot loops get AVX2 / AVX-512 clones picked at load time; the binary still runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FP_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define FP_MULTIVERSION
#endif

namespace fair_pruner {
namespace {

constexpr int64_t kRun = 4096;  // longest run summed in fp32 before it is added to fp64

template <typename T>
inline float f32(T v) {
  return static_cast<float>(v);
}

// ---------------------------------------------------------------------------------------------
// unit_stats
// ---------------------------------------------------------------------------------------------

// Sums over one run of n elements: acc += (z*g, |z|, z, z^2), fp32 inside the run. The
// contiguous case keeps kLanes independent partial sums (several vector accumulators, so the
// loop is bound by memory, not by the latency of one add chain).
constexpr int64_t kLanes = 32;

template <typename T, bool STATS>
FP_MULTIVERSION void run_sums(const T* z, const T* g, int64_t n, int64_t sz, int64_t sg,
                              double* acc) {
  for (int64_t s = 0; s < n; s += kRun) {
    const int64_t e = std::min(n, s + kRun);
    float t = 0.f, a = 0.f, m = 0.f, q = 0.f;
    int64_t i = s;
    if (sz == 1 && sg == 1) {
      float lt[kLanes] = {}, la[kLanes] = {}, lm[kLanes] = {}, lq[kLanes] = {};
      for (; i + kLanes <= e; i += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) {
          const float zv = f32(z[i + j]), gv = f32(g[i + j]);
          lt[j] += zv * gv;
          if (STATS) {
            la[j] += std::fabs(zv);
            lm[j] += zv;
            lq[j] += zv * zv;
          }
        }
      }
      for (int64_t j = 0; j < kLanes; ++j) {
        t += lt[j];
        a += la[j];
        m += lm[j];
        q += lq[j];
      }
    }
    for (; i < e; ++i) {
      const float zv = f32(z[i * sz]), gv = f32(g[i * sg]);
      t += zv * gv;
      if (STATS) {
        a += std::fabs(zv);
        m += zv;
        q += zv * zv;
      }
    }
    acc[0] += t;
    if (STATS) {
      acc[1] += a;
      acc[2] += m;
      acc[3] += q;
    }
  }
}

// Offsets of position `idx` over the first `nd` dims of `w`.
inline void offsets_of(const Walk& w, int nd, int64_t idx, int64_t& oz, int64_t& og) {
  oz = og = 0;
  for (int d = nd - 1; d >= 0; --d) {
    const int64_t i = idx % w.size[d];
    idx /= w.size[d];
    oz += i * w.sz[d];
    og += i * w.sg[d];
  }
}

// Units outer to the innermost position dim (e.g. NCHW): one fp32 run per (outer position, unit).
template <typename T, bool STATS>
void stats_units_outer(const T* z, const T* g, int64_t C, int64_t uz, int64_t ug, const Walk& w,
                       double* part, int64_t nacc) {
  const int nd = w.ndim - 1;
  const int64_t inner = w.size[nd], iz = w.sz[nd], ig = w.sg[nd];
  int64_t outer = 1;
  for (int d = 0; d < nd; ++d) outer *= w.size[d];
  // Unit-major item order when the unit dim is the outermost in memory, else position-major.
  const bool unit_major = nd == 0 || std::llabs(uz) >= std::llabs(w.sz[0]);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, inner));
  at::parallel_for(0, outer * C, grain, [&](int64_t b, int64_t e) {
    double* acc = part + at::get_thread_num() * nacc * C;
    for (int64_t it = b; it < e; ++it) {
      const int64_t c = unit_major ? it / outer : it % C;
      const int64_t o = unit_major ? it % outer : it / C;
      int64_t oz, og;
      offsets_of(w, nd, o, oz, og);
      double r[4] = {0, 0, 0, 0};
      run_sums<T, STATS>(z + oz + c * uz, g + og + c * ug, inner, iz, ig, r);
      for (int64_t j = 0; j < nacc; ++j) acc[j * C + c] += r[j];
    }
  });
}

// Units innermost (channels-last, [N, F], [B, T, F]): per position, a loop over the units.
template <typename T, bool STATS>
FP_MULTIVERSION void units_inner_block(const T* z, const T* g, int64_t C, float* f) {
  float* ft = f;
  float* fa = f + C;
  float* fm = f + 2 * C;
  float* fq = f + 3 * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float zv = f32(z[c]), gv = f32(g[c]);
    ft[c] += zv * gv;
    if (STATS) {
      fa[c] += std::fabs(zv);
      fm[c] += zv;
      fq[c] += zv * zv;
    }
  }
}

template <typename T, bool STATS>
void stats_units_inner(const T* z, const T* g, int64_t C, int64_t uz, int64_t ug, const Walk& w,
                       double* part, int64_t nacc) {
  int64_t npos = 1;
  for (int d = 0; d < w.ndim; ++d) npos *= w.size[d];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  constexpr int64_t kBlock = 256;  // positions summed in fp32 before the fp64 flush
  at::parallel_for(0, npos, grain, [&](int64_t b, int64_t e) {
    double* acc = part + at::get_thread_num() * nacc * C;
    std::vector<float> f(nacc * C, 0.f);
    int64_t idx[kMaxDims];
    int64_t rest = b;
    for (int d = w.ndim - 1; d >= 0; --d) {
      idx[d] = rest % w.size[d];
      rest /= w.size[d];
    }
    int64_t oz, og;
    offsets_of(w, w.ndim, b, oz, og);
    int64_t in_block = 0;
    for (int64_t p = b; p < e; ++p) {
      if (uz == 1 && ug == 1) {
        units_inner_block<T, STATS>(z + oz, g + og, C, f.data());
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float zv = f32(z[oz + c * uz]), gv = f32(g[og + c * ug]);
          f[c] += zv * gv;
          if (STATS) {
            f[C + c] += std::fabs(zv);
            f[2 * C + c] += zv;
            f[3 * C + c] += zv * zv;
          }
        }
      }
      if (++in_block == kBlock || p + 1 == e) {
        for (int64_t j = 0; j < nacc * C; ++j) {
          acc[j] += f[j];
          f[j] = 0.f;
        }
        in_block = 0;
      }
      for (int d = w.ndim - 1; d >= 0; --d) {  // odometer step to the next position
        oz += w.sz[d];
        og += w.sg[d];
        if (++idx[d] < w.size[d]) break;
        oz -= idx[d] * w.sz[d];
        og -= idx[d] * w.sg[d];
        idx[d] = 0;
      }
    }
  });
}

template <typename T, bool STATS>
void unit_stats_impl(const T* z, const T* g, int64_t C, int64_t uz, int64_t ug, const Walk& w,
                     float* out) {
  const int64_t nacc = STATS ? 4 : 1;
  int64_t npos = 1;
  for (int d = 0; d < w.ndim; ++d) npos *= w.size[d];
  if (C == 0) return;
  if (npos == 0) {
    std::fill(out, out + nacc * C, 0.f);
    return;
  }
  const int nthreads = at::get_num_threads();
  std::vector<double> part(static_cast<size_t>(nthreads) * nacc * C, 0.0);
  Walk ww = w;
  if (ww.ndim == 0) {  // a single position: one run of length 1
    ww.ndim = 1;
    ww.size[0] = 1;
    ww.sz[0] = ww.sg[0] = 0;
  }
  const int64_t inner_stride = std::llabs(ww.sz[ww.ndim - 1]);
  if (std::llabs(uz) < inner_stride) {
    stats_units_inner<T, STATS>(z, g, C, uz, ug, ww, part.data(), nacc);
  } else {
    stats_units_outer<T, STATS>(z, g, C, uz, ug, ww, part.data(), nacc);
  }
  for (int64_t j = 0; j < nacc * C; ++j) {
    double s = 0.0;
    for (int t = 0; t < nthreads; ++t) s += part[t * nacc * C + j];
    out[j] = static_cast<float>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// class_quantiles
// ---------------------------------------------------------------------------------------------

constexpr int64_t kCols = 64;  // columns (unit, projection) sorted together

inline bool nan_last_less(float a, float b) {
  return std::isnan(b) ? !std::isnan(a) : a < b;
}

// Bitonic sorting network over the N rows of a [N, kCols] block, vectorised across columns.
FP_MULTIVERSION void bitonic_rows(float* rows, int64_t N) {
  for (int64_t k = 2; k <= N; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t i = 0; i < N; ++i) {
        const int64_t l = i ^ j;
        if (l <= i) continue;
        float* lo = rows + ((i & k) == 0 ? i : l) * kCols;
        float* hi = rows + ((i & k) == 0 ? l : i) * kCols;
#pragma omp simd
        for (int64_t c = 0; c < kCols; ++c) {
          const float a = lo[c], b = hi[c];
          lo[c] = b < a ? b : a;
          hi[c] = b < a ? a : b;
        }
      }
    }
  }
}

// row[0..w) = float(src[0..w)), row[w..kCols) = +inf; returns whether any value is NaN.
template <typename T>
FP_MULTIVERSION bool load_row(const T* src, int64_t w, float* row) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t c = 0; c < w; ++c) {
    const float v = f32(src[c]);
    row[c] = v;
    nan |= (v != v);
  }
  for (int64_t c = w; c < kCols; ++c) row[c] = std::numeric_limits<float>::infinity();
  return nan != 0;
}

// Sorts columns [j0, j0 + w) (flat (unit, projection) index j = u P + p) of class k's first n
// samples into rows [Nn, kCols] (Nn = n rounded up to a power of two, +inf padding, NaN last).
template <typename T>
void sort_block(const T* x, const int64_t* xs, int64_t k, int64_t n, int64_t P, int64_t j0,
                int64_t w, float* rows, float* col) {
  int64_t Nn = 1;
  while (Nn < n) Nn <<= 1;
  bool has_nan = false;
  // (unit, projection) columns are contiguous in the common layout: a plain row copy
  const bool flat = xs[3] == 1 && xs[2] == P;
  for (int64_t s = 0; s < Nn; ++s) {
    float* row = rows + s * kCols;
    if (s < n && flat) {
      has_nan |= load_row(x + k * xs[0] + s * xs[1] + j0, w, row);
      continue;
    }
    for (int64_t c = 0; c < kCols; ++c) {
      float v = std::numeric_limits<float>::infinity();
      if (s < n && c < w) {
        const int64_t j = j0 + c;
        v = f32(x[k * xs[0] + s * xs[1] + (j / P) * xs[2] + (j % P) * xs[3]]);
        has_nan |= std::isnan(v);
      }
      row[c] = v;
    }
  }
  if (!has_nan) {
    bitonic_rows(rows, Nn);
  } else {  // NaN breaks min/max networks: sort those columns with torch's NaN-last order
    for (int64_t c = 0; c < w; ++c) {
      for (int64_t s = 0; s < n; ++s) col[s] = rows[s * kCols + c];
      std::sort(col, col + n, nan_last_less);
      for (int64_t s = 0; s < n; ++s) rows[s * kCols + c] = col[s];
    }
  }
}

// lev[i] = floor((n (2i + 1) - 1) / 2Q): the sorted-sample index of quantile level i.
inline void quantile_levels(int64_t n, int64_t Q, int64_t* lev) {
  for (int64_t i = 0; i < Q; ++i) lev[i] = (n * (2 * i + 1) - 1) / (2 * Q);
}

template <typename T>
void class_quantiles_impl(const T* x, const int64_t* xs, const int64_t* counts, int64_t K,
                          int64_t S, int64_t U, int64_t P, int64_t Q, float* out) {
  const int64_t cols = U * P;
  const int64_t nblk = (cols + kCols - 1) / kCols;
  if (K == 0 || cols == 0) return;
  int64_t N = 1;
  while (N < S) N <<= 1;
  at::parallel_for(0, K * nblk, 1, [&](int64_t b, int64_t e) {
    std::vector<float> rows(N * kCols);
    std::vector<float> col(S);
    std::vector<int64_t> lev(Q);
    for (int64_t it = b; it < e; ++it) {
      const int64_t k = it / nblk, c0 = (it % nblk) * kCols;
      const int64_t w = std::min(kCols, cols - c0);
      sort_block(x, xs, k, counts[k], P, c0, w, rows.data(), col.data());
      quantile_levels(counts[k], Q, lev.data());
      for (int64_t c = 0; c < w; ++c) {
        float* o = out + (k * cols + c0 + c) * Q;
        for (int64_t i = 0; i < Q; ++i) o[i] = rows[lev[i] * kCols + c];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// pairwise_w1_max
// ---------------------------------------------------------------------------------------------

constexpr int64_t kChunk = 512;  // (P, Q) entries per class staged at once (K x 2 KiB in cache)

// acc[b] += sum_j |xa[j] - xb_b[j]| for the nb rows xb_b = rows + b * stride.
FP_MULTIVERSION void l1_to_rows(const float* xa, const float* rows, int64_t nb, int64_t len,
                                int64_t stride, float* acc) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = rows + b * stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += std::fabs(xa[j] - xb[j]);
    acc[b] += s;
  }
}

// max over class pairs a < b of mean_j |row_a[j] - row_b[j]| for K rows of length L, fetched in
// chunks by load(k, c0, len, dst) into buf [K, kChunk]; acc: K x K scratch. NaN propagates.
template <typename Load>
float rows_w1_max(int64_t K, int64_t L, const Load& load, float* buf, float* acc) {
  std::fill(acc, acc + K * K, 0.f);
  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t len = std::min(kChunk, L - c0);
    for (int64_t k = 0; k < K; ++k) load(k, c0, len, buf + k * kChunk);
    for (int64_t a = 0; a + 1 < K; ++a) {
      l1_to_rows(buf + a * kChunk, buf + (a + 1) * kChunk, K - a - 1, len, kChunk,
                 acc + a * K + a + 1);
    }
  }
  float best = 0.f;  // NaN-propagating max, as torch.maximum / amax
  for (int64_t a = 0; a + 1 < K; ++a) {
    for (int64_t c = a + 1; c < K; ++c) {
      const float d = acc[a * K + c] / static_cast<float>(L);
      if (std::isnan(d) || d > best) best = d;
      if (std::isnan(best)) return best;
    }
  }
  return best;
}

template <typename T>
void pairwise_w1_max_impl(const T* sk, const int64_t* ss, int64_t K, int64_t U, int64_t P,
                          int64_t Q, float* out) {
  const int64_t L = P * Q;
  const bool flat = ss[3] == 1 && (ss[2] == Q || P == 1);  // (P, Q) contiguous
  at::parallel_for(0, U, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(K * kChunk);
    std::vector<float> acc(K * K);
    for (int64_t u = b; u < e; ++u) {
      auto load = [&](int64_t k, int64_t c0, int64_t len, float* dst) {
        const T* base = sk + k * ss[0] + u * ss[1];
        if (flat) {
          for (int64_t j = 0; j < len; ++j) dst[j] = f32(base[c0 + j]);
        } else {
          for (int64_t j = 0; j < len; ++j) {
            const int64_t f = c0 + j;
            dst[j] = f32(base[(f / Q) * ss[2] + (f % Q) * ss[3]]);
          }
        }
      };
      out[u] = rows_w1_max(K, L, load, buf.data(), acc.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// class_w1_max: pairwise_w1_max(class_quantiles(x)) without the [K, U, P, Q] sketch in memory
// ---------------------------------------------------------------------------------------------

// Units in tiles of up to kCols flat columns (one unit per tile when P >= kCols): each class's
// columns of the tile are sorted as in class_quantiles, their quantiles written into a
// thread-local [tile units, K, P, Q] sketch, and each unit's W1 max computed from it as in
// pairwise_w1_max (same values, same summation order: bit-identical to the two ops).
template <typename T>
void class_w1_max_impl(const T* x, const int64_t* xs, const int64_t* counts, int64_t K,
                       int64_t S, int64_t U, int64_t P, int64_t Q, float* out) {
  if (U == 0 || K < 2) return;
  const int64_t L = P * Q;
  const int64_t ut = P >= kCols ? 1 : kCols / P;
  const int64_t ntile = (U + ut - 1) / ut;
  int64_t N = 1;
  while (N < S) N <<= 1;
  at::parallel_for(0, ntile, 1, [&](int64_t b, int64_t e) {
    std::vector<float> rows(N * kCols), col(S), sk(ut * K * L), buf(K * kChunk), acc(K * K);
    std::vector<int64_t> lev(Q);
    for (int64_t t = b; t < e; ++t) {
      const int64_t u0 = t * ut, nu = std::min(ut, U - u0);
      const int64_t tcols = nu * P;
      for (int64_t k = 0; k < K; ++k) {
        quantile_levels(counts[k], Q, lev.data());
        for (int64_t c0 = 0; c0 < tcols; c0 += kCols) {
          const int64_t w = std::min(kCols, tcols - c0);
          sort_block(x, xs, k, counts[k], P, u0 * P + c0, w, rows.data(), col.data());
          for (int64_t c = 0; c < w; ++c) {
            const int64_t j = c0 + c;
            float* o = sk.data() + ((j / P) * K + k) * L + (j % P) * Q;
            for (int64_t i = 0; i < Q; ++i) o[i] = rows[lev[i] * kCols + c];
          }
        }
      }
      for (int64_t v = 0; v < nu; ++v) {
        const float* unit = sk.data() + v * K * L;
        auto load = [&](int64_t k, int64_t c0, int64_t len, float* dst) {
          std::memcpy(dst, unit + k * L + c0, len * sizeof(float));
        };
        out[u0 + v] = rows_w1_max(K, L, load, buf.data(), acc.data());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// ToD
// ---------------------------------------------------------------------------------------------

// Order-preserving uint64 key of a double: -0.0 == 0.0, every NaN largest (as torch.sort).
inline uint64_t sort_key(double v) {
  if (std::isnan(v)) return ~0ull;
  if (v == 0.0) v = 0.0;
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits >> 63) ? ~bits : (bits | (1ull << 63));
}

// rank[i] = position of element i when sorted by (key, i). LSD radix sort of (prefix, index)
// pairs packed in one uint64, where the prefix is the top 22 bits of key - min(key) (2 stable
// passes of 11 bits, a pass with one occupied bucket skipped): normalising by the keys' own range
// spends the prefix bits where the scores actually differ, so 2 passes order all but a few
// pairs. Runs with an equal prefix are then ordered by the full key (none when the range fits in
// 22 bits: the prefix is the key itself and the stable passes keep ties in index order).
void stable_ranks(const uint64_t* key, int64_t n, std::vector<uint64_t>& a,
                  std::vector<uint64_t>& b, int64_t* rank) {
  constexpr int kBits = 11, kPasses = 2, kBuckets = 1 << kBits;
  if (n == 0) return;
  a.resize(n);
  b.resize(n);
  uint64_t lo = key[0], hi = key[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, key[i]);
    hi = std::max(hi, key[i]);
  }
  const uint64_t range = hi - lo;
  int width = 0;
  while (width < 64 && (range >> width) != 0) ++width;
  const int shift = std::max(0, width - kBits * kPasses);
  uint32_t hist[kPasses * kBuckets] = {};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t t = static_cast<uint32_t>((key[i] - lo) >> shift);
    a[i] = (static_cast<uint64_t>(t) << 32) | static_cast<uint64_t>(i);
    ++hist[t & (kBuckets - 1)];
    ++hist[kBuckets + (t >> kBits)];
  }
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* h = hist + p * kBuckets;
    const int sh = 32 + p * kBits;
    if (h[(a[0] >> sh) & (kBuckets - 1)] == n) continue;
    uint32_t sum = 0;
    for (int q = 0; q < kBuckets; ++q) {
      const uint32_t c = h[q];
      h[q] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t v = a[i];
      b[h[(v >> sh) & (kBuckets - 1)]++] = v;
    }
    a.swap(b);
  }
  if (shift == 0) {
    for (int64_t pos = 0; pos < n; ++pos) rank[static_cast<uint32_t>(a[pos])] = pos;
    return;
  }
  auto less = [&](uint64_t x, uint64_t y) {
    const uint32_t ix = static_cast<uint32_t>(x), iy = static_cast<uint32_t>(y);
    return key[ix] < key[iy] || (key[ix] == key[iy] && ix < iy);
  };
  int64_t s = 0;
  for (int64_t pos = 1; pos <= n; ++pos) {
    if (pos < n && (a[pos] >> 32) == (a[pos - 1] >> 32)) continue;
    if (pos - s > 1) std::sort(a.begin() + s, a.begin() + pos, less);
    for (; s < pos; ++s) rank[static_cast<uint32_t>(a[s])] = s;
  }
}

template <typename T>
void tod_overlap_impl(const T* u, const T* r, const int64_t* offsets, int64_t G, int64_t* out) {
  // Threads only pay off for large inputs (waking them costs more than sorting a few groups).
  const int64_t grain = offsets[G] < (1 << 15) ? std::max<int64_t>(G, 1) : 1;
  at::parallel_for(0, G, grain, [&](int64_t b, int64_t e) {
    // Per-thread scratch kept across calls: fresh pages cost more than the sorts at n ~ 10^4.
    thread_local std::vector<uint64_t> key, i0, i1;
    thread_local std::vector<int64_t> ra, rb;
    for (int64_t g = b; g < e; ++g) {
      const int64_t s = offsets[g], n = offsets[g + 1] - s;
      int64_t* curve = out + s + g;  // n + 1 entries, m = 0..n
      std::fill(curve, curve + n + 1, 0);
      if (n == 0) continue;
      key.resize(n);
      ra.resize(n);
      rb.resize(n);
      for (int64_t i = 0; i < n; ++i) key[i] = sort_key(static_cast<double>(u[s + i]));
      stable_ranks(key.data(), n, i0, i1, ra.data());
      for (int64_t i = 0; i < n; ++i) key[i] = sort_key(-static_cast<double>(r[s + i]));
      stable_ranks(key.data(), n, i0, i1, rb.data());
      for (int64_t i = 0; i < n; ++i) ++curve[std::max(ra[i], rb[i]) + 1];
      for (int64_t m = 1; m <= n; ++m) curve[m] += curve[m - 1];
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

template <typename T>
void unit_stats(const T* z, const T* g, int64_t C, int64_t uz, int64_t ug, const Walk& pos,
                bool stats, float* out) {
  if (stats)
    unit_stats_impl<T, true>(z, g, C, uz, ug, pos, out);
  else
    unit_stats_impl<T, false>(z, g, C, uz, ug, pos, out);
}

template <typename T>
void class_quantiles(const T* x, const int64_t* xs, const int64_t* counts, int64_t K, int64_t S,
                     int64_t U, int64_t P, int64_t Q, float* out) {
  class_quantiles_impl<T>(x, xs, counts, K, S, U, P, Q, out);
}

template <typename T>
void pairwise_w1_max(const T* sk, const int64_t* ss, int64_t K, int64_t U, int64_t P, int64_t Q,
                     float* out) {
  pairwise_w1_max_impl<T>(sk, ss, K, U, P, Q, out);
}

template <typename T>
void class_w1_max(const T* x, const int64_t* xs, const int64_t* counts, int64_t K, int64_t S,
                  int64_t U, int64_t P, int64_t Q, float* out) {
  class_w1_max_impl<T>(x, xs, counts, K, S, U, P, Q, out);
}

template <typename T>
void tod_overlap(const T* u, const T* r, const int64_t* offsets, int64_t G, int64_t* out) {
  tod_overlap_impl<T>(u, r, offsets, G, out);
}

void tod_select(const int64_t* overlap, const int64_t* offsets, int64_t G, const double* alphas,
                int64_t A, double cap, int64_t* out) {
  const int64_t work = offsets[G] * std::max<int64_t>(A, 1);
  const int64_t grain = work < (1 << 17) ? std::max<int64_t>(G, 1) : 1;
  at::parallel_for(0, G, grain, [&](int64_t b, int64_t e) {
    std::vector<double> sufmin;
    for (int64_t g = b; g < e; ++g) {
      const int64_t n = offsets[g + 1] - offsets[g];
      // floor(cap n) clamped to [0, n]: the curve has n + 1 entries, so a cap outside [0, 1]
      // (or NaN) must never read past it (fair_pruner.ops refuses such caps; this is the guard).
      int64_t mmax = 0;
      if (cap >= 1.0)
        mmax = n;
      else if (cap > 0.0)
        mmax = std::min<int64_t>(n, static_cast<int64_t>(cap * static_cast<double>(n)));
      int64_t* o = out + g * A;
      if (mmax < 1) {
        std::fill(o, o + A, 0);
        continue;
      }
      // sufmin[m-1] = min over m' in [m, mmax] of overlap(m') / m' (non-decreasing in m), so
      // m̂(alpha) = #{m : sufmin(m) <= alpha}; the ratios are the reference's exact doubles.
      const int64_t* curve = overlap + offsets[g] + g;
      // Ratios first (independent, so the divisions vectorise), then the running minimum.
      sufmin.resize(mmax);
      for (int64_t m = 1; m <= mmax; ++m)
        sufmin[m - 1] = static_cast<double>(curve[m]) / static_cast<double>(m);
      for (int64_t m = mmax - 1; m >= 1; --m)
        sufmin[m - 1] = std::min(sufmin[m - 1], sufmin[m]);
      for (int64_t a = 0; a < A; ++a) {
        const double al = alphas[a];
        o[a] = std::upper_bound(sufmin.begin(), sufmin.end(), al,
                                [](double x, double y) { return x < y; }) - sufmin.begin();
        if (std::isnan(al)) o[a] = 0;
      }
    }
  });
}

#define FP_INSTANTIATE(T)                                                                      \
  template void unit_stats<T>(const T*, const T*, int64_t, int64_t, int64_t, const Walk&, bool, \
                              float*);                                                          \
  template void class_quantiles<T>(const T*, const int64_t*, const int64_t*, int64_t, int64_t, \
                                   int64_t, int64_t, int64_t, float*);                         \
  template void pairwise_w1_max<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, \
                                   float*); \
  template void class_w1_max<T>(const T*, const int64_t*, const int64_t*, int64_t, int64_t,    \
                                int64_t, int64_t, int64_t, float*);
FP_INSTANTIATE(float)
FP_INSTANTIATE(double)
FP_INSTANTIATE(c10::Half)
FP_INSTANTIATE(c10::BFloat16)
#undef FP_INSTANTIATE
template void tod_overlap<float>(const float*, const float*, const int64_t*, int64_t, int64_t*);
template void tod_overlap<double>(const double*, const double*, const int64_t*, int64_t, int64_t*);

}  // namespace fair_pruner
