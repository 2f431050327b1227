// CUDA launchers of flame_ext::vertex_normals and flame_ext::vertex_normals_backward
// (schemas in csrc/op_schemas.h, kernels and launch plans in normals_kernels.cuh,
// argument checks in normals_checks.h).
//
// The adjacency is built (and the faces range-checked) once per faces tensor by the
// Python wrapper; reading it here on the host would sync with the GPU. A bad table entry
// is never followed: its vertex's normal is NaN and it gets no gradient. Not a device
// assert: that would trap the kernel and poison the CUDA context for the process.
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "launch.h"
#include "normals/normals_checks.h"
#include "normals/normals_kernels.cuh"

namespace flame_ext {
namespace {

using namespace normals_kernels;

at::Tensor vertex_normals_cuda(const at::Tensor& v_in, const at::Tensor& faces,
                               const at::Tensor& offsets, const at::Tensor& entries) {
  const NormalSizes s = check_vertex_normals_args(v_in, faces, offsets, entries);
  check_kernel_device(v_in, "v");
  const DeviceGuard guard(v_in.device());
  const Stream stream = current_stream();
  at::Tensor n = at::empty({s.batch, s.num_vertices, 3}, v_in.options());
  if (s.batch * s.num_vertices == 0) return n;

  const at::Tensor v = v_in.contiguous();
  const AdjacencyTensors a = contiguous_adjacency(faces, offsets, entries);
  const LaunchPlan plan = vertex_normals_plan(s, device_limits());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::vertex_normals", [&] {
    launch(plan, stream, &vertex_normals_kernel<scalar_t>, v.const_data_ptr<scalar_t>(),
           a.pointers(), s, n.mutable_data_ptr<scalar_t>());
  });
  return n;
}

at::Tensor vertex_normals_backward_cuda(const at::Tensor& grad_n_in, const at::Tensor& v_in,
                                        const at::Tensor& faces, const at::Tensor& offsets,
                                        const at::Tensor& entries) {
  const NormalSizes s =
      check_vertex_normals_backward_args(grad_n_in, v_in, faces, offsets, entries);
  check_kernel_device(v_in, "v");
  const DeviceGuard guard(v_in.device());
  const Stream stream = current_stream();
  at::Tensor grad_v = at::empty({s.batch, s.num_vertices, 3}, v_in.options());
  if (s.batch * s.num_vertices == 0) return grad_v;

  const at::Tensor v = v_in.contiguous();
  const at::Tensor grad_n = grad_n_in.contiguous();
  const AdjacencyTensors a = contiguous_adjacency(faces, offsets, entries);
  // g_s, the gradient of every vertex's summed normal: written by the first launch, read
  // by the second (same stream, so ordered).
  at::Tensor grad_sum = at::empty({s.batch, s.num_vertices, 3}, v_in.options());
  const DeviceLimits limits = device_limits();
  const LaunchPlan sum_plan = vertex_normals_sum_grad_plan(s, limits);
  const LaunchPlan plan = vertex_normals_backward_plan(s, limits);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::vertex_normals_backward", [&] {
    launch(sum_plan, stream, &vertex_normals_sum_grad_kernel<scalar_t>,
           grad_n.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), a.pointers(), s,
           grad_sum.mutable_data_ptr<scalar_t>());
    launch(plan, stream, &vertex_normals_backward_kernel<scalar_t>,
           grad_sum.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), a.pointers(), s,
           grad_v.mutable_data_ptr<scalar_t>());
  });
  return grad_v;
}

}  // namespace

TORCH_LIBRARY_IMPL(FLAME_EXT_KERNEL_LIB, FLAME_EXT_KERNEL_KEY, m) {
  m.impl("vertex_normals", &vertex_normals_cuda);
  m.impl("vertex_normals_backward", &vertex_normals_backward_cuda);
}

}  // namespace flame_ext
