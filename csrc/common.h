// Shared by every op family: the host/device function macro, small fixed-size math that
// the CPU loops and the CUDA kernels both call, and the input checks of the launchers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLAME_HD __host__ __device__ __forceinline__
#else
#define FLAME_HD inline
#endif

namespace flame_ext {

// Explicit float/double overloads of the math functions: on the host an unqualified
// sin(float) can resolve to the double C function, which would round differently from the
// device's float version (and from torch's float32 CPU path).
FLAME_HD float hd_sin(float x) { return sinf(x); }
FLAME_HD double hd_sin(double x) { return sin(x); }
FLAME_HD float hd_cos(float x) { return cosf(x); }
FLAME_HD double hd_cos(double x) { return cos(x); }
FLAME_HD float hd_sqrt(float x) { return sqrtf(x); }
FLAME_HD double hd_sqrt(double x) { return sqrt(x); }
FLAME_HD float hd_atan2(float y, float x) { return atan2f(y, x); }
FLAME_HD double hd_atan2(double y, double x) { return atan2(y, x); }

// Joint counts are fixed per model but small; kernels keep per-joint state in registers or
// on the stack, so they are compiled for an upper bound. FLAME has 5 joints.
constexpr int kMaxJoints = 16;

// Row-major 3x3 and 4x4 (top 3 rows stored: the last row of a rigid transform is 0 0 0 1).
template <typename T>
struct Mat3 {
  T m[9];
};

template <typename T>
struct Mat34 {
  T m[12];
};

template <typename T>
FLAME_HD Mat3<T> mat3_mul(const Mat3<T>& a, const Mat3<T>& b) {
  Mat3<T> c;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      c.m[3 * i + j] = a.m[3 * i] * b.m[j] + a.m[3 * i + 1] * b.m[3 + j] +
                       a.m[3 * i + 2] * b.m[6 + j];
  return c;
}

}  // namespace flame_ext

// Launcher checks. TORCH_CHECK raises c10::Error, which Python sees as RuntimeError with
// the message; the Python wrappers check first and raise ValueError/TypeError, these are
// the last line of defence for direct torch.ops calls.
#define FLAME_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have " #d " dimensions, got ", (x).sizes())
#define FLAME_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define FLAME_CHECK_SAME_DTYPE(x, y)                                            \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " has dtype ",         \
              (x).scalar_type(), " but " #y " has ", (y).scalar_type())
#define FLAME_CHECK_SAME_DEVICE(x, y)                                           \
  TORCH_CHECK((x).device() == (y).device(), #x " is on ", (x).device(),         \
              " but " #y " is on ", (y).device())
#define FLAME_CHECK_INDEX(x) \
  TORCH_CHECK((x).scalar_type() == at::kLong, #x " must be int64, got ", (x).scalar_type())
