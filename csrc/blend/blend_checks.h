// Argument checks and layout helpers of the blend ops, shared by the CPU and CUDA
// launchers (host code only), so both backends accept and reject exactly the same inputs.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace flame_ext {
namespace blend {

struct Sizes {
  int64_t B, N, K, P;
};

// A (rows, cols) matrix the kernels can read: unit column stride, any row stride (a column
// slice of a wider matrix is read in place; expanded rows, stride 0, read fine too). Any
// other layout is copied.
inline at::Tensor rows_readable(const at::Tensor& x) {
  if (x.size(1) <= 1 || x.stride(1) == 1) return x;
  return x.contiguous();
}

inline int64_t row_stride(const at::Tensor& x) {
  return x.size(0) <= 1 ? x.size(1) : x.stride(0);
}

// P: pose_dirs is (P, N), or any empty tensor for "no pose correctives".
inline int64_t pose_count(const at::Tensor& pose_dirs, int64_t N) {
  if (pose_dirs.dim() == 2 && pose_dirs.size(1) == N) return pose_dirs.size(0);
  TORCH_CHECK(pose_dirs.numel() == 0, "blend: pose_dirs must have shape (P, ", N,
              ") or be empty (P = 0), got ", pose_dirs.sizes());
  return 0;
}

inline void check_like(const at::Tensor& x, const char* name, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "blend: ", name, " has dtype ",
              x.scalar_type(), " but ", like_name, " has ", like.scalar_type());
  TORCH_CHECK(x.device() == like.device(), "blend: ", name, " is on ", x.device(), " but ",
              like_name, " is on ", like.device());
}

// dirs may be stored in half precision (float16 or bfloat16: FlameTex's basis_dtype),
// read as the dtype of everything else; otherwise it has that dtype.
inline bool half_dirs(const at::Tensor& dirs) {
  return dirs.scalar_type() == at::kHalf || dirs.scalar_type() == at::kBFloat16;
}

inline void check_dirs(const at::Tensor& dirs, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(half_dirs(dirs) || dirs.scalar_type() == like.scalar_type(),
              "blend: dirs has dtype ", dirs.scalar_type(), " but ", like_name, " has ",
              like.scalar_type(), " (dirs may also be float16 or bfloat16)");
  TORCH_CHECK(dirs.device() == like.device(), "blend: dirs is on ", dirs.device(), " but ",
              like_name, " is on ", like.device());
}

// blend(base, dirs, coeffs, pose_dirs, pose_coeffs): base (N,), (1, N) or (B, N); dirs
// (N, K); coeffs (B, K); pose_dirs (P, N) and pose_coeffs (B, P), or both empty.
inline Sizes check_forward(const at::Tensor& base, const at::Tensor& dirs,
                           const at::Tensor& coeffs, const at::Tensor& pose_dirs,
                           const at::Tensor& pose_coeffs) {
  check_float(coeffs, "blend: coeffs");
  check_like(base, "base", coeffs, "coeffs");
  check_dirs(dirs, coeffs, "coeffs");
  check_like(pose_dirs, "pose_dirs", coeffs, "coeffs");
  check_like(pose_coeffs, "pose_coeffs", coeffs, "coeffs");
  TORCH_CHECK(coeffs.dim() == 2, "blend: coeffs must be (B, K), got ", coeffs.sizes());
  TORCH_CHECK(dirs.dim() == 2, "blend: dirs must be (N, K), got ", dirs.sizes());
  Sizes s;
  s.B = coeffs.size(0);
  s.K = coeffs.size(1);
  s.N = dirs.size(0);
  TORCH_CHECK(dirs.size(1) == s.K, "blend: dirs must be (N, ", s.K, ") to match coeffs ",
              coeffs.sizes(), ", got ", dirs.sizes());
  TORCH_CHECK((base.dim() == 1 && base.size(0) == s.N) ||
                  (base.dim() == 2 && base.size(1) == s.N &&
                   (base.size(0) == 1 || base.size(0) == s.B)),
              "blend: base must be (", s.N, ",), (1, ", s.N, ") or (", s.B, ", ", s.N,
              "), got ", base.sizes());
  s.P = pose_count(pose_dirs, s.N);
  if (s.P > 0) {
    TORCH_CHECK(pose_coeffs.dim() == 2 && pose_coeffs.size(0) == s.B &&
                    pose_coeffs.size(1) == s.P,
                "blend: pose_coeffs must be (", s.B, ", ", s.P, "), got ", pose_coeffs.sizes());
  } else {
    TORCH_CHECK(pose_coeffs.numel() == 0,
                "blend: pose_coeffs must be empty when pose_dirs is, got ", pose_coeffs.sizes());
  }
  return s;
}

// blend_backward(grad_out, dirs, pose_dirs, ...): grad_out (B, N); dirs (N, K); pose_dirs
// (P, N) or empty.
inline Sizes check_backward(const at::Tensor& grad_out, const at::Tensor& dirs,
                            const at::Tensor& pose_dirs) {
  check_float(grad_out, "blend: grad_out");
  check_dirs(dirs, grad_out, "grad_out");
  check_like(pose_dirs, "pose_dirs", grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2, "blend_backward: grad_out must be (B, N), got ",
              grad_out.sizes());
  TORCH_CHECK(dirs.dim() == 2 && dirs.size(0) == grad_out.size(1),
              "blend_backward: dirs must be (", grad_out.size(1), ", K), got ", dirs.sizes());
  Sizes s;
  s.B = grad_out.size(0);
  s.N = grad_out.size(1);
  s.K = dirs.size(1);
  s.P = pose_count(pose_dirs, s.N);
  return s;
}

// blend_shared's identity: undefined (one shared row, S = 1, for every sample) or (B,)
// int64 on `like`'s device, each sample's row among the S shared ones. Its values are
// not read here (on a GPU that would synchronise): the CPU op checks their range
// (check_identity_range), the CUDA op gives a sample out of range NaN outputs.
inline void check_identity(const std::optional<at::Tensor>& identity, int64_t B, int64_t S,
                           const at::Tensor& like, const char* like_name, const char* op) {
  if (!identity.has_value() || !identity->defined()) {
    TORCH_CHECK(S == 1, op, ": without identity there is one shared row (S = 1), got ", S);
    return;
  }
  TORCH_CHECK(S >= 1, op, ": identity picks among the shared rows: S must be >= 1, got ", S);
  TORCH_CHECK(identity->scalar_type() == at::kLong, op, ": identity must be int64, got ",
              identity->scalar_type());
  TORCH_CHECK(identity->dim() == 1 && identity->size(0) == B, op, ": identity must be (", B,
              ",), one row per sample, got ", identity->sizes());
  TORCH_CHECK(identity->device() == like.device(), op, ": identity is on ",
              identity->device(), " but ", like_name, " is on ", like.device());
}

// The identity as a contiguous tensor, or undefined when there is none.
inline at::Tensor identity_or_none(const std::optional<at::Tensor>& identity) {
  return identity.has_value() && identity->defined() ? identity->contiguous() : at::Tensor();
}

// Every identity value in [0, S) (CPU tensors only): a ValueError naming the first one out.
inline void check_identity_range(const at::Tensor& identity, int64_t S, const char* op) {
  if (!identity.defined()) return;
  const int64_t* id = identity.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < identity.numel(); ++b) {
    TORCH_CHECK_VALUE(id[b] >= 0 && id[b] < S, op, ": identity[", b, "] = ", id[b],
                      " is out of range for ", S, " shared rows");
  }
}

// blend_shared(base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs,
// identity): blend's arguments (dirs in the dtype of coeffs: no half-precision table here)
// plus the shared rows of coefficients, shared_coeffs (S, Ks), for shared_dirs (N, Ks),
// and identity (check_identity); base (N,) or (1, N). Returns blend's sizes; *shared_K =
// Ks, *shared_rows = S.
inline Sizes check_shared_forward(const at::Tensor& base, const at::Tensor& shared_dirs,
                                  const at::Tensor& shared_coeffs, const at::Tensor& dirs,
                                  const at::Tensor& coeffs, const at::Tensor& pose_dirs,
                                  const at::Tensor& pose_coeffs,
                                  const std::optional<at::Tensor>& identity, int64_t* shared_K,
                                  int64_t* shared_rows) {
  const Sizes s = check_forward(base, dirs, coeffs, pose_dirs, pose_coeffs);
  check_like(dirs, "dirs", coeffs, "coeffs");
  check_like(shared_dirs, "shared_dirs", coeffs, "coeffs");
  check_like(shared_coeffs, "shared_coeffs", coeffs, "coeffs");
  TORCH_CHECK(base.dim() == 1 || base.size(0) == 1, "blend_shared: base must be (", s.N,
              ",) or (1, ", s.N, "), got ", base.sizes());
  TORCH_CHECK(shared_coeffs.dim() == 2, "blend_shared: shared_coeffs must be (S, Ks), got ",
              shared_coeffs.sizes());
  check_identity(identity, s.B, shared_coeffs.size(0), coeffs, "coeffs", "blend_shared");
  TORCH_CHECK(shared_dirs.dim() == 2 && shared_dirs.size(0) == s.N &&
                  shared_dirs.size(1) == shared_coeffs.size(1),
              "blend_shared: shared_dirs must be (", s.N, ", ", shared_coeffs.size(1),
              ") to match dirs and shared_coeffs, got ", shared_dirs.sizes());
  *shared_K = shared_coeffs.size(1);
  *shared_rows = shared_coeffs.size(0);
  return s;
}

// blend_shared_backward(grad_out, shared_dirs, dirs, pose_dirs, ..., identity,
// identities): blend_backward's arguments plus shared_dirs (N, Ks), all in grad_out's
// dtype, and identity (check_identity) among S = identities rows.
inline Sizes check_shared_backward(const at::Tensor& grad_out, const at::Tensor& shared_dirs,
                                   const at::Tensor& dirs, const at::Tensor& pose_dirs,
                                   const std::optional<at::Tensor>& identity,
                                   int64_t identities) {
  const Sizes s = check_backward(grad_out, dirs, pose_dirs);
  check_like(dirs, "dirs", grad_out, "grad_out");
  check_like(shared_dirs, "shared_dirs", grad_out, "grad_out");
  TORCH_CHECK(shared_dirs.dim() == 2 && shared_dirs.size(0) == s.N,
              "blend_shared_backward: shared_dirs must be (", s.N, ", Ks), got ",
              shared_dirs.sizes());
  check_identity(identity, s.B, identities, grad_out, "grad_out", "blend_shared_backward");
  return s;
}

// The outputs of blend_backward before any kernel runs: (B, K) / (B, P) when asked for,
// else (0,) as the schema promises.
inline std::tuple<at::Tensor, at::Tensor> backward_outputs(const at::Tensor& grad_out,
                                                           const Sizes& s, bool need_coeffs,
                                                           bool need_pose_coeffs) {
  const auto options = grad_out.options();
  return {need_coeffs ? at::empty({s.B, s.K}, options) : at::empty({0}, options),
          need_pose_coeffs ? at::empty({s.B, s.P}, options) : at::empty({0}, options)};
}

// blend_shared_backward's arguments checked (their sizes, with shared_dirs' Ks and the
// S identities), its outputs before any kernel runs, and which of them the kernels
// compute: (S, Ks) / (B, K) / (B, P) when asked for, else (0,); when B or N is 0 the
// asked-for ones are zeros and none is left to compute.
struct SharedGrads {
  Sizes sizes;
  int64_t Ks, S;
  at::Tensor identity;  // contiguous, or undefined: one shared row
  at::Tensor shared, coeffs, pose;
  bool do_shared, do_coeffs, do_pose;
  bool any() const { return do_shared || do_coeffs || do_pose; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() const { return {shared, coeffs, pose}; }
};

inline SharedGrads shared_backward_outputs(const at::Tensor& grad_out,
                                           const at::Tensor& shared_dirs, const at::Tensor& dirs,
                                           const at::Tensor& pose_dirs, bool need_shared_coeffs,
                                           bool need_coeffs, bool need_pose_coeffs,
                                           const std::optional<at::Tensor>& identity,
                                           int64_t identities) {
  SharedGrads g;
  g.sizes = check_shared_backward(grad_out, shared_dirs, dirs, pose_dirs, identity, identities);
  g.Ks = shared_dirs.size(1);
  g.S = identities;
  g.identity = identity_or_none(identity);
  const Sizes& s = g.sizes;
  const int64_t Ks = g.Ks;
  std::tie(g.coeffs, g.pose) = backward_outputs(grad_out, s, need_coeffs, need_pose_coeffs);
  g.shared = need_shared_coeffs ? at::empty({g.S, Ks}, grad_out.options())
                                : at::empty({0}, grad_out.options());
  g.do_shared = need_shared_coeffs && Ks > 0;
  g.do_coeffs = need_coeffs && s.B * s.K > 0;
  g.do_pose = need_pose_coeffs && s.B * s.P > 0;
  if (g.any() && (s.B == 0 || s.N == 0)) {
    g.shared.zero_();
    g.coeffs.zero_();
    g.pose.zero_();
    g.do_shared = g.do_coeffs = g.do_pose = false;
  }
  return g;
}

}  // namespace blend
}  // namespace flame_ext
