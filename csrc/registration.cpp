// Every operator of flame_ext with its schema, in one place. The CPU and CUDA
// implementations register themselves beside their code (TORCH_LIBRARY_IMPL in
// csrc/<family>/); fake kernels and autograd are registered in flame_ext/_ops/.
#include <Python.h>

#include <string>

#include <torch/library.h>

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

std::string build_config() {
#ifdef FLAME_EXT_WITH_CUDA
  const char* cuda = "true";
#else
  const char* cuda = "false";
#endif
  return std::string("{\"cuda\": ") + cuda + ", \"cuda_archs\": \"" + FLAME_EXT_CUDA_ARCHS +
         "\", \"torch\": \"" + FLAME_EXT_TORCH_VERSION + "\"}";
}

TORCH_LIBRARY(flame_ext, m) {
  // Every operator's schema (op_schemas.h, shared with the SIMT test build).
  for (const char* schema : kOpSchemas) m.def(schema);
  m.def("build_config() -> str", &build_config);
}

}  // namespace flame_ext
