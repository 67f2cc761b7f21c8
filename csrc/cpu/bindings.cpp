// The one binding translation unit of fair_pruner._C: checks arguments, canonicalises strides and
// registers the CPU kernels as torch.library ops in namespace `fair_pruner_cpp` (visible to
// torch.compile and torch.ops). fair_pruner/_cpp_backend.py plugs them into fair_pruner.ops.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "kernels.h"

namespace fair_pruner {
namespace {

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// Positions of z/g (every dim but `dim`): size-1 dims dropped, ordered by z stride (outer to
// inner) and coalesced. False when more than kMaxDims dims remain.
bool make_walk(const at::Tensor& z, const at::Tensor& g, int64_t dim, Walk& w) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < z.dim(); ++d)
    if (d != dim && z.size(d) != 1) dims.push_back(d);
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) {
    return std::llabs(z.stride(a)) > std::llabs(z.stride(b));
  });
  w.ndim = 0;
  for (int64_t d : dims) {
    const int64_t n = z.size(d), sz = z.stride(d), sg = g.stride(d);
    if (w.ndim > 0) {
      const int last = w.ndim - 1;
      if (w.sz[last] == n * sz && w.sg[last] == n * sg) {  // contiguous with the previous dim
        w.size[last] *= n;
        w.sz[last] = sz;
        w.sg[last] = sg;
        continue;
      }
    }
    if (w.ndim == kMaxDims) return false;
    w.size[w.ndim] = n;
    w.sz[w.ndim] = sz;
    w.sg[w.ndim] = sg;
    ++w.ndim;
  }
  return true;
}

at::Tensor unit_stats_cpu(const at::Tensor& z_in, const at::Tensor& g_in, int64_t dim) {
  const char* op = "unit_stats";
  check_cpu(z_in, op, "z");
  check_cpu(g_in, op, "g");
  TORCH_CHECK(z_in.sizes() == g_in.sizes(), op, ": z shape ", z_in.sizes(), " != g shape ",
              g_in.sizes());
  TORCH_CHECK(z_in.dim() >= 1, op, ": z must have at least one dim");
  TORCH_CHECK(dim >= -z_in.dim() && dim < z_in.dim(), op, ": dim ", dim, " out of range");
  dim = dim < 0 ? dim + z_in.dim() : dim;
  at::Tensor z = z_in;
  at::Tensor g = g_in.scalar_type() == z.scalar_type() ? g_in : g_in.to(z.scalar_type());
  const int64_t C = z.size(dim);
  at::Tensor out = at::empty({4, C}, z.options().dtype(at::kFloat));
  Walk w;
  if (!make_walk(z, g, dim, w)) {
    z = z.contiguous();
    g = g.contiguous();
    make_walk(z, g, dim, w);
  }
  const int64_t uz = z.stride(dim), ug = g.stride(dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "unit_stats", [&] {
    unit_stats<scalar_t>(z.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), C, uz, ug,
                         w, true, out.mutable_data_ptr<float>());
  });
  return out;
}

// Checks x [K, S, U, P] (CPU, 4-d) and q of a class-sample op; returns counts as contiguous
// int64 [K], each in [1, S].
at::Tensor checked_samples(const at::Tensor& x, const at::Tensor& counts_in, int64_t q,
                           const char* op) {
  check_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected x [K, S, U, P], got ", x.sizes());
  TORCH_CHECK(q >= 1, op, ": q must be >= 1");
  const int64_t K = x.size(0), S = x.size(1);
  at::Tensor counts = counts_in.to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(counts.numel() == K, op, ": counts must have one entry per class");
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(cnt[k] >= 1 && cnt[k] <= S, op, ": counts must lie in [1, ", S, "]");
  return counts;
}

at::Tensor class_quantiles_cpu(const at::Tensor& x, const at::Tensor& counts_in, int64_t q) {
  at::Tensor counts = checked_samples(x, counts_in, q, "class_quantiles");
  const int64_t K = x.size(0), S = x.size(1), U = x.size(2), P = x.size(3);
  at::Tensor out = at::empty({K, U, P, q}, x.options().dtype(at::kFloat));
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_quantiles",
                                  [&] {
    class_quantiles<scalar_t>(x.const_data_ptr<scalar_t>(), xs,
                              counts.const_data_ptr<int64_t>(), K, S, U, P, q,
                              out.mutable_data_ptr<float>());
  });
  return out;
}

at::Tensor class_w1_max_cpu(const at::Tensor& x, const at::Tensor& counts_in, int64_t q) {
  at::Tensor counts = checked_samples(x, counts_in, q, "class_w1_max");
  const int64_t K = x.size(0), S = x.size(1), U = x.size(2), P = x.size(3);
  TORCH_CHECK(K >= 2, "class_w1_max: need at least two classes");
  at::Tensor out = at::empty({U}, x.options().dtype(at::kFloat));
  // no coordinates: the mean over an empty (P, Q) is 0 / 0, as in the two ops
  if (P == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_w1_max",
                                  [&] {
    class_w1_max<scalar_t>(x.const_data_ptr<scalar_t>(), xs, counts.const_data_ptr<int64_t>(),
                           K, S, U, P, q, out.mutable_data_ptr<float>());
  });
  return out;
}

at::Tensor pairwise_w1_max_cpu(const at::Tensor& sk) {
  check_cpu(sk, "pairwise_w1_max", "sk");
  TORCH_CHECK(sk.dim() == 4, "pairwise_w1_max: expected sk [K, U, P, Q], got ", sk.sizes());
  TORCH_CHECK(sk.size(0) >= 2, "pairwise_w1_max: need at least two classes");
  const int64_t ss[4] = {sk.stride(0), sk.stride(1), sk.stride(2), sk.stride(3)};
  at::Tensor out = at::empty({sk.size(1)}, sk.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sk.scalar_type(), "pairwise_w1_max",
                                  [&] {
    pairwise_w1_max<scalar_t>(sk.const_data_ptr<scalar_t>(), ss, sk.size(0), sk.size(1),
                              sk.size(2), sk.size(3), out.mutable_data_ptr<float>());
  });
  return out;
}

at::Tensor checked_offsets(const at::Tensor& offsets_in, int64_t N, const char* op) {
  at::Tensor offsets = offsets_in.to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, op, ": offsets must be 1-d, non-empty");
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t G = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[G] == N, op, ": offsets must start at 0 and end at ", N);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(o[g + 1] >= o[g], op, ": offsets must be non-decreasing");
    TORCH_CHECK(o[g + 1] - o[g] < std::numeric_limits<uint32_t>::max(), op,
                ": a group has too many units");
  }
  return offsets;
}

at::Tensor tod_overlap_cpu(const at::Tensor& u_in, const at::Tensor& r_in,
                           const at::Tensor& offsets_in) {
  check_cpu(u_in, "tod_overlap", "u");
  check_cpu(r_in, "tod_overlap", "r");
  TORCH_CHECK(u_in.dim() == 1 && u_in.sizes() == r_in.sizes(),
              "tod_overlap: u and r must be 1-d tensors of equal length");
  const bool f32 = u_in.scalar_type() == at::kFloat && r_in.scalar_type() == at::kFloat;
  const at::ScalarType st = f32 ? at::kFloat : at::kDouble;
  at::Tensor u = u_in.to(st).contiguous(), r = r_in.to(st).contiguous();
  const int64_t N = u.numel();
  at::Tensor offsets = checked_offsets(offsets_in, N, "tod_overlap");
  const int64_t G = offsets.numel() - 1;
  at::Tensor out = at::empty({N + G}, u.options().dtype(at::kLong));
  if (f32)
    tod_overlap<float>(u.const_data_ptr<float>(), r.const_data_ptr<float>(),
                       offsets.const_data_ptr<int64_t>(), G, out.mutable_data_ptr<int64_t>());
  else
    tod_overlap<double>(u.const_data_ptr<double>(), r.const_data_ptr<double>(),
                        offsets.const_data_ptr<int64_t>(), G, out.mutable_data_ptr<int64_t>());
  return out;
}

at::Tensor tod_select_cpu(const at::Tensor& overlap_in, const at::Tensor& offsets_in,
                          const at::Tensor& alphas_in, double cap) {
  check_cpu(overlap_in, "tod_select", "overlap");
  at::Tensor overlap = overlap_in.to(at::kLong).contiguous();
  TORCH_CHECK(overlap.dim() == 1, "tod_select: overlap must be 1-d");
  const int64_t G = offsets_in.numel() - 1;
  at::Tensor offsets = checked_offsets(offsets_in, overlap.numel() - G, "tod_select");
  at::Tensor alphas = alphas_in.to(at::kCPU, at::kDouble).contiguous().view({-1});
  const int64_t A = alphas.numel();
  at::Tensor out = at::empty({G, A}, overlap.options());
  tod_select(overlap.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), G,
             alphas.const_data_ptr<double>(), A, cap, out.mutable_data_ptr<int64_t>());
  return out;
}

}  // namespace
}  // namespace fair_pruner

TORCH_LIBRARY(fair_pruner_cpp, m) {
  m.def("unit_stats(Tensor z, Tensor g, int dim) -> Tensor");
  m.def("class_quantiles(Tensor x, Tensor counts, int q) -> Tensor");
  m.def("pairwise_w1_max(Tensor sk) -> Tensor");
  m.def("class_w1_max(Tensor x, Tensor counts, int q) -> Tensor");
  m.def("tod_overlap(Tensor u, Tensor r, Tensor offsets) -> Tensor");
  m.def("tod_select(Tensor overlap, Tensor offsets, Tensor alphas, float cap) -> Tensor");
}

TORCH_LIBRARY_IMPL(fair_pruner_cpp, CPU, m) {
  m.impl("unit_stats", &fair_pruner::unit_stats_cpu);
  m.impl("class_quantiles", &fair_pruner::class_quantiles_cpu);
  m.impl("pairwise_w1_max", &fair_pruner::pairwise_w1_max_cpu);
  m.impl("class_w1_max", &fair_pruner::class_w1_max_cpu);
  m.impl("tod_overlap", &fair_pruner::tod_overlap_cpu);
  m.impl("tod_select", &fair_pruner::tod_select_cpu);
}

// An importable (empty) Python module: importing fair_pruner._C runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
