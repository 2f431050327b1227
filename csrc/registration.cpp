// Every operator of flame_ext with its schema, in one place. The CPU and CUDA
// implementations register themselves beside their code (TORCH_LIBRARY_IMPL in
// csrc/<family>/); fake kernels and autograd are registered in flame_ext/_ops/.
#include <Python.h>

#include <string>

#include <torch/library.h>

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
  // Blendshape accumulation: out = base + coeffs @ dirs^T + pose_coeffs @ pose_dirs.
  m.def("blend(Tensor base, Tensor dirs, Tensor coeffs, Tensor pose_dirs, Tensor pose_coeffs) -> Tensor");
  m.def("blend_backward(Tensor grad_out, Tensor dirs, Tensor pose_dirs, bool need_coeffs, bool need_pose_coeffs) -> (Tensor, Tensor)");

  // Rodrigues, kinematic chain and pose-corrective features, per sample.
  m.def("rigid_transforms(Tensor pose, Tensor joints, Tensor parents) -> (Tensor, Tensor)");
  m.def("rigid_transforms_backward(Tensor grad_transforms, Tensor grad_pose_feature, Tensor pose, Tensor joints, Tensor parents) -> (Tensor, Tensor)");

  // Linear blend skinning: per-vertex transform blend and apply, optionally writing T_v.
  m.def("skin(Tensor v_posed, Tensor transforms, Tensor lbs_weights, bool write_vertex_transforms) -> (Tensor, Tensor)");
  m.def("skin_backward(Tensor grad_v, Tensor? grad_vertex_transforms, Tensor v_posed, Tensor transforms, Tensor lbs_weights) -> (Tensor, Tensor)");

  // Barycentric landmark gathering with the contour-bin choice fused in.
  m.def("landmarks(Tensor v, Tensor poses, Tensor tris, Tensor lmk_faces_idx, Tensor lmk_bary_coords, Tensor dynamic_lmk_faces_idx, Tensor dynamic_lmk_bary_coords, int contour_rule) -> (Tensor, Tensor)");
  m.def("landmarks_backward(Tensor grad_lmk, Tensor bins, Tensor tris, Tensor lmk_faces_idx, Tensor lmk_bary_coords, Tensor dynamic_lmk_faces_idx, Tensor dynamic_lmk_bary_coords, SymInt num_vertices) -> Tensor");

  m.def("build_config() -> str", &build_config);
}

}  // namespace flame_ext
