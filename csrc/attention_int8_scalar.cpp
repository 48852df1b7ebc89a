// Portable int8 attention: the baseline of HF_SPARSE_ATTENTION=int8 on every CPU, and the plainest statement of the
// numerics the vector kernels compute (docs/kernels.md, "int8 attention"). Per head, for queries i and keys j:
//
//   q[i], k[j], v[j] -> s8 codes and a scale per token, as the Linears quantize activations:
//       amax = max |x|, inv = (1 / amax) * 127 (0 for amax 0), code = clamp(round(x * inv), -127, 127),
//       scale = amax / 127 (NaN when x holds inf or NaN)
//   s[i][j] = (float(sum_d qc[i][d] kc[j][d]) * (qs[i] * scale)) * ks[j]      (+ mask; -inf where masked)
//   p[i][j] = exp(s[i][j] - max_j s[i][j])                                   (0 below e^-87.34)
//   w[i][j] = p[i][j] * vs[j];  pc[i][j] = round(w[i][j] * ((1 / max_j w[i][j]) * 255))  in 0..255
//   out[i]  = (float(sum_j pc[i][j] vc[j]) * (max_j w[i][j] / 255)) / sum_j p[i][j]
//
// Both sums are exact in int32 (up to 65536 keys and head features), so the instruction sets differ only in the
// exponential and the order of the float32 sum of p. A query whose keys are all masked gets 0; a NaN gives a NaN row.
#include <cmath>
#include <cstring>
#include <limits>

#include "attention.h"

namespace hf_sparse {
namespace {

constexpr float kExpMin = -87.33654475f;  // log(FLT_MIN)

// Codes of x[0 .. d - 1] into c; returns the scale.
float quantize(const float* x, int64_t d, int32_t* c) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < d; ++i) {
    const float a = std::fabs(x[i]);
    finite &= a <= std::numeric_limits<float>::max();
    amax = a > amax ? a : amax;
  }
  if (!finite) {
    for (int64_t i = 0; i < d; ++i) c[i] = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
  for (int64_t i = 0; i < d; ++i) {
    float t = x[i] * inv;
    t = t != t ? 0.0f : (t > 127.0f ? 127.0f : (t < -127.0f ? -127.0f : t));  // NaN: 0 * inf, for amax subnormal
    c[i] = static_cast<int32_t>(std::nearbyint(t));
  }
  return amax / 127.0f;
}

// K codes [s][d], V codes [s][d], their scales [s] and [s], one Q row's codes [d], the row's w [s], its codes [s]
size_t scratch_bytes(int64_t d, int64_t s, int64_t) { return static_cast<size_t>(2 * s * d + 2 * s + d + 2 * s) * 4; }

void item(const AttnItem& a, void* scratch) {
  const int64_t d = a.d, s = a.causal ? (a.q1 < a.s ? a.q1 : a.s) : a.s;
  int32_t* kc = static_cast<int32_t*>(scratch);
  int32_t* vc = kc + a.s * d;
  float* ks = reinterpret_cast<float*>(vc + a.s * d);
  float* vs = ks + a.s;
  int32_t* qc = reinterpret_cast<int32_t*>(vs + a.s);
  float* w = reinterpret_cast<float*>(qc + d);
  int32_t* pc = reinterpret_cast<int32_t*>(w + a.s);
  for (int64_t j = 0; j < s; ++j) {
    ks[j] = quantize(a.k + j * a.ldk, d, kc + j * d);
    vs[j] = quantize(a.v + j * a.ldv, d, vc + j * d);
  }
  const float ninf = -std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = a.q0; i < a.q1; ++i) {
    float* o = a.out + i * a.ldo;
    const float rs = quantize(a.q + i * a.ldq, d, qc) * a.scale;
    const int64_t keys = a.causal ? (i + 1 < s ? i + 1 : s) : s;
    float m = ninf;
    bool bad = false;
    for (int64_t j = 0; j < keys; ++j) {
      int32_t acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += qc[c] * kc[j * d + c];
      float v = (static_cast<float>(acc) * rs) * ks[j];
      if (a.mask_kind == kMaskAdd) {
        v = v + static_cast<const float*>(a.mask)[i * a.mask_ld + j];
      } else if (a.mask_kind == kMaskKeep && !static_cast<const uint8_t*>(a.mask)[i * a.mask_ld + j]) {
        v = ninf;
      }
      w[j] = v;
      bad |= v != v;
      m = v > m ? v : m;
    }
    float l = 0.0f, wmax = 0.0f;
    for (int64_t j = 0; j < keys && !bad && m != ninf; ++j) {
      const float x = w[j] - m;
      const float p = x < kExpMin ? 0.0f : std::exp(x);
      l += p;
      w[j] = p * vs[j];
      bad |= w[j] != w[j];
      wmax = w[j] > wmax ? w[j] : wmax;
    }
    if (bad || m == ninf) {
      for (int64_t c = 0; c < d; ++c) o[c] = bad ? nan : 0.0f;
      continue;
    }
    const float winv = wmax > 0.0f ? (1.0f / wmax) * 255.0f : 0.0f;
    for (int64_t j = 0; j < keys; ++j) {
      const float t = w[j] > 0.0f ? w[j] * winv : 0.0f;
      pc[j] = static_cast<int32_t>(std::nearbyint(t < 255.0f ? t : 255.0f));
    }
    const float ps = wmax / 255.0f;
    for (int64_t c = 0; c < d; ++c) {
      int32_t acc = 0;
      for (int64_t j = 0; j < keys; ++j) acc += pc[j] * vc[j * d + c];
      o[c] = (static_cast<float>(acc) * ps) / l;
    }
  }
}

const AttnKernels kTable = {"scalar_int8", scratch_bytes, item, nullptr, nullptr, nullptr, nullptr, true};

}  // namespace

const AttnKernels* attn_int8_scalar_kernels() { return &kTable; }

}  // namespace hf_sparse
