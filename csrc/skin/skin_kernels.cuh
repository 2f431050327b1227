// The CUDA kernels of the skin op family and their launch plans (the launchers are in
// skin.cu, the per-vertex math in skin.h).
//
// skin: one block per (sample, 256 vertices); the sample's transforms sit in shared
// memory, v_posed and v move through shared memory so that global loads and stores are
// coalesced, and T_v is written with 16-byte vector stores. skin_backward: the same blocks
// (over 1024 vertices each) write grad_v_posed and a partial sum of grad_transforms per
// block, reduced in a fixed order in shared memory; a second kernel sums the partials of
// each sample in block order. No atomics: results are bitwise reproducible. No
// host-device synchronisation anywhere (CUDA-graph capturable).
#pragma once

#include <cstdint>

#include "common.h"
#include "launch.h"
#include "skin/skin.h"

namespace flame_ext {
namespace skin_kernels {

constexpr int kSkinThreads = 256;
// Tiles of kSkinThreads vertices per backward block: fewer partial sums to reduce.
constexpr int kBackwardTiles = 4;
constexpr int kReduceThreads = 256;

static_assert(16 * kMaxJoints <= kSkinThreads,
              "skin_backward_kernel gives every entry of grad_transforms its own thread");

// ---------------------------------------------------------------------------------------
// Kernels.

// 16-byte loads and stores of a transform row (4 scalars; 16-byte aligned addresses): a
// float row moves as one 16-byte access, a double row as two.
template <typename scalar_t>
struct alignas(16) Bytes16 {
  scalar_t v[16 / sizeof(scalar_t)];
};

__device__ __forceinline__ void store_row(float* dst, const Row4<float>& r) {
  *reinterpret_cast<Bytes16<float>*>(dst) = Bytes16<float>{{r[0], r[1], r[2], r[3]}};
}
__device__ __forceinline__ void store_row(double* dst, const Row4<double>& r) {
  reinterpret_cast<Bytes16<double>*>(dst)[0] = Bytes16<double>{{r[0], r[1]}};
  reinterpret_cast<Bytes16<double>*>(dst)[1] = Bytes16<double>{{r[2], r[3]}};
}
__device__ __forceinline__ Row4<float> load_row(const float* src) {
  const Bytes16<float> a = *reinterpret_cast<const Bytes16<float>*>(src);
  return {a.v[0], a.v[1], a.v[2], a.v[3]};
}
__device__ __forceinline__ Row4<double> load_row(const double* src) {
  const Bytes16<double> a = reinterpret_cast<const Bytes16<double>*>(src)[0];
  const Bytes16<double> b = reinterpret_cast<const Bytes16<double>*>(src)[1];
  return {a.v[0], a.v[1], b.v[0], b.v[1]};
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
  FLAME_SHARED(rows, Row4<scalar_t>[4 * kMaxJoints]);
  FLAME_SHARED(xyz, scalar_t[3 * kSkinThreads]);
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
  FLAME_SHARED(rows, Row4<scalar_t>[4 * kMaxJoints]);
  FLAME_SHARED(grads, Row4<scalar_t>[4 * kSkinThreads]);
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

// ---------------------------------------------------------------------------------------
// Launch plans (host code).

inline int64_t blocks_for(int64_t items, int64_t per_block, const DeviceLimits& limits) {
  const int64_t blocks = ceil_div(items, per_block);
  TORCH_CHECK(blocks <= limits.max_grid_x, "flame_ext: ", items,
              " items need more CUDA blocks than a launch allows");
  return blocks;
}

// Blocks of kSkinThreads vertices per sample in skin_kernel.
inline int64_t skin_blocks_per_sample(int64_t num_verts) {
  return ceil_div(num_verts, kSkinThreads);
}

// skin_kernel<kRows, T>: blocks_per_sample blocks per sample.
inline LaunchPlan skin_plan(int64_t batch, int64_t blocks_per_sample,
                            const DeviceLimits& limits) {
  const int64_t blocks = blocks_for(batch * blocks_per_sample, 1, limits);
  return {"skin_kernel", dim3(static_cast<unsigned>(blocks)), dim3(kSkinThreads)};
}

// Chunks of kSkinThreads * kBackwardTiles vertices per sample in skin_backward_kernel,
// each with its partial sum of grad_transforms.
inline int64_t skin_backward_chunks(int64_t num_verts) {
  return ceil_div(num_verts, kSkinThreads * kBackwardTiles);
}

// skin_backward_kernel<kHasGradT, T>: one block per (sample, chunk).
inline LaunchPlan skin_backward_plan(int64_t batch, int64_t chunks, const DeviceLimits& limits) {
  const int64_t blocks = blocks_for(batch * chunks, 1, limits);
  return {"skin_backward_kernel", dim3(static_cast<unsigned>(blocks)), dim3(kSkinThreads)};
}

// reduce_partials_kernel<T>: one thread per entry of grad_transforms (batch * width).
inline LaunchPlan reduce_partials_plan(int64_t batch, int64_t width, const DeviceLimits& limits) {
  const int64_t blocks = blocks_for(batch * width, kReduceThreads, limits);
  return {"reduce_partials_kernel", dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads)};
}

}  // namespace skin_kernels
}  // namespace flame_ext
