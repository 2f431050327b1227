// Every operator of flame_ext with its schema, in one place. The CPU and CUDA
// implementations register themselves beside their code (TORCH_LIBRARY_IMPL in
// csrc/<family>/); fake kernels and autograd are registered in flame_ext/_ops/.
#include <Python.h>

#include <string>

#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_output.h"
#include "op_schemas.h"

#ifndef FLAME_EXT_CUDA_ARCHS
#define FLAME_EXT_CUDA_ARCHS ""
#endif
#ifndef FLAME_EXT_TORCH_VERSION
#define FLAME_EXT_TORCH_VERSION ""
#endif

// `import flame_ext._C` loads this library (and so runs the registrations below); the
// module itself is empty. PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace flame_ext {

// The instruction set cpu_isa() picked in this process, reported so that benchmark
// results say which build of the hand-vectorised CPU loops their numbers come from.
const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      break;
  }
  return "baseline";
}

std::string build_config() {
#ifdef FLAME_EXT_WITH_CUDA
  const char* cuda = "true";
#else
  const char* cuda = "false";
#endif
  return std::string("{\"cuda\": ") + cuda + ", \"cuda_archs\": \"" + FLAME_EXT_CUDA_ARCHS +
         "\", \"torch\": \"" + FLAME_EXT_TORCH_VERSION + "\", \"cpu_isa\": \"" +
         cpu_isa_name() + "\"}";
}

TORCH_LIBRARY(flame_ext, m) {
  // Every operator's schema (op_schemas.h, shared with the SIMT test build).
  for (const char* schema : kOpSchemas) m.def(schema);
  m.def("build_config() -> str", &build_config);
  // The reuse cache of large CPU output blocks (cpu_output.h).
  m.def("cpu_output_cache_stats() -> int[]", &output_cache_stats);
  m.def("empty_cpu_output_cache() -> int", &empty_output_cache);
}

}  // namespace flame_ext
