// Where the time of the AVX-512 sparse int8 kernels goes, per BERT-base layer type: 1 thread, thread CPU time, the
// minimum over rounds (other processes only ever add to a thread's CPU time). Build and run with profile.sh.
//
// The kernel file is included whole so that its pieces (the row loop with a null epilogue, the epilogues, the
// quantization) can be timed one at a time, on the same random 4-block weights and activations.
#include "kernels_avx512.cpp"  // NOLINT: the pieces live in an anonymous namespace

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "isa.h"
#include "linear.h"

namespace {

using namespace hf_sparse;

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Seconds per call: the fastest of `rounds` rounds of about `budget` seconds each.
double time_it(const std::function<void()>& fn, double budget, int rounds) {
  fn();
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    int calls = 0;
    const double t0 = cpu_now();
    double t;
    do {
      fn();
      ++calls;
      t = cpu_now();
    } while (t - t0 < budget);
    best = std::min(best, (t - t0) / calls);
  }
  return best;
}

template <class T>
struct Aligned {
  T* p;
  explicit Aligned(size_t n) : p(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {}
  ~Aligned() { std::free(p); }
};

// A random int8 weight, 4-block sparse at `sparsity`, in the INT8_BLOCK4 layout (panel-major CSR).
struct Weight {
  int64_t n, k, kb, panels;
  std::vector<int32_t> ptr, values, wsum;
  std::vector<uint16_t> cols;
  std::vector<float> scale, bias;
  std::vector<int64_t> prefix;
  Weight(int64_t n_, int64_t k_, double sparsity, uint32_t seed) : n(n_), k(k_), kb((k_ + 3) / 4) {
    panels = (kb + kPanel - 1) / kPanel;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> u(0, 1);
    std::uniform_int_distribution<int> code(-127, 127);
    std::vector<int32_t> dense(n * kb, 0);
    for (auto& v : dense) {
      if (u(rng) < sparsity) continue;
      for (int j = 0; j < 4; ++j) v |= static_cast<int32_t>(static_cast<uint32_t>(code(rng) & 0xff) << (8 * j));
    }
    ptr.push_back(0);
    for (int64_t p = 0; p < panels; ++p) {
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t b = p * kPanel; b < std::min(kb, (p + 1) * kPanel); ++b) {
          if (dense[r * kb + b]) {
            cols.push_back(static_cast<uint16_t>(b));
            values.push_back(dense[r * kb + b]);
          }
        }
        ptr.push_back(static_cast<int32_t>(cols.size()));
      }
    }
    wsum.assign(n, 0);
    scale.resize(n);
    bias.resize(n);
    prefix.assign(n + 1, 0);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t b = 0; b < kb; ++b) {
        for (int j = 0; j < 4; ++j) wsum[r] += static_cast<int8_t>(dense[r * kb + b] >> (8 * j));
        prefix[r + 1] += dense[r * kb + b] != 0;
      }
      prefix[r + 1] += prefix[r];
      scale[r] = static_cast<float>(0.001 * (1 + u(rng)));
      bias[r] = static_cast<float>(u(rng) - 0.5);
    }
  }
  SparseI8 view() const {
    return SparseI8{n, k, kb, panels, ptr.data(), cols.data(), values.data(), wsum.data(), scale.data(), bias.data(),
                    prefix.data()};
  }
  double ideal_s(int64_t m) const { return static_cast<double>(cols.size()) * ((m + 15) / 16) / kPeakDpbusd; }
  static constexpr double kPeakDpbusd = 3.65e9;  // vpdpbusd zmm per second on one core of the project's machine
};

// Consumes every accumulator (the compiler drops the dpbusd chains of any it could prove unused).
template <int T>
struct NullEpi {
  __m512i s = _mm512_setzero_si512();
  __attribute__((always_inline)) void row(int64_t, const __m512i* acc) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) s = _mm512_xor_si512(s, acc[t]);
  }
};
volatile int g_sink;

std::vector<float> random_x(int64_t m, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> x(m * k);
  for (auto& v : x) v = nd(rng);
  return x;
}

// One Linear: quantization, multiply, epilogue (int32 transposes + stores), epilogue (+ fp32 scales, activation).
void profile_linear(const char* name, int64_t n, int64_t k, int act, int64_t m, double sparsity, double budget,
                    int rounds) {
  const Weight w(n, k, sparsity, 1);
  const SparseI8 v = w.view();
  const IsaKernels& isa = *avx512_vnni_kernels();
  const auto x = random_x(m, k, 2);
  constexpr int kMt = 64;
  const int64_t ntiles = (m + kMt - 1) / kMt, tile_bytes = w.kb * kMt * 4;
  Aligned<uint8_t> tiles(tile_bytes * ntiles);
  Aligned<float> sx(ntiles * kMt), y(m * n);
  Aligned<int32_t> yi(m * n);
  const auto rows_of = [&](int64_t t) { return static_cast<int>(std::min<int64_t>(kMt, m - t * kMt)); };
  const auto quant = [&] {
    for (int64_t t = 0; t < ntiles; ++t) {
      isa.quant_tile(&x[t * kMt * k], k, rows_of(t), k, kMt, tiles.p + t * tile_bytes, sx.p + t * kMt);
    }
  };
  quant();
  const auto mult = [&] {
    NullEpi<4> e;
    for (int64_t t = 0; t < ntiles; ++t) sparse_rows<4>(v, tiles.p + t * tile_bytes, 0, n, e);
    g_sink = _mm512_reduce_add_epi32(e.s);
  };
  const auto product = [&](bool accum) {
    for (int64_t t = 0; t < ntiles; ++t) {
      Output o;
      o.y = accum ? nullptr : y.p;
      o.yi = accum ? yi.p : nullptr;
      o.ldy = n;
      o.m0 = t * kMt;
      o.act = act;
      isa.i8_sparse(v, tiles.p + t * tile_bytes, kMt, rows_of(t), sx.p + t * kMt, 0, n, o);
    }
  };
  Output of;
  of.y = y.p;
  of.ldy = n;
  of.act = act;
  const double tq = time_it(quant, budget, rounds), tm = time_it(mult, budget, rounds);
  const double ti = time_it([&] { product(true); }, budget, rounds);
  const double tf = time_it([&] { product(false); }, budget, rounds);
  const double tc = time_it([&] { linear_i8_sparse(v, x.data(), k, m, of, 1); }, budget, rounds);
  std::printf("| %s | %ld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f%% |\n", name, static_cast<long>(m),
              tq * 1e6, tm * 1e6, (ti - tm) * 1e6, (tf - ti) * 1e6, tc * 1e6, w.ideal_s(m) * 1e6,
              100 * w.ideal_s(m) / tm);
}

// The fused FFN per 64-token tile: quantization, first product, hidden epilogue (+ quantization for the second
// layer), GELU, second product, output epilogue.
void profile_ffn(double sparsity, double budget, int rounds) {
  const Weight w1(3072, 768, sparsity, 1), w2(768, 3072, sparsity, 2);
  const SparseI8 v1 = w1.view(), v2 = w2.view();
  const IsaKernels& isa = *avx512_vnni_kernels();
  const auto x = random_x(64, 768, 3);
  Aligned<uint8_t> t1(192 * 256), t2(768 * 256);
  Aligned<float> h(3072 * 64), y(64 * 768), sx1(64), sx2(64);
  const auto quant = [&] { isa.quant_tile(x.data(), 768, 64, 768, 64, t1.p, sx1.p); };
  quant();
  const auto m1 = [&] {
    NullEpi<4> e;
    sparse_rows<4>(v1, t1.p, 0, 3072, e);
    g_sink = _mm512_reduce_add_epi32(e.s);
  };
  const auto hidden = [&](int act) { ffn_hidden_t<4>(v1, t1.p, 64, sx1.p, act, h.p, t2.p, sx2.p); };
  hidden(kActGelu);
  const auto m2 = [&] {
    NullEpi<4> e;
    sparse_rows<4>(v2, t2.p, 0, 768, e);
    g_sink = _mm512_reduce_add_epi32(e.s);
  };
  Output o;
  o.y = y.p;
  o.ldy = 768;
  const auto second = [&] { isa.i8_sparse(v2, t2.p, 64, 64, sx2.p, 0, 768, o); };
  const double tq = time_it(quant, budget, rounds), tm1 = time_it(m1, budget, rounds);
  const double th = time_it([&] { hidden(kActNone); }, budget, rounds);
  const double tg = time_it([&] { hidden(kActGelu); }, budget, rounds);
  const double tm2 = time_it(m2, budget, rounds), t2s = time_it(second, budget, rounds);
  const double ideal = w1.ideal_s(64) + w2.ideal_s(64);
  std::printf("| %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", tq * 1e6, tm1 * 1e6, (th - tm1) * 1e6,
              (tg - th) * 1e6, tm2 * 1e6, (t2s - tm2) * 1e6, (tq + tg + t2s) * 1e6, ideal * 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  const double sparsity = argc > 1 ? std::atof(argv[1]) : 0.9;
  const double budget = 0.02;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 9;
  hf_sparse::set_isa("avx512_vnni");
  std::printf("4-block sparsity %.2f, 1 thread, us per call (thread CPU time, best of %d rounds)\n\n", sparsity,
              rounds);
  std::printf("| Linear (out x in) | M | quantize | multiply | epilogue: transpose + store | epilogue: fp32 "
              "(+GELU) | whole call | multiply at peak | multiply efficiency |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const int64_t m : {128, 2048}) {
    profile_linear("QKV 2304x768", 2304, 768, kActNone, m, sparsity, budget, rounds);
    profile_linear("attention output 768x768", 768, 768, kActNone, m, sparsity, budget, rounds);
    profile_linear("intermediate 3072x768 + GELU", 3072, 768, kActGelu, m, sparsity, budget, rounds);
    profile_linear("output 768x3072", 768, 3072, kActNone, m, sparsity, budget, rounds);
  }
  std::printf("\nFused FFN (3072x768 + GELU, 768x3072), per 64-token tile:\n\n");
  std::printf("| quantize | first multiply | hidden epilogue + requantize | GELU | second multiply | output epilogue "
              "| whole tile | multiplies at peak |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  profile_ffn(sparsity, budget, rounds);
  return 0;
}
