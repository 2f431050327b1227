// Rotation math shared by the rigid_transforms and landmarks families, host and device:
// Rodrigues with medusa/smplx numerics, and its derivative (for rigid_transforms).
#pragma once

#include <cmath>

#include "common.h"

namespace flame_ext {

// R = I + sin(a) K + (1 - cos(a)) K^2 with a = ||aa + 1e-8|| (the epsilon is added to each
// component before the norm, as medusa/smplx do) and K the cross-product matrix of
// aa / a. The epsilon keeps a = 0 from dividing by zero and is part of the numerics users
// see, so it is reproduced exactly.
//
// 1 - cos(a) is evaluated as 2 sin^2(a / 2): the same number, without the cancellation
// that costs float32 most of its digits at small angles (a = 1e-3: cos(a) rounds to within
// 6e-8 of 1, so 1 - cos(a) = 5e-7 carries a 12% error). R hardly notices (the term is
// O(a^2)), but the pose gradient divides by a and did, by ~1e-4 absolute.
template <typename scalar_t>
FLAME_HD scalar_t one_minus_cos(scalar_t angle) {
  const scalar_t h = hd_sin(scalar_t(0.5) * angle);
  return scalar_t(2) * h * h;
}

template <typename scalar_t>
FLAME_HD Mat3<scalar_t> rodrigues(const scalar_t* aa) {
  const scalar_t eps = scalar_t(1e-8);
  const scalar_t ex = aa[0] + eps, ey = aa[1] + eps, ez = aa[2] + eps;
  const scalar_t angle = hd_sqrt(ex * ex + ey * ey + ez * ez);
  const scalar_t x = aa[0] / angle, y = aa[1] / angle, z = aa[2] / angle;
  const scalar_t s = hd_sin(angle), c1 = one_minus_cos(angle);
  // K = [[0,-z,y],[z,0,-x],[-y,x,0]]; K^2 = u u^T - |u|^2 I with u = (x,y,z).
  const scalar_t n2 = x * x + y * y + z * z;
  Mat3<scalar_t> r;
  r.m[0] = scalar_t(1) + c1 * (x * x - n2);
  r.m[1] = -s * z + c1 * x * y;
  r.m[2] = s * y + c1 * x * z;
  r.m[3] = s * z + c1 * x * y;
  r.m[4] = scalar_t(1) + c1 * (y * y - n2);
  r.m[5] = -s * x + c1 * y * z;
  r.m[6] = -s * y + c1 * x * z;
  r.m[7] = s * x + c1 * y * z;
  r.m[8] = scalar_t(1) + c1 * (z * z - n2);
  return r;
}

// Reverse mode of rodrigues(): grad_aa = (dR/daa)^T grad_R, exact for the epsilon formula
// above (the angle is the norm of aa + 1e-8 while the axis divides aa itself, so the two
// paths are differentiated separately, as autograd would through the reference).
template <typename scalar_t>
FLAME_HD void rodrigues_backward(const scalar_t* aa, const Mat3<scalar_t>& grad_R,
                                 scalar_t* grad_aa) {
  const scalar_t eps = scalar_t(1e-8);
  const scalar_t ex = aa[0] + eps, ey = aa[1] + eps, ez = aa[2] + eps;
  const scalar_t angle = hd_sqrt(ex * ex + ey * ey + ez * ez);
  const scalar_t inv_angle = scalar_t(1) / angle;
  const scalar_t x = aa[0] * inv_angle, y = aa[1] * inv_angle, z = aa[2] * inv_angle;
  const scalar_t s = hd_sin(angle), c = hd_cos(angle), c1 = one_minus_cos(angle);
  const scalar_t n2 = x * x + y * y + z * z;
  const scalar_t* g = grad_R.m;

  // R = I + s K(u) + c1 (u u^T - n2 I). <G, K(u)> = u . k with k the skew part of G.
  const scalar_t kx = g[7] - g[5], ky = g[2] - g[6], kz = g[3] - g[1];
  const scalar_t trace = g[0] + g[4] + g[8];
  // (G + G^T) u, for d(u^T G u)/du.
  const scalar_t sx = 2 * g[0] * x + (g[1] + g[3]) * y + (g[2] + g[6]) * z;
  const scalar_t sy = (g[1] + g[3]) * x + 2 * g[4] * y + (g[5] + g[7]) * z;
  const scalar_t sz = (g[2] + g[6]) * x + (g[5] + g[7]) * y + 2 * g[8] * z;
  const scalar_t uGu = scalar_t(0.5) * (x * sx + y * sy + z * sz);

  const scalar_t grad_s = x * kx + y * ky + z * kz;
  const scalar_t grad_c1 = uGu - n2 * trace;
  const scalar_t gux = s * kx + c1 * (sx - 2 * trace * x);
  const scalar_t guy = s * ky + c1 * (sy - 2 * trace * y);
  const scalar_t guz = s * kz + c1 * (sz - 2 * trace * z);

  // u = aa / angle; angle = |aa + eps|.
  const scalar_t grad_angle =
      grad_s * c + grad_c1 * s - (gux * x + guy * y + guz * z) * inv_angle;
  const scalar_t ga = grad_angle * inv_angle;
  grad_aa[0] = gux * inv_angle + ga * ex;
  grad_aa[1] = guy * inv_angle + ga * ey;
  grad_aa[2] = guz * inv_angle + ga * ez;
}

}  // namespace flame_ext
