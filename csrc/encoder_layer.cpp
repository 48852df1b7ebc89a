// The encoder layer driver: chunks of whole sequences, each run through the six steps of the layer.
//
// With several threads and at least as many sequences, each thread takes whole chunks and runs every step of a
// chunk alone (sequence parallelism); otherwise each step is split over the threads (step parallelism). Measured on
// BERT-base (benchmarks/RESULTS.md): both are equally fast while the two cores share their caches well, but this
// machine often enters a state where data written by one core and read by the other is slow, and then step
// parallelism (every activation tile, Q/K/V and LayerNorm row crosses between the cores) loses ~35% while sequence
// parallelism (only the weights are shared, read-only) loses nothing. Results are identical either way: every step
// works token by token (per-token activation scales) or sequence by sequence (attention).
#include "encoder_layer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <new>

#include "attention.h"
#include "scratch.h"
#include "thread_pool.h"

namespace hf_sparse {
namespace {

inline size_t align64(size_t a) { return (a + 63) & ~size_t{63}; }

// Below this many tokens per thread, a thread of its own per chunk is not worth it (the steps' own splits are).
constexpr int64_t kMinTokensPerThread = 32;

thread_local ScratchBuffer t_layer;

struct StepTimer {
  int64_t* counters;  // null: no profile
  std::chrono::steady_clock::time_point last;
  explicit StepTimer(int64_t* c) : counters(c) {
    if (counters) last = std::chrono::steady_clock::now();
  }
  void done(int step) {
    if (!counters) return;
    const auto now = std::chrono::steady_clock::now();
    counters[step] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
    last = now;
  }
};

// Intermediates of one chunk of up to `tokens` tokens.
struct ChunkBuffers {
  float* qkv;
  float* ctx;
  float* a;
  static size_t bytes(const EncoderLayerCall& c, int64_t tokens) {
    return align64(tokens * 3 * c.width * 4) + align64(tokens * c.width * 4) + align64(tokens * c.hidden * 4);
  }
  ChunkBuffers(const EncoderLayerCall& c, int64_t tokens, char* p) {
    qkv = reinterpret_cast<float*>(p);
    p += align64(tokens * 3 * c.width * 4);
    ctx = reinterpret_cast<float*>(p);
    p += align64(tokens * c.width * 4);
    a = reinterpret_cast<float*>(p);
  }
};

// Sequences b0 .. b0 + nb - 1 through the layer, each step on up to nt threads.
void run_chunk(const EncoderLayerCall& c, int64_t b0, int64_t nb, int nt, const ChunkBuffers& buf, int64_t* prof) {
  const int64_t m = nb * c.seq, w = c.width, hidden = c.hidden;
  const float* x = c.x + b0 * c.seq * hidden;
  float* y = c.y + b0 * c.seq * hidden;
  StepTimer timer(prof);
  c.qkv(x, m, buf.qkv, nt);
  timer.done(kStepQkv);
  AttnCall at;
  at.q = buf.qkv;
  at.k = buf.qkv + w;
  at.v = buf.qkv + 2 * w;
  at.ldq = at.ldk = at.ldv = 3 * w;
  at.out = buf.ctx;
  at.ldo = w;
  at.batch = nb;
  at.seq = c.seq;
  at.heads = c.heads;
  at.d = c.head_dim;
  at.scale = c.scale;
  at.mask_kind = c.mask_kind;
  if (c.mask) {
    const size_t elem = c.mask_kind == kMaskAdd ? sizeof(float) : 1;
    at.mask = static_cast<const char*>(c.mask) + static_cast<size_t>(b0 * c.mask_sb) * elem;
  }
  at.mask_sb = c.mask_sb;
  at.mask_sh = c.mask_sh;
  at.mask_sq = c.mask_sq;
  attention(at, nt);
  timer.done(kStepAttention);
  c.out(buf.ctx, m, buf.a, nt);
  timer.done(kStepOut);
  add_layernorm(buf.a, hidden, x, hidden, m, hidden, c.gamma1, c.beta1, c.eps1, buf.a, hidden, nt);
  timer.done(kStepNorm1);
  c.ffn(buf.a, m, y, nt);
  timer.done(kStepFfn);
  add_layernorm(y, hidden, buf.a, hidden, m, hidden, c.gamma2, c.beta2, c.eps2, y, hidden, nt);
  timer.done(kStepNorm2);
}

// Whole chunks per thread. Thread t owns a contiguous run of chunks and takes them first, in order, so that from
// one layer to the next a thread reads the sequences it wrote; a thread that is done takes the chunks others have
// not started (one that joins late, its core busy with another process, just takes fewer).
struct SequenceJob {
  const EncoderLayerCall* call;
  int64_t unit, chunks;
  int threads;
  char* scratch;
  size_t slot_bytes;  // per thread: its next-chunk counter (64 bytes), kLayerSteps counters, the chunk buffers
  bool profile;
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  int64_t first(int t) const { return chunks * t / threads; }
  std::atomic<int64_t>* taken(int t) const {
    return reinterpret_cast<std::atomic<int64_t>*>(scratch + static_cast<size_t>(t) * slot_bytes);
  }
  int64_t* counters(int t) const { return reinterpret_cast<int64_t*>(scratch + static_cast<size_t>(t) * slot_bytes + 64); }

  void run(int tid) {
    int64_t* prof = profile ? counters(tid) : nullptr;
    const ChunkBuffers buf(*call, unit * call->seq, scratch + static_cast<size_t>(tid) * slot_bytes + 128);
    try {
      for (int k = 0; k < threads; ++k) {
        const int owner = (tid + k) % threads;
        const int64_t end = first(owner + 1);
        for (;;) {
          const int64_t i = first(owner) + taken(owner)->fetch_add(1, std::memory_order_relaxed);
          if (i >= end || failed.load(std::memory_order_relaxed)) break;
          run_chunk(*call, i * unit, unit, 1, buf, prof);
        }
      }
    } catch (...) {  // a worker must not throw (it would end the process): the caller rethrows
      bool expected = false;
      if (failed.compare_exchange_strong(expected, true)) error = std::current_exception();
    }
  }
};

void sequence_job_fn(void* ctx, int tid, int) { static_cast<SequenceJob*>(ctx)->run(tid); }

}  // namespace

int encoder_layer(const EncoderLayerCall& c, int nthreads, int64_t* profile_ns) {
  if (c.batch <= 0 || c.seq <= 0) return 1;
  const int nt = std::max(1, nthreads);
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(c.batch, c.chunk_tokens / c.seq));
  const int64_t threads = std::min<int64_t>(nt, c.batch);
  int64_t split = 0;  // the first `split` sequences go to threads whole
  if (c.split_sequences && threads > 1 && (c.batch / threads) * c.seq >= kMinTokensPerThread) {
    split = c.batch / threads * threads;
    // Chunks of `unit` sequences, as many as possible up to `per`, and a number of chunks every thread gets
    // equally many of (unit 1 always qualifies: split is a multiple of threads).
    int64_t unit = std::min(per, split / threads);
    while (unit > 1 && (split % unit != 0 || (split / unit) % threads != 0)) --unit;
    SequenceJob job;
    job.call = &c;
    job.unit = unit;
    job.chunks = split / unit;
    job.threads = static_cast<int>(threads);
    job.profile = profile_ns != nullptr;
    job.slot_bytes = 128 + align64(ChunkBuffers::bytes(c, unit * c.seq));
    job.scratch = t_layer.get(job.slot_bytes * threads);
    for (int t = 0; t < job.threads; ++t) {
      new (job.taken(t)) std::atomic<int64_t>(0);
      std::fill_n(job.counters(t), kLayerSteps, int64_t{0});
    }
    parallel_run(job.threads, sequence_job_fn, &job);
    if (job.error) std::rethrow_exception(job.error);
    if (profile_ns) {  // the threads ran side by side: each step's share of the wall time is its mean
      for (int s = 0; s < kLayerSteps; ++s) {
        int64_t sum = 0;
        for (int t = 0; t < job.threads; ++t) sum += job.counters(t)[s];
        profile_ns[s] += sum / threads;
      }
    }
  }
  if (split < c.batch) {
    const ChunkBuffers buf(c, per * c.seq, t_layer.get(ChunkBuffers::bytes(c, per * c.seq)));
    for (int64_t b0 = split; b0 < c.batch; b0 += per) {
      run_chunk(c, b0, std::min(per, c.batch - b0), nt, buf, profile_ns);
    }
  }
  return split > 0 ? static_cast<int>(threads) : 1;
}

}  // namespace hf_sparse
