// Argument checks of the skin op family, shared by the CPU and CUDA launchers (host code,
// ATen). The Python wrapper checks first with clearer exception types; these guard direct
// torch.ops calls, so that no bad shape ever reaches a kernel.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace flame_ext {

// v_posed (B, V, 3), transforms (B, J, 4, 4), lbs_weights (V, J), one dtype and device.
inline void check_skin_inputs(const at::Tensor& v_posed, const at::Tensor& transforms,
                              const at::Tensor& lbs_weights) {
  FLAME_CHECK_DIM(v_posed, 3);
  TORCH_CHECK(v_posed.size(2) == 3, "v_posed must have shape (B, V, 3), got ", v_posed.sizes());
  FLAME_CHECK_DIM(transforms, 4);
  TORCH_CHECK(transforms.size(0) == v_posed.size(0) && transforms.size(2) == 4 &&
                  transforms.size(3) == 4,
              "transforms must have shape (", v_posed.size(0), ", J, 4, 4), got ",
              transforms.sizes());
  const int64_t num_joints = transforms.size(1);
  check_num_joints(num_joints);
  TORCH_CHECK(lbs_weights.dim() == 2 && lbs_weights.size(0) == v_posed.size(1) &&
                  lbs_weights.size(1) == num_joints,
              "lbs_weights must have shape (", v_posed.size(1), ", ", num_joints, "), got ",
              lbs_weights.sizes());
  FLAME_CHECK_SAME_DTYPE(transforms, v_posed);
  FLAME_CHECK_SAME_DTYPE(lbs_weights, v_posed);
  FLAME_CHECK_SAME_DEVICE(transforms, v_posed);
  FLAME_CHECK_SAME_DEVICE(lbs_weights, v_posed);
  check_float(v_posed, "v_posed");
}

// grad_v like v_posed; grad_vertex_transforms, when given, (B, V, 4, 4).
inline void check_skin_grads(const at::Tensor& grad_v,
                             const std::optional<at::Tensor>& grad_vertex_transforms,
                             const at::Tensor& v_posed) {
  TORCH_CHECK(grad_v.sizes() == v_posed.sizes(), "grad_v must have the shape of v_posed ",
              v_posed.sizes(), ", got ", grad_v.sizes());
  FLAME_CHECK_SAME_DTYPE(grad_v, v_posed);
  FLAME_CHECK_SAME_DEVICE(grad_v, v_posed);
  if (grad_vertex_transforms.has_value()) {
    const at::Tensor& g = *grad_vertex_transforms;
    TORCH_CHECK(g.sizes() == at::IntArrayRef({v_posed.size(0), v_posed.size(1), 4, 4}),
                "grad_vertex_transforms must have shape (", v_posed.size(0), ", ",
                v_posed.size(1), ", 4, 4), got ", g.sizes());
    FLAME_CHECK_SAME_DTYPE(g, v_posed);
    FLAME_CHECK_SAME_DEVICE(g, v_posed);
  }
}

}  // namespace flame_ext
