// Input checks of the skin op family, shared by the CPU and CUDA launchers (host code,
// ATen). The Python wrappers check first with clearer exception types; these guard direct
// torch.ops calls, so that no bad shape or joint tree ever reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include "common.h"
#include "skin/skin.h"

namespace flame_ext {

// pose (B, J, 3) and joints of the same shape, dtype and device, on `device_type`.
inline void check_chain_inputs(const at::Tensor& pose, const at::Tensor& joints,
                               c10::DeviceType device_type) {
  FLAME_CHECK_DIM(pose, 3);
  TORCH_CHECK(pose.size(2) == 3, "pose must have shape (B, J, 3), got ", pose.sizes());
  check_num_joints(pose.size(1));
  TORCH_CHECK(joints.sizes() == pose.sizes(), "joints must have the shape of pose ",
              pose.sizes(), ", got ", joints.sizes());
  FLAME_CHECK_SAME_DTYPE(joints, pose);
  FLAME_CHECK_SAME_DEVICE(joints, pose);
  TORCH_CHECK(pose.device().type() == device_type, "pose must be on ", device_type, ", got ",
              pose.device());
  check_float(pose, "pose");
}

// parents (J,) int64 on the CPU or on the device of pose.
inline void check_parents(const at::Tensor& parents, const at::Tensor& pose) {
  FLAME_CHECK_INDEX(parents);
  const int64_t num_joints = pose.size(1);
  TORCH_CHECK(parents.dim() == 1 && parents.size(0) == num_joints, "parents must have shape (",
              num_joints, ",) (one per joint), got ", parents.sizes());
  TORCH_CHECK(parents.device().is_cpu() || parents.device() == pose.device(),
              "parents must be on the CPU or on ", pose.device(), " (the device of pose), got ",
              parents.device());
}

// The values of a CPU parents tensor, checked to form a tree the chain can walk.
inline ParentTable read_parents(const at::Tensor& parents) {
  TORCH_CHECK(parents.device().is_cpu(), "parents must be on the CPU here, got ",
              parents.device());
  const at::Tensor p = parents.contiguous();
  const int64_t* data = p.data_ptr<int64_t>();
  ParentTable table{};
  for (int64_t j = 0; j < p.size(0); ++j) {
    TORCH_CHECK(j == 0 ? data[0] == -1 : (data[j] >= 0 && data[j] < j),
                "parents must have parents[0] = -1 and 0 <= parents[j] < j, got parents[", j,
                "] = ", data[j]);
    table.p[j] = static_cast<int32_t>(data[j]);
  }
  return table;
}

inline void check_chain_grads(const at::Tensor& grad_transforms,
                              const at::Tensor& grad_pose_feature, const at::Tensor& pose) {
  const int64_t batch = pose.size(0), num_joints = pose.size(1);
  TORCH_CHECK(grad_transforms.sizes() == at::IntArrayRef({batch, num_joints, 4, 4}),
              "grad_transforms must have shape (", batch, ", ", num_joints, ", 4, 4), got ",
              grad_transforms.sizes());
  TORCH_CHECK(grad_pose_feature.sizes() == at::IntArrayRef({batch, 9 * (num_joints - 1)}),
              "grad_pose_feature must have shape (", batch, ", ", 9 * (num_joints - 1),
              "), got ", grad_pose_feature.sizes());
  FLAME_CHECK_SAME_DTYPE(grad_transforms, pose);
  FLAME_CHECK_SAME_DTYPE(grad_pose_feature, pose);
  FLAME_CHECK_SAME_DEVICE(grad_transforms, pose);
  FLAME_CHECK_SAME_DEVICE(grad_pose_feature, pose);
}

// v_posed (B, V, 3), transforms (B, J, 4, 4), lbs_weights (V, J), one dtype, on
// `device_type`.
inline void check_skin_inputs(const at::Tensor& v_posed, const at::Tensor& transforms,
                              const at::Tensor& lbs_weights, c10::DeviceType device_type) {
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
  TORCH_CHECK(v_posed.device().type() == device_type, "v_posed must be on ", device_type,
              ", got ", v_posed.device());
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
