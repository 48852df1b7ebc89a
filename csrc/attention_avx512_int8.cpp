// AVX-512 VNNI int8 attention (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni only).
//
// The numerics of docs/kernels.md ("int8 attention"), which attention_int8_scalar.cpp states plainly: Q, K and V
// quantized per (token, head) like the Linears' activations, both products as exact int32 sums of vpdpbusd (u8 x
// s8, 64 multiply-adds per instruction: twice vdpbf16ps' 32), the softmax in float32 between them.
//
//   S = Q K^T: lanes are 16 keys. K codes are packed transposed, [d/4][keys] words of 4 s8 (one 64-byte line =
//              16 keys x 4 head features); each query row's 4 codes (u8 = code + 128) are broadcast. The +128 is
//              taken back per key (128 x the key's code sum), as the Linears take it back per output channel.
//   O = P V:   lanes are 16 head features. V codes are packed [keys/4][d] words of 4 s8 (a line = 16 features x 4
//              keys); each query row's 4 probability codes (u8, no shift) are broadcast.
//
// Blocks of 32 query rows keep their float32 scores and u8 probabilities in L1; register blocks are 4 rows x 4
// vectors (16 accumulators: 4 loads and 4 broadcasts per 16 vpdpbusd), as in the bfloat16 kernel.
//
// In an encoder layer (d a multiple of 16, sequences of kMinPackedSeq tokens or more) the Q/K/V product's epilogue
// writes these codes itself
// (write_qkv_group, QkvPackedOut): Q/K/V never exist as float32 rows, and each key is quantized once, not by every
// thread whose queries read it.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "attention.h"
#include "avx512_common.h"

namespace hf_sparse {
namespace {

constexpr int kVec = 16;
constexpr int kRows = 4;    // query rows per register block
constexpr int kBlock = 32;  // query rows per block (a multiple of kRows)
constexpr int kCols = 4;    // vectors per register block

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Scratch of one thread, in 64-byte aligned pieces.
struct Layout {
  int64_t d4, qst, sp, dv, dq;  // words per K row (4 features each), per Q row (d4 rounded to 16), keys and
                                // features padded to 16, features padded to 64
  size_t k_off, kc_off, ks_off, v_off, vs_off, q_off, qs_off, s_off, m_off, p_off, l_off, ps_off, c_off, bytes;
  Layout(int64_t d, int64_t s) {
    d4 = (d + 3) / 4;
    qst = round_up(d4, kVec);
    sp = round_up(s, kVec);
    dv = round_up(d, kVec);
    dq = round_up(d, 64);
    const auto a64 = [](int64_t b) { return (static_cast<size_t>(b) + 63) & ~size_t{63}; };
    k_off = 0;
    kc_off = k_off + a64(d4 * sp * 4);    // K codes: [d4][sp] words
    ks_off = kc_off + a64(sp * 4);        // 128 x each key's code sum (int32)
    v_off = ks_off + a64(sp * 4);         // key scales
    vs_off = v_off + a64(sp / 4 * dv * 4);  // V codes: [sp/4][dv] words
    q_off = vs_off + a64(sp * 4);         // V scales (per key)
    qs_off = q_off + a64(kBlock * qst * 4);  // Q codes + 128: [kBlock][qst] words
    s_off = qs_off + a64(kBlock * 4);     // Q scale x the call's scale, per row
    m_off = s_off + a64(kBlock * sp * 4);  // scores, then p x V's scale: [kBlock][sp] floats
    p_off = m_off + a64(kBlock * kVec * 4);  // each row's running max of scores, 16 lanes (unmasked rows)
    l_off = p_off + a64(kBlock * sp);     // probability codes: [kBlock][sp] bytes
    ps_off = l_off + a64(kBlock * 4);     // row sums of p
    c_off = ps_off + a64(kBlock * 4);     // probability scales
    bytes = c_off + a64(kVec * dq);       // codes of 16 rows (quant16)
  }
};

size_t scratch_bytes(int64_t d, int64_t s, int64_t) { return Layout(d, s).bytes; }

// The quantization parameters of 16 tokens (lanes) from the bits of their |x| maxima: inv = (1 / amax) x 127 (0 for
// amax 0 and for a token holding inf or NaN) and scale = amax / 127 (NaN for the latter), as numerics'
// quantize_activation_int8.
inline void lane_quant(__m512i m, __m512& inv, __m512& scale) {
  const __mmask16 bad = _mm512_cmp_epu32_mask(m, _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLT);
  const __m512 amax = _mm512_castsi512_ps(m);
  const __mmask16 pos = static_cast<__mmask16>(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ) & ~bad);
  inv = _mm512_maskz_mul_ps(pos, _mm512_div_ps(_mm512_set1_ps(1.0f), amax), _mm512_set1_ps(127.0f));
  scale = _mm512_mask_mov_ps(_mm512_div_ps(amax, _mm512_set1_ps(127.0f)), bad,
                             _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
}

// Up to 16 rows x[t * ld .. + d - 1] (t < n) -> codes[t][0 .. dq - 1] (s8, clamp(round(x * inv), -127, 127), zero
// past d; dq = d rounded up to 64) and scale[t] (lanes 16: the row's parameters as numerics'
// quantize_activation_int8, NaN for a row holding inf or NaN; rows t >= n: codes 0, scale 0). The per-row maxima
// are reduced with lanes = rows (one transpose for 16 rows), not one horizontal reduction per row.
void quant16(const float* x, int64_t ld, int n, int64_t d, int64_t dq, int8_t* codes, float* scale) {
  alignas(64) static const int32_t kUnpermute[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) m[t] = _mm512_setzero_si512();
  for (int t = 0; t < n; ++t) {
    const float* row = x + t * ld;
    for (int64_t c = 0; c < d; c += kVec) {
      m[t] = _mm512_max_epu32(m[t], _mm512_and_si512(_mm512_maskz_loadu_epi32(mask16(d - c), row + c), abs_mask));
    }
  }
  transpose16(m);
#pragma GCC unroll 15
  for (int t = 1; t < 16; ++t) m[0] = _mm512_max_epu32(m[0], m[t]);
  __m512 vinvs, vscale;
  lane_quant(m[0], vinvs, vscale);
  alignas(64) float inv[16];
  _mm512_store_ps(inv, vinvs);
  _mm512_storeu_ps(scale, vscale);
  const __m512i unpermute = _mm512_load_si512(kUnpermute);
  for (int t = 0; t < 16; ++t) {
    int8_t* out = codes + t * dq;
    if (t >= n) {
      std::memset(out, 0, static_cast<size_t>(dq));
      continue;
    }
    const __m512 vinv = _mm512_set1_ps(inv[t]);
    const float* row = x + t * ld;
    for (int64_t c = 0; c < dq; c += 64) {
      __m512i q[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512 v = _mm512_maskz_loadu_ps(mask16(d - c - 16 * j), row + c + 16 * j);
        q[j] = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));  // round half to even (MXCSR default)
      }
      __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
      b = _mm512_max_epi8(b, _mm512_set1_epi8(-127));
      _mm512_store_si512(out + c, _mm512_permutexvar_epi32(unpermute, b));
    }
    if (!(inv[t] <= std::numeric_limits<float>::max())) {  // amax subnormal: inv = inf, codes sign(x) * 127 (torch)
      for (int64_t c = 0; c < d; ++c) out[c] = static_cast<int8_t>(row[c] > 0.0f ? 127 : (row[c] < 0.0f ? -127 : 0));
    }
  }
}

// K rows 0..s-1 -> kp[w][j] = the s8 codes of k[j][4w .. 4w + 3]; kc[j] = 128 x the key's code sum; ks[j] = its
// scale. Zero past s (up to the next multiple of 16) and past d. codes: scratch of 16 x dq bytes.
void pack_k(const float* k, int64_t ldk, int64_t s, int64_t d, const Layout& L, uint32_t* kp, int32_t* kc,
            float* ks, int8_t* codes) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t j0 = 0; j0 < s; j0 += kVec) {
    const int n = static_cast<int>(s - j0 < kVec ? s - j0 : kVec);
    quant16(k + j0 * ldk, ldk, n, d, L.dq, codes, ks + j0);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t w0 = 0; w0 < L.d4; w0 += kVec) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) r[t] = _mm512_load_si512(codes + t * L.dq + 4 * w0);
      transpose16(r);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        if (w0 + t < L.d4) {
          sum = dpbusd(sum, ones, r[t]);
          _mm512_store_si512(kp + (w0 + t) * L.sp + j0, r[t]);
        }
      }
    }
    _mm512_store_si512(kc + j0, _mm512_slli_epi32(sum, 7));
  }
}

// A 4x4 transpose of 128-bit lanes: out[g] = (w[0] lane g, w[1] lane g, w[2] lane g, w[3] lane g).
inline void transpose_lanes4(const __m512i w[4], __m512i out[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(w[0], w[1], 0x44), t1 = _mm512_shuffle_i32x4(w[0], w[1], 0xee);
  const __m512i t2 = _mm512_shuffle_i32x4(w[2], w[3], 0x44), t3 = _mm512_shuffle_i32x4(w[2], w[3], 0xee);
  out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_i32x4(t0, t2, 0xdd);
  out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_i32x4(t1, t3, 0xdd);
}

// V rows 0..s-1 -> vp[j4][c] = the s8 codes of v[4 j4 .. 4 j4 + 3][c]; vs[j] = row j's scale. Zero past s (up to
// the next multiple of 16) and past d (up to dv).
void pack_v(const float* v, int64_t ldv, int64_t s, int64_t d, const Layout& L, uint32_t* vp, float* vs,
            int8_t* codes) {
  const int64_t dv = L.dv;
  for (int64_t j0 = 0; j0 < s; j0 += kVec) {
    const int n = static_cast<int>(s - j0 < kVec ? s - j0 : kVec);
    quant16(v + j0 * ldv, ldv, n, d, L.dq, codes, vs + j0);
    for (int g = 0; g < 4 && 4 * g < n; ++g) {  // keys j0 + 4g .. j0 + 4g + 3
      const int8_t* c4 = codes + 4 * g * L.dq;
      for (int64_t c = 0; c < dv; c += 64) {
        const __m512i a = _mm512_load_si512(c4 + c), b = _mm512_load_si512(c4 + L.dq + c);
        const __m512i e = _mm512_load_si512(c4 + 2 * L.dq + c), f = _mm512_load_si512(c4 + 3 * L.dq + c);
        const __m512i ab_lo = _mm512_unpacklo_epi8(a, b), ab_hi = _mm512_unpackhi_epi8(a, b);
        const __m512i ef_lo = _mm512_unpacklo_epi8(e, f), ef_hi = _mm512_unpackhi_epi8(e, f);
        // 128-bit lane l of w[0..3] holds features 16 l + 0..3, 4..7, 8..11, 12..15: a 4x4 transpose of lanes
        const __m512i w[4] = {_mm512_unpacklo_epi16(ab_lo, ef_lo), _mm512_unpackhi_epi16(ab_lo, ef_lo),
                              _mm512_unpacklo_epi16(ab_hi, ef_hi), _mm512_unpackhi_epi16(ab_hi, ef_hi)};
        __m512i out[4];
        transpose_lanes4(w, out);
        uint32_t* dst = vp + (j0 / 4 + g) * dv + c;
        const int64_t left = dv - c;  // words of this 64-feature chunk that exist (multiple of 16)
        for (int q = 0; q < 4 && 16 * q < left; ++q) _mm512_store_si512(dst + 16 * q, out[q]);
      }
    }
  }
}

// acc[r][c] = sum over w < n of a[r * a_rs + w * a_ws] (4 u8 codes, broadcast) . b[w * b_ws + 16c + lane] (4 s8
// codes per lane): the int32 products of both attention products (Q K^T and P V), kRows rows x C vectors.
template <int C>
__attribute__((always_inline)) inline void dot_rows(const uint32_t* a, int64_t a_rs, int64_t a_ws, int64_t n,
                                                    const uint32_t* b, int64_t b_ws, __m512i (&acc)[kRows][C]) {
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  }
  for (int64_t w = 0; w < n; ++w) {
    __m512i bv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) bv[c] = _mm512_load_si512(b + w * b_ws + c * kVec);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i ab = _mm512_set1_epi32(static_cast<int>(a[r * a_rs + w * a_ws]));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = dpbusd(acc[r][c], ab, bv[c]);
    }
  }
}

// Scores of kRows query rows x C key vectors: sc[r][16c + lane] = (float(sum_w q[r][w] . kp[w][16c + lane] - kc) x
// qs[r]) x ks[16c + lane], Q's word (r, w) at qw[r * q_rs + w * q_ws]. With rmax (rows without a mask): lanes of
// the last vector outside `tail` (keys past the sequence) are stored as -inf, and rmax[r][lane] keeps the row's
// running max (starting from -inf at first), so the softmax needs no pass of its own to find it.
template <int C>
void qk_block(const uint32_t* qw, int64_t q_rs, int64_t q_ws, int64_t d4, const uint32_t* kp, int64_t sp,
              const int32_t* kc, const float* ks, const float* qs, float* sc, float* rmax, bool first,
              __mmask16 tail) {
  __m512i acc[kRows][C];
  dot_rows<C>(qw, q_rs, q_ws, d4, kp, sp, acc);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const __m512 rs = _mm512_set1_ps(qs[r]);
    __m512 m = ninf;
    if (rmax != nullptr && !first) m = _mm512_load_ps(rmax + r * kVec);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m512i exact = _mm512_sub_epi32(acc[r][c], _mm512_load_si512(kc + c * kVec));
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), rs), _mm512_load_ps(ks + c * kVec));
      if (rmax != nullptr) {
        if (c == C - 1) v = _mm512_mask_mov_ps(ninf, tail, v);
        m = _mm512_max_ps(m, v);
      }
      _mm512_store_ps(sc + r * sp + c * kVec, v);
    }
    if (rmax != nullptr) _mm512_store_ps(rmax + r * kVec, m);
  }
}

// Outputs of kRows query rows x C feature vectors: out[r][16c + lane] = (float(sum_j4 p[r][j4] . vp[j4][16c + lane])
// x ps[r]) / div[r]; only rows < nrows and features < dleft are stored.
template <int C>
void pv_block(const uint32_t* pw, int64_t pst, int64_t kw, const uint32_t* vp, int64_t dv, const float* div,
              const float* ps, int nrows, float* out, int64_t ldo, int64_t dleft) {
  __m512i acc[kRows][C];
  dot_rows<C>(pw, pst, 1, kw, vp, dv, acc);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    if (r >= nrows) break;
    const __m512 sc = _mm512_set1_ps(ps[r]), dv_ = _mm512_set1_ps(div[r]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m512 o = _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][c]), sc), dv_);
      _mm512_mask_storeu_ps(out + r * ldo + c * kVec, mask16(dleft - c * kVec), o);
    }
  }
}

// Softmax of R rows of scores over the same keys (keys 0..keys-1 valid; each row holds nvec vectors at sc + r * ld),
// then their probability codes: p = exp(s - max s), w = p x vs (V's scale per key), codes round(w x ((1 / max w) x
// 255)) into pc + r * ld bytes (nvec x 16 of them). Sets div[r], the sum of p (+inf when every key is masked, NaN
// when a score or a w is NaN; the row comes out 0 or NaN), and scale[r] = max w / 255. R rows at once give the
// out-of-order core R independent chains through the three passes and their reductions. NaN checks cost no pass of
// their own: w is NaN only where vs is (p is finite), which vs_nan says for all rows, and a NaN score shows in the
// row's largest |score| bits (integer ops beside the multiplies; a +inf score gives the row p = 0 everywhere, so
// 0 / 0 = NaN outputs, as torch's softmax gives). Rows without a mask come with rmax (qk_block's 16-lane running
// max, masked past the keys) and nan_rows (bit r: row r's scores hold a NaN, i.e. its Q scale or a key's scale is
// NaN: an int32 product times finite scales is never NaN), and skip the first pass.
template <int R>
void softmax_rows(float* sc, int64_t ld, int64_t nvec, int64_t keys, int mask_kind, const void* const* mask,
                  const float* vs, bool vs_nan, uint8_t* pc, float* div, float* scale, const float* rmax,
                  int nan_rows) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512 m[R];
  __m512i bits[R];  // running max of |s|'s bits: above inf's, the row holds a NaN
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    m[r] = ninf;
    bits[r] = _mm512_setzero_si512();
  }
  for (int64_t c = 0; c < nvec && rmax == nullptr; ++c) {
    const __mmask16 valid = mask16(keys - c * kVec);
    const bool same = mask_kind == kMaskNone && valid == 0xffff;  // masking changes nothing: no store
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* row = sc + r * ld + c * kVec;
      const __m512 v = masked_scores(_mm512_load_ps(row), valid, mask_kind, mask[r], c * kVec);
      bits[r] = _mm512_max_epu32(bits[r], _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
      m[r] = _mm512_max_ps(m[r], v);
      if (!same) _mm512_store_ps(row, v);
    }
  }
  __m512 vm[R], l[R], wm[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    vm[r] = _mm512_set1_ps(_mm512_reduce_max_ps(rmax != nullptr ? _mm512_load_ps(rmax + r * kVec) : m[r]));
    l[r] = wm[r] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < nvec; ++c) {
    const __m512 vsc = _mm512_load_ps(vs + c * kVec);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {  // (a row with max -inf gets p = exp_ps(NaN) = 0 here)
      float* row = sc + r * ld + c * kVec;
      const __m512 p = exp_ps(_mm512_sub_ps(_mm512_load_ps(row), vm[r]));
      l[r] = _mm512_add_ps(l[r], p);
      const __m512 w = _mm512_mul_ps(p, vsc);
      wm[r] = _mm512_max_ps(wm[r], w);
      _mm512_store_ps(row, w);
    }
  }
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float mx = _mm512_cvtss_f32(vm[r]);
    const float wmax = _mm512_reduce_max_ps(wm[r]);
    const bool nan = vs_nan || (rmax != nullptr ? (nan_rows >> r & 1) != 0
                                                : _mm512_reduce_max_epu32(bits[r]) > 0x7f800000u);
    const bool skip = nan || mx == -std::numeric_limits<float>::infinity();
    scale[r] = skip ? 0.0f : wmax / 255.0f;
    div[r] = skip ? (nan ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity())
                  : _mm512_reduce_add_ps(l[r]);
    const float inv = !skip && wmax > 0.0f ? (1.0f / wmax) * 255.0f : 0.0f;
    const __m512 winv = _mm512_set1_ps(inv);
    const float* w = sc + r * ld;
    uint8_t* codes = pc + r * ld;
    if (!(inv <= std::numeric_limits<float>::max())) {  // max w subnormal: 255 where w > 0 (w x inf would be inf)
      for (int64_t c = 0; c < nvec; ++c) {
        const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_load_ps(w + c * kVec), _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m128i top = _mm_maskz_set1_epi8(pos, static_cast<char>(255));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + c * kVec), top);
      }
      continue;
    }
    // w x inv <= 255 (w <= max w); a skipped row (inv 0) gets 0, NaN x 0 included (cvt: INT_MIN, packed as 0)
    int64_t c = 0;
    for (; c + 4 <= nvec; c += 4) {  // 64 codes: two saturating packs, one permute, one store
      __m512i q[4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) q[k] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(w + (c + k) * kVec), winv));
      const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]), _mm512_packus_epi32(q[2], q[3]));
      _mm512_storeu_si512(codes + c * kVec, _mm512_permutexvar_epi32(order, b));
    }
    for (; c < nvec; ++c) {
      const __m512i q = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(w + c * kVec), winv)),
                                         _mm512_setzero_si512());
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + c * kVec), _mm512_cvtusepi32_epi8(q));
    }
  }
}

// Whether any of the per-key scales x[0 .. n - 1] (64-byte aligned) is NaN: V's (then every w of a row over those
// keys is), K's (then every score of the head is).
bool any_nan(const float* x, int64_t n) {
  __mmask16 nan = 0;
  for (int64_t c = 0; c < n; c += kVec) {
    const __m512 v = _mm512_maskz_load_ps(mask16(n - c), x + c);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan != 0;
}

// QkvPackedOut's int8 layout (common.h): sp = seq rounded up to 16, d a multiple of 16 (d4 = d / 4 words per
// token). Per head:
//   Q: [d4][sp] words of 4 codes + 128 (u8: the Q K^T product broadcasts them by (w, token) as pack_k lays K),
//      then sp floats: each token's scale;
//   K: [d4][sp] words of 4 s8 codes (pack_k's), then sp int32 (128 x each key's code sum), then sp floats (scales);
//   V: [sp/4][d] words of 4 keys' s8 codes (pack_v's), then sp floats (scales).
// Padding keys (seq .. sp - 1): V's scales 0, written with the sequence's last token (their probabilities are 0, and
// 0 x NaN would not be); K's codes, scales and sums are left as they are (their scores are masked), V's codes too or
// written with whatever the lanes past the sequence held (they meet probability code 0 in exact integer sums).
void write_qkv_head(const QkvPackedOut& p, const float* head, const uint32_t* maxima, int T, int64_t n, int64_t m0,
                    int rows);

bool qkv_layout(QkvPackedOut& p) {
  if (p.d % kVec != 0) return false;
  p.sp = p.sp2 = round_up(p.seq, kVec);
  p.qk_head = (p.d / 4 + 2) * p.sp;
  p.v_head = p.sp / 4 * p.d + p.sp;
  p.q_off = 0;
  p.k_off = p.heads * p.qk_head;
  p.v_off = 2 * p.heads * p.qk_head;
  p.seq_words = p.v_off + p.heads * p.v_head;
  p.granule = p.d;  // per-(token, head) scales: the writer sees each head whole
  p.token_granule = 4;
  p.write_head = write_qkv_head;
  return true;
}

// The int32 codes of 16 tokens (lanes) of one channel, given the tokens' quantization: quant16's codes for every
// token without inf or NaN (those get other codes here, unread: their scale is NaN, so their outputs are NaN).
struct TokenQuant {
  __m512 inv;
  __mmask16 sub;  // amax subnormal (inv = inf): codes sign(x) x 127, as quant16
  __attribute__((always_inline)) __m512i codes(const float* x) const {
    const __m512 v = _mm512_load_ps(x);
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // |x inv| <= 127 (x <= amax)
    if (sub) {
      const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
      const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
      q = _mm512_mask_mov_epi32(q, sub, _mm512_setzero_si512());
      q = _mm512_mask_mov_epi32(q, sub & pos, _mm512_set1_epi32(127));
      q = _mm512_mask_mov_epi32(q, sub & neg, _mm512_set1_epi32(-127));
    }
    return q;
  }
};

// The head this thread is staging (attention.h, qkv_stage): [d][16 T] floats (channel c's tokens at c * 16 T), then
// T vectors of the tokens' running |x| maxima (as uint32).
thread_local float* t_head = nullptr;

// QkvPackedOut's writer (int8 layout above): channels n .. n + 15 as staged ([T][16 channels][16 tokens] floats)
// are kept, with the tokens' running maxima, until the head's last group arrives (the groups come in channel order,
// a call covering whole heads: granule = d); then each token vector of the head is quantized with tokens in the
// lanes (no transposes) and stored. Q, K: four channels' codes pack by saturation (two vpackssdw, one vpacksswb)
// into one byte lane per token and channel, and one vpshufb gathers each token's four. V (words of 4 keys of one
// channel): a vpshufb per channel gathers each 4 keys' codes into a word (one per 128-bit lane), placed by channel
// mod 4, and a 4x4 transpose of lanes puts 16 channels of one key group in a vector; where a vector's keys are not
// 4-aligned (a sequence boundary inside it, seq not a multiple of 4), each token's bytes go by byte-masked stores.
void quantize_head(const QkvPackedOut& p, const float* st, const float* maxima, int T, int64_t n, int64_t m0,
                   int rows);

void write_qkv_group(const QkvPackedOut& p, const float* staged, int T, int64_t n, int64_t m0, int rows) {
  const int64_t d = p.d, e0 = n % (p.heads * d) % d;
  const int64_t ld = 16 * T;
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  if (e0 == 0) t_head = qkv_stage(static_cast<size_t>((d + 1) * ld));
  float* st = t_head;
  float* maxima = st + d * ld;
  for (int t = 0; t < T; ++t) {
    __m512i m = e0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(maxima + t * kVec);
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      const __m512i v = _mm512_load_si512(staged + (t * 16 + c) * kVec);
      _mm512_store_si512(st + (e0 + c) * ld + t * kVec, v);
      m = _mm512_max_epu32(m, _mm512_and_si512(v, abs_mask));
    }
    _mm512_store_si512(maxima + t * kVec, m);
  }
  if (e0 + 16 < d) return;
  quantize_head(p, st, maxima, T, n - e0, m0, rows);
}

// QkvPackedOut::write_head for this layout: the caller (the AVX-512 Linear kernels) staged the whole head in
// head[c][16 T] itself, with the tokens' maxima, so no copy and no pass to find them: quantize_head as above.
void write_qkv_head(const QkvPackedOut& p, const float* head, const uint32_t* maxima, int T, int64_t n, int64_t m0,
                    int rows) {
  quantize_head(p, head, reinterpret_cast<const float*>(maxima), T, n, m0, rows);
}

// Channels n .. n + d - 1 (one whole head of Q, K or V) staged in st[c][16 T] with the tokens' |x| maxima: each
// token vector quantized and stored in the layout above.
void quantize_head(const QkvPackedOut& p, const float* st, const float* maxima, int T, int64_t n, int64_t m0,
                   int rows) {
  const int64_t d = p.d, width = p.heads * d;
  const int64_t part = n / width, h = n % width / d;
  const int64_t ld = 16 * T;
  // within each 128-bit lane: bytes (channel j, token k) at 4 j + k -> 4 k + j
  alignas(64) static const int8_t kTokenWords[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m512i token_words = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kTokenWords)));
  // byte 0 of dwords 0..3 of each 128-bit lane -> dword k of the lane, the rest zero
  constexpr int8_t Z = -128;
  alignas(64) static const int8_t kKeyWords[4][16] = {{0, 4, 8, 12, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z},
                                                      {Z, Z, Z, Z, 0, 4, 8, 12, Z, Z, Z, Z, Z, Z, Z, Z},
                                                      {Z, Z, Z, Z, Z, Z, Z, Z, 0, 4, 8, 12, Z, Z, Z, Z},
                                                      {Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 0, 4, 8, 12}};
  __m512i key_words[4];
  for (int k = 0; k < 4; ++k) {
    key_words[k] = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kKeyWords[k])));
  }
  const int64_t d4 = d / 4, sp = p.sp;
  for (int t = 0; t < T && 16 * t < rows; ++t) {
    const float* x = st + t * kVec;  // channel c's 16 tokens at x + c * ld
    const int lanes = rows - 16 * t < kVec ? rows - 16 * t : kVec;
    TokenQuant tq;
    __m512 scale;
    lane_quant(_mm512_load_si512(maxima + t * kVec), tq.inv, scale);
    tq.sub = _mm512_cmp_ps_mask(tq.inv, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_GT_OQ);
    // lanes lane .. lane + len - 1 are tokens i .. i + len - 1 of sequence b (a vector spans at most two: seq >= 32)
    for (int lane = 0; lane < lanes;) {
      const int64_t tok = p.token0 + m0 + 16 * t + lane;
      const int64_t b = tok / p.seq, i = tok % p.seq;
      const int len = static_cast<int>(lanes - lane < p.seq - i ? lanes - lane : p.seq - i);
      const __mmask16 run = static_cast<__mmask16>(mask16(lane + len) & ~mask16(lane)), keep = mask16(len);
      const auto place = [&](__m512i v) { return lane == 0 ? v : _mm512_maskz_compress_epi32(run, v); };
      uint32_t* head = p.base + b * p.seq_words + (part == 0 ? p.q_off : part == 1 ? p.k_off : p.v_off) +
                       h * (part < 2 ? p.qk_head : p.v_head);
      float* scales = reinterpret_cast<float*>(head + (part < 2 ? d4 * sp + (part == 1 ? sp : 0) : sp / 4 * d));
      _mm512_mask_storeu_ps(scales + i, keep, _mm512_castsi512_ps(place(_mm512_castps_si512(scale))));
      if (part < 2) {
        const __m512i flip = _mm512_set1_epi32(part == 0 ? static_cast<int>(0x80808080u) : 0);
        const __m512i ones = _mm512_set1_epi8(1);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t w = 0; w < d4; ++w) {
          const float* xc = x + 4 * w * ld;
          const __m512i c01 = _mm512_packs_epi32(tq.codes(xc), tq.codes(xc + ld));
          const __m512i c23 = _mm512_packs_epi32(tq.codes(xc + 2 * ld), tq.codes(xc + 3 * ld));
          const __m512i words = _mm512_shuffle_epi8(_mm512_packs_epi16(c01, c23), token_words);
          if (part == 1) sum = dpbusd(sum, ones, words);
          _mm512_mask_storeu_epi32(head + w * sp + i, keep, place(_mm512_xor_si512(words, flip)));
        }
        if (part == 1) _mm512_mask_storeu_epi32(head + d4 * sp + i, keep, place(_mm512_slli_epi32(sum, 7)));
      } else if (i % 4 == 0 && (len % 4 == 0 || i + len == p.seq)) {
        // whole groups of 4 keys (at the sequence's end, the last one's keys past seq are padding): words straight
        // from the run's lanes (moved down to lane 0 when it starts inside the vector: a sequence's start)
        for (int64_t c0 = 0; c0 < d; c0 += kVec) {
          __m512i w[4], out[4];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {  // w[j] lane g: the key group g words of channels c0 + 4 j .. c0 + 4 j + 3
            const float* xc = x + (c0 + 4 * j) * ld;
            const __m512i a = _mm512_shuffle_epi8(place(tq.codes(xc)), key_words[0]);
            const __m512i e = _mm512_shuffle_epi8(place(tq.codes(xc + ld)), key_words[1]);
            const __m512i g = _mm512_shuffle_epi8(place(tq.codes(xc + 2 * ld)), key_words[2]);
            const __m512i o = _mm512_shuffle_epi8(place(tq.codes(xc + 3 * ld)), key_words[3]);
            w[j] = _mm512_or_si512(_mm512_ternarylogic_epi32(a, e, g, 0xfe), o);
          }
          transpose_lanes4(w, out);
          for (int g = 0; g < (len + 3) / 4; ++g) _mm512_storeu_si512(head + (i / 4 + g) * d + c0, out[g]);
        }
      } else {
        // keys not 4-aligned in the lanes: each token's byte of its group's words, by byte-masked stores (a group
        // may be shared with another call or thread: only this token's bytes are written)
        for (int64_t c0 = 0; c0 < d; c0 += kVec) {
          __m512i r[16];
#pragma GCC unroll 16
          for (int c = 0; c < 16; ++c) r[c] = tq.codes(x + (c0 + c) * ld);
          transpose16(r);  // r[j]: channels c0 .. c0 + 15 of lane j
          for (int j = 0; j < len; ++j) {
            const int64_t k = i + j;
            const int byte = static_cast<int>(k % 4);
            _mm512_mask_storeu_epi8(head + (k / 4) * d + c0, __mmask64{0x1111111111111111ull} << byte,
                                    _mm512_slli_epi32(r[lane + j], 8 * byte));
          }
        }
      }
      if (part == 2 && i + len == p.seq) {  // padding keys: scale 0 (their probability is 0, and 0 x NaN is not)
        for (int64_t k = p.seq; k < sp; ++k) scales[k] = 0.0f;
      }
      lane += len;
    }
  }
}

void item(const AttnItem& a, void* scratch) {
  const int64_t d = a.d;
  const int64_t s = a.causal ? (a.q1 < a.s ? a.q1 : a.s) : a.s;  // keys any row of this item may see
  const Layout L(d, a.s);
  char* base = static_cast<char*>(scratch);
  uint32_t* qw = reinterpret_cast<uint32_t*>(base + L.q_off);
  float* qs = reinterpret_cast<float*>(base + L.qs_off);
  float* sc = reinterpret_cast<float*>(base + L.s_off);
  uint8_t* pc = reinterpret_cast<uint8_t*>(base + L.p_off);
  float* div = reinterpret_cast<float*>(base + L.l_off);
  float* ps = reinterpret_cast<float*>(base + L.ps_off);
  int8_t* codes = reinterpret_cast<int8_t*>(base + L.c_off);
  const bool packed = a.kp != nullptr;  // Q, K, V written by write_qkv_group (its layout's sp is L.sp, d is L.dv)
  const uint32_t *kp, *vp;
  const int32_t* kc;
  const float *ks, *vs;
  if (packed) {
    kp = a.kp;
    kc = reinterpret_cast<const int32_t*>(kp + L.d4 * L.sp);
    ks = reinterpret_cast<const float*>(kc + L.sp);
    vp = a.vp;
    vs = reinterpret_cast<const float*>(vp + L.sp / 4 * L.dv);
  } else {
    uint32_t* kbuf = reinterpret_cast<uint32_t*>(base + L.k_off);
    int32_t* kcbuf = reinterpret_cast<int32_t*>(base + L.kc_off);
    float* ksbuf = reinterpret_cast<float*>(base + L.ks_off);
    uint32_t* vbuf = reinterpret_cast<uint32_t*>(base + L.v_off);
    float* vsbuf = reinterpret_cast<float*>(base + L.vs_off);
    pack_k(a.k, a.ldk, s, d, L, kbuf, kcbuf, ksbuf, codes);
    pack_v(a.v, a.ldv, s, d, L, vbuf, vsbuf, codes);
    kp = kbuf;
    kc = kcbuf;
    ks = ksbuf;
    vp = vbuf;
    vs = vsbuf;
  }
  const int64_t pst = L.sp / 4;  // words per probability row
  // Without a mask (nor causality) every row sees keys 0..s-1: qk_block finds the rows' maxima as it writes the
  // scores, and a NaN score can only come from a NaN scale (Q's per row, K's over the keys)
  const bool unmasked = !a.causal && a.mask_kind == kMaskNone;
  float* rmax = reinterpret_cast<float*>(base + L.m_off);
  const bool ks_nan = unmasked && any_nan(ks, s);  // (keys past s: whatever the writer left, never read)
  for (int64_t i0 = a.q0; i0 < a.q1; i0 += kBlock) {
    const int nb = static_cast<int>(a.q1 - i0 < kBlock ? a.q1 - i0 : kBlock);
    const int nbp = static_cast<int>(round_up(nb, kRows));
    // Q's words: packed, read in place ([d4][sp]); else quantized here, row-major
    const uint32_t* qsrc = packed ? a.qp + i0 : qw;
    const int64_t q_rs = packed ? 1 : L.qst, q_ws = packed ? L.sp : 1;
    if (packed) {
      const float* qscale = reinterpret_cast<const float*>(a.qp + L.d4 * L.sp) + i0;
      for (int r = 0; r < nbp; ++r) qs[r] = r < nb ? qscale[r] * a.scale : 0.0f;  // (padding rows' scores unused)
    }
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int r0 = 0; r0 < nbp && !packed; r0 += kVec) {  // Q codes + 128, row-major (padding rows: code 0, scale 0)
      const int n = nb - r0 < kVec ? (nb - r0 > 0 ? nb - r0 : 0) : kVec;
      quant16(a.q + (i0 + r0) * a.ldq, a.ldq, n, d, L.dq, codes, qs + r0);
      for (int t = 0; t < kVec && r0 + t < nbp; ++t) {
        qs[r0 + t] *= a.scale;
        for (int64_t w = 0; w < L.d4; w += kVec) {
          const __m512i c = _mm512_load_si512(codes + t * L.dq + 4 * w);
          _mm512_store_si512(qw + (r0 + t) * L.qst + w, _mm512_xor_si512(c, flip));
        }
      }
    }
    const int64_t keys_blk = a.causal ? (i0 + nb < s ? i0 + nb : s) : s;
    const int64_t nvec = (keys_blk + kVec - 1) / kVec;
    const bool vs_nan = any_nan(vs, nvec * kVec);
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < nvec; c0 += kCols) {
        const uint32_t* q = qsrc + r0 * q_rs;
        float* so = sc + r0 * L.sp + c0 * kVec;
        const uint32_t* kk = kp + c0 * kVec;
        const int32_t* kcc = kc + c0 * kVec;
        const float* kss = ks + c0 * kVec;
        float* rm = unmasked ? rmax + r0 * kVec : nullptr;
        const int64_t nc = nvec - c0 < kCols ? nvec - c0 : kCols;
        const __mmask16 tail = mask16(keys_blk - (c0 + nc - 1) * kVec);
        switch (nc) {
          case 1: qk_block<1>(q, q_rs, q_ws, L.d4, kk, L.sp, kcc, kss, qs + r0, so, rm, c0 == 0, tail); break;
          case 2: qk_block<2>(q, q_rs, q_ws, L.d4, kk, L.sp, kcc, kss, qs + r0, so, rm, c0 == 0, tail); break;
          case 3: qk_block<3>(q, q_rs, q_ws, L.d4, kk, L.sp, kcc, kss, qs + r0, so, rm, c0 == 0, tail); break;
          default: qk_block<4>(q, q_rs, q_ws, L.d4, kk, L.sp, kcc, kss, qs + r0, so, rm, c0 == 0, tail); break;
        }
      }
    }
    for (int r = nb; r < nbp; ++r) {  // padding rows: probability codes 0
      std::memset(pc + r * L.sp, 0, static_cast<size_t>(L.sp));
      ps[r] = 0.0f;
      div[r] = 1.0f;
    }
    for (int r = 0; r < nb;) {
      const int64_t i = i0 + r;
      // rows over the same keys go four at a time (causal rows each have their own)
      const int R = a.causal ? 1 : (nb - r >= 4 ? 4 : 1);
      const void* mrows[4] = {nullptr, nullptr, nullptr, nullptr};
      for (int t = 0; t < R && a.mask_kind != kMaskNone; ++t) {
        const size_t elem = a.mask_kind == kMaskAdd ? sizeof(float) : 1;
        mrows[t] = static_cast<const char*>(a.mask) + static_cast<size_t>((i + t) * a.mask_ld) * elem;
      }
      const int64_t keys = a.causal ? (i + 1 < s ? i + 1 : s) : s;
      // (L.sp floats per score row and L.sp bytes per code row: one stride serves both, in their own units)
      float* srow = sc + r * L.sp;
      uint8_t* prow = pc + r * L.sp;
      const float* rm = unmasked ? rmax + r * kVec : nullptr;
      int nan_rows = 0;
      for (int t = 0; t < R && unmasked; ++t) nan_rows |= (ks_nan || std::isnan(qs[r + t])) << t;
      if (R == 4) {
        softmax_rows<4>(srow, L.sp, nvec, keys, a.mask_kind, mrows, vs, vs_nan, prow, div + r, ps + r, rm, nan_rows);
      } else {
        softmax_rows<1>(srow, L.sp, nvec, keys, a.mask_kind, mrows, vs, vs_nan, prow, div + r, ps + r, rm, nan_rows);
      }
      r += R;
    }
    const int64_t kw = (keys_blk + 3) / 4;
    const uint32_t* pw = reinterpret_cast<const uint32_t*>(pc);
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 * kVec < d; c0 += kCols) {
        const uint32_t* p = pw + r0 * pst;
        const uint32_t* vv = vp + c0 * kVec;
        float* o = a.out + (i0 + r0) * a.ldo + c0 * kVec;
        const int nrows = nb - r0;
        const int64_t dleft = d - c0 * kVec;
        const int64_t nv = L.dv / kVec - c0;
        switch (nv < kCols ? nv : kCols) {
          case 1: pv_block<1>(p, pst, kw, vv, L.dv, div + r0, ps + r0, nrows, o, a.ldo, dleft); break;
          case 2: pv_block<2>(p, pst, kw, vv, L.dv, div + r0, ps + r0, nrows, o, a.ldo, dleft); break;
          case 3: pv_block<3>(p, pst, kw, vv, L.dv, div + r0, ps + r0, nrows, o, a.ldo, dleft); break;
          default: pv_block<4>(p, pst, kw, vv, L.dv, div + r0, ps + r0, nrows, o, a.ldo, dleft); break;
        }
      }
    }
  }
}

const AttnKernels kTable = {"avx512_vnni_int8", scratch_bytes, item, nullptr, write_qkv_group, qkv_layout, nullptr,
                            true};

}  // namespace

const AttnKernels* attn_avx512_int8_kernels() { return &kTable; }

}  // namespace hf_sparse
