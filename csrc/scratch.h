// Per-thread scratch for the drivers (linear.cpp, attention.cpp), which are compiled without ISA flags: the
// per-ISA kernel files must not include this (see common.h on sharing inline code across ISA flags).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace hf_sparse {

inline void* scratch_aligned_malloc(size_t bytes) {
#if defined(_MSC_VER)
  return _aligned_malloc(bytes, 64);
#else
  return std::aligned_alloc(64, bytes);
#endif
}

inline void scratch_aligned_free(void* p) {
#if defined(_MSC_VER)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// A grow-only 64-byte aligned buffer owned by the calling thread. All scratch of a call comes from the caller's
// buffer before the job starts, so workers never allocate (and never throw).
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
    return static_cast<char*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace hf_sparse
