// Shared declarations of the hf_sparse CPU kernels: packed-weight views, the per-ISA kernel table, the drivers.
//
// Only plain structs and declarations live here. Code compiled with ISA flags (kernels_*.cpp) must not share
// inline functions or templates with code compiled for the baseline: the linker keeps one copy of each, and it
// could be the AVX-512 one.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hf_sparse {

// Epilogue applied to y = acc * scale_x * scale_w + bias (int8) or y = acc + bias (fp32).
enum Activation : int {
  kActNone = 0,
  kActGelu = 1,  // exact erf GELU: 0.5 * v * (1 + erf(v / sqrt(2)))
  kActTanh = 2,  // tanh (BERT's pooler)
};

// tanh(a) = a + a^3 Q(a^2) for |a| < kTanhSmall (Q of degree 4 fitted to float32 Horner evaluation: relative error
// 7.6e-8); above it (1 - e) / (1 + e) with e = exp(-2 |a|). Each ISA file writes this out itself (see above).
constexpr float kTanhSmall = 0.625f;
constexpr float kTanhQ[5] = {-0.3333328366279602f, 0.13331487774848938f, -0.05374295637011528f,
                             0.020648276433348656f, -0.005714123137295246f};

// Largest in_features the kernels take: with the +128 activation shift, 255 * 127 * K must fit in int32, and
// column-block indices are uint16.
constexpr int64_t kMaxInFeatures = 65536;

// The first pass of a feature-major LayerNorm over n features (Output::fm_sums, AttnKernels::layernorm_fm) sums
// feature f of token 16 t + r into float [((s * 16 + f % 16) * 4 + t) * 16 + r] in the order of f, where the set s
// is 0 for f >= 32 * (n / 32) and (f / 16) % 2 below (the token-row LayerNorm's two accumulators; each ISA file
// writes this out itself, see above on inline code).
constexpr int kFmSums = 2 * 16 * 4 * 16;

// Sparse layouts are CSR over column panels of kPanel columns (a column is a 4-block for int8, an input feature
// for fp32): panel c holds columns kPanel*c .. kPanel*c + kPanel-1, and the entries of row n inside panel c are
// ptr[c*N + n] .. ptr[c*N + n + 1] - 1 (panel-major). A kernel can then stream through one panel of the weight
// for a group of rows while that panel's slice of the activation tile stays in L1.
constexpr int64_t kPanel = 128;

// Code generated for one int8 4-block weight (jit_block4.cpp, AVX-512 VNNI): group g computes the raw int32 sums of
// output rows g * kJitRows .. g * kJitRows + kJitRows - 1 (fewer in the last group) for one 64-token tile
// ([kb][64][4] u8, quant_tile's layout), written to sums[row][4][16] (token 16 t + j at [row][t][j]); `weights` is
// the group's block values in the order its code reads them. With tile2 (else null), the same for a second tile
// right after, into sums + kJitSums: the group's code and values are then fetched once for 128 tokens.
constexpr int kJitRows = 28;  // accumulators per group: 28 zmm registers, one more for the activations
constexpr int kJitSums = kJitRows * 4 * 16;  // int32 sums of one group for one tile
using JitGroupFn = void (*)(const uint8_t* tile, const int32_t* weights, int32_t* sums, const uint8_t* tile2);
struct JitGroup {
  JitGroupFn fn;
  const int32_t* weights;
};
bool jit_enabled();     // the run-time switch (set_jit); defined in jit_block4.cpp
void count_jit_call();  // one call of the generated code per tile, for kernel_calls("jit")
void count_jit_pair_call();  // one product over two tiles at once, for kernel_calls("jit_pairs")

// int8 4-block sparse weight: block b covers input features 4*cols[b] .. 4*cols[b]+3 and holds 4 int8 codes
// packed little-endian in values[b]. With `quads` (int8 CSR, for unstructured weights) entry e holds 4 nonzeros
// of any input features instead: codes values[e] (little-endian) for features cols[4e] .. cols[4e+3] (a padded
// entry repeats a feature with code 0); ptr counts entries, panels still span kPanel * 4 features.
struct SparseI8 {
  int64_t n = 0, k = 0, kb = 0;  // out_features, in_features, ceil(k / 4)
  int64_t panels = 0;            // ceil(kb / kPanel)
  const int32_t* ptr = nullptr;       // (panels * n + 1,)
  const uint16_t* cols = nullptr;     // (nnzb,)
  const int32_t* values = nullptr;    // (nnzb,)
  const int32_t* weight_sum = nullptr;  // (n,) sum of the row's int8 codes, for the +128 activation shift
  const float* scale = nullptr;         // (n,) weight scale per output channel
  const float* bias = nullptr;          // (n,) or null
  const int64_t* row_prefix = nullptr;  // (n + 1,) entries before row n (all panels), or null: balances threads
  bool quads = false;                   // int8 CSR: cols has 4 input features per entry
  const JitGroup* jit = nullptr;        // generated code, ceil(n / kJitRows) groups (4-block only), or null
};

// int8 dense weight in panels of 16 output channels: packed[p][kb][c][j] = q_w[16 p + c][4 kb + j], zero-padded
// to a multiple of 16 channels and of 4 input features.
struct DenseI8 {
  int64_t n = 0, k = 0, kb = 0, panels = 0;
  const int8_t* packed = nullptr;       // (panels, kb, 16, 4)
  const int32_t* weight_sum = nullptr;  // (n,)
  const float* scale = nullptr;         // (n,)
  const float* bias = nullptr;          // (n,) or null
};

// fp32 CSR sparse weight over panels of kPanel input features (see above).
struct SparseF32 {
  int64_t n = 0, k = 0;
  int64_t panels = 0;                 // ceil(k / kPanel)
  const int32_t* ptr = nullptr;       // (panels * n + 1,)
  const uint16_t* cols = nullptr;     // (nnz,)
  const float* values = nullptr;      // (nnz,)
  const float* bias = nullptr;        // (n,) or null
  const int64_t* row_prefix = nullptr;  // (n + 1,) or null
};

// The Q/K/V product of an encoder layer written straight into the attention's packed inputs (attention.h,
// "AttnCall::packed") instead of y: output channels 0..3W-1 are Q, K and V of `heads` heads of d features each
// (W = heads * d, d a multiple of 16), token row r of the call is token token0 + r of the chunk, i.e. token
// (token0 + r) % seq of sequence (token0 + r) / seq. Per sequence (seq_words 32-bit words from base), per head h:
// Q at q_off + h * qk_head, K at k_off + h * qk_head, V at v_off + h * v_head, in the layout of the attention
// kernels that set them (AttnKernels::qkv_layout). The bf16 one:
//   Q, K: [d/2][sp] words, word [w][i] = bf16 pair (feature 2w, 2w+1) of token i (what the attention packs K into;
//     the Q K^T product broadcasts Q's words from the same layout);
//   V: [sp2/2][d] words, word [j][e] = bf16 pair (token 2j, 2j+1) of feature e.
// sp = seq rounded up to 16, sp2 to 32; for an odd seq, the token after the last is zero in V (written with it;
// the attention reads V up to that pair and Q, K's padding not at all). The int8 one: attention_avx512_int8.cpp.
// The kernel stages 16 output channels x its tile's tokens (as floats after the epilogue, [token vector][channel]
// [16 tokens]) and hands them to write_group (the attention's file: it needs the attention's instruction set), in
// channel order; a call (or a thread's share of one) covers whole multiples of `granule` channels.
struct IsaKernels;

struct QkvPackedOut {
  uint32_t* base = nullptr;
  int64_t token0 = 0, seq = 0, heads = 0, d = 0, sp = 0, sp2 = 0;
  int64_t seq_words = 0, q_off = 0, k_off = 0, v_off = 0, qk_head = 0, v_head = 0;
  int64_t granule = 16;  // 16, or d for a writer that needs each token's whole head (per-head scales)
  // Calls starting at a multiple of this many tokens of a sequence keep the writer on whole words (int8 V: 4 keys
  // per word; other starts are written correctly, byte by byte)
  int64_t token_granule = 1;
  // Channels n .. n + 15 (n a multiple of 16) of tokens m0 .. m0 + rows - 1 of the call (T token vectors).
  void (*write_group)(const QkvPackedOut& p, const float* staged, int T, int64_t n, int64_t m0, int rows) = nullptr;
  // Optional, for kernels that stage a whole head themselves (granule d): channels n .. n + d - 1 (n a multiple of
  // d) of tokens m0 .. m0 + rows - 1, channel c's token vector t at head[c * 16 T + 16 t], and each token's max |x|
  // over the head as float bits (token vector t at maxima[16 t]), which the kernel keeps as it stages the rows.
  // Saves write_group's copy and a pass over the head.
  void (*write_head)(const QkvPackedOut& p, const float* head, const uint32_t* maxima, int T, int64_t n, int64_t m0,
                     int rows) = nullptr;
  // The Linear kernels that write it: the caller's snapshot, so that another thread switching the instruction set
  // (hf_sparse.ops.set_isa) mid-call cannot pair this layout with kernels that do not write it.
  const IsaKernels* isa = nullptr;
};

// Where a kernel writes: y (fp32, row stride ldy) or, for the accumulator debug entry, yi (int32, exact sums).
// Token row r of the current tile goes to row m0 + r.
struct Output {
  float* y = nullptr;
  int32_t* yi = nullptr;
  int64_t ldy = 0;
  int64_t m0 = 0;
  int act = kActNone;
  // Write whole 64-byte lines of y with non-temporal stores (set by the driver for outputs much larger than the
  // caches, 64-byte aligned rows): no read-for-ownership, and the weights stay cached. Kernels may ignore it.
  bool stream = false;
  // Q/K/V for the attention instead of y (only kernels with IsaKernels::qkv_packed, sparse int8 tiles).
  const QkvPackedOut* qkv = nullptr;
  // Feature-major y (only kernels with IsaKernels::quant_fm, sparse int8 tiles without padding tokens): output
  // channel n of tile token r at y[n * ldy + r]; m0 is ignored (y is the tile's own).
  bool feature_major = false;
  // With feature_major, optional (all rows of the weight in one call): y = the output + fm_res (same layout), and
  // the first pass of AttnKernels::layernorm_fm over y done on the way, its sums added to fm_sums (kFmSums floats,
  // zeroed by the caller).
  const float* fm_res = nullptr;
  float* fm_sums = nullptr;
};

// Few-token kernels (decoding): rows n0..n1-1 of a sparse int8 product for tokens 0..rows-1 of row-major quantized
// tokens (quant_rows' layout, ldq elements apart).
using FewKernel = void (*)(const SparseI8& w, const void* xq, int64_t ldq, int rows, const float* sx, int64_t n0,
                           int64_t n1, const Output& out);

// The kernels of one instruction set. Packed activation tiles hold `mtp` tokens (a multiple of tile_tokens, at
// most max_tile): int8 tiles are [kb][mtp][4] elements of act_bytes each, fp32 tiles are [k][mtp] floats.
struct IsaKernels {
  const char* name;
  int tile_tokens;  // token granule of a tile (the vector width in tokens)
  int max_tile;     // tokens per tile
  int act_bytes;    // bytes per packed int8 activation element: 1 (u8 or s8) or 2 (s16)
  int act_offset;   // added to the int8 code when packing: 128 (u8 for VNNI's unsigned operand) or 0

  // Quantize `rows` tokens (row stride ldx) per token and write the transposed int8 tile; tokens rows..mtp-1
  // are padding. sx[r] = amax / 127 (NaN when the token holds inf or NaN).
  void (*quant_tile)(const float* x, int64_t ldx, int rows, int64_t k, int mtp, void* tile, float* sx);
  // Quantize tokens row-major: out row r starts at out + r * ldo elements; kb * 4 elements per row.
  void (*quant_rows)(const float* x, int64_t ldx, int rows, int64_t k, void* out, int64_t ldo, float* sx);
  // Rows n0..n1-1 of the sparse int8 product for one tile; writes tokens 0..rows-1.
  void (*i8_sparse)(const SparseI8& w, const void* tile, int mtp, int rows, const float* sx, int64_t n0, int64_t n1,
                    const Output& out);
  // Panels p0..p1-1 of the dense int8 product for tokens 0..rows-1 of a row-major quantized block.
  void (*i8_dense)(const DenseI8& w, const void* xq, int64_t ldq, int rows, const float* sx, int64_t p0, int64_t p1,
                   const Output& out);
  // Few tokens (decoding: rows <= few_rows; 0 = not provided): rows n0..n1-1 of the sparse int8 product from
  // row-major quantized tokens (quant_rows' layout, ldq bytes apart), vectorized over the blocks of a row.
  int few_rows;
  FewKernel i8_sparse_few;
  // Transposed fp32 tile: tile[k][r] = x[r][k], padding tokens are zero.
  void (*f32_tile)(const float* x, int64_t ldx, int rows, int64_t k, int mtp, float* tile);
  void (*f32_sparse)(const SparseF32& w, const float* tile, int mtp, int rows, int64_t n0, int64_t n1,
                     const Output& out);
  // Fused FFN, optional (null: the driver composes i8_sparse and quant_tile, with the same results): the whole
  // first layer w1 for one tile, activation `act`, into the second layer's activation tile (w1.n / 4 4-blocks x
  // mtp tokens, the layout quant_tile writes) and its scales sx2; h is scratch of w1.n * mtp floats.
  void (*i8_ffn_hidden)(const SparseI8& w1, const void* tile1, int mtp, int rows, const float* sx1, int act,
                        float* h, void* tile2, float* sx2);
  // int8 CSR (SparseI8::quads), optional: rewrites a quant_tile tile in place into the layout this ISA's
  // i8_sparse reads for quads, whose tiles then hold tile_tokens or max_tile tokens (quads_mtp). Null: i8_sparse
  // reads quads from the quant_tile tile itself (i8_quads_portable).
  void (*quads_tile)(void* tile, int64_t kb, int mtp);
  // int8 CSR for a few tokens, optional (rows <= quads_few_rows; 0 / null: tiles at every M).
  int quads_few_rows;
  FewKernel quads_few;
  // i8_sparse writes Output::qkv (output channels in whole granules: QkvPackedOut::granule).
  bool qkv_packed = false;
  // Feature-major tiles, optional (null: i8_sparse ignores Output::feature_major; the encoder layer then keeps its
  // activations token-major). An fm tile of `mtp` tokens is [k][mtp] floats, token r in column r (f32_tile's
  // layout); mtp a multiple of tile_tokens, at most max_tile, with no padding tokens.
  // quant_fm: quant_tile from an fm tile, the same codes and scales bit for bit; amax, when given, is each token's
  // max of |x|'s bits (AttnKernels::layernorm_fm's), so the tile is read once instead of twice.
  void (*quant_fm)(const float* x, int64_t k, int mtp, void* tile, float* sx, const uint32_t* amax) = nullptr;
  // f32_untile: y[r][i] = tile[i][r] for r < mtp, i < k (row stride ldy): an fm tile back to token rows.
  void (*f32_untile)(const float* tile, int mtp, int64_t k, float* y, int64_t ldy) = nullptr;
  // Two full-size tiles (max_tile tokens each, rows_a / rows_b of them real) through one weight, optional (null: one
  // call per tile, the same results): i8_sparse for all rows of w into out_a and out_b, and
  // i8_ffn_hidden for each tile. Kernels with generated code fetch it once for both tiles.
  // (Output::qkv of a pair: the packed writer's tokens at out_a.m0 and out_b.m0, through write_head.)
  void (*i8_sparse_pair)(const SparseI8& w, const void* tile_a, int rows_a, const float* sx_a, const Output& out_a,
                         const void* tile_b, int rows_b, const float* sx_b, const Output& out_b) = nullptr;
  void (*i8_ffn_hidden_pair)(const SparseI8& w1, int act, const void* tile1_a, int rows_a, const float* sx1_a,
                             float* h_a, void* tile2_a, float* sx2_a, const void* tile1_b, int rows_b,
                             const float* sx1_b, float* h_b, void* tile2_b, float* sx2_b) = nullptr;
};

// Tokens per tile (mtp) for `rows` tokens of a quads weight on `isa`: the vector kernel takes one vector or a full
// tile; the portable path any multiple of the granule.
inline int quads_mtp(const IsaKernels& isa, int rows) {
  if (!isa.quads_tile) return (rows + isa.tile_tokens - 1) / isa.tile_tokens * isa.tile_tokens;
  return rows <= isa.tile_tokens ? isa.tile_tokens : isa.max_tile;
}

// Quads from an unmodified quant_tile tile of any ISA (elements of act_bytes bytes holding code + act_offset),
// exact int32 sums, scalar epilogue (std::erf GELU). Compiled without ISA flags (kernels_scalar.cpp).
void i8_quads_portable(const SparseI8& w, const void* tile, int act_bytes, int act_offset, int mtp, int rows,
                       const float* sx, int64_t n0, int64_t n1, const Output& out);

// Per-ISA tables, defined in kernels_<isa>.cpp (null when that file is not built for this target).
const IsaKernels* scalar_kernels();
const IsaKernels* avx2_kernels();
const IsaKernels* avx2_vnni_vex_kernels();   // 256-bit VNNI, VEX encoding (AVX-VNNI CPUs)
const IsaKernels* avx2_vnni_evex_kernels();  // the same source, EVEX encoding (AVX512-VNNI + VL CPUs)
const IsaKernels* avx512_vnni_kernels();
// The int8 CSR few-token kernel with VBMI byte permutes and (rows, when not null) the tokens it takes
// (kernels_avx512_vbmi.cpp; null when not built): isa.cpp swaps it into the avx512_vnni table on CPUs with
// AVX512-VBMI.
FewKernel avx512_vbmi_quads_few(int* rows);

}  // namespace hf_sparse
