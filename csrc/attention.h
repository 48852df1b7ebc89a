// Fused multi-head attention and residual-add + LayerNorm: the per-ISA kernels and their drivers.
//
// Same rule as common.h: plain structs and declarations only (code compiled with ISA flags must not share inline
// functions with baseline code).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace hf_sparse {

// How a mask row is read: none, float32 added to the scaled scores, or bool (uint8, nonzero = attend).
enum MaskKind : int { kMaskNone = 0, kMaskAdd = 1, kMaskKeep = 2 };

// One work item: query rows q0..q1-1 of one (sequence, head). Pointers are already offset to that sequence's first
// token and that head's first column; rows are `ld*` floats apart.
struct AttnItem {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0;
  float* out = nullptr;  // row i of the item goes to out + i * ldo (i = q0 .. q1-1)
  int64_t ldo = 0;
  int64_t s = 0;         // keys (= queries: self-attention)
  int64_t q0 = 0, q1 = 0;
  int64_t d = 0;         // head dim
  float scale = 1.0f;
  bool causal = false;   // key j > query i is masked
  int mask_kind = kMaskNone;
  const void* mask = nullptr;  // row of query i: mask + i * mask_ld elements (0: one row for all queries)
  int64_t mask_ld = 0;
  // Packed inputs (kernels with write_qkv_group only; q, k, v unused): this head's Q, K and V in QkvPackedOut's
  // layout (common.h), written by write_qkv_group.
  const uint32_t* qp = nullptr;
  const uint32_t* kp = nullptr;
  const uint32_t* vp = nullptr;
};

// The kernels of one instruction set. Every attention kernel computes the numerics of docs/kernels.md
// ("Attention"): Q, K, V and the probabilities rounded to bfloat16, products exact, sums and softmax in float32.
struct AttnKernels {
  const char* name;  // "avx512_bf16", "avx2", "scalar"; int8: "avx512_vnni_int8", "avx2_int8", "scalar_int8"
  // Scratch one thread needs for items of up to `rows` query rows over `s` keys of head dim `d`.
  size_t (*scratch_bytes)(int64_t d, int64_t s, int64_t rows);
  void (*item)(const AttnItem& a, void* scratch);
  // y[r] = LayerNorm(x[r] + res[r]) * gamma + beta for rows 0..rows-1 (res may be null; y may alias x or res).
  void (*add_layernorm)(const float* x, int64_t ldx, const float* res, int64_t ldr, int64_t rows, int64_t n,
                        const float* gamma, const float* beta, float eps, float* y, int64_t ldy);
  // Optional (null: the kernel packs Q, K and V itself): the writer of QkvPackedOut, whose layout item then reads.
  void (*write_qkv_group)(const QkvPackedOut& p, const float* staged, int T, int64_t n, int64_t m0, int rows);
  // With write_qkv_group: sets p's sizes, offsets and granule from p.seq, p.heads and p.d (d a multiple of 16), or
  // returns false for a shape the writer does not take.
  bool (*qkv_layout)(QkvPackedOut& p);
  // Optional: add_layernorm over feature-major tiles ([n][mtp] floats, token r in column r; n a multiple of 16),
  // giving add_layernorm's results bit for bit: x holds x + res already and sums the first pass's per-token sums
  // (kFmSums floats, both from a product's epilogue: Output::fm_res). y may alias x, or (stream) be written with
  // non-temporal stores (64-byte aligned). amax, when given: each token's max of |y|'s bits (mtp uint32, lane-wise
  // over the features), what IsaKernels::quant_fm would find by reading y again.
  void (*layernorm_fm)(const float* x, const float* sums, int64_t n, int mtp, const float* gamma, const float* beta,
                       float eps, float* y, bool stream, uint32_t* amax) = nullptr;
  // int8 attention (docs/kernels.md, "int8 attention"): item and the Q/K/V writer only (the LayerNorm entries are
  // null; the encoder layer takes them from the float table of the same instruction set).
  bool int8 = false;
};

const AttnKernels* attn_scalar_kernels();
const AttnKernels* attn_avx2_kernels();
const AttnKernels* attn_avx512_bf16_kernels();  // null when not built
const AttnKernels* attn_int8_scalar_kernels();
const AttnKernels* attn_avx2_int8_kernels();    // null when not built
const AttnKernels* attn_avx512_int8_kernels();  // null when not built

// The attention kernels for the active instruction set (csrc/isa.cpp decides), and the int8 ones.
const AttnKernels& active_attn_kernels();
const AttnKernels& active_attn_int8_kernels();

// This thread's staging for a Q/K/V writer (write_qkv_group): `floats` floats, 64-byte aligned, valid until the
// thread's next call with the same slot (baseline code: the per-ISA files must not define ScratchBuffer's inline
// functions). Slot 1: the second tile of a pair (IsaKernels::i8_sparse_pair).
float* qkv_stage(size_t floats, int slot = 0);

// Keys and head features an int8 attention sums exactly in int32 (255 x 127 x 65536 < 2^31).
constexpr int64_t kInt8AttnMax = 65536;

// Multi-head self-attention over `batch` sequences of `seq` tokens: q, k, v are (batch * seq, heads * d) row-major
// views (row strides ldq, ldk, ldv); out (batch * seq, heads * d), row stride ldo, head h in columns h*d..h*d+d-1.
// The mask, when given, is read for (sequence b, head h, query i) at mask + b*mask_sb + h*mask_sh + i*mask_sq
// (element strides; 0 broadcasts), contiguous over keys.
struct AttnCall {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  int64_t batch = 0, seq = 0, heads = 0, d = 0;
  float scale = 1.0f;
  bool causal = false;
  int mask_kind = kMaskNone;
  const void* mask = nullptr;
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0;
  // Only query rows q_begin .. q_end - 1 of each sequence (q_end < 0: to the end) are computed and written; keys
  // are always all seq tokens.
  int64_t q_begin = 0, q_end = -1;
  // Q, K and V already packed (QkvPackedOut, sequence b at base + b * seq_words; q, k, v unused): only for
  // kernels with write_qkv_group.
  const QkvPackedOut* packed = nullptr;
  // The kernels to run (null: the active ones), e.g. the ones that wrote `packed`.
  const AttnKernels* kernels = nullptr;
};
void attention(const AttnCall& call, int nthreads);

// y = LayerNorm(x + res) row by row (rows of n floats; res may be null).
void add_layernorm(const float* x, int64_t ldx, const float* res, int64_t ldr, int64_t rows, int64_t n,
                   const float* gamma, const float* beta, float eps, float* y, int64_t ldy, int nthreads);

// The same on one feature-major tile with kernels' layernorm_fm, on the calling thread (counted with add_layernorm).
void add_layernorm_fm(const AttnKernels& kernels, const float* x, const float* sums, int64_t n, int mtp,
                      const float* gamma, const float* beta, float eps, float* y, bool stream,
                      uint32_t* amax = nullptr);

// Calls so far per attention kernel name (of attention, or of add_layernorm).
std::vector<std::pair<std::string, int64_t>> attention_calls(bool layernorm);

}  // namespace hf_sparse
