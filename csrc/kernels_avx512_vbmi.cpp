// AVX-512 VBMI: the int8 CSR few-token kernel (quads_few_avx512.h) with byte permutes, compiled with the AVX-512
// VNNI flags plus -mavx512vbmi. isa.cpp puts it in the avx512_vnni table on CPUs that have VBMI (Ice Lake, Zen 4
// and later; Cascade Lake has VNNI without it and keeps the vpermt2d version in kernels_avx512.cpp).
#include <immintrin.h>

#include "avx512_common.h"
#include "common.h"
#include "quads_few_avx512.h"

namespace hf_sparse {
namespace {

// One vpermt2b tree gives all 64 bytes of 16 entries: 4 permutes over register pairs (index bits 0-6) and 3
// blends by bits 7 and 8 of the feature's offset in the 512-byte panel.
struct ByteGather {
  struct Index {
    __m512i idx;
    __mmask64 b7, b8;
  };
  // lo, hi: the 4 features of entries 0-7 and 8-15 (16-bit, relative to the panel)
  static Index index(__m512i lo, __m512i hi) {
    Index ix;
    ix.idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(lo)), _mm512_cvtepi16_epi8(hi), 1);
    ix.b7 = _mm512_test_epi8_mask(ix.idx, _mm512_set1_epi8(static_cast<char>(0x80)));
    const __m512i bit8 = _mm512_set1_epi16(0x100);
    ix.b8 = _mm512_kunpackd(_mm512_test_epi16_mask(hi, bit8), _mm512_test_epi16_mask(lo, bit8));
    return ix;
  }
  static __m512i bytes(const Index& ix, const __m512i* xw) {
    const __m512i a = _mm512_permutex2var_epi8(xw[0], ix.idx, xw[1]);
    const __m512i b = _mm512_permutex2var_epi8(xw[2], ix.idx, xw[3]);
    const __m512i c = _mm512_permutex2var_epi8(xw[4], ix.idx, xw[5]);
    const __m512i d = _mm512_permutex2var_epi8(xw[6], ix.idx, xw[7]);
    return _mm512_mask_blend_epi8(ix.b8, _mm512_mask_blend_epi8(ix.b7, a, b), _mm512_mask_blend_epi8(ix.b7, c, d));
  }
};

void quads_few(const SparseI8& w, const void* xq, int64_t ldq, int rows, const float* sx, int64_t n0, int64_t n1,
               const Output& out) {
  quads_few_t<ByteGather>(w, xq, ldq, rows, sx, n0, n1, out);
}

}  // namespace

FewKernel avx512_vbmi_quads_few(int* rows) {
  if (rows) *rows = kQuadsFewRowsVbmi;
  return quads_few;
}

}  // namespace hf_sparse
