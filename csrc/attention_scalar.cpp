// Portable attention and LayerNorm: the baseline every CPU runs, and the plainest statement of the numerics the
// vector kernels compute (docs/kernels.md, "Attention"):
//
//   s[i][j] = fp32(sum_d bf16(q[i][d]) * bf16(k[j][d])) * scale  (+ mask, or -inf where masked or j > i if causal)
//   p[i][j] = exp(s[i][j] - max_j s[i][j])      (0 below e^-87.34, where a float32 turns subnormal)
//   out[i]  = fp32(sum_j bf16(p[i][j]) * bf16(v[j])) / sum_j p[i][j]
//
// Products of two bfloat16 values are exact in float32, so only the order of the float32 sums differs between
// instruction sets. A query whose keys are all masked gets 0 (as torch's SDPA); a NaN score makes its row NaN.
#include <cmath>
#include <cstring>
#include <limits>

#include "attention.h"

namespace hf_sparse {
namespace {

constexpr float kExpMin = -87.33654475f;  // log(FLT_MIN)

// Round to the nearest bfloat16, ties to even (as torch's .to(torch.bfloat16)), kept in a float.
inline float bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    u = (u | 0x00400000u) & 0xffff0000u;  // NaN stays a (quiet) NaN
  } else {
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  }
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

size_t scratch_bytes(int64_t d, int64_t s, int64_t) {
  return static_cast<size_t>(2 * s * d + d + s) * sizeof(float);
}

void item(const AttnItem& a, void* scratch) {
  const int64_t d = a.d, s = a.causal ? (a.q1 < a.s ? a.q1 : a.s) : a.s;
  float* kb = static_cast<float*>(scratch);
  float* vb = kb + a.s * d;
  float* qr = vb + a.s * d;
  float* sc = qr + d;
  for (int64_t j = 0; j < s; ++j) {
    for (int64_t c = 0; c < d; ++c) {
      kb[j * d + c] = bf16(a.k[j * a.ldk + c]);
      vb[j * d + c] = bf16(a.v[j * a.ldv + c]);
    }
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i = a.q0; i < a.q1; ++i) {
    float* o = a.out + i * a.ldo;
    for (int64_t c = 0; c < d; ++c) qr[c] = bf16(a.q[i * a.ldq + c]);
    const int64_t keys = a.causal ? (i + 1 < s ? i + 1 : s) : s;
    float m = ninf;
    bool nan = false;
    for (int64_t j = 0; j < keys; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < d; ++c) acc += qr[c] * kb[j * d + c];
      float v = acc * a.scale;
      if (a.mask_kind == kMaskAdd) {
        v = v + static_cast<const float*>(a.mask)[i * a.mask_ld + j];
      } else if (a.mask_kind == kMaskKeep && !static_cast<const uint8_t*>(a.mask)[i * a.mask_ld + j]) {
        v = ninf;
      }
      sc[j] = v;
      nan |= v != v;
      m = v > m ? v : m;
    }
    if (nan || m == ninf) {
      const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
      for (int64_t c = 0; c < d; ++c) o[c] = fill;
      continue;
    }
    float l = 0.0f;
    for (int64_t j = 0; j < keys; ++j) {
      const float x = sc[j] - m;
      const float p = x < kExpMin ? 0.0f : std::exp(x);
      l += p;
      sc[j] = bf16(p);
    }
    for (int64_t c = 0; c < d; ++c) {
      float acc = 0.0f;
      for (int64_t j = 0; j < keys; ++j) acc += sc[j] * vb[j * d + c];
      o[c] = acc / l;
    }
  }
}

void add_layernorm(const float* x, int64_t ldx, const float* res, int64_t ldr, int64_t rows, int64_t n,
                   const float* gamma, const float* beta, float eps, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = res ? xr[i] + res[r * ldr + i] : xr[i];
      yr[i] = v;
      sum += v;
    }
    const float mean = static_cast<float>(sum / static_cast<double>(n));
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float c = yr[i] - mean;
      sq += static_cast<double>(c) * c;
    }
    const float var = static_cast<float>(sq / static_cast<double>(n));
    const float rstd = 1.0f / std::sqrt(var + eps);
    for (int64_t i = 0; i < n; ++i) yr[i] = (yr[i] - mean) * rstd * gamma[i] + beta[i];
  }
}

const AttnKernels kTable = {"scalar", scratch_bytes, item, add_layernorm, nullptr};

}  // namespace

const AttnKernels* attn_scalar_kernels() { return &kTable; }

}  // namespace hf_sparse
