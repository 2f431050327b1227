// The CUDA kernels of the rigid_transforms op family and their launch plans (the
// launchers are in rigid_transforms.cu, the per-sample math in rigid_transforms.h).
//
// One thread per sample walks the whole kinematic chain, in one launch, forward and
// backward. No atomics, no host-device synchronisation.
#pragma once

#include <cstdint>
#include <limits>

#include "common.h"
#include "launch.h"
#include "rigid_transforms/rigid_transforms.h"

namespace flame_ext {
namespace rigid_transforms_kernels {

// One sample per thread, each walking the whole chain: small blocks spread a batch over
// more SMs (B = 4096 is 128 blocks here, 32 at 128 threads).
constexpr int kChainThreads = 32;

// The joint count the kernels are compiled for exactly (FLAME's), with the chain state in
// registers; other trees use the kernels for at most 8 or kMaxJoints joints, whose chain
// state is indexed at run time (a local-memory stack frame).
constexpr int kExactJoints = 5;
constexpr int kSmallJoints = 8;

// ---------------------------------------------------------------------------------------
// Kernels.

// The joint tree: the values of a CPU tensor, checked on the host and passed by value
// (nothing to copy to the device), or a device tensor read by each thread.
struct ParentsArg {
  ParentTable table;
  const int64_t* device;  // null: use table
};

// Fills parents; false when a device tree is not valid (the caller writes NaN then,
// rather than reading out of bounds: checking on the host would synchronise).
template <bool kExact, int kCap>
__device__ inline bool load_parents(const ParentsArg& arg, int num_joints,
                                    int32_t (&parents)[kCap]) {
  const int n = chain_length<kExact, kCap>(num_joints);
  if (arg.device == nullptr) {
    FLAME_UNROLL_CONSTANT
    for (int j = 0; j < n; ++j) parents[j] = arg.table.p[j];
    return true;
  }
  bool valid = true;
  FLAME_UNROLL_CONSTANT
  for (int j = 0; j < n; ++j) {
    const int64_t p = arg.device[j];
    valid = valid && (j == 0 ? p == -1 : (p >= 0 && p < j));
    parents[j] = valid ? static_cast<int32_t>(p) : 0;
  }
  return valid;
}

template <typename scalar_t>
__device__ void fill_nan(scalar_t* out, int n) {
  for (int k = 0; k < n; ++k) out[k] = std::numeric_limits<scalar_t>::quiet_NaN();
}

// kExact: compiled for exactly kCap joints, the chain in registers (see
// rigid_transforms.h); otherwise for at most kCap.
template <int kCap, bool kExact, typename scalar_t>
__global__ void __launch_bounds__(kChainThreads)
    rigid_transforms_kernel(const scalar_t* __restrict__ pose,
                            const scalar_t* __restrict__ joints, ParentsArg parents_arg,
                            int num_joints, int64_t batch, scalar_t* __restrict__ transforms,
                            scalar_t* __restrict__ pose_feature) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  scalar_t* t = transforms + b * 16 * num_joints;
  scalar_t* f = pose_feature + b * 9 * (num_joints - 1);
  int32_t parents[kCap];
  if (!load_parents<kExact>(parents_arg, num_joints, parents)) {
    fill_nan(t, 16 * num_joints);
    fill_nan(f, 9 * (num_joints - 1));
    return;
  }
  rigid_transforms_sample<kExact>(pose + b * 3 * num_joints, joints + b * 3 * num_joints,
                                parents, num_joints, t, f);
}

template <int kCap, bool kExact, typename scalar_t>
__global__ void __launch_bounds__(kChainThreads)
    rigid_transforms_backward_kernel(const scalar_t* __restrict__ grad_transforms,
                                     const scalar_t* __restrict__ grad_pose_feature,
                                     const scalar_t* __restrict__ pose,
                                     const scalar_t* __restrict__ joints,
                                     ParentsArg parents_arg, int num_joints, int64_t batch,
                                     scalar_t* __restrict__ grad_pose,
                                     scalar_t* __restrict__ grad_joints) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t offset = b * 3 * num_joints;
  int32_t parents[kCap];
  if (!load_parents<kExact>(parents_arg, num_joints, parents)) {
    fill_nan(grad_pose + offset, 3 * num_joints);
    fill_nan(grad_joints + offset, 3 * num_joints);
    return;
  }
  rigid_transforms_backward_sample<kExact>(
      grad_transforms + b * 16 * num_joints, grad_pose_feature + b * 9 * (num_joints - 1),
      pose + offset, joints + offset, parents, num_joints, grad_pose + offset,
      grad_joints + offset);
}

// ---------------------------------------------------------------------------------------
// Launch plans (host code): one thread per sample, in blocks of kChainThreads.

inline LaunchPlan chain_plan(const char* kernel, int64_t batch, const DeviceLimits& limits) {
  const int64_t blocks = ceil_div(batch, kChainThreads);
  TORCH_CHECK(blocks <= limits.max_grid_x, "flame_ext: ", batch,
              " items need more CUDA blocks than a launch allows");
  return {kernel, dim3(static_cast<unsigned>(blocks)), dim3(kChainThreads)};
}

// rigid_transforms_kernel<kCap, kExact, T>.
inline LaunchPlan rigid_transforms_plan(int64_t batch, const DeviceLimits& limits) {
  return chain_plan("rigid_transforms_kernel", batch, limits);
}

// rigid_transforms_backward_kernel<kCap, kExact, T>.
inline LaunchPlan rigid_transforms_backward_plan(int64_t batch, const DeviceLimits& limits) {
  return chain_plan("rigid_transforms_backward_kernel", batch, limits);
}

}  // namespace rigid_transforms_kernels
}  // namespace flame_ext
