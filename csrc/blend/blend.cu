// CUDA launchers of flame_ext::blend, blend_backward, blend_shared and
// blend_shared_backward (schemas in csrc/op_schemas.h, kernels and launch plans in
// blend_kernels.cuh, math in blend.h, argument checks in blend_checks.h).
//
// Small batches run the hand kernels. Large batches: the product is a real GEMM and
// cuBLAS (at::addmm / at::mm) is the right tool; a hand-written kernel would be a slower
// GEMM. Under torch.use_deterministic_algorithms the hand kernels serve every batch
// (deterministic, full fp32; ATen's CUDA GEMM raises there unless CUBLAS_WORKSPACE_CONFIG
// is set, which the CPU op does not ask for), in slices of the batch that fit the grid.
// With TF32 enabled (torch.backends.cuda.matmul.allow_tf32, off by default) the cuBLAS
// path follows it. A half-precision dirs (float16 / bfloat16) is read as such by the hand
// kernels; cuBLAS takes one dtype, so there it is widened a block of rows at a time.
//
// Every launch is asynchronous on the current stream, allocates through the caching
// allocator and never reads device memory on the host: CUDA-graph capturable.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "blend/blend_checks.h"
#include "blend/blend_kernels.cuh"
#include "launch.h"

namespace flame_ext {
namespace {

using namespace blend_kernels;

// fn(pointer to the values of dirs): T, or c10::Half / c10::BFloat16 for a half-precision
// dirs.
template <typename T, typename Fn>
void with_dirs(const at::Tensor& dirs, const Fn& fn) {
  switch (dirs.scalar_type()) {
    case at::kHalf:
      fn(dirs.const_data_ptr<c10::Half>());
      break;
    case at::kBFloat16:
      fn(dirs.const_data_ptr<c10::BFloat16>());
      break;
    default:
      fn(dirs.const_data_ptr<T>());
      break;
  }
}

// Rows of a half-precision dirs widened per cuBLAS call: blocks of 2^22 values (16 MB in
// float32), never a copy of the whole table.
int64_t widened_rows(int64_t K) {
  return std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, K));
}

at::Tensor widened(const at::Tensor& dirs, int64_t n0, int64_t n, at::ScalarType dtype) {
  return dirs.narrow(0, n0, n).to(dtype);
}

// The forward's operands as the kernels read them: base (1 or B, N) with unit column
// stride, dirs and pose_dirs with readable rows, coeffs and pose_coeffs contiguous.
struct Operands {
  at::Tensor base, dirs, coeffs, pose_dirs, pose_coeffs;
};

Operands readable(const at::Tensor& base, const at::Tensor& dirs, const at::Tensor& coeffs,
                  const at::Tensor& pose_dirs, const at::Tensor& pose_coeffs, int64_t P) {
  const at::Tensor base2 = base.dim() == 1 ? base.unsqueeze(0) : base;
  return {base2.stride(1) == 1 ? base2 : base2.contiguous(), blend::rows_readable(dirs),
          coeffs.contiguous(), P > 0 ? blend::rows_readable(pose_dirs) : pose_dirs,
          P > 0 ? pose_coeffs.contiguous() : pose_coeffs};
}

// The forward kernels writing out (B, N) = base + coeffs @ dirs^T + pose_coeffs @ pose_dirs,
// in slices of the batch that fit the grid (one but for huge batches).
template <typename T>
void launch_forward(const Operands& in, at::Tensor& out, const blend::Sizes& s,
                    const DeviceLimits& limits, const Stream& stream) {
  const int64_t B = s.B, N = s.N, K = s.K, P = s.P;
  const int64_t base_stride = in.base.size(0) == 1 ? 0 : in.base.stride(0);
  const int64_t dirs_stride = blend::row_stride(in.dirs);
  const int64_t pose_stride = P > 0 ? blend::row_stride(in.pose_dirs) : 0;
  const T* pose_dirs_ptr = P > 0 ? in.pose_dirs.const_data_ptr<T>() : nullptr;
  const T* pose_coeffs_ptr = P > 0 ? in.pose_coeffs.const_data_ptr<T>() : nullptr;
  with_dirs<T>(in.dirs, [&](auto dirs_ptr) {
    using D = std::remove_cv_t<std::remove_pointer_t<decltype(dirs_ptr)>>;
    with_tile_samples(tile_samples(B), [&](auto tile) {
      constexpr int kS = decltype(tile)::value;
      const int64_t slice = blend_forward_slice(kS, limits);
      for (int64_t b0 = 0; b0 < B; b0 += slice) {
        const int64_t Bs = std::min(slice, B - b0);
        launch(blend_forward_plan<kS>(Bs, N, limits), stream, &blend_forward_kernel<T, kS, D>,
               in.base.const_data_ptr<T>() + b0 * base_stride, base_stride, dirs_ptr,
               dirs_stride, in.coeffs.const_data_ptr<T>() + b0 * K, pose_dirs_ptr, pose_stride,
               P > 0 ? pose_coeffs_ptr + b0 * P : nullptr,
               out.mutable_data_ptr<T>() + b0 * N, Bs, N, K, P);
      }
    });
  });
}

// The backward kernels: grad_coeffs (B, K) = grad_out @ dirs and grad_pose (B, P) =
// grad_out @ pose_dirs^T, those asked for, from a contiguous grad_out. Slices of the batch
// (one but for huge batches), each with its own workspace of partial sums over row
// chunks, reduced in chunk order: the same bits on every run.
template <typename T>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& dirs,
                     const at::Tensor& pose_dirs, bool do_coeffs, bool do_pose,
                     at::Tensor& grad_coeffs, at::Tensor& grad_pose, const blend::Sizes& s,
                     const DeviceLimits& limits, const Stream& stream) {
  const int64_t B = s.B, N = s.N, K = s.K, P = s.P;
  // Nothing to sum: the gradients asked for have no columns (a blend_shared backward of the
  // shared coefficients alone, or a table of width 0).
  if ((!do_coeffs || K == 0) && (!do_pose || P == 0)) return;
  const auto options = grad_out.options();
  with_tile_samples(tile_samples(B), [&](auto tile) {
    constexpr int kS = decltype(tile)::value;
    const int64_t slice = blend_backward_slice(kS, do_coeffs ? K : 0, do_pose ? P : 0, limits);
    for (int64_t b0 = 0; b0 < B; b0 += slice) {
      const int64_t Bs = std::min(slice, B - b0);
      const T* grad_ptr = grad_out.const_data_ptr<T>() + b0 * N;
      const BackwardChunks chunks = blend_backward_chunks(Bs, N, K, P, limits);
      auto reduce = [&](const at::Tensor& partial, T* result, int64_t width) {
        const int64_t count = Bs * width;
        launch(sum_chunks_plan(count, limits), stream, &sum_chunks_kernel<T>,
               partial.const_data_ptr<T>(), chunks.count, count, result);
      };
      if (do_coeffs) {
        const at::Tensor partial = at::empty({chunks.count, Bs, K}, options);
        with_dirs<T>(dirs, [&](auto dirs_ptr) {
          using D = std::remove_cv_t<std::remove_pointer_t<decltype(dirs_ptr)>>;
          launch(adjoint_coeffs_plan<kS>(Bs, K, chunks, limits), stream,
                 &adjoint_coeffs_kernel<T, kS, D>, grad_ptr, dirs_ptr, blend::row_stride(dirs),
                 partial.mutable_data_ptr<T>(), Bs, N, K, chunks.rows);
        });
        reduce(partial, grad_coeffs.mutable_data_ptr<T>() + b0 * K, K);
      }
      if (do_pose) {
        const at::Tensor partial = at::empty({chunks.count, Bs, P}, options);
        launch(adjoint_pose_plan<kS>(Bs, P, chunks, limits), stream, &adjoint_pose_kernel<T, kS>,
               grad_ptr, pose_dirs.const_data_ptr<T>(), blend::row_stride(pose_dirs),
               partial.mutable_data_ptr<T>(), Bs, N, P, chunks.rows);
        reduce(partial, grad_pose.mutable_data_ptr<T>() + b0 * P, P);
      }
    }
  });
}

at::Tensor blend_cuda(const at::Tensor& base_in, const at::Tensor& dirs_in,
                      const at::Tensor& coeffs_in, const at::Tensor& pose_dirs_in,
                      const at::Tensor& pose_coeffs_in) {
  const blend::Sizes sizes =
      blend::check_forward(base_in, dirs_in, coeffs_in, pose_dirs_in, pose_coeffs_in);
  check_kernel_device(coeffs_in, "coeffs");
  const DeviceGuard guard(coeffs_in.device());
  const Stream stream = current_stream();
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P;
  if (B == 0 || N == 0) return at::empty({B, N}, coeffs_in.options());

  const DeviceLimits limits = device_limits();
  if (blend_use_gemm(B, at::globalContext().deterministicAlgorithms())) {
    at::Tensor out;
    if (!blend::half_dirs(dirs_in)) {
      out = at::addmm(base_in, coeffs_in, dirs_in.t());
    } else {
      out = at::empty({B, N}, coeffs_in.options());
      const int64_t rows = widened_rows(K);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n = std::min(rows, N - n0);
        at::Tensor columns = out.narrow(1, n0, n);
        at::addmm_out(columns, base_in.narrow(-1, n0, n), coeffs_in,
                      widened(dirs_in, n0, n, coeffs_in.scalar_type()).t());
      }
    }
    if (P > 0) out.addmm_(pose_coeffs_in, pose_dirs_in);
    return out;
  }

  const Operands in = readable(base_in, dirs_in, coeffs_in, pose_dirs_in, pose_coeffs_in, P);
  at::Tensor out = at::empty({B, N}, coeffs_in.options());
  AT_DISPATCH_FLOATING_TYPES(coeffs_in.scalar_type(), "flame_ext::blend", [&] {
    launch_forward<scalar_t>(in, out, sizes, limits, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> blend_backward_cuda(const at::Tensor& grad_out_in,
                                                       const at::Tensor& dirs_in,
                                                       const at::Tensor& pose_dirs_in,
                                                       bool need_coeffs,
                                                       bool need_pose_coeffs) {
  const blend::Sizes sizes = blend::check_backward(grad_out_in, dirs_in, pose_dirs_in);
  check_kernel_device(grad_out_in, "grad_out");
  const DeviceGuard guard(grad_out_in.device());
  const Stream stream = current_stream();
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P;
  at::Tensor grad_coeffs, grad_pose;
  std::tie(grad_coeffs, grad_pose) =
      blend::backward_outputs(grad_out_in, sizes, need_coeffs, need_pose_coeffs);
  const bool do_coeffs = need_coeffs && B * K > 0;
  const bool do_pose = need_pose_coeffs && B * P > 0;
  if (!do_coeffs && !do_pose) return {grad_coeffs, grad_pose};
  if (N == 0) {
    grad_coeffs.zero_();
    grad_pose.zero_();
    return {grad_coeffs, grad_pose};
  }

  const DeviceLimits limits = device_limits();
  if (blend_use_gemm(B, at::globalContext().deterministicAlgorithms())) {
    if (do_coeffs && !blend::half_dirs(dirs_in)) {
      at::mm_out(grad_coeffs, grad_out_in, dirs_in);
    } else if (do_coeffs) {
      const int64_t rows = widened_rows(K);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n = std::min(rows, N - n0);
        const at::Tensor part = widened(dirs_in, n0, n, grad_out_in.scalar_type());
        if (n0 == 0) {
          at::mm_out(grad_coeffs, grad_out_in.narrow(1, n0, n), part);
        } else {
          grad_coeffs.addmm_(grad_out_in.narrow(1, n0, n), part);
        }
      }
    }
    if (do_pose) at::mm_out(grad_pose, grad_out_in, pose_dirs_in.t());
    return {grad_coeffs, grad_pose};
  }

  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "flame_ext::blend_backward", [&] {
    launch_backward<scalar_t>(grad_out, dirs, pose_dirs, do_coeffs, do_pose, grad_coeffs,
                              grad_pose, sizes, limits, stream);
  });
  return {grad_coeffs, grad_pose};
}

// blend_shared as the blend kernels twice: the S shared rows into an (S, N) block, then
// the batch with that block as its base (cuBLAS above the small-batch limit, as blend);
// with identity the base is the block's rows gathered per sample, NaN for an index out of
// range (checking it on the host would synchronise). On a GPU the second pass reads the
// rows from L2; the CPU op fuses the two passes because there they would come back from
// memory.
at::Tensor blend_shared_cuda(const at::Tensor& base_in, const at::Tensor& shared_dirs_in,
                             const at::Tensor& shared_coeffs_in, const at::Tensor& dirs_in,
                             const at::Tensor& coeffs_in, const at::Tensor& pose_dirs_in,
                             const at::Tensor& pose_coeffs_in,
                             const std::optional<at::Tensor>& identity_in) {
  int64_t Ks = 0, S = 1;
  const blend::Sizes sizes = blend::check_shared_forward(
      base_in, shared_dirs_in, shared_coeffs_in, dirs_in, coeffs_in, pose_dirs_in,
      pose_coeffs_in, identity_in, &Ks, &S);
  check_kernel_device(coeffs_in, "coeffs");
  const DeviceGuard guard(coeffs_in.device());
  const Stream stream = current_stream();
  const int64_t B = sizes.B, N = sizes.N, P = sizes.P;
  const auto options = coeffs_in.options();
  if (B == 0 || N == 0) return at::empty({B, N}, options);

  const DeviceLimits limits = device_limits();
  const bool gemm = blend_use_gemm(B, at::globalContext().deterministicAlgorithms());
  const Operands rows = readable(base_in, shared_dirs_in, shared_coeffs_in,
                                 at::empty({0, N}, options), at::empty({S, 0}, options), 0);
  at::Tensor shaped = at::empty({S, N}, options);
  AT_DISPATCH_FLOATING_TYPES(coeffs_in.scalar_type(), "flame_ext::blend_shared", [&] {
    launch_forward<scalar_t>(rows, shaped, blend::Sizes{S, N, Ks, 0}, limits, stream);
  });
  const at::Tensor identity = blend::identity_or_none(identity_in);
  if (identity.defined()) {
    const at::Tensor valid = identity.ge(0).logical_and_(identity.lt(S));
    shaped = at::index_select(shaped, 0, identity.clamp(0, S - 1))
                 .masked_fill_(valid.logical_not().unsqueeze(1),
                               std::numeric_limits<double>::quiet_NaN());
  }
  if (gemm) {
    at::Tensor out = at::addmm(shaped, coeffs_in, dirs_in.t());
    if (P > 0) out.addmm_(pose_coeffs_in, pose_dirs_in);
    return out;
  }
  at::Tensor out = at::empty({B, N}, options);
  const Operands batch = readable(shaped, dirs_in, coeffs_in, pose_dirs_in, pose_coeffs_in, P);
  AT_DISPATCH_FLOATING_TYPES(coeffs_in.scalar_type(), "flame_ext::blend_shared", [&] {
    launch_forward<scalar_t>(batch, out, sizes, limits, stream);
  });
  return out;
}

// blend_shared_backward: the adjoint kernels on the per-row sums of grad_out (the batch
// sum for one shared row; with identity each row's samples, summed as blend_cuda's
// product with the (S, B) one-hot of identity: by the blend kernels, deterministic, up
// to kSmallBatch identities or in deterministic mode, else by cuBLAS) for the shared
// coefficients, and blend_backward's kernels (or cuBLAS) for the rest.
std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_shared_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& shared_dirs_in, const at::Tensor& dirs_in,
    const at::Tensor& pose_dirs_in, bool need_shared_coeffs, bool need_coeffs,
    bool need_pose_coeffs, const std::optional<at::Tensor>& identity_in, int64_t identities) {
  blend::SharedGrads grads = blend::shared_backward_outputs(
      grad_out_in, shared_dirs_in, dirs_in, pose_dirs_in, need_shared_coeffs, need_coeffs,
      need_pose_coeffs, identity_in, identities);
  check_kernel_device(grad_out_in, "grad_out");
  const DeviceGuard guard(grad_out_in.device());
  const Stream stream = current_stream();
  if (!grads.any()) return grads.result();
  const blend::Sizes sizes = grads.sizes;
  const int64_t B = sizes.B, N = sizes.N, P = sizes.P, Ks = grads.Ks, S = grads.S;
  const bool do_shared = grads.do_shared, do_coeffs = grads.do_coeffs, do_pose = grads.do_pose;

  const DeviceLimits limits = device_limits();
  const bool gemm = blend_use_gemm(B, at::globalContext().deterministicAlgorithms());
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor sums;
  if (do_shared && grads.identity.defined()) {
    const auto options = grad_out.options();
    const at::Tensor one_hot =
        at::arange(S, grads.identity.options()).unsqueeze(1).eq(grads.identity.unsqueeze(0))
            .to(grad_out.scalar_type());
    sums = blend_cuda(at::zeros({N}, options), grad_out.t(), one_hot, at::empty({0, N}, options),
                      at::empty({S, 0}, options));
  } else if (do_shared) {
    sums = grad_out.sum(0, /*keepdim=*/true);
  }
  const at::Tensor shared_dirs = blend::rows_readable(shared_dirs_in);
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  at::Tensor unused;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "flame_ext::blend_shared_backward", [&] {
    if (do_shared) {
      launch_backward<scalar_t>(sums, shared_dirs, pose_dirs, true, false, grads.shared,
                                unused, blend::Sizes{S, N, Ks, 0}, limits, stream);
    }
    if (!gemm) {
      launch_backward<scalar_t>(grad_out, dirs, pose_dirs, do_coeffs, do_pose, grads.coeffs,
                                grads.pose, sizes, limits, stream);
    }
  });
  if (gemm) {
    if (do_coeffs) at::mm_out(grads.coeffs, grad_out_in, dirs_in);
    if (do_pose) at::mm_out(grads.pose, grad_out_in, pose_dirs_in.t());
  }
  return grads.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(FLAME_EXT_KERNEL_LIB, FLAME_EXT_KERNEL_KEY, m) {
  m.impl("blend", &blend_cuda);
  m.impl("blend_backward", &blend_backward_cuda);
  m.impl("blend_shared", &blend_shared_cuda);
  m.impl("blend_shared_backward", &blend_shared_backward_cuda);
}

}  // namespace flame_ext
