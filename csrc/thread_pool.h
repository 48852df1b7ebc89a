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

// A job: fn(ctx, tid, nthreads) runs on the calling thread (tid 0) and on the workers that join in time. A job
// must take its work from a shared counter, never rely on a fixed share per tid: a worker whose core is busy with
// another process may join late or not at all, and the caller does not wait for it.
using JobFn = void (*)(void* ctx, int tid, int nthreads);

// Runs fn on the caller and up to nthreads - 1 workers, and returns when the caller is done and every worker that
// joined has finished (workers that had not joined by then stay out). tids are distinct and below nthreads, and
// an OS thread gets the same tid from one call to the next where the runtime allows (pool workers: always;
// torch's OpenMP: through omp_get_thread_num, the caller being 0).
void parallel_run(int nthreads, JobFn fn, void* ctx);

// Where the threads come from. auto: torch's OpenMP threads when the process has libgomp loaded (found with
// dlsym, never linked), else the pool. pool: always the pool. openmp: torch's OpenMP or an error.
// HF_SPARSE_THREADS=auto|pool|openmp sets it at load time.
enum : int { kBackendAuto = 0, kBackendPool = 1, kBackendOpenMP = 2 };
void set_backend(int backend);
const char* backend_name();  // what parallel calls use now: "openmp" or "pool"

// Microseconds a worker spins before sleeping (HF_SPARSE_SPIN_US, default 50; 0 sleeps at once).
void set_spin_us(int us);
int spin_us();

// Worker threads started so far (grows on demand; tests and the interference benchmark read it).
int pool_size();

// Relax the CPU inside a spin loop.
void cpu_relax();

// Step `spins` (counted from 1) of a wait on another thread: cpu_relax, and every 256 steps yield the core (the
// thread waited for may share it).
void spin_wait(int spins);

}  // namespace hf_sparse
