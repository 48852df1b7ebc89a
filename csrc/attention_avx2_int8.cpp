// AVX2 int8 attention (compiled with -mavx2 -mfma only): the int8 attention on CPUs without AVX-512.
//
// The numerics of docs/kernels.md ("int8 attention"), which attention_int8_scalar.cpp states plainly: Q, K and V
// quantized per (token, head) like the Linears' activations, both products exact int32 sums, the softmax in float32
// between them. AVX2 has no u8 x s8 product that is exact (vpmaddubsw saturates at 16 bits), so the codes are
// widened to int16 and multiplied in pairs by vpmaddwd (16 multiply-adds per instruction, twice the fp32 FMA's 8):
//
//   S = Q K^T: lanes are 8 keys. K codes are packed transposed, [d/2][keys] words of two s16 (features 2w, 2w + 1);
//              each query row's word (the same two features) is broadcast.
//   O = P V:   lanes are 8 head features. V codes are packed [keys/2][d] words of two s16 (keys 2j, 2j + 1); each
//              query row's word of two probability codes (0 .. 255) is broadcast.
//
// Blocks of 32 query rows keep their float32 scores and probability codes in L1; register blocks are 4 rows x 2
// vectors (8 accumulators, 2 loads and a broadcast in the 16 registers).
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "attention.h"
#include "avx2_common.h"

namespace hf_sparse {
namespace {

constexpr int kVec = 8;
constexpr int kRows = 4;    // query rows per register block
constexpr int kBlock = 32;  // query rows per block (a multiple of kRows)
constexpr int kCols = 2;    // vectors per register block

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Scratch of one thread, in 64-byte aligned pieces.
struct Layout {
  int64_t d2, sp, dv;  // words per Q/K row (2 features each), keys padded to 8, features padded to 8
  size_t k_off, ks_off, v_off, vs_off, q_off, qs_off, s_off, p_off, l_off, ps_off, c_off, bytes;
  Layout(int64_t d, int64_t s) {
    d2 = (d + 1) / 2;
    sp = round_up(s, kVec);
    dv = round_up(d, kVec);
    const auto a64 = [](int64_t b) { return (static_cast<size_t>(b) + 63) & ~size_t{63}; };
    k_off = 0;
    ks_off = k_off + a64(d2 * sp * 4);     // K codes: [d2][sp] words
    v_off = ks_off + a64(sp * 4);          // key scales
    vs_off = v_off + a64(sp / 2 * dv * 4);  // V codes: [sp/2][dv] words
    q_off = vs_off + a64(sp * 4);          // V scales
    qs_off = q_off + a64(kBlock * d2 * 4);  // Q codes: [kBlock][d2] words
    s_off = qs_off + a64(kBlock * 4);      // Q scale x the call's scale, per row
    p_off = s_off + a64(kBlock * sp * 4);  // scores, then p x V's scale: [kBlock][sp] floats
    l_off = p_off + a64(kBlock * sp / 2 * 4);  // probability codes: [kBlock][sp/2] words
    ps_off = l_off + a64(kBlock * 4);      // row sums of p
    c_off = ps_off + a64(kBlock * 4);      // probability scales
    bytes = c_off + a64(2 * dv * 2);       // codes of two rows (int16)
  }
};

size_t scratch_bytes(int64_t d, int64_t s, int64_t) { return Layout(d, s).bytes; }

// x[0 .. d - 1] -> codes c[0 .. dv - 1] (int16, clamp(round(x * inv), -127, 127), zero past d) with numerics'
// quantize_activation_int8 parameters; returns the scale (NaN for a row holding inf or NaN: its codes are unread).
float quantize(const float* x, int64_t d, int64_t dv, int16_t* c) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < d; i += kVec) {
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(load_n(x + i, d - i)), abs_mask));
  }
  __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4e));
  m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xb1));
  const uint32_t bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
  float amax;
  std::memcpy(&amax, &bits, sizeof(amax));
  const bool bad = bits >= 0x7f800000u;
  const float inv = !bad && amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t i = 0; i < dv; i += 2 * kVec) {  // (dv is a multiple of 8; the second half may be past it)
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load_n(x + i, d - i), vinv));  // round half to even
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load_n(x + i + kVec, d - i - kVec), vinv));
    const __m256i ab = _mm256_packs_epi32(_mm256_min_epi32(_mm256_max_epi32(a, lo), hi),
                                          _mm256_min_epi32(_mm256_max_epi32(b, lo), hi));
    const __m256i codes = _mm256_permute4x64_epi64(ab, 0xd8);  // (packs works per 128-bit lane)
    if (i + 2 * kVec <= dv) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i), codes);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + i), _mm256_castsi256_si128(codes));
    }
  }
  if (!(inv <= std::numeric_limits<float>::max())) {  // amax subnormal: inv = inf, codes sign(x) * 127 (torch)
    for (int64_t i = 0; i < d; ++i) c[i] = static_cast<int16_t>(x[i] > 0.0f ? 127 : (x[i] < 0.0f ? -127 : 0));
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
}

// K rows 0..s-1 -> kp[w][j] = the s16 codes of k[j][2w], k[j][2w + 1]; ks[j] = the key's scale; V rows -> vp[j2][e]
// = the s16 codes of v[2 j2][e], v[2 j2 + 1][e]; vs[j] = the key's scale. Zero past s (up to sp) and past d.
void pack_kv(const AttnItem& a, int64_t s, int64_t d, const Layout& L, uint32_t* kp, float* ks, uint32_t* vp,
             float* vs, int16_t* codes) {
  std::memset(kp, 0, static_cast<size_t>(L.d2 * L.sp) * 4);
  for (int64_t j = 0; j < s; ++j) {
    ks[j] = quantize(a.k + j * a.ldk, d, L.dv, codes);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(codes);  // (feature 2w in the low half)
    for (int64_t w = 0; w < L.d2; ++w) kp[w * L.sp + j] = words[w];
  }
  for (int64_t j = s; j < L.sp; ++j) ks[j] = vs[j] = 0.0f;
  int16_t* odd = codes + L.dv;
  for (int64_t j = 0; j < L.sp; j += 2) {
    if (j < s) {
      vs[j] = quantize(a.v + j * a.ldv, d, L.dv, codes);
    } else {
      std::memset(codes, 0, static_cast<size_t>(L.dv) * 2);
    }
    if (j + 1 < s) {
      vs[j + 1] = quantize(a.v + (j + 1) * a.ldv, d, L.dv, odd);
    } else {
      std::memset(odd, 0, static_cast<size_t>(L.dv) * 2);
    }
    uint32_t* dst = vp + j / 2 * L.dv;
    for (int64_t e = 0; e < L.dv; e += kVec) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + e));
      const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(odd + e));
      const __m256i words = _mm256_set_m128i(_mm_unpackhi_epi16(x, y), _mm_unpacklo_epi16(x, y));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e), words);
    }
  }
}

// acc[r][c] = sum over w < n of a[r * a_rs + w] (2 s16 values, broadcast) . b[w * b_ws + 8c + lane] (2 s16 values
// per lane): the int32 products of both attention products (Q K^T and P V), kRows rows x C vectors.
template <int C>
__attribute__((always_inline)) inline void dot_rows(const uint32_t* a, int64_t a_rs, int64_t n, const uint32_t* b,
                                                    int64_t b_ws, __m256i (&acc)[kRows][C]) {
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
  }
  for (int64_t w = 0; w < n; ++w) {
    __m256i bv[C];
    for (int c = 0; c < C; ++c) bv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + w * b_ws + c * kVec));
    for (int r = 0; r < kRows; ++r) {
      const __m256i ab = _mm256_set1_epi32(static_cast<int>(a[r * a_rs + w]));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(ab, bv[c]));
    }
  }
}

// Scores of kRows query rows x C key vectors: sc[r][8c + lane] = (float(sum_w q[r][w] . kp[w][8c + lane]) x qs[r])
// x ks[8c + lane].
template <int C>
void qk_block(const uint32_t* qw, int64_t d2, const uint32_t* kp, int64_t sp, const float* ks, const float* qs,
              float* sc) {
  __m256i acc[kRows][C];
  dot_rows<C>(qw, d2, d2, kp, sp, acc);
  for (int r = 0; r < kRows; ++r) {
    const __m256 rs = _mm256_set1_ps(qs[r]);
    for (int c = 0; c < C; ++c) {
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][c]), rs);
      _mm256_store_ps(sc + r * sp + c * kVec, _mm256_mul_ps(v, _mm256_load_ps(ks + c * kVec)));
    }
  }
}

// Outputs of kRows query rows x C feature vectors: out[r][8c + lane] = (float(sum_j2 p[r][j2] . vp[j2][8c + lane])
// x ps[r]) / div[r]; only rows < nrows and features < dleft are stored.
template <int C>
void pv_block(const uint32_t* pw, int64_t pst, int64_t kw, const uint32_t* vp, int64_t dv, const float* div,
              const float* ps, int nrows, float* out, int64_t ldo, int64_t dleft) {
  __m256i acc[kRows][C];
  dot_rows<C>(pw, pst, kw, vp, dv, acc);
  for (int r = 0; r < kRows && r < nrows; ++r) {
    const __m256 sc = _mm256_set1_ps(ps[r]), dv_ = _mm256_set1_ps(div[r]);
    for (int c = 0; c < C; ++c) {
      const __m256 o = _mm256_div_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][c]), sc), dv_);
      store_n(out + r * ldo + c * kVec, dleft - c * kVec, o);
    }
  }
}

// Softmax of one row of scores (keys 0..keys-1 valid, nvec vectors), then its probability codes as word pairs
// (pw: nvec x 4 words, key 2j in the low half): p = exp(s - max s), w = p x vs, codes round(w x ((1 / max w) x 255)).
// Sets *scale = max w / 255 and returns the sum of p (+inf when every key is masked, NaN when a score or a w is NaN:
// the row comes out 0 or NaN).
float softmax_row(float* sc, int64_t nvec, int64_t keys, int mask_kind, const void* mask, const float* vs,
                  uint32_t* pw, float* scale) {
  const float inf = std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(-inf);
  __m256 m = ninf, nan = _mm256_setzero_ps();
  for (int64_t c = 0; c < nvec; ++c) {
    const int64_t j0 = c * kVec;
    const __m256 v = masked_scores(_mm256_load_ps(sc + j0), j0, keys, mask_kind, mask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);
    _mm256_store_ps(sc + j0, v);
  }
  const float mx = hmax(m);
  __m256 l = _mm256_setzero_ps(), wm = _mm256_setzero_ps();
  if (!_mm256_movemask_ps(nan) && mx != -inf) {
    const __m256 vm = _mm256_set1_ps(mx);
    for (int64_t c = 0; c < nvec; ++c) {
      const __m256 p = exp_ps(_mm256_sub_ps(_mm256_load_ps(sc + c * kVec), vm));
      l = _mm256_add_ps(l, p);
      const __m256 w = _mm256_mul_ps(p, _mm256_load_ps(vs + c * kVec));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(w, w, _CMP_UNORD_Q));
      wm = _mm256_max_ps(wm, w);
      _mm256_store_ps(sc + c * kVec, w);
    }
  }
  const bool bad = _mm256_movemask_ps(nan) != 0, skip = bad || mx == -inf;
  const float wmax = hmax(wm);
  *scale = skip ? 0.0f : wmax / 255.0f;
  const float inv = !skip && wmax > 0.0f ? (1.0f / wmax) * 255.0f : 0.0f;
  const __m256 winv = _mm256_set1_ps(inv), top = _mm256_set1_ps(255.0f), zero = _mm256_setzero_ps();
  for (int64_t c = 0; c < nvec; c += 2) {  // 16 codes: two vectors packed to s16 pairs
    __m256i q[2];
    for (int k = 0; k < 2; ++k) {
      if (skip || c + k >= nvec) {
        q[k] = _mm256_setzero_si256();
        continue;
      }
      const __m256 w = _mm256_load_ps(sc + (c + k) * kVec);
      const __m256 pos = _mm256_cmp_ps(w, zero, _CMP_GT_OQ);
      const __m256 x = _mm256_min_ps(_mm256_and_ps(pos, _mm256_mul_ps(w, winv)), top);  // inv = inf: 255 if w > 0
      q[k] = _mm256_cvtps_epi32(x);
    }
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
    if (c + 2 <= nvec) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw + c * kVec / 2), words);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pw + c * kVec / 2), _mm256_castsi256_si128(words));
    }
  }
  if (skip) return bad ? std::numeric_limits<float>::quiet_NaN() : inf;
  return hsum(l);
}

void item(const AttnItem& a, void* scratch) {
  const int64_t d = a.d;
  const int64_t s = a.causal ? (a.q1 < a.s ? a.q1 : a.s) : a.s;  // keys any row of this item may see
  const Layout L(d, a.s);
  char* base = static_cast<char*>(scratch);
  uint32_t* kp = reinterpret_cast<uint32_t*>(base + L.k_off);
  float* ks = reinterpret_cast<float*>(base + L.ks_off);
  uint32_t* vp = reinterpret_cast<uint32_t*>(base + L.v_off);
  float* vs = reinterpret_cast<float*>(base + L.vs_off);
  uint32_t* qw = reinterpret_cast<uint32_t*>(base + L.q_off);
  float* qs = reinterpret_cast<float*>(base + L.qs_off);
  float* sc = reinterpret_cast<float*>(base + L.s_off);
  uint32_t* pw = reinterpret_cast<uint32_t*>(base + L.p_off);
  float* div = reinterpret_cast<float*>(base + L.l_off);
  float* ps = reinterpret_cast<float*>(base + L.ps_off);
  int16_t* codes = reinterpret_cast<int16_t*>(base + L.c_off);
  pack_kv(a, s, d, L, kp, ks, vp, vs, codes);
  const int64_t pst = L.sp / 2;  // words per probability row
  for (int64_t i0 = a.q0; i0 < a.q1; i0 += kBlock) {
    const int nb = static_cast<int>(a.q1 - i0 < kBlock ? a.q1 - i0 : kBlock);
    const int nbp = static_cast<int>(round_up(nb, kRows));
    for (int r = 0; r < nbp; ++r) {  // Q codes, row-major (padding rows: code 0, scale 0)
      if (r < nb) {
        qs[r] = quantize(a.q + (i0 + r) * a.ldq, d, L.dv, codes) * a.scale;
        std::memcpy(qw + r * L.d2, codes, static_cast<size_t>(L.d2) * 4);
      } else {
        qs[r] = 0.0f;
        std::memset(qw + r * L.d2, 0, static_cast<size_t>(L.d2) * 4);
      }
    }
    const int64_t keys_blk = a.causal ? (i0 + nb < s ? i0 + nb : s) : s;
    const int64_t nvec = (keys_blk + kVec - 1) / kVec;
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < nvec; c0 += kCols) {
        float* so = sc + r0 * L.sp + c0 * kVec;
        if (nvec - c0 >= kCols) {
          qk_block<kCols>(qw + r0 * L.d2, L.d2, kp + c0 * kVec, L.sp, ks + c0 * kVec, qs + r0, so);
        } else {
          qk_block<1>(qw + r0 * L.d2, L.d2, kp + c0 * kVec, L.sp, ks + c0 * kVec, qs + r0, so);
        }
      }
    }
    for (int r = 0; r < nbp; ++r) {
      if (r >= nb) {  // padding rows: probability codes 0
        std::memset(pw + r * pst, 0, static_cast<size_t>(pst) * 4);
        ps[r] = 0.0f;
        div[r] = 1.0f;
        continue;
      }
      const int64_t i = i0 + r;
      const int64_t keys = a.causal ? (i + 1 < s ? i + 1 : s) : s;
      const void* mrow = nullptr;
      if (a.mask_kind == kMaskAdd) mrow = static_cast<const float*>(a.mask) + i * a.mask_ld;
      if (a.mask_kind == kMaskKeep) mrow = static_cast<const uint8_t*>(a.mask) + i * a.mask_ld;
      div[r] = softmax_row(sc + r * L.sp, nvec, keys, a.mask_kind, mrow, vs, pw + r * pst, ps + r);
    }
    const int64_t kw = (keys_blk + 1) / 2;
    const int64_t nvd = L.dv / kVec;
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < nvd; c0 += kCols) {
        const uint32_t* p = pw + r0 * pst;
        const uint32_t* vv = vp + c0 * kVec;
        float* o = a.out + (i0 + r0) * a.ldo + c0 * kVec;
        const int nrows = nb - r0;
        const int64_t dleft = d - c0 * kVec;
        if (nvd - c0 >= kCols) {
          pv_block<kCols>(p, pst, kw, vv, L.dv, div + r0, ps + r0, nrows, o, a.ldo, dleft);
        } else {
          pv_block<1>(p, pst, kw, vv, L.dv, div + r0, ps + r0, nrows, o, a.ldo, dleft);
        }
      }
    }
  }
}

const AttnKernels kTable = {"avx2_int8", scratch_bytes, item, nullptr, nullptr, nullptr, nullptr, true};

}  // namespace

const AttnKernels* attn_avx2_int8_kernels() { return &kTable; }

}  // namespace hf_sparse
