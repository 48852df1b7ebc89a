// A small persistent thread pool (std::thread), so the extension never loads a second OpenMP runtime beside the
// one in torch's wheel.
//
// Workers spin for a short while after each job (a BERT forward calls the kernels back to back), yielding the
// core, then sleep on a condition variable. Only one job runs at a time: a caller that finds the pool busy (another
// Python thread) runs its job alone on its own thread, which is correct, just not parallel.
#pragma once

#include <atomic>
#include <cstdint>

namespace hf_sparse {

// A job: fn(ctx, tid, nthreads) runs once for each tid in 0..nthreads-1; tid 0 runs on the calling thread.
using JobFn = void (*)(void* ctx, int tid, int nthreads);

// A reusable spin barrier for the threads of one job (phase 1: quantize, phase 2: multiply).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait();

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
};

// Runs fn on up to nthreads threads (fewer when the pool is busy) and returns when all are done. Returns the
// number of threads that ran it.
int parallel_run(int nthreads, JobFn fn, void* ctx);

// Microseconds a worker spins before sleeping (HF_SPARSE_SPIN_US, default 50; 0 sleeps at once).
void set_spin_us(int us);
int spin_us();

// Worker threads started so far (grows on demand; tests and the interference benchmark read it).
int pool_size();

// Relax the CPU inside a spin loop.
void cpu_relax();

}  // namespace hf_sparse
