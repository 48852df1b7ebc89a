// Memory the kernels read and write in bulk: packed weights (bindings.cpp) and per-thread scratch (linear.cpp,
// attention.cpp). Baseline code only: the per-ISA kernel files must not include this (see common.h on sharing
// inline code across ISA flags).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hf_sparse {

constexpr size_t kHugePage = size_t{2} << 20;

// 64-byte aligned memory; from 2 MB up on Linux, 2 MB aligned and advised for transparent huge pages before it is
// first touched: the kernels stream through weights and activation tiles of several MB, and 2 MB pages save the
// TLB misses of 4 KB ones. (Its effect on a BERT forward is not established: benchmarks/RESULTS.md.) Where THP is
// "never", madvise does nothing. Free with scratch_aligned_free.
inline void* scratch_aligned_malloc(size_t bytes) {
#if defined(_MSC_VER)
  return _aligned_malloc(bytes, 64);
#else
#if defined(__linux__)
  if (bytes >= kHugePage) {
    const size_t cap = (bytes + kHugePage - 1) & ~(kHugePage - 1);
    void* p = std::aligned_alloc(kHugePage, cap);
    if (p) madvise(p, cap, MADV_HUGEPAGE);
    return p;
  }
#endif
  return std::aligned_alloc(64, (bytes + 63) & ~size_t{63});
#endif
}

inline void scratch_aligned_free(void* p) {
#if defined(_MSC_VER)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// HF_SPARSE_POISON_SCRATCH=1 (read once; for tests): every ScratchBuffer::get fills the bytes asked for with 0xff
// (NaN as float32 and as bfloat16), so a kernel that reads scratch it did not write shows it in its output.
inline bool poison_scratch() {
  static const bool on = [] {
    const char* v = std::getenv("HF_SPARSE_POISON_SCRATCH");
    return v && v[0] == '1';
  }();
  return on;
}

// A grow-only 64-byte aligned buffer owned by the calling thread. A kernel call takes all its scratch from the
// caller's buffer before its job starts, so its workers never allocate; a whole-layer job (encoder_layer.cpp) runs
// kernel calls on its workers, which then use their own buffers and catch what they throw (the caller rethrows).
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { scratch_aligned_free(p_); }
  char* get(size_t bytes) {
    if (bytes > cap_) {
      scratch_aligned_free(p_);
      p_ = nullptr;
      cap_ = 0;
      const size_t cap = (bytes + 4095) & ~size_t{4095};  // whole pages: fewer regrowths
      p_ = scratch_aligned_malloc(cap);
      if (!p_) throw std::bad_alloc();
      cap_ = cap;
    }
    if (poison_scratch()) std::memset(p_, 0xff, bytes);
    return static_cast<char*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace hf_sparse
