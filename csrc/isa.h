// Run-time instruction-set detection and the choice of kernel table (one place for all dispatch).
#pragma once

#include <string>
#include <vector>

#include "attention.h"
#include "common.h"

namespace hf_sparse {

// What this CPU (and its OS) can run, independent of what was built.
struct CpuFeatures {
  bool avx2 = false, fma = false, avx_vnni = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512_vnni = false;
  bool avx512_bf16 = false, avx512_vbmi = false;
};
CpuFeatures cpu_features();

// Names from the fastest to the slowest: avx512_vnni, avx2_vnni, avx2, scalar.
std::vector<std::string> all_isa_names();
// The names this build can run on this CPU, fastest first.
std::vector<std::string> supported_isa_names();
// Select by name ("auto" = fastest supported). Throws std::invalid_argument naming the supported ones.
void set_isa(const std::string& name);
// The kernel table in use and its name.
const IsaKernels& active_kernels();
std::string active_isa_name();
// Which int8 CSR few-token kernel the active table has: "avx512_vbmi" (byte permutes), the table's name, or "none".
std::string quads_few_variant();
// The attention kernels that go with the active instruction set: the AVX512-BF16 ones with avx512_vnni on CPUs
// that have AVX512-BF16, the AVX2 (fp32 FMA) ones for every other x86 level, the scalar ones with scalar.
// (active_attn_kernels(), declared in attention.h, is defined in isa.cpp.)

}  // namespace hf_sparse
