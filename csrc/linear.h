// Drivers: split one linear call into tiles and thread shares, quantize activations, call the active ISA's kernels.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace hf_sparse {

// Every driver computes out[m][n] for m < m_rows, n < w.n from x (m_rows, w.k) row-major fp32 (row stride ldx),
// using up to `nthreads` threads. out.ldy is the output row stride.
void linear_i8_sparse(const SparseI8& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out,
                      int nthreads);
void linear_i8_dense(const DenseI8& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out, int nthreads);
// Fused FFN: out = second(act1(first(x))) for two int8 4-block weights (w1.n == w2.k), without the hidden
// activations ever leaving a thread's scratch in float32 (M, hidden) form; results identical to the two calls.
void linear_i8_ffn(const SparseI8& w1, int act1, const SparseI8& w2, const float* x, int64_t ldx, int64_t m_rows,
                   const Output& out, int nthreads);
void linear_f32_sparse(const SparseF32& w, const float* x, int64_t ldx, int64_t m_rows, const Output& out,
                       int nthreads);

// Kernel calls so far per instruction set name, then "few_tokens:<isa>" for the few-token kernel alone (tests
// assert that the fast path ran).
std::vector<std::pair<std::string, int64_t>> kernel_calls();

// Counts one call of isa's kernels (kernel_calls) made outside these drivers (the encoder's feature-major tiles).
void count_kernel_call(const IsaKernels& isa);

// Quantize x per token like the kernels do (codes as int8, scales as fp32): a debug entry for the tests.
void quantize_rows_i8(const float* x, int64_t ldx, int64_t m_rows, int64_t k, int8_t* q, float* scale);

}  // namespace hf_sparse
