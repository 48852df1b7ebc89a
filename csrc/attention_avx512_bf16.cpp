// AVX-512 BF16 attention (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 only).
//
// vdpbf16ps multiplies 16 lanes of bfloat16 pairs and adds both products to a float32 accumulator: 32
// multiply-adds per instruction, twice an fp32 FMA's. Both products of the attention are laid out for it:
//
//   S = Q K^T: lanes are 16 keys. K is packed transposed, [d/2][keys][2] bf16 (one 64-byte line = 16 keys x one
//              pair of head features); each query row's feature pair is broadcast (Q rows as bf16, row-major).
//   O = P V:   lanes are 16 head features. V is packed [keys/2][d][2] bf16 (a line = 16 features x one pair of
//              keys); each query row's pair of probabilities is broadcast (P rows as bf16, row-major).
//
// A block of 32 query rows has its scores (float32) and probabilities (bf16) in L1; register blocks are 4 query
// rows x 4 vectors (16 accumulators: 4 loads and 4 broadcasts per 16 vdpbf16ps). The softmax runs in float32
// between the two products, and the division by the row sum in the second one's epilogue.
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
// acc += a.bf16[2i] * b.bf16[2i] + a.bf16[2i+1] * b.bf16[2i+1] per lane. Inline asm keeps the accumulator in its
// register (as for vpdpbusd in kernels_avx512.cpp).
inline __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
#if defined(__GNUC__)
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
#else
  return _mm512_dpbf16_ps(acc, _mm512_castsi512_pbh(a), _mm512_castsi512_pbh(b));
#endif
}

// 32 floats -> 32 bf16 (round to nearest even): lo's 16 in the low half, hi's in the high half.
inline __m512i bf16x32(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }
inline __m256i bf16x16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// Scratch of one thread, in 64-byte aligned pieces.
struct Layout {
  int64_t pairs, sp, sp2, dv;  // feature pairs, keys padded to 16 and to 32, feature vectors
  size_t k_off, v_off, q_off, s_off, p_off, l_off, bytes;
  Layout(int64_t d, int64_t s) {
    pairs = (d + 1) / 2;
    sp = round_up(s, kVec);
    sp2 = round_up(s, 2 * kVec);
    dv = (d + kVec - 1) / kVec;
    const auto a64 = [](size_t b) { return (b + 63) & ~size_t{63}; };
    k_off = 0;
    v_off = k_off + a64(static_cast<size_t>(pairs * sp) * 4);              // K: [pairs][sp] words
    q_off = v_off + a64(static_cast<size_t>(sp2 / 2 * dv * kVec) * 4);      // V: [sp2/2][dv*16] words
    s_off = q_off + a64(static_cast<size_t>(kBlock * pairs) * 4);          // Q: [kBlock][pairs] words
    p_off = s_off + a64(static_cast<size_t>(kBlock * sp) * 4);             // scores: [kBlock][sp] floats
    l_off = p_off + a64(static_cast<size_t>(kBlock * sp2 / 2) * 4);        // P: [kBlock][sp2/2] words
    bytes = l_off + a64(kBlock * sizeof(float));                            // row divisors
  }
};

size_t scratch_bytes(int64_t d, int64_t s, int64_t) { return Layout(d, s).bytes; }

// K rows 0..s-1 -> kp[w][j] = (bf16 k[j][2w], bf16 k[j][2w+1]), zero past s (up to sp) and past d.
void pack_k(const float* k, int64_t ldk, int64_t s, int64_t d, const Layout& L, uint32_t* kp) {
  for (int64_t j0 = 0; j0 < L.sp; j0 += kVec) {
    for (int64_t w0 = 0; w0 < L.pairs; w0 += kVec) {
      __m512i r[16];
      const int64_t f0 = 2 * w0;
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        if (j0 + t < s) {
          const float* row = k + (j0 + t) * ldk + f0;
          r[t] = bf16x32(_mm512_maskz_loadu_ps(mask16(d - f0), row),
                         _mm512_maskz_loadu_ps(mask16(d - f0 - kVec), row + kVec));
        } else {
          r[t] = _mm512_setzero_si512();
        }
      }
      transpose16(r);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        if (w0 + t < L.pairs) _mm512_store_si512(kp + (w0 + t) * L.sp + j0, r[t]);
      }
    }
  }
}

// V rows 0..s-1 -> vp[jp][c] = (bf16 v[2jp][c], bf16 v[2jp+1][c]), zero past s (up to sp2) and past d.
void pack_v(const float* v, int64_t ldv, int64_t s, int64_t d, const Layout& L, uint32_t* vp) {
  // bf16 element 2t of the output is element t of the first row, 2t+1 element t of the second.
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  const int64_t words = L.dv * kVec;
  for (int64_t jp = 0; jp < L.sp2 / 2; ++jp) {
    const int64_t j = 2 * jp;
    for (int64_t c = 0; c < L.dv; ++c) {
      const __mmask16 m = mask16(d - c * kVec);
      const __m512 a = j < s ? _mm512_maskz_loadu_ps(m, v + j * ldv + c * kVec) : _mm512_setzero_ps();
      const __m512 b = j + 1 < s ? _mm512_maskz_loadu_ps(m, v + (j + 1) * ldv + c * kVec) : _mm512_setzero_ps();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16(a)), bf16x16(b), 1);
      _mm512_store_si512(vp + jp * words + c * kVec, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// Scores of kRows query rows x C key vectors: sc[r][16c + lane] = (sum_w q[r][w] . kp[w][16c + lane]) * scale,
// with Q's word (r, w) at qw[w * qs + r * qr] (the item's bf16 Q rows, or the packed Q of QkvPackedOut).
template <int C>
void qk_block(const uint32_t* qw, int64_t qs, int64_t qr, int64_t pairs, const uint32_t* kp, int64_t sp, float scale,
              float* sc) {
  __m512 acc[kRows][C];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t w = 0; w < pairs; ++w) {
    __m512i kv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) kv[c] = _mm512_load_si512(kp + w * sp + c * kVec);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i qb = _mm512_set1_epi32(static_cast<int>(qw[w * qs + r * qr]));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = dpbf16(acc[r][c], qb, kv[c]);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_store_ps(sc + r * sp + c * kVec, _mm512_mul_ps(acc[r][c], vscale));
  }
}

// Outputs of kRows query rows x C feature vectors: out[r][16c + lane] = sum_jp p[r][jp] . vp[jp][16c + lane],
// divided by the row's divisor; only rows < nrows and features < d are stored.
template <int C>
void pv_block(const uint32_t* pw, int64_t pst, int64_t key_pairs, const uint32_t* vp, int64_t vst, const float* div,
              int nrows, float* out, int64_t ldo, int64_t dleft) {
  __m512 acc[kRows][C];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t jp = 0; jp < key_pairs; ++jp) {
    __m512i vv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) vv[c] = _mm512_load_si512(vp + jp * vst + c * kVec);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i pb = _mm512_set1_epi32(static_cast<int>(pw[r * pst + jp]));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = dpbf16(acc[r][c], pb, vv[c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    if (r >= nrows) break;
    const __m512 dv = _mm512_set1_ps(div[r]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      _mm512_mask_storeu_ps(out + r * ldo + c * kVec, mask16(dleft - c * kVec), _mm512_div_ps(acc[r][c], dv));
    }
  }
}

// Softmax of one row of scaled scores (keys 0..keys-1 valid; sc holds sp floats), in place: writes the bf16
// probabilities (row of sp2/2 words) and returns the divisor: the sum of the float32 probabilities, +inf when every
// key is masked (the row comes out 0), NaN when a score is NaN (the row comes out NaN). The first pass writes back
// only vectors it changes (a mask, or keys past the end).
float softmax_row(float* sc, int64_t nvec, int64_t keys, int mask_kind, const void* mask, uint32_t* pw,
                  int64_t pwords) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = ninf;
  __mmask16 nan = 0;
  for (int64_t c = 0; c < nvec; ++c) {
    const __mmask16 valid = mask16(keys - c * kVec);
    const __m512 v = masked_scores(_mm512_load_ps(sc + c * kVec), valid, mask_kind, mask, c * kVec);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
    if (mask_kind != kMaskNone || valid != 0xffff) _mm512_store_ps(sc + c * kVec, v);
  }
  const float mx = _mm512_reduce_max_ps(m);
  if (nan || mx == -std::numeric_limits<float>::infinity()) {
    std::memset(pw, 0, static_cast<size_t>(pwords) * 4);
    return nan ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  }
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 l = _mm512_setzero_ps();
  for (int64_t c = 0; c < nvec; c += 2) {
    const __m512 p0 = exp_ps(_mm512_sub_ps(_mm512_load_ps(sc + c * kVec), vm));
    const __m512 p1 = c + 1 < nvec ? exp_ps(_mm512_sub_ps(_mm512_load_ps(sc + (c + 1) * kVec), vm))
                                   : _mm512_setzero_ps();
    l = _mm512_add_ps(l, _mm512_add_ps(p0, p1));
    _mm512_storeu_si512(pw + c * (kVec / 2), bf16x32(p0, p1));
  }
  return _mm512_reduce_add_ps(l);
}

// 16 lanes of bf16 pairs: word i = (bf16 lo[i], bf16 hi[i]), lo in the low half (as pack_k and pack_v write them).
inline __m512i pairs16(__m512 lo, __m512 hi) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), bf16x32(lo, hi));
}

// QkvPackedOut's writer (common.h): channels n .. n + 15 of the Q/K/V product for tokens m0 .. m0 + rows - 1 of the
// call, staged as [T token vectors][16 channels][16 tokens] floats. Q and K: each pair of channels is one row of
// words with the tokens in lanes, as staged (no transpose); a vector of tokens may span sequences, and each run
// of one sequence is stored under its own mask. V: the 16 channels of each token (a 16x16 transpose per token
// vector) go to a line of token pairs, both tokens in one store when the pair is in the vector, else each its
// half. Padding: Q and K's is left as it is (the scores of keys past seq are never read: the softmax masks them,
// and rows past the queries are dropped); V is read up to the pair of the last token, whose second half, for an
// odd seq, is written 0 with it (its probability is 0, but 0 x NaN would not be).
void write_qkv_group(const QkvPackedOut& p, const float* staged, int T, int64_t n, int64_t m0, int rows) {
  const int64_t width = p.heads * p.d;
  const int64_t part = n / width, f = n % width, h = f / p.d, e0 = f % p.d;
  const __m512 zero = _mm512_setzero_ps();
  for (int t = 0; t < T && 16 * t < rows; ++t) {
    const float* g = staged + t * 16 * kVec;
    const int lanes = rows - 16 * t < kVec ? rows - 16 * t : kVec;
    const int64_t tok = p.token0 + m0 + 16 * t;  // the chunk's token in lane 0
    if (part < 2) {
      __m512i words[8];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        words[c] = pairs16(_mm512_load_ps(g + 2 * c * kVec), _mm512_load_ps(g + (2 * c + 1) * kVec));
      }
      for (int lane = 0; lane < lanes;) {
        const int64_t b = (tok + lane) / p.seq, i = (tok + lane) % p.seq;
        const int len = static_cast<int>(lanes - lane < p.seq - i ? lanes - lane : p.seq - i);
        uint32_t* row = p.base + b * p.seq_words + (part == 0 ? p.q_off : p.k_off) + h * p.qk_head + (e0 / 2) * p.sp;
        // lanes lane .. lane + len - 1 go to tokens i .. i + len - 1 (moved down to lane 0 first when a run starts
        // inside the vector, as where a sequence ends within it)
        const __mmask16 run = static_cast<__mmask16>(mask16(lane + len) & ~mask16(lane));
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          const __m512i v = lane == 0 ? words[c] : _mm512_maskz_compress_epi32(run, words[c]);
          _mm512_mask_storeu_epi32(row + c * p.sp + i, mask16(len), v);
        }
        lane += len;
      }
      continue;
    }
    __m512i r[16];
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) r[c] = _mm512_load_si512(g + c * kVec);
    transpose16(r);  // r[j]: the 16 channels of token j
    for (int j = 0; j < lanes; ++j) {
      const int64_t b = (tok + j) / p.seq, i = (tok + j) % p.seq;
      uint32_t* line = p.base + b * p.seq_words + p.v_off + h * p.v_head + e0 + (i / 2) * p.d;
      const __m512 v = _mm512_castsi512_ps(r[j]);
      if (i % 2 == 1) {
        _mm512_mask_storeu_epi16(line, 0xAAAAAAAAu, pairs16(zero, v));  // its pair's first token wrote the rest
      } else if (i + 1 == p.seq) {
        _mm512_storeu_si512(line, pairs16(v, zero));  // the last token of an odd sequence: the pad token is 0
      } else if (j + 1 < lanes) {
        _mm512_storeu_si512(line, pairs16(v, _mm512_castsi512_ps(r[j + 1])));
        ++j;
      } else {
        _mm512_mask_storeu_epi16(line, 0x55555555u, pairs16(v, zero));  // token i + 1 is in the next tile
      }
    }
  }
}

// QkvPackedOut's layout (common.h): any seq.
bool qkv_layout(QkvPackedOut& p) {
  p.sp = round_up(p.seq, kVec);
  p.sp2 = round_up(p.seq, 2 * kVec);
  p.qk_head = p.d / 2 * p.sp;
  p.v_head = p.sp2 / 2 * p.d;
  p.q_off = 0;
  p.k_off = p.heads * p.qk_head;
  p.v_off = 2 * p.heads * p.qk_head;
  p.seq_words = p.v_off + p.heads * p.v_head;
  p.granule = kVec;
  return true;
}

void item(const AttnItem& a, void* scratch) {
  const int64_t d = a.d;
  const int64_t s = a.causal ? (a.q1 < a.s ? a.q1 : a.s) : a.s;  // keys any row of this item may see
  const Layout L(d, a.s);
  char* base = static_cast<char*>(scratch);
  uint32_t* kbuf = reinterpret_cast<uint32_t*>(base + L.k_off);
  uint32_t* vbuf = reinterpret_cast<uint32_t*>(base + L.v_off);
  uint32_t* qw = reinterpret_cast<uint32_t*>(base + L.q_off);
  float* sc = reinterpret_cast<float*>(base + L.s_off);
  uint32_t* pw = reinterpret_cast<uint32_t*>(base + L.p_off);
  float* div = reinterpret_cast<float*>(base + L.l_off);
  const bool packed = a.kp != nullptr;  // Q, K, V written by write_qkv_group (d is a multiple of 16 then)
  const uint32_t* kp = packed ? a.kp : kbuf;
  const uint32_t* vp = packed ? a.vp : vbuf;
  if (!packed) {
    pack_k(a.k, a.ldk, s, d, L, kbuf);
    pack_v(a.v, a.ldv, s, d, L, vbuf);
  }
  const int64_t pst = L.sp2 / 2, vst = L.dv * kVec;
  for (int64_t i0 = a.q0; i0 < a.q1; i0 += kBlock) {
    const int nb = static_cast<int>(a.q1 - i0 < kBlock ? a.q1 - i0 : kBlock);
    const int nbp = static_cast<int>(round_up(nb, kRows));
    // Q rows as bf16 pairs; padding rows are zero. (Packed Q is read in place: rows past nb are later queries or
    // padding, computed and never used.)
    for (int r = 0; r < nbp && !packed; ++r) {
      uint32_t* dst = qw + r * L.pairs;
      for (int64_t w0 = 0; w0 < L.pairs; w0 += kVec) {
        __m512i q = _mm512_setzero_si512();
        if (r < nb) {
          const float* row = a.q + (i0 + r) * a.ldq + 2 * w0;
          q = bf16x32(_mm512_maskz_loadu_ps(mask16(d - 2 * w0), row),
                      _mm512_maskz_loadu_ps(mask16(d - 2 * w0 - kVec), row + kVec));
        }
        _mm512_mask_storeu_epi32(dst + w0, mask16(L.pairs - w0), q);
      }
    }
    const int64_t keys_blk = a.causal ? (i0 + nb < s ? i0 + nb : s) : s;
    const int64_t nvec = (keys_blk + kVec - 1) / kVec;
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < nvec; c0 += kCols) {
        const uint32_t* q = packed ? a.qp + i0 + r0 : qw + r0 * L.pairs;
        const int64_t qs = packed ? L.sp : 1, qr = packed ? 1 : L.pairs;
        const uint32_t* kk = kp + c0 * kVec;
        float* so = sc + r0 * L.sp + c0 * kVec;
        switch (nvec - c0 < kCols ? nvec - c0 : kCols) {
          case 1: qk_block<1>(q, qs, qr, L.pairs, kk, L.sp, a.scale, so); break;
          case 2: qk_block<2>(q, qs, qr, L.pairs, kk, L.sp, a.scale, so); break;
          case 3: qk_block<3>(q, qs, qr, L.pairs, kk, L.sp, a.scale, so); break;
          default: qk_block<4>(q, qs, qr, L.pairs, kk, L.sp, a.scale, so); break;
        }
      }
    }
    for (int r = 0; r < nbp; ++r) {
      uint32_t* prow = pw + r * pst;
      if (r >= nb) {
        std::memset(prow, 0, static_cast<size_t>(pst) * 4);
        continue;
      }
      const int64_t i = i0 + r;
      const int64_t keys = a.causal ? (i + 1 < s ? i + 1 : s) : s;
      const void* mrow = nullptr;
      if (a.mask_kind == kMaskAdd) mrow = static_cast<const float*>(a.mask) + i * a.mask_ld;
      if (a.mask_kind == kMaskKeep) mrow = static_cast<const uint8_t*>(a.mask) + i * a.mask_ld;
      div[r] = softmax_row(sc + r * L.sp, nvec, keys, a.mask_kind, mrow, prow, pst);
    }
    const int64_t key_pairs = (keys_blk + 1) / 2;
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < L.dv; c0 += kCols) {
        const uint32_t* p = pw + r0 * pst;
        const uint32_t* vv = vp + c0 * kVec;
        float* o = a.out + (i0 + r0) * a.ldo + c0 * kVec;
        const int nrows = nb - r0;
        const int64_t dleft = d - c0 * kVec;
        switch (L.dv - c0 < kCols ? L.dv - c0 : kCols) {
          case 1: pv_block<1>(p, pst, key_pairs, vv, vst, div + r0, nrows, o, a.ldo, dleft); break;
          case 2: pv_block<2>(p, pst, key_pairs, vv, vst, div + r0, nrows, o, a.ldo, dleft); break;
          case 3: pv_block<3>(p, pst, key_pairs, vv, vst, div + r0, nrows, o, a.ldo, dleft); break;
          default: pv_block<4>(p, pst, key_pairs, vv, vst, div + r0, nrows, o, a.ldo, dleft); break;
        }
      }
    }
  }
}

// The sum of v's 16 lanes in a fixed tree (halves, then quarters, ...), written out so that layernorm_fm can add
// 16 tokens' lanes in the same order (_mm512_reduce_add_ps's order is the compiler's).
inline float sum16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// The same tree over 16 vectors: lane r of the result is sum16 of (l[0][r], ..., l[15][r]). l is overwritten.
inline __m512 sum16_lanes(__m512* l) {
  for (int w = 8; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) l[j] = _mm512_add_ps(l[j], l[j + w]);
  }
  return l[0];
}

// y = (v - mean) * rstd * gamma + beta with v = x + res: three passes over a row held in L1. Each sum runs in two
// lane-wise accumulators (vectors 0, 2, 4, .. of each 32 features, and 1, 3, 5, ..; a vector past the last whole 32
// goes to the first), added lane by lane, then over the lanes by sum16: layernorm_fm repeats exactly this order.
void add_layernorm(const float* x, int64_t ldx, const float* res, int64_t ldr, int64_t rows, int64_t n,
                   const float* gamma, const float* beta, float eps, float* y, int64_t ldy) {
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    const float* rr = res ? res + r * ldr : nullptr;
    float* yr = y + r * ldy;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * kVec <= n; i += 2 * kVec) {
      __m512 a = _mm512_loadu_ps(xr + i), b = _mm512_loadu_ps(xr + i + kVec);
      if (rr) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(rr + i));
        b = _mm512_add_ps(b, _mm512_loadu_ps(rr + i + kVec));
      }
      _mm512_storeu_ps(yr + i, a);
      _mm512_storeu_ps(yr + i + kVec, b);
      s0 = _mm512_add_ps(s0, a);
      s1 = _mm512_add_ps(s1, b);
    }
    for (; i < n; i += kVec) {
      const __mmask16 m = mask16(n - i);
      __m512 a = _mm512_maskz_loadu_ps(m, xr + i);
      if (rr) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, rr + i));
      _mm512_mask_storeu_ps(yr + i, m, a);
      s0 = _mm512_add_ps(s0, a);
    }
    const float mean = sum16(_mm512_add_ps(s0, s1)) * inv_n;
    const __m512 vmean = _mm512_set1_ps(mean);
    __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
    for (i = 0; i + 2 * kVec <= n; i += 2 * kVec) {
      const __m512 a = _mm512_sub_ps(_mm512_loadu_ps(yr + i), vmean);
      const __m512 b = _mm512_sub_ps(_mm512_loadu_ps(yr + i + kVec), vmean);
      q0 = _mm512_fmadd_ps(a, a, q0);
      q1 = _mm512_fmadd_ps(b, b, q1);
    }
    for (; i < n; i += kVec) {
      const __m512 a = _mm512_maskz_sub_ps(mask16(n - i), _mm512_maskz_loadu_ps(mask16(n - i), yr + i), vmean);
      q0 = _mm512_fmadd_ps(a, a, q0);
    }
    const float var = sum16(_mm512_add_ps(q0, q1)) * inv_n;
    const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
    for (i = 0; i < n; i += kVec) {
      const __mmask16 m = mask16(n - i);
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, yr + i), vmean), rstd);
      const __m512 o = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, gamma + i), _mm512_maskz_loadu_ps(m, beta + i));
      _mm512_mask_storeu_ps(yr + i, m, o);
    }
  }
}

// add_layernorm on a feature-major tile ([n][mtp], n a multiple of 16): lanes are 16 tokens, and each token's sums
// take add_layernorm's order term for term. Lane j of add_layernorm's accumulator set s (0 or 1) holds the features
// 16 v + j of the vectors v in set s; here acc[s][j][t] holds them for the tokens of vector t (kFmSums' layout,
// common.h), added per j over the two sets, then over j by sum16_lanes (sum16's tree). The first pass (x + res and
// its sums) is the epilogue's of the product before (kernels_avx512.cpp, Output::fm_res); the other two run through
// the tile row after row (whole 64-byte lines in address order: a tile of 64 tokens is 3 KB per feature, far more
// than L1, and streams from L2), with the accumulators in L1.
template <int T>
void layernorm_fm_t(const float* x, const float* sums, int64_t n, const float* gamma, const float* beta, float eps,
                    float* y, bool stream, uint32_t* amax) {
  constexpr int kMtp = kVec * T;
  const int64_t pairs = n / (2 * kVec);
  const auto set_of = [&](int64_t f) { return f >= 2 * pairs * kVec ? 0 : static_cast<int>((f / kVec) & 1); };
  alignas(64) __m512 acc[2][kVec][4];
  __m512 mean[T], rstd[T];
  const auto zero = [&] {
    for (int s = 0; s < 2; ++s)
      for (int j = 0; j < kVec; ++j)
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) acc[s][j][t] = _mm512_setzero_ps();
  };
  // lane r of out[t]: sum16 over j of (a[0][j][t] + a[1][j][t]), times 1 / n
  const auto reduce = [&](const __m512 (*a)[kVec][4], __m512* out) {
    const __m512 inv_n = _mm512_set1_ps(1.0f / static_cast<float>(n));
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      __m512 l[kVec];
#pragma GCC unroll 16
      for (int j = 0; j < kVec; ++j) l[j] = _mm512_add_ps(a[0][j][t], a[1][j][t]);
      out[t] = _mm512_mul_ps(sum16_lanes(l), inv_n);
    }
  };
  reduce(reinterpret_cast<const __m512(*)[kVec][4]>(sums), mean);
  zero();
  for (int64_t f = 0; f < n; ++f) {
    __m512* a = acc[set_of(f)][f % kVec];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m512 d = _mm512_sub_ps(_mm512_load_ps(x + f * kMtp + t * kVec), mean[t]);
      a[t] = _mm512_fmadd_ps(d, d, a[t]);
    }
  }
  reduce(acc, rstd);  // (the variance, so far)
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    rstd[t] = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(_mm512_add_ps(rstd[t], _mm512_set1_ps(eps))));
  }
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i top[T];  // |o|'s bits, lane-wise max (integer ops beside the multiplies: free here)
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) top[t] = _mm512_setzero_si512();
  for (int64_t f = 0; f < n; ++f) {
    const __m512 g = _mm512_set1_ps(gamma[f]), b = _mm512_set1_ps(beta[f]);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const int64_t at = f * kMtp + t * kVec;
      const __m512 o = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(x + at), mean[t]), rstd[t]), g, b);
      if (amax) top[t] = _mm512_max_epu32(top[t], _mm512_and_si512(_mm512_castps_si512(o), abs_mask));
      if (stream) {
        _mm512_stream_ps(y + at, o);
      } else {
        _mm512_store_ps(y + at, o);
      }
    }
  }
  if (stream) _mm_sfence();
  if (amax) {
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) _mm512_storeu_si512(amax + t * kVec, top[t]);
  }
}

void layernorm_fm(const float* x, const float* sums, int64_t n, int mtp, const float* gamma, const float* beta,
                  float eps, float* y, bool stream, uint32_t* amax) {
  switch (mtp / kVec) {
    case 1: return layernorm_fm_t<1>(x, sums, n, gamma, beta, eps, y, stream, amax);
    case 2: return layernorm_fm_t<2>(x, sums, n, gamma, beta, eps, y, stream, amax);
    case 3: return layernorm_fm_t<3>(x, sums, n, gamma, beta, eps, y, stream, amax);
    default: return layernorm_fm_t<4>(x, sums, n, gamma, beta, eps, y, stream, amax);
  }
}

const AttnKernels kTable = {"avx512_bf16", scratch_bytes, item, add_layernorm, write_qkv_group, qkv_layout,
                            layernorm_fm};

}  // namespace

const AttnKernels* attn_avx512_bf16_kernels() { return &kTable; }

}  // namespace hf_sparse
