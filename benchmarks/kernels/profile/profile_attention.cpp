// Where the time of the AVX512-BF16 attention kernel goes, per head (1 thread, thread CPU time, the minimum over
// rounds): packing K and V, Q K^T, the softmax, P V, and the whole item. Build and run with profile.sh attention.
//
// The kernel file is included whole so that its pieces (in an anonymous namespace) can be timed one at a time.
#include "attention_avx512_bf16.cpp"  // NOLINT

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

namespace {

using namespace hf_sparse;

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

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

void profile(int64_t s, int64_t d, int rounds) {
  const int64_t heads = 12, ld = 3 * heads * d;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> qkv(static_cast<size_t>(s * ld)), out(static_cast<size_t>(s * heads * d));
  for (auto& v : qkv) v = normal(gen);
  const Layout L(d, s);
  char* scratch = static_cast<char*>(std::aligned_alloc(64, (L.bytes + 63) / 64 * 64));
  uint32_t* kp = reinterpret_cast<uint32_t*>(scratch + L.k_off);
  uint32_t* vp = reinterpret_cast<uint32_t*>(scratch + L.v_off);
  uint32_t* qw = reinterpret_cast<uint32_t*>(scratch + L.q_off);
  float* sc = reinterpret_cast<float*>(scratch + L.s_off);
  uint32_t* pw = reinterpret_cast<uint32_t*>(scratch + L.p_off);
  float* div = reinterpret_cast<float*>(scratch + L.l_off);
  const float* q = qkv.data();
  const float* k = q + heads * d;
  const float* v = k + heads * d;
  AttnItem a;
  a.q = q;
  a.k = k;
  a.v = v;
  a.ldq = a.ldk = a.ldv = ld;
  a.out = out.data();
  a.ldo = heads * d;
  a.s = s;
  a.q0 = 0;
  a.q1 = s;
  a.d = d;
  a.scale = 1.0f / std::sqrt(static_cast<float>(d));
  const double budget = 0.02;
  const double t_item = time_it([&] { item(a, scratch); }, budget, rounds);
  const double t_pack = time_it([&] {
    pack_k(k, ld, s, d, L, kp);
    pack_v(v, ld, s, d, L, vp);
  }, budget, rounds);
  const int64_t nvec = (s + kVec - 1) / kVec, pst = L.sp2 / 2;
  // One block of kBlock rows at a time, as item() does: Q conversion + Q K^T, softmax, P V.
  const auto blocks = [&](int phase) {
    for (int64_t i0 = 0; i0 < s; i0 += kBlock) {
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, s - i0));
      const int nbp = static_cast<int>(round_up(nb, kRows));
      if (phase == 0) {
        for (int r = 0; r < nbp; ++r) {
          for (int64_t w0 = 0; w0 < L.pairs; w0 += kVec) {
            const float* row = q + (i0 + r) * ld + 2 * w0;
            const __m512i qq = bf16x32(_mm512_maskz_loadu_ps(mask16(d - 2 * w0), row),
                                       _mm512_maskz_loadu_ps(mask16(d - 2 * w0 - kVec), row + kVec));
            _mm512_mask_storeu_epi32(qw + r * L.pairs + w0, mask16(L.pairs - w0), qq);
          }
        }
        for (int r0 = 0; r0 < nbp; r0 += kRows) {
          for (int64_t c0 = 0; c0 < nvec; c0 += kCols) {
            qk_block<4>(qw + r0 * L.pairs, L.pairs, kp + c0 * kVec, L.sp, a.scale, sc + r0 * L.sp + c0 * kVec);
          }
        }
      } else if (phase == 1) {
        for (int r = 0; r < nb; ++r) {
          div[r] = softmax_row(sc + r * L.sp, nvec, s, kMaskNone, nullptr, pw + r * pst, pst);
        }
      } else {
        for (int r0 = 0; r0 < nbp; r0 += kRows) {
          pv_block<4>(pw + r0 * pst, pst, (s + 1) / 2, vp, L.dv * kVec, div + r0, nb - r0,
                      out.data() + (i0 + r0) * a.ldo, a.ldo, d);
        }
      }
    }
  };
  // The softmax overwrites the scores in place: recompute them before each softmax call.
  const double t_qk = time_it([&] { blocks(0); }, budget, rounds);
  const double t_qk_sm = time_it([&] { blocks(0), blocks(1); }, budget, rounds);
  const double t_pv = time_it([&] { blocks(2); }, budget, rounds);
  const double peak = 3.65e9;  // vdpbf16ps per second at one per cycle (this machine's clock)
  const double dps = static_cast<double>(s) * L.sp * L.pairs / kVec + static_cast<double>(s) * (L.sp2 / 2) * L.dv;
  std::printf("| %lld | %lld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f%% |\n", static_cast<long long>(s),
              static_cast<long long>(d), t_item * 1e6, t_pack * 1e6, t_qk * 1e6, (t_qk_sm - t_qk) * 1e6, t_pv * 1e6,
              dps / peak * 1e6, dps / peak / t_item * 100.0);
  std::free(scratch);
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 7;
  std::printf("| seq | head dim | whole item (us) | pack K, V | Q K^T | softmax | P V | vdpbf16ps at peak | "
              "efficiency |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const int64_t s : {128, 384}) {
    for (const int64_t d : {64}) profile(s, d, rounds);
  }
  profile(128, 32, rounds);
  profile(128, 80, rounds);
  return 0;
}
