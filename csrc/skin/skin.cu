// CUDA implementation of the skin op family, calling the math of skin.h.
//
// rigid_transforms (+ backward): one thread per sample walks the whole kinematic chain, in
// one launch. skin: one block per (sample, 256 vertices); the sample's transforms sit in
// shared memory, v_posed and v move through shared memory so that global loads and stores
// are coalesced, and T_v is written with 16-byte vector stores. skin_backward: the same
// blocks (over 1024 vertices each) write grad_v_posed and a partial sum of
// grad_transforms per block, reduced in a fixed order in shared memory; a second kernel
// sums the partials of each sample in block order. No atomics: results are bitwise
// reproducible. No host-device synchronisation anywhere (CUDA-graph capturable).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "skin/skin.h"
#include "skin/skin_checks.h"

namespace flame_ext {
namespace {

// One sample per thread, each walking the chain in local memory: small blocks spread a
// batch over more SMs (B = 4096 is 128 blocks here, 32 at 128 threads).
constexpr int kChainThreads = 32;
constexpr int kSkinThreads = 256;
// Tiles of kSkinThreads vertices per backward block: fewer partial sums to reduce.
constexpr int kBackwardTiles = 4;
constexpr int kReduceThreads = 256;

static_assert(16 * kMaxJoints <= kSkinThreads,
              "skin_backward_kernel gives every entry of grad_transforms its own thread");

// The joint tree: the values of a CPU tensor, checked on the host and passed by value
// (nothing to copy to the device), or a device tensor read by each thread.
struct ParentsArg {
  ParentTable table;
  const int64_t* device;  // null: use table
};

// Fills parents; false when a device tree is not valid (the caller writes NaN then,
// rather than reading out of bounds: checking on the host would synchronise).
__device__ bool load_parents(const ParentsArg& arg, int num_joints, int32_t* parents) {
  if (arg.device == nullptr) {
    for (int j = 0; j < num_joints; ++j) parents[j] = arg.table.p[j];
    return true;
  }
  for (int j = 0; j < num_joints; ++j) {
    const int64_t p = arg.device[j];
    parents[j] = (p >= -1 && p < j) ? static_cast<int32_t>(p) : -2;
  }
  return parents_valid(parents, num_joints);
}

template <typename scalar_t>
__device__ void fill_nan(scalar_t* out, int n) {
  for (int k = 0; k < n; ++k) out[k] = std::numeric_limits<scalar_t>::quiet_NaN();
}

template <int kCap, typename scalar_t>
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
  if (!load_parents(parents_arg, num_joints, parents)) {
    fill_nan(t, 16 * num_joints);
    fill_nan(f, 9 * (num_joints - 1));
    return;
  }
  rigid_transforms_sample<kCap>(pose + b * 3 * num_joints, joints + b * 3 * num_joints,
                                parents, num_joints, t, f);
}

template <int kCap, typename scalar_t>
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
  if (!load_parents(parents_arg, num_joints, parents)) {
    fill_nan(grad_pose + offset, 3 * num_joints);
    fill_nan(grad_joints + offset, 3 * num_joints);
    return;
  }
  rigid_transforms_backward_sample<kCap>(
      grad_transforms + b * 16 * num_joints, grad_pose_feature + b * 9 * (num_joints - 1),
      pose + offset, joints + offset, parents, num_joints, grad_pose + offset,
      grad_joints + offset);
}

// 16-byte loads and stores of a transform row (4 scalars; 16-byte aligned addresses).
__device__ __forceinline__ void store_row(float* dst, const Row4<float>& r) {
  *reinterpret_cast<float4*>(dst) = make_float4(r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void store_row(double* dst, const Row4<double>& r) {
  reinterpret_cast<double2*>(dst)[0] = make_double2(r[0], r[1]);
  reinterpret_cast<double2*>(dst)[1] = make_double2(r[2], r[3]);
}
__device__ __forceinline__ Row4<float> load_row(const float* src) {
  const float4 a = *reinterpret_cast<const float4*>(src);
  return {a.x, a.y, a.z, a.w};
}
__device__ __forceinline__ Row4<double> load_row(const double* src) {
  const double2 a = reinterpret_cast<const double2*>(src)[0];
  const double2 b = reinterpret_cast<const double2*>(src)[1];
  return {a.x, a.y, b.x, b.y};
}

// Copies the sample's J transforms (16 J scalars) into shared rows.
template <typename scalar_t>
__device__ void load_transforms(const scalar_t* __restrict__ a, int num_joints,
                                Row4<scalar_t>* rows) {
  scalar_t* flat = reinterpret_cast<scalar_t*>(rows);
  for (int k = threadIdx.x; k < 16 * num_joints; k += blockDim.x) flat[k] = a[k];
}

// Block (sample b, vertices v0 .. v0 + 255). kRows = 4 writes vertex_transforms.
template <int kRows, typename scalar_t>
__global__ void __launch_bounds__(kSkinThreads)
    skin_kernel(const scalar_t* __restrict__ v_posed, const scalar_t* __restrict__ transforms,
                const scalar_t* __restrict__ lbs_weights, int num_joints, int64_t num_verts,
                int64_t blocks_per_sample, scalar_t* __restrict__ v_out,
                scalar_t* __restrict__ vertex_transforms) {
  __shared__ Row4<scalar_t> rows[4 * kMaxJoints];
  __shared__ scalar_t xyz[3 * kSkinThreads];
  const int64_t b = blockIdx.x / blocks_per_sample;
  const int64_t v0 = (blockIdx.x % blocks_per_sample) * kSkinThreads;
  const int n = static_cast<int>(num_verts - v0 < kSkinThreads ? num_verts - v0 : kSkinThreads);
  const int tid = threadIdx.x;
  const int64_t first = b * num_verts + v0;  // flat index of the block's first vertex

  load_transforms(transforms + b * 16 * num_joints, num_joints, rows);
  for (int k = tid; k < 3 * n; k += kSkinThreads) xyz[k] = v_posed[3 * first + k];
  __syncthreads();

  if (tid < n) {
    Row4<scalar_t> t[4];
    scalar_t v[3];
    skin_vertex<kRows>(xyz + 3 * tid, lbs_weights + (v0 + tid) * num_joints, rows, num_joints,
                       v, t);
    // Each thread overwrites only the three values it read.
    for (int r = 0; r < 3; ++r) xyz[3 * tid + r] = v[r];
    if (kRows == 4) {
      scalar_t* dst = vertex_transforms + (first + tid) * 16;
      for (int r = 0; r < 4; ++r) store_row(dst + 4 * r, t[r]);
    }
  }
  __syncthreads();
  for (int k = tid; k < 3 * n; k += kSkinThreads) v_out[3 * first + k] = xyz[k];
}

// Block (sample b, chunk c of kSkinThreads * kBackwardTiles vertices): grad_v_posed of
// its vertices, and partials[b, c] (16 J) = sum over them of w_vj grad_T_v.
//
// Per tile, every thread puts its vertex's grad_T_v (16 scalars) in shared memory; then
// thread (group g, entry e) adds w_vj grad_T_v[e] over the tile's vertices g, g + G, ...
// (G = 256 / 16 J groups) into a register. At the end the G group sums are added in group
// order. Every addition happens in a fixed order: no atomics, reproducible results.
template <bool kHasGradT, typename scalar_t>
__global__ void __launch_bounds__(kSkinThreads)
    skin_backward_kernel(const scalar_t* __restrict__ grad_v,
                         const scalar_t* __restrict__ grad_vertex_transforms,
                         const scalar_t* __restrict__ v_posed,
                         const scalar_t* __restrict__ transforms,
                         const scalar_t* __restrict__ lbs_weights, int num_joints,
                         int64_t num_verts, int64_t blocks_per_sample,
                         scalar_t* __restrict__ grad_v_posed, scalar_t* __restrict__ partials) {
  __shared__ Row4<scalar_t> rows[4 * kMaxJoints];
  __shared__ Row4<scalar_t> grads[4 * kSkinThreads];
  const int64_t b = blockIdx.x / blocks_per_sample;
  const int64_t chunk = blockIdx.x % blocks_per_sample;
  const int64_t v_begin = chunk * (kSkinThreads * kBackwardTiles);
  const int64_t v_end = v_begin + kSkinThreads * kBackwardTiles < num_verts
                            ? v_begin + kSkinThreads * kBackwardTiles
                            : num_verts;
  const int tid = threadIdx.x;
  const int width = 16 * num_joints;  // <= kSkinThreads
  const int groups = kSkinThreads / width;
  const int group = tid / width, e = tid % width;
  const int joint = e / 16, entry = e % 16;
  // Without grad_vertex_transforms the bottom rows (entries 12..15) stay zero.
  const bool reducer = group < groups && (kHasGradT || entry < 12);
  const scalar_t* flat = reinterpret_cast<const scalar_t*>(grads);

  load_transforms(transforms + b * 16 * num_joints, num_joints, rows);
  __syncthreads();

  scalar_t acc = scalar_t(0);
  for (int64_t tile = v_begin; tile < v_end; tile += kSkinThreads) {
    const int n = static_cast<int>(v_end - tile < kSkinThreads ? v_end - tile : kSkinThreads);
    if (tid < n) {
      const int64_t v = tile + tid;
      const int64_t i = b * num_verts + v;
      Row4<scalar_t> grad_vt[4], grad_t[4];
      if (kHasGradT)
        for (int r = 0; r < 4; ++r) grad_vt[r] = load_row(grad_vertex_transforms + 16 * i + 4 * r);
      scalar_t grad_p[3];
      skin_vertex_backward<kHasGradT>(grad_v + 3 * i, grad_vt, v_posed + 3 * i,
                                      lbs_weights + v * num_joints, rows, num_joints, grad_p,
                                      grad_t);
      for (int k = 0; k < 3; ++k) grad_v_posed[3 * i + k] = grad_p[k];
      for (int r = 0; r < (kHasGradT ? 4 : 3); ++r) grads[4 * tid + r] = grad_t[r];
    }
    __syncthreads();
    if (reducer) {
      for (int k = group; k < n; k += groups)
        acc += lbs_weights[(tile + k) * num_joints + joint] * flat[16 * k + entry];
    }
    __syncthreads();  // grads is overwritten by the next tile
  }

  scalar_t* sums = reinterpret_cast<scalar_t*>(grads);
  if (group < groups) sums[group * width + e] = acc;
  __syncthreads();
  if (tid < width) {
    scalar_t total = sums[tid];
    for (int g = 1; g < groups; ++g) total += sums[g * width + tid];
    partials[(b * blocks_per_sample + chunk) * width + tid] = total;
  }
}

// grad_transforms[b, e] = sum over chunks c, in order, of partials[b, c, e].
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const scalar_t* __restrict__ partials, int64_t batch, int64_t chunks,
                           int width, scalar_t* __restrict__ grad_transforms) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * width) return;
  const int64_t b = idx / width, e = idx % width;
  const scalar_t* p = partials + b * chunks * width + e;
  scalar_t total = p[0];
  for (int64_t c = 1; c < chunks; ++c) total += p[c * width];
  grad_transforms[idx] = total;
}

int64_t blocks_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "flame_ext: ", items,
              " items need more CUDA blocks than a launch allows");
  return blocks;
}

ParentsArg parents_arg(const at::Tensor& parents, at::Tensor& keep_alive) {
  ParentsArg arg{};
  if (parents.device().is_cpu()) {
    arg.table = read_parents(parents);
    arg.device = nullptr;
  } else {
    keep_alive = parents.contiguous();
    arg.device = keep_alive.data_ptr<int64_t>();
  }
  return arg;
}

std::tuple<at::Tensor, at::Tensor> rigid_transforms_cuda(const at::Tensor& pose_in,
                                                         const at::Tensor& joints_in,
                                                         const at::Tensor& parents) {
  check_chain_inputs(pose_in, joints_in, c10::DeviceType::CUDA);
  check_parents(parents, pose_in);
  const c10::cuda::CUDAGuard guard(pose_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = pose_in.size(0), num_joints = pose_in.size(1);
  at::Tensor parents_dev;
  const ParentsArg arg = parents_arg(parents, parents_dev);
  const at::Tensor pose = pose_in.contiguous(), joints = joints_in.contiguous();
  at::Tensor transforms = at::empty({batch, num_joints, 4, 4}, pose.options());
  at::Tensor pose_feature = at::empty({batch, 9 * (num_joints - 1)}, pose.options());
  if (batch == 0) return {transforms, pose_feature};

  const int64_t blocks = blocks_for(batch, kChainThreads);
  AT_DISPATCH_FLOATING_TYPES(pose.scalar_type(), "rigid_transforms_cuda", [&] {
    auto kernel = num_joints <= 8 ? rigid_transforms_kernel<8, scalar_t>
                                  : rigid_transforms_kernel<kMaxJoints, scalar_t>;
    kernel<<<static_cast<unsigned>(blocks), kChainThreads, 0, stream>>>(
        pose.data_ptr<scalar_t>(), joints.data_ptr<scalar_t>(), arg,
        static_cast<int>(num_joints), batch, transforms.data_ptr<scalar_t>(),
        pose_feature.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {transforms, pose_feature};
}

std::tuple<at::Tensor, at::Tensor> rigid_transforms_backward_cuda(
    const at::Tensor& grad_transforms_in, const at::Tensor& grad_pose_feature_in,
    const at::Tensor& pose_in, const at::Tensor& joints_in, const at::Tensor& parents) {
  check_chain_inputs(pose_in, joints_in, c10::DeviceType::CUDA);
  check_parents(parents, pose_in);
  check_chain_grads(grad_transforms_in, grad_pose_feature_in, pose_in);
  const c10::cuda::CUDAGuard guard(pose_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = pose_in.size(0), num_joints = pose_in.size(1);
  at::Tensor parents_dev;
  const ParentsArg arg = parents_arg(parents, parents_dev);
  const at::Tensor pose = pose_in.contiguous(), joints = joints_in.contiguous();
  const at::Tensor grad_t = grad_transforms_in.contiguous();
  const at::Tensor grad_f = grad_pose_feature_in.contiguous();
  at::Tensor grad_pose = at::empty({batch, num_joints, 3}, pose.options());
  at::Tensor grad_joints = at::empty({batch, num_joints, 3}, pose.options());
  if (batch == 0) return {grad_pose, grad_joints};

  const int64_t blocks = blocks_for(batch, kChainThreads);
  AT_DISPATCH_FLOATING_TYPES(pose.scalar_type(), "rigid_transforms_backward_cuda", [&] {
    auto kernel = num_joints <= 8 ? rigid_transforms_backward_kernel<8, scalar_t>
                                  : rigid_transforms_backward_kernel<kMaxJoints, scalar_t>;
    kernel<<<static_cast<unsigned>(blocks), kChainThreads, 0, stream>>>(
        grad_t.data_ptr<scalar_t>(), grad_f.data_ptr<scalar_t>(), pose.data_ptr<scalar_t>(),
        joints.data_ptr<scalar_t>(), arg, static_cast<int>(num_joints), batch,
        grad_pose.data_ptr<scalar_t>(), grad_joints.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_pose, grad_joints};
}

std::tuple<at::Tensor, at::Tensor> skin_cuda(const at::Tensor& v_posed_in,
                                             const at::Tensor& transforms_in,
                                             const at::Tensor& lbs_weights_in,
                                             bool write_vertex_transforms) {
  check_skin_inputs(v_posed_in, transforms_in, lbs_weights_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(v_posed_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = v_posed_in.size(0), num_verts = v_posed_in.size(1);
  const int64_t num_joints = transforms_in.size(1);
  const at::Tensor v_posed = v_posed_in.contiguous(), transforms = transforms_in.contiguous();
  const at::Tensor lbs_weights = lbs_weights_in.contiguous();
  at::Tensor v = at::empty({batch, num_verts, 3}, v_posed.options());
  at::Tensor vertex_transforms =
      write_vertex_transforms ? at::empty({batch, num_verts, 4, 4}, v_posed.options())
                              : at::empty({0}, v_posed.options());
  if (batch == 0 || num_verts == 0) return {v, vertex_transforms};

  const int64_t per_sample = (num_verts + kSkinThreads - 1) / kSkinThreads;
  const int64_t blocks = blocks_for(batch * per_sample, 1);
  AT_DISPATCH_FLOATING_TYPES(v_posed.scalar_type(), "skin_cuda", [&] {
    // vertex_transforms is freshly allocated, so its rows are 16-byte aligned.
    auto kernel = write_vertex_transforms ? skin_kernel<4, scalar_t> : skin_kernel<3, scalar_t>;
    kernel<<<static_cast<unsigned>(blocks), kSkinThreads, 0, stream>>>(
        v_posed.data_ptr<scalar_t>(), transforms.data_ptr<scalar_t>(),
        lbs_weights.data_ptr<scalar_t>(), static_cast<int>(num_joints), num_verts, per_sample,
        v.data_ptr<scalar_t>(),
        write_vertex_transforms ? vertex_transforms.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {v, vertex_transforms};
}

std::tuple<at::Tensor, at::Tensor> skin_backward_cuda(
    const at::Tensor& grad_v_in, const std::optional<at::Tensor>& grad_vertex_transforms_in,
    const at::Tensor& v_posed_in, const at::Tensor& transforms_in,
    const at::Tensor& lbs_weights_in) {
  check_skin_inputs(v_posed_in, transforms_in, lbs_weights_in, c10::DeviceType::CUDA);
  check_skin_grads(grad_v_in, grad_vertex_transforms_in, v_posed_in);
  const c10::cuda::CUDAGuard guard(v_posed_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = v_posed_in.size(0), num_verts = v_posed_in.size(1);
  const int64_t num_joints = transforms_in.size(1);
  const bool has_gvt = grad_vertex_transforms_in.has_value();
  at::Tensor gvt;
  if (has_gvt) {
    gvt = grad_vertex_transforms_in->contiguous();
    // Rows are read with 16-byte loads: a view with an odd storage offset is copied.
    if (reinterpret_cast<uintptr_t>(gvt.data_ptr()) % 16 != 0) gvt = gvt.clone();
  }
  const at::Tensor grad_v = grad_v_in.contiguous(), v_posed = v_posed_in.contiguous();
  const at::Tensor transforms = transforms_in.contiguous();
  const at::Tensor lbs_weights = lbs_weights_in.contiguous();
  at::Tensor grad_v_posed = at::empty({batch, num_verts, 3}, v_posed.options());
  at::Tensor grad_transforms = at::empty({batch, num_joints, 4, 4}, v_posed.options());
  if (batch == 0) return {grad_v_posed, grad_transforms};
  if (num_verts == 0) return {grad_v_posed, grad_transforms.zero_()};

  const int64_t width = 16 * num_joints;
  const int64_t chunks = (num_verts + kSkinThreads * kBackwardTiles - 1) /
                         (kSkinThreads * kBackwardTiles);
  const int64_t blocks = blocks_for(batch * chunks, 1);
  // With one chunk per sample its partial sum is the result.
  at::Tensor partials = chunks == 1 ? grad_transforms
                                    : at::empty({batch, chunks, width}, v_posed.options());
  AT_DISPATCH_FLOATING_TYPES(v_posed.scalar_type(), "skin_backward_cuda", [&] {
    auto kernel = has_gvt ? skin_backward_kernel<true, scalar_t>
                          : skin_backward_kernel<false, scalar_t>;
    kernel<<<static_cast<unsigned>(blocks), kSkinThreads, 0, stream>>>(
        grad_v.data_ptr<scalar_t>(), has_gvt ? gvt.data_ptr<scalar_t>() : nullptr,
        v_posed.data_ptr<scalar_t>(), transforms.data_ptr<scalar_t>(),
        lbs_weights.data_ptr<scalar_t>(), static_cast<int>(num_joints), num_verts, chunks,
        grad_v_posed.data_ptr<scalar_t>(), partials.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (chunks > 1) {
      reduce_partials_kernel<scalar_t>
          <<<static_cast<unsigned>(blocks_for(batch * width, kReduceThreads)), kReduceThreads, 0,
             stream>>>(
              partials.data_ptr<scalar_t>(), batch, chunks, static_cast<int>(width),
              grad_transforms.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_v_posed, grad_transforms};
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CUDA, m) {
  m.impl("rigid_transforms", &rigid_transforms_cuda);
  m.impl("rigid_transforms_backward", &rigid_transforms_backward_cuda);
  m.impl("skin", &skin_cuda);
  m.impl("skin_backward", &skin_backward_cuda);
}

}  // namespace flame_ext
