#!/bin/sh
# Builds and runs the profilers against csrc/ (AVX-512 VNNI machines only): where the kernels' time goes.
#   sh benchmarks/kernels/profile/profile.sh [sparsity] [rounds]     the sparse int8 kernels (profile_kernels.cpp)
#   sh benchmarks/kernels/profile/profile.sh attention [rounds]      the AVX512-BF16 attention (profile_attention.cpp)
set -e
here=$(cd "$(dirname "$0")" && pwd)
csrc="$here/../../../csrc"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
base="-O3 -std=c++17 -ffp-contract=off -fno-fast-math -I$csrc"
avx512="-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mavx2 -mfma"
if [ "$1" = "attention" ]; then
  shift
  ${CXX:-g++} $base $avx512 -mavx512bf16 "$here/profile_attention.cpp" -o "$out/profile_attention"
  "$out/profile_attention" "$@"
  exit 0
fi
${CXX:-g++} $base -c "$csrc/kernels_avx2.cpp" -DHF_SPARSE_VNNI=0 -mavx2 -mfma -o "$out/avx2.o"
${CXX:-g++} $base -c "$csrc/kernels_avx2.cpp" -DHF_SPARSE_VNNI=2 -mavx2 -mfma -mavx512f -mavx512vl -mavx512bw \
  -mavx512vnni -o "$out/avx2_vnni.o"
for f in linear thread_pool kernels_scalar attention_scalar; do ${CXX:-g++} $base -c "$csrc/$f.cpp" -o "$out/$f.o"; done
${CXX:-g++} $base -c "$csrc/isa.cpp" -DHF_SPARSE_HAVE_AVX512 -DHF_SPARSE_HAVE_AVX2 -DHF_SPARSE_HAVE_AVX2_VNNI_EVEX \
  -o "$out/isa.o"
${CXX:-g++} $base $avx512 "$here/profile_kernels.cpp" "$out"/*.o -o "$out/profile_kernels" -lpthread -ldl
"$out/profile_kernels" "$@"
