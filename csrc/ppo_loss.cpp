// CPU (OpenMP) kernels for the PPO policy loss and the clipped value loss, forward and backward in
// one pass. Called from kernels/ppo_loss.py (built by kernels/_cpp.py); not a public API.
//
// ppo_fwd: per token i (all tensors (N,), weight pre-scaled so the loss is a plain sum), with
// clamp(x, c) = clamp(x, -c, c), c = log_ratio_clamp, kc = kl_clamp (inf: off)
//   ratio = exp(clamp(logp - old_logp, c))
//   pg    = max(-adv * ratio, -adv * clamp(ratio, 1 - clip_low, 1 + clip_high))
//   pg    = min(pg, -adv * dual_clip)                    if dual_clip > 0 and adv < 0
//   kl    = logp - ref_logp (k1)  or  clamp(exp(x) - x - 1, kc), x = clamp(ref_logp - logp, c) (k3)
//   loss  = sum_i weight * (pg + kl_coef * kl - entropy_coef * entropy)
// and returns the weighted sums (see kSum* below) plus d loss / d logp (N,), zero through an active
// clamp (torch.clamp's gradient). The gradient with respect to entropy is -entropy_coef * weight,
// which the caller forms without a kernel.
//
// Sums are reduced per fixed chunk of kChunk tokens, then chunk partials are added in order, so the
// result does not depend on the number of threads.
#include <torch/extension.h>

#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// fp32, bf16, fp16 (the Python side never sends fp64: it takes the torch path)
#define FASTAGENT_FLOAT_CASES(...)                                                     \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

namespace {

using fastagent::num_threads_for;

constexpr int64_t kChunk = 2048;

// Layout of the sums vector; kernels/ppo_loss.py mirrors it (SUM_* constants).
enum { kSumLoss, kSumPg, kSumKl, kSumEnt, kSumClip, kSumDual, kSumApproxKl, kSumWeight, kNumSums };

// exp(x) for float, branch-free so that `omp simd` loops vectorize (libm's expf does not without
// -ffast-math). Range reduction x = k*ln2 + r, |r| <= ln2/2, then a degree-6 polynomial:
// relative error ~2e-7 over the clamped range. NaN propagates; x is clamped to [-87.3, 88.7], so
// exp never returns 0 or inf (a log-ratio beyond that range is broken input anyway).
inline float fast_exp(float x) {
  x = x > 88.7f ? 88.7f : x;
  x = x < -87.3f ? -87.3f : x;
  // k = round(x / ln2) by the 1.5 * 2^23 trick: floorf does not vectorize without -ffast-math
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;  // two-step ln2 for accuracy
  float p = 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // scale by 2^k through the exponent bits
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return p * scale;
}

// v where bits is all ones, +0.0 where bits is 0: a branch-free select (selects on loop-invariant
// flags made GCC fall back to a scalar loop, ~8x slower), and NaN-safe unlike multiplying by 0.
inline float keep_if(float v, int32_t bits) {
  return __builtin_bit_cast(float, __builtin_bit_cast(int32_t, v) & bits);
}

struct PpoArgs {
  float clip_low, clip_high, dual_clip, kl_coef, entropy_coef;
  bool kl_k3;
  float log_ratio_clamp, kl_clamp;  // inf: off
};

constexpr int kLanes = 16;  // one AVX-512 register of floats; per-lane partial sums

// One chunk [begin, end): writes dlogp and stores this chunk's weighted sums into sums[kNumSums].
// Optional inputs (ref_logp, entropy) may be null: logp stands in for them, so every load is
// unconditional, and keep_if drops the term. Sums are kept per lane (acc[k][j]) so the inner loop
// vectorizes without reassociating a reduction.
template <typename P>
void ppo_chunk(const P* __restrict logp, const P* __restrict old_logp, const float* __restrict adv,
               const float* __restrict weight, const P* __restrict ref_logp,
               const P* __restrict entropy, P* __restrict dlogp, const PpoArgs& args,
               int64_t begin, int64_t end, double* sums) {
  const int32_t ref_bits = ref_logp ? -1 : 0, ent_bits = entropy ? -1 : 0;
  ref_logp = ref_logp ? ref_logp : logp;
  entropy = entropy ? entropy : logp;
  const float lo = 1.f - args.clip_low, hi = 1.f + args.clip_high;
  const float dual_clip = args.dual_clip > 0.f ? args.dual_clip : INFINITY;  // inf: never active
  const float kl_coef = args.kl_coef, ent_coef = args.entropy_coef;
  const float k3 = args.kl_k3 ? 1.f : 0.f, k1 = 1.f - k3;
  const float c = args.log_ratio_clamp, kc = args.kl_clamp;
  float acc[kNumSums][kLanes] = {};
  auto token = [&](int64_t i, int j) {
    const float lp = static_cast<float>(logp[i]);
    const float raw = lp - static_cast<float>(old_logp[i]);
    const float log_ratio = std::min(std::max(raw, -c), c);
    const float ratio = fast_exp(log_ratio);
    const float ad = adv[i], w = weight[i];
    const float pg1 = -ad * ratio;  // also d pg1 / d logp, unless the log-ratio clamp is active
    const float pg2 = -ad * std::min(std::max(ratio, lo), hi);
    const bool clipped = pg2 > pg1;
    const bool ratio_clamped = std::fabs(raw) > c;  // NaN: false, so NaN reaches the gradient
    float pg = clipped ? pg2 : pg1;
    float dpg = (clipped | ratio_clamped) ? 0.f : pg1;
    const float pg3 = -ad * dual_clip;
    const bool dual = (ad < 0.f) & (pg > pg3);
    pg = dual ? pg3 : pg;
    dpg = dual ? 0.f : dpg;
    const float x_raw = static_cast<float>(ref_logp[i]) - lp;  // log(pi_ref / pi)
    const float x = std::min(std::max(x_raw, -c), c);  // k3 only; k1 = -x_raw is linear
    const float ex = fast_exp(x);
    const float kl3_raw = ex - x - 1.f;
    const float kl3 = std::min(std::max(kl3_raw, -kc), kc);
    const bool kl3_clamped = (std::fabs(x_raw) > c) | (std::fabs(kl3_raw) > kc);
    const float kl = keep_if(k3 * kl3 - k1 * x_raw, ref_bits);
    const float dkl = keep_if(k3 * (kl3_clamped ? 0.f : 1.f - ex) + k1, ref_bits);
    const float ent = keep_if(static_cast<float>(entropy[i]), ent_bits);
    dlogp[i] = static_cast<P>(w * (dpg + kl_coef * dkl));
    acc[kSumLoss][j] += w * (pg + kl_coef * kl - ent_coef * ent);
    acc[kSumPg][j] += w * pg;
    acc[kSumKl][j] += w * kl;
    acc[kSumEnt][j] += w * ent;
    acc[kSumClip][j] += clipped ? w : 0.f;
    acc[kSumDual][j] += dual ? w : 0.f;
    acc[kSumApproxKl][j] += w * (ratio - 1.f - log_ratio);  // k3 estimate of KL(old || new)
    acc[kSumWeight][j] += w;
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) token(i + j, j);
  }
  for (; i < end; ++i) token(i, 0);
  for (int k = 0; k < kNumSums; ++k) {
    double s = 0.0;
    for (int j = 0; j < kLanes; ++j) s += acc[k][j];
    sums[k] = s;
  }
}

// Parallel over chunks (a pragma cannot sit inside the AT_DISPATCH macro, hence this function).
template <typename P>
void ppo_all(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv,
             const at::Tensor& weight, const c10::optional<at::Tensor>& ref_logp,
             const c10::optional<at::Tensor>& entropy, at::Tensor& dlogp, const PpoArgs& args,
             double* partial) {
  const int64_t n = logp.numel(), nchunks = (n + kChunk - 1) / kChunk;
  const P* ref = ref_logp ? ref_logp->data_ptr<P>() : nullptr;
  const P* ent = entropy ? entropy->data_ptr<P>() : nullptr;
  const int threads = num_threads_for(n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    ppo_chunk<P>(logp.data_ptr<P>(), old_logp.data_ptr<P>(), adv.data_ptr<float>(),
                 weight.data_ptr<float>(), ref, ent, dlogp.data_ptr<P>(), args, begin, end,
                 partial + c * kNumSums);
  }
}

// Value-loss chunks: partial[c] = [loss, clipped weight, weight] of chunk c; writes dvalues.
template <typename V>
void value_all(const V* v, const V* ov, const float* ret, const float* w, V* dv, float c, int64_t n,
               double* partial) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int threads = num_threads_for(n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t begin = ch * kChunk, end = std::min(n, begin + kChunk);
    float s_loss = 0, s_clip = 0, s_w = 0;
#pragma omp simd reduction(+ : s_loss, s_clip, s_w)
    for (int64_t i = begin; i < end; ++i) {
      const float vi = static_cast<float>(v[i]), oi = static_cast<float>(ov[i]);
      const float d = vi - oi;
      const float vc = d < -c ? oi - c : (d > c ? oi + c : vi);  // exactly vi inside the clip
      const float e1 = vi - ret[i], e2 = vc - ret[i];
      const bool clipped = e2 * e2 > e1 * e1;  // clamp active and worse: no gradient
      dv[i] = static_cast<V>(clipped ? 0.f : w[i] * e1);
      s_loss += w[i] * 0.5f * (clipped ? e2 * e2 : e1 * e1);
      s_clip += clipped ? w[i] : 0.f;
      s_w += w[i];
    }
    partial[ch * 3] = s_loss;
    partial[ch * 3 + 1] = s_clip;
    partial[ch * 3 + 2] = s_w;
  }
}

void check_vec(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 1 && t.numel() == n,
              name, " must be a contiguous CPU tensor of shape (", n, ",)");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

// Adds per-chunk partials (nchunks, width) in chunk order: deterministic for any thread count.
at::Tensor reduce_partials(const std::vector<double>& partial, int64_t nchunks, int width) {
  at::Tensor out = at::zeros({width}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int k = 0; k < width; ++k) {
    double acc = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) acc += partial[c * width + k];
    o[k] = static_cast<float>(acc);
  }
  return out;
}

}  // namespace

// Returns (sums (8,) fp32, dlogp (N,) in logp's dtype). adv and weight are fp32; logp, old_logp,
// ref_logp and entropy share one float dtype (fp32, bf16 or fp16); log_ratio_clamp and kl_clamp are
// > 0 (inf: off).
std::vector<at::Tensor> ppo_fwd(const at::Tensor& logp, const at::Tensor& old_logp,
                                const at::Tensor& adv, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& ref_logp,
                                const c10::optional<at::Tensor>& entropy, double clip_low,
                                double clip_high, double dual_clip, double kl_coef, bool kl_k3,
                                double entropy_coef, double log_ratio_clamp, double kl_clamp) {
  const int64_t n = logp.numel();
  const auto pt = logp.scalar_type();
  check_vec(logp, "logp", n, pt);
  check_vec(old_logp, "old_logp", n, pt);
  check_vec(adv, "adv", n, at::kFloat);
  check_vec(weight, "weight", n, at::kFloat);
  if (ref_logp) check_vec(*ref_logp, "ref_logp", n, pt);
  if (entropy) check_vec(*entropy, "entropy", n, pt);
  TORCH_CHECK(log_ratio_clamp > 0 && kl_clamp > 0, "clamps must be > 0 (inf: off)");
  const PpoArgs args{float(clip_low), float(clip_high), float(dual_clip), float(kl_coef),
                     float(entropy_coef), kl_k3, float(log_ratio_clamp), float(kl_clamp)};
  at::Tensor dlogp = at::empty_like(logp);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks * kNumSums, 0.0);
  AT_DISPATCH_SWITCH(pt, "ppo_fwd", FASTAGENT_FLOAT_CASES([&] {
    ppo_all<scalar_t>(logp, old_logp, adv, weight, ref_logp, entropy, dlogp, args, partial.data());
  }));
  return {reduce_partials(partial, nchunks, kNumSums), dlogp};
}

// Clipped value loss: loss = sum_i weight * 0.5 * max((v - ret)^2, (old_v + clamp(v - old_v,
// -clip, clip) - ret)^2). Returns (sums (3,) fp32 = [loss, clipped weight, weight], dvalues (N,)).
std::vector<at::Tensor> value_fwd(const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& weight,
                                  double clip) {
  const int64_t n = values.numel();
  const auto vt = values.scalar_type();
  check_vec(values, "values", n, vt);
  check_vec(old_values, "old_values", n, vt);
  check_vec(returns, "returns", n, at::kFloat);
  check_vec(weight, "weight", n, at::kFloat);
  at::Tensor dvalues = at::empty_like(values);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks * 3, 0.0);
  const float c = static_cast<float>(clip);
  AT_DISPATCH_SWITCH(vt, "value_fwd", FASTAGENT_FLOAT_CASES([&] {
    value_all<scalar_t>(values.data_ptr<scalar_t>(), old_values.data_ptr<scalar_t>(),
                        returns.data_ptr<float>(), weight.data_ptr<float>(),
                        dvalues.data_ptr<scalar_t>(), c, n, partial.data());
  }));
  return {reduce_partials(partial, nchunks, 3), dvalues};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ppo_fwd", &ppo_fwd, "fused PPO policy loss: weighted sums and d loss / d logp");
  m.def("value_fwd", &value_fwd, "clipped value loss: weighted sums and d loss / d values");
}
