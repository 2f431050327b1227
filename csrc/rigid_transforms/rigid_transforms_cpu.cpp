// CPU implementation of the rigid_transforms op family: the kinematic chain (+ backward),
// one sample per loop iteration. The math is in rigid_transforms.h; this file checks
// inputs and splits the samples over threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "rigid_transforms/rigid_transforms.h"
#include "rigid_transforms/rigid_transforms_checks.h"

namespace flame_ext {
namespace {

// Samples of the kinematic chain per task: one sample is about a microsecond of work.
constexpr int64_t kChainGrain = 64;

std::tuple<at::Tensor, at::Tensor> rigid_transforms_cpu(const at::Tensor& pose_in,
                                                        const at::Tensor& joints_in,
                                                        const at::Tensor& parents) {
  check_chain_inputs(pose_in, joints_in);
  check_parents(parents, pose_in);
  const int64_t batch = pose_in.size(0), num_joints = pose_in.size(1);
  const ParentTable table = read_parents(parents);
  const at::Tensor pose = pose_in.contiguous(), joints = joints_in.contiguous();
  at::Tensor transforms = at::empty({batch, num_joints, 4, 4}, pose.options());
  at::Tensor pose_feature = at::empty({batch, 9 * (num_joints - 1)}, pose.options());
  if (batch == 0) return {transforms, pose_feature};

  AT_DISPATCH_FLOATING_TYPES(pose.scalar_type(), "rigid_transforms_cpu", [&] {
    const scalar_t* p = pose.const_data_ptr<scalar_t>();
    const scalar_t* jt = joints.const_data_ptr<scalar_t>();
    scalar_t* out_t = transforms.mutable_data_ptr<scalar_t>();
    scalar_t* out_f = pose_feature.mutable_data_ptr<scalar_t>();
    const int nj = static_cast<int>(num_joints);
    at::parallel_for(0, batch, kChainGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        rigid_transforms_sample<false, kMaxJoints>(p + b * 3 * nj, jt + b * 3 * nj, table.p, nj,
                                            out_t + b * 16 * nj, out_f + b * 9 * (nj - 1));
    });
  });
  return {transforms, pose_feature};
}

std::tuple<at::Tensor, at::Tensor> rigid_transforms_backward_cpu(
    const at::Tensor& grad_transforms_in, const at::Tensor& grad_pose_feature_in,
    const at::Tensor& pose_in, const at::Tensor& joints_in, const at::Tensor& parents) {
  check_chain_inputs(pose_in, joints_in);
  check_parents(parents, pose_in);
  check_chain_grads(grad_transforms_in, grad_pose_feature_in, pose_in);
  const int64_t batch = pose_in.size(0), num_joints = pose_in.size(1);
  const ParentTable table = read_parents(parents);
  const at::Tensor pose = pose_in.contiguous(), joints = joints_in.contiguous();
  const at::Tensor grad_t = grad_transforms_in.contiguous();
  const at::Tensor grad_f = grad_pose_feature_in.contiguous();
  at::Tensor grad_pose = at::empty({batch, num_joints, 3}, pose.options());
  at::Tensor grad_joints = at::empty({batch, num_joints, 3}, pose.options());
  if (batch == 0) return {grad_pose, grad_joints};

  AT_DISPATCH_FLOATING_TYPES(pose.scalar_type(), "rigid_transforms_backward_cpu", [&] {
    const scalar_t* p = pose.const_data_ptr<scalar_t>();
    const scalar_t* jt = joints.const_data_ptr<scalar_t>();
    const scalar_t* gt = grad_t.const_data_ptr<scalar_t>();
    const scalar_t* gf = grad_f.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_pose.mutable_data_ptr<scalar_t>();
    scalar_t* gj = grad_joints.mutable_data_ptr<scalar_t>();
    const int nj = static_cast<int>(num_joints);
    at::parallel_for(0, batch, kChainGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        rigid_transforms_backward_sample<false, kMaxJoints>(
            gt + b * 16 * nj, gf + b * 9 * (nj - 1), p + b * 3 * nj, jt + b * 3 * nj, table.p,
            nj, gp + b * 3 * nj, gj + b * 3 * nj);
    });
  });
  return {grad_pose, grad_joints};
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CPU, m) {
  m.impl("rigid_transforms", &rigid_transforms_cpu);
  m.impl("rigid_transforms_backward", &rigid_transforms_backward_cpu);
}

}  // namespace flame_ext
