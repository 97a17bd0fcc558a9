// CPU (OpenMP) kernels for RMSNorm forward and backward. Called from kernels/rmsnorm.py (built by
// kernels/_cpp.py); not a public API.
//
// x (N, H) rows, weight (H,), as transformers' LlamaRMSNorm (and Qwen2RMSNorm) compute them:
//   rstd_i = 1 / sqrt(mean_j x_ij^2 + eps)                           (fp32)
//   xhat   = x * rstd,   y = w * round_T(xhat)                        (round_T: to x's dtype)
// y's dtype is torch's type promotion of (weight, x): bf16 only when both are bf16, else fp32.
// Backward, in fp32 from the saved x and rstd (the normalised tensor is never stored), g = dy * w:
//   dx = rstd * (g - xhat * mean_j(g * xhat)),   dw = sum_i dy * round_T(xhat)
// The rounding inside the forward is passed straight through (as autograd does for a dtype cast).
// OpenMP over rows (large inputs only); dw sums in fp32 over blocks of rows, into one fp64 (H,) row
// per thread, and the threads' rows are added at the end.
#include <torch/extension.h>

#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using namespace fastagent;

using BF16 = c10::BFloat16;

constexpr int64_t kRowBlock = 64;  // rows summed in fp32 before dw's fp64 running sum

// y's element type: torch's promotion of (W, T), which for fp32/bf16 is bf16 only if both are.
template <typename T, typename W>
using out_t = std::conditional_t<std::is_same_v<T, BF16> && std::is_same_v<W, BF16>, BF16, float>;

template <typename T> inline float round_to(float v) { return to_f(from_f<T>(v)); }  // via T

template <typename T, typename W>
void rms_norm_rows(const bits_t<T>* x, const bits_t<W>* w, int64_t rows, int64_t H, float eps,
                   bits_t<out_t<T, W>>* y, float* rstd) {
  using O = out_t<T, W>;
  const int threads = num_threads_for(rows * H);
  const float inv_h = 1.0f / static_cast<float>(H);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t i = 0; i < rows; ++i) {
    const bits_t<T>* xi = x + i * H;
    bits_t<O>* yi = y + i * H;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < H; ++j) ss += to_f(xi[j]) * to_f(xi[j]);
    const float r = 1.0f / std::sqrt(ss * inv_h + eps);
    rstd[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yi[j] = from_f<O>(to_f(w[j]) * round_to<T>(to_f(xi[j]) * r));
  }
}

// One row: dx, and dy * round_T(xhat) added into acc (nullptr: dw not needed).
template <typename T, typename W>
inline void rms_norm_bwd_row(const bits_t<out_t<T, W>>* dy, const bits_t<T>* x, const bits_t<W>* w,
                             float r, int64_t H, bits_t<T>* dx, float* acc) {
  float dot = 0.0f;  // sum_j g_j * x_j; times r: sum_j g_j * xhat_j
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < H; ++j) dot += to_f(dy[j]) * to_f(w[j]) * to_f(x[j]);
  const float c = dot * r / static_cast<float>(H);
  if (acc) {  // two loop copies: a loop-invariant branch inside keeps GCC from vectorizing
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float d = to_f(dy[j]), xhat = to_f(x[j]) * r;
      dx[j] = from_f<T>(r * (d * to_f(w[j]) - xhat * c));
      acc[j] += d * round_to<T>(xhat);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float d = to_f(dy[j]), xhat = to_f(x[j]) * r;
      dx[j] = from_f<T>(r * (d * to_f(w[j]) - xhat * c));
    }
  }
}

// Rows split in one contiguous range per thread. dw: each thread sums blocks of kRowBlock rows in
// fp32, then adds each block's sum into its fp64 row of dw_partial ((threads, H) zeros, or nullptr
// when dw is not needed): one fp32 sum over thousands of rows drifts by ~1e-4 where terms cancel.
template <typename T, typename W>
void rms_norm_bwd_rows(const bits_t<out_t<T, W>>* dy, const bits_t<T>* x, const bits_t<W>* w,
                       const float* rstd, int64_t rows, int64_t H, int threads, bits_t<T>* dx,
                       double* dw_partial) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t r0 = rows * tid / nt, r1 = rows * (tid + 1) / nt;
    std::vector<float> block(dw_partial ? H : 0);
    float* acc = dw_partial ? block.data() : nullptr;
    for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
      const int64_t b1 = std::min(r1, b0 + kRowBlock);
      if (acc) std::fill(block.begin(), block.end(), 0.0f);
      for (int64_t i = b0; i < b1; ++i) {
        rms_norm_bwd_row<T, W>(dy + i * H, x + i * H, w, rstd[i], H, dx + i * H, acc);
      }
      if (acc) {
        double* total = dw_partial + tid * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) total[j] += static_cast<double>(acc[j]);
      }
    }
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* fn) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), fn,
              ": x must be a contiguous CPU (N, H) tensor");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 1 && weight.is_contiguous() &&
                  weight.size(0) == x.size(1),
              fn, ": weight must be a contiguous CPU (H,) tensor");
}

}  // namespace

// x (N, H), weight (H,), fp32 or bf16 each. Returns (y (N, H) in result_type(weight, x),
// rstd (N,) fp32).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm_fwd");
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor y = at::empty({rows, H}, x.options().dtype(at::result_type(weight, x)));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm_fwd", FASTAGENT_FP32_BF16_CASES([&] {
    using T = scalar_t;
    AT_DISPATCH_SWITCH(weight.scalar_type(), "rms_norm_fwd", FASTAGENT_FP32_BF16_CASES([&] {
      using W = scalar_t;
      rms_norm_rows<T, W>(raw<T>(x), raw<W>(weight), rows, H, static_cast<float>(eps),
                          raw<out_t<T, W>>(y), rstd.data_ptr<float>());
    }));
  }));
  return {y, rstd};
}

// dy (N, H) in y's dtype, x, weight, rstd as saved by rms_norm_fwd. Returns (dx (N, H) in x's
// dtype, dw (H,) in weight's dtype, or an empty tensor when need_dw is false).
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     bool need_dw) {
  check_rows(x, weight, "rms_norm_bwd");
  const int64_t rows = x.size(0), H = x.size(1);
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes() &&
                  dy.scalar_type() == at::result_type(weight, x),
              "rms_norm_bwd: dy must be contiguous, shaped like x, in the output's dtype");
  TORCH_CHECK(rstd.is_contiguous() && rstd.dim() == 1 && rstd.size(0) == rows &&
                  rstd.scalar_type() == at::kFloat,
              "rms_norm_bwd: rstd must be a contiguous (N,) fp32 tensor");
  const int threads = num_threads_for(rows * H);
  at::Tensor dx = at::empty_like(x);
  at::Tensor partial = need_dw ? at::zeros({threads, H}, x.options().dtype(at::kDouble)) : at::Tensor();
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm_bwd", FASTAGENT_FP32_BF16_CASES([&] {
    using T = scalar_t;
    AT_DISPATCH_SWITCH(weight.scalar_type(), "rms_norm_bwd", FASTAGENT_FP32_BF16_CASES([&] {
      using W = scalar_t;
      rms_norm_bwd_rows<T, W>(raw<out_t<T, W>>(dy), raw<T>(x), raw<W>(weight),
                              rstd.data_ptr<float>(), rows, H, threads, raw<T>(dx),
                              need_dw ? partial.data_ptr<double>() : nullptr);
    }));
  }));
  // (threads, H) -> (H,): a few rows, summed in fp64 before the one rounding to weight's dtype
  at::Tensor dw = need_dw ? partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dx, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm rows: (y, rstd fp32)", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm backward: (dx, dw)", py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("rstd"), py::arg("need_dw"));
}
