#include "linear.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "isa.h"
#include "thread_pool.h"

namespace hf_sparse {
namespace {

// Below about this many vector operations per thread, waking another thread costs more than it saves.
constexpr double kGrainOps = 12000.0;
// Cost of a row's epilogue, in units of one 4-block (one vector multiply-add per token vector).
constexpr double kRowCost = 2.0;

void* aligned_malloc(size_t bytes) {
#if defined(_MSC_VER)
  return _aligned_malloc(bytes, 64);
#else
  return std::aligned_alloc(64, bytes);
#endif
}

void aligned_free(void* p) {
#if defined(_MSC_VER)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// A grow-only 64-byte aligned buffer owned by the calling thread. All scratch of a call comes from the caller's
// buffer before the job starts, so workers never allocate (and never throw).
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { aligned_free(p_); }
  char* get(size_t bytes) {
    if (bytes > cap_) {
      aligned_free(p_);
      p_ = nullptr;
      cap_ = 0;
      const size_t cap = (bytes + 4095) & ~size_t{4095};
      p_ = aligned_malloc(cap);
      if (!p_) throw std::bad_alloc();
      cap_ = cap;
    }
    return static_cast<char*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

thread_local Buffer t_scratch;

// Calls per instruction set (tests check that the kernel they meant to test ran), indexed like all_isa_names().
constexpr const char* kCallNames[4] = {"avx512_vnni", "avx2_vnni", "avx2", "scalar"};
std::atomic<int64_t> g_calls[4];

void count_call(const IsaKernels& isa) {
  for (int i = 0; i < 4; ++i) {
    if (std::strcmp(kCallNames[i], isa.name) == 0) g_calls[i].fetch_add(1, std::memory_order_relaxed);
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

// Row ranges of about equal cost (entries + kRowCost per row; rows alone without a prefix), boundaries on
// multiples of 16 rows so each thread writes whole 16-column strips of the output.
void split_rows(const int64_t* prefix, int64_t n, int parts, int part, int64_t* lo, int64_t* hi) {
  const auto cost = [&](int64_t r) { return (prefix ? static_cast<double>(prefix[r]) : 0.0) + kRowCost * r; };
  const auto bound = [&](int i) -> int64_t {
    if (i <= 0) return 0;
    if (i >= parts) return n;
    const double target = cost(n) * i / parts;
    int64_t a = 0, b = n;
    while (a < b) {
      const int64_t mid = (a + b) / 2;
      if (cost(mid) < target) {
        a = mid + 1;
      } else {
        b = mid;
      }
    }
    return std::min<int64_t>(n, (a + 8) / 16 * 16);
  };
  *lo = bound(part);
  *hi = std::max(*lo, bound(part + 1));
}

// Whether to give each thread its own tokens (private tiles, no barrier) rather than its own output rows: when
// the token granules spread evenly enough over the threads.
bool split_tokens(int64_t m, int64_t gran, int nt) {
  const int64_t granules = ceil_div(m, gran);
  if (nt <= 1) return true;
  return (granules % nt == 0 && granules / nt >= 2) || granules >= 8 * nt;
}

// One sparse product (int8 4-block or fp32 CSR): the two share the tiling and the work split.
struct SparseJob {
  const IsaKernels* isa;
  bool int8;
  SparseI8 wi;
  SparseF32 wf;
  const float* x;
  int64_t ldx, m, n, k;
  Output out;
  int64_t gran, mt;
  bool token_split;
  char* tiles;        // token split: one private tile per thread; row split: all tiles, shared
  size_t tile_bytes;  // bytes of one tile of mt tokens
  float* sx;          // token split: mt scales per thread; row split: one per token
  SpinBarrier* barrier;

  const int64_t* row_prefix() const { return int8 ? wi.row_prefix : wf.row_prefix; }

  void pack(const float* xt, int rows, int mtp, char* tile, float* s) const {
    if (int8) {
      isa->quant_tile(xt, ldx, rows, k, mtp, tile, s);
    } else {
      isa->f32_tile(xt, ldx, rows, k, mtp, reinterpret_cast<float*>(tile));
    }
  }

  void multiply(const char* tile, int mtp, int rows, const float* s, int64_t n0, int64_t n1, int64_t m0) const {
    if (n0 >= n1) return;
    Output o = out;
    o.m0 = m0;
    if (int8) {
      isa->i8_sparse(wi, tile, mtp, rows, s, n0, n1, o);
    } else {
      isa->f32_sparse(wf, reinterpret_cast<const float*>(tile), mtp, rows, n0, n1, o);
    }
  }

  void run(int tid, int nt) const {
    if (token_split) {
      const int64_t granules = ceil_div(m, gran);
      const int64_t a = granules * tid / nt * gran;
      const int64_t b = std::min(m, granules * (tid + 1) / nt * gran);
      char* tile = tiles + tid * tile_bytes;
      float* s = sx + tid * mt;
      for (int64_t t0 = a; t0 < b; t0 += mt) {
        const int rows = static_cast<int>(std::min(mt, b - t0));
        const int mtp = static_cast<int>(round_up(rows, gran));
        pack(x + t0 * ldx, rows, mtp, tile, s);
        multiply(tile, mtp, rows, s, 0, n, t0);
      }
      return;
    }
    const int64_t ntiles = ceil_div(m, mt);
    for (int64_t i = tid; i < ntiles; i += nt) {
      const int rows = static_cast<int>(std::min(mt, m - i * mt));
      pack(x + i * mt * ldx, rows, static_cast<int>(round_up(rows, gran)), tiles + i * tile_bytes, sx + i * mt);
    }
    if (nt > 1) barrier->wait();
    int64_t lo, hi;
    split_rows(row_prefix(), n, nt, tid, &lo, &hi);
    for (int64_t i = 0; i < ntiles; ++i) {
      const int rows = static_cast<int>(std::min(mt, m - i * mt));
      multiply(tiles + i * tile_bytes, static_cast<int>(round_up(rows, gran)), rows, sx + i * mt, lo, hi, i * mt);
    }
  }
};

void sparse_job_fn(void* ctx, int tid, int nt) { static_cast<const SparseJob*>(ctx)->run(tid, nt); }

void run_sparse(SparseJob& job, int64_t nnz, int nthreads) {
  const IsaKernels& isa = *job.isa;
  job.gran = isa.tile_tokens;
  job.mt = isa.max_tile;
  if (const char* e = std::getenv("HF_SPARSE_MAX_TILE")) job.mt = std::atoi(e);  // EXPERIMENT
  const int64_t m = job.m;
  // Vector operations: one per stored group and token vector, plus quantization and the output epilogue.
  const double vec = static_cast<double>(ceil_div(m, 16));
  const double ops = vec * (static_cast<double>(nnz) + kRowCost * job.n + job.k / 4.0);
  const int nt = threads_for(ops, std::max(1, nthreads));
  job.token_split = split_tokens(m, job.gran, nt);
  const size_t elem = job.int8 ? static_cast<size_t>(isa.act_bytes) * 4 : sizeof(float);
  const int64_t rows_per_tile = job.int8 ? ceil_div(job.k, 4) : job.k;
  job.tile_bytes = align64(static_cast<size_t>(rows_per_tile) * job.mt * elem);
  const int64_t ntiles = job.token_split ? nt : ceil_div(m, job.mt);
  const size_t tiles_bytes = job.tile_bytes * ntiles;
  const size_t sx_count = job.token_split ? static_cast<size_t>(nt * job.mt) : static_cast<size_t>(ntiles * job.mt);
  char* buf = t_scratch.get(tiles_bytes + align64(sx_count * sizeof(float)));
  job.tiles = buf;
  job.sx = reinterpret_cast<float*>(buf + tiles_bytes);
  SpinBarrier barrier(nt);
  job.barrier = &barrier;
  count_call(isa);
  parallel_run(nt, sparse_job_fn, &job);
}

struct DenseJob {
  const IsaKernels* isa;
  DenseI8 w;
  const float* x;
  int64_t ldx, m;
  Output out;
  char* xq;
  int64_t ldq;  // elements per quantized row
  float* sx;
  SpinBarrier* barrier;

  void run(int tid, int nt) const {
    const int64_t a = m * tid / nt, b = m * (tid + 1) / nt;
    if (b > a) {
      isa->quant_rows(x + a * ldx, ldx, static_cast<int>(b - a), w.k, xq + a * ldq * isa->act_bytes, ldq, sx + a);
    }
    if (nt > 1) barrier->wait();
    // Panels in groups of 4 (64 channels), the width of the AVX-512 micro-kernel.
    const int64_t groups = ceil_div(w.panels, 4);
    const int64_t p0 = std::min(w.panels, groups * tid / nt * 4);
    const int64_t p1 = std::min(w.panels, groups * (tid + 1) / nt * 4);
    if (p1 > p0) isa->i8_dense(w, xq, ldq, static_cast<int>(m), sx, p0, p1, out);
  }
};

void dense_job_fn(void* ctx, int tid, int nt) { static_cast<const DenseJob*>(ctx)->run(tid, nt); }

}  // namespace

void linear_i8_sparse(const SparseI8& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out,
                      int nthreads) {
  if (m_rows <= 0 || w.n <= 0) return;
  const IsaKernels& isa = active_kernels();
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
  run_sparse(job, w.ptr[w.panels * w.n], nthreads);
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
  run_sparse(job, w.ptr[w.panels * w.n], nthreads);
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
  const size_t q_bytes = align64(static_cast<size_t>(m_rows * job.ldq) * job.isa->act_bytes);
  char* buf = t_scratch.get(q_bytes + align64(static_cast<size_t>(m_rows) * sizeof(float)));
  job.xq = buf;
  job.sx = reinterpret_cast<float*>(buf + q_bytes);
  SpinBarrier barrier(nt);
  job.barrier = &barrier;
  count_call(*job.isa);
  parallel_run(nt, dense_job_fn, &job);
}

std::vector<std::pair<std::string, int64_t>> kernel_calls() {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int i = 0; i < 4; ++i) out.emplace_back(kCallNames[i], g_calls[i].load());
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
