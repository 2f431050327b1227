// Argument checks of the rigid_transforms op family, shared by the CPU and CUDA launchers
// (host code, ATen). The Python wrapper checks first with clearer exception types; these
// guard direct torch.ops calls, so that no bad shape or joint tree ever reaches a kernel.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "rigid_transforms/rigid_transforms.h"

namespace flame_ext {

// pose (B, J, 3) and joints of the same shape, dtype and device.
inline void check_chain_inputs(const at::Tensor& pose, const at::Tensor& joints) {
  FLAME_CHECK_DIM(pose, 3);
  TORCH_CHECK(pose.size(2) == 3, "pose must have shape (B, J, 3), got ", pose.sizes());
  check_num_joints(pose.size(1));
  TORCH_CHECK(joints.sizes() == pose.sizes(), "joints must have the shape of pose ",
              pose.sizes(), ", got ", joints.sizes());
  FLAME_CHECK_SAME_DTYPE(joints, pose);
  FLAME_CHECK_SAME_DEVICE(joints, pose);
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
  const int64_t* data = p.const_data_ptr<int64_t>();
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

}  // namespace flame_ext
