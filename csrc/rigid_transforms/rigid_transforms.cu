// CUDA launchers of flame_ext::rigid_transforms and flame_ext::rigid_transforms_backward
// (schemas in csrc/registration.cpp, kernels and launch plans in
// rigid_transforms_kernels.cuh, argument checks in rigid_transforms_checks.h).
//
// The joint tree reaches the kernels by value when parents is a CPU tensor (read and
// checked here), or as a device pointer that each thread reads and checks (no host-device
// synchronisation anywhere: CUDA-graph capturable).
#include <cstdint>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "launch.h"
#include "rigid_transforms/rigid_transforms_checks.h"
#include "rigid_transforms/rigid_transforms_kernels.cuh"

namespace flame_ext {
namespace {

using namespace rigid_transforms_kernels;

// keep_alive holds the contiguous copy of a device parents tensor while the kernel runs.
ParentsArg parents_arg(const at::Tensor& parents, at::Tensor& keep_alive) {
  ParentsArg arg{};
  if (parents.device().is_cpu()) {
    arg.table = read_parents(parents);
    arg.device = nullptr;
  } else {
    keep_alive = parents.contiguous();
    arg.device = keep_alive.const_data_ptr<int64_t>();
  }
  return arg;
}

// The kernels' instantiation for a tree of num_joints joints.
template <typename scalar_t>
auto forward_kernel(int64_t num_joints) {
  if (num_joints == kExactJoints) return rigid_transforms_kernel<kExactJoints, true, scalar_t>;
  if (num_joints <= kSmallJoints) return rigid_transforms_kernel<kSmallJoints, false, scalar_t>;
  return rigid_transforms_kernel<kMaxJoints, false, scalar_t>;
}

template <typename scalar_t>
auto backward_kernel(int64_t num_joints) {
  if (num_joints == kExactJoints)
    return rigid_transforms_backward_kernel<kExactJoints, true, scalar_t>;
  if (num_joints <= kSmallJoints)
    return rigid_transforms_backward_kernel<kSmallJoints, false, scalar_t>;
  return rigid_transforms_backward_kernel<kMaxJoints, false, scalar_t>;
}

std::tuple<at::Tensor, at::Tensor> rigid_transforms_cuda(const at::Tensor& pose_in,
                                                         const at::Tensor& joints_in,
                                                         const at::Tensor& parents) {
  check_chain_inputs(pose_in, joints_in);
  check_parents(parents, pose_in);
  check_kernel_device(pose_in, "pose");
  const DeviceGuard guard(pose_in.device());
  const Stream stream = current_stream();
  const int64_t batch = pose_in.size(0), num_joints = pose_in.size(1);
  at::Tensor parents_dev;
  const ParentsArg arg = parents_arg(parents, parents_dev);
  const at::Tensor pose = pose_in.contiguous(), joints = joints_in.contiguous();
  at::Tensor transforms = at::empty({batch, num_joints, 4, 4}, pose.options());
  at::Tensor pose_feature = at::empty({batch, 9 * (num_joints - 1)}, pose.options());
  if (batch == 0) return {transforms, pose_feature};

  const LaunchPlan plan = rigid_transforms_plan(batch, device_limits());
  AT_DISPATCH_FLOATING_TYPES(pose.scalar_type(), "rigid_transforms_cuda", [&] {
    const auto kernel = forward_kernel<scalar_t>(num_joints);
    launch(plan, stream, kernel, pose.const_data_ptr<scalar_t>(),
           joints.const_data_ptr<scalar_t>(), arg, static_cast<int>(num_joints), batch,
           transforms.mutable_data_ptr<scalar_t>(), pose_feature.mutable_data_ptr<scalar_t>());
  });
  return {transforms, pose_feature};
}

std::tuple<at::Tensor, at::Tensor> rigid_transforms_backward_cuda(
    const at::Tensor& grad_transforms_in, const at::Tensor& grad_pose_feature_in,
    const at::Tensor& pose_in, const at::Tensor& joints_in, const at::Tensor& parents) {
  check_chain_inputs(pose_in, joints_in);
  check_parents(parents, pose_in);
  check_chain_grads(grad_transforms_in, grad_pose_feature_in, pose_in);
  check_kernel_device(pose_in, "pose");
  const DeviceGuard guard(pose_in.device());
  const Stream stream = current_stream();
  const int64_t batch = pose_in.size(0), num_joints = pose_in.size(1);
  at::Tensor parents_dev;
  const ParentsArg arg = parents_arg(parents, parents_dev);
  const at::Tensor pose = pose_in.contiguous(), joints = joints_in.contiguous();
  const at::Tensor grad_t = grad_transforms_in.contiguous();
  const at::Tensor grad_f = grad_pose_feature_in.contiguous();
  at::Tensor grad_pose = at::empty({batch, num_joints, 3}, pose.options());
  at::Tensor grad_joints = at::empty({batch, num_joints, 3}, pose.options());
  if (batch == 0) return {grad_pose, grad_joints};

  const LaunchPlan plan = rigid_transforms_backward_plan(batch, device_limits());
  AT_DISPATCH_FLOATING_TYPES(pose.scalar_type(), "rigid_transforms_backward_cuda", [&] {
    const auto kernel = backward_kernel<scalar_t>(num_joints);
    launch(plan, stream, kernel, grad_t.const_data_ptr<scalar_t>(),
           grad_f.const_data_ptr<scalar_t>(), pose.const_data_ptr<scalar_t>(),
           joints.const_data_ptr<scalar_t>(), arg, static_cast<int>(num_joints), batch,
           grad_pose.mutable_data_ptr<scalar_t>(), grad_joints.mutable_data_ptr<scalar_t>());
  });
  return {grad_pose, grad_joints};
}

}  // namespace

TORCH_LIBRARY_IMPL(FLAME_EXT_KERNEL_LIB, FLAME_EXT_KERNEL_KEY, m) {
  m.impl("rigid_transforms", &rigid_transforms_cuda);
  m.impl("rigid_transforms_backward", &rigid_transforms_backward_cuda);
}

}  // namespace flame_ext
