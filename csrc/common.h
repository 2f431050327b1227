// Shared by every op family: the host/device function macro, small fixed-size math that
// the CPU loops and the CUDA kernels both call, and the argument checks of the launchers
// (host code, ATen), so that every family words the same rejection the same way.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLAME_HD __host__ __device__ __forceinline__
#else
#define FLAME_HD inline
#endif

// Full unrolling keeps small fixed-size accumulator arrays in registers: FLAME_UNROLL on
// the device and the host; FLAME_UNROLL_CONSTANT on the device only, where it unrolls a
// loop whose trip count is a compile-time constant and leaves any other loop alone.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLAME_UNROLL _Pragma("unroll")
#define FLAME_UNROLL_CONSTANT _Pragma("unroll")
#elif defined(__clang__)
#define FLAME_UNROLL _Pragma("unroll")
#define FLAME_UNROLL_CONSTANT
#elif defined(__GNUC__)
#define FLAME_UNROLL _Pragma("GCC unroll 16")
#define FLAME_UNROLL_CONSTANT
#else
#define FLAME_UNROLL
#define FLAME_UNROLL_CONSTANT
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
struct Vec3 {
  T v[3];
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

// 0 <= i < n, as one unsigned compare (a negative index wraps to a huge one).
FLAME_HD bool in_range(int64_t i, int64_t n) {
  return static_cast<uint64_t>(i) < static_cast<uint64_t>(n);
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launcher checks, shared by every family's <family>_checks.h. TORCH_CHECK raises
// c10::Error, which Python sees as RuntimeError with the message; the Python wrappers
// check first and raise ValueError/TypeError, these are the last line of defence for
// direct torch.ops calls.

// `name` names the argument in the message (with its op's prefix where the family's
// messages carry one, e.g. "blend: coeffs").
inline void check_float(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", x.scalar_type());
}

inline void check_num_joints(int64_t num_joints) {
  TORCH_CHECK(num_joints >= 1 && num_joints <= kMaxJoints,
              "the number of joints must be in [1, ", kMaxJoints, "], got ", num_joints);
}

}  // namespace flame_ext

// The same kind of checks as macros, naming the argument by its expression.
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
