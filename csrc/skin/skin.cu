// CUDA launchers of flame_ext::skin and flame_ext::skin_backward (schemas in
// csrc/registration.cpp, kernels and launch plans in skin_kernels.cuh, argument checks in
// skin_checks.h).
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "launch.h"
#include "skin/skin_checks.h"
#include "skin/skin_kernels.cuh"

namespace flame_ext {
namespace {

using namespace skin_kernels;

std::tuple<at::Tensor, at::Tensor> skin_cuda(const at::Tensor& v_posed_in,
                                             const at::Tensor& transforms_in,
                                             const at::Tensor& lbs_weights_in,
                                             bool write_vertex_transforms) {
  check_skin_inputs(v_posed_in, transforms_in, lbs_weights_in);
  check_kernel_device(v_posed_in, "v_posed");
  const DeviceGuard guard(v_posed_in.device());
  const Stream stream = current_stream();
  const int64_t batch = v_posed_in.size(0), num_verts = v_posed_in.size(1);
  const int64_t num_joints = transforms_in.size(1);
  const at::Tensor v_posed = v_posed_in.contiguous(), transforms = transforms_in.contiguous();
  const at::Tensor lbs_weights = lbs_weights_in.contiguous();
  at::Tensor v = at::empty({batch, num_verts, 3}, v_posed.options());
  at::Tensor vertex_transforms =
      write_vertex_transforms ? at::empty({batch, num_verts, 4, 4}, v_posed.options())
                              : at::empty({0}, v_posed.options());
  if (batch == 0 || num_verts == 0) return {v, vertex_transforms};

  const int64_t per_sample = skin_blocks_per_sample(num_verts);
  const LaunchPlan plan = skin_plan(batch, per_sample, device_limits());
  AT_DISPATCH_FLOATING_TYPES(v_posed.scalar_type(), "skin_cuda", [&] {
    // vertex_transforms is freshly allocated, so its rows are 16-byte aligned.
    auto kernel = write_vertex_transforms ? skin_kernel<4, scalar_t> : skin_kernel<3, scalar_t>;
    launch(plan, stream, kernel, v_posed.const_data_ptr<scalar_t>(),
           transforms.const_data_ptr<scalar_t>(), lbs_weights.const_data_ptr<scalar_t>(),
           static_cast<int>(num_joints), num_verts, per_sample, v.mutable_data_ptr<scalar_t>(),
           write_vertex_transforms ? vertex_transforms.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {v, vertex_transforms};
}

std::tuple<at::Tensor, at::Tensor> skin_backward_cuda(
    const at::Tensor& grad_v_in, const std::optional<at::Tensor>& grad_vertex_transforms_in,
    const at::Tensor& v_posed_in, const at::Tensor& transforms_in,
    const at::Tensor& lbs_weights_in) {
  check_skin_inputs(v_posed_in, transforms_in, lbs_weights_in);
  check_skin_grads(grad_v_in, grad_vertex_transforms_in, v_posed_in);
  check_kernel_device(v_posed_in, "v_posed");
  const DeviceGuard guard(v_posed_in.device());
  const Stream stream = current_stream();
  const int64_t batch = v_posed_in.size(0), num_verts = v_posed_in.size(1);
  const int64_t num_joints = transforms_in.size(1);
  const bool has_gvt = grad_vertex_transforms_in.has_value();
  at::Tensor gvt;
  if (has_gvt) {
    gvt = grad_vertex_transforms_in->contiguous();
    // Rows are read with 16-byte loads: a view with an odd storage offset is copied.
    if (reinterpret_cast<uintptr_t>(gvt.const_data_ptr()) % 16 != 0) gvt = gvt.clone();
  }
  const at::Tensor grad_v = grad_v_in.contiguous(), v_posed = v_posed_in.contiguous();
  const at::Tensor transforms = transforms_in.contiguous();
  const at::Tensor lbs_weights = lbs_weights_in.contiguous();
  at::Tensor grad_v_posed = at::empty({batch, num_verts, 3}, v_posed.options());
  at::Tensor grad_transforms = at::empty({batch, num_joints, 4, 4}, v_posed.options());
  if (batch == 0) return {grad_v_posed, grad_transforms};
  if (num_verts == 0) return {grad_v_posed, grad_transforms.zero_()};

  const DeviceLimits limits = device_limits();
  const int64_t width = 16 * num_joints;
  const int64_t chunks = skin_backward_chunks(num_verts);
  const LaunchPlan plan = skin_backward_plan(batch, chunks, limits);
  // With one chunk per sample its partial sum is the result.
  at::Tensor partials = chunks == 1 ? grad_transforms
                                    : at::empty({batch, chunks, width}, v_posed.options());
  AT_DISPATCH_FLOATING_TYPES(v_posed.scalar_type(), "skin_backward_cuda", [&] {
    auto kernel = has_gvt ? skin_backward_kernel<true, scalar_t>
                          : skin_backward_kernel<false, scalar_t>;
    launch(plan, stream, kernel, grad_v.const_data_ptr<scalar_t>(),
           has_gvt ? gvt.const_data_ptr<scalar_t>() : nullptr, v_posed.const_data_ptr<scalar_t>(),
           transforms.const_data_ptr<scalar_t>(), lbs_weights.const_data_ptr<scalar_t>(),
           static_cast<int>(num_joints), num_verts, chunks,
           grad_v_posed.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<scalar_t>());
    if (chunks > 1)
      launch(reduce_partials_plan(batch, width, limits), stream, &reduce_partials_kernel<scalar_t>,
             partials.const_data_ptr<scalar_t>(), batch, chunks, static_cast<int>(width),
             grad_transforms.mutable_data_ptr<scalar_t>());
  });
  return {grad_v_posed, grad_transforms};
}

}  // namespace

TORCH_LIBRARY_IMPL(FLAME_EXT_KERNEL_LIB, FLAME_EXT_KERNEL_KEY, m) {
  m.impl("skin", &skin_cuda);
  m.impl("skin_backward", &skin_backward_cuda);
}

}  // namespace flame_ext
