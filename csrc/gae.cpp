// CPU (OpenMP) kernel for masked GAE. Called from kernels/gae.py (built by kernels/_cpp.py).
//
// Each sequence s covers tokens [cu_seqlens[s], cu_seqlens[s+1]) of flat (N,) tensors (the padded
// (B, T) layout is the same with cu_seqlens = arange(B+1) * T). Backward over t, masked-out tokens
// are skipped: they get adv = ret = 0 and leave the recursion state untouched, so the "next value"
// of a masked-in token is the value of the next masked-in token (0 after the last one):
//   delta_t = r_t + gamma * next_value - v_t
//   gae_t   = delta_t + gamma * lam * gae_{next masked-in}
//   ret_t   = gae_t + v_t
// OpenMP over sequences (large batches only); the recursion within a sequence is sequential.
#include <torch/extension.h>

#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// fp32, bf16, fp16 (the Python side never sends fp64: it takes the torch path)
#define FASTAGENT_FLOAT_CASES(...)                                                     \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

namespace {

template <typename T>
void gae_sequences(const T* rewards, const T* values, const bool* mask, const int64_t* cu,
                   int64_t num_seqs, float gamma, float lam, float* adv, float* ret) {
  const float gl = gamma * lam;
  const int threads = fastagent::num_threads_for(cu[num_seqs] - cu[0]);  // big batches only
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && num_seqs > 1)
  for (int64_t s = 0; s < num_seqs; ++s) {
    float next_value = 0.f, gae = 0.f;
    for (int64_t t = cu[s + 1] - 1; t >= cu[s]; --t) {
      if (!mask[t]) {
        adv[t] = 0.f;
        ret[t] = 0.f;
        continue;
      }
      const float v = static_cast<float>(values[t]);
      gae = static_cast<float>(rewards[t]) + gamma * next_value - v + gl * gae;
      adv[t] = gae;
      ret[t] = gae + v;
      next_value = v;
    }
  }
}

}  // namespace

// rewards, values: (N,) contiguous, same float dtype; mask: (N,) bool; cu_seqlens: (S+1,) int64.
// Returns (advantages (N,) fp32, returns (N,) fp32).
std::vector<at::Tensor> gae_fwd(const at::Tensor& rewards, const at::Tensor& values,
                                const at::Tensor& mask, const at::Tensor& cu_seqlens, double gamma,
                                double lam) {
  const int64_t n = rewards.numel();
  for (const auto* t : {&rewards, &values, &mask}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 1 && t->numel() == n,
                "gae_fwd: rewards, values and mask must be contiguous CPU (N,) tensors");
  }
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae_fwd: values dtype != rewards dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae_fwd: mask must be bool");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.is_contiguous() &&
                  cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "gae_fwd: cu_seqlens must be a contiguous int64 (S+1,) tensor");
  at::Tensor adv = at::empty({n}, rewards.options().dtype(at::kFloat));
  at::Tensor ret = at::empty({n}, rewards.options().dtype(at::kFloat));
  const int64_t num_seqs = cu_seqlens.numel() - 1;
  AT_DISPATCH_SWITCH(rewards.scalar_type(), "gae_fwd", FASTAGENT_FLOAT_CASES([&] {
    gae_sequences<scalar_t>(rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                            mask.data_ptr<bool>(), cu_seqlens.data_ptr<int64_t>(), num_seqs,
                            static_cast<float>(gamma), static_cast<float>(lam),
                            adv.data_ptr<float>(), ret.data_ptr<float>());
  }));
  return {adv, ret};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gae_fwd", &gae_fwd, "masked GAE over packed sequences: (advantages, returns), fp32");
}
