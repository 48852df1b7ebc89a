/* The AVX-512 VNNI multiply's throughput on one core, in vpdpbusd per second: the ceiling of every int8 product
 * hf_sparse runs (bench_roofline.py compiles this file; the package itself is never built with these flags).
 *
 *   reg:  vpdpbusd zmm, zmm, zmm on 12 independent accumulators (nothing but the multiply)
 *   bcst: vpdpbusd zmm, zmm, dword [mem]{1to16}, the generated 4-block code's form (one weight per row)
 *
 * Prints "reg <G/s> bcst <G/s> ghz <core clock>", each the best of `reps` runs of ~0.1 s (a busy machine only
 * slows a run down). The clock comes from a chain of dependent one-cycle adds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* 12 independent accumulators (zmm0-11; more than latency x throughput needs), in assembly: the compiler would keep
 * an array of them in memory. */
static int32_t weights[64];

static double reg_rate(long n) {
  double t = now();
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\t"
      "vpternlogd $0xff, %%zmm13, %%zmm13, %%zmm13\n\t"
      "1:\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm0\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm1\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm2\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm3\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm4\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm5\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm6\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm7\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm8\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm9\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm10\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm11\n\t"
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(n)
      :
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12",
        "zmm13", "cc");
  return now() - t;
}

static double bcst_rate(long n) {
  const int32_t* w = weights;
  double t = now();
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\t"
      "1:\n\t"
      "vpdpbusd 0(%1)%{1to16%}, %%zmm12, %%zmm0\n\t"
      "vpdpbusd 4(%1)%{1to16%}, %%zmm12, %%zmm1\n\t"
      "vpdpbusd 8(%1)%{1to16%}, %%zmm12, %%zmm2\n\t"
      "vpdpbusd 12(%1)%{1to16%}, %%zmm12, %%zmm3\n\t"
      "vpdpbusd 16(%1)%{1to16%}, %%zmm12, %%zmm4\n\t"
      "vpdpbusd 20(%1)%{1to16%}, %%zmm12, %%zmm5\n\t"
      "vpdpbusd 24(%1)%{1to16%}, %%zmm12, %%zmm6\n\t"
      "vpdpbusd 28(%1)%{1to16%}, %%zmm12, %%zmm7\n\t"
      "vpdpbusd 32(%1)%{1to16%}, %%zmm12, %%zmm8\n\t"
      "vpdpbusd 36(%1)%{1to16%}, %%zmm12, %%zmm9\n\t"
      "vpdpbusd 40(%1)%{1to16%}, %%zmm12, %%zmm10\n\t"
      "vpdpbusd 44(%1)%{1to16%}, %%zmm12, %%zmm11\n\t"
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(n)
      : "r"(w)
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12",
        "zmm13", "cc", "memory");
  return now() - t;
}

static double clock_ghz(long n) {
  uint64_t x = 1;
  double t = now();
  for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return 4.0 * n / (now() - t) / 1e9;
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 5;
  const long n = 10000000;  /* x 12 multiplies: ~0.1 s */
  for (int i = 0; i < 64; i++) weights[i] = (int32_t)(i * 16777619u);
  double reg = 0, bcst = 0, ghz = 0, r;
  for (int i = 0; i < reps; i++) {
    if ((r = 12.0 * n / reg_rate(n)) > reg) reg = r;
    if ((r = 12.0 * n / bcst_rate(n)) > bcst) bcst = r;
    if ((r = clock_ghz(100000000)) > ghz) ghz = r;
  }
  printf("reg %.4f bcst %.4f ghz %.3f\n", reg / 1e9, bcst / 1e9, ghz);
  return 0;
}
