#include "thread_pool.h"

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>
#define HF_SPARSE_POSIX 1
#endif

namespace hf_sparse {

void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

void spin_wait(int spins) {
  cpu_relax();
  if ((spins & 255) == 0) std::this_thread::yield();
}

namespace {

using Clock = std::chrono::steady_clock;

int env_spin_us() {
  const char* s = std::getenv("HF_SPARSE_SPIN_US");
  if (!s || !*s) return 50;
  const int v = std::atoi(s);
  return v < 0 ? 0 : v;
}

std::atomic<int> g_spin_us{env_spin_us()};

// Spin on `done()` for about `us` microseconds, giving the core away now and then so that a thread of torch's
// OpenMP pool that shares this core is not starved. Returns whether done() became true.
template <class F>
bool spin_until(F done, int us) {
  if (us <= 0) return done();
  const auto deadline = Clock::now() + std::chrono::microseconds(us);
  for (int i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if ((i & 63) == 0) {
      if (Clock::now() > deadline) return done();
      std::this_thread::yield();
    }
  }
}

class Pool {
 public:
  void run(int nthreads, JobFn fn, void* ctx) {
    if (nthreads <= 1) {
      fn(ctx, 0, 1);
      return;
    }
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) {
      // Another thread is using the pool: this caller does the whole job alone.
      fn(ctx, 0, 1);
      return;
    }
    ensure_workers(nthreads - 1);
    // Seqlock publication: an odd generation means "being written"; a worker reads the fields (and `closed_`)
    // between two equal even generations, else again, so it never pairs one job's context with another's state.
    const uint64_t g = generation_.load(std::memory_order_relaxed);
    generation_.store(g + 1, std::memory_order_seq_cst);
    fn_.store(fn, std::memory_order_seq_cst);
    ctx_.store(ctx, std::memory_order_seq_cst);
    nthreads_.store(nthreads, std::memory_order_seq_cst);
    closed_.store(false, std::memory_order_seq_cst);
    {
      // Under the lock, so a worker about to sleep either sees the new generation or is woken below.
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      generation_.store(g + 2, std::memory_order_seq_cst);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) sleep_cv_.notify_all();
    fn(ctx, 0, nthreads);
    // Shut the door, then wait for the workers inside. A worker increments `active_` before it looks at `closed_`
    // (both sequentially consistent), so it either is counted here or sees the door shut and stays out.
    closed_.store(true, std::memory_order_seq_cst);
    for (int i = 1; active_.load(std::memory_order_seq_cst) != 0; ++i) {
      cpu_relax();
      if ((i & 255) == 0) std::this_thread::yield();
    }
  }

  int size() {
    std::lock_guard<std::mutex> lk(grow_mutex_);
    return static_cast<int>(workers_.size());
  }

  // After fork() only the forking thread exists in the child: forget the workers without touching them (a
  // std::thread destructor would terminate the child), and make the locks usable again.
  void reset_after_fork() {
    new (&run_mutex_) std::mutex();
    new (&grow_mutex_) std::mutex();
    new (&sleep_mutex_) std::mutex();
    new (&sleep_cv_) std::condition_variable();
    new (&workers_) std::vector<std::thread*>();
    sleepers_.store(0);
    active_.store(0);
  }

 private:
  void ensure_workers(int n) {
    std::lock_guard<std::mutex> lk(grow_mutex_);
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size()) + 1;
      // The generation before this call publishes its job: a worker that starts late must still see that job.
      const uint64_t seen = generation_.load(std::memory_order_acquire) & ~uint64_t{1};
      auto* t = new std::thread([this, id, seen] { worker(id, seen); });
      t->detach();
      workers_.push_back(t);
    }
  }

  bool published(uint64_t seen) const {
    const uint64_t g = generation_.load(std::memory_order_acquire);
    return g != seen && (g & 1) == 0;
  }

  void worker(int id, uint64_t seen) {
    for (;;) {
      if (!spin_until([&] { return published(seen); }, g_spin_us.load(std::memory_order_relaxed))) {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        sleep_cv_.wait(lk, [&] { return published(seen); });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
      }
      active_.fetch_add(1, std::memory_order_seq_cst);
      JobFn fn;
      void* ctx;
      int nt;
      bool closed;
      uint64_t g;
      for (;;) {
        g = generation_.load(std::memory_order_seq_cst);
        if (g & 1) {
          cpu_relax();
          continue;
        }
        fn = fn_.load(std::memory_order_seq_cst);
        ctx = ctx_.load(std::memory_order_seq_cst);
        nt = nthreads_.load(std::memory_order_seq_cst);
        closed = closed_.load(std::memory_order_seq_cst);
        if (generation_.load(std::memory_order_seq_cst) == g) break;
      }
      seen = g;
      // Join only a job that is still open (the caller may have finished it alone) and that wants this worker.
      if (!closed && id < nt) fn(ctx, id, nt);
      active_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex run_mutex_, grow_mutex_, sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::vector<std::thread*> workers_;  // detached; kept only to count them
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> active_{0};    // workers inside the current job
  std::atomic<bool> closed_{true};  // the caller is done: late workers stay out
  std::atomic<JobFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> nthreads_{0};
};

std::atomic<bool> g_forked{false};

// Never destroyed: joining workers from a static destructor at interpreter exit can hang.
Pool* pool() {
  static Pool* p = [] {
    Pool* created = new Pool();
#if HF_SPARSE_POSIX
    pthread_atfork(nullptr, nullptr, [] {
      g_forked.store(true);
      pool()->reset_after_fork();
    });
#endif
    return created;
  }();
  return p;
}

// torch's own OpenMP runtime, when the process has one (torch's Linux wheels load libgomp globally): running the
// jobs on its threads means no second set of threads competing for the cores with torch's spinning OpenMP
// workers between torch ops and ours. Looked up, never linked: no second OpenMP runtime is ever loaded.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

GompParallel gomp_parallel() {
#if HF_SPARSE_POSIX
  static const GompParallel f = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  return f;
#else
  return nullptr;
#endif
}

int env_backend() {
  const char* s = std::getenv("HF_SPARSE_THREADS");
  if (s && std::string(s) == "pool") return kBackendPool;
  if (s && std::string(s) == "openmp") return kBackendOpenMP;
  return kBackendAuto;
}

std::atomic<int> g_backend{env_backend()};

struct GompJob {
  JobFn fn;
  void* ctx;
  int nthreads;
  std::atomic<int> next_tid{0};
};

using OmpThreadNum = int (*)();

OmpThreadNum omp_thread_num() {
#if HF_SPARSE_POSIX
  static const OmpThreadNum f = reinterpret_cast<OmpThreadNum>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  return f;
#else
  return nullptr;
#endif
}

void gomp_entry(void* p) {
  auto* job = static_cast<GompJob*>(p);
  // The OpenMP thread number when there is one (below the team size, itself at most nthreads): the same OS thread
  // gets the same tid from call to call, as the pool's workers do, so a job whose threads first take the work
  // items they own (encoder_layer.cpp) finds its data in that core's caches.
  const OmpThreadNum num = omp_thread_num();
  const int tid = num ? num() : job->next_tid.fetch_add(1, std::memory_order_relaxed);
  job->fn(job->ctx, tid, job->nthreads);
}

}  // namespace

bool uses_openmp() {
  // Not in a forked child: libgomp's threads did not survive the fork (torch's own ops hang there too).
  return g_backend.load(std::memory_order_relaxed) != kBackendPool && gomp_parallel() != nullptr && !g_forked.load();
}

void parallel_run(int nthreads, JobFn fn, void* ctx) {
  if (nthreads > 1 && uses_openmp()) {
    GompJob job{fn, ctx, nthreads};
    gomp_parallel()(gomp_entry, &job, static_cast<unsigned>(nthreads), 0);
    return;
  }
  pool()->run(nthreads, fn, ctx);
}

void set_backend(int backend) {
  if (backend == kBackendOpenMP && gomp_parallel() == nullptr) {
    throw std::invalid_argument("threads='openmp': no OpenMP runtime (GOMP_parallel) is loaded in this process");
  }
  g_backend.store(backend);
}

const char* backend_name() { return uses_openmp() ? "openmp" : "pool"; }

void set_spin_us(int us) { g_spin_us.store(us < 0 ? 0 : us); }
int spin_us() { return g_spin_us.load(); }
int pool_size() { return pool()->size(); }

}  // namespace hf_sparse
