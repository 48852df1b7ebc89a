// Code generated per int8 4-block weight for AVX-512 VNNI (see jit_block4.cpp). Baseline code only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"

namespace hf_sparse {

class JitBlock4 {
 public:
  // Generated code for w (4-block, not quads), or null where it cannot run (not x86-64 Linux, no AVX-512 VNNI,
  // HF_SPARSE_JIT=0, executable memory refused): the loops in kernels_avx512.cpp then run.
  static std::unique_ptr<JitBlock4> build(const SparseI8& w);
  ~JitBlock4();
  JitBlock4(const JitBlock4&) = delete;
  JitBlock4& operator=(const JitBlock4&) = delete;

  const JitGroup* groups() const { return groups_.data(); }
  size_t bytes() const { return code_bytes_ + weights_.size() * sizeof(int32_t); }  // code + reordered values

 private:
  JitBlock4() = default;
  void* code_ = nullptr;
  size_t mapped_ = 0, code_bytes_ = 0;
  std::vector<int32_t> weights_;
  std::vector<JitGroup> groups_;
};

void set_jit_enabled(bool on);
// Whether packing generates code here (CPU, platform, HF_SPARSE_JIT; not whether the memory will be granted).
bool jit_available();
int64_t jit_calls();
int64_t jit_pair_calls();  // products that ran two tiles through each group's code

}  // namespace hf_sparse
