#include <nanobind/nanobind.h>

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "hf_sparse sparse CPU kernels";
  m.def("abi_version", []() { return 1; });
}
