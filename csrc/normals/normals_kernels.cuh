// The CUDA kernels of the normals op family and their launch plans (the launchers are in
// normals.cu, the math in normals.h, shared with the CPU loops).
//
// One thread per (sample, vertex) in every kernel; each thread walks its vertex's entries
// of the vertex-face adjacency in table order and writes only its own outputs, so no
// atomics and no shared memory are needed and the bits do not depend on the block order.
// Forward: n_i = normalize(sum of the incident faces' normals).
// Backward, two launches: vertex_normals_sum_grad_kernel writes g_s (the gradient of each
// vertex's summed normal, recomputing the sum), then vertex_normals_backward_kernel
// gathers, per vertex, the face normals' adjoints for its corner from the g_s of each
// incident face's three corners.
//
// A bad adjacency is never followed: the vertex's normal is NaN and it gets no gradient.
#pragma once

#include <cstdint>

#include "common.h"
#include "launch.h"
#include "normals/normals.h"

namespace flame_ext {
namespace normals_kernels {

constexpr int kThreads = 256;

// The (sample, vertex) of this thread, or false past the end.
__device__ __forceinline__ bool thread_vertex(const NormalSizes& s, int64_t* b, int64_t* i) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= s.batch * s.num_vertices) return false;
  *b = t / s.num_vertices;
  *i = t % s.num_vertices;
  return true;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vertex_normals_kernel(const scalar_t* __restrict__ v, Adjacency a, NormalSizes s,
                          scalar_t* __restrict__ n) {
  int64_t b, i;
  if (!thread_vertex(s, &b, &i)) return;
  const int64_t base = b * s.num_vertices * 3;
  vertex_normal(v + base, a, s, i, n + base + 3 * i);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vertex_normals_sum_grad_kernel(const scalar_t* __restrict__ grad_n,
                                   const scalar_t* __restrict__ v, Adjacency a, NormalSizes s,
                                   scalar_t* __restrict__ grad_sum) {
  int64_t b, i;
  if (!thread_vertex(s, &b, &i)) return;
  const int64_t base = b * s.num_vertices * 3;
  vertex_sum_gradient(v + base, grad_n + base, a, s, i, grad_sum + base + 3 * i);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    vertex_normals_backward_kernel(const scalar_t* __restrict__ grad_sum,
                                   const scalar_t* __restrict__ v, Adjacency a, NormalSizes s,
                                   scalar_t* __restrict__ grad_v) {
  int64_t b, i;
  if (!thread_vertex(s, &b, &i)) return;
  const int64_t base = b * s.num_vertices * 3;
  vertex_gradient(v + base, grad_sum + base, a, s, i, grad_v + base + 3 * i);
}

// ---------------------------------------------------------------------------------------
// Launch plans (host code).

// The grid of every kernel of the family: one thread per (sample, vertex).
inline dim3 vertex_grid(const NormalSizes& s, const DeviceLimits& limits) {
  const int64_t blocks = ceil_div(s.batch * s.num_vertices, kThreads);
  TORCH_CHECK(blocks <= limits.max_grid_x, "flame_ext::vertex_normals: batch ", s.batch, " x ",
              s.num_vertices, " vertices is too large");
  return dim3(static_cast<unsigned>(blocks));
}

inline LaunchPlan vertex_normals_plan(const NormalSizes& s, const DeviceLimits& limits) {
  return {"vertex_normals_kernel", vertex_grid(s, limits), dim3(kThreads)};
}

inline LaunchPlan vertex_normals_sum_grad_plan(const NormalSizes& s, const DeviceLimits& limits) {
  return {"vertex_normals_sum_grad_kernel", vertex_grid(s, limits), dim3(kThreads)};
}

inline LaunchPlan vertex_normals_backward_plan(const NormalSizes& s, const DeviceLimits& limits) {
  return {"vertex_normals_backward_kernel", vertex_grid(s, limits), dim3(kThreads)};
}

}  // namespace normals_kernels
}  // namespace flame_ext
