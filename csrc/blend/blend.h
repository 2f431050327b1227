// Math of the blend op family, host and device: out = base + coeffs @ dirs^T +
// pose_coeffs @ pose_dirs (docs/SPEC.md section 3 steps 1 and 4, and the texture) and its adjoints
// grad_coeffs = grad_out @ dirs, grad_pose_coeffs = grad_out @ pose_dirs^T.
//
// The op is a product of a (B,K) matrix with a tall (N,K) one, so the arithmetic is tiny and
// what matters is the loop around it. The pieces here are the inner steps both backends
// share: the CPU loops call them with V = a SIMD vector (lanes along k or n) and the CUDA
// kernels with V = a scalar per thread. Every sum runs in a fixed order, so repeated runs
// give bit-identical results.
#pragma once

#include <cstdint>

#include "common.h"

namespace flame_ext {
namespace blend {

// Outer-product step of R x S dot products: acc[i][j] += x[i] * y[j], with x and y holding
// lanes along the summed index (summed at the end by lane_sum). V is a scalar on CUDA and a
// SIMD vector on the CPU.
template <int I, int J, typename V>
FLAME_HD void outer_step(const V (&x)[I], const V (&y)[J], V (&acc)[I][J]) {
FLAME_UNROLL
  for (int i = 0; i < I; ++i) {
FLAME_UNROLL
    for (int j = 0; j < J; ++j) acc[i][j] += x[i] * y[j];
  }
}

// Axpy step: acc[i][j] += y[j] * c[i] with scalar c, y holding lanes along the output index
// (the pose correctives over n; grad_coeffs over k). The scalar-times-vector form lets the
// compiler fold the broadcast of c into the multiply.
template <int I, int J, typename T, typename V>
FLAME_HD void scaled_step(const T (&c)[I], const V (&y)[J], V (&acc)[I][J]) {
FLAME_UNROLL
  for (int i = 0; i < I; ++i) {
FLAME_UNROLL
    for (int j = 0; j < J; ++j) acc[i][j] += y[j] * c[i];
  }
}

// Sum of W lanes, pairwise in a fixed order. `lanes` is clobbered.
template <int W, typename T>
FLAME_HD T lane_sum(T* lanes) {
FLAME_UNROLL
  for (int width = W / 2; width > 0; width /= 2) {
FLAME_UNROLL
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// Serial dots over k in [k0, k1): acc[s] += sum_k row[k] * coeffs[s * ldc + k]. The CUDA
// per-thread loop and the tail of the CPU vector loop.
template <int S, typename T>
FLAME_HD void row_dots(const T* row, const T* coeffs, int64_t ldc, int64_t k0, int64_t k1,
                       T (&acc)[S]) {
  for (int64_t k = k0; k < k1; ++k) {
    const T d = row[k];
FLAME_UNROLL
    for (int s = 0; s < S; ++s) acc[s] += d * coeffs[s * ldc + k];
  }
}

// The pose correctives of one output element over p in [0, P): value + sum_p
// pose_coeffs[p] * pose_dirs[p * ld], in order of p.
template <typename T>
FLAME_HD T pose_sum(T value, const T* pose_coeffs, const T* pose_dirs, int64_t ld, int64_t P) {
  for (int64_t p = 0; p < P; ++p) value += pose_coeffs[p] * pose_dirs[p * ld];
  return value;
}

}  // namespace blend
}  // namespace flame_ext
