// Binding of the CUDA kernels (kernels.cu, torch-free C launchers) as torch.library ops in
// namespace `fair_pruner_cuda`; fair_pruner/_cuda_backend.py plugs them into fair_pruner.ops.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

extern "C" int fp_cuda_unit_stats(int dtype, const void* z, const void* g, float* part, int64_t A,
                                  int64_t C, int64_t I, const int64_t* sz, const int64_t* sg,
                                  int stats, int64_t split, int64_t per_split, void* stream);
extern "C" int fp_cuda_pairwise_w1_max(int dtype, const void* sk, float* out, int64_t K, int64_t U,
                                       int64_t P, int64_t Q, const int64_t* ss, void* stream);

namespace {

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
}

void check_rc(int rc, const char* op) {
  TORCH_CHECK(rc == 0, op, ": CUDA launch failed (code ", rc, ")");
}

// z, g: CUDA tensors whose elements (a, c, i) sit at a*sz[0] + c*sz[1] + i*sz[2] (shape [A, C, I]
// in elements, computed on the host by fair_pruner.ops.positions_3d). Returns fp32 [4 or 1, C].
at::Tensor unit_stats_3d(const at::Tensor& z, const at::Tensor& g, int64_t A, int64_t C,
                         int64_t I, at::IntArrayRef sz, at::IntArrayRef sg, bool stats) {
  TORCH_CHECK(z.is_cuda() && g.is_cuda(), "unit_stats: CUDA tensors expected");
  TORCH_CHECK(z.scalar_type() == g.scalar_type(), "unit_stats: z and g dtypes differ");
  TORCH_CHECK(sz.size() == 3 && sg.size() == 3, "unit_stats: three strides each");
  c10::cuda::CUDAGuard guard(z.device());
  const int64_t npos = A * I;
  const int64_t per_block = 4 * 8 * 32;  // >= 4 positions per lane
  // Enough blocks to fill the GPU (~4 per SM), each with >= 4 positions per lane.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (4 * sms * 8 + C - 1) / std::max<int64_t>(C, 1);
  int64_t split = std::min<int64_t>((npos + per_block - 1) / per_block, want);
  split = std::max<int64_t>(1, split);
  const int64_t per_split = (npos + split - 1) / std::max<int64_t>(split, 1);
  split = per_split > 0 ? (npos + per_split - 1) / per_split : 1;
  at::Tensor part = at::empty({split, 4, C}, z.options().dtype(at::kFloat));
  if (C > 0 && npos > 0) {
    check_rc(fp_cuda_unit_stats(dtype_code(z, "unit_stats"), z.const_data_ptr(), g.const_data_ptr(),
                                part.mutable_data_ptr<float>(), A, C, I, sz.data(), sg.data(),
                                stats, split, per_split,
                                c10::cuda::getCurrentCUDAStream().stream()),
             "unit_stats");
  } else {
    part.zero_();
  }
  at::Tensor out = part.sum(0);
  return stats ? out : out.narrow(0, 0, 1);
}

at::Tensor pairwise_w1_max_cuda(const at::Tensor& sk) {
  TORCH_CHECK(sk.is_cuda() && sk.dim() == 4, "pairwise_w1_max: CUDA sk [K, U, P, Q] expected");
  TORCH_CHECK(sk.size(0) >= 2, "pairwise_w1_max: need at least two classes");
  c10::cuda::CUDAGuard guard(sk.device());
  const std::vector<int64_t> ss(sk.strides().begin(), sk.strides().end());
  at::Tensor out = at::empty({sk.size(1)}, sk.options().dtype(at::kFloat));
  const int rc = fp_cuda_pairwise_w1_max(dtype_code(sk, "pairwise_w1_max"), sk.const_data_ptr(),
                                         out.mutable_data_ptr<float>(), sk.size(0), sk.size(1),
                                         sk.size(2), sk.size(3), ss.data(),
                                         c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc != -1, "pairwise_w1_max: too many classes (", sk.size(0),
              ") for the CUDA kernel's shared memory");
  check_rc(rc, "pairwise_w1_max");
  return out;
}

}  // namespace

TORCH_LIBRARY(fair_pruner_cuda, m) {
  m.def("unit_stats_3d(Tensor z, Tensor g, int A, int C, int I, int[] sz, int[] sg, bool stats)"
        " -> Tensor");
  m.def("pairwise_w1_max(Tensor sk) -> Tensor");
}

TORCH_LIBRARY_IMPL(fair_pruner_cuda, CUDA, m) {
  m.impl("unit_stats_3d", &unit_stats_3d);
  m.impl("pairwise_w1_max", &pairwise_w1_max_cuda);
}

// An importable (empty) Python module: importing fair_pruner._cuda runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
