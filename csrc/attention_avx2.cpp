// AVX2 + FMA attention (compiled with -mavx2 -mfma only): CPUs without AVX512-BF16 (and every AVX2 level).
//
// The numerics of the bf16 kernel (docs/kernels.md, "Attention"): Q, K, V and the probabilities are rounded to
// bfloat16 here, kept in float32, and multiplied with fp32 FMAs. A product of two bfloat16 values is exact in
// float32, so only the order of the float32 sums differs from attention_avx512_bf16.cpp.
//
//   S = Q K^T: lanes are 8 keys of K packed transposed ([d][keys] float32); each query feature is broadcast.
//   O = P V:   lanes are 8 head features of V's rows; each probability is broadcast.
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
constexpr int kBlock = 32;  // query rows per block
constexpr int kCols = 3;    // vectors per register block (12 accumulators + 3 loads + 1 broadcast)

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Round to the nearest bfloat16, ties to even (NaN stays a quiet NaN), kept in float32.
inline __m256 bf16_round(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), hi);
  const __m256i qnan = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), hi);
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

struct Layout {
  int64_t sp, dp;  // keys padded to 8, features padded to 8
  size_t k_off, v_off, q_off, s_off, l_off, bytes;
  Layout(int64_t d, int64_t s) {
    sp = round_up(s, kVec);
    dp = round_up(d, kVec);
    const auto a64 = [](size_t b) { return (b + 63) & ~size_t{63}; };
    k_off = 0;
    v_off = k_off + a64(static_cast<size_t>(d * sp) * 4);  // K^T: [d][sp]
    q_off = v_off + a64(static_cast<size_t>(s * dp) * 4);  // V: [s][dp]
    s_off = q_off + a64(static_cast<size_t>(kBlock * d) * 4);  // Q: [kBlock][d]
    l_off = s_off + a64(static_cast<size_t>(kBlock * sp) * 4);  // scores, then probabilities: [kBlock][sp]
    bytes = l_off + a64(kBlock * sizeof(float));
  }
};

size_t scratch_bytes(int64_t d, int64_t s, int64_t) { return Layout(d, s).bytes; }

template <int C>
void qk_block(const float* q, int64_t d, const float* kt, int64_t sp, float* sc) {
  __m256 acc[kRows][C];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  for (int64_t f = 0; f < d; ++f) {
    __m256 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm256_load_ps(kt + f * sp + c * kVec);
    for (int r = 0; r < kRows; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * d + f);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < C; ++c) _mm256_store_ps(sc + r * sp + c * kVec, acc[r][c]);
  }
}

template <int C>
void pv_block(const float* p, int64_t sp, int64_t keys, const float* v, int64_t dp, const float* div, int nrows,
              float* out, int64_t ldo, int64_t dleft) {
  __m256 acc[kRows][C];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < keys; ++j) {
    __m256 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm256_load_ps(v + j * dp + c * kVec);
    for (int r = 0; r < kRows; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + r * sp + j);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows && r < nrows; ++r) {
    const __m256 dv = _mm256_set1_ps(div[r]);
    for (int c = 0; c < C; ++c) store_n(out + r * ldo + c * kVec, dleft - c * kVec, _mm256_div_ps(acc[r][c], dv));
  }
}

// As softmax_row in attention_avx512_bf16.cpp; the rounded probabilities overwrite the scores.
float softmax_row(float* sc, int64_t nvec, int64_t keys, float scale, int mask_kind, const void* mask) {
  const float inf = std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(-inf);
  __m256 m = ninf, nan = _mm256_setzero_ps();
  for (int64_t c = 0; c < nvec; ++c) {
    const int64_t j0 = c * kVec;
    const __m256 scaled = _mm256_mul_ps(_mm256_load_ps(sc + j0), _mm256_set1_ps(scale));
    const __m256 v = masked_scores(scaled, j0, keys, mask_kind, mask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);
    _mm256_store_ps(sc + j0, v);
  }
  const float mx = hmax(m);
  if (_mm256_movemask_ps(nan) || mx == -inf) {
    std::memset(sc, 0, static_cast<size_t>(nvec * kVec) * 4);
    return _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : inf;
  }
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 l = _mm256_setzero_ps();
  for (int64_t c = 0; c < nvec; ++c) {
    const __m256 p = exp_ps(_mm256_sub_ps(_mm256_load_ps(sc + c * kVec), vm));
    l = _mm256_add_ps(l, p);
    _mm256_store_ps(sc + c * kVec, bf16_round(p));
  }
  return hsum(l);
}

void item(const AttnItem& a, void* scratch) {
  const int64_t d = a.d;
  const int64_t s = a.causal ? (a.q1 < a.s ? a.q1 : a.s) : a.s;
  const Layout L(d, a.s);
  char* base = static_cast<char*>(scratch);
  float* kt = reinterpret_cast<float*>(base + L.k_off);
  float* vr = reinterpret_cast<float*>(base + L.v_off);
  float* qr = reinterpret_cast<float*>(base + L.q_off);
  float* sc = reinterpret_cast<float*>(base + L.s_off);
  float* div = reinterpret_cast<float*>(base + L.l_off);
  // K transposed (8 keys x 8 features at a time would need a transpose; a strided scalar copy is cheap next to
  // the products), V rows rounded, both zero past s and d.
  for (int64_t f = 0; f < d; ++f) {
    for (int64_t j = 0; j < L.sp; ++j) kt[f * L.sp + j] = 0.0f;
  }
  for (int64_t j = 0; j < s; ++j) {
    const float* kr = a.k + j * a.ldk;
    for (int64_t f0 = 0; f0 < d; f0 += kVec) {
      alignas(32) float t[kVec];
      _mm256_store_ps(t, bf16_round(load_n(kr + f0, d - f0)));
      for (int64_t f = f0; f < d && f < f0 + kVec; ++f) kt[f * L.sp + j] = t[f - f0];
    }
    const float* vrow = a.v + j * a.ldv;
    for (int64_t f0 = 0; f0 < L.dp; f0 += kVec) {
      _mm256_store_ps(vr + j * L.dp + f0, bf16_round(load_n(vrow + f0, d - f0)));
    }
  }
  for (int64_t i0 = a.q0; i0 < a.q1; i0 += kBlock) {
    const int nb = static_cast<int>(a.q1 - i0 < kBlock ? a.q1 - i0 : kBlock);
    const int nbp = static_cast<int>(round_up(nb, kRows));
    for (int r = 0; r < nbp; ++r) {
      for (int64_t f0 = 0; f0 < d; f0 += kVec) {
        const __m256 q = r < nb ? bf16_round(load_n(a.q + (i0 + r) * a.ldq + f0, d - f0)) : _mm256_setzero_ps();
        store_n(qr + r * d + f0, d - f0, q);
      }
    }
    const int64_t keys_blk = a.causal ? (i0 + nb < s ? i0 + nb : s) : s;
    const int64_t nvec = (keys_blk + kVec - 1) / kVec;
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < nvec; c0 += kCols) {
        const float* q = qr + r0 * d;
        const float* kk = kt + c0 * kVec;
        float* so = sc + r0 * L.sp + c0 * kVec;
        switch (nvec - c0 < kCols ? nvec - c0 : kCols) {
          case 1: qk_block<1>(q, d, kk, L.sp, so); break;
          case 2: qk_block<2>(q, d, kk, L.sp, so); break;
          default: qk_block<3>(q, d, kk, L.sp, so); break;
        }
      }
    }
    for (int r = 0; r < nbp; ++r) {
      float* row = sc + r * L.sp;
      if (r >= nb) {
        std::memset(row, 0, static_cast<size_t>(nvec * kVec) * 4);
        continue;
      }
      const int64_t i = i0 + r;
      const int64_t keys = a.causal ? (i + 1 < s ? i + 1 : s) : s;
      const void* mrow = nullptr;
      if (a.mask_kind == kMaskAdd) mrow = static_cast<const float*>(a.mask) + i * a.mask_ld;
      if (a.mask_kind == kMaskKeep) mrow = static_cast<const uint8_t*>(a.mask) + i * a.mask_ld;
      div[r] = softmax_row(row, nvec, keys, a.scale, a.mask_kind, mrow);
    }
    const int64_t dv = L.dp / kVec;
    for (int r0 = 0; r0 < nbp; r0 += kRows) {
      for (int64_t c0 = 0; c0 < dv; c0 += kCols) {
        const float* p = sc + r0 * L.sp;
        const float* vv = vr + c0 * kVec;
        float* o = a.out + (i0 + r0) * a.ldo + c0 * kVec;
        const int nrows = nb - r0;
        const int64_t dleft = d - c0 * kVec;
        switch (dv - c0 < kCols ? dv - c0 : kCols) {
          case 1: pv_block<1>(p, L.sp, keys_blk, vv, L.dp, div + r0, nrows, o, a.ldo, dleft); break;
          case 2: pv_block<2>(p, L.sp, keys_blk, vv, L.dp, div + r0, nrows, o, a.ldo, dleft); break;
          default: pv_block<3>(p, L.sp, keys_blk, vv, L.dp, div + r0, nrows, o, a.ldo, dleft); break;
        }
      }
    }
  }
}

void add_layernorm(const float* x, int64_t ldx, const float* res, int64_t ldr, int64_t rows, int64_t n,
                   const float* gamma, const float* beta, float eps, float* y, int64_t ldy) {
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    const float* rr = res ? res + r * ldr : nullptr;
    float* yr = y + r * ldy;
    __m256 s0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += kVec) {
      __m256 a = load_n(xr + i, n - i);
      if (rr) a = _mm256_add_ps(a, load_n(rr + i, n - i));
      store_n(yr + i, n - i, a);
      s0 = _mm256_add_ps(s0, a);
    }
    const float mean = hsum(s0) * inv_n;
    const __m256 vmean = _mm256_set1_ps(mean);
    __m256 q0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += kVec) {
      const __m256 a = _mm256_and_ps(_mm256_castsi256_ps(tail_mask(n - i)),
                                     _mm256_sub_ps(load_n(yr + i, n - i), vmean));
      q0 = _mm256_fmadd_ps(a, a, q0);
    }
    const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(hsum(q0) * inv_n + eps));
    for (int64_t i = 0; i < n; i += kVec) {
      const __m256 c = _mm256_mul_ps(_mm256_sub_ps(load_n(yr + i, n - i), vmean), rstd);
      store_n(yr + i, n - i, _mm256_fmadd_ps(c, load_n(gamma + i, n - i), load_n(beta + i, n - i)));
    }
  }
}

const AttnKernels kTable = {"avx2", scratch_bytes, item, add_layernorm, nullptr};

}  // namespace

const AttnKernels* attn_avx2_kernels() { return &kTable; }

}  // namespace hf_sparse
