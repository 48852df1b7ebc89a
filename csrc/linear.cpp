#include "linear.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "isa.h"
#include "scratch.h"
#include "thread_pool.h"

namespace hf_sparse {
namespace {

// Below about this many vector operations per thread, waking another thread costs more than it saves.
constexpr double kGrainOps = 12000.0;
// Cost of a row's epilogue, in units of one stored entry (one vector multiply-add per token vector).
constexpr double kRowCost = 2.0;
// Work items per thread when tiles alone are too few: enough for a thread that runs late (another process on
// its core) to leave its share to the others, few enough to keep per-item costs small.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMinRowsPerItem = 64;

thread_local ScratchBuffer t_scratch;
// The unfused FFN's hidden activations (the Linear calls in between use t_scratch).
thread_local ScratchBuffer t_hidden;

// Calls per instruction set (tests check that the kernel they meant to test ran), indexed like all_isa_names().
constexpr const char* kCallNames[4] = {"avx512_vnni", "avx2_vnni", "avx2", "scalar"};
std::atomic<int64_t> g_calls[4];
// Calls of the few-token kernel alone (also counted in g_calls), reported as "few_tokens:<isa>".
std::atomic<int64_t> g_few_calls[4];

void count_call(const IsaKernels& isa, std::atomic<int64_t>* counters = g_calls) {
  for (int i = 0; i < 4; ++i) {
    if (std::strcmp(kCallNames[i], isa.name) == 0) counters[i].fetch_add(1, std::memory_order_relaxed);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline size_t align64(size_t a) { return (a + 63) & ~size_t{63}; }

int threads_for(double ops, int nthreads) {
  const double cap = ops / kGrainOps;
  if (cap < 2.0) return 1;
  return static_cast<int>(std::min<double>(nthreads, cap));
}

// Boundary i of `parts` row ranges of about equal cost (entries + kRowCost per row; rows alone without a prefix),
// on a multiple of `gran` rows (16: each range writes whole 16-column strips of the output).
int64_t row_bound(const int64_t* prefix, int64_t n, int64_t parts, int64_t i, int64_t gran = 16) {
  if (i <= 0) return 0;
  if (i >= parts) return n;
  const auto cost = [&](int64_t r) { return (prefix ? static_cast<double>(prefix[r]) : 0.0) + kRowCost * r; };
  const double target = cost(n) * static_cast<double>(i) / static_cast<double>(parts);
  int64_t a = 0, b = n;
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    if (cost(mid) < target) {
      a = mid + 1;
    } else {
      b = mid;
    }
  }
  return std::min<int64_t>(n, (a + gran / 2) / gran * gran);
}

// Claims and prepares shared inputs once: the first thread that needs input `i` prepares it, the others wait.
class OnceFlags {
 public:
  OnceFlags(std::atomic<int>* flags, int64_t count) : flags_(flags) {
    for (int64_t i = 0; i < count; ++i) flags_[i].store(0, std::memory_order_relaxed);
  }
  template <class F>
  void ensure(int64_t i, F prepare) const {
    int state = flags_[i].load(std::memory_order_acquire);
    if (state == 2) return;
    if (state == 0 && flags_[i].compare_exchange_strong(state, 1, std::memory_order_acq_rel)) {
      prepare();
      flags_[i].store(2, std::memory_order_release);
      return;
    }
    for (int spins = 1; flags_[i].load(std::memory_order_acquire) != 2; ++spins) spin_wait(spins);
  }

 private:
  std::atomic<int>* flags_;
};

// One sparse product (int8 4-block or fp32 CSR). Work items (tile, row block) are handed out from an atomic
// counter, tiles interleaved, so threads start on different tiles; each tile is quantized (or transposed) by the
// first thread that needs it. No barrier and no fixed shares: a thread that runs late (another process on its
// core) just takes fewer items.
struct SparseJob {
  const IsaKernels* isa;
  bool int8;
  SparseI8 wi;
  SparseF32 wf;
  const float* x;
  int64_t ldx, m, n, k;
  Output out;
  int64_t gran, mt, ntiles, row_blocks;
  const int64_t* bounds;  // row_blocks + 1 row boundaries
  char* tiles;            // ntiles tiles of tile_bytes
  size_t tile_bytes;
  float* sx;  // mt scales per tile
  OnceFlags* ready;
  std::atomic<int64_t>* next;

  void run() const {
    const int64_t items = ntiles * row_blocks;
    for (;;) {
      const int64_t item = next->fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      const int64_t t = item % ntiles, r = item / ntiles;
      const int rows = static_cast<int>(std::min(mt, m - t * mt));
      const bool quads = int8 && wi.quads;
      const int mtp = quads ? quads_mtp(*isa, rows) : static_cast<int>(round_up(rows, gran));
      char* tile = tiles + t * tile_bytes;
      float* s = sx + t * mt;
      ready->ensure(t, [&] {
        if (int8) {
          isa->quant_tile(x + t * mt * ldx, ldx, rows, k, mtp, tile, s);
          if (quads && isa->quads_tile) isa->quads_tile(tile, ceil_div(k, 4), mtp);
        } else {
          isa->f32_tile(x + t * mt * ldx, ldx, rows, k, mtp, reinterpret_cast<float*>(tile));
        }
      });
      const int64_t n0 = bounds[r], n1 = bounds[r + 1];
      if (n0 >= n1) continue;
      Output o = out;
      o.m0 = t * mt;
      if (int8) {
        isa->i8_sparse(wi, tile, mtp, rows, s, n0, n1, o);
      } else {
        isa->f32_sparse(wf, reinterpret_cast<const float*>(tile), mtp, rows, n0, n1, o);
      }
    }
  }
};

void sparse_job_fn(void* ctx, int, int) { static_cast<const SparseJob*>(ctx)->run(); }

// Outputs at least this large are written with non-temporal stores (Output::stream): measured on BERT shapes, 10%
// faster at 19 MB (QKV, M = 2048), a wash at 5 MB, and smaller outputs are best left in cache for the next op.
constexpr size_t kStreamBytes = size_t{16} << 20;

bool stream_output(const Output& out, int64_t m) {
  return out.y && static_cast<size_t>(m * out.ldy) * sizeof(float) >= kStreamBytes &&
         reinterpret_cast<uintptr_t>(out.y) % 64 == 0 && out.ldy % 16 == 0;
}

void run_sparse(SparseJob& job, int64_t nnz, const int64_t* prefix, int nthreads) {
  const IsaKernels& isa = *job.isa;
  job.out.stream = stream_output(job.out, job.m);
  job.gran = isa.tile_tokens;
  job.mt = isa.max_tile;
  const int64_t m = job.m;
  // Vector operations: one per stored entry and token vector, plus quantization and the output epilogue.
  const double vec = static_cast<double>(ceil_div(m, 16));
  const double ops = vec * (static_cast<double>(nnz) + kRowCost * job.n + job.k / 4.0);
  const int nt = threads_for(ops, std::max(1, nthreads));
  job.ntiles = ceil_div(m, job.mt);
  const int64_t want = nt > 1 ? kItemsPerThread * nt : 1;
  job.row_blocks = job.ntiles >= want ? 1 : std::min(ceil_div(want, job.ntiles), ceil_div(job.n, kMinRowsPerItem));
  job.row_blocks = std::max<int64_t>(1, job.row_blocks);
  const size_t elem = job.int8 ? static_cast<size_t>(isa.act_bytes) * 4 : sizeof(float);
  const int64_t rows_per_tile = job.int8 ? ceil_div(job.k, 4) : job.k;
  job.tile_bytes = align64(static_cast<size_t>(rows_per_tile) * job.mt * elem);
  const size_t tiles_bytes = job.tile_bytes * job.ntiles;
  const size_t sx_bytes = align64(static_cast<size_t>(job.ntiles * job.mt) * sizeof(float));
  const size_t bounds_bytes = align64(static_cast<size_t>(job.row_blocks + 1) * sizeof(int64_t));
  const size_t flags_bytes = align64(static_cast<size_t>(job.ntiles) * sizeof(std::atomic<int>));
  char* buf = t_scratch.get(tiles_bytes + sx_bytes + bounds_bytes + flags_bytes);
  job.tiles = buf;
  job.sx = reinterpret_cast<float*>(buf + tiles_bytes);
  int64_t* bounds = reinterpret_cast<int64_t*>(buf + tiles_bytes + sx_bytes);
  // (a packed Q/K/V's writer may need whole heads: QkvPackedOut::granule)
  const int64_t gran = job.out.qkv ? std::max<int64_t>(16, job.out.qkv->granule) : 16;
  for (int64_t i = 0; i <= job.row_blocks; ++i) bounds[i] = row_bound(prefix, job.n, job.row_blocks, i, gran);
  job.bounds = bounds;
  auto* flags = new (buf + tiles_bytes + sx_bytes + bounds_bytes) std::atomic<int>[job.ntiles];
  OnceFlags ready(flags, job.ntiles);
  std::atomic<int64_t> next{0};
  job.ready = &ready;
  job.next = &next;
  count_call(isa);
  parallel_run(nt, sparse_job_fn, &job);
}

// Dense int8: items (token block, group of 4 panels = 64 channels), token blocks quantized once on demand.
struct DenseJob {
  const IsaKernels* isa;
  DenseI8 w;
  const float* x;
  int64_t ldx, m;
  Output out;
  char* xq;
  int64_t ldq;  // elements per quantized row
  float* sx;
  int64_t mb, blocks, groups;  // tokens per block, token blocks, panel groups
  OnceFlags* ready;
  std::atomic<int64_t>* next;

  void run() const {
    const int64_t items = blocks * groups;
    for (;;) {
      const int64_t item = next->fetch_add(1, std::memory_order_relaxed);
      if (item >= items) return;
      const int64_t b = item % blocks, g = item / blocks;
      const int64_t m0 = b * mb, rows = std::min(mb, m - m0);
      char* q = xq + m0 * ldq * isa->act_bytes;
      ready->ensure(b, [&] { isa->quant_rows(x + m0 * ldx, ldx, static_cast<int>(rows), w.k, q, ldq, sx + m0); });
      Output o = out;
      o.m0 = m0;
      const int64_t p0 = g * 4, p1 = std::min(w.panels, p0 + 4);
      isa->i8_dense(w, q, ldq, static_cast<int>(rows), sx + m0, p0, p1, o);
    }
  }
};

void dense_job_fn(void* ctx, int, int) { static_cast<const DenseJob*>(ctx)->run(); }

// A few tokens: quantized row-major once (they are tiny), then blocks of output rows handed out.
struct FewJob {
  const IsaKernels* isa;
  FewKernel kernel;
  SparseI8 w;
  const float* x;
  int64_t ldx, m;
  Output out;
  char* xq;
  int64_t ldq;
  float* sx;
  int64_t row_blocks;
  const int64_t* bounds;
  OnceFlags* ready;
  std::atomic<int64_t>* next;

  void run() const {
    for (;;) {
      const int64_t r = next->fetch_add(1, std::memory_order_relaxed);
      if (r >= row_blocks) return;
      ready->ensure(0, [&] { isa->quant_rows(x, ldx, static_cast<int>(m), w.k, xq, ldq, sx); });
      if (bounds[r] < bounds[r + 1]) {
        kernel(w, xq, ldq, static_cast<int>(m), sx, bounds[r], bounds[r + 1], out);
      }
    }
  }
};

void few_job_fn(void* ctx, int, int) { static_cast<const FewJob*>(ctx)->run(); }

// The few-token kernel for w at m tokens, or null when tiles are the faster (or only) way.
FewKernel few_kernel(const IsaKernels& isa, const SparseI8& w, int64_t m) {
  if (w.quads) return m <= isa.quads_few_rows ? isa.quads_few : nullptr;
  return m <= isa.few_rows ? isa.i8_sparse_few : nullptr;
}

void run_few(const IsaKernels& isa, FewKernel kernel, const SparseI8& w, const float* x, int64_t ldx, int64_t m,
             const Output& out, int nthreads) {
  FewJob job{};
  job.isa = &isa;
  job.kernel = kernel;
  job.w = w;
  job.x = x;
  job.ldx = ldx;
  job.m = m;
  job.out = out;
  job.ldq = round_up(w.kb * 4, 64);  // elements (act_bytes each) per quantized token
  // Vector steps of tile_tokens blocks (16 with AVX-512, 8 with AVX2) per token, about 12 operations each.
  const double ops = static_cast<double>(w.ptr[w.panels * w.n]) / isa.tile_tokens * 12.0 * m + w.n * w.panels * 8.0;
  const int nt = threads_for(ops, std::max(1, nthreads));
  job.row_blocks = nt > 1 ? std::min<int64_t>(kItemsPerThread * nt, ceil_div(w.n, kMinRowsPerItem)) : 1;
  job.row_blocks = std::max<int64_t>(1, job.row_blocks);
  const size_t q_bytes = align64(static_cast<size_t>(m * job.ldq) * isa.act_bytes);
  const size_t sx_bytes = align64(static_cast<size_t>(m) * sizeof(float));
  const size_t bounds_bytes = align64(static_cast<size_t>(job.row_blocks + 1) * sizeof(int64_t));
  char* buf = t_scratch.get(q_bytes + sx_bytes + bounds_bytes + 64);
  job.xq = buf;
  job.sx = reinterpret_cast<float*>(buf + q_bytes);
  int64_t* bounds = reinterpret_cast<int64_t*>(buf + q_bytes + sx_bytes);
  for (int64_t i = 0; i <= job.row_blocks; ++i) bounds[i] = row_bound(w.row_prefix, w.n, job.row_blocks, i);
  job.bounds = bounds;
  auto* flags = new (buf + q_bytes + sx_bytes + bounds_bytes) std::atomic<int>[1];
  OnceFlags ready(flags, 1);
  std::atomic<int64_t> next{0};
  job.ready = &ready;
  job.next = &next;
  count_call(isa);
  count_call(isa, g_few_calls);
  parallel_run(nt, few_job_fn, &job);
}

// Fused FFN: each work item is one token tile, run through both layers by one thread (no barrier): the tile is
// quantized, the first layer's activations stay in that thread's scratch, quantized again for the second layer.
struct FfnJob {
  const IsaKernels* isa;
  SparseI8 w1, w2;
  int act1;
  const float* x;
  int64_t ldx, m;
  Output out;
  int64_t mt, ntiles;
  int64_t cap;    // tokens a tile may hold (mt, or max_tile when quads pad a tile to it)
  char* scratch;  // one slot per thread
  size_t slot_bytes, tile1_bytes, tile2_bytes, h_bytes;
  std::atomic<int64_t>* next;

  void run(int tid) const {
    char* slot = scratch + static_cast<size_t>(tid) * slot_bytes;
    void* tile1 = slot;
    void* tile2 = slot + tile1_bytes;
    float* h = reinterpret_cast<float*>(slot + tile1_bytes + tile2_bytes);
    float* sx1 = reinterpret_cast<float*>(slot + tile1_bytes + tile2_bytes + h_bytes);
    float* sx2 = sx1 + cap;
    const int gran = isa->tile_tokens;
    const bool quads = w1.quads || w2.quads;
    for (;;) {
      const int64_t t = next->fetch_add(1, std::memory_order_relaxed);
      if (t >= ntiles) return;
      const int rows = static_cast<int>(std::min(mt, m - t * mt));
      // both tiles have mtp tokens; a 4-block weight takes any multiple of the granule, quads one or a full tile
      const int mtp = quads ? quads_mtp(*isa, rows) : static_cast<int>(round_up(rows, gran));
      isa->quant_tile(x + t * mt * ldx, ldx, rows, w1.k, mtp, tile1, sx1);
      if (w1.quads && isa->quads_tile) isa->quads_tile(tile1, ceil_div(w1.k, 4), mtp);
      if (isa->i8_ffn_hidden) {
        isa->i8_ffn_hidden(w1, tile1, mtp, rows, sx1, act1, h, tile2, sx2);
      } else {
        Output oh;
        oh.y = h;
        oh.ldy = w1.n;
        oh.act = act1;
        isa->i8_sparse(w1, tile1, mtp, rows, sx1, 0, w1.n, oh);
        isa->quant_tile(h, w1.n, rows, w1.n, mtp, tile2, sx2);
      }
      if (w2.quads && isa->quads_tile) isa->quads_tile(tile2, ceil_div(w2.k, 4), mtp);
      Output o = out;
      o.m0 = t * mt;
      isa->i8_sparse(w2, tile2, mtp, rows, sx2, 0, w2.n, o);
    }
  }
};

void ffn_job_fn(void* ctx, int tid, int) { static_cast<const FfnJob*>(ctx)->run(tid); }

}  // namespace

void linear_i8_sparse(const SparseI8& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out,
                      int nthreads) {
  if (m_rows <= 0 || w.n <= 0) return;
  const IsaKernels& isa = out.qkv && out.qkv->isa ? *out.qkv->isa : active_kernels();
  if (out.qkv && (!isa.qkv_packed || !out.qkv->write_group)) {
    throw std::logic_error("packed Q/K/V output: not supported by the " + std::string(isa.name) + " kernels");
  }
  if (out.qkv && w.n % 16 != 0) {
    throw std::logic_error("packed Q/K/V output: " + std::to_string(w.n) + " output channels, not a multiple of 16");
  }
  // (the few-token kernels write rows; a packed Q/K/V always runs the tile kernel)
  const FewKernel few = out.qkv ? nullptr : few_kernel(isa, w, m_rows);
  if (few) return run_few(isa, few, w, x, ldx, m_rows, out, nthreads);
  SparseJob job{};
  job.isa = &isa;
  job.int8 = true;
  job.wi = w;
  job.x = x;
  job.ldx = ldx;
  job.m = m_rows;
  job.n = w.n;
  job.k = w.k;
  job.out = out;
  run_sparse(job, w.ptr[w.panels * w.n], w.row_prefix, nthreads);
}

void linear_i8_ffn(const SparseI8& w1, int act1, const SparseI8& w2, const float* x, int64_t ldx, int64_t m_rows,
                   const Output& out, int nthreads) {
  if (m_rows <= 0 || w2.n <= 0) return;
  const IsaKernels& isa = active_kernels();
  const int64_t gran = isa.tile_tokens;
  const double ops = static_cast<double>(ceil_div(m_rows, 16)) *
                     (static_cast<double>(w1.ptr[w1.panels * w1.n] + w2.ptr[w2.panels * w2.n]) +
                      kRowCost * (w1.n + w2.n) + (w1.k + w2.k) / 4.0);
  const int nt = threads_for(ops, std::max(1, nthreads));
  // Whole tiles per thread: worth it while every thread gets tiles of at least two token vectors; fewer tokens
  // (and the few-token kernel's range) run as two Linear calls, each split over output rows.
  const int64_t per_thread = round_up(ceil_div(m_rows, nt), gran);
  if (few_kernel(isa, w1, m_rows) || few_kernel(isa, w2, m_rows) || (nt > 1 && per_thread < 2 * gran)) {
    float* hidden = reinterpret_cast<float*>(t_hidden.get(static_cast<size_t>(m_rows * w1.n) * sizeof(float)));
    Output oh;
    oh.y = hidden;
    oh.ldy = w1.n;
    oh.act = act1;
    linear_i8_sparse(w1, x, ldx, m_rows, oh, nthreads);
    linear_i8_sparse(w2, hidden, w1.n, m_rows, out, nthreads);
    return;
  }
  FfnJob job{};
  job.isa = &isa;
  job.w1 = w1;
  job.w2 = w2;
  job.act1 = act1;
  job.x = x;
  job.ldx = ldx;
  job.m = m_rows;
  job.out = out;
  job.mt = std::min<int64_t>(isa.max_tile, per_thread);
  job.ntiles = ceil_div(m_rows, job.mt);
  // tokens a tile may hold: with quads a tile of fewer tokens than max_tile may still be padded to it
  const int64_t cap = (w1.quads || w2.quads) && isa.quads_tile ? isa.max_tile : job.mt;
  job.cap = cap;
  const size_t elem = static_cast<size_t>(isa.act_bytes) * 4;
  job.tile1_bytes = align64(static_cast<size_t>(ceil_div(w1.k, 4) * cap) * elem);
  job.tile2_bytes = align64(static_cast<size_t>(ceil_div(w2.k, 4) * cap) * elem);
  job.h_bytes = align64(static_cast<size_t>(w1.n * cap) * sizeof(float));
  job.slot_bytes = job.tile1_bytes + job.tile2_bytes + job.h_bytes + align64(2 * cap * sizeof(float));
  const int threads = static_cast<int>(std::min<int64_t>(nt, job.ntiles));
  job.scratch = t_scratch.get(job.slot_bytes * threads);
  std::atomic<int64_t> next{0};
  job.next = &next;
  count_call(isa);
  parallel_run(threads, ffn_job_fn, &job);
}

void linear_f32_sparse(const SparseF32& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out,
                       int nthreads) {
  if (m_rows <= 0 || w.n <= 0) return;
  SparseJob job{};
  job.isa = &active_kernels();
  job.int8 = false;
  job.wf = w;
  job.x = x;
  job.ldx = ldx;
  job.m = m_rows;
  job.n = w.n;
  job.k = w.k;
  job.out = out;
  run_sparse(job, w.ptr[w.panels * w.n], w.row_prefix, nthreads);
}

void linear_i8_dense(const DenseI8& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out, int nthreads) {
  if (m_rows <= 0 || w.n <= 0) return;
  DenseJob job{};
  job.isa = &active_kernels();
  job.w = w;
  job.x = x;
  job.ldx = ldx;
  job.m = m_rows;
  job.out = out;
  job.ldq = round_up(w.kb * 4, 64);  // whole cache lines per token
  const double ops = static_cast<double>(m_rows) * w.panels * w.kb / 4.0 + ceil_div(m_rows, 16) * (w.k / 4.0);
  const int nt = threads_for(ops, std::max(1, nthreads));
  job.groups = ceil_div(w.panels, 4);
  // Token blocks of up to 120 (their quantized rows stay in L2 while panel groups stream past), smaller when
  // the panel groups alone give too few items to share.
  const int64_t want = nt > 1 ? kItemsPerThread * nt : 1;
  const int64_t blocks_wanted = ceil_div(want, job.groups);
  job.mb = std::min<int64_t>(120, std::max<int64_t>(6, round_up(ceil_div(m_rows, blocks_wanted), 6)));
  job.mb = std::min(job.mb, m_rows);
  job.blocks = ceil_div(m_rows, job.mb);
  const size_t q_bytes = align64(static_cast<size_t>(m_rows * job.ldq) * job.isa->act_bytes);
  const size_t sx_bytes = align64(static_cast<size_t>(m_rows) * sizeof(float));
  const size_t flags_bytes = align64(static_cast<size_t>(job.blocks) * sizeof(std::atomic<int>));
  char* buf = t_scratch.get(q_bytes + sx_bytes + flags_bytes);
  job.xq = buf;
  job.sx = reinterpret_cast<float*>(buf + q_bytes);
  auto* flags = new (buf + q_bytes + sx_bytes) std::atomic<int>[job.blocks];
  OnceFlags ready(flags, job.blocks);
  std::atomic<int64_t> next{0};
  job.ready = &ready;
  job.next = &next;
  count_call(*job.isa);
  parallel_run(nt, dense_job_fn, &job);
}

void count_kernel_call(const IsaKernels& isa) { count_call(isa); }

std::vector<std::pair<std::string, int64_t>> kernel_calls() {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int i = 0; i < 4; ++i) out.emplace_back(kCallNames[i], g_calls[i].load());
  for (int i = 0; i < 4; ++i) out.emplace_back(std::string("few_tokens:") + kCallNames[i], g_few_calls[i].load());
  return out;
}

void quantize_rows_i8(const float* x, int64_t ldx, int64_t m_rows, int64_t k, int8_t* q, float* scale) {
  const IsaKernels& isa = active_kernels();
  const int64_t kp = ceil_div(k, 4) * 4;
  char* buf = t_scratch.get(align64(static_cast<size_t>(kp) * isa.act_bytes));
  for (int64_t r = 0; r < m_rows; ++r) {
    isa.quant_rows(x + r * ldx, ldx, 1, k, buf, kp, scale + r);
    for (int64_t i = 0; i < k; ++i) {
      int v;
      if (isa.act_bytes == 2) {
        int16_t s;
        std::memcpy(&s, buf + 2 * i, 2);
        v = s;
      } else if (isa.act_offset) {
        v = static_cast<uint8_t>(buf[i]) - isa.act_offset;
      } else {
        v = static_cast<int8_t>(buf[i]);
      }
      q[r * k + i] = static_cast<int8_t>(v);
    }
  }
}

}  // namespace hf_sparse
