// Per-vertex math of the skin op family, host and device: linear blend skinning of one
// vertex and its reverse mode. The CPU loops (skin_cpu.cpp) and the CUDA kernels
// (skin_kernels.cuh) only decide which vertex to hand to these functions and where
// partial sums go.
//
// Layouts: a transform is 16 scalars, row-major 4x4 (the rigid_transforms op's output);
// lbs weights are the J weights of one vertex.
#pragma once

#include <cstdint>

#include "common.h"

namespace flame_ext {

// Skinning works on the rows of 4x4 transforms. row_t holds one row (4 scalars) and needs
// only row + row, row * row (elementwise), row * scalar and [i]: Row4 below on the GPU,
// a SIMD vector type on the CPU (skin_cpu.cpp), so one vertex costs a few vector
// instructions there while the math stays written once. The CPU's AVX-512 forward turns
// it the other way round: scalar_t is a vector of 16 vertices' scalars (8 in float64)
// and row_t a Row4 of those, so that each instruction works for 16 vertices.
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Row4 {
  scalar_t v[4];
  FLAME_HD scalar_t operator[](int i) const { return v[i]; }
  FLAME_HD scalar_t& operator[](int i) { return v[i]; }
};

template <typename scalar_t>
FLAME_HD Row4<scalar_t> operator+(const Row4<scalar_t>& a, const Row4<scalar_t>& b) {
  return {a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]};
}

template <typename scalar_t>
FLAME_HD Row4<scalar_t> operator*(const Row4<scalar_t>& a, const Row4<scalar_t>& b) {
  return {a.v[0] * b.v[0], a.v[1] * b.v[1], a.v[2] * b.v[2], a.v[3] * b.v[3]};
}

template <typename scalar_t>
FLAME_HD Row4<scalar_t> operator*(const Row4<scalar_t>& a, scalar_t s) {
  return {a.v[0] * s, a.v[1] * s, a.v[2] * s, a.v[3] * s};
}

template <typename scalar_t>
FLAME_HD Row4<scalar_t>& operator+=(Row4<scalar_t>& a, const Row4<scalar_t>& b) {
  a = a + b;
  return a;
}

// The scalar 1. skin_cpu.cpp's AVX-512 loop runs these functions with scalar_t a SIMD
// vector holding one scalar of each of several vertices, and specializes this for it.
template <typename scalar_t>
FLAME_HD scalar_t unit() {
  return scalar_t(1);
}

template <typename scalar_t, typename row_t>
FLAME_HD scalar_t row_dot(const row_t& a, const row_t& b) {
  const row_t p = a * b;
  return (p[0] + p[1]) + (p[2] + p[3]);
}

// T = sum_j w_j A_j over the first kRows rows (3: what v needs; 4: the full T_v).
// transforms holds the sample's J transforms as 4 J rows.
template <int kRows, typename scalar_t, typename row_t>
FLAME_HD void blend_rows(const scalar_t* weights, const row_t* transforms, int num_joints,
                         row_t* t) {
  for (int r = 0; r < kRows; ++r) t[r] = transforms[r] * weights[0];
  for (int j = 1; j < num_joints; ++j) {
    const scalar_t w = weights[j];
    for (int r = 0; r < kRows; ++r) t[r] += transforms[4 * j + r] * w;
  }
}

// One vertex of skin(): v_out (3) = T_v [v_posed; 1], and the first kRows rows of T_v in t
// (kRows = 4 when the caller writes vertex_transforms).
template <int kRows, typename scalar_t, typename row_t>
FLAME_HD void skin_vertex(const scalar_t* v_posed, const scalar_t* weights,
                          const row_t* transforms, int num_joints, scalar_t* v_out, row_t* t) {
  blend_rows<kRows>(weights, transforms, num_joints, t);
  const row_t h = {v_posed[0], v_posed[1], v_posed[2], unit<scalar_t>()};
  for (int r = 0; r < 3; ++r) v_out[r] = row_dot<scalar_t>(t[r], h);
}

// Reverse mode of one vertex of skin(): grad_v_posed (3) = T_v[:3, :3]^T grad_v, and the
// gradient w.r.t. T_v in grad_t (4 rows): grad_v (x) [v_posed; 1] in the top rows plus,
// when kHasGradT, grad_vertex_transform (4 rows) in all four; without it the bottom row
// is left unset (no gradient reaches it). The caller spreads grad_t over the joints with
// accumulate_joint_grads.
template <bool kHasGradT, typename scalar_t, typename row_t>
FLAME_HD void skin_vertex_backward(const scalar_t* grad_v, const row_t* grad_vertex_transform,
                                   const scalar_t* v_posed, const scalar_t* weights,
                                   const row_t* transforms, int num_joints,
                                   scalar_t* grad_v_posed, row_t* grad_t) {
  row_t t[3];
  blend_rows<3>(weights, transforms, num_joints, t);
  // Lane k of t[0] g0 + t[1] g1 + t[2] g2 is sum_r T[r][k] g_r; lane 3 is unused.
  const row_t g = t[0] * grad_v[0] + t[1] * grad_v[1] + t[2] * grad_v[2];
  for (int k = 0; k < 3; ++k) grad_v_posed[k] = g[k];
  const row_t h = {v_posed[0], v_posed[1], v_posed[2], unit<scalar_t>()};
  for (int r = 0; r < 3; ++r) grad_t[r] = h * grad_v[r];
  if (kHasGradT) {
    for (int r = 0; r < 3; ++r) grad_t[r] += grad_vertex_transform[r];
    grad_t[3] = grad_vertex_transform[3];
  }
}

// acc_j += w_j grad_t over the first kRows rows: the contribution of one vertex to
// grad_transforms (4 J rows).
template <int kRows, typename scalar_t, typename row_t>
FLAME_HD void accumulate_joint_grads(const scalar_t* weights, const row_t* grad_t,
                                     int num_joints, row_t* acc) {
  for (int j = 0; j < num_joints; ++j) {
    const scalar_t w = weights[j];
    for (int r = 0; r < kRows; ++r) acc[4 * j + r] += grad_t[r] * w;
  }
}

}  // namespace flame_ext
