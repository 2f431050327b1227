// Per-sample math of the rigid_transforms op family, host and device: the kinematic
// chain (Rodrigues, world transforms, pose-corrective features) and its reverse mode. The
// CPU loop (rigid_transforms_cpu.cpp) and the CUDA kernels (rigid_transforms_kernels.cuh)
// only decide which sample to hand to these functions.
//
// Layouts: a transform is 16 scalars, row-major 4x4; pose and joints are J x 3.
#pragma once

#include <cstdint>

#include "common.h"
#include "rotation.h"

namespace flame_ext {

// The joint tree as plain ints, so that it can be passed to a CUDA kernel by value
// (no host-to-device copy of a CPU tensor, nothing to synchronise on).
struct ParentTable {
  int32_t p[kMaxJoints];
};

// How the chain state is indexed. kCap >= num_joints bounds the arrays: a GPU thread's
// stack is reserved for every resident thread, so the CUDA kernels use the smallest
// capacity that fits, and the local rotations R_j are recomputed, not stored. kExact means
// num_joints == kCap, known when compiling (FLAME's 5 joints): every loop over joints then
// has a constant trip count and unrolls, and a parent's state is picked by comparing its
// index with each earlier joint's rather than by indexing with it, so that every index into
// the chain state is a constant and a GPU thread keeps it all in registers (an array
// indexed at run time lives in local memory). Both ways compute the same operations in the
// same order: the same results.
template <bool kExact, int kCap>
FLAME_HD int chain_length(int num_joints) {
  return kExact ? kCap : num_joints;
}

// a[p], for the parent p of joint j (0 <= p < j).
template <bool kExact, typename T, int kCap>
FLAME_HD T parent_value(const T (&a)[kCap], int p, int j) {
  if constexpr (kExact) {
    T v = a[0];
    FLAME_UNROLL_CONSTANT
    for (int q = 1; q < kCap; ++q)
      if (q < j && q == p) v = a[q];
    return v;
  } else {
    return a[p];
  }
}

// a[p] = v, for the parent p of joint j.
template <bool kExact, typename T, int kCap>
FLAME_HD void set_parent_value(T (&a)[kCap], int p, int j, const T& v) {
  if constexpr (kExact) {
    FLAME_UNROLL_CONSTANT
    for (int q = 0; q < kCap; ++q)
      if (q < j && q == p) a[q] = v;
  } else {
    a[p] = v;
  }
}

// The chain state of one sample: world rotations R^w_j and world translations t_j of
// G_j = G_parent @ [R_j | J_j - J_parent].
template <int kCap, typename scalar_t>
struct Chain {
  Mat3<scalar_t> world[kCap];
  Vec3<scalar_t> trans[kCap];
};

// Fills c; when pose_feature is not null, also writes R_j - I (j >= 1) there.
template <bool kExact, int kCap, typename scalar_t>
FLAME_HD void chain_forward(const scalar_t* pose, const scalar_t* joints,
                            const int32_t (&parents)[kCap], int num_joints,
                            Chain<kCap, scalar_t>& c, scalar_t* pose_feature) {
  const int n = chain_length<kExact, kCap>(num_joints);
  c.world[0] = rodrigues(pose);
  for (int r = 0; r < 3; ++r) c.trans[0].v[r] = joints[r];
  FLAME_UNROLL_CONSTANT
  for (int j = 1; j < n; ++j) {
    const int p = parents[j];
    const Mat3<scalar_t> local = rodrigues(pose + 3 * j);
    if (pose_feature != nullptr)
      for (int k = 0; k < 9; ++k)
        pose_feature[9 * (j - 1) + k] = local.m[k] - (k % 4 == 0 ? scalar_t(1) : scalar_t(0));
    const Mat3<scalar_t> world_p = parent_value<kExact>(c.world, p, j);
    const Vec3<scalar_t> trans_p = parent_value<kExact>(c.trans, p, j);
    c.world[j] = mat3_mul(world_p, local);
    const scalar_t d0 = joints[3 * j] - joints[3 * p];
    const scalar_t d1 = joints[3 * j + 1] - joints[3 * p + 1];
    const scalar_t d2 = joints[3 * j + 2] - joints[3 * p + 2];
    const scalar_t* w = world_p.m;
    for (int r = 0; r < 3; ++r)
      c.trans[j].v[r] = w[3 * r] * d0 + w[3 * r + 1] * d1 + w[3 * r + 2] * d2 + trans_p.v[r];
  }
}

// transforms (J x 16): A_j = [R^w_j | t_j - R^w_j J_j; 0 0 0 1], so that skinning moves
// rest-pose vertices. pose_feature (9 (J - 1)): R_j - I for j >= 1, row-major.
// parents must form a tree the chain can walk: parents[0] = -1 and 0 <= parents[j] < j,
// so that every parent is finished before its children.
template <bool kExact, int kCap, typename scalar_t>
FLAME_HD void rigid_transforms_sample(const scalar_t* pose, const scalar_t* joints,
                                      const int32_t (&parents)[kCap], int num_joints,
                                      scalar_t* transforms, scalar_t* pose_feature) {
  Chain<kCap, scalar_t> c;
  chain_forward<kExact>(pose, joints, parents, num_joints, c, pose_feature);
  const int n = chain_length<kExact, kCap>(num_joints);
  FLAME_UNROLL_CONSTANT
  for (int j = 0; j < n; ++j) {
    const scalar_t* w = c.world[j].m;
    const scalar_t* jj = joints + 3 * j;
    scalar_t* a = transforms + 16 * j;
    for (int r = 0; r < 3; ++r) {
      a[4 * r] = w[3 * r];
      a[4 * r + 1] = w[3 * r + 1];
      a[4 * r + 2] = w[3 * r + 2];
      a[4 * r + 3] =
          c.trans[j].v[r] - (w[3 * r] * jj[0] + w[3 * r + 1] * jj[1] + w[3 * r + 2] * jj[2]);
    }
    a[12] = a[13] = a[14] = scalar_t(0);
    a[15] = scalar_t(1);
  }
}

// Reverse mode of rigid_transforms_sample. The bottom rows of grad_transforms are ignored:
// the bottom row of A_j is constant.
template <bool kExact, int kCap, typename scalar_t>
FLAME_HD void rigid_transforms_backward_sample(const scalar_t* grad_transforms,
                                               const scalar_t* grad_pose_feature,
                                               const scalar_t* pose, const scalar_t* joints,
                                               const int32_t (&parents)[kCap], int num_joints,
                                               scalar_t* grad_pose, scalar_t* grad_joints) {
  Chain<kCap, scalar_t> c;
  chain_forward<kExact>(pose, joints, parents, num_joints, c, static_cast<scalar_t*>(nullptr));
  const int n = chain_length<kExact, kCap>(num_joints);
  // Gradients w.r.t. world rotations and translations; grad_joints accumulates in place.
  Mat3<scalar_t> g_world[kCap];
  Vec3<scalar_t> g_trans[kCap];

  FLAME_UNROLL_CONSTANT
  for (int j = 0; j < n; ++j) {
    const scalar_t* ga = grad_transforms + 16 * j;
    const scalar_t* jj = joints + 3 * j;
    const scalar_t* w = c.world[j].m;
    for (int r = 0; r < 3; ++r) {
      const scalar_t gt = ga[4 * r + 3];
      g_trans[j].v[r] = gt;
      for (int k = 0; k < 3; ++k) g_world[j].m[3 * r + k] = ga[4 * r + k] - gt * jj[k];
    }
    // a_j = t_j - R^w_j J_j.
    const scalar_t* g = g_trans[j].v;
    for (int k = 0; k < 3; ++k)
      grad_joints[3 * j + k] = -(w[k] * g[0] + w[3 + k] * g[1] + w[6 + k] * g[2]);
  }

  // Children have larger indices than their parents, so walking down finishes every
  // joint's gradient before it is pushed to its parent.
  FLAME_UNROLL_CONSTANT
  for (int j = n - 1; j >= 0; --j) {
    Mat3<scalar_t> g_local;
    if (j == 0) {
      g_local = g_world[0];
      for (int k = 0; k < 3; ++k) grad_joints[k] += g_trans[0].v[k];
    } else {
      const int p = parents[j];
      const Mat3<scalar_t> world_p = parent_value<kExact>(c.world, p, j);
      Mat3<scalar_t> g_world_p = parent_value<kExact>(g_world, p, j);
      Vec3<scalar_t> g_trans_p = parent_value<kExact>(g_trans, p, j);
      const scalar_t* wp = world_p.m;
      const scalar_t* gw = g_world[j].m;
      const Mat3<scalar_t> local = rodrigues(pose + 3 * j);
      const scalar_t* lj = local.m;
      // R^w_j = R^w_p R_j: dR_j = R^w_p^T dR^w_j, dR^w_p += dR^w_j R_j^T.
      for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) {
          g_local.m[3 * r + k] = wp[r] * gw[k] + wp[3 + r] * gw[3 + k] + wp[6 + r] * gw[6 + k] +
                                 grad_pose_feature[9 * (j - 1) + 3 * r + k];
          g_world_p.m[3 * r + k] += gw[3 * r] * lj[3 * k] + gw[3 * r + 1] * lj[3 * k + 1] +
                                    gw[3 * r + 2] * lj[3 * k + 2];
        }
      // t_j = R^w_p (J_j - J_p) + t_p.
      const scalar_t* gt = g_trans[j].v;
      scalar_t d[3];
      for (int k = 0; k < 3; ++k) d[k] = joints[3 * j + k] - joints[3 * p + k];
      for (int r = 0; r < 3; ++r) {
        for (int k = 0; k < 3; ++k) g_world_p.m[3 * r + k] += gt[r] * d[k];
        g_trans_p.v[r] += gt[r];
      }
      for (int k = 0; k < 3; ++k) {
        const scalar_t gd = wp[k] * gt[0] + wp[3 + k] * gt[1] + wp[6 + k] * gt[2];
        grad_joints[3 * j + k] += gd;
        grad_joints[3 * p + k] -= gd;
      }
      set_parent_value<kExact>(g_world, p, j, g_world_p);
      set_parent_value<kExact>(g_trans, p, j, g_trans_p);
    }
    rodrigues_backward(pose + 3 * j, g_local, grad_pose + 3 * j);
  }
}

}  // namespace flame_ext
