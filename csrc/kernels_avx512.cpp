// AVX-512 VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni only).
//
// Sparse int8: weights broadcast. A tile holds the activations of 16*T tokens transposed as [kb][16 T][4] u8
// (code + 128), so one 64-byte load gives 16 tokens x 4 input features and one vpdpbusd multiplies them by a
// broadcast 4-block of the weight row. The T accumulators of a row stay in registers over the whole row; the
// +128 shift is taken back with the row's weight sum; the epilogue (scales, bias, GELU) runs on 16 rows at once
// and the 16x16 result is transposed before it is stored as (M, N).
#include <immintrin.h>

#include <cstring>
#include <limits>

#include "avx512_common.h"
#include "common.h"
#include "quads_few_avx512.h"

namespace hf_sparse {
namespace {

constexpr int kVec = 16;
constexpr int kMaxT = 4;  // 64 tokens per tile

// ---------------------------------------------------------------------------------------------------------------
// Activation quantization (bit-exact with numerics.quantize_activation_int8)

// 64 features of one token -> 64 u8 (code + 128). Word w (features 4w..4w+3) lands at 32-bit position
// 4 (w % 4) + w / 4: the lane order of packs; callers undo it (kUnpermute) or fold it into their stores.
inline __m512i quant64(const float* x, int64_t valid, __m512 inv) {
  __m512i q[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 v = _mm512_maskz_loadu_ps(mask16(valid - 16 * j), x + 16 * j);
    q[j] = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // round half to even (MXCSR default)
  }
  __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
  b = _mm512_max_epi8(b, _mm512_set1_epi8(-127));
  return _mm512_xor_si512(b, _mm512_set1_epi8(static_cast<char>(0x80)));
}

inline int word_at(int p) { return 4 * (p % 4) + p / 4; }

// A token whose amax is subnormal gets inv = inf (1 / amax overflows), exactly as in torch; its codes are then
// sign(x) * 127 (and 0 for x = 0, from NaN = 0 * inf). Rare enough to patch after the vector pass.
inline uint8_t saturated_u8(float v) { return static_cast<uint8_t>((v > 0.0f ? 127 : (v < 0.0f ? -127 : 0)) + 128); }
inline bool is_inf(float v) { return v > 3.4028234663852886e38f; }

void quant_tile(const float* x, int64_t ldx, int rows, int64_t k, int mtp, void* tile_, float* sx) {
  uint8_t* tile = static_cast<uint8_t*>(tile_);
  const int64_t kb = (k + 3) / 4;
  const int64_t stride = static_cast<int64_t>(mtp) * 4;  // bytes per kb
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
    for (int64_t k0 = 0; k0 < k; k0 += 64) {
      __m512i v[16];
#pragma GCC unroll 16
      for (int r = 0; r < kVec; ++r) {
        v[r] = r < nrow ? quant64(x + (g + r) * ldx + k0, k - k0, _mm512_set1_ps(inv[r]))
                        : _mm512_set1_epi8(static_cast<char>(0x80));
      }
      transpose16(v);
      const int64_t kb0 = k0 / 4;
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) {
        const int64_t b = kb0 + word_at(p);
        if (b < kb) _mm512_store_si512(tile + b * stride + g * 4, v[p]);
      }
    }
    for (int r = 0; r < nrow; ++r) {
      if (!is_inf(inv[r])) continue;
      const float* xr = x + (g + r) * ldx;
      for (int64_t i = 0; i < k; ++i) tile[(i >> 2) * stride + (g + r) * 4 + (i & 3)] = saturated_u8(xr[i]);
    }
  }
}

void quant_rows(const float* x, int64_t ldx, int rows, int64_t k, void* out_, int64_t ldo, float* sx) {
  uint8_t* out = static_cast<uint8_t*>(out_);
  const int64_t kp = (k + 3) / 4 * 4;
  const __m512i unpermute = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float inv;
    token_params(xr, k, &inv, &sx[r]);
    const __m512 vinv = _mm512_set1_ps(inv);
    uint8_t* o = out + r * ldo;
    for (int64_t k0 = 0; k0 < kp; k0 += 64) {
      const __m512i q = _mm512_permutexvar_epi32(unpermute, quant64(xr + k0, k - k0, vinv));
      _mm512_mask_storeu_epi8(o + k0, mask64(kp - k0), q);
    }
    if (is_inf(inv)) {
      for (int64_t i = 0; i < k; ++i) o[i] = saturated_u8(xr[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Epilogue shared by the transposed (sparse) kernels: rows of 16 tokens are staged per output row, then 16 rows
// are transposed and stored as 16 consecutive output channels of each token.

template <int T>
struct Staging {
  alignas(64) int32_t v[T][16][kVec];  // [token vector][row in group][token]
};

template <int T>
inline void store_group(Staging<T>& st, int nr, int rows, int64_t n0, const Output& out) {
  const __mmask16 cm = mask16(nr);
  for (int t = 0; t < T; ++t) {
    if (t * kVec >= rows) break;
    __m512i r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(st.v[t][i]);
    transpose16(r);
    const int nt = rows - t * kVec < kVec ? rows - t * kVec : kVec;
    // Constant indices only (a loop to nt would index r at run time and push it to memory).
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= nt) break;
      const int64_t row = out.m0 + t * kVec + j;
      void* dst = out.yi ? static_cast<void*>(out.yi + row * out.ldy + n0)
                         : static_cast<void*>(out.y + row * out.ldy + n0);
      if (nr == 16 && out.stream) {
        _mm512_stream_si512(static_cast<__m512i*>(dst), r[j]);
      } else if (nr == 16) {
        _mm512_storeu_si512(dst, r[j]);
      } else {
        _mm512_mask_storeu_epi32(dst, cm, r[j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Sparse int8 (4-block) x dense activations

// Tile bytes one pass over the column panels may span. The slice of the activation tile a group of rows reads
// should stay close (L1, spilling into L2), but every pass also stores and reloads each row's partial sums and
// exits each row's loop once more: measured on BERT shapes (T = 4), passes of two panels (64 KB) beat both one
// panel (32 KB, all of L1) and three or more.
constexpr int64_t kPassBytes = 65536;
constexpr int kGroup = 64;  // rows per group that share a pass (a multiple of 16)
constexpr int64_t kOnePassBytes = 65536;  // a tile up to this size is read in one pass

// Panels per pass for a tile of `columns` columns of `bytes` bytes each.
inline int64_t passes_of(int64_t columns, int64_t bytes, int64_t panels) {
  if (columns * bytes <= kOnePassBytes) return panels;
  const int64_t per = kPassBytes / (kPanel * bytes);
  return per > 1 ? per : 1;
}

// Sums of row n over panels c0..c1-1 for a tile of 16 T tokens: res[t] = init[t] + sum_b dpbusd(tile[cols[b]]
// [16 t ..], values[b]). S independent accumulator sets (consecutive blocks go to different sets) hide vpdpbusd's
// latency and halve the loop overhead. Kept in its own function with constant-index arrays only: GCC then keeps
// every accumulator in a register (with the epilogue in the same scope it spilled them).
template <int T, int S>
__attribute__((always_inline)) inline void i8_row(const SparseI8& w, const uint8_t* tile, int64_t n, int64_t c0,
                                                  int64_t c1, const __m512i* init, __m512i* res) {
  constexpr int64_t kStride = 64 * T;  // bytes per kb in a tile of 16 T tokens
  const uint32_t kb_max = static_cast<uint32_t>(w.kb - 1);
  const uint16_t* cols = w.cols;
  const int32_t* vals = w.values;
  __m512i acc[S][T];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[s][t] = s == 0 ? init[t] : _mm512_setzero_si512();
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t e = w.ptr[c * w.n + n + 1];
    // S blocks per iteration; past the end a step repeats block b with weight 0 (selects, not branches: the
    // number of blocks per row varies, and a mispredicted exit costs as much as a few blocks).
    for (int32_t b = w.ptr[c * w.n + n]; b < e; b += S) {
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        const bool valid = s == 0 || b + s < e;
        const int32_t j = valid ? b + s : b;
        uint32_t col = cols[j];
        col = col < kb_max ? col : kb_max;  // never read outside the tile, whatever the indices hold
        const uint8_t* p = tile + col * kStride;
        const __m512i wv = _mm512_set1_epi32(valid ? vals[j] : 0);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[s][t] = dpbusd(acc[s][t], _mm512_load_si512(p + 64 * t), wv);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    __m512i a = acc[0][t];
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s) a = _mm512_add_epi32(a, acc[s][t]);
    res[t] = a;
  }
}

// Sums of row n of an int8 CSR weight (quads: 4 nonzeros of any input features per entry) over panels c0..c1-1.
// The tile is byte-major (quads_tile): row f holds feature f of the 16 T tokens. Per quad, the 4 features' rows
// are loaded and interleaved by unpacks (within 128-bit lanes) into 16-token vectors of [f0 f1 f2 f3] dwords, one
// vpdpbusd each against the quad's 4 codes: 4 useful products per lane where a padded 4-block of an unstructured
// weight has ~1.2. T = 4 (zmm; quads_tile orders the tokens so that the unpacks' lane order gives the usual 16
// consecutive tokens per accumulator) or T = 1 (xmm, natural order).
// A model's CSR weights stream from memory once per forward (at batch 1 each entry meets one 64-token tile, and
// the layers together outgrow L3): the hardware prefetcher alone left a 12-distinct-layer BERT ~15% slower than
// one layer run 12 times. Prefetching 128 entries ahead (cols 1 KB, values 512 B) took 8-10% off the batch-1
// forward (benchmarks/RESULTS.md, "CSR weight prefetch"); on the 4-block kernel it changed nothing measurable.
inline void prefetch_entry(const uint16_t* cols4, const int32_t* value) {
  _mm_prefetch(reinterpret_cast<const char*>(cols4) + 1024, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(value) + 512, _MM_HINT_T0);
}

template <int T>
__attribute__((always_inline)) inline void q8_row(const SparseI8& w, const uint8_t* tile, int64_t n, int64_t c0,
                                                  int64_t c1, const __m512i* init, __m512i* res) {
  static_assert(T == 1 || T == 4, "quads run on tiles of 16 or 64 tokens");
  const uint32_t k_max = static_cast<uint32_t>(w.kb * 4 - 1);
  const uint16_t* cols = w.cols;
  const int32_t* vals = w.values;
  const auto row = [&](uint32_t c) { return tile + (c < k_max ? c : k_max) * (16 * T); };
  if constexpr (T == 4) {
    __m512i a0 = init[0], a1 = init[1], a2 = init[2], a3 = init[3];
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t e1 = w.ptr[c * w.n + n + 1];
      for (int32_t e = w.ptr[c * w.n + n]; e < e1; ++e) {
        const uint16_t* q = cols + 4 * static_cast<int64_t>(e);
        prefetch_entry(q, vals + e);
        const __m512i f0 = _mm512_load_si512(row(q[0])), f1 = _mm512_load_si512(row(q[1]));
        const __m512i f2 = _mm512_load_si512(row(q[2])), f3 = _mm512_load_si512(row(q[3]));
        const __m512i lo01 = _mm512_unpacklo_epi8(f0, f1), hi01 = _mm512_unpackhi_epi8(f0, f1);
        const __m512i lo23 = _mm512_unpacklo_epi8(f2, f3), hi23 = _mm512_unpackhi_epi8(f2, f3);
        const __m512i wv = _mm512_set1_epi32(vals[e]);
        a0 = dpbusd(a0, _mm512_unpacklo_epi16(lo01, lo23), wv);
        a1 = dpbusd(a1, _mm512_unpackhi_epi16(lo01, lo23), wv);
        a2 = dpbusd(a2, _mm512_unpacklo_epi16(hi01, hi23), wv);
        a3 = dpbusd(a3, _mm512_unpackhi_epi16(hi01, hi23), wv);
      }
    }
    res[0] = a0;
    res[1] = a1;
    res[2] = a2;
    res[3] = a3;
  } else {
    __m128i a[4] = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t e1 = w.ptr[c * w.n + n + 1];
      for (int32_t e = w.ptr[c * w.n + n]; e < e1; ++e) {
        const uint16_t* q = cols + 4 * static_cast<int64_t>(e);
        prefetch_entry(q, vals + e);
        const auto ld = [&](int i) { return _mm_load_si128(reinterpret_cast<const __m128i*>(row(q[i]))); };
        const __m128i f0 = ld(0), f1 = ld(1), f2 = ld(2), f3 = ld(3);
        const __m128i lo01 = _mm_unpacklo_epi8(f0, f1), hi01 = _mm_unpackhi_epi8(f0, f1);
        const __m128i lo23 = _mm_unpacklo_epi8(f2, f3), hi23 = _mm_unpackhi_epi8(f2, f3);
        const __m128i wv = _mm_set1_epi32(vals[e]);
        a[0] = _mm_dpbusd_epi32(a[0], _mm_unpacklo_epi16(lo01, lo23), wv);
        a[1] = _mm_dpbusd_epi32(a[1], _mm_unpackhi_epi16(lo01, lo23), wv);
        a[2] = _mm_dpbusd_epi32(a[2], _mm_unpacklo_epi16(hi01, hi23), wv);
        a[3] = _mm_dpbusd_epi32(a[3], _mm_unpackhi_epi16(hi01, hi23), wv);
      }
    }
    const __m512i v = _mm512_inserti32x4(
        _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(a[0]), a[1], 1), a[2], 2), a[3], 3);
    res[0] = _mm512_add_epi32(init[0], v);
  }
}

// Turns a quant_tile tile ([kb][16 T][4] u8) into the byte-major tile of the quad kernel, in place (block b's bytes
// stay where they were): row f = 4 b + j at f * 16 T holds feature f of every token. T = 4: position
// 16 L + 4 k + i holds token 16 k + 4 L + i (see q8_row); T = 1: natural order.
void quads_tile(void* tile_, int64_t kb, int mtp) {
  uint8_t* tile = static_cast<uint8_t*>(tile_);
  // per 128-bit lane: 4 tokens x [f0 f1 f2 f3] -> [f0 of the 4 tokens, f1 .., f2 .., f3 ..]
  const __m512i by_feature =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  if (mtp == 16) {
    const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int64_t b = 0; b < kb; ++b) {
      uint8_t* p = tile + b * 64;
      const __m512i v = _mm512_shuffle_epi8(_mm512_load_si512(p), by_feature);
      _mm512_store_si512(p, _mm512_permutexvar_epi32(lanes, v));
    }
    return;
  }
  for (int64_t b = 0; b < kb; ++b) {
    uint8_t* p = tile + b * 256;
    // x_k, lane L, dword j: feature j of tokens 16 k + 4 L .. + 3; row j wants them at dword 4 L + k
    const __m512i x0 = _mm512_shuffle_epi8(_mm512_load_si512(p), by_feature);
    const __m512i x1 = _mm512_shuffle_epi8(_mm512_load_si512(p + 64), by_feature);
    const __m512i x2 = _mm512_shuffle_epi8(_mm512_load_si512(p + 128), by_feature);
    const __m512i x3 = _mm512_shuffle_epi8(_mm512_load_si512(p + 192), by_feature);
    const __m512i t0 = _mm512_unpacklo_epi32(x0, x1), t1 = _mm512_unpackhi_epi32(x0, x1);
    const __m512i t2 = _mm512_unpacklo_epi32(x2, x3), t3 = _mm512_unpackhi_epi32(x2, x3);
    _mm512_store_si512(p, _mm512_unpacklo_epi64(t0, t2));
    _mm512_store_si512(p + 64, _mm512_unpackhi_epi64(t0, t2));
    _mm512_store_si512(p + 128, _mm512_unpacklo_epi64(t1, t3));
    _mm512_store_si512(p + 192, _mm512_unpackhi_epi64(t1, t3));
  }
}

// Row n's sums over panels c0..c1-1, 4-block or quads. Quads tiles hold 16 or 64 tokens (T = 1 or 4): every
// driver sizes them with quads_mtp (common.h), so T = 2, 3 only ever meet 4-block weights.
template <int T, int S>
__attribute__((always_inline)) inline void any_row(const SparseI8& w, const uint8_t* tile, int64_t n, int64_t c0,
                                                   int64_t c1, const __m512i* init, __m512i* res) {
  if constexpr (T == 1 || T == 4) {
    if (w.quads) return q8_row<T>(w, tile, n, c0, c1, init, res);
  }
  i8_row<T, S>(w, tile, n, c0, c1, init, res);
}

// Rows n0..n1-1 of the sparse product for one tile: the accumulators of each row (T vectors of 16 tokens) go to
// epi.row(n, acc) when the row is complete, -128 * weight_sum already added (it takes back the +128 shift of the u8
// activations; added at the end rather than as the start value, so each row's chains start without waiting for it).
// A tile that fits one pass runs row after row; a larger one runs in groups of kGroup rows over passes of column
// panels whose slice of the tile stays close, with partial sums kept per row between passes. (Measured: the flat
// loop runs ~15% faster than the same rows through the group and pass logic.)
template <int T, class Epi>
void sparse_rows_loops(const SparseI8& w, const uint8_t* tile, int64_t n0, int64_t n1, Epi& epi) {
  constexpr int kSets = T >= 3 ? 2 : 4;
  const int64_t per_pass = passes_of(w.kb, 64 * T, w.panels);
  __m512i zero[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) zero[t] = _mm512_setzero_si512();
  if (per_pass >= w.panels) {
    for (int64_t n = n0; n < n1; ++n) {
      __m512i acc[T];
      any_row<T, kSets>(w, tile, n, 0, w.panels, zero, acc);
      const __m512i corr = _mm512_set1_epi32(-128 * w.weight_sum[n]);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[t] = _mm512_add_epi32(acc[t], corr);
      epi.row(n, acc);
    }
    return;
  }
  alignas(64) __m512i part[kGroup][T];  // partial sums of the group's rows between passes
  for (int64_t g0 = n0; g0 < n1; g0 += kGroup) {
    const int gn = n1 - g0 < kGroup ? static_cast<int>(n1 - g0) : kGroup;
    for (int64_t c0 = 0; c0 < w.panels; c0 += per_pass) {
      const int64_t c1 = c0 + per_pass < w.panels ? c0 + per_pass : w.panels;
      const bool last = c1 == w.panels;
      for (int i = 0; i < gn; ++i) {
        const int64_t n = g0 + i;
        __m512i acc[T];
        any_row<T, kSets>(w, tile, n, c0, c1, c0 == 0 ? zero : part[i], acc);
        if (last) {
          const __m512i corr = _mm512_set1_epi32(-128 * w.weight_sum[n]);
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) acc[t] = _mm512_add_epi32(acc[t], corr);
          epi.row(n, acc);
        } else {
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) _mm512_store_si512(&part[i][t], acc[t]);
        }
      }
    }
  }
}

// Rows n0..n1-1 through the weight's generated code (jit_block4.cpp) for the groups of kJitRows rows that lie
// inside the range, the loops above for the rows around them; epi.row sees every row in order either way. With
// tile2 (and epi2), a second tile through each group's code right after the first (i8_sparse_pair and
// i8_ffn_hidden_pair).
template <class Epi>
void jit_rows(const SparseI8& w, const uint8_t* tile, int64_t n0, int64_t n1, Epi& epi,
              const uint8_t* tile2 = nullptr, Epi* epi2 = nullptr) {
  const auto loops = [&](int64_t r0, int64_t r1) {
    sparse_rows_loops<4>(w, tile, r0, r1, epi);
    if (tile2) sparse_rows_loops<4>(w, tile2, r0, r1, *epi2);
  };
  const int64_t g0 = (n0 + kJitRows - 1) / kJitRows;
  const int64_t g1 = n1 == w.n ? (n1 + kJitRows - 1) / kJitRows : n1 / kJitRows;  // the last group may be short
  if (g1 <= g0) return loops(n0, n1);
  const int64_t a = g0 * kJitRows, b = g1 * kJitRows < w.n ? g1 * kJitRows : w.n;
  if (n0 < a) loops(n0, a);
  alignas(64) int32_t sums[2][kJitRows][4][16];
  for (int64_t g = g0; g < g1; ++g) {
    w.jit[g].fn(tile, w.jit[g].weights, &sums[0][0][0][0], tile2);
    const int64_t r0 = g * kJitRows;
    const int rows = static_cast<int>(w.n - r0 < kJitRows ? w.n - r0 : kJitRows);
    // row i's sums, -128 * weight_sum added (the +128 shift of the u8 activations taken back)
    const auto rows_of = [&](const int32_t (*s)[4][16], Epi& e) {
      const auto sums_of = [&](int i, __m512i* acc) {
        const __m512i corr = _mm512_set1_epi32(-128 * w.weight_sum[r0 + i]);
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) acc[t] = _mm512_add_epi32(_mm512_load_si512(s[i][t]), corr);
      };
      int i = 0;
      if constexpr (Epi::kPairs) {  // (see HiddenOut::pair)
        for (; i + 1 < rows; i += 2) {
          __m512i acc[2][4];
          sums_of(i, acc[0]);
          sums_of(i + 1, acc[1]);
          e.pair(r0 + i, acc[0], acc[1]);
        }
      }
      for (; i < rows; ++i) {
        __m512i acc[4];
        sums_of(i, acc);
        e.row(r0 + i, acc);
      }
    };
    rows_of(sums[0], epi);
    if (tile2) rows_of(sums[1], *epi2);
  }
  if (b < n1) loops(b, n1);
  count_jit_call();
  if (tile2) {
    count_jit_call();
    count_jit_pair_call();
  }
}

// Rows n0..n1-1 of the sparse product for one tile (see sparse_rows_loops): 4-block weights with generated code
// run it on full 64-token tiles.
template <int T, class Epi>
void sparse_rows(const SparseI8& w, const uint8_t* tile, int64_t n0, int64_t n1, Epi& epi) {
  if constexpr (T == 4) {
    if (w.jit && !w.quads && jit_enabled()) return jit_rows(w, tile, n0, n1, epi);
  }
  sparse_rows_loops<T>(w, tile, n0, n1, epi);
}

// y = ((acc * scale_x) * scale_w) + bias, rounded in that order like the reference, then the activation. For the
// GELU, prepare computes y / 2 (scale_w and bias halved: exact) and the activation takes that (gelu_half_ps).
template <int T>
struct Dequant {
  __m512 sx[T];
  Dequant(const float* scale_x, int rows) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) sx[t] = _mm512_maskz_loadu_ps(mask16(rows - t * kVec), scale_x + t * kVec);
  }
  __attribute__((always_inline)) void prepare(const SparseI8& w, int64_t n, int act, const __m512i* acc,
                                              __m512* y) const {
    const float k = act_input_scale(act);
    const __m512 sw = _mm512_set1_ps(w.scale[n] * k);
    const __m512 bias = _mm512_set1_ps(w.bias ? w.bias[n] * k : 0.0f);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      y[t] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[t]), sx[t]), sw);
      if (w.bias) y[t] = _mm512_add_ps(y[t], bias);
    }
  }
  __attribute__((always_inline)) void apply(const SparseI8& w, int64_t n, int act, const __m512i* acc,
                                            __m512* y) const {
    prepare(w, n, act, acc, y);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) y[t] = activate_prepared(y[t], act);
  }
};

constexpr int64_t kResidualAhead = 16;  // rows (TransposedOut's feature-major residual; 8 to 32 measured alike)

// Epilogue to (M, N): rows staged, 16 at a time transposed into 16 consecutive output channels per token; or, with
// Output::qkv, each group of 16 staged rows handed, in order, to the attention's writer (n0 and n1 are then whole
// granules: the drivers split rows so), which packs them without a 16x16 transpose; or, with Output::feature_major,
// each row stored as it is.
template <int T>
struct TransposedOut {
  const SparseI8& w;
  const Output& out;
  Dequant<T> dq;
  int rows;
  int64_t n0, n1;
  Staging<T> st;
  static constexpr bool kPairs = false;  // rows one at a time (HiddenOut::pair)
  float* head = nullptr;  // with QkvPackedOut::write_head: this thread's whole head, [d][16 T]
  __m512i head_max[T];    // and its tokens' running max |x| bits
  int64_t head_n = -2, head_c = 0;  // the last row staged and its channel in the head (rows come in order)
  TransposedOut(const SparseI8& w_, const Output& out_, const float* sx, int rows_, int64_t n0_, int64_t n1_,
                int slot = 0)
      : w(w_), out(out_), dq(sx, rows_), rows(rows_), n0(n0_), n1(n1_) {
    if (out.qkv && out.qkv->write_head && !out.yi) {
      head = qkv_stage(static_cast<size_t>(out.qkv->d * 16 * T), slot);
    }
  }
  __attribute__((always_inline)) void row(int64_t n, const __m512i* acc) {
    if (head) {  // Q/K/V rows straight into the head the writer quantizes (no staging group, no copy)
      __m512 y[T];
      dq.apply(w, n, out.act, acc, y);
      // (the channel by counting, not n % d: a 64-bit division per row cost ~0.6% of a BERT-base forward)
      const int64_t d = out.qkv->d, c = n == head_n + 1 ? (head_c + 1 == d ? 0 : head_c + 1) : n % d;
      head_n = n;
      head_c = c;
      float* const hp = head;
      const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        _mm512_store_ps(hp + (c * T + t) * kVec, y[t]);
        const __m512i a = _mm512_and_si512(_mm512_castps_si512(y[t]), abs_mask);
        head_max[t] = c == 0 ? a : _mm512_max_epu32(head_max[t], a);
      }
      if (c == d - 1) {
        alignas(64) uint32_t maxima[T * kVec];
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) _mm512_store_si512(maxima + t * kVec, head_max[t]);
        out.qkv->write_head(*out.qkv, hp, maxima, T, n - c, out.m0, rows);
      }
      return;
    }
    const int r = static_cast<int>((n - n0) & 15);
    if (out.yi) {
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) _mm512_store_si512(st.v[t][r], acc[t]);
    } else if (out.feature_major) {  // no staging: the row is already 16 T tokens of one channel
      __m512 y[T];
      dq.apply(w, n, out.act, acc, y);
      // (every pointer taken before the first store, and the loads before the stores: see HiddenOut::store)
      float* const dst = out.y + n * out.ldy;
      if (out.fm_res) {  // + the residual, and the LayerNorm's first pass (kFmSums' layout, common.h)
        const float* res = out.fm_res + n * out.ldy;
        // the residual row kResidualAhead rows on: it comes from L3 or memory (the layer's input, or the LayerNorm's
        // output that the FFN's hidden layer evicted), and its loads otherwise stall these adds (~0.8% at batch 16)
        if (n + kResidualAhead < w.n) {
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) {
            _mm_prefetch(reinterpret_cast<const char*>(res + kResidualAhead * out.ldy + t * kVec), _MM_HINT_T0);
          }
        }
        const int set = n >= w.n / 32 * 32 ? 0 : static_cast<int>((n / 16) & 1);
        float* const sums = out.fm_sums + (set * 16 + n % 16) * 4 * kVec;
        __m512 s[T];
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          y[t] = _mm512_add_ps(y[t], _mm512_load_ps(res + t * kVec));
          s[t] = _mm512_add_ps(_mm512_load_ps(sums + t * kVec), y[t]);
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) _mm512_store_ps(sums + t * kVec, s[t]);
      }
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) _mm512_store_ps(dst + t * kVec, y[t]);
      return;
    } else {
      __m512 y[T];
      dq.apply(w, n, out.act, acc, y);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) _mm512_store_ps(reinterpret_cast<float*>(st.v[t][r]), y[t]);
    }
    if (r == 15 && out.qkv) {
      out.qkv->write_group(*out.qkv, reinterpret_cast<const float*>(st.v), T, n - 15, out.m0, rows);
    } else if (r == 15 || n == n1 - 1) {
      store_group<T>(st, r + 1, rows, n - r, out);
    }
  }
};

template <int T>
void i8_sparse_t(const SparseI8& w, const uint8_t* tile, int rows, const float* sx, int64_t n0, int64_t n1,
                 const Output& out) {
  TransposedOut<T> epi(w, out, sx, rows, n0, n1);
  sparse_rows<T>(w, tile, n0, n1, epi);
  if (out.stream) _mm_sfence();  // order the non-temporal stores before the caller signals completion
}

void i8_sparse(const SparseI8& w, const void* tile, int mtp, int rows, const float* sx, int64_t n0, int64_t n1,
               const Output& out) {
  const uint8_t* t = static_cast<const uint8_t*>(tile);
  switch (mtp / kVec) {
    case 1: return i8_sparse_t<1>(w, t, rows, sx, n0, n1, out);
    case 2: return i8_sparse_t<2>(w, t, rows, sx, n0, n1, out);
    case 3: return i8_sparse_t<3>(w, t, rows, sx, n0, n1, out);
    default: return i8_sparse_t<4>(w, t, rows, sx, n0, n1, out);
  }
}

// All rows of w for two 64-token tiles, each into its own epilogue: through each group's generated code together
// (`together` and w has code: it and its values fetched once for 128 tokens), else tile after tile.
template <class Epi>
void sparse_rows_pair(const SparseI8& w, const uint8_t* ta, const uint8_t* tb, Epi& a, Epi& b, bool together) {
  if (together && w.jit && !w.quads && jit_enabled()) return jit_rows(w, ta, 0, w.n, a, tb, &b);
  sparse_rows<4>(w, ta, 0, w.n, a);
  sparse_rows<4>(w, tb, 0, w.n, b);
}

// IsaKernels::i8_sparse_pair.
void i8_sparse_pair(const SparseI8& w, const void* tile_a, int rows_a, const float* sx_a, const Output& out_a,
                    const void* tile_b, int rows_b, const float* sx_b, const Output& out_b) {
  TransposedOut<4> a(w, out_a, sx_a, rows_a, 0, w.n), b(w, out_b, sx_b, rows_b, 0, w.n, 1);
  // (Q/K/V together through write_head only, whose head staging has a slot per tile; write_group's has one)
  const bool groups = (out_a.qkv && !out_a.qkv->write_head) || (out_b.qkv && !out_b.qkv->write_head);
  sparse_rows_pair(w, static_cast<const uint8_t*>(tile_a), static_cast<const uint8_t*>(tile_b), a, b, !groups);
  if (out_a.stream || out_b.stream) _mm_sfence();
}

// ---------------------------------------------------------------------------------------------------------------
// Fused FFN, the hidden layer of one tile: h = act(first layer) stays in accumulator order ([n][tokens], no
// transpose), its per-token amax is a running lane-wise max, and its quantization for the second layer reads 4
// rows x 16 tokens and interleaves their codes into the [n/4][tokens][4] tile the second layer reads. Bit-exact
// with the unfused calls: the same epilogue arithmetic, the same amax, inv and code rounding as quant_tile.

template <int T>
struct HiddenOut {
  const SparseI8& w;
  Dequant<T> dq;
  int act;
  float* h;                // [n][16 T]
  __m512i amax_bits[T];    // running max of |h|'s bits per token (integer compare: spots inf and NaN too)
  HiddenOut(const SparseI8& w_, const float* sx, int rows, int act_, float* h_)
      : w(w_), dq(sx, rows), act(act_), h(h_) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) amax_bits[t] = _mm512_setzero_si512();
  }
  __attribute__((always_inline)) void row(int64_t n, const __m512i* acc) {
    __m512 y[T];
    dq.apply(w, n, act, acc, y);
    store(n, y, T);
  }
  // Rows n and n + 1 at once (the generated code's path, whole groups of rows): the GELU is a ~40-cycle chain per
  // vector, and with two rows' chains in one block the out-of-order core overlaps them (a BERT-base forward ~2%
  // faster at batch 16, ~1% at batch 1; four rows at once were no faster: benchmarks/RESULTS.md, session 22). Same
  // arithmetic, same h.
  static constexpr bool kPairs = true;
  __attribute__((always_inline)) void pair(int64_t n, const __m512i* acc0, const __m512i* acc1) {
    __m512 y[2 * T];
    dq.prepare(w, n, act, acc0, y);
    dq.prepare(w, n + 1, act, acc1, y + T);
#pragma GCC unroll 8
    for (int k = 0; k < 2 * T; ++k) y[k] = activate_prepared(y[k], act);
    store(n, y, 2 * T);  // row n + 1 follows row n in h ([n][16 T])
  }

 private:
  // (members copied to locals first: each vector store may alias them as far as the compiler knows, which made it
  // reload h and read-modify-write amax_bits in memory around every store; ~0.7% of a batch-16 forward)
  __attribute__((always_inline)) void store(int64_t n, const __m512* y, int vectors) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    float* const dst = h + n * T * kVec;
    __m512i m[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) m[t] = amax_bits[t];
#pragma GCC unroll 8
    for (int k = 0; k < vectors; ++k) {
      m[k % T] = _mm512_max_epu32(m[k % T], _mm512_and_si512(_mm512_castps_si512(y[k]), abs_mask));
    }
#pragma GCC unroll 8
    for (int k = 0; k < vectors; ++k) _mm512_store_ps(dst + k * kVec, y[k]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) amax_bits[t] = m[t];
  }
};

// 4 rows of 16 tokens' int32 codes -> 64 bytes u8 (code + 128), token-major: [c0 c1 c2 c3] per token.
inline __m512i interleave_codes(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  // packs work per 128-bit lane: bytes [c0 t0..3, c1 t0..3, c2 t0..3, c3 t0..3] of the lane's 4 tokens.
  __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(c2, c3));
  b = _mm512_max_epi8(b, _mm512_set1_epi8(-127));
  b = _mm512_xor_si512(b, _mm512_set1_epi8(static_cast<char>(0x80)));
  const __m512i to_tokens =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  return _mm512_shuffle_epi8(b, to_tokens);
}

// The second half of quant_tile for an fm tile of 16 T tokens ([n][16 T] floats) whose per-token max of |h|'s bits
// is amax_bits: per-token parameters exactly as token_params (inv = (1 / amax) * 127, scale = amax / 127; NaN scale,
// inv 0 for a token holding inf or NaN), codes as quant64, interleaved into quant_tile's [n/4][16 T][4] layout.
template <int T>
void fm_codes(const float* h, int64_t n, const __m512i* amax_bits, uint8_t* tile2, float* sx2) {
  __m512 inv[T];
  bool any_inf = false;
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    const __m512i bits = amax_bits[t];
    const __mmask16 bad = _mm512_cmpge_epu32_mask(bits, _mm512_set1_epi32(0x7f800000));
    const __m512 amax = _mm512_castsi512_ps(bits);
    const __mmask16 pos = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ) & ~bad;
    const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), amax);
    inv[t] = _mm512_maskz_mul_ps(pos, r, _mm512_set1_ps(127.0f));
    const __m512 scale = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
    _mm512_storeu_ps(sx2 + t * kVec, _mm512_mask_mov_ps(scale, bad, nan));
    any_inf |= _mm512_cmp_ps_mask(inv[t], _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ) != 0;
  }
  const int64_t kb2 = (n + 3) / 4;
  for (int64_t b = 0; b < kb2; ++b) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      __m512i c[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t row = 4 * b + j;
        c[j] = row < n ? _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(h + (row * T + t) * kVec), inv[t]))
                       : _mm512_setzero_si512();
      }
      _mm512_store_si512(tile2 + (b * T + t) * 64, interleave_codes(c[0], c[1], c[2], c[3]));
    }
  }
  if (!any_inf) return;
  // A token whose amax is subnormal: inv = inf exactly as in torch, codes sign(h) * 127 (rare; see quant_tile).
  alignas(64) float invs[16 * T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) _mm512_store_ps(invs + t * kVec, inv[t]);
  for (int r = 0; r < 16 * T; ++r) {
    if (!is_inf(invs[r])) continue;
    for (int64_t i = 0; i < n; ++i) tile2[(i >> 2) * 64 * T + r * 4 + (i & 3)] = saturated_u8(h[i * 16 * T + r]);
  }
}

template <int T>
void ffn_hidden_t(const SparseI8& w1, const uint8_t* tile1, int rows, const float* sx1, int act, float* h,
                  uint8_t* tile2, float* sx2) {
  HiddenOut<T> epi(w1, sx1, rows, act, h);
  sparse_rows<T>(w1, tile1, 0, w1.n, epi);
  fm_codes<T>(h, w1.n, epi.amax_bits, tile2, sx2);
}

// IsaKernels::i8_ffn_hidden_pair.
void i8_ffn_hidden_pair(const SparseI8& w1, int act, const void* tile1_a, int rows_a, const float* sx1_a, float* h_a,
                        void* tile2_a, float* sx2_a, const void* tile1_b, int rows_b, const float* sx1_b, float* h_b,
                        void* tile2_b, float* sx2_b) {
  HiddenOut<4> a(w1, sx1_a, rows_a, act, h_a), b(w1, sx1_b, rows_b, act, h_b);
  sparse_rows_pair(w1, static_cast<const uint8_t*>(tile1_a), static_cast<const uint8_t*>(tile1_b), a, b, true);
  fm_codes<4>(h_a, w1.n, a.amax_bits, static_cast<uint8_t*>(tile2_a), sx2_a);
  fm_codes<4>(h_b, w1.n, b.amax_bits, static_cast<uint8_t*>(tile2_b), sx2_b);
}

void i8_ffn_hidden(const SparseI8& w1, const void* tile1, int mtp, int rows, const float* sx1, int act, float* h,
                   void* tile2, float* sx2) {
  const uint8_t* t1 = static_cast<const uint8_t*>(tile1);
  uint8_t* t2 = static_cast<uint8_t*>(tile2);
  switch (mtp / kVec) {
    case 1: return ffn_hidden_t<1>(w1, t1, rows, sx1, act, h, t2, sx2);
    case 2: return ffn_hidden_t<2>(w1, t1, rows, sx1, act, h, t2, sx2);
    case 3: return ffn_hidden_t<3>(w1, t1, rows, sx1, act, h, t2, sx2);
    default: return ffn_hidden_t<4>(w1, t1, rows, sx1, act, h, t2, sx2);
  }
}

template <int T>
void quant_fm_t(const float* x, int64_t k, uint8_t* tile, float* sx, const uint32_t* given) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i amax[T];
  if (given) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) amax[t] = _mm512_loadu_si512(given + t * kVec);
    return fm_codes<T>(x, k, amax, tile, sx);
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) amax[t] = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; ++i) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512i v = _mm512_load_si512(x + (i * T + t) * kVec);
      amax[t] = _mm512_max_epu32(amax[t], _mm512_and_si512(v, abs_mask));
    }
  }
  fm_codes<T>(x, k, amax, tile, sx);
}

void quant_fm(const float* x, int64_t k, int mtp, void* tile_, float* sx, const uint32_t* amax) {
  uint8_t* tile = static_cast<uint8_t*>(tile_);
  switch (mtp / kVec) {
    case 1: return quant_fm_t<1>(x, k, tile, sx, amax);
    case 2: return quant_fm_t<2>(x, k, tile, sx, amax);
    case 3: return quant_fm_t<3>(x, k, tile, sx, amax);
    default: return quant_fm_t<4>(x, k, tile, sx, amax);
  }
}

void f32_untile(const float* tile, int mtp, int64_t k, float* y, int64_t ldy) {
  for (int t = 0; t < mtp; t += kVec) {
    for (int64_t k0 = 0; k0 < k; k0 += 16) {
      const int kn = k - k0 < 16 ? static_cast<int>(k - k0) : 16;
      __m512i v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        v[i] = i < kn ? _mm512_load_si512(tile + (k0 + i) * mtp + t) : _mm512_setzero_si512();
      }
      transpose16(v);
      const __mmask16 km = mask16(kn);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) _mm512_mask_storeu_epi32(y + (t + r) * ldy + k0, km, v[r]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Sparse int8 for a few tokens (decoding). The broadcast kernel above would use one vector lane per token; here
// the lanes are 16 blocks of a row instead. Their activations are "gathered" from registers: one column panel of
// a token is 128 words of 4 bytes, i.e. 8 zmm, and vpermt2d picks words from them (memory gathers cost ~28
// cycles each on Zen 4). Indices are wrapped into the panel, so no index reaches memory at all.

constexpr int kFewRows = 2;  // from 3 tokens on, the broadcast kernel is faster (measured)

// The 16 words of the 8-register panel `xw` at positions idx (0..127); b5/b6: idx bits 5 and 6.
inline __m512i panel_words(const __m512i* xw, __m512i idx, __mmask16 b5, __mmask16 b6) {
  const __m512i w01 = _mm512_permutex2var_epi32(xw[0], idx, xw[1]);
  const __m512i w23 = _mm512_permutex2var_epi32(xw[2], idx, xw[3]);
  const __m512i w45 = _mm512_permutex2var_epi32(xw[4], idx, xw[5]);
  const __m512i w67 = _mm512_permutex2var_epi32(xw[6], idx, xw[7]);
  const __m512i lo = _mm512_mask_blend_epi32(b5, w01, w23);
  const __m512i hi = _mm512_mask_blend_epi32(b5, w45, w67);
  return _mm512_mask_blend_epi32(b6, lo, hi);
}

// R (1 or 2) tokens; sums[r][n - n0] accumulates over panels (started at -128 * weight_sum). Wrapped indices:
// a corrupted column index gives a wrong word of the same panel, never a read outside the registers.
template <int R>
void few_panel_pass(const SparseI8& w, const uint8_t* xq, int64_t ldq, int64_t p, int64_t n0, int64_t n1,
                    int32_t (*sums)[kFewChunk]) {
  __m512i xw[R][8];
  const int64_t word0 = p * kPanel;
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 8; ++j) {
      xw[r][j] = _mm512_maskz_loadu_epi32(mask16(w.kb - word0 - 16 * j), xq + r * ldq + (word0 + 16 * j) * 4);
    }
  }
  const __m512i base = _mm512_set1_epi32(static_cast<int>(word0));
  const __m512i wrap = _mm512_set1_epi32(kPanel - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t e = w.ptr[p * w.n + n + 1];
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int32_t b = w.ptr[p * w.n + n]; b < e; b += 16) {
      const __mmask16 m = mask16(e - b);
      const __m512i col = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w.cols + b));
      const __m512i idx = _mm512_and_si512(_mm512_sub_epi32(col, base), wrap);
      const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
      const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
      const __m512i wv = _mm512_maskz_loadu_epi32(m, w.values + b);  // absent lanes multiply by 0
      for (int r = 0; r < R; ++r) acc[r] = dpbusd(acc[r], panel_words(xw[r], idx, b5, b6), wv);
    }
    for (int r = 0; r < R; ++r) sums[r][n - n0] += _mm512_reduce_add_epi32(acc[r]);
  }
}

void i8_sparse_few(const SparseI8& w, const void* xq_, int64_t ldq, int rows, const float* sx, int64_t n0,
                   int64_t n1, const Output& out) {
  const uint8_t* xq = static_cast<const uint8_t*>(xq_);
  few_token_chunks<kFewRows>(w, rows, sx, n0, n1, out,
                             [&](int64_t p, int r, bool pair, int64_t c0, int64_t c1, int32_t(*s)[kFewChunk]) {
                               if (pair) return few_panel_pass<2>(w, xq + r * ldq, ldq, p, c0, c1, s);
                               few_panel_pass<1>(w, xq + r * ldq, ldq, p, c0, c1, s);
                             });
}

// Int8 CSR for a few tokens (quads_few_avx512.h) without VBMI: each of an entry's 4 bytes is the byte of its
// feature in the word that a vpermt2d tree picks (panel_words), shifted into place; 4 trees per vector of 16
// entries where VBMI's byte permutes need one (kernels_avx512_vbmi.cpp).
struct WordGather {
  struct Index {
    __m512i word[4], shift[4];
    __mmask16 b5[4], b6[4];
  };
  // lo, hi: the 4 features of entries 0-7 and 8-15 (16-bit, relative to the panel)
  static Index index(__m512i lo, __m512i hi) {
    Index ix;
    const __m512i f01 = _mm512_permutex2var_epi16(lo, _mm512_set_epi16(61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21,
        17, 13, 9, 5, 1, 60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0), hi);
    const __m512i f23 = _mm512_permutex2var_epi16(lo, _mm512_set_epi16(63, 59, 55, 51, 47, 43, 39, 35, 31, 27, 23,
        19, 15, 11, 7, 3, 62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2), hi);
    const __m256i f[4] = {_mm512_castsi512_si256(f01), _mm512_extracti64x4_epi64(f01, 1),
                          _mm512_castsi512_si256(f23), _mm512_extracti64x4_epi64(f23, 1)};
    for (int j = 0; j < 4; ++j) {
      const __m512i local = _mm512_cvtepu16_epi32(f[j]);
      ix.word[j] = _mm512_srli_epi32(local, 2);
      ix.shift[j] = _mm512_slli_epi32(_mm512_and_si512(local, _mm512_set1_epi32(3)), 3);
      ix.b5[j] = _mm512_test_epi32_mask(local, _mm512_set1_epi32(128));
      ix.b6[j] = _mm512_test_epi32_mask(local, _mm512_set1_epi32(256));
    }
    return ix;
  }
  static __m512i bytes(const Index& ix, const __m512i* xw) {
    __m512i g = _mm512_and_si512(_mm512_srlv_epi32(panel_words(xw, ix.word[0], ix.b5[0], ix.b6[0]), ix.shift[0]),
                                 _mm512_set1_epi32(0xff));
#pragma GCC unroll 3
    for (int j = 1; j < 4; ++j) {
      const __m512i b = _mm512_srlv_epi32(panel_words(xw, ix.word[j], ix.b5[j], ix.b6[j]), ix.shift[j]);
      // g | (b << 8 j) & (0xff << 8 j)
      g = _mm512_ternarylogic_epi32(g, _mm512_slli_epi32(b, 8 * j), _mm512_set1_epi32(0xff << (8 * j)), 0xf8);
    }
    return g;
  }
};

void quads_few(const SparseI8& w, const void* xq, int64_t ldq, int rows, const float* sx, int64_t n0, int64_t n1,
               const Output& out) {
  quads_few_t<WordGather>(w, xq, ldq, rows, sx, n0, n1, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Dense int8: MR tokens x NP panels of 16 channels; activations broadcast 4 bytes at a time, weights loaded as
// 64-byte (16 channels x 4 features) vectors.

template <int MR, int NP>
__attribute__((always_inline)) inline void dense_acc(const int8_t* wp, int64_t pstride, const uint8_t* xr,
                                                     int64_t ldq, int64_t kb, __m512i* res) {
  __m512i acc[MR][NP];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t b = 0; b < kb; ++b) {
    __m512i wv[NP];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) wv[j] = _mm512_loadu_si512(wp + j * pstride + b * 64);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t xw;
      std::memcpy(&xw, xr + i * ldq + b * 4, 4);
      const __m512i xv = _mm512_set1_epi32(xw);
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) acc[i][j] = dpbusd(acc[i][j], xv, wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) res[i * NP + j] = acc[i][j];
}

template <int MR, int NP>
void dense_micro(const DenseI8& w, const uint8_t* xq, int64_t ldq, const float* sx, int64_t p, int64_t m,
                 const Output& out) {
  __m512i acc[MR * NP];
  dense_acc<MR, NP>(w.packed + p * w.kb * 64, w.kb * 64, xq + m * ldq, ldq, w.kb, acc);
#pragma GCC unroll 4
  for (int j = 0; j < NP; ++j) {
    const int64_t n = (p + j) * 16;
    const __mmask16 cm = mask16(w.n - n);
    const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(cm, w.weight_sum + n), 7);
    const __m512 sw = _mm512_maskz_loadu_ps(cm, w.scale + n);
    const __m512 bias = w.bias ? _mm512_maskz_loadu_ps(cm, w.bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_sub_epi32(acc[i * NP + j], corr);
      const int64_t row = out.m0 + m + i;
      if (out.yi) {
        _mm512_mask_storeu_epi32(out.yi + row * out.ldy + n, cm, a);
        continue;
      }
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sx[m + i])), sw);
      if (w.bias) v = _mm512_add_ps(v, bias);
      _mm512_mask_storeu_ps(out.y + row * out.ldy + n, cm, activate(v, out.act));
    }
  }
}

template <int NP>
void dense_panels(const DenseI8& w, const uint8_t* xq, int64_t ldq, int rows, const float* sx, int64_t p,
                  int64_t m0, int64_t m1, const Output& out) {
  constexpr int kMR = 6;
  int64_t m = m0;
  for (; m + kMR <= m1; m += kMR) dense_micro<kMR, NP>(w, xq, ldq, sx, p, m, out);
  switch (m1 - m) {
    case 5: return dense_micro<5, NP>(w, xq, ldq, sx, p, m, out);
    case 4: return dense_micro<4, NP>(w, xq, ldq, sx, p, m, out);
    case 3: return dense_micro<3, NP>(w, xq, ldq, sx, p, m, out);
    case 2: return dense_micro<2, NP>(w, xq, ldq, sx, p, m, out);
    case 1: return dense_micro<1, NP>(w, xq, ldq, sx, p, m, out);
    default: return;
  }
  (void)rows;
}

void i8_dense(const DenseI8& w, const void* xq_, int64_t ldq, int rows, const float* sx, int64_t p0, int64_t p1,
              const Output& out) {
  const uint8_t* xq = static_cast<const uint8_t*>(xq_);
  constexpr int64_t kMC = 120;  // tokens whose quantized rows stay in L2 while a panel group streams past
  for (int64_t mc = 0; mc < rows; mc += kMC) {
    const int64_t me = mc + kMC < rows ? mc + kMC : rows;
    for (int64_t p = p0; p < p1; p += 4) {
      switch (p1 - p >= 4 ? 4 : p1 - p) {
        case 4: dense_panels<4>(w, xq, ldq, rows, sx, p, mc, me, out); break;
        case 3: dense_panels<3>(w, xq, ldq, rows, sx, p, mc, me, out); break;
        case 2: dense_panels<2>(w, xq, ldq, rows, sx, p, mc, me, out); break;
        default: dense_panels<1>(w, xq, ldq, rows, sx, p, mc, me, out); break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// fp32 CSR sparse x dense activations: the same weights-broadcast scheme with FMAs on [k][16 T] fp32 tiles.

void f32_tile(const float* x, int64_t ldx, int rows, int64_t k, int mtp, float* tile) {
  for (int g = 0; g < mtp; g += kVec) {
    const int nrow = rows - g < kVec ? (rows - g > 0 ? rows - g : 0) : kVec;
    for (int64_t k0 = 0; k0 < k; k0 += 16) {
      const __mmask16 km = mask16(k - k0);
      __m512i v[16];
#pragma GCC unroll 16
      for (int r = 0; r < kVec; ++r) {
        v[r] = r < nrow ? _mm512_maskz_loadu_epi32(km, x + (g + r) * ldx + k0) : _mm512_setzero_si512();
      }
      transpose16(v);
      const int kn = k - k0 < 16 ? static_cast<int>(k - k0) : 16;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (i < kn) _mm512_store_si512(tile + (k0 + i) * mtp + g, v[i]);
      }
    }
  }
}

template <int T, int S>
__attribute__((always_inline)) inline void f32_row(const SparseF32& w, const float* tile, int64_t n, int64_t c0,
                                                   int64_t c1, const __m512* init, __m512* res) {
  constexpr int64_t kStride = kVec * T;  // floats per input feature in a tile
  const uint32_t k_max = static_cast<uint32_t>(w.k - 1);
  __m512 acc[S][T];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[s][t] = s == 0 ? init[t] : _mm512_setzero_ps();
  const auto step = [&](int s, int32_t blk) __attribute__((always_inline)) {
    uint32_t c = w.cols[blk];
    c = c < k_max ? c : k_max;
    const float* p = tile + c * kStride;
    const __m512 wv = _mm512_set1_ps(w.values[blk]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[s][t] = _mm512_fmadd_ps(wv, _mm512_load_ps(p + kVec * t), acc[s][t]);
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
    __m512 a = acc[0][t];
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s) a = _mm512_add_ps(a, acc[s][t]);
    res[t] = a;
  }
}

template <int T>
void f32_sparse_t(const SparseF32& w, const float* tile, int rows, int64_t n0, int64_t n1, const Output& out) {
  constexpr int kSets = T >= 3 ? 2 : 4;
  const int64_t per_pass = passes_of(w.k, 64 * T, w.panels);
  Output o = out;
  o.yi = nullptr;
  Staging<T> st;
  alignas(64) __m512 part[kGroup][T];
  for (int64_t g0 = n0; g0 < n1; g0 += kGroup) {
    const int gn = n1 - g0 < kGroup ? static_cast<int>(n1 - g0) : kGroup;
    for (int64_t c0 = 0; c0 < w.panels; c0 += per_pass) {
      const int64_t c1 = c0 + per_pass < w.panels ? c0 + per_pass : w.panels;
      const bool last = c1 == w.panels;
      for (int i = 0; i < gn; ++i) {
        const int64_t n = g0 + i;
        __m512 init[T], acc[T];
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) init[t] = c0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(&part[i][t]);
        f32_row<T, kSets>(w, tile, n, c0, c1, init, acc);
        if (!last) {
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) _mm512_store_ps(&part[i][t], acc[t]);
          continue;
        }
        const int r = i & 15;
        const __m512 bias = _mm512_set1_ps(w.bias ? w.bias[n] : 0.0f);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          __m512 v = acc[t];
          if (w.bias) v = _mm512_add_ps(v, bias);
          _mm512_store_ps(reinterpret_cast<float*>(st.v[t][r]), activate(v, out.act));
        }
        if (r == 15 || i == gn - 1) store_group<T>(st, r + 1, rows, n - r, o);
      }
    }
  }
  if (o.stream) _mm_sfence();
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
    "avx512_vnni", kVec, kVec * kMaxT, 1, 128, quant_tile, quant_rows, i8_sparse, i8_dense, kFewRows,
    i8_sparse_few, f32_tile, f32_sparse, i8_ffn_hidden, quads_tile, kQuadsFewRowsWords, quads_few, true,
    quant_fm, f32_untile, i8_sparse_pair, i8_ffn_hidden_pair,
};

}  // namespace

const IsaKernels* avx512_vnni_kernels() { return &kTable; }

}  // namespace hf_sparse
