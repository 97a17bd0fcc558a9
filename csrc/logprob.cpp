// Row passes over a block of fp32 logits for token log-probs, entropy and their gradient (CPU).
//
// A logits block (C, Vb) holds columns [v0, v0 + Vb) of C token rows; it comes from a BLAS matmul
// in Python (kernels/logprob.py). These passes replace log_softmax + gather + entropy and their
// backward, reading each row (at most a few hundred KiB, L2-resident) once or twice instead of
// materialising (C, V) temporaries.
//
//   row_stats_(logits, labels, v0, vocab, inv_temp, m, s, t, zl)
//       merges the block into running per-row state (online logsumexp across vocabulary blocks):
//       m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m), zl = z[label] once seen.
//       Python finishes: lse = m + log s, entropy = log s - t / s, logp = zl - lse.
//   row_grad_(logits, labels, v0, lse, entropy, dlogp, dent?, inv_temp)
//       overwrites the block with dL/dlogits.
//
// With z = logits * inv_temp, p = softmax(z), H = -sum p log p:
//   dlogp_y/dz_j = [j == y] - p_j,   dH/dz_j = -p_j (log p_j + H),   dL/dlogits = inv_temp * dL/dz.
// Labels are global vocabulary ids; < 0 marks an ignored token (no logp gradient; entropy counts).
// Built by kernels/_cpp.py (load_cpp("logprob", ["logprob.cpp"])); rows run in parallel on torch's
// intra-op threads (at::parallel_for, OpenMP), inner loops are `omp simd` vectorized.

#include <torch/extension.h>

#include "common.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

using namespace fastagent;

constexpr int64_t kBlock = 1024;  // floats per partial sum (4 KiB)

void check_block(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous (C, Vb) float32 tensor");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) &&
              labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "labels must be a contiguous (C,) int64 tensor");
}

void check_vec(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous (C,) float32 tensor");
}

}  // namespace

void row_stats_(const at::Tensor& logits, const at::Tensor& labels, int64_t v0, int64_t vocab,
                double inv_temp, at::Tensor& m, at::Tensor& s, at::Tensor& t, at::Tensor& zl) {
  check_block(logits, labels);
  const int64_t C = logits.size(0), Vb = logits.size(1);
  for (auto* st : {&m, &s, &t, &zl}) check_vec(*st, C, "state");
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < C; ++i) {  // serial: no exceptions inside parallel regions
    TORCH_CHECK(y[i] < vocab, "label ", y[i], " out of range for vocabulary size ", vocab);
  }
  const float* z = logits.data_ptr<float>();
  float *m_p = m.data_ptr<float>(), *s_p = s.data_ptr<float>(), *t_p = t.data_ptr<float>();
  float* zl_p = zl.data_ptr<float>();
  const float sc = static_cast<float>(inv_temp);

  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = z + i * Vb;
      // Pass 1: the block max (of raw logits; inv_temp > 0 keeps the argmax).
      float bm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < Vb; ++j) bm = row[j] > bm ? row[j] : bm;  // std::fmax: a libm call
      const float m_old = m_p[i], m_new = std::max(m_old, bm * sc);
      // Pass 2: sum e_j = exp(z_j - m_new) and sum e_j (z_j - m_new), the row still in cache.
      // Blocks of kBlock sum in fp32 SIMD lanes and add into doubles: one fp32 sum over a
      // 49152-long row drifts by ~4e-5 relative (many tiny terms); this matches torch.
      double sum = 0.0, sum_ez = 0.0;
      for (int64_t j0 = 0; j0 < Vb; j0 += kBlock) {
        const int64_t j1 = std::min(Vb, j0 + kBlock);
        float bsum = 0.0f, bsum_ez = 0.0f;
#pragma omp simd reduction(+ : bsum, bsum_ez)
        for (int64_t j = j0; j < j1; ++j) {
          const float d = row[j] * sc - m_new;
          const float e = fast_exp(d);
          bsum += e;
          bsum_ez += e * d;
        }
        sum += bsum;
        sum_ez += bsum_ez;
      }
      // Merge with the earlier blocks: rescale their sums from m_old to m_new.
      if (s_p[i] > 0.0f) {
        const double alpha = std::exp(static_cast<double>(m_old) - m_new);
        sum_ez += alpha * (t_p[i] + static_cast<double>(s_p[i]) * (m_old - m_new));
        sum += alpha * s_p[i];
      }
      m_p[i] = m_new;
      s_p[i] = static_cast<float>(sum);
      t_p[i] = static_cast<float>(sum_ez);
      const int64_t local = y[i] - v0;
      if (y[i] >= 0 && local >= 0 && local < Vb) zl_p[i] = row[local] * sc;
    }
  });
}

void row_grad_(at::Tensor& logits, const at::Tensor& labels, int64_t v0, const at::Tensor& lse,
               const at::Tensor& entropy, const at::Tensor& dlogp,
               const std::optional<at::Tensor>& dent, double inv_temp) {
  check_block(logits, labels);
  const int64_t C = logits.size(0), Vb = logits.size(1);
  check_vec(lse, C, "lse");
  check_vec(entropy, C, "entropy");
  check_vec(dlogp, C, "dlogp");
  const bool has_dent = dent.has_value() && dent->defined();
  if (has_dent) check_vec(*dent, C, "dent");
  float* z = logits.data_ptr<float>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* ent_p = entropy.data_ptr<float>();
  const float* g_p = dlogp.data_ptr<float>();
  const float* d_p = has_dent ? dent->data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(inv_temp);

  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = z + i * Vb;
      // An ignored token contributes no logp gradient (its logp output is the constant 0).
      const float g = y[i] >= 0 ? g_p[i] : 0.0f;
      const float d = has_dent ? d_p[i] : 0.0f;
      const float l = lse_p[i], h = ent_p[i];
      // dL/dz_j = -p_j (g + d (log p_j + H)); the onehot term g is added at the label below.
#pragma omp simd
      for (int64_t j = 0; j < Vb; ++j) {
        const float lp = row[j] * sc - l;
        const float p = fast_exp(lp);
        row[j] = -sc * p * (g + d * (lp + h));
      }
      const int64_t local = y[i] - v0;
      if (y[i] >= 0 && local >= 0 && local < Vb) row[local] += sc * g;
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastagent CPU row passes for token log-probs, entropy and their gradient";
  m.def("row_stats_", &row_stats_, "merge a (C, Vb) fp32 logits block into per-row (m, s, t, zl)",
        py::arg("logits"), py::arg("labels"), py::arg("v0"), py::arg("vocab"), py::arg("inv_temp"),
        py::arg("m"), py::arg("s"), py::arg("t"), py::arg("zl"));
  m.def("row_grad_", &row_grad_, "overwrite a (C, Vb) logits block with dL/dlogits",
        py::arg("logits"), py::arg("labels"), py::arg("v0"), py::arg("lse"), py::arg("entropy"),
        py::arg("dlogp"), py::arg("dent"), py::arg("inv_temp"));
}
