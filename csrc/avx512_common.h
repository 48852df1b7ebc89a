// Inline AVX-512 helpers shared by the AVX-512 kernel files (each compiled with its own flags; internal linkage,
// so every file gets its own copy built for its flags).
#pragma once

#include <immintrin.h>

#include <cstdint>

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

// The exact (erf) GELU, gelu(v) = v Phi(v) with Phi(v) = (1 + erf(v / sqrt 2)) / 2 read from a piecewise polynomial
// (csrc/gelu_table.h: 32 segments on [-6, 6], degree 4, |error| < 2e-7 max(|v|, 1)). v is clamped to [-6, 6]
// (vrangeps: the smaller magnitude, v's sign), u = v * kPhiScale + 16 lies in (0.5, 31.5), and one vpermt2ps per
// coefficient picks each lane's segment round(u) (two 16-entry halves): 14 vector operations per 16 values where
// the table of g(|v|) = erf(|v| / sqrt 2) / 2 it replaced (v / 2 + |v| g) took 17; ~1% of a BERT-base forward.
// The end segments are the constants 0 and 1: inf -> inf, -inf -> NaN (-inf * 0), NaN -> NaN.
inline __m512 gelu_ps(__m512 v) {
  const __m512 c = _mm512_range_ps(v, _mm512_set1_ps(kGeluRange), 0x02);  // min |.|, sign of v
  // km = round(u) + 1.5 * 2^23 (one rounding, to nearest even): its low 5 bits are the segment the permutes read;
  // q = 16 - round(u) (exact), t = c * kPhiScale + q rounded once
  const __m512 base = _mm512_set1_ps(12582928.0f);  // 1.5 * 2^23 + 16
  const __m512 scale = _mm512_set1_ps(kPhiScale);
  const __m512 km = _mm512_fmadd_ps(c, scale, base);
  const __m512i idx = _mm512_castps_si512(km);
  const __m512 t = _mm512_fmadd_ps(c, scale, _mm512_sub_ps(base, km));
  const auto coef = [&](int j) {
    return _mm512_permutex2var_ps(_mm512_load_ps(kPhi32[j]), idx, _mm512_load_ps(kPhi32[j] + 16));
  };
  __m512 p = coef(kPhi32Degree);
#pragma GCC unroll 8
  for (int j = kPhi32Degree - 1; j >= 0; --j) p = _mm512_fmadd_ps(p, t, coef(j));
  return _mm512_mul_ps(v, p);
}

inline __m512 activate(__m512 v, int act) { return act == kActGelu ? gelu_ps(v) : v; }

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : (n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1));
}
inline __mmask64 mask64(int64_t n) {
  return n >= 64 ? ~__mmask64(0) : (n <= 0 ? __mmask64(0) : (__mmask64(1) << n) - 1);
}
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xffffffffu) : (n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1));
}

}  // namespace
}  // namespace hf_sparse
