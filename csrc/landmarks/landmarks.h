// Landmark math shared by the CPU loops and the CUDA kernels: the Euler 'XYZ' rotation,
// the contour-bin rule of docs/SPEC.md section 2 (medusa's and DECA's), the barycentric sum of one
// landmark and its scatter (the backward). Plain values and pointers, no tensors, so the
// same functions run in host loops and in kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"
#include "rotation.h"

namespace flame_ext {

// Values of the `contour_rule` argument of flame_ext::landmarks.
constexpr int64_t kContourNone = 0;
constexpr int64_t kContourMedusa = 1;
constexpr int64_t kContourDeca = 2;

// The yaw is clamped to +39 degrees; bins 0..39 hold yaw 0..39, 40..78 hold yaw -1..-39
// and everything below -39 shares the last one.
constexpr int64_t kMaxContourYaw = 39;
constexpr int64_t kLastContourBin = 78;
// The bin of a sample whose global or neck pose is not finite: its contour landmarks are
// NaN and get no gradient.
constexpr int64_t kNoContourBin = -1;

// The sizes of one call, as the launchers check them and the kernels read them.
struct LandmarkSizes {
  int64_t batch;
  int64_t num_vertices;
  int64_t num_faces;
  int64_t num_bins;   // rows of the dynamic tables; 0 without contour landmarks
  int64_t n_contour;  // Ld, the contour landmarks per sample (first in the output)
  int64_t n_static;   // L
};

// Round half to even under the default rounding mode, as torch.round does.
FLAME_HD float lmk_rint(float x) { return rintf(x); }
FLAME_HD double lmk_rint(double x) { return rint(x); }

// R = Rx(a[0]) @ Ry(a[1]) @ Rz(a[2]) (pytorch3d's 'XYZ' convention, which medusa applies
// to FLAME's axis-angle poses).
template <typename scalar_t>
FLAME_HD Mat3<scalar_t> euler_xyz_to_matrix(const scalar_t* a) {
  const scalar_t cx = hd_cos(a[0]), sx = hd_sin(a[0]);
  const scalar_t cy = hd_cos(a[1]), sy = hd_sin(a[1]);
  const scalar_t cz = hd_cos(a[2]), sz = hd_sin(a[2]);
  const scalar_t o = scalar_t(1), z = scalar_t(0);
  const Mat3<scalar_t> rx = {{o, z, z, z, cx, -sx, z, sx, cx}};
  const Mat3<scalar_t> ry = {{cy, z, sy, z, o, z, -sy, z, cy}};
  const Mat3<scalar_t> rz = {{cz, -sz, z, sz, cz, z, z, z, o}};
  return mat3_mul(mat3_mul(rx, ry), rz);
}

// Maps a yaw in degrees (already rounded) to its bin, clamped to [0, num_bins - 1] so a
// model with fewer bins than FLAME's 79 never indexes past its table.
FLAME_HD int64_t contour_bin_of_yaw(int64_t y, int64_t num_bins) {
  int64_t bin;
  if (y >= 0) {
    bin = y;
  } else if (y >= -kMaxContourYaw) {
    bin = kMaxContourYaw - y;
  } else {
    bin = kLastContourBin;
  }
  return bin < num_bins ? bin : num_bins - 1;
}

// The contour bin of one sample from its pose vector (global 0:3, neck 3:6, ...).
// rel = R_global @ R_neck; yaw = atan2(-rel[2,0], sqrt(rel[0,0]^2 + rel[1,0]^2)) in
// degrees, negated for medusa's rule, clamped above at 39 and rounded half to even.
// Computed in double whatever the pose's dtype (as the reference does), so that the CPU
// loops and the CUDA kernels (other float rounding: device atan2f, contracted FMAs) agree
// on the bin of a float32 pose except within ~1e-13 degrees of a .5 tie. A NaN yaw (a NaN
// or infinite global or neck pose) has no bin: kNoContourBin.
template <typename scalar_t>
FLAME_HD int64_t contour_bin(const scalar_t* pose_in, int64_t rule, int64_t num_bins) {
  double pose[6];
  for (int i = 0; i < 6; ++i) pose[i] = static_cast<double>(pose_in[i]);
  Mat3<double> rg, rn;
  if (rule == kContourDeca) {
    rg = rodrigues(pose);
    rn = rodrigues(pose + 3);
  } else {
    rg = euler_xyz_to_matrix(pose);
    rn = euler_xyz_to_matrix(pose + 3);
  }
  // Only the first column of rel is needed: rel[:, 0] = R_global @ R_neck[:, 0].
  double c[3];
  for (int i = 0; i < 3; ++i)
    c[i] = rg.m[3 * i] * rn.m[0] + rg.m[3 * i + 1] * rn.m[3] + rg.m[3 * i + 2] * rn.m[6];
  double yaw = hd_atan2(-c[2], hd_sqrt(c[0] * c[0] + c[1] * c[1]));
  if (rule != kContourDeca) yaw = -yaw;
  // (yaw * 180) / pi in that order, as the reference writes it: next to a .5 tie the
  // last bit decides the bin.
  double deg = yaw * 180.0 / 3.14159265358979323846;
  if (!(deg == deg)) return kNoContourBin;
  if (deg > double(kMaxContourYaw)) deg = double(kMaxContourYaw);
  // |deg| <= 90 after the NaN test, so the conversion is exact and defined.
  return contour_bin_of_yaw(static_cast<int64_t>(lmk_rint(deg)), num_bins);
}

// out = sum_k bary[k] * v[corners[k]] for one landmark: v points at one sample's (V, 3)
// vertices, corners at the face's three vertex indices (already range-checked).
template <typename scalar_t>
FLAME_HD void barycentric_point(const scalar_t* v, const int64_t* corners, const scalar_t* bary,
                                scalar_t* out) {
  const scalar_t* p0 = v + 3 * corners[0];
  const scalar_t* p1 = v + 3 * corners[1];
  const scalar_t* p2 = v + 3 * corners[2];
  for (int c = 0; c < 3; ++c) out[c] = bary[0] * p0[c] + bary[1] * p1[c] + bary[2] * p2[c];
}

// The adjoint of barycentric_point: grad_v[corners[k]] += bary[k] * grad. Not atomic:
// callers give each sample's grad_v to a single thread, which keeps it deterministic.
template <typename scalar_t>
FLAME_HD void barycentric_scatter(scalar_t* grad_v, const int64_t* corners, const scalar_t* bary,
                                  const scalar_t* grad) {
  for (int k = 0; k < 3; ++k) {
    scalar_t* g = grad_v + 3 * corners[k];
    for (int c = 0; c < 3; ++c) g[c] += bary[k] * grad[c];
  }
}

}  // namespace flame_ext
