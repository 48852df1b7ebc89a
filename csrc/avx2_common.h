// Inline AVX2 + FMA helpers shared by the AVX2 attention files (both compiled with -mavx2 -mfma only; internal
// linkage, so every file gets its own copy).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "attention.h"

namespace hf_sparse {
namespace {

constexpr float kExpMinAvx2 = -87.33654475f;  // log(FLT_MIN): exp below it is subnormal, taken as 0

inline __m256i tail_mask(int64_t n) {
  alignas(32) static const int32_t kOnes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t k = n >= 8 ? 8 : (n <= 0 ? 0 : n);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kOnes + 8 - k));
}
inline __m256 load_n(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n));
}
inline void store_n(float* p, int64_t n, __m256 v) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else if (n > 0) {
    _mm256_maskstore_ps(p, tail_mask(n), v);
  }
}

// exp(x) for x <= 0 (-inf gives 0), as in attention_avx512_bf16.cpp; 2^n from the exponent bits.
inline __m256 exp_ps(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMinAvx2), _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Scores v of keys j0 .. j0 + 7 of a row with `keys` valid keys, masked: + the additive mask, -inf where a bool mask
// is 0 and past keys (mask: the row's mask, read only for valid keys).
inline __m256 masked_scores(__m256 v, int64_t j0, int64_t keys, int mask_kind, const void* mask) {
  __m256 keep = _mm256_castsi256_ps(tail_mask(keys - j0));
  if (mask_kind == kMaskAdd) {
    v = _mm256_add_ps(v, load_n(static_cast<const float*>(mask) + j0, keys - j0));
  } else if (mask_kind == kMaskKeep) {
    const uint8_t* mb = static_cast<const uint8_t*>(mask) + j0;
    alignas(32) int32_t flags[8];
    for (int t = 0; t < 8; ++t) flags[t] = (j0 + t < keys && mb[t]) ? -1 : 0;
    keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(flags)));
  }
  return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), v, keep);
}

}  // namespace
}  // namespace hf_sparse
