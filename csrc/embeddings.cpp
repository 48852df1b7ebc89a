// Driver of the fused embeddings: tokens in chunks over the threads, each token gathered, summed and normalized
// in its output row while it is in L1.
#include "embeddings.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "attention.h"
#include "thread_pool.h"

namespace hf_sparse {
namespace {

constexpr int64_t kChunkTokens = 16;
// Below about this many floats per thread (a few rows' gather + LayerNorm), another thread costs more than it saves.
constexpr double kGrainFloats = 16384.0;

std::atomic<int64_t> g_calls{0};

struct EmbedJob {
  const EmbedCall* c;
  const AttnKernels* kern;
  const int64_t* pos_buf;  // positions computed from the ids (RoBERTa's rule), or null
  std::atomic<int64_t>* next;
  std::mutex* mu;
  EmbedError* err;
  int64_t err_token;  // flat index of err's token (under mu)

  void fail(const char* tensor, int64_t t, int64_t value, int64_t limit) {
    std::lock_guard<std::mutex> lock(*mu);
    if (err->tensor != nullptr && err_token <= t) return;
    *err = EmbedError{tensor, t / c->seq, t % c->seq, value, limit};
    err_token = t;
  }

  int64_t word_id(int64_t t) const {
    return c->ids[(t / c->seq) * c->ids_sb + (t % c->seq) * c->ids_ss];
  }

  void prefetch_word(int64_t t) const {
    const int64_t id = word_id(t);
    if (id < 0 || id >= c->word.rows) return;
    const char* row = c->word.f32 ? reinterpret_cast<const char*>(c->word.f32 + id * c->n)
                                  : reinterpret_cast<const char*>(c->word.codes + id * c->n);
    const int64_t bytes = c->word.f32 ? c->n * 4 : c->n;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
  }

  // Row i of a table as float32: in place, or dequantized into tmp.
  const float* row(const EmbedTable& table, int64_t i, float* tmp) const {
    const int64_t n = c->n;
    if (table.f32) return table.f32 + i * n;
    const int8_t* q = table.codes + i * n;
    const float scale = table.scale[i];
    for (int64_t j = 0; j < n; ++j) tmp[j] = static_cast<float>(q[j]) * scale;
    return tmp;
  }

  // False (and err set) when an index of token t is out of range. tmp: n floats.
  bool token(int64_t t, float* tmp) {
    const EmbedCall& e = *c;
    const int64_t b = t / e.seq, s = t % e.seq, n = e.n;
    const int64_t id = word_id(t);
    if (id < 0 || id >= e.word.rows) return fail("input_ids", t, id, e.word.rows), false;
    const int64_t pos = pos_buf ? pos_buf[t] : e.pos_ids[b * e.pos_sb + s * e.pos_ss];
    if (pos < 0 || pos >= e.position.rows) return fail("position_ids", t, pos, e.position.rows), false;
    int64_t tid = -1;
    if (e.type.rows > 0) {
      if (e.type_by_position) {
        if (pos >= e.type_ids_len) return fail("position_ids", t, pos, e.type_ids_len), false;
        tid = e.type_ids[pos];
      } else {
        tid = e.type_ids[b * e.type_sb + s * e.type_ss];
      }
      if (tid < 0 || tid >= e.type.rows) return fail("token_type_ids", t, tid, e.type.rows), false;
    }
    float* y = e.y + t * n;
    // torch's order: (word + type) + position, each sum rounded (the position is added by add_layernorm)
    const float* w = row(e.word, id, y);
    if (tid >= 0) {
      const float* ty = row(e.type, tid, tmp);
      for (int64_t j = 0; j < n; ++j) y[j] = w[j] + ty[j];
    } else if (w != y) {
      std::copy(w, w + n, y);
    }
    kern->add_layernorm(y, n, row(e.position, pos, tmp), n, 1, n, e.gamma, e.beta, e.eps, y, n);
    return true;
  }

  void run() {
    const int64_t tokens = c->batch * c->seq;
    std::vector<float> tmp(static_cast<size_t>(c->n));  // an int8 table's rows, dequantized
    for (;;) {
      const int64_t t0 = next->fetch_add(kChunkTokens, std::memory_order_relaxed);
      if (t0 >= tokens) return;
      const int64_t t1 = std::min(tokens, t0 + kChunkTokens);
      for (int64_t t = t0; t < t1; ++t) {
        if (t + 1 < t1) prefetch_word(t + 1);  // the next row comes from DRAM while this one is normalized
        if (!token(t, tmp.data())) return;
      }
    }
  }
};

void embed_job_fn(void* ctx, int, int) { static_cast<EmbedJob*>(ctx)->run(); }

// RoBERTa's create_position_ids_from_input_ids: (cumsum(id != pad) + past) * (id != pad) + pad, per sequence.
std::vector<int64_t> positions_from_padding(const EmbedCall& c) {
  std::vector<int64_t> pos(static_cast<size_t>(c.batch * c.seq));
  for (int64_t b = 0; b < c.batch; ++b) {
    int64_t count = 0;
    for (int64_t s = 0; s < c.seq; ++s) {
      const bool real = c.ids[b * c.ids_sb + s * c.ids_ss] != c.padding_idx;
      count += real;
      pos[b * c.seq + s] = real ? count + c.past + c.padding_idx : c.padding_idx;
    }
  }
  return pos;
}

}  // namespace

EmbedError embed_layernorm(const EmbedCall& c, int nthreads) {
  EmbedError err;
  const int64_t tokens = c.batch * c.seq;
  if (tokens <= 0 || c.n <= 0) return err;
  g_calls.fetch_add(1, std::memory_order_relaxed);
  std::vector<int64_t> pos;
  if (c.pos_ids == nullptr) pos = positions_from_padding(c);
  const double work = static_cast<double>(tokens) * static_cast<double>(c.n);
  const int nt = work < 2.0 * kGrainFloats ? 1 : static_cast<int>(std::min<double>(nthreads, work / kGrainFloats));
  std::atomic<int64_t> next{0};
  std::mutex mu;
  EmbedJob job{&c, &active_attn_kernels(), pos.empty() ? nullptr : pos.data(), &next, &mu, &err, 0};
  parallel_run(std::max(1, nt), embed_job_fn, &job);
  return err;
}

int64_t embed_calls() { return g_calls.load(); }

}  // namespace hf_sparse
