// The encoder layer driver: chunks of whole sequences, each run through the six steps of the layer.
//
// With several threads and at least as many sequences, each thread takes whole chunks of sequences and runs every
// step of a chunk alone (sequence parallelism); a single sequence (and the ones left over) runs with its tokens in
// one block per thread (token parallelism, only K/V rows shared); short sequences split every step over the threads
// (step parallelism). Measured on BERT-base (benchmarks/RESULTS.md, "Layer parallelism"): on a quiet machine in its
// fast state all run alike, but this machine often enters a state where data written by one core and read by the
// other is slow, and then step parallelism (every activation tile, Q/K/V and LayerNorm row crosses between the
// cores) loses ~35% at batch 16 while sequence parallelism (only the weights are shared, read-only) loses nothing;
// with another process on one core, threads that wait for each other inside every step lose most. int8 results
// are identical in every case (every step works token by token, with per-token activation scales, or sequence by
// sequence); float32 (CSR) layers differ in the last bits, as they do between any two tilings.
#include "encoder_layer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <new>
#include <vector>

#include "attention.h"
#include "isa.h"
#include "linear.h"
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

// The kernel tables of one call, read once: another Python thread may switch the instruction set meanwhile
// (hf_sparse.ops.set_isa), and a packed Q/K/V must be written and read by kernels that agree on it.
struct CallKernels {
  const IsaKernels* linear;
  const AttnKernels* attn;       // LayerNorms (and the attention unless int8)
  const AttnKernels* attention;  // the attention: attn, or the int8 table (EncoderLayerCall::attention_int8)
};

// QkvPackedOut for sequences of c.seq tokens at base, the call's first token being token0 of the chunk, in the
// layout of the kernels' attention (sizes unset when it has no writer or does not take the shape: packs_qkv).
QkvPackedOut packed_layout(const EncoderLayerCall& c, const CallKernels& k, void* base, int64_t token0) {
  QkvPackedOut p;
  p.base = static_cast<uint32_t*>(base);
  p.token0 = token0;
  p.seq = c.seq;
  p.heads = c.heads;
  p.d = c.head_dim;
  p.write_group = k.attention->write_qkv_group;
  p.isa = k.linear;
  if (k.attention->qkv_layout) k.attention->qkv_layout(p);
  return p;
}

// Whether the layer's Q/K/V go straight into the attention's packed layout (EncoderLayerCall::qkv_packed): a packed
// sequence must fit in the 3 * width * seq floats its rows would take (ChunkBuffers::qkv).
bool packs_qkv(const EncoderLayerCall& c, const CallKernels& k) {
  if (!(c.pack_qkv && c.qkv_packed && c.head_dim % 16 == 0 && c.seq >= kMinPackedSeq &&
        k.attention->write_qkv_group && k.attention->qkv_layout && k.linear->qkv_packed)) {
    return false;
  }
  QkvPackedOut p;
  p.seq = c.seq;
  p.heads = c.heads;
  p.d = c.head_dim;
  return k.attention->qkv_layout(p) && p.seq_words <= 3 * c.width * c.seq;
}

// Intermediates of one chunk of up to `tokens` tokens (whole sequences). qkv holds the float32 Q/K/V rows or their
// packed form (smaller: see packed_layout).
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

// The attention of sequences b0 .. b0 + nb - 1, reading Q, K, V side by side in qkv (3 * width per token) and
// writing ctx (width per token); both hold those sequences only.
AttnCall attention_call(const EncoderLayerCall& c, const float* qkv, float* ctx, int64_t b0, int64_t nb) {
  const int64_t w = c.width;
  AttnCall at;
  at.q = qkv;
  at.k = qkv + w;
  at.v = qkv + 2 * w;
  at.ldq = at.ldk = at.ldv = 3 * w;
  at.out = ctx;
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
  return at;
}

// Per-thread profile rows: kLayerSteps counters, then a flag set by a thread that took part.
constexpr int kJoined = kLayerSteps;
constexpr int kProfileRow = 8;  // int64s per row (64 bytes)
static_assert(kJoined < kProfileRow, "a profile row holds the step counters and the flag");

// profile += the mean of the rows of the threads that took part (a pool worker may never join a job).
template <class Row>
void add_mean(int64_t* profile, int threads, Row row) {
  int joined = 0;
  for (int t = 0; t < threads; ++t) joined += row(t)[kJoined] != 0;
  if (joined == 0) return;
  for (int s = 0; s < kLayerSteps; ++s) {
    int64_t sum = 0;
    for (int t = 0; t < threads; ++t) sum += row(t)[s];
    profile[s] += sum / joined;
  }
}

// The steps after the attention for m token rows: a = LN1(out(ctx) + x), y = LN2(ffn(a) + a).
void finish_rows(const EncoderLayerCall& c, const float* ctx, const float* x, float* a, float* y, int64_t m, int nt,
                 StepTimer& timer) {
  const int64_t hidden = c.hidden;
  c.out(ctx, m, a, nt);
  timer.done(kStepOut);
  add_layernorm(a, hidden, x, hidden, m, hidden, c.gamma1, c.beta1, c.eps1, a, hidden, nt);
  timer.done(kStepNorm1);
  c.ffn(a, m, y, nt);
  timer.done(kStepFfn);
  add_layernorm(y, hidden, a, hidden, m, hidden, c.gamma2, c.beta2, c.eps2, y, hidden, nt);
  timer.done(kStepNorm2);
}

// ---------------------------------------------------------------------------------------------------------------
// Feature-major tiles. With every weight int8 4-block and kernels that have fm tiles (IsaKernels::quant_fm,
// AttnKernels::layernorm_fm), a chunk or token block of a multiple of 16 tokens runs its Linear steps on the calling
// thread, tile by tile (up to max_tile tokens), on feature-major tiles ([features][tokens]): the sparse kernels'
// accumulators are one output channel x 16 tokens already, so the out and FFN products store them as they are (no
// 16x16 transposes), the LayerNorms run with tokens in the lanes, and the next product's quantization interleaves 4
// channels where quant_tile transposes token rows. Only the attention's input (Q/K/V) and output (ctx) stay as
// before. In a stack, a chunk's rows of the intermediate outputs hold its tiles in this layout (the tile of tokens
// t0 .. t0 + r - 1 of a chunk or block as [hidden][r] in the floats those r rows would take); the first layer
// reads token rows, the last writes them. Results are the token-major steps' bit for bit: the same codes and
// scales, the same epilogue, and the same LayerNorm order (attention_avx512_bf16.cpp).

bool fm_capable(const EncoderLayerCall& c, const CallKernels& k) {
  return c.feature_major && c.w_qkv && c.w_out && c.w_ffn1 && c.w_ffn2 && !c.w_qkv->quads && !c.w_out->quads &&
         !c.w_ffn1->quads && !c.w_ffn2->quads && c.hidden % 16 == 0 && k.linear->quant_fm && k.linear->f32_untile &&
         k.linear->i8_ffn_hidden && k.attn->layernorm_fm;
}

// Whether a layer's input and output are fm tiles (chunks of tokens, always the same ones, running every layer).
struct FmLayer {
  bool on = false, in = false, out = false;
};

FmLayer fm_layer(bool on, int l, int layers) { return FmLayer{on, on && l > 0, on && l + 1 < layers}; }

thread_local ScratchBuffer t_fm;

// One thread's scratch for tiles of up to mt tokens of layer c; `sets` (1 or 2) of it for tile pairs (index 0, 1).
struct FmScratch {
  uint8_t *tile1[2] = {}, *tile2[2] = {};
  float *sx1[2] = {}, *sx2[2] = {}, *h[2] = {}, *a[2] = {}, *f[2] = {}, *sums[2] = {};
  uint32_t* amax[2] = {};  // each token's max |x| bits, from the LayerNorm before the FFN to its quantization
  FmScratch(const EncoderLayerCall& c, int64_t mt, int sets = 1) {
    const size_t q1 = align64(static_cast<size_t>((std::max(c.hidden, c.width) + 3) / 4 * 4 * mt));
    const size_t q2 = align64(static_cast<size_t>((c.w_ffn1->n + 3) / 4 * 4 * mt));
    const size_t s = align64(static_cast<size_t>(mt) * 4), h_bytes = static_cast<size_t>(c.w_ffn1->n * mt) * 4;
    const size_t rows = static_cast<size_t>(c.hidden * mt) * 4;
    const size_t set = q1 + q2 + 3 * s + h_bytes + 2 * rows + kFmSums * 4;
    char* p = t_fm.get(set * static_cast<size_t>(sets));
    const auto take = [&p](size_t bytes) {  // the next `bytes` of the scratch
      char* at = p;
      p += bytes;
      return at;
    };
    for (int i = 0; i < sets; ++i) {
      tile1[i] = reinterpret_cast<uint8_t*>(take(q1));
      tile2[i] = reinterpret_cast<uint8_t*>(take(q2));
      sx1[i] = reinterpret_cast<float*>(take(s));
      sx2[i] = reinterpret_cast<float*>(take(s));
      h[i] = reinterpret_cast<float*>(take(h_bytes));
      a[i] = reinterpret_cast<float*>(take(rows));
      f[i] = reinterpret_cast<float*>(take(rows));
      sums[i] = reinterpret_cast<float*>(take(kFmSums * 4));
      amax[i] = reinterpret_cast<uint32_t*>(take(s));
    }
  }
};

// m tokens in tiles of up to mt: step(t0, n, rows) for each step of n tiles from token t0 (rows[j]: tokens of tile
// j), one tile at a time, or two full tiles where `pairs` (IsaKernels::i8_sparse_pair).
template <class Step>
void tile_steps(int64_t m, int64_t mt, bool pairs, Step step) {
  for (int64_t t0 = 0; t0 < m;) {
    const int n = pairs && m - t0 >= 2 * mt ? 2 : 1;
    int rows[2] = {};
    for (int j = 0; j < n; ++j) rows[j] = static_cast<int>(std::min(mt, m - t0 - j * mt));
    step(t0, n, rows);
    t0 += n * mt;
  }
}

// Q/K/V of m tokens at x (fm tiles or token rows) into the packed layout (tokens of the call from 0) or into float
// rows at qkv (3 * width per token); two full tiles at a time where the kernels take pairs (as fm_finish).
void fm_qkv(const EncoderLayerCall& c, const CallKernels& k, bool fm_in, const float* x, int64_t m,
            const QkvPackedOut* packed, float* qkv) {
  const IsaKernels& isa = *k.linear;
  const int64_t mt = isa.max_tile;
  const bool pairs = isa.i8_sparse_pair && m >= 2 * mt;
  FmScratch s(c, mt, pairs ? 2 : 1);
  tile_steps(m, mt, pairs, [&](int64_t t0, int n, const int* rows) {
    Output o[2];
    for (int j = 0; j < n; ++j) {
      const int64_t tj = t0 + j * mt;
      if (fm_in) {
        isa.quant_fm(x + tj * c.hidden, c.hidden, rows[j], s.tile1[j], s.sx1[j], nullptr);
      } else {
        isa.quant_tile(x + tj * c.hidden, c.hidden, rows[j], c.hidden, rows[j], s.tile1[j], s.sx1[j]);
      }
      if (packed) {
        o[j].qkv = packed;
      } else {
        o[j].y = qkv;
        o[j].ldy = 3 * c.width;
      }
      o[j].m0 = tj;
    }
    if (n == 2) {
      isa.i8_sparse_pair(*c.w_qkv, s.tile1[0], rows[0], s.sx1[0], o[0], s.tile1[1], rows[1], s.sx1[1], o[1]);
    } else {
      isa.i8_sparse(*c.w_qkv, s.tile1[0], rows[0], rows[0], s.sx1[0], 0, c.w_qkv->n, o[0]);
    }
  });
  count_kernel_call(isa);
}

// The steps after the attention for m tokens (ctx rows; x and y fm tiles or token rows), tile by tile, or two full
// tiles at a time where the kernels take pairs (IsaKernels::i8_sparse_pair: the generated code of the three
// products is fetched once per 128 tokens).
void fm_finish(const EncoderLayerCall& c, const CallKernels& k, const float* ctx, FmLayer fm, const float* x,
               float* y, int64_t m, StepTimer& timer) {
  const IsaKernels& isa = *k.linear;
  const int64_t mt = isa.max_tile, hidden = c.hidden;
  const bool pairs = isa.i8_sparse_pair && isa.i8_ffn_hidden_pair && m >= 2 * mt;
  FmScratch s(c, mt, pairs ? 2 : 1);
  tile_steps(m, mt, pairs, [&](int64_t t0, int n, const int* rows) {
    Output o[2];
    for (int j = 0; j < n; ++j) {
      const int64_t tj = t0 + j * mt;
      const float* res = x + tj * hidden;
      if (!fm.in) {
        isa.f32_tile(res, hidden, rows[j], hidden, rows[j], s.f[j]);
        res = s.f[j];
      }
      isa.quant_tile(ctx + tj * c.width, c.width, rows[j], c.width, rows[j], s.tile1[j], s.sx1[j]);
      // Both products add the residual in their epilogue and sum for the LayerNorm after them (Output::fm_res).
      o[j].y = s.a[j];
      o[j].ldy = rows[j];
      o[j].feature_major = true;
      o[j].act = c.act_out;
      o[j].fm_res = res;
      o[j].fm_sums = s.sums[j];
      std::fill_n(s.sums[j], kFmSums, 0.0f);
    }
    const auto product = [&](const SparseI8& w, uint8_t* const* tiles, float* const* sx) {
      if (n == 2) return isa.i8_sparse_pair(w, tiles[0], rows[0], sx[0], o[0], tiles[1], rows[1], sx[1], o[1]);
      isa.i8_sparse(w, tiles[0], rows[0], rows[0], sx[0], 0, hidden, o[0]);
    };
    product(*c.w_out, s.tile1, s.sx1);
    timer.done(kStepOut);
    // (the LayerNorm finds each token's max |x| as it writes x: the quantization reads x once)
    for (int j = 0; j < n; ++j) {
      add_layernorm_fm(*k.attn, s.a[j], s.sums[j], hidden, rows[j], c.gamma1, c.beta1, c.eps1, s.a[j], false,
                       s.amax[j]);
    }
    timer.done(kStepNorm1);
    for (int j = 0; j < n; ++j) isa.quant_fm(s.a[j], hidden, rows[j], s.tile1[j], s.sx1[j], s.amax[j]);
    if (n == 2) {
      isa.i8_ffn_hidden_pair(*c.w_ffn1, c.act1, s.tile1[0], rows[0], s.sx1[0], s.h[0], s.tile2[0], s.sx2[0],
                             s.tile1[1], rows[1], s.sx1[1], s.h[1], s.tile2[1], s.sx2[1]);
    } else {
      isa.i8_ffn_hidden(*c.w_ffn1, s.tile1[0], rows[0], rows[0], s.sx1[0], c.act1, s.h[0], s.tile2[0], s.sx2[0]);
    }
    for (int j = 0; j < n; ++j) {
      o[j].y = s.f[j];
      o[j].act = c.act2;
      o[j].fm_res = s.a[j];
      std::fill_n(s.sums[j], kFmSums, 0.0f);
    }
    product(*c.w_ffn2, s.tile2, s.sx2);
    timer.done(kStepFfn);
    for (int j = 0; j < n; ++j) {
      const int64_t tj = t0 + j * mt;
      // (an fm output is read again only once the thread's other chunks are through this layer: no need to cache it)
      add_layernorm_fm(*k.attn, s.f[j], s.sums[j], hidden, rows[j], c.gamma2, c.beta2, c.eps2,
                       fm.out ? y + tj * hidden : s.f[j], fm.out);
      if (!fm.out) isa.f32_untile(s.f[j], rows[j], hidden, y + tj * hidden, hidden);
    }
    timer.done(kStepNorm2);
  });
  count_kernel_call(isa);  // out
  count_kernel_call(isa);  // FFN
}

// Sequences b0 .. b0 + nb - 1 through the layer, each step on up to nt threads (packed: packs_qkv(c, k)).
void run_chunk(const EncoderLayerCall& c, int64_t b0, int64_t nb, int nt, const ChunkBuffers& buf, bool packed,
               const CallKernels& k, int64_t* prof, FmLayer fm = FmLayer{}) {
  const int64_t m = nb * c.seq;
  const float* x = c.x + b0 * c.seq * c.hidden;
  StepTimer timer(prof);
  AttnCall at = attention_call(c, buf.qkv, buf.ctx, b0, nb);
  const QkvPackedOut layout = packed_layout(c, k, buf.qkv, 0);
  at.kernels = k.attention;
  if (packed) at.packed = &layout;
  if (fm.on) {  // (on one thread)
    fm_qkv(c, k, fm.in, x, m, packed ? &layout : nullptr, buf.qkv);
    timer.done(kStepQkv);
    attention(at, 1);
    timer.done(kStepAttention);
    fm_finish(c, k, buf.ctx, fm, x, c.y + b0 * c.seq * c.hidden, m, timer);
    return;
  }
  if (packed) {
    c.qkv_packed(x, m, layout, nt);
  } else {
    c.qkv(x, m, buf.qkv, nt);
  }
  timer.done(kStepQkv);
  attention(at, nt);
  timer.done(kStepAttention);
  finish_rows(c, buf.ctx, x, buf.a, c.y + b0 * c.seq * c.hidden, m, nt, timer);
}

// The first exception of a job's threads, rethrown by the caller (a worker must not throw: it would end the
// process).
struct FirstError {
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  bool any() const { return failed.load(std::memory_order_relaxed); }
  void capture() {
    bool expected = false;
    if (failed.compare_exchange_strong(expected, true)) error = std::current_exception();
  }
  void rethrow() const {
    if (error) std::rethrow_exception(error);
  }
};

// Whole chunks per thread, through every layer. Thread t owns a contiguous run of chunks and runs them layer after
// layer (the lowest layer first, so one layer's weights serve all its chunks while they are cached), reading the
// sequences it wrote; a chunk goes on to the next layer as soon as it is through the previous one, so no thread
// waits for the others between layers. A thread with none of its own chunks ready takes another thread's (the
// lowest layer first): one that joins late, its core busy with another process, just takes fewer.
struct SequenceJob {
  const EncoderLayerCall* calls;
  int layers;
  int64_t unit, chunks;
  int threads;
  char* scratch;
  size_t slot_bytes;  // per thread: 64 bytes unused, kLayerSteps counters (64 bytes), the chunk buffers
  // per chunk: 2 * (the next layer it needs) + 1 while a thread runs that layer; 2 * layers once through them all
  std::atomic<int>* state;
  const char* packed;  // per layer: packs_qkv
  CallKernels kernels;
  bool fm;  // feature-major tiles (every layer)
  bool profile;
  FirstError error;

  int64_t first(int t) const { return chunks * t / threads; }
  int64_t* counters(int t) const {
    return reinterpret_cast<int64_t*>(scratch + static_cast<size_t>(t) * slot_bytes + 64);
  }

  // The ready chunk with the lowest next layer in [c0, c1), or -1; `busy` is set if one is still being run.
  int64_t ready(int64_t c0, int64_t c1, bool& busy) const {
    int64_t pick = -1;
    int best = 2 * layers;
    for (int64_t c = c0; c < c1; ++c) {
      const int s = state[c].load(std::memory_order_acquire);
      if (s < 2 * layers && (s & 1)) busy = true;
      if (!(s & 1) && s < best) {
        best = s;
        pick = c;
      }
    }
    return pick;
  }

  void run(int tid) {
    int64_t* prof = profile ? counters(tid) : nullptr;
    char* mine = scratch + static_cast<size_t>(tid) * slot_bytes + 128;  // this thread's chunk buffers
    try {
      for (int spins = 1; !error.any(); ++spins) {
        bool busy = false;
        int64_t c = ready(first(tid), first(tid + 1), busy);
        if (c < 0) c = ready(0, chunks, busy);
        if (c < 0) {
          if (!busy) return;  // every chunk is through every layer
          spin_wait(spins);
          continue;
        }
        int s = state[c].load(std::memory_order_relaxed);
        if ((s & 1) || s >= 2 * layers || !state[c].compare_exchange_strong(s, s + 1, std::memory_order_acquire)) {
          continue;  // another thread took it first
        }
        if (prof) prof[kJoined] = 1;  // (a thread that ran nothing stays out of the profile's mean)
        const EncoderLayerCall& call = calls[s / 2];
        run_chunk(call, c * unit, unit, 1, ChunkBuffers(call, unit * call.seq, mine), packed[s / 2] != 0, kernels,
                  prof, fm_layer(fm, s / 2, layers));
        state[c].store(s + 2, std::memory_order_release);
      }
    } catch (...) {
      error.capture();
    }
  }
};

void sequence_job_fn(void* ctx, int tid, int) { static_cast<SequenceJob*>(ctx)->run(tid); }

// One sequence through every layer, its tokens split over the threads in blocks (token parallelism), in one job.
// Per layer, phase A computes the Q/K/V rows of a block (once that block is through the previous layer); phase B,
// once every block's Q/K/V of the layer is written, the block's attention queries (over all keys) and the rest of
// the layer for its rows. Only the K/V rows cross between threads, and that is the only wait: a thread done with
// its blocks of layer l goes on to their Q/K/V of layer l + 1 while another still runs layer l, so the Q/K/V (and
// the other intermediates) alternate between two sets of buffers by layer parity (layer l + 2 can only start once
// every block is through layer l + 1, hence every reader of layer l's K/V is done). A thread waits only for blocks
// another thread has started, so a thread that never joins cannot stall the others.
struct TokenJob {
  const EncoderLayerCall* calls;
  int layers;
  int64_t b;  // the sequence
  int64_t block_rows, blocks;
  int threads;
  const char* packed;  // per layer: packs_qkv
  CallKernels kernels;
  bool fm;  // feature-major tiles (every layer; block_rows a multiple of 16)
  char* bufs[2];  // whole-sequence buffers (ChunkBuffers) of even and odd layers; each block writes its own rows
  int64_t* prof;  // threads x kProfileRow counters, or null
  // per layer: blocks whose phase A was taken / is done, whose phase B was taken; per layer x block: phase B done
  std::atomic<int64_t>*next_a, *done_a, *next_b;
  std::atomic<int>* done_b;
  FirstError error;

  template <class Ready>
  void wait(Ready ready) {
    for (int spins = 1; !ready() && !error.any(); ++spins) spin_wait(spins);
  }

  void run(int tid) {
    int64_t* row = prof ? prof + tid * kProfileRow : nullptr;
    StepTimer timer(row);
    for (int l = 0; l < layers; ++l) {
      const EncoderLayerCall& c = calls[l];
      const ChunkBuffers buf(c, c.seq, bufs[l & 1]);
      const int64_t w = c.width, hidden = c.hidden, row0 = b * c.seq;
      const FmLayer fml = fm_layer(fm, l, layers);
      for (;;) {
        const int64_t i = next_a[l].fetch_add(1, std::memory_order_relaxed);
        if (i >= blocks) break;
        if (row) row[kJoined] = 1;  // (a thread that ran nothing stays out of the profile's mean)
        if (l > 0) {
          wait([&] { return done_b[(l - 1) * blocks + i].load(std::memory_order_acquire) != 0; });
          timer.done(kStepWait);
        }
        const int64_t r0 = i * block_rows, rows = std::min(block_rows, c.seq - r0);
        try {
          if (error.any()) {
          } else if (fml.on) {
            const QkvPackedOut layout = packed_layout(c, kernels, buf.qkv, r0);
            fm_qkv(c, kernels, fml.in, c.x + (row0 + r0) * hidden, rows, packed[l] ? &layout : nullptr,
                   buf.qkv + r0 * 3 * w);
          } else if (packed[l]) {
            c.qkv_packed(c.x + (row0 + r0) * hidden, rows, packed_layout(c, kernels, buf.qkv, r0), 1);
          } else {
            c.qkv(c.x + (row0 + r0) * hidden, rows, buf.qkv + r0 * 3 * w, 1);
          }
        } catch (...) {
          error.capture();
        }
        done_a[l].fetch_add(1, std::memory_order_release);
        timer.done(kStepQkv);
      }
      wait([&] { return done_a[l].load(std::memory_order_acquire) >= blocks; });
      timer.done(kStepWait);
      for (;;) {
        const int64_t i = next_b[l].fetch_add(1, std::memory_order_relaxed);
        if (i >= blocks) break;
        const int64_t r0 = i * block_rows, rows = std::min(block_rows, c.seq - r0);
        try {
          if (!error.any()) {
            AttnCall at = attention_call(c, buf.qkv, buf.ctx, b, 1);
            const QkvPackedOut layout = packed_layout(c, kernels, buf.qkv, 0);
            at.kernels = kernels.attention;
            if (packed[l]) at.packed = &layout;
            at.q_begin = r0;
            at.q_end = r0 + rows;
            attention(at, 1);
            timer.done(kStepAttention);
            if (fml.on) {
              fm_finish(c, kernels, buf.ctx + r0 * w, fml, c.x + (row0 + r0) * hidden, c.y + (row0 + r0) * hidden,
                        rows, timer);
            } else {
              finish_rows(c, buf.ctx + r0 * w, c.x + (row0 + r0) * hidden, buf.a + r0 * hidden,
                          c.y + (row0 + r0) * hidden, rows, 1, timer);
            }
          }
        } catch (...) {
          error.capture();
        }
        done_b[l * blocks + i].store(1, std::memory_order_release);
      }
    }
  }
};

void token_job_fn(void* ctx, int tid, int) { static_cast<TokenJob*>(ctx)->run(tid); }

// Sequence b alone through every layer on `threads` threads, token parallel (see TokenJob).
void run_sequence_tokens(const EncoderLayerCall* calls, int layers, const char* packed, const CallKernels& kernels,
                         bool fm, int64_t b, int threads, int64_t* profile_ns) {
  const EncoderLayerCall& c = calls[0];
  TokenJob job;
  job.calls = calls;
  job.layers = layers;
  job.packed = packed;
  job.kernels = kernels;
  job.fm = fm;
  job.b = b;
  job.threads = threads;
  // threads x k blocks of nearly equal size, k the fewest that keeps a block within chunk_tokens
  const int64_t per_thread = (c.seq + threads - 1) / threads;
  const int64_t k = (per_thread + c.chunk_tokens - 1) / std::max<int64_t>(1, c.chunk_tokens);
  job.block_rows = (c.seq + threads * k - 1) / (threads * k);
  // Whole 16-token vectors per block for fm tiles (seq is a multiple of 16 then), and the packed Q/K/V writers'
  // token granule (QkvPackedOut::token_granule)
  int64_t gran = fm ? 16 : 1;
  for (int l = 0; l < layers; ++l) {
    if (packed[l]) gran = std::max(gran, packed_layout(calls[l], kernels, nullptr, 0).token_granule);
  }
  job.block_rows = (job.block_rows + gran - 1) / gran * gran;
  job.blocks = (c.seq + job.block_rows - 1) / job.block_rows;
  size_t buf_bytes = 0;  // the widest layer's
  for (int l = 0; l < layers; ++l) buf_bytes = std::max(buf_bytes, align64(ChunkBuffers::bytes(calls[l], c.seq)));
  const size_t counters = align64(static_cast<size_t>(3 * layers) * sizeof(std::atomic<int64_t>));
  const size_t flags = align64(static_cast<size_t>(layers * job.blocks) * sizeof(std::atomic<int>));
  const size_t prof_bytes = static_cast<size_t>(threads) * kProfileRow * sizeof(int64_t);
  char* p = t_layer.get(2 * buf_bytes + counters + flags + prof_bytes);
  job.bufs[0] = p;
  job.bufs[1] = layers > 1 ? p + buf_bytes : p;
  auto* atomics = reinterpret_cast<std::atomic<int64_t>*>(p + 2 * buf_bytes);
  for (int i = 0; i < 3 * layers; ++i) new (&atomics[i]) std::atomic<int64_t>(0);
  job.next_a = atomics;
  job.done_a = atomics + layers;
  job.next_b = atomics + 2 * layers;
  job.done_b = reinterpret_cast<std::atomic<int>*>(p + 2 * buf_bytes + counters);
  for (int64_t i = 0; i < layers * job.blocks; ++i) new (&job.done_b[i]) std::atomic<int>(0);
  job.prof = profile_ns ? reinterpret_cast<int64_t*>(p + 2 * buf_bytes + counters + flags) : nullptr;
  if (job.prof) std::fill_n(job.prof, threads * kProfileRow, int64_t{0});
  parallel_run(threads, token_job_fn, &job);
  job.error.rethrow();
  if (profile_ns) add_mean(profile_ns, threads, [&](int t) { return job.prof + t * kProfileRow; });
}

}  // namespace

int encoder_layer(const EncoderLayerCall& c, int nthreads, int64_t* profile_ns) {
  return encoder_stack(&c, 1, nthreads, profile_ns);
}

int encoder_stack(const EncoderLayerCall* calls, int layers, int nthreads, int64_t* profile_ns) {
  const EncoderLayerCall& c = calls[0];
  if (layers <= 0 || c.batch <= 0 || c.seq <= 0) return 0;
  int used = 0;
  const int nt = std::max(1, nthreads);
  // decided once per call, with the kernel tables of this call
  const AttnKernels& attn = active_attn_kernels();
  const CallKernels kernels{&active_kernels(), &attn, c.attention_int8 ? &active_attn_int8_kernels() : &attn};
  std::vector<char> packed(static_cast<size_t>(layers));
  for (int l = 0; l < layers; ++l) {
    packed[l] = packs_qkv(calls[l], kernels);
    if (packed[l]) used |= kPackedQkv;
  }
  // Feature-major tiles for whole chunks and token blocks (not for steps split over threads): every chunk and block
  // a multiple of 16 tokens, the intermediate outputs 64-byte aligned (fm tiles are read with aligned loads).
  bool fm = c.seq % 16 == 0;
  for (int l = 0; l < layers; ++l) {
    const bool aligned = l + 1 == layers || reinterpret_cast<uintptr_t>(calls[l].y) % 64 == 0;
    fm = fm && aligned && fm_capable(calls[l], kernels);
  }
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(c.batch, c.chunk_tokens / c.seq));
  size_t chunk_bytes = 0;  // the buffers of a chunk of `per` sequences, the widest layer's
  for (int l = 0; l < layers; ++l) chunk_bytes = std::max(chunk_bytes, ChunkBuffers::bytes(calls[l], per * c.seq));
  int64_t split = 0;  // the first `split` sequences go to threads whole (never leaving a thread without one)
  if (c.split_sequences && nt > 1 && c.batch >= nt && (c.batch / nt) * c.seq >= kMinTokensPerThread) {
    split = c.batch / nt * nt;
    // Chunks of `unit` sequences, as many as possible up to `per`, and a number of chunks every thread gets
    // equally many of (unit 1 always qualifies: split is a multiple of threads).
    int64_t unit = std::min<int64_t>(per, split / nt);
    while (unit > 1 && (split % unit != 0 || (split / unit) % nt != 0)) --unit;
    SequenceJob job;
    job.calls = calls;
    job.layers = layers;
    job.packed = packed.data();
    job.kernels = kernels;
    job.fm = fm;
    job.unit = unit;
    job.chunks = split / unit;
    job.threads = nt;
    job.profile = profile_ns != nullptr;
    job.slot_bytes = 128 + align64(chunk_bytes);
    const size_t state_bytes = align64(static_cast<size_t>(job.chunks) * sizeof(std::atomic<int>));
    char* p = t_layer.get(job.slot_bytes * nt + state_bytes);
    job.scratch = p;
    job.state = reinterpret_cast<std::atomic<int>*>(p + job.slot_bytes * nt);
    for (int64_t i = 0; i < job.chunks; ++i) new (&job.state[i]) std::atomic<int>(0);
    for (int t = 0; t < job.threads; ++t) std::fill_n(job.counters(t), kProfileRow, int64_t{0});
    parallel_run(job.threads, sequence_job_fn, &job);
    job.error.rethrow();
    // the threads ran side by side: each step's share of the wall time is its mean over them
    if (profile_ns) add_mean(profile_ns, job.threads, [&](int t) { return job.counters(t); });
    used |= kSequenceParallel | (fm ? kFeatureMajor : 0);
  }
  if (split == c.batch) return used;
  // The rest: one sequence at a time through every layer with its tokens split over the threads, or, for short
  // sequences (or split_sequences off), layer after layer in chunks with every step split over the threads.
  if (c.split_sequences && nt > 1 && c.seq / nt >= kMinTokensPerThread) {
    for (int64_t b = split; b < c.batch; ++b) {
      run_sequence_tokens(calls, layers, packed.data(), kernels, fm, b, nt, profile_ns);
    }
    return used | kTokenParallel | (fm ? kFeatureMajor : 0);
  }
  // (fm tiles on one thread only: the chunks are the same in every layer, so their tiles are too)
  const bool fm_steps = fm && nt == 1;
  for (int l = 0; l < layers; ++l) {
    const ChunkBuffers buf(calls[l], per * c.seq, t_layer.get(chunk_bytes));
    for (int64_t b0 = split; b0 < c.batch; b0 += per) {
      run_chunk(calls[l], b0, std::min(per, c.batch - b0), nt, buf, packed[l] != 0, kernels, profile_ns,
                fm_layer(fm_steps, l, layers));
    }
  }
  return used | kStepParallel | (fm_steps ? kFeatureMajor : 0);
}

}  // namespace hf_sparse
