// Helpers shared by the CPU kernels in csrc/: the thread budget, the fp32/bf16 dispatch cases, and
// branch-free float helpers that GCC vectorizes inside `omp simd` loops. Header-only; kernels/_cpp.py
// puts this file's contents in every build's cache key (torch rebuilds only when a source changes).
#pragma once

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// fp32 and bf16 (the Python side sends other dtypes to the torch reference)
#define FASTAGENT_FP32_BF16_CASES(...) \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

namespace fastagent {

// Threads only for big inputs: at ~0.4-1.5 ns per element a second thread saves less than its
// wake-up costs on a busy machine below this (measured at 64 x 2048 on 2 loaded cores: 0.15 ms on
// one thread, ~8 ms when the call has to wait for a second core).
constexpr int64_t kMinElemsPerThread = 1 << 18;

inline int num_threads_for(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>(n / kMinElemsPerThread, 1, omp_get_max_threads()));
}

// exp(x) for x <= ~88 (glibc's vector expf needs -ffast-math, which would also break inf/nan
// handling; the float->int conversion below needs -fno-trapping-math to vectorize, set in
// kernels/_cpp.py). x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial
// (truncation error < 6e-9 relative, below fp32's ulp), 2^n built from the exponent bits. Max
// relative error measured 8e-8 over [-87, 0]. Inputs below -87 clamp there (exp = 1.6e-38, not 0).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504f + 0.5f);
  // Cody-Waite: ln2 split in a part exact in fp32 and the rest, so r keeps its low bits.
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// bf16 <-> fp32 on raw bits (c10::BFloat16's rounding has a NaN branch: silu_mul's bf16 loops ran
// ~6x slower with it). Same rounding as c10: to nearest even, NaN -> 0x7fc0. Kernels take bits_t<T>
// pointers: float for fp32, uint16_t for bf16.
template <typename T> struct Bits { using type = T; };
template <> struct Bits<c10::BFloat16> { using type = uint16_t; };
template <typename T> using bits_t = typename Bits<T>::type;

inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
template <typename T> inline bits_t<T> from_f(float v) { return v; }
template <> inline uint16_t from_f<c10::BFloat16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
}

template <typename T> bits_t<T>* raw(const at::Tensor& t) {
  return reinterpret_cast<bits_t<T>*>(t.data_ptr<T>());
}

}  // namespace fastagent
