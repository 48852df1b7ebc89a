// Int8 CSR (quads) for a few tokens (decoding), AVX-512: shared by kernels_avx512.cpp and kernels_avx512_vbmi.cpp,
// which differ only in how they gather activation bytes (the policy G).
//
// The tile kernel puts tokens in the vector lanes, so at M = 1 it uses one lane in 16. Here the lanes are 16
// consecutive entries of the weight (CSR order: the rows of one panel follow each other), so every lane does 4
// useful products however few the tokens. A token's slice of the panel (512 features, 512 bytes) sits in 8 zmm
// and each entry's 4 activation bytes are picked from them (G::bytes); no index ever reaches memory, so corrupted
// column indices give wrong bytes of the same panel, never a read outside it. The 16 lanes' products belong to
// different rows: an inclusive prefix sum over the panel's entries (in register, carried from vector to vector)
// turns each row's sum into a difference of two prefix values. The differences are exact in wrapping uint32
// arithmetic as long as the row's own sum fits in int32 (it does: at most 128 entries x 4 x 255 x 128, and a
// corrupted row wraps without undefined behaviour).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "avx512_common.h"
#include "common.h"

namespace hf_sparse {
namespace {

// Tokens up to which each gather beats a 16-token tile (weights cycling through memory): the VBMI one to M = 6
// (M = 4: ~0.6x the tile, M = 8: ~1.05x), the vpermt2d one to M = 2 (M = 4: 1.2-1.4x). kQuadsFewRows bounds both.
constexpr int kQuadsFewRowsVbmi = 6;
constexpr int kQuadsFewRowsWords = 2;
constexpr int kQuadsFewRows = kQuadsFewRowsVbmi;
constexpr int64_t kFewChunk = 256;    // output rows whose int32 sums live on the stack

// Scale, bias, activation of 16 output channels at a time for tokens 0..rows-1: sums[r][n - c0] are the exact
// int32 sums (the +128 shift already taken back) of rows c0..c1-1.
inline void few_epilogue(const SparseI8& w, int rows, const float* sx, int64_t c0, int64_t c1,
                         const int32_t (*sums)[kFewChunk], const Output& out) {
  for (int64_t g = c0; g < c1; g += 16) {
    const __mmask16 cm = mask16(c1 - g);
    const __m512 sw = _mm512_maskz_loadu_ps(cm, w.scale + g);
    const __m512 bias = w.bias ? _mm512_maskz_loadu_ps(cm, w.bias + g) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m512i a = _mm512_maskz_loadu_epi32(cm, sums[r] + (g - c0));
      const int64_t row = out.m0 + r;
      if (out.yi) {
        _mm512_mask_storeu_epi32(out.yi + row * out.ldy + g, cm, a);
        continue;
      }
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sx[r])), sw);
      if (w.bias) v = _mm512_add_ps(v, bias);
      _mm512_mask_storeu_ps(out.y + row * out.ldy + g, cm, activate(v, out.act));
    }
  }
}

// The few-token kernels' outer loop: output rows n0..n1-1 in chunks of kFewChunk whose int32 sums (started at
// -128 * weight_sum: the u8 shift taken back) live on the stack; per panel the tokens go in pairs, then the
// epilogue. pass(p, r, pair, c0, c1, sums + r) adds panel p's sums of token r (and r + 1 when pair).
template <int MaxRows, class Pass>
void few_token_chunks(const SparseI8& w, int rows, const float* sx, int64_t n0, int64_t n1, const Output& out,
                      Pass&& pass) {
  alignas(64) int32_t sums[MaxRows][kFewChunk];
  for (int64_t c0 = n0; c0 < n1; c0 += kFewChunk) {
    const int64_t c1 = c0 + kFewChunk < n1 ? c0 + kFewChunk : n1;
    for (int r = 0; r < rows; ++r) {
      for (int64_t n = c0; n < c1; ++n) sums[r][n - c0] = -128 * w.weight_sum[n];
    }
    for (int64_t p = 0; p < w.panels; ++p) {
      for (int r = 0; r < rows; r += 2) pass(p, r, r + 1 < rows, c0, c1, sums + r);
    }
    few_epilogue(w, rows, sx, c0, c1, sums, out);
  }
}

// Inclusive prefix sum of 16 lanes plus `carry` (every lane holds the previous vector's total).
inline __m512i prefix16(__m512i s, __m512i carry) {
  const __m512i z = _mm512_setzero_si512();
  s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, z, 15));  // lane i += lane i - 1
  s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, z, 14));
  s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, z, 12));
  s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, z, 8));
  return _mm512_add_epi32(s, carry);
}

// Panel p for tokens xq (R rows ldq bytes apart), output rows n0..n1-1: sums[r][n - n0] += the row's sum over the
// panel. Rows are closed in order as the vectors pass their last entry (a row's sum: its last entry's prefix minus
// the previous row's), so nothing but the current vector's prefixes is kept.
template <class G, int R>
void quads_few_panel(const SparseI8& w, const uint8_t* xq, int64_t ldq, int64_t p, int64_t n0, int64_t n1,
                     int32_t (*sums)[kFewChunk]) {
  const int64_t byte0 = p * kPanel * 4, bytes = w.kb * 4 - byte0;  // this panel's bytes of a quantized token
  __m512i xw[R][8];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 8; ++j) {
      xw[r][j] = bytes > 64 * j ? _mm512_maskz_loadu_epi8(mask64(bytes - 64 * j), xq + r * ldq + byte0 + 64 * j)
                                : _mm512_setzero_si512();
    }
  }
  const int32_t* ptr = w.ptr + p * w.n;
  const int64_t e0 = ptr[n0], e1 = ptr[n1];
  // column indices relative to the panel, wrapped into it (16-bit lanes: k <= 65536)
  const __m512i base = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(byte0)));
  const __m512i wrap = _mm512_set1_epi16(kPanel * 4 - 1);
  const __m512i last = _mm512_set1_epi32(15);
  __m512i carry[R];
  uint32_t closed[R];  // prefix at the end of the last closed row
  for (int r = 0; r < R; ++r) carry[r] = _mm512_setzero_si512(), closed[r] = 0;
  alignas(64) uint32_t lanes[R][16];
  int64_t n = n0;
  for (int64_t e = e0; e < e1; e += 16) {
    const int64_t v = e1 - e;  // entries left (lanes past them load zeros: their codes multiply by 0)
    const uint16_t* c = w.cols + 4 * e;
    const __m512i lo = _mm512_and_si512(_mm512_sub_epi16(_mm512_maskz_loadu_epi16(mask32(4 * v), c), base), wrap);
    const __m512i hi = v > 8 ? _mm512_and_si512(_mm512_sub_epi16(_mm512_maskz_loadu_epi16(mask32(4 * v - 32), c + 32),
                                                                 base), wrap)
                             : _mm512_setzero_si512();
    const __m512i wv = _mm512_maskz_loadu_epi32(mask16(v), w.values + e);
    const typename G::Index ix = G::index(lo, hi);
    for (int r = 0; r < R; ++r) {
      const __m512i s = prefix16(dpbusd(_mm512_setzero_si512(), G::bytes(ix, xw[r]), wv), carry[r]);
      _mm512_store_si512(lanes[r], s);
      carry[r] = _mm512_permutexvar_epi32(last, s);
    }
    // rows ending in this vector (empty ones included): their last entry is lane ptr[n + 1] - 1 - e
    for (; n < n1 && ptr[n + 1] <= e + 16; ++n) {
      if (ptr[n + 1] == ptr[n]) continue;
      for (int r = 0; r < R; ++r) {
        const uint32_t end = lanes[r][ptr[n + 1] - 1 - e];
        sums[r][n - n0] += static_cast<int32_t>(end - closed[r]);
        closed[r] = end;
      }
    }
  }
}

// The IsaKernels::quads_few entry (rows <= kQuadsFewRows).
template <class G>
void quads_few_t(const SparseI8& w, const void* xq_, int64_t ldq, int rows, const float* sx, int64_t n0, int64_t n1,
                 const Output& out) {
  const uint8_t* xq = static_cast<const uint8_t*>(xq_);
  few_token_chunks<kQuadsFewRows>(w, rows, sx, n0, n1, out,
                                  [&](int64_t p, int r, bool pair, int64_t c0, int64_t c1, int32_t(*s)[kFewChunk]) {
                                    if (pair) return quads_few_panel<G, 2>(w, xq + r * ldq, ldq, p, c0, c1, s);
                                    quads_few_panel<G, 1>(w, xq + r * ldq, ldq, p, c0, c1, s);
                                  });
}

}  // namespace
}  // namespace hf_sparse
