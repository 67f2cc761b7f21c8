// CUDA kernels behind fair_pruner.ops (torch-free; C launchers bound in bindings.cpp).
//
// unit_stats: z, g viewed as [A, C, I] with element strides (unit dim C):
//   part[s, 0..3, c] = sums over split s of the positions of z*g, |z|, z, z^2 (fp32).
// pairwise_w1_max: sk [K, U, P, Q] strided -> out[u] = max_{a<b} mean_{p,q} |sk[a,u] - sk[b,u]|.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

constexpr int kLanesX = 32, kLanesY = 8;  // 256 threads per block

// UF (units fast): lanes x walk units (coalesced when the unit stride is 1, channels-last);
// otherwise lanes x walk positions (coalesced for NCHW and [B, T, F]-transposed layouts).
template <typename T, bool STATS, bool UF>
__global__ void unit_stats_kernel(const T* __restrict__ z, const T* __restrict__ g,
                                  float* __restrict__ part, int64_t A, int64_t C, int64_t I,
                                  int64_t sza, int64_t szc, int64_t szi, int64_t sga,
                                  int64_t sgc, int64_t sgi, int64_t per_split) {
  constexpr int BC = UF ? kLanesX : kLanesY;      // units per block
  constexpr int NL = UF ? kLanesY : kLanesX;      // position lanes per unit
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int lane_c = UF ? tx : ty, lane_p = UF ? ty : tx;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * BC + lane_c;
  const int64_t npos = A * I;
  const int64_t p_lo = static_cast<int64_t>(blockIdx.y) * per_split;
  const int64_t p_hi = min(p_lo + per_split, npos);
  float t = 0.f, sa = 0.f, sm = 0.f, sq = 0.f;
  if (c < C && p_lo + lane_p < p_hi) {
    // Position p = a * I + i, advanced by NL per step without a division in the loop.
    int64_t a = (p_lo + lane_p) / I, i = (p_lo + lane_p) - a * I;
    const int64_t da = NL / I, di = NL - da * I;
    for (int64_t p = p_lo + lane_p; p < p_hi; p += NL) {
      const float zv = to_f32(z[a * sza + c * szc + i * szi]);
      const float gv = to_f32(g[a * sga + c * sgc + i * sgi]);
      t += zv * gv;
      if (STATS) {
        sa += fabsf(zv);
        sm += zv;
        sq += zv * zv;
      }
      a += da;
      i += di;
      if (i >= I) {
        i -= I;
        ++a;
      }
    }
  }
  __shared__ float sh[4][kLanesY][kLanesX];
  sh[0][ty][tx] = t;
  sh[1][ty][tx] = sa;
  sh[2][ty][tx] = sm;
  sh[3][ty][tx] = sq;
  __syncthreads();
  if (lane_p == 0 && c < C) {
    float r[4] = {0.f, 0.f, 0.f, 0.f};
    for (int l = 0; l < NL; ++l)
      for (int j = 0; j < 4; ++j) r[j] += UF ? sh[j][l][tx] : sh[j][ty][l];
    float* out = part + static_cast<int64_t>(blockIdx.y) * 4 * C + c;
    for (int j = 0; j < (STATS ? 4 : 1); ++j) out[j * C] = r[j];
  }
}

template <typename T>
int launch_unit_stats(const void* z, const void* g, float* part, int64_t A, int64_t C,
                      int64_t I, const int64_t* sz, const int64_t* sg, bool stats, int64_t split,
                      int64_t per_split, cudaStream_t stream) {
  const bool uf = sz[1] == 1 || (sz[2] != 1 && sz[1] < sz[2]);
  const dim3 block(kLanesX, kLanesY);
  const int64_t bc = uf ? kLanesX : kLanesY;
  const dim3 grid(static_cast<unsigned>((C + bc - 1) / bc), static_cast<unsigned>(split));
  const T* zt = static_cast<const T*>(z);
  const T* gt = static_cast<const T*>(g);
#define FP_LAUNCH(S, U)                                                                       \
  unit_stats_kernel<T, S, U><<<grid, block, 0, stream>>>(zt, gt, part, A, C, I, sz[0], sz[1], \
                                                         sz[2], sg[0], sg[1], sg[2], per_split)
  if (stats && uf) FP_LAUNCH(true, true);
  else if (stats) FP_LAUNCH(true, false);
  else if (uf) FP_LAUNCH(false, true);
  else FP_LAUNCH(false, false);
#undef FP_LAUNCH
  return static_cast<int>(cudaGetLastError());
}

// One block per unit. Each chunk of CH (p, q) entries of all K classes is staged in shared memory
// (rows padded by one float against bank conflicts); thread pairs (a, b) accumulate their L1 sum
// in shared memory; a block max reduction (NaN-propagating) gives the unit's score.
template <typename T>
__global__ void pairwise_w1_max_kernel(const T* __restrict__ sk, float* __restrict__ out,
                                       int64_t K, int64_t P, int64_t Q, int64_t sk_k,
                                       int64_t sk_u, int64_t sk_p, int64_t sk_q, int64_t CH) {
  extern __shared__ float smem[];
  const int64_t npairs = K * (K - 1) / 2;
  float* acc = smem;                  // [npairs]
  float* stage = smem + npairs;       // [K, CH + 1]
  const int64_t L = P * Q, row = CH + 1;
  const T* base = sk + static_cast<int64_t>(blockIdx.x) * sk_u;
  for (int64_t i = threadIdx.x; i < npairs; i += blockDim.x) acc[i] = 0.f;
  for (int64_t c0 = 0; c0 < L; c0 += CH) {
    const int64_t len = min(CH, L - c0);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < K * len; e += blockDim.x) {
      const int64_t k = e / len, j = e - k * len, f = c0 + j;
      stage[k * row + j] = to_f32(base[k * sk_k + (f / Q) * sk_p + (f % Q) * sk_q]);
    }
    __syncthreads();
    for (int64_t pi = threadIdx.x; pi < K * K; pi += blockDim.x) {
      const int64_t a = pi / K, b = pi - a * K;
      if (b <= a) continue;
      const float* xa = stage + a * row;
      const float* xb = stage + b * row;
      float s = 0.f;
      for (int64_t j = 0; j < len; ++j) s += fabsf(xa[j] - xb[j]);
      acc[a * K - a * (a + 1) / 2 + (b - a - 1)] += s;
    }
  }
  __syncthreads();
  float best = 0.f;
  bool nan = false;
  for (int64_t i = threadIdx.x; i < npairs; i += blockDim.x) {
    const float d = acc[i] / static_cast<float>(L);
    nan |= d != d;
    best = d > best ? d : best;
  }
  __shared__ float red[256];
  __shared__ int any_nan;
  if (threadIdx.x == 0) any_nan = 0;
  red[threadIdx.x] = best;
  __syncthreads();
  if (nan) atomicOr(&any_nan, 1);
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = any_nan ? __int_as_float(0x7fc00000) : red[0];
}

template <typename T>
int launch_pairwise(const void* sk, float* out, int64_t K, int64_t U, int64_t P, int64_t Q,
                    const int64_t* ss, cudaStream_t stream) {
  constexpr int64_t kSmem = 47 * 1024;  // 48 KiB per block, less the static reduction buffers
  const int64_t npairs = K * (K - 1) / 2;
  const int64_t room = kSmem / 4 - npairs;
  if (U == 0) return 0;
  if (room < 2 * K) return -1;  // too many classes for one block's shared memory
  const int64_t CH = min(P * Q, room / K - 1);
  const size_t bytes = static_cast<size_t>(npairs + K * (CH + 1)) * sizeof(float);
  pairwise_w1_max_kernel<T><<<static_cast<unsigned>(U), 256, bytes, stream>>>(
      static_cast<const T*>(sk), out, K, P, Q, ss[0], ss[1], ss[2], ss[3], CH);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// dtype: 0 fp32, 1 fp16, 2 bf16. Return 0, a cudaError_t, or -1 (unsupported arguments).
extern "C" int fp_cuda_unit_stats(int dtype, const void* z, const void* g, float* part, int64_t A,
                                  int64_t C, int64_t I, const int64_t* sz, const int64_t* sg,
                                  int stats, int64_t split, int64_t per_split, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch_unit_stats<float>(z, g, part, A, C, I, sz, sg, stats, split, per_split, s);
    case 1:
      return launch_unit_stats<__half>(z, g, part, A, C, I, sz, sg, stats, split, per_split, s);
    case 2:
      return launch_unit_stats<__nv_bfloat16>(z, g, part, A, C, I, sz, sg, stats, split,
                                              per_split, s);
    default: return -1;
  }
}

extern "C" int fp_cuda_pairwise_w1_max(int dtype, const void* sk, float* out, int64_t K, int64_t U,
                                       int64_t P, int64_t Q, const int64_t* ss, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_pairwise<float>(sk, out, K, U, P, Q, ss, s);
    case 1: return launch_pairwise<__half>(sk, out, K, U, P, Q, ss, s);
    case 2: return launch_pairwise<__nv_bfloat16>(sk, out, K, U, P, Q, ss, s);
    default: return -1;
  }
}
