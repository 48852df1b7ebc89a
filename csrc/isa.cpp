#include "isa.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#define HF_SPARSE_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace hf_sparse {

namespace {

#if HF_SPARSE_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
  int out[4];
  __cpuidex(out, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned>(out[i]);
#else
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

unsigned long long xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
#endif
}
#endif

// HF_SPARSE_DISABLE_CPU_FEATURES=avx512_vbmi,avx512_bf16: report those features absent, so that the kernels a
// CPU without them runs can be tested here. Items are trimmed and lowercased; hf_sparse.ops rejects other names at
// import (this runs inside the first dispatch, where there is no one to tell).
CpuFeatures without_disabled(CpuFeatures f) {
  const char* env = std::getenv("HF_SPARSE_DISABLE_CPU_FEATURES");
  if (!env) return f;
  std::string item;
  const auto apply = [&] {
    size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    const std::string name = a == std::string::npos ? "" : item.substr(a, b - a + 1);
    if (name == "avx512_vbmi") f.avx512_vbmi = false;
    if (name == "avx512_bf16") f.avx512_bf16 = false;
    item.clear();
  };
  for (const char* c = env;; ++c) {
    if (*c == ',' || *c == '\0') {
      apply();
      if (*c == '\0') break;
    } else {
      item += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
    }
  }
  return f;
}

CpuFeatures detect() {
  CpuFeatures f;
#if HF_SPARSE_X86
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  if (max_leaf < 7) return f;
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1, fma = (r[2] >> 12) & 1;
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;         // SSE and AVX state saved by the OS
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;    // plus opmask and the upper ZMM state
  if (!os_avx) return f;
  cpuid(7, 0, r);
  const unsigned ebx = r[1], ecx = r[2], max_sub = r[0];
  f.avx2 = (ebx >> 5) & 1;
  f.fma = fma;
  if (os_avx512) {
    f.avx512f = (ebx >> 16) & 1;
    f.avx512dq = (ebx >> 17) & 1;
    f.avx512bw = (ebx >> 30) & 1;
    f.avx512vl = (ebx >> 31) & 1;
    f.avx512_vnni = (ecx >> 11) & 1;
    f.avx512_vbmi = (ecx >> 1) & 1;
  }
  if (max_sub >= 1) {
    cpuid(7, 1, r);
    f.avx_vnni = (r[0] >> 4) & 1;
    f.avx512_bf16 = os_avx512 && ((r[0] >> 5) & 1);
  }
#endif
  return without_disabled(f);
}

struct Candidate {
  const char* name;
  const IsaKernels* table;
};

// The table for each name on this CPU, or null when the CPU or the build cannot run it.
const IsaKernels* table_for(const std::string& name) {
  const CpuFeatures f = cpu_features();
  const bool avx2 = f.avx2 && f.fma;
  const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl;
  if (name == "avx512_vnni") {
    if (!avx512 || !f.avx512_vnni || !avx512_vnni_kernels()) return nullptr;
    static const IsaKernels with_vbmi = [] {
      IsaKernels t = *avx512_vnni_kernels();
      if (FewKernel k = avx512_vbmi_quads_few(&t.quads_few_rows)) t.quads_few = k;
      return t;
    }();
    return f.avx512_vbmi && avx512_vbmi_quads_few(nullptr) ? &with_vbmi : avx512_vnni_kernels();
  }
  if (name == "avx2_vnni") {
    if (avx2 && f.avx_vnni && avx2_vnni_vex_kernels()) return avx2_vnni_vex_kernels();
    // Same source in the EVEX encoding: what AVX512-VNNI CPUs without AVX-VNNI run when this level is forced.
    if (avx512 && f.avx512_vnni) return avx2_vnni_evex_kernels();
    return nullptr;
  }
  if (name == "avx2") return avx2 ? avx2_kernels() : nullptr;
  if (name == "scalar") return scalar_kernels();
  return nullptr;
}

std::atomic<const IsaKernels*> g_active{nullptr};

const IsaKernels* best() {
  for (const auto& name : all_isa_names()) {
    if (const IsaKernels* t = table_for(name)) return t;
  }
  return scalar_kernels();
}

}  // namespace

CpuFeatures cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::vector<std::string> all_isa_names() { return {"avx512_vnni", "avx2_vnni", "avx2", "scalar"}; }

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> out;
  for (const auto& name : all_isa_names()) {
    if (table_for(name)) out.push_back(name);
  }
  return out;
}

void set_isa(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_active.store(best());
    return;
  }
  const IsaKernels* t = table_for(name);
  if (!t) {
    std::string known, ok;
    for (const auto& n : all_isa_names()) known += (known.empty() ? "" : ", ") + n;
    for (const auto& n : supported_isa_names()) ok += (ok.empty() ? "" : ", ") + n;
    bool is_known = false;
    for (const auto& n : all_isa_names()) is_known |= (n == name);
    if (!is_known) throw std::invalid_argument("unknown instruction set '" + name + "'; known: auto, " + known);
    throw std::invalid_argument("instruction set '" + name + "' cannot run on this CPU (or was not built); this "
                                "machine supports: " + ok);
  }
  g_active.store(t);
}

const IsaKernels& active_kernels() {
  const IsaKernels* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = best();
    g_active.store(t);
  }
  return *t;
}

std::string quads_few_variant() {
  const IsaKernels& t = active_kernels();
  if (!t.quads_few) return "none";
  return t.quads_few == avx512_vbmi_quads_few(nullptr) ? "avx512_vbmi" : t.name;
}

std::string active_isa_name() {
  const IsaKernels& t = active_kernels();
  return t.name;
}

const AttnKernels& active_attn_kernels() {
  const IsaKernels* t = &active_kernels();
  if (t == scalar_kernels()) return *attn_scalar_kernels();
  if (std::strcmp(t->name, "avx512_vnni") == 0 && cpu_features().avx512_bf16 && attn_avx512_bf16_kernels()) {
    return *attn_avx512_bf16_kernels();
  }
  return attn_avx2_kernels() ? *attn_avx2_kernels() : *attn_scalar_kernels();
}

const AttnKernels& active_attn_int8_kernels() {
  const IsaKernels* t = &active_kernels();
  if (t == scalar_kernels()) return *attn_int8_scalar_kernels();
  if (std::strcmp(t->name, "avx512_vnni") == 0 && attn_avx512_int8_kernels()) return *attn_avx512_int8_kernels();
  return attn_avx2_int8_kernels() ? *attn_avx2_int8_kernels() : *attn_int8_scalar_kernels();
}

}  // namespace hf_sparse

// Tables of instruction sets this build left out (not x86, or a compiler without the flags).
namespace hf_sparse {
#ifndef HF_SPARSE_HAVE_AVX512
const IsaKernels* avx512_vnni_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_AVX512_VBMI
FewKernel avx512_vbmi_quads_few(int*) { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_AVX2
const IsaKernels* avx2_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_AVX2_VNNI_VEX
const IsaKernels* avx2_vnni_vex_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_AVX2_VNNI_EVEX
const IsaKernels* avx2_vnni_evex_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_ATTN_AVX2
const AttnKernels* attn_avx2_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_ATTN_AVX512_BF16
const AttnKernels* attn_avx512_bf16_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_ATTN_AVX2_INT8
const AttnKernels* attn_avx2_int8_kernels() { return nullptr; }
#endif
#ifndef HF_SPARSE_HAVE_ATTN_AVX512_INT8
const AttnKernels* attn_avx512_int8_kernels() { return nullptr; }
#endif
}  // namespace hf_sparse
