// Drivers of the attention and LayerNorm kernels: work items, threads, scratch.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "scratch.h"
#include "thread_pool.h"

namespace hf_sparse {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align64(size_t a) { return (a + 63) & ~size_t{63}; }

// Work items per thread: enough for a thread that runs late (another process on its core) to leave its share to
// the others.
constexpr int64_t kItemsPerThread = 4;
// Below about this many multiply-adds per thread, waking another thread costs more than it saves.
constexpr double kGrainMacs = 200000.0;
// Query rows per work item at most (the kernels walk them in blocks of their own).
constexpr int64_t kMaxItemRows = 256;

thread_local ScratchBuffer t_attn_scratch;

int threads_for(double macs, int nthreads) {
  const double cap = macs / kGrainMacs;
  if (cap < 2.0) return 1;
  return static_cast<int>(std::min<double>(nthreads, cap));
}

struct AttnJob {
  const AttnKernels* kern;
  AttnCall call;
  int64_t chunks;  // query chunks per (sequence, head)
  int64_t rows;    // query rows per chunk
  int64_t q_begin, q_end;  // the query rows computed
  char* scratch;
  size_t slot_bytes;
  std::atomic<int64_t>* next;

  void run(int tid) const {
    void* slot = scratch + static_cast<size_t>(tid) * slot_bytes;
    const AttnCall& c = call;
    const int64_t items = c.batch * c.heads * chunks;
    for (;;) {
      const int64_t it = next->fetch_add(1, std::memory_order_relaxed);
      if (it >= items) return;
      // Chunks of one head are consecutive items: a thread that takes two in a row reuses its packed K and V.
      const int64_t bh = it / chunks, chunk = it % chunks;
      const int64_t b = bh / c.heads, h = bh % c.heads;
      AttnItem a;
      const int64_t row0 = b * c.seq;
      if (const QkvPackedOut* p = c.packed) {
        const uint32_t* base = p->base + b * p->seq_words;
        a.qp = base + p->q_off + h * p->qk_head;
        a.kp = base + p->k_off + h * p->qk_head;
        a.vp = base + p->v_off + h * p->v_head;
      } else {
        a.q = c.q + row0 * c.ldq + h * c.d;
        a.k = c.k + row0 * c.ldk + h * c.d;
        a.v = c.v + row0 * c.ldv + h * c.d;
        a.ldq = c.ldq;
        a.ldk = c.ldk;
        a.ldv = c.ldv;
      }
      a.out = c.out + row0 * c.ldo + h * c.d;
      a.ldo = c.ldo;
      a.s = c.seq;
      a.q0 = q_begin + chunk * rows;
      a.q1 = std::min(q_end, a.q0 + rows);
      a.d = c.d;
      a.scale = c.scale;
      a.causal = c.causal;
      a.mask_kind = c.mask_kind;
      if (c.mask_kind != kMaskNone) {
        const size_t elem = c.mask_kind == kMaskAdd ? sizeof(float) : 1;
        a.mask = static_cast<const char*>(c.mask) + static_cast<size_t>(b * c.mask_sb + h * c.mask_sh) * elem;
        a.mask_ld = c.mask_sq;
      }
      kern->item(a, slot);
    }
  }
};

void attn_job_fn(void* ctx, int tid, int) { static_cast<const AttnJob*>(ctx)->run(tid); }

struct LnJob {
  const AttnKernels* kern;
  const float *x, *res, *gamma, *beta;
  int64_t ldx, ldr, ldy, rows, n, per_item;
  float eps;
  float* y;
  std::atomic<int64_t>* next;

  void run() const {
    const int64_t items = ceil_div(rows, per_item);
    for (;;) {
      const int64_t it = next->fetch_add(1, std::memory_order_relaxed);
      if (it >= items) return;
      const int64_t r0 = it * per_item, r1 = std::min(rows, r0 + per_item);
      kern->add_layernorm(x + r0 * ldx, ldx, res ? res + r0 * ldr : nullptr, ldr, r1 - r0, n, gamma, beta, eps,
                          y + r0 * ldy, ldy);
    }
  }
};

void ln_job_fn(void* ctx, int, int) { static_cast<const LnJob*>(ctx)->run(); }

// The float tables (with LayerNorms) first, then the int8 ones (attention only).
constexpr int kNames = 6, kFloatNames = 3;
constexpr const char* kAttnNames[kNames] = {"avx512_bf16",      "avx2",      "scalar",
                                            "avx512_vnni_int8", "avx2_int8", "scalar_int8"};
std::atomic<int64_t> g_attn_calls[kNames];
std::atomic<int64_t> g_ln_calls[kNames];

void count(std::atomic<int64_t>* counters, const AttnKernels& k) {
  for (int i = 0; i < kNames; ++i) {
    if (std::strcmp(kAttnNames[i], k.name) == 0) counters[i].fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace

float* qkv_stage(size_t floats, int slot) {
  thread_local ScratchBuffer stage[2];
  return reinterpret_cast<float*>(stage[slot].get(floats * sizeof(float)));
}

void attention(const AttnCall& c, int nthreads) {
  if (c.batch <= 0 || c.seq <= 0 || c.heads <= 0 || c.d <= 0) return;
  const AttnKernels& kern = c.kernels ? *c.kernels : active_attn_kernels();
  if (c.packed && !kern.write_qkv_group) {
    throw std::logic_error(std::string("attention: packed Q/K/V given to the ") + kern.name + " kernel");
  }
  if (c.packed && c.causal) {  // (the packed layouts' padding is written for full rows of keys only)
    throw std::logic_error("attention: packed Q/K/V with a causal mask");
  }
  if (kern.int8 && (c.seq > kInt8AttnMax || c.d > kInt8AttnMax)) {
    throw std::invalid_argument("int8 attention sums in int32, so seq (" + std::to_string(c.seq) +
                                ") and head_dim (" + std::to_string(c.d) +
                                ") must be at most 65536; use precision='bf16'");
  }
  const int64_t q_rows = (c.q_end < 0 ? c.seq : std::min(c.seq, c.q_end)) - std::max<int64_t>(0, c.q_begin);
  const double macs = 2.0 * static_cast<double>(c.batch * c.heads) * std::max<int64_t>(q_rows, 0) * c.seq * c.d;
  const int nt = threads_for(macs, std::max(1, nthreads));
  AttnJob job{};
  job.kern = &kern;
  job.call = c;
  // Whole heads while they give every thread a few items; else query chunks (each repacks its head's K and V).
  const int64_t heads = c.batch * c.heads;
  const int64_t want = nt > 1 ? kItemsPerThread * nt : 1;
  int64_t chunks = heads >= want ? 1 : ceil_div(want, heads);
  job.q_begin = std::max<int64_t>(0, c.q_begin);
  job.q_end = c.q_end < 0 ? c.seq : std::min(c.seq, c.q_end);
  const int64_t queries = job.q_end - job.q_begin;
  if (queries <= 0) return;
  chunks = std::max<int64_t>(chunks, ceil_div(queries, kMaxItemRows));
  job.rows = ceil_div(queries, chunks);
  job.chunks = ceil_div(queries, job.rows);
  job.slot_bytes = align64(kern.scratch_bytes(c.d, c.seq, job.rows));
  const int threads = static_cast<int>(std::min<int64_t>(nt, heads * job.chunks));
  job.scratch = t_attn_scratch.get(job.slot_bytes * threads);
  std::atomic<int64_t> next{0};
  job.next = &next;
  count(g_attn_calls, kern);
  parallel_run(threads, attn_job_fn, &job);
}

void add_layernorm(const float* x, int64_t ldx, const float* res, int64_t ldr, int64_t rows, int64_t n,
                   const float* gamma, const float* beta, float eps, float* y, int64_t ldy, int nthreads) {
  if (rows <= 0 || n <= 0) return;
  const AttnKernels& kern = active_attn_kernels();
  // About 4 passes over each row; a row of 768 takes ~0.2 us.
  const double work = static_cast<double>(rows) * n * 8.0;
  const int nt = threads_for(work, std::max(1, nthreads));
  LnJob job{&kern, x, res, gamma, beta, ldx, ldr, ldy, rows, n, 0, eps, y, nullptr};
  job.per_item = nt > 1 ? std::max<int64_t>(1, ceil_div(rows, kItemsPerThread * nt)) : rows;
  std::atomic<int64_t> next{0};
  job.next = &next;
  count(g_ln_calls, kern);
  parallel_run(nt, ln_job_fn, &job);
}

void add_layernorm_fm(const AttnKernels& kernels, const float* x, const float* sums, int64_t n, int mtp,
                      const float* gamma, const float* beta, float eps, float* y, bool stream, uint32_t* amax) {
  count(g_ln_calls, kernels);
  kernels.layernorm_fm(x, sums, n, mtp, gamma, beta, eps, y, stream, amax);
}

std::vector<std::pair<std::string, int64_t>> attention_calls(bool layernorm) {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int i = 0; i < (layernorm ? kFloatNames : kNames); ++i) {
    out.emplace_back(kAttnNames[i], (layernorm ? g_ln_calls : g_attn_calls)[i].load());
  }
  return out;
}

}  // namespace hf_sparse
