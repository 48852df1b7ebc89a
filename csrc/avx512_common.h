// Inline AVX-512 helpers shared by the AVX-512 kernel files (each compiled with its own flags; internal linkage,
// so every file gets its own copy built for its flags).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"
#include "common.h"
#include "gelu_table.h"

namespace hf_sparse {
namespace {

// acc += u8 x s8 dot products of 4 (vpdpbusd). Inline asm ties the accumulator to one register: with the
// intrinsic GCC 12 copies every accumulator to a temporary and back (and with 24 of them, spills them).
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

// Vector math

// The exact (erf) GELU from h = v / 2: gelu(v) = h + x G(x), x = |h|, G(x) = erf(sqrt 2 x) read from a piecewise
// polynomial (csrc/gelu_table.h: 32 segments on [0, 2.8], degree 3, |error| < 1.9e-7 max(|v|, 1)). x is clamped to
// 2.8, the first FMA rounds down around 1.5 * 2^23 so that its low 5 bits are the segment floor(x * kGeluGScale),
// t = x * kGeluGScale - segment (one rounding), and one vpermt2ps per coefficient picks each lane's segment. 13 vector
// operations per 16 values, 10 of them on the FMA pipes (which the permutes and vpdpbusd share on Zen 4): v Phi(v)
// over [-6, 6] of degree 4 took 14 and 12, ~1.5% of a BERT-base forward at batch 16. The epilogues hand over h
// itself (Dequant: scale and bias halved, exact). The last segment is the constant 1: gelu(v) = v above ~5.43, 0
// below; inf -> inf, -inf -> NaN (inf - inf), NaN -> NaN.
inline __m512 gelu_half_ps(__m512 h) {
  const __m512 x = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(h), _mm512_set1_epi32(0x7fffffff)));
  const __m512 c = _mm512_min_ps(x, _mm512_set1_ps(kGeluGRange));  // (NaN -> 2.8: x and h carry the NaN)
  const __m512 base = _mm512_set1_ps(12582912.0f);                 // 1.5 * 2^23
  const __m512 scale = _mm512_set1_ps(kGeluGScale);
  const __m512 km = _mm512_fmadd_round_ps(c, scale, base, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512i idx = _mm512_castps_si512(km);
  const __m512 t = _mm512_fmadd_ps(c, scale, _mm512_sub_ps(base, km));
  const auto coef = [&](int j) {
    return _mm512_permutex2var_ps(_mm512_load_ps(kGeluG32[j]), idx, _mm512_load_ps(kGeluG32[j] + 16));
  };
  __m512 p = coef(kGeluG32Degree);
#pragma GCC unroll 8
  for (int j = kGeluG32Degree - 1; j >= 0; --j) p = _mm512_fmadd_ps(p, t, coef(j));
  return _mm512_fmadd_ps(x, p, h);
}

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : (n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1));
}
inline __mmask64 mask64(int64_t n) {
  return n >= 64 ? ~__mmask64(0) : (n <= 0 ? __mmask64(0) : (__mmask64(1) << n) - 1);
}
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xffffffffu) : (n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1));
}

// In-place transpose of 16 rows of 16 32-bit lanes.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// inv = (1 / amax) * 127 and scale = amax / 127, amax from the integer max of |x|'s bits (which also spots inf and
// NaN, whose tokens get scale NaN).
inline void token_params(const float* x, int64_t k, float* inv, float* scale) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask));
    m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(x + i + 16), abs_mask));
  }
  for (; i < k; i += 16) {
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(mask16(k - i), x + i), abs_mask));
  }
  const uint32_t bits = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
  if (bits >= 0x7f800000u) {
    *inv = 0.0f;
    const uint32_t nan_bits = 0x7fc00000u;
    std::memcpy(scale, &nan_bits, 4);
    return;
  }
  float amax;
  std::memcpy(&amax, &bits, 4);
  *inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
  *scale = amax / 127.0f;
}

// The attention kernels' softmax

// 16 scores of keys c .. c + 15 (valid: those < the row's keys) with the row's mask applied (MaskKind: float
// added, bool keeping nonzero) and -inf for every key masked or not valid.
inline __m512 masked_scores(__m512 v, __mmask16 valid, int mask_kind, const void* mask, int64_t c) {
  __mmask16 keep = valid;
  if (mask_kind == kMaskAdd) {
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, static_cast<const float*>(mask) + c));
  } else if (mask_kind == kMaskKeep) {
    const __m128i b = _mm_maskz_loadu_epi8(valid, static_cast<const uint8_t*>(mask) + c);
    keep = _mm_test_epi8_mask(b, b);
  }
  return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), keep, v);
}


constexpr float kExpMin = -87.33654475f;  // log(FLT_MIN): exp below it is subnormal, taken as 0
// exp(x) for x <= 0 (the softmaxes' s - max s, tanh's -2|x|) as 2^(x log2 e) = 2^e 2^(j / 16) 2^f. One FMA into a
// float whose ulp is 1/16 (1.5 x 2^19) rounds 16 x log2 e to 16 e + j, whose low 4 bits vpermps reads as the index
// of 2^(j / 16) in a register table; 2^f on |f| <= 1/32 is a degree-3 Taylor polynomial (truncation 9e-9), taken as
// t + (t f) q(f); vscalefps multiplies by 2^floor(e + j / 16) = 2^e. 0 below kExpMin and for NaN; -inf gives 0.
// Relative error at most 1.8e-7 for x >= -8, 1.3e-6 down to kExpMin (log2 e's rounding times x; measured against
// double exp over every float in [kExpMin, 0]). 10 instructions per 16 values, 7 of them on the multiply pipes,
// where the degree-5 polynomial over [-1/2, 1/2] with a split log2 e (2.3e-7) took 11 and 9: the int8 softmax is
// bound by the FP pipes' throughput, and this made the whole batch-16 model 0.7% faster.
inline __m512 exp_ps(__m512 x) {
  const __m512 table = _mm512_setr_ps(
      1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f, 1.1892070770263672f, 1.2418577671051025f,
      1.2968395948410034f, 1.3542555570602417f, 1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f,
      1.610490322113037f, 1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f);
  const __m512 log2e = _mm512_set1_ps(1.44269502162933349609375f), magic = _mm512_set1_ps(786432.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_GE_OQ);
  const __m512 y = _mm512_fmadd_ps(x, log2e, magic);  // magic + (16 e + j) / 16
  const __m512 n = _mm512_sub_ps(y, magic);
  const __m512 f = _mm512_fmsub_ps(x, log2e, n);
  const __m512 t = _mm512_permutexvar_ps(_mm512_castps_si512(y), table);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.05550410971045494f), f, _mm512_set1_ps(0.24022650718688965f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.6931471824645996f));
  return _mm512_maskz_scalef_ps(keep, _mm512_fmadd_ps(_mm512_mul_ps(t, f), q, t), n);
}

// tanh (common.h, kTanhQ): relative error ~3e-7 (exp_ps' 2.3e-7 and the quotient's roundings above kTanhSmall);
// +-inf -> +-1, NaN -> NaN.
inline __m512 tanh_ps(__m512 v) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 a = _mm512_andnot_ps(sign, v);
  const __m512 s = _mm512_mul_ps(a, a);
  __m512 q = _mm512_set1_ps(kTanhQ[4]);
#pragma GCC unroll 4
  for (int i = 3; i >= 0; --i) q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kTanhQ[i]));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(a, s), q, a);
  const __m512 e = exp_ps(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 large = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(kTanhSmall), _CMP_LT_OQ);
  const __m512 t = _mm512_mask_mov_ps(large, is_small, small);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_or_ps(t, _mm512_and_ps(v, sign)), nan, v);
}

// What an epilogue that scales its output anyway hands the activation: v / 2 for the GELU (gelu_half_ps; the scale
// and bias multiplied by act_input_scale, exact), v itself otherwise.
inline float act_input_scale(int act) { return act == kActGelu ? 0.5f : 1.0f; }
inline __m512 activate_prepared(__m512 u, int act) {
  return act == kActGelu ? gelu_half_ps(u) : (act == kActTanh ? tanh_ps(u) : u);
}

// The activation of a v in hand (for the GELU, v / 2 here: the same as the epilogues' halved scale and bias but for
// a subnormal v / 2).
inline __m512 activate(__m512 v, int act) {
  return activate_prepared(act == kActGelu ? _mm512_mul_ps(v, _mm512_set1_ps(0.5f)) : v, act);
}

}  // namespace
}  // namespace hf_sparse
