// Rotation math shared by the skinning and landmark families, host and device:
// Rodrigues with medusa/smplx numerics (and, in skin, its derivative).
#pragma once

#include <cmath>

#include "common.h"

namespace flame_ext {

// R = I + sin(a) K + (1 - cos(a)) K^2 with a = ||aa + 1e-8|| (the epsilon is added to each
// component before the norm, as medusa/smplx do) and K the cross-product matrix of
// aa / a. The epsilon keeps a = 0 from dividing by zero and is part of the numerics users
// see, so it is reproduced exactly.
template <typename scalar_t>
FLAME_HD Mat3<scalar_t> rodrigues(const scalar_t* aa) {
  const scalar_t eps = scalar_t(1e-8);
  const scalar_t ex = aa[0] + eps, ey = aa[1] + eps, ez = aa[2] + eps;
  const scalar_t angle = sqrt(ex * ex + ey * ey + ez * ez);
  const scalar_t x = aa[0] / angle, y = aa[1] / angle, z = aa[2] / angle;
  const scalar_t s = sin(angle), c1 = scalar_t(1) - cos(angle);
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

}  // namespace flame_ext
