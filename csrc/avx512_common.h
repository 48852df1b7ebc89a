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

// The exact (erf) GELU, gelu(v) = v / 2 + |v| g(|v|) with g(a) = erf(a / sqrt 2) / 2 read from a piecewise
// polynomial (csrc/gelu_table.h: 16 segments on [0, 6], degree 4, |error| < 1.5e-7 |v|). One vpermps per
// coefficient picks each lane's segment: ~12 cycles per vector where erf via exp and a division took ~27.
// inf -> inf, -inf -> NaN, NaN -> NaN, as torch's F.gelu.
inline __m512 gelu_ps(__m512 v) {
  constexpr float kSegments = 16.0f;
  const __m512 a = _mm512_abs_ps(v);
  // u = a / width - 0.5 (at most 15.49: past the range the last segment holds g = 0.5), k = round(u) by adding
  // 1.5 * 2^23, whose low mantissa bits are then k: the permutes read the index from them (4 bits).
  const __m512 u = _mm512_min_ps(_mm512_fmadd_ps(a, _mm512_set1_ps(kSegments / kGeluRange), _mm512_set1_ps(-0.5f)),
                                 _mm512_set1_ps(kSegments - 0.51f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 km = _mm512_add_ps(u, magic);
  const __m512i idx = _mm512_castps_si512(km);
  const __m512 t = _mm512_sub_ps(u, _mm512_sub_ps(km, magic));
  __m512 p = _mm512_permutexvar_ps(idx, _mm512_load_ps(kGelu16[kGelu16Degree]));
#pragma GCC unroll 8
  for (int j = kGelu16Degree - 1; j >= 0; --j) {
    p = _mm512_fmadd_ps(p, t, _mm512_permutexvar_ps(idx, _mm512_load_ps(kGelu16[j])));
  }
  return _mm512_fmadd_ps(a, p, _mm512_mul_ps(v, _mm512_set1_ps(0.5f)));
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
