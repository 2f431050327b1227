// The CUDA kernels of the landmarks op family and their launch plans (the launchers are
// in landmarks.cu, the math in landmarks.h, shared with the CPU loops).
//
// Forward: one launch, one warp per sample. Every lane computes its sample's contour bin
// from the pose (the same broadcast loads and arithmetic in all lanes: no divergence, no
// shuffle), then the lanes stride over the landmarks.
// Backward: one block per sample, no atomics. The block zero-fills its sample's slice of
// grad_v, lists the 3 (Ld + L) terms bary * grad_lmk with their vertex, and for each
// distinct vertex the thread holding its first term sums every term of that vertex in
// term order and stores the result: the same bits on every run.
//
// A bad index in the tables is never followed: its landmark is NaN and it gets no
// gradient (see landmarks.cu).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"
#include "landmarks/landmarks.h"
#include "launch.h"

namespace flame_ext {
namespace landmarks_kernels {

constexpr int kWarpSize = 32;
constexpr int kForwardThreads = 128;  // 4 samples per block
constexpr int kBackwardThreads = 256;  // >= 3 * 68 terms: FLAME's '68' set in one tile

// ---------------------------------------------------------------------------------------
// Kernels.

// Tables of one call, as the kernels read them.
template <typename scalar_t>
struct LandmarkTables {
  const int64_t* tris;           // (F, 3)
  const int64_t* lmk_faces_idx;  // (L,)
  const scalar_t* lmk_bary;      // (L, 3)
  const int64_t* dyn_faces;      // (NB, Ld), null without contour
  const scalar_t* dyn_bary;      // (NB, Ld, 3), null without contour
};

// Face and weights of landmark l of a sample whose contour bin is `bin`; -1 (an invalid
// face: a NaN landmark without gradient) for a contour landmark without a bin
// (kNoContourBin: a non-finite pose) or with a bin outside the table.
template <typename scalar_t>
__device__ __forceinline__ int64_t landmark_face(const LandmarkTables<scalar_t>& t,
                                                 const LandmarkSizes& s, int64_t bin, int64_t l,
                                                 const scalar_t** bary) {
  if (l < s.n_contour) {
    if (!in_range(bin, s.num_bins)) return -1;
    const int64_t row = bin * s.n_contour + l;
    *bary = t.dyn_bary + 3 * row;
    return t.dyn_faces[row];
  }
  *bary = t.lmk_bary + 3 * (l - s.n_contour);
  return t.lmk_faces_idx[l - s.n_contour];
}

// The face's three vertex indices, or false when the face or a corner is out of range.
__device__ __forceinline__ bool load_corners(const int64_t* tris, int64_t face,
                                             const LandmarkSizes& s, int64_t* corners) {
  if (!in_range(face, s.num_faces)) return false;
  bool ok = true;
  for (int k = 0; k < 3; ++k) {
    corners[k] = tris[3 * face + k];
    ok = ok && in_range(corners[k], s.num_vertices);
  }
  return ok;
}

template <typename scalar_t>
__global__ void landmarks_forward_kernel(const scalar_t* __restrict__ v,
                                         const scalar_t* __restrict__ poses, int64_t pose_stride,
                                         int64_t contour_rule, LandmarkTables<scalar_t> t,
                                         LandmarkSizes s, scalar_t* __restrict__ lmk,
                                         int64_t* __restrict__ bins) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kForwardThreads / kWarpSize) +
                    threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (b >= s.batch) return;
  // A bin in [0, num_bins - 1], or kNoContourBin (landmark_face answers it).
  const int64_t bin = contour_rule == kContourNone
                          ? 0
                          : contour_bin(poses + b * pose_stride, contour_rule, s.num_bins);
  if (lane == 0) bins[b] = bin;
  const int64_t n_lmk = s.n_contour + s.n_static;
  const scalar_t* vb = v + b * s.num_vertices * 3;
  scalar_t* out = lmk + b * n_lmk * 3;
  for (int64_t l = lane; l < n_lmk; l += kWarpSize) {
    const scalar_t* bary;
    const int64_t face = landmark_face(t, s, bin, l, &bary);
    int64_t corners[3];
    if (load_corners(t.tris, face, s, corners)) {
      barycentric_point(vb, corners, bary, out + 3 * l);
    } else {
      for (int c = 0; c < 3; ++c) out[3 * l + c] = static_cast<scalar_t>(NAN);
    }
  }
}

// Term j = 3 l + k of a sample: corner k of landmark l, weighted. Returns its vertex
// index (-1 when the tables hold an index out of range) and sets value = bary * grad.
template <typename scalar_t>
__device__ __forceinline__ int64_t load_term(const LandmarkTables<scalar_t>& t,
                                             const LandmarkSizes& s, int64_t bin,
                                             const scalar_t* grad, int64_t j, scalar_t* value) {
  const int64_t l = j / 3;
  const int64_t k = j % 3;
  const scalar_t* bary;
  const int64_t face = landmark_face(t, s, bin, l, &bary);
  if (!in_range(face, s.num_faces)) return -1;
  const int64_t vertex = t.tris[3 * face + k];
  if (!in_range(vertex, s.num_vertices)) return -1;
  for (int c = 0; c < 3; ++c) value[c] = bary[k] * grad[3 * l + c];
  return vertex;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBackwardThreads)
    landmarks_backward_kernel(const scalar_t* __restrict__ grad_lmk,
                              const int64_t* __restrict__ bins, LandmarkTables<scalar_t> t,
                              LandmarkSizes s, scalar_t* __restrict__ grad_v) {
  FLAME_SHARED(tile_vertex, int64_t[kBackwardThreads]);
  FLAME_SHARED(tile_value, scalar_t[kBackwardThreads][3]);
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t n_lmk = s.n_contour + s.n_static;
  const int64_t n_terms = 3 * n_lmk;
  const scalar_t* grad = grad_lmk + b * n_lmk * 3;
  scalar_t* gv = grad_v + b * s.num_vertices * 3;

  for (int64_t i = tid; i < 3 * s.num_vertices; i += kBackwardThreads) gv[i] = scalar_t(0);
  // Out of range (kNoContourBin, or a bad value): no contour terms (landmark_face).
  const int64_t bin = s.n_contour > 0 ? bins[b] : 0;
  // The zeros above are ordered before every store below by this barrier (and the ones
  // in the loop), so a vertex's sum is never overwritten by another thread's zero.
  __syncthreads();

  // The loops' bounds are the same for the whole block, so every thread reaches every
  // barrier.
  for (int64_t i0 = 0; i0 < n_terms; i0 += kBackwardThreads) {
    const int64_t i = i0 + tid;
    scalar_t unused[3];
    const int64_t vertex = i < n_terms ? load_term(t, s, bin, grad, i, unused) : -1;
    bool first = vertex >= 0;
    scalar_t sum[3] = {scalar_t(0), scalar_t(0), scalar_t(0)};
    for (int64_t j0 = 0; j0 < n_terms; j0 += kBackwardThreads) {
      const int64_t j = j0 + tid;
      if (j < n_terms) tile_vertex[tid] = load_term(t, s, bin, grad, j, tile_value[tid]);
      __syncthreads();
      const int64_t n = n_terms - j0 < kBackwardThreads ? n_terms - j0 : kBackwardThreads;
      if (vertex >= 0) {
        for (int64_t jj = 0; jj < n; ++jj) {
          if (tile_vertex[jj] != vertex) continue;
          first = first && j0 + jj >= i;
          for (int c = 0; c < 3; ++c) sum[c] += tile_value[jj][c];
        }
      }
      __syncthreads();
    }
    if (first)
      for (int c = 0; c < 3; ++c) gv[3 * vertex + c] = sum[c];
  }
}

// ---------------------------------------------------------------------------------------
// Launch plans (host code).

// landmarks_forward_kernel<T>: one warp per sample.
inline LaunchPlan landmarks_forward_plan(int64_t batch, const DeviceLimits& limits) {
  constexpr int64_t kSamplesPerBlock = kForwardThreads / kWarpSize;
  const int64_t blocks = ceil_div(batch, kSamplesPerBlock);
  TORCH_CHECK(blocks <= limits.max_grid_x, "flame_ext::landmarks: batch ", batch,
              " is too large");
  return {"landmarks_forward_kernel", dim3(static_cast<unsigned>(blocks)),
          dim3(kForwardThreads)};
}

// landmarks_backward_kernel<T>: one block per sample.
inline LaunchPlan landmarks_backward_plan(int64_t batch, const DeviceLimits& limits) {
  TORCH_CHECK(batch <= limits.max_grid_x, "flame_ext::landmarks_backward: batch ", batch,
              " is too large");
  return {"landmarks_backward_kernel", dim3(static_cast<unsigned>(batch)),
          dim3(kBackwardThreads)};
}

}  // namespace landmarks_kernels
}  // namespace flame_ext
