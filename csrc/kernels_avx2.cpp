// 256-bit kernels, built three times from this one source (CMakeLists.txt), each with only its own flags:
//   HF_SPARSE_VNNI=0  avx2:            -mavx2 -mfma; int8 dot products with vpmaddwd on s16 activations (exact).
//   HF_SPARSE_VNNI=1  avx2_vnni (VEX): -mavx2 -mfma -mavxvnni; vpdpbusd ymm on u8 activations (code + 128).
//   HF_SPARSE_VNNI=2  avx2_vnni (EVEX): the same as 1 encoded for AVX512-VNNI + VL CPUs, so that forcing the
//                     avx2_vnni level on such a CPU runs (and tests) this source.
//
// The layouts and the work split are those of kernels_avx512.cpp with 8 tokens per vector (madd: 4 tokens x 4
// features of s16 per vector, two vectors per 8 tokens).
#include <immintrin.h>

#include <cstring>

#include "avx2_common.h"  // exp_ps
#include "common.h"
#include "gelu_table.h"

#ifndef HF_SPARSE_VNNI
#define HF_SPARSE_VNNI 0
#endif

namespace hf_sparse {
namespace {

constexpr int kVec = 8;
constexpr int kMaxT = 4;  // 32 tokens per tile
constexpr bool kVnni = HF_SPARSE_VNNI != 0;

#if HF_SPARSE_VNNI == 1
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
#elif HF_SPARSE_VNNI == 2
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_epi32(acc, u8, s8); }
#endif

// ---------------------------------------------------------------------------------------------------------------
// Vector math (see kernels_avx512.cpp)

// The exact (erf) GELU as in kernels_avx512.cpp, from csrc/gelu_table.h's 8 segments of degree 5 (|error| < 3e-7
// |v|): one vpermps ymm per coefficient, about half the work of erf via exp and a division.
inline __m256 gelu_ps(__m256 v) {
  constexpr float kSegments = 8.0f;
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  const __m256 u = _mm256_min_ps(_mm256_fmadd_ps(a, _mm256_set1_ps(kSegments / kGeluRange), _mm256_set1_ps(-0.5f)),
                                 _mm256_set1_ps(kSegments - 0.51f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: u + magic holds round(u) in its low bits
  const __m256 km = _mm256_add_ps(u, magic);
  const __m256i idx = _mm256_castps_si256(km);
  const __m256 t = _mm256_sub_ps(u, _mm256_sub_ps(km, magic));
  __m256 p = _mm256_permutevar8x32_ps(_mm256_load_ps(kGelu8[kGelu8Degree]), idx);
#pragma GCC unroll 8
  for (int j = kGelu8Degree - 1; j >= 0; --j) {
    p = _mm256_fmadd_ps(p, t, _mm256_permutevar8x32_ps(_mm256_load_ps(kGelu8[j]), idx));
  }
  return _mm256_fmadd_ps(a, p, _mm256_mul_ps(v, _mm256_set1_ps(0.5f)));
}

// tanh as in avx512_common.h (common.h, kTanhQ); avx2_common.h's exp_ps is ~1 ulp.
inline __m256 tanh_ps(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, v);
  const __m256 s = _mm256_mul_ps(a, a);
  __m256 q = _mm256_set1_ps(kTanhQ[4]);
#pragma GCC unroll 4
  for (int i = 3; i >= 0; --i) q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(kTanhQ[i]));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(a, s), q, a);
  const __m256 e = exp_ps(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
  const __m256 large = _mm256_div_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), e), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 t = _mm256_blendv_ps(large, small, _mm256_cmp_ps(a, _mm256_set1_ps(kTanhSmall), _CMP_LT_OQ));
  const __m256 signed_t = _mm256_or_ps(t, _mm256_and_ps(v, sign));
  return _mm256_blendv_ps(signed_t, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // NaN stays NaN
}

inline __m256 activate(__m256 v, int act) {
  return act == kActGelu ? gelu_ps(v) : (act == kActTanh ? tanh_ps(v) : v);
}

// Stores 8 output channels (mask cm) of one token row: the exact int32 sums a, or ((a * sx) * sw) + bias rounded in
// that order like the reference, then the activation.
inline void store_row8(const Output& out, int64_t row, int64_t col, __m256i cm, __m256i a, float sx, __m256 sw,
                       bool has_bias, __m256 bias) {
  if (out.yi) {
    _mm256_maskstore_epi32(reinterpret_cast<int*>(out.yi + row * out.ldy + col), cm, a);
    return;
  }
  __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(sx)), sw);
  if (has_bias) v = _mm256_add_ps(v, bias);
  _mm256_maskstore_ps(out.y + row * out.ldy + col, cm, activate(v, out.act));
}

inline void transpose8(__m256i r[8]) {
  __m256i t[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m256i u[8];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int v = n >= 8 ? 8 : (n <= 0 ? 0 : static_cast<int>(n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(v), idx);
}

inline __m256 load_ps(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n));
}

// ---------------------------------------------------------------------------------------------------------------
// Activation quantization (bit-exact with numerics.quantize_activation_int8)

inline void token_params(const float* x, int64_t k, float* inv, float* scale) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8));
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(a, abs_mask));
    m1 = _mm256_max_epu32(m1, _mm256_and_si256(b, abs_mask));
  }
  for (; i < k; i += 8) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_castps_si256(load_ps(x + i, k - i)), abs_mask));
  }
  m0 = _mm256_max_epu32(m0, m1);
  __m128i h = _mm_max_epu32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xb1));
  const uint32_t bits = static_cast<uint32_t>(_mm_cvtsi128_si32(h));
  if (bits >= 0x7f800000u) {
    const uint32_t nan_bits = 0x7fc00000u;
    *inv = 0.0f;
    std::memcpy(scale, &nan_bits, 4);
    return;
  }
  float amax;
  std::memcpy(&amax, &bits, 4);
  *inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
  *scale = amax / 127.0f;
}

inline __m256i quant8(const float* x, int64_t valid, __m256 inv) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(load_ps(x, valid), inv));  // round half to even (MXCSR default)
}

#if HF_SPARSE_VNNI
// 32 features of one token -> 32 u8 (code + 128) in natural order.
inline __m256i quant32(const float* x, int64_t valid, __m256 inv) {
  const __m256i ab = _mm256_packs_epi32(quant8(x, valid, inv), quant8(x + 8, valid - 8, inv));
  const __m256i cd = _mm256_packs_epi32(quant8(x + 16, valid - 16, inv), quant8(x + 24, valid - 24, inv));
  __m256i b = _mm256_packs_epi16(ab, cd);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  b = _mm256_max_epi8(b, _mm256_set1_epi8(-127));
  return _mm256_xor_si256(b, _mm256_set1_epi8(static_cast<char>(0x80)));
}
constexpr int kQuantStep = 32;  // features per quantization step
#else
// 16 features of one token -> 16 s16 codes in natural order.
inline __m256i quant16(const float* x, int64_t valid, __m256 inv) {
  __m256i b = _mm256_packs_epi32(quant8(x, valid, inv), quant8(x + 8, valid - 8, inv));
  b = _mm256_permute4x64_epi64(b, 0xd8);
  b = _mm256_max_epi16(b, _mm256_set1_epi16(-127));
  return _mm256_min_epi16(b, _mm256_set1_epi16(127));
}
constexpr int kQuantStep = 16;
#endif

// A token whose amax is subnormal gets inv = inf (1 / amax overflows), exactly as in torch; its codes are then
// sign(x) * 127 (and 0 for x = 0, from NaN = 0 * inf). Rare enough to patch after the vector pass.
inline int saturated_code(float v) { return v > 0.0f ? 127 : (v < 0.0f ? -127 : 0); }
inline bool is_inf(float v) { return v > 3.4028234663852886e38f; }

// Writes code c as packed activation element number `index` (u8 code + 128 for VNNI, s16 otherwise).
inline void put_code(char* tile, int64_t index, int c) {
#if HF_SPARSE_VNNI
  tile[index] = static_cast<char>(c + 128);
#else
  const int16_t v = static_cast<int16_t>(c);
  std::memcpy(tile + 2 * index, &v, 2);
#endif
}

void quant_tile(const float* x, int64_t ldx, int rows, int64_t k, int mtp, void* tile_, float* sx) {
  char* tile = static_cast<char*>(tile_);
  const int64_t kb = (k + 3) / 4;
  float inv[kVec];
  for (int g = 0; g < mtp; g += kVec) {
    const int nrow = rows - g < kVec ? (rows - g > 0 ? rows - g : 0) : kVec;
    for (int r = 0; r < kVec; ++r) {
      if (r < nrow) {
        token_params(x + (g + r) * ldx, k, &inv[r], &sx[g + r]);
      } else {
        inv[r] = 0.0f;
      }
    }
    for (int64_t k0 = 0; k0 < k; k0 += kQuantStep) {
#if HF_SPARSE_VNNI
      // 8 tokens x 8 words of 4 u8 -> 8 words x 8 tokens
      __m256i v[8];
#pragma GCC unroll 8
      for (int r = 0; r < kVec; ++r) {
        v[r] = r < nrow ? quant32(x + (g + r) * ldx + k0, k - k0, _mm256_set1_ps(inv[r]))
                        : _mm256_set1_epi8(static_cast<char>(0x80));
      }
      transpose8(v);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const int64_t b = k0 / 4 + j;
        if (b < kb) _mm256_store_si256(reinterpret_cast<__m256i*>(tile + (b * mtp + g) * 4), v[j]);
      }
#else
      // 8 tokens x 4 words of 4 s16 (64-bit) -> 4 words x 8 tokens, as two 4x4 transposes of 64-bit lanes
      __m256i v[8];
#pragma GCC unroll 8
      for (int r = 0; r < kVec; ++r) {
        v[r] = r < nrow ? quant16(x + (g + r) * ldx + k0, k - k0, _mm256_set1_ps(inv[r])) : _mm256_setzero_si256();
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i* q = v + 4 * h;
        const __m256i t0 = _mm256_unpacklo_epi64(q[0], q[1]), t1 = _mm256_unpackhi_epi64(q[0], q[1]);
        const __m256i t2 = _mm256_unpacklo_epi64(q[2], q[3]), t3 = _mm256_unpackhi_epi64(q[2], q[3]);
        const __m256i o[4] = {_mm256_permute2x128_si256(t0, t2, 0x20), _mm256_permute2x128_si256(t1, t3, 0x20),
                              _mm256_permute2x128_si256(t0, t2, 0x31), _mm256_permute2x128_si256(t1, t3, 0x31)};
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int64_t b = k0 / 4 + j;
          if (b < kb) _mm256_store_si256(reinterpret_cast<__m256i*>(tile + (b * mtp + g + 4 * h) * 8), o[j]);
        }
      }
#endif
    }
    for (int r = 0; r < nrow; ++r) {
      if (!is_inf(inv[r])) continue;
      const float* xr = x + (g + r) * ldx;
      for (int64_t i = 0; i < k; ++i) put_code(tile, ((i >> 2) * mtp + g + r) * 4 + (i & 3), saturated_code(xr[i]));
    }
  }
}

void quant_rows(const float* x, int64_t ldx, int rows, int64_t k, void* out_, int64_t ldo, float* sx) {
  char* out = static_cast<char*>(out_);
  const int64_t kp = (k + 3) / 4 * 4;
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float inv;
    token_params(xr, k, &inv, &sx[r]);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t k0 = 0; k0 < kp; k0 += kQuantStep) {
#if HF_SPARSE_VNNI
      const __m256i q = quant32(xr + k0, k - k0, vinv);
      char* o = out + r * ldo + k0;
#else
      const __m256i q = quant16(xr + k0, k - k0, vinv);
      char* o = out + (r * ldo + k0) * 2;
#endif
      const int64_t bytes = (kp - k0 < kQuantStep ? kp - k0 : kQuantStep) * (kVnni ? 1 : 2);
      if (bytes == 32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), q);
      } else {
        alignas(32) char tmp[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), q);
        std::memcpy(o, tmp, static_cast<size_t>(bytes));
      }
    }
    if (is_inf(inv)) {
      for (int64_t i = 0; i < k; ++i) put_code(out, r * ldo + i, saturated_code(xr[i]));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Output staging: 8 rows x 8 tokens per token vector, transposed before the store.

template <int T>
struct Staging {
  alignas(32) int32_t v[T][8][kVec];
};

template <int T>
inline void store_group(Staging<T>& st, int nr, int rows, int64_t n0, const Output& out, bool as_int) {
  const __m256i cm = lane_mask(nr);
  for (int t = 0; t < T; ++t) {
    if (t * kVec >= rows) break;
    __m256i r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(st.v[t][i]));
    transpose8(r);
    const int nt = rows - t * kVec < kVec ? rows - t * kVec : kVec;
    // Constant indices only (a loop to nt would index r at run time and push it to memory).
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= nt) break;
      const int64_t row = out.m0 + t * kVec + j;
      if (as_int) {
        _mm256_maskstore_epi32(reinterpret_cast<int*>(out.yi + row * out.ldy + n0), cm, r[j]);
      } else {
        _mm256_maskstore_ps(out.y + row * out.ldy + n0, cm, _mm256_castsi256_ps(r[j]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Sparse int8 (4-block)

constexpr int64_t kPassBytes = 32768;  // tile bytes per pass over the column panels (see kernels_avx512.cpp)
constexpr int kGroup = 64;              // rows per group that share a pass (a multiple of 8)

#if HF_SPARSE_VNNI
constexpr int kAcc = 1;
constexpr int64_t kTokenBytes = 32;  // 8 tokens x 4 u8 per kb
#else
constexpr int kAcc = 2;              // tokens 0-3 and 4-7 of each vector, as pair sums of s16 products
constexpr int64_t kTokenBytes = 64;  // 8 tokens x 4 s16 per kb
#endif

// Sums of row n over panels c0..c1-1 (see kernels_avx512.cpp's i8_row). res[t][a]: madd keeps two vectors of
// pair sums per 8 tokens, VNNI one vector of sums.
template <int T, int S>
__attribute__((always_inline)) inline void i8_row(const SparseI8& w, const char* tile, int64_t n, int64_t c0,
                                                  int64_t c1, const __m256i (*init)[kAcc], __m256i (*res)[kAcc]) {
  constexpr int64_t kStride = kTokenBytes * T;
  const uint32_t kb_max = static_cast<uint32_t>(w.kb - 1);
  __m256i acc[S][T][kAcc];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
      for (int a = 0; a < kAcc; ++a) acc[s][t][a] = s == 0 ? init[t][a] : _mm256_setzero_si256();
  const auto step = [&](int s, int32_t blk) __attribute__((always_inline)) {
    uint32_t c = w.cols[blk];
    c = c < kb_max ? c : kb_max;  // never read outside the tile, whatever the indices hold
    const char* p = tile + c * kStride;
#if HF_SPARSE_VNNI
    const __m256i wv = _mm256_set1_epi32(w.values[blk]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      acc[s][t][0] = dpbusd(acc[s][t][0], _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32 * t)), wv);
    }
#else
    const __m256i wv = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(w.values[blk])));
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a) {
        const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 64 * t + 32 * a));
        acc[s][t][a] = _mm256_add_epi32(acc[s][t][a], _mm256_madd_epi16(xv, wv));
      }
    }
#endif
  };
  for (int64_t c = c0; c < c1; ++c) {
    int32_t b = w.ptr[c * w.n + n];
    const int32_t e = w.ptr[c * w.n + n + 1];
    for (; b + S <= e; b += S) {
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) step(s, b + s);
    }
#pragma GCC unroll 8
    for (int s = 0; s + 1 < S; ++s) {
      if (b + s < e) step(s, b + s);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
    for (int a = 0; a < kAcc; ++a) {
      __m256i v = acc[0][t][a];
#pragma GCC unroll 8
      for (int s = 1; s < S; ++s) v = _mm256_add_epi32(v, acc[s][t][a]);
      res[t][a] = v;
    }
}

template <int T>
void i8_sparse_t(const SparseI8& w, const char* tile, int rows, const float* sx, int64_t n0, int64_t n1,
                 const Output& out) {
  constexpr int kSets = T * kAcc >= 4 ? 1 : 2;
  constexpr int64_t kPanelBytes = kPanel * kTokenBytes * T;
  const int64_t per_pass = kPassBytes / kPanelBytes > 1 ? kPassBytes / kPanelBytes : 1;
  __m256 vsx[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) vsx[t] = load_ps(sx + t * kVec, rows - t * kVec);
  Staging<T> st;
  alignas(32) __m256i part[kGroup][T][kAcc];
  for (int64_t g0 = n0; g0 < n1; g0 += kGroup) {
    const int gn = n1 - g0 < kGroup ? static_cast<int>(n1 - g0) : kGroup;
    for (int64_t c0 = 0; c0 < w.panels; c0 += per_pass) {
      const int64_t c1 = c0 + per_pass < w.panels ? c0 + per_pass : w.panels;
      const bool last = c1 == w.panels;
      for (int i = 0; i < gn; ++i) {
        const int64_t n = g0 + i;
        __m256i init[T][kAcc], acc[T][kAcc];
        // VNNI starts from -128 * sum(w), which takes back the +128 shift of the u8 activations.
        const __m256i corr = _mm256_set1_epi32(kVnni ? -128 * w.weight_sum[n] : 0);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
          for (int a = 0; a < kAcc; ++a) {
            init[t][a] = c0 == 0 ? (a == 0 ? corr : _mm256_setzero_si256()) : part[i][t][a];
          }
        i8_row<T, kSets>(w, tile, n, c0, c1, init, acc);
        if (!last) {
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
            for (int a = 0; a < kAcc; ++a) part[i][t][a] = acc[t][a];
          continue;
        }
        const int r = i & 7;
        const __m256 sw = _mm256_set1_ps(w.scale[n]);
        const __m256 bias = _mm256_set1_ps(w.bias ? w.bias[n] : 0.0f);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
#if HF_SPARSE_VNNI
          const __m256i a = acc[t][0];
#else
          const __m256i a = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[t][0], acc[t][1]), 0xd8);
#endif
          if (out.yi) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(st.v[t][r]), a);
            continue;
          }
          __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), vsx[t]), sw);
          if (w.bias) v = _mm256_add_ps(v, bias);
          _mm256_store_ps(reinterpret_cast<float*>(st.v[t][r]), activate(v, out.act));
        }
        if (r == 7 || i == gn - 1) store_group<T>(st, r + 1, rows, n - r, out, out.yi != nullptr);
      }
    }
  }
}

void i8_sparse(const SparseI8& w, const void* tile, int mtp, int rows, const float* sx, int64_t n0, int64_t n1,
               const Output& out) {
  if (w.quads) return i8_quads_portable(w, tile, kVnni ? 1 : 2, kVnni ? 128 : 0, mtp, rows, sx, n0, n1, out);
  const char* t = static_cast<const char*>(tile);
  switch (mtp / kVec) {
    case 1: return i8_sparse_t<1>(w, t, rows, sx, n0, n1, out);
    case 2: return i8_sparse_t<2>(w, t, rows, sx, n0, n1, out);
    case 3: return i8_sparse_t<3>(w, t, rows, sx, n0, n1, out);
    default: return i8_sparse_t<4>(w, t, rows, sx, n0, n1, out);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Sparse int8 for a few tokens (decoding). The tile kernel above gives each token a lane: at M = 1 it fills one
// lane of 8 and still transposes 8-row groups for its stores. Here the lanes are (block, token) pairs of one row:
// 8 blocks x 1 token, 4 x 2 or 2 x 4. The R tokens' activation words are first interleaved
// per block (R words of 4 u8, or of 4 s16, side by side), so that one broadcast load fetches a block's words for
// all R tokens; they are blended into place (on Zen 4, vpgatherdd was slower than these broadcasts + blends, and
// a panel is 16 ymm, too many to keep in registers as the AVX-512 kernel does) and multiplied with the blocks'
// weights (spread to their R lanes by a vpermd) by vpdpbusd, or by vpmaddwd on s16. The block columns, loaded 8
// at a time and clamped to the row, are shared by the R tokens, so 4 tokens cost little more than 1. Each row's
// token sums come from its accumulators' lanes; the epilogue runs on 8 contiguous output channels at a time.

// Up to this many tokens this kernel beats the tile kernel (benchmarks/RESULTS.md, "Decoding (few tokens) on the
// AVX2 paths"): at M = 4 by 1.06-1.19x with hot weights; at M = 5 (two passes, 4 + 1) it is 1.3-1.55x slower.
constexpr int kFewRows = 4;
constexpr int64_t kFewBuffer = 32768;  // bytes of interleaved token words (on the stack)
constexpr int kWord = kVnni ? 4 : 8;  // bytes of one block of one token: 4 u8 or 4 s16

inline int32_t load_i32(const char* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline int64_t load_i64(const char* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// The R tokens' words side by side per block: xi[(j * R + r) * kWord] = token r's block j (32-byte vectors of
// each token, transposed in registers). Reads whole vectors: up to the 64-byte rounded row length (run_few's
// ldq), whose words past kb are never used.
template <int R>
inline void interleave(const char* const* xr, int64_t kb, char* xi) {
  constexpr int kStep = 32 / kWord;  // blocks per vector
  for (int64_t j = 0; j < kb; j += kStep) {
    __m256i v[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[r] + j * kWord));
    __m256i* o = reinterpret_cast<__m256i*>(xi + j * R * kWord);
    if (R == 2) {  // 2 x 8 words of 4 bytes (4 of 8 bytes) -> 8 (4) pairs
      const __m256i lo = kVnni ? _mm256_unpacklo_epi32(v[0], v[1]) : _mm256_unpacklo_epi64(v[0], v[1]);
      const __m256i hi = kVnni ? _mm256_unpackhi_epi32(v[0], v[1]) : _mm256_unpackhi_epi64(v[0], v[1]);
      _mm256_store_si256(o, _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_store_si256(o + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
    } else if (kVnni) {  // 4 x 8 words of 4 bytes -> 8 quadruples
      const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      _mm256_store_si256(o, _mm256_permute2x128_si256(u0, u1, 0x20));
      _mm256_store_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
      _mm256_store_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
      _mm256_store_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
    } else {  // 4 x 4 words of 8 bytes -> 4 quadruples
      const __m256i t0 = _mm256_unpacklo_epi64(v[0], v[1]), t1 = _mm256_unpackhi_epi64(v[0], v[1]);
      const __m256i t2 = _mm256_unpacklo_epi64(v[2], v[3]), t3 = _mm256_unpackhi_epi64(v[2], v[3]);
      _mm256_store_si256(o, _mm256_permute2x128_si256(t0, t2, 0x20));
      _mm256_store_si256(o + 1, _mm256_permute2x128_si256(t1, t3, 0x20));
      _mm256_store_si256(o + 2, _mm256_permute2x128_si256(t0, t2, 0x31));
      _mm256_store_si256(o + 3, _mm256_permute2x128_si256(t1, t3, 0x31));
    }
  }
}

// Accumulators per row: independent chains for vpdpbusd's latency where a step issues several.
template <int R>
constexpr int few_accs() {
  return R == 1 ? (kVnni ? 1 : 2) : (R == 2 || !kVnni ? 2 : 4);
}

// acc[0..few_accs<R>() - 1] += 8 blocks x R tokens. xp: the tokens' words, R * kWord bytes per block; lo, hi: the
// 8 blocks' columns (16-bit fields: blocks 0-3, 4-7); wv: their weights (8 x 4 s8, zero where masked out). Every
// accumulator index is a constant (a loop index would keep acc in memory).
template <int R>
__attribute__((always_inline)) inline void few_step(const char* xp, uint64_t lo, uint64_t hi, __m256i wv,
                                                    __m256i* acc) {
  const auto col = [](uint64_t v, int j) { return static_cast<size_t>((v >> (16 * j)) & 0xffff); };
  const auto half = [&](size_t c) {  // block c of 16 bytes in both halves
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + c * 16)));
  };
  const auto row2 = [&](size_t c0, size_t c1) { return _mm256_blend_epi32(half(c0), half(c1), 0xf0); };
  // 4 blocks of 8 bytes (the 16-bit fields of v) into the four quarters
  const auto row4 = [&](uint64_t v) {
    const auto word = [&](int j) { return _mm256_set1_epi64x(load_i64(xp + col(v, j) * 8)); };
    return _mm256_blend_epi32(_mm256_blend_epi32(word(0), word(1), 0x0c), _mm256_blend_epi32(word(2), word(3), 0xc0),
                              0xf0);
  };
#if HF_SPARSE_VNNI
  if (R == 1) {  // lanes: 8 blocks
    const auto word = [&](uint64_t v, int j) { return _mm256_set1_epi32(load_i32(xp + col(v, j) * 4)); };
    const __m256i x01 = _mm256_blend_epi32(word(lo, 0), word(lo, 1), 0x02);
    const __m256i x23 = _mm256_blend_epi32(word(lo, 2), word(lo, 3), 0x08);
    const __m256i x45 = _mm256_blend_epi32(word(hi, 0), word(hi, 1), 0x20);
    const __m256i x67 = _mm256_blend_epi32(word(hi, 2), word(hi, 3), 0x80);
    const __m256i x = _mm256_blend_epi32(_mm256_blend_epi32(x01, x23, 0x0c), _mm256_blend_epi32(x45, x67, 0xc0), 0xf0);
    acc[0] = dpbusd(acc[0], x, wv);
  } else if (R == 2) {  // lanes: 4 blocks x 2 tokens, token = lane % 2; weights spread to both tokens' lanes
    acc[0] = dpbusd(acc[0], row4(lo), _mm256_permutevar8x32_epi32(wv, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    acc[1] = dpbusd(acc[1], row4(hi), _mm256_permutevar8x32_epi32(wv, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
  } else {  // lanes: 2 blocks x 4 tokens, token = lane % 4
    const auto spread = [&](int b) {  // weights of blocks b, b + 1 to the 4 lanes of each
      return _mm256_permutevar8x32_epi32(wv, _mm256_setr_epi32(b, b, b, b, b + 1, b + 1, b + 1, b + 1));
    };
    acc[0] = dpbusd(acc[0], row2(col(lo, 0), col(lo, 1)), spread(0));
    acc[1] = dpbusd(acc[1], row2(col(lo, 2), col(lo, 3)), spread(2));
    acc[2] = dpbusd(acc[2], row2(col(hi, 0), col(hi, 1)), spread(4));
    acc[3] = dpbusd(acc[3], row2(col(hi, 2), col(hi, 3)), spread(6));
  }
#else
  // vpmaddwd: pairs of s16 products summed in each int32 lane
  const auto madd = [](__m256i a, __m256i x, __m128i w8) {
    return _mm256_add_epi32(a, _mm256_madd_epi16(x, _mm256_cvtepi8_epi16(w8)));
  };
  if (R == 1) {  // lanes: 4 blocks per vector
    acc[0] = madd(acc[0], row4(lo), _mm256_castsi256_si128(wv));
    acc[1] = madd(acc[1], row4(hi), _mm256_extracti128_si256(wv, 1));
  } else if (R == 2) {  // lanes: 2 blocks x 2 tokens per vector, token = lane / 2 % 2
    const __m256i w0 = _mm256_permutevar8x32_epi32(wv, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    const __m256i w1 = _mm256_permutevar8x32_epi32(wv, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
    acc[0] = madd(acc[0], row2(col(lo, 0), col(lo, 1)), _mm256_castsi256_si128(w0));
    acc[1] = madd(acc[1], row2(col(lo, 2), col(lo, 3)), _mm256_extracti128_si256(w0, 1));
    acc[0] = madd(acc[0], row2(col(hi, 0), col(hi, 1)), _mm256_castsi256_si128(w1));
    acc[1] = madd(acc[1], row2(col(hi, 2), col(hi, 3)), _mm256_extracti128_si256(w1, 1));
  } else {  // lanes: 1 block x 4 tokens per vector, token = lane / 2
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(wv));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(wv, 1));
    const auto one = [&](size_t c, __m256i w16, int j) {  // block c's 4 tokens x the weights in qword j of w16
      const __m256i w = _mm256_permutevar8x32_epi32(w16, _mm256_setr_epi32(2 * j, 2 * j + 1, 2 * j, 2 * j + 1, 2 * j,
                                                                            2 * j + 1, 2 * j, 2 * j + 1));
      return _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + c * 32)), w);
    };
    acc[0] = _mm256_add_epi32(acc[0], _mm256_add_epi32(one(col(lo, 0), w0, 0), one(col(lo, 1), w0, 1)));
    acc[1] = _mm256_add_epi32(acc[1], _mm256_add_epi32(one(col(lo, 2), w0, 2), one(col(lo, 3), w0, 3)));
    acc[0] = _mm256_add_epi32(acc[0], _mm256_add_epi32(one(col(hi, 0), w1, 0), one(col(hi, 1), w1, 1)));
    acc[1] = _mm256_add_epi32(acc[1], _mm256_add_epi32(one(col(hi, 2), w1, 2), one(col(hi, 3), w1, 3)));
  }
#endif
}

// The R token sums of one row's accumulators, in lanes 0..R-1.
template <int R>
inline __m128i token_sums(const __m256i* acc) {
  __m256i a = acc[0];
  if (few_accs<R>() > 1) a = _mm256_add_epi32(a, acc[1]);
  if (few_accs<R>() > 2) a = _mm256_add_epi32(_mm256_add_epi32(a, acc[2]), acc[3]);
  const __m128i lo = _mm256_castsi256_si128(a), hi = _mm256_extracti128_si256(a, 1);
  if (R == 4) return kVnni ? _mm_add_epi32(lo, hi) : _mm_hadd_epi32(lo, hi);
  __m128i v = _mm_add_epi32(lo, hi);
  if (R == 2) return kVnni ? _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e)) : _mm_hadd_epi32(v, v);
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
  return _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));
}

// acc += one row's blocks b..e-1 of one panel, 8 per step, each step masked to them (a separate tail step
// would cost another mispredicted branch per row). A step reads up to 7 blocks past e; Safe (rows that end within
// 7 blocks of the arrays' end) reads the arrays' last 8 blocks instead, the ones before b masked out.
template <int R, bool Safe>
__attribute__((always_inline)) inline void few_segment(const SparseI8& w, const char* xp, int32_t b, int32_t e,
                                                       int32_t last, __m128i col_max, __m256i* acc) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; b < e; b += 8) {
    const int32_t s = Safe && b > last ? last : b;  // the step's first block
    __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(e - s), iota);
    if (Safe) keep = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(b - s), iota), keep);
    // Clamped to the row whatever the indices hold, so no read leaves the tokens.
    const __m128i c = _mm_min_epu16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.cols + s)), col_max);
    const __m256i wv = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.values + s)), keep);
    few_step<R>(xp, static_cast<uint64_t>(_mm_cvtsi128_si64(c)), static_cast<uint64_t>(_mm_extract_epi64(c, 1)),
                wv, acc);
  }
}

template <int R, bool Safe>
__attribute__((always_inline)) inline void few_row(const SparseI8& w, const char* xp, int64_t n, int32_t last,
                                                   __m128i col_max, __m256i* acc) {
  const int32_t* pp = w.ptr + n;
  for (int64_t p = 0; p < w.panels; ++p, pp += w.n) few_segment<R, Safe>(w, xp, pp[0], pp[1], last, col_max, acc);
}

// Tokens r0..r0+nt-1 (nt <= R; the others repeat the last) for rows n0..n1-1. xi: room for the tokens' words
// interleaved (R > 1); cols and values hold last + 8 readable blocks (see i8_sparse_few).
template <int R>
void few_tokens_t(const SparseI8& w, int32_t last, const char* xq, int64_t ldq, const float* sx, int r0, int nt,
                  int64_t n0, int64_t n1, const Output& out, char* xi) {
  constexpr int kA = few_accs<R>();
  const char* xr[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) xr[r] = xq + (r0 + (r < nt ? r : nt - 1)) * ldq * (kWord / 4);
  const char* xp = xr[0];
  if (R > 1) {
    interleave<R>(xr, w.kb, xi);
    xp = xi;
  }
#if defined(__GNUC__)
  // One register for the base: GCC otherwise keeps two and adds them for every word (15% slower at M = 1).
  __asm__("" : "+r"(xp));
#endif
  const __m128i col_max = _mm_set1_epi16(static_cast<int16_t>(w.kb - 1));  // kb <= kMaxInFeatures / 4
  // A row whose blocks end by last + 1 never starts a step past `last`. Its end in the last panel bounds its ends
  // in all panels (ptr increases in panel-major order), and rows from n_safe on end later: they take Safe.
  int64_t n_safe = n1;
  if (w.panels > 0) {
    const int32_t* end_last = w.ptr + (w.panels - 1) * w.n + 1;
    while (n_safe > n0 && end_last[n_safe - 1] > last + 1) --n_safe;
  }
  for (int64_t g = n0; g < n1; g += 8) {
    const int nr = n1 - g < 8 ? static_cast<int>(n1 - g) : 8;
    alignas(32) int32_t sums[4][8] = {};
    for (int i = 0; i < nr; ++i) {
      const int64_t n = g + i;
      __m256i acc[kA];
#pragma GCC unroll 4
      for (int a = 0; a < kA; ++a) acc[a] = _mm256_setzero_si256();
      if (n < n_safe) {
        few_row<R, false>(w, xp, n, last, col_max, acc);
      } else {
        few_row<R, true>(w, xp, n, last, col_max, acc);
      }
      alignas(16) int32_t t[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), token_sums<R>(acc));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) sums[r][i] = t[r];
    }
    // Epilogue on 8 contiguous output channels; VNNI takes back the +128 shift with -128 * weight_sum.
    const __m256i cm = lane_mask(nr);
    const __m256i corr =
        kVnni ? _mm256_slli_epi32(_mm256_maskload_epi32(w.weight_sum + g, cm), 7) : _mm256_setzero_si256();
    const __m256 sw = _mm256_maskload_ps(w.scale + g, cm);
    const __m256 bias = w.bias ? _mm256_maskload_ps(w.bias + g, cm) : _mm256_setzero_ps();
    for (int r = 0; r < nt; ++r) {
      const __m256i a = _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(sums[r])), corr);
      store_row8(out, out.m0 + r0 + r, g, cm, a, sx[r0 + r], sw, w.bias != nullptr, bias);
    }
  }
}

void i8_sparse_few(const SparseI8& w, const void* xq_, int64_t ldq, int rows, const float* sx, int64_t n0,
                   int64_t n1, const Output& out) {
  const char* xq = static_cast<const char*>(xq_);
  // Fewer than 8 blocks in all: run on a zero-padded copy of 16, so that every step reads inside it.
  SparseI8 wp = w;
  alignas(32) uint16_t cols[16] = {};
  alignas(32) int32_t values[16] = {};
  int32_t last = w.ptr[w.panels * w.n] - 8;
  if (last < 0) {
    for (int32_t i = 0; i < last + 8; ++i) {
      cols[i] = w.cols[i];
      values[i] = w.values[i];
    }
    wp.cols = cols;
    wp.values = values;
    last = 8;
  }
  // Tokens interleaved 4 (or 2) at a time while their words fit the buffer (K up to 4096 with s16, 8192 with u8),
  // else fewer per pass over the weight.
  alignas(32) char xi[kFewBuffer];
  const int64_t row_bytes = (w.kb + 7) / 8 * 8 * kWord;
  const int most = row_bytes * 4 <= kFewBuffer ? 4 : (row_bytes * 2 <= kFewBuffer ? 2 : 1);
  for (int r0 = 0; r0 < rows;) {
    const int nt = rows - r0 < most ? rows - r0 : most;
    switch (nt) {
      case 1: few_tokens_t<1>(wp, last, xq, ldq, sx, r0, nt, n0, n1, out, xi); break;
      case 2: few_tokens_t<2>(wp, last, xq, ldq, sx, r0, nt, n0, n1, out, xi); break;
      default: few_tokens_t<4>(wp, last, xq, ldq, sx, r0, nt, n0, n1, out, xi); break;
    }
    r0 += nt;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dense int8: MR tokens x one panel of 16 channels per micro-kernel call.

template <int MR>
__attribute__((always_inline)) inline void dense_acc(const DenseI8& w, const char* xq, int64_t ldq, int64_t p,
                                                     int64_t m, __m256i (*res)[2]) {
  const int8_t* wp = w.packed + p * w.kb * 64;
#if HF_SPARSE_VNNI
  __m256i acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const char* xr = xq + m * ldq;
  for (int64_t b = 0; b < w.kb; ++b) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + b * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + b * 64 + 32));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t xw;
      std::memcpy(&xw, xr + i * ldq + b * 4, 4);
      const __m256i xv = _mm256_set1_epi32(xw);
      acc[i][0] = dpbusd(acc[i][0], xv, w0);
      acc[i][1] = dpbusd(acc[i][1], xv, w1);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    res[i][0] = acc[i][0];
    res[i][1] = acc[i][1];
  }
#else
  // acc[i][q]: channels 4q..4q+3 of token i as pair sums
  __m256i acc[MR][4];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_si256();
  const char* xr = xq + m * ldq * 2;
  for (int64_t b = 0; b < w.kb; ++b) {
    __m256i wq[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      wq[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + b * 64 + 16 * q)));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int64_t xw;
      std::memcpy(&xw, xr + (i * ldq + b * 4) * 2, 8);
      const __m256i xv = _mm256_set1_epi64x(xw);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_add_epi32(acc[i][q], _mm256_madd_epi16(wq[q], xv));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    res[i][0] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][0], acc[i][1]), 0xd8);
    res[i][1] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2], acc[i][3]), 0xd8);
  }
#endif
}

template <int MR>
void dense_micro(const DenseI8& w, const char* xq, int64_t ldq, const float* sx, int64_t p, int64_t m,
                 const Output& out) {
  __m256i res[MR][2];
  dense_acc<MR>(w, xq, ldq, p, m, res);
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const int64_t n = p * 16 + h * 8;
    if (n >= w.n) break;
    const __m256i cm = lane_mask(w.n - n);
    __m256i corr = _mm256_setzero_si256();
    if (kVnni) corr = _mm256_slli_epi32(_mm256_maskload_epi32(w.weight_sum + n, cm), 7);
    const __m256 sw = _mm256_maskload_ps(w.scale + n, cm);
    const __m256 bias = w.bias ? _mm256_maskload_ps(w.bias + n, cm) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      store_row8(out, out.m0 + m + i, n, cm, _mm256_sub_epi32(res[i][h], corr), sx[m + i], sw, w.bias != nullptr,
                 bias);
    }
  }
}

void i8_dense(const DenseI8& w, const void* xq_, int64_t ldq, int rows, const float* sx, int64_t p0, int64_t p1,
              const Output& out) {
  const char* xq = static_cast<const char*>(xq_);
  constexpr int kMR = kVnni ? 4 : 2;
  constexpr int64_t kMC = 96;
  for (int64_t mc = 0; mc < rows; mc += kMC) {
    const int64_t me = mc + kMC < rows ? mc + kMC : rows;
    for (int64_t p = p0; p < p1; ++p) {
      int64_t m = mc;
      for (; m + kMR <= me; m += kMR) dense_micro<kMR>(w, xq, ldq, sx, p, m, out);
      for (; m < me; ++m) dense_micro<1>(w, xq, ldq, sx, p, m, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// fp32 CSR sparse

void f32_tile(const float* x, int64_t ldx, int rows, int64_t k, int mtp, float* tile) {
  for (int g = 0; g < mtp; g += kVec) {
    const int nrow = rows - g < kVec ? (rows - g > 0 ? rows - g : 0) : kVec;
    for (int64_t k0 = 0; k0 < k; k0 += 8) {
      __m256i v[8];
#pragma GCC unroll 8
      for (int r = 0; r < kVec; ++r) {
        v[r] = r < nrow ? _mm256_castps_si256(load_ps(x + (g + r) * ldx + k0, k - k0)) : _mm256_setzero_si256();
      }
      transpose8(v);
      const int kn = k - k0 < 8 ? static_cast<int>(k - k0) : 8;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        if (i < kn) _mm256_store_si256(reinterpret_cast<__m256i*>(tile + (k0 + i) * mtp + g), v[i]);
      }
    }
  }
}

template <int T, int S>
__attribute__((always_inline)) inline void f32_row(const SparseF32& w, const float* tile, int64_t n, int64_t c0,
                                                   int64_t c1, const __m256* init, __m256* res) {
  constexpr int64_t kStride = kVec * T;
  const uint32_t k_max = static_cast<uint32_t>(w.k - 1);
  __m256 acc[S][T];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[s][t] = s == 0 ? init[t] : _mm256_setzero_ps();
  const auto step = [&](int s, int32_t blk) __attribute__((always_inline)) {
    uint32_t c = w.cols[blk];
    c = c < k_max ? c : k_max;
    const float* p = tile + c * kStride;
    const __m256 wv = _mm256_set1_ps(w.values[blk]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[s][t] = _mm256_fmadd_ps(wv, _mm256_load_ps(p + kVec * t), acc[s][t]);
  };
  for (int64_t c = c0; c < c1; ++c) {
    int32_t b = w.ptr[c * w.n + n];
    const int32_t e = w.ptr[c * w.n + n + 1];
    for (; b + S <= e; b += S) {
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) step(s, b + s);
    }
#pragma GCC unroll 8
    for (int s = 0; s + 1 < S; ++s) {
      if (b + s < e) step(s, b + s);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    __m256 a = acc[0][t];
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s) a = _mm256_add_ps(a, acc[s][t]);
    res[t] = a;
  }
}

template <int T>
void f32_sparse_t(const SparseF32& w, const float* tile, int rows, int64_t n0, int64_t n1, const Output& out) {
  constexpr int kSets = T >= 3 ? 1 : 2;
  constexpr int64_t kPanelBytes = kPanel * kVec * T * 4;
  const int64_t per_pass = kPassBytes / kPanelBytes > 1 ? kPassBytes / kPanelBytes : 1;
  Staging<T> st;
  alignas(32) __m256 part[kGroup][T];
  for (int64_t g0 = n0; g0 < n1; g0 += kGroup) {
    const int gn = n1 - g0 < kGroup ? static_cast<int>(n1 - g0) : kGroup;
    for (int64_t c0 = 0; c0 < w.panels; c0 += per_pass) {
      const int64_t c1 = c0 + per_pass < w.panels ? c0 + per_pass : w.panels;
      const bool last = c1 == w.panels;
      for (int i = 0; i < gn; ++i) {
        const int64_t n = g0 + i;
        __m256 init[T], acc[T];
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) init[t] = c0 == 0 ? _mm256_setzero_ps() : part[i][t];
        f32_row<T, kSets>(w, tile, n, c0, c1, init, acc);
        if (!last) {
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) part[i][t] = acc[t];
          continue;
        }
        const int r = i & 7;
        const __m256 bias = _mm256_set1_ps(w.bias ? w.bias[n] : 0.0f);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          __m256 v = acc[t];
          if (w.bias) v = _mm256_add_ps(v, bias);
          _mm256_store_ps(reinterpret_cast<float*>(st.v[t][r]), activate(v, out.act));
        }
        if (r == 7 || i == gn - 1) store_group<T>(st, r + 1, rows, n - r, out, false);
      }
    }
  }
}

void f32_sparse(const SparseF32& w, const float* tile, int mtp, int rows, int64_t n0, int64_t n1, const Output& out) {
  switch (mtp / kVec) {
    case 1: return f32_sparse_t<1>(w, tile, rows, n0, n1, out);
    case 2: return f32_sparse_t<2>(w, tile, rows, n0, n1, out);
    case 3: return f32_sparse_t<3>(w, tile, rows, n0, n1, out);
    default: return f32_sparse_t<4>(w, tile, rows, n0, n1, out);
  }
}

const IsaKernels kTable = {
    kVnni ? "avx2_vnni" : "avx2",
    kVec,
    kVec * kMaxT,
    kVnni ? 1 : 2,
    kVnni ? 128 : 0,
    quant_tile,
    quant_rows,
    i8_sparse,
    i8_dense,
    kFewRows,
    i8_sparse_few,
    f32_tile,
    f32_sparse,
    nullptr,  // fused FFN: composed by the driver
    nullptr,  // int8 CSR: the portable kernel (kernels_scalar.cpp)
};

}  // namespace

#if HF_SPARSE_VNNI == 1
const IsaKernels* avx2_vnni_vex_kernels() { return &kTable; }
#elif HF_SPARSE_VNNI == 2
const IsaKernels* avx2_vnni_evex_kernels() { return &kTable; }
#else
const IsaKernels* avx2_kernels() { return &kTable; }
#endif

}  // namespace hf_sparse
