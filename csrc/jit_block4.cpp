// Code generated per int8 4-block weight (AVX-512 VNNI).
//
// The 4-block loops (kernels_avx512.cpp) spend one 64-byte activation load per vpdpbusd: a 1x4 block belongs to
// one output row, so nothing shares the load, and the loops also pay per block for its column index and per row
// for the loop exit. Here each group of kJitRows output rows becomes straight-line code: for every 4-block column
// that any row of the group uses, one load of the tile's 16 tokens into zmm31, then one
//     vpdpbusd zmm<row>, zmm31, dword [weights + offset]{1to16}
// per row that has a block there: the accumulators stay in registers over the whole row, the column indices are
// baked into displacements, and the load is shared by the ~2.7 rows (at 90% sparsity) that use the column. The
// code loops over the tile's four 16-token vectors (then, given a second tile, over its four: tile pairs, 1.5-2%
// faster at batch 16), so it is fetched from memory once per 64-token tile (or pair) and then runs from L1. It
// prefetches itself (prefetcht1 8 KB ahead, once per 64-byte line): the code of a whole model is tens of MB and
// comes from L3 or memory, which the instruction fetch alone reads too slowly; and it prefetches its values, a line
// at a time 2 KB ahead, which the hardware prefetchers alone bring too late at batch 1.
// Measured (benchmarks/RESULTS.md, "Generated 4-block code"): the multiply ~1.45x the loops' speed on BERT shapes
// with a whole model's weights, a BERT-base forward 1.21x (batch 16) and 1.12x (batch 1).
//
// The code reads only the tile (256 bytes per 4-block column, columns clamped to the tile), the group's weights
// and sums[kJitRows][4][16] (two of them with a second tile); it uses rcx, rdx, rsi, rdi, r8, r9, r10 and zmm0-31, all
// caller-saved in the System V ABI.
#include "jit_block4.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "isa.h"
#include "x86_emitter.h"

#if defined(__x86_64__) && defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#define HF_SPARSE_JIT_SUPPORTED 1
#else
#define HF_SPARSE_JIT_SUPPORTED 0
#endif

namespace hf_sparse {
namespace {

std::atomic<bool> g_jit_on{true};
std::atomic<int64_t> g_jit_calls{0};
std::atomic<int64_t> g_jit_pair_calls{0};

constexpr int kActReg = 31;           // the activation vector
constexpr int32_t kTileStride = 256;  // bytes per 4-block column in a 64-token tile
constexpr int32_t kLoadDispMax = 127 * 64;  // largest compressed disp8 of a 64-byte load
constexpr int32_t kPrefetchAhead = 8192;
// One code prefetch per 64-byte line, emitted as the code enters the line: every line 8 KB ahead is asked for once.
// (Every 48 bytes, as before, asked for some lines twice: 0.9% more code, batch 1 ~0.7% slower; RESULTS.md, session
// 22.) Lines are counted in the emitter's buffer, whose start is page-aligned in the mapping.
constexpr size_t kCodeLine = 64;
// The values a group reads are a second stream beside the code (4 bytes per block): one prefetcht1 per 64-byte line
// of them, 2 KB ahead (into the next group's, for the narrower products). benchmarks/RESULTS.md, "Prefetching the
// generated code's values": a BERT-base forward ~2.5% faster at batch 1, the same at batch 16.
constexpr int32_t kValuesAhead = 2048;
constexpr size_t kValuesPerLine = 16;

// Emits group code for rows r0 .. r0 + rows - 1 and appends the values it reads to `weights`.
void emit_group(const SparseI8& w, int64_t r0, int rows, X86Emitter& e, std::vector<int32_t>& weights) {
  std::vector<std::tuple<uint32_t, int, int32_t>> blocks;  // (column, row in group, value)
  const uint32_t kb_max = static_cast<uint32_t>(w.kb - 1);
  for (int i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < w.panels; ++c) {
      const int64_t at = c * w.n + r0 + i;
      for (int32_t b = w.ptr[at]; b < w.ptr[at + 1]; ++b) {
        const uint32_t col = w.cols[b] < kb_max ? w.cols[b] : kb_max;
        blocks.emplace_back(col, i, w.values[b]);
      }
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const auto& a, const auto& b) {
    return std::get<0>(a) != std::get<0>(b) ? std::get<0>(a) < std::get<0>(b) : std::get<1>(a) < std::get<1>(b);
  });
  e.mov(kR8, kRsi);
  e.mov(kR10, kRcx);  // the second tile, or null
  const size_t tile_loop = e.size();
  e.mov_imm32(kRcx, 4);
  const size_t loop = e.size();
  e.mov(kRsi, kR8);
  e.mov(kR9, kRdi);
  int32_t act = 0;  // r9 - rdi: moved on so that tile loads keep the compressed disp8 range (7 bytes, not 10)
  for (int i = 0; i < rows; ++i) e.vpxord_zero(i);
  int32_t off = 0;  // of the next value from rsi, kept in [-512, 508]: the compressed disp8 range
  size_t prefetched_line = e.size() / kCodeLine;
  int64_t last_col = -1;
  for (const auto& [col, i, value] : blocks) {
    if (static_cast<int64_t>(col) != last_col) {
      const int32_t at = static_cast<int32_t>(col) * kTileStride;
      if (at - act > kLoadDispMax) {  // (columns ascend) the new base covers [at, at + 2 kLoadDispMax]
        e.add(kR9, at + kLoadDispMax - act);
        act = at + kLoadDispMax;
      }
      e.vmovdqa32_load(kActReg, kR9, at - act);
      last_col = col;
    }
    if (off == 512) {
      e.add(kRsi, 1024);
      off = -512;
    }
    e.vpdpbusd_bcst(i, kActReg, kRsi, off);
    if (weights.size() % kValuesPerLine == 0) e.prefetcht1_base(kRsi, off + kValuesAhead);
    off += 4;
    weights.push_back(value);
    if (e.size() / kCodeLine != prefetched_line) {
      e.prefetcht1_rip(kPrefetchAhead);
      prefetched_line = e.size() / kCodeLine;
    }
  }
  for (int i = 0; i < rows; ++i) e.vmovdqa32_store(kRdx, i * 256, i);
  e.add(kRdi, 64);  // the next 16 tokens of each column
  e.add(kRdx, 64);
  e.dec32(kRcx);
  e.jnz_back(loop);
  e.mov(kRdi, kR10);  // then the second tile, if any, into the next kJitSums sums
  e.mov_imm32(kR10, 0);
  e.add(kRdx, (kJitSums - 4 * 16) * 4);
  e.test(kRdi, kRdi);
  e.jnz_back(tile_loop);
  e.ret();
}

}  // namespace

bool jit_available() {
  const char* env = std::getenv("HF_SPARSE_JIT");  // hf_sparse.ops checked it at import: unset, "0" or "1"
  if (env && std::strcmp(env, "0") == 0) return false;
  const CpuFeatures f = cpu_features();
  return HF_SPARSE_JIT_SUPPORTED && f.avx512f && f.avx512bw && f.avx512_vnni;
}

bool jit_enabled() { return g_jit_on.load(std::memory_order_relaxed); }
void set_jit_enabled(bool on) { g_jit_on.store(on, std::memory_order_relaxed); }
void count_jit_call() { g_jit_calls.fetch_add(1, std::memory_order_relaxed); }
int64_t jit_calls() { return g_jit_calls.load(); }
void count_jit_pair_call() { g_jit_pair_calls.fetch_add(1, std::memory_order_relaxed); }
int64_t jit_pair_calls() { return g_jit_pair_calls.load(); }

std::unique_ptr<JitBlock4> JitBlock4::build(const SparseI8& w) {
  if (w.quads || w.n <= 0 || w.kb <= 0 || !jit_available()) return nullptr;
#if HF_SPARSE_JIT_SUPPORTED
  std::unique_ptr<JitBlock4> j(new JitBlock4());
  X86Emitter e;
  std::vector<size_t> code_at;
  std::vector<size_t> weights_at;
  for (int64_t r0 = 0; r0 < w.n; r0 += kJitRows) {
    code_at.push_back(e.size());
    weights_at.push_back(j->weights_.size());
    const int rows = static_cast<int>(w.n - r0 < kJitRows ? w.n - r0 : kJitRows);
    emit_group(w, r0, rows, e, j->weights_);
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t bytes = (e.size() + page - 1) / page * page;
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  std::memcpy(mem, e.code.data(), e.size());
  if (mprotect(mem, bytes, PROT_READ | PROT_EXEC) != 0) {  // W^X: never writable and executable at once
    munmap(mem, bytes);
    return nullptr;
  }
  j->code_ = mem;
  j->mapped_ = bytes;
  j->code_bytes_ = e.size();
  if (j->weights_.empty()) j->weights_.push_back(0);  // a valid pointer for groups without blocks
  for (size_t g = 0; g < code_at.size(); ++g) {
    JitGroup grp;
    grp.fn = reinterpret_cast<JitGroupFn>(static_cast<char*>(mem) + code_at[g]);
    grp.weights = j->weights_.data() + weights_at[g];
    j->groups_.push_back(grp);
  }
  return j;
#else
  return nullptr;
#endif
}

JitBlock4::~JitBlock4() {
#if HF_SPARSE_JIT_SUPPORTED
  if (code_) munmap(code_, mapped_);
#endif
}

}  // namespace hf_sparse
