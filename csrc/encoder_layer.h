// A whole post-LayerNorm encoder layer (BERT family) on the kernels, and how its work is split over threads.
//
// Plain declarations only (see common.h). The Linear steps come in as callables, and as plain weight views
// (common.h) for the feature-major path, so this file knows nothing of how weights are packed or of Python.
#pragma once

#include <cstdint>
#include <functional>

#include "common.h"

namespace hf_sparse {

// Sequences shorter than this keep float32 Q/K/V rows (EncoderLayerCall::qkv_packed): the packed layouts pad each
// sequence to 16 tokens (bf16 V: 32), and the tokens of short sequences would each fill cache lines of their own
// (measured slower at 1-8 tokens, faster from 32 on, with bf16: benchmarks/RESULTS.md).
constexpr int64_t kMinPackedSeq = 32;

// One Linear step: y (m rows, row stride = its output width) from x (m rows, row stride = its input width), on up
// to nthreads threads. Called from worker threads too, without the GIL.
using LinearStep = std::function<void(const float* x, int64_t m, float* y, int nthreads)>;
// The Q/K/V step written straight into the attention's packed inputs (common.h, QkvPackedOut).
using QkvPackedStep = std::function<void(const float* x, int64_t m, const QkvPackedOut& out, int nthreads)>;

// Steps in the order they run (kStepWait: a token block's wait for the other blocks' K/V, token parallelism only);
// profile counters are indexed the same way.
enum LayerStep : int {
  kStepQkv = 0,
  kStepWait,
  kStepAttention,
  kStepOut,
  kStepNorm1,
  kStepFfn,
  kStepNorm2,
  kLayerSteps
};

// y = LN2(ffn(a) + a) with a = LN1(out(attention(qkv(x))) + x) over `batch` sequences of `seq` tokens.
struct EncoderLayerCall {
  LinearStep qkv;  // hidden -> 3 * width (Q, K, V side by side)
  LinearStep out;  // width -> hidden
  LinearStep ffn;  // hidden -> hidden (the whole FFN)
  // qkv into the attention's packed layout, when its weight's kernels can write it (else null). Used when pack_qkv
  // is set, head_dim is a multiple of 16 and the active attention kernel reads packed inputs: Q/K/V then never
  // exist as float32 rows, and the attention packs nothing.
  QkvPackedStep qkv_packed;
  bool pack_qkv = true;
  // The four weights when all are int8 4-block and the FFN is fused (else null), with the activations of out, the
  // FFN's first and its second weight: whole chunks and token blocks then run on feature-major tiles where the
  // kernels have them (encoder_layer.cpp, "Feature-major tiles"), unless feature_major is off.
  const SparseI8 *w_qkv = nullptr, *w_out = nullptr, *w_ffn1 = nullptr, *w_ffn2 = nullptr;
  int act_out = 0, act1 = 0, act2 = 0;
  bool feature_major = true;
  int64_t hidden = 0, width = 0, heads = 0, head_dim = 0;
  float scale = 1.0f;
  int mask_kind = 0;              // MaskKind (attention.h)
  const void* mask = nullptr;     // element (b, h, i, j) at b * mask_sb + h * mask_sh + i * mask_sq + j
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0;
  const float *gamma1 = nullptr, *beta1 = nullptr, *gamma2 = nullptr, *beta2 = nullptr;
  float eps1 = 1e-12f, eps2 = 1e-12f;
  const float* x = nullptr;  // (batch * seq, hidden)
  float* y = nullptr;        // (batch * seq, hidden), not aliasing x
  int64_t batch = 0, seq = 0;
  int64_t chunk_tokens = 128;  // whole sequences per chunk, about this many tokens
  bool split_sequences = true;  // false: always split every step over the threads (kStepParallel) instead
  // int8 attention (docs/kernels.md, "int8 attention") instead of bf16; the same for every layer of a stack.
  bool attention_int8 = false;
};

// How a call's work was split over the threads (encoder_layer returns the ones it used, or-ed).
enum LayerParallelism : int {
  kSequenceParallel = 1,  // whole chunks of sequences per thread
  kTokenParallel = 2,     // one sequence at a time, its tokens in blocks per thread (only K/V rows are shared)
  kStepParallel = 4,      // each step split over the threads (also: one thread)
  kPackedQkv = 8,         // (not a split) Q/K/V went straight into the attention's packed layout (qkv_packed)
  kFeatureMajor = 16,     // (not a split) the steps ran on feature-major tiles
};

// Runs the layer and returns the LayerParallelism flags it used. With profile_ns (kLayerSteps counters) each
// step's share of the wall time is added, in nanoseconds (with several threads each running its own work: the
// mean over the threads that took part of the time each spent in that step; with token parallelism "qkv" includes
// the wait for the other blocks' Q/K/V).
int encoder_layer(const EncoderLayerCall& call, int nthreads, int64_t* profile_ns);

// Layers calls[0 .. layers-1] one after the other: calls[l].x must be calls[l-1].y, and every call has the same
// batch, seq, mask, chunk_tokens and split_sequences. With sequence parallelism a chunk of sequences goes on to the
// next layer as soon as it is through the previous one: no thread waits for the others between layers (a thread
// that runs out of its own chunks takes another thread's next one). Same results as calling encoder_layer per
// layer; profile counters are summed over the layers.
int encoder_stack(const EncoderLayerCall* calls, int layers, int nthreads, int64_t* profile_ns);

}  // namespace hf_sparse
