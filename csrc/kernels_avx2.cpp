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

inline __m256 activate(__m256 v, int act) { return act == kActGelu ? gelu_ps(v) : v; }

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
  const char* t = static_cast<const char*>(tile);
  switch (mtp / kVec) {
    case 1: return i8_sparse_t<1>(w, t, rows, sx, n0, n1, out);
    case 2: return i8_sparse_t<2>(w, t, rows, sx, n0, n1, out);
    case 3: return i8_sparse_t<3>(w, t, rows, sx, n0, n1, out);
    default: return i8_sparse_t<4>(w, t, rows, sx, n0, n1, out);
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
      const __m256i a = _mm256_sub_epi32(res[i][h], corr);
      const int64_t row = out.m0 + m + i;
      if (out.yi) {
        _mm256_maskstore_epi32(reinterpret_cast<int*>(out.yi + row * out.ldy + n), cm, a);
        continue;
      }
      __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(sx[m + i])), sw);
      if (w.bias) v = _mm256_add_ps(v, bias);
      _mm256_maskstore_ps(out.y + row * out.ldy + n, cm, activate(v, out.act));
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
    0,
    nullptr,
    f32_tile,
    f32_sparse,
    nullptr,  // fused FFN: composed by the driver
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
