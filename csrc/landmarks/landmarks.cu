// CUDA launchers of flame_ext::landmarks and flame_ext::landmarks_backward (schemas in
// csrc/registration.cpp, kernels and launch plans in landmarks_kernels.cuh, argument
// checks in landmarks_checks.h).
//
// Index tables are model constants validated where they are loaded; reading them here on
// the host would sync with the GPU. A bad index is never followed: its landmark is NaN and
// it gets no gradient (as the rigid_transforms kernels answer a bad parent tree on the
// device). Not a device assert: that would trap the kernel and poison the CUDA context for
// the process.
#include <cstdint>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "landmarks/landmarks_checks.h"
#include "landmarks/landmarks_kernels.cuh"
#include "launch.h"

namespace flame_ext {
namespace {

using namespace landmarks_kernels;

template <typename scalar_t>
LandmarkTables<scalar_t> tables_of(const LandmarkTableTensors& t, bool contour) {
  return {t.tris.const_data_ptr<int64_t>(), t.lmk_faces_idx.const_data_ptr<int64_t>(),
          t.lmk_bary_coords.const_data_ptr<scalar_t>(),
          contour ? t.dyn_faces.const_data_ptr<int64_t>() : nullptr,
          contour ? t.dyn_bary.const_data_ptr<scalar_t>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor> landmarks_cuda(
    const at::Tensor& v_in, const at::Tensor& poses_in, const at::Tensor& tris_in,
    const at::Tensor& lmk_faces_idx_in, const at::Tensor& lmk_bary_coords_in,
    const at::Tensor& dynamic_lmk_faces_idx_in, const at::Tensor& dynamic_lmk_bary_coords_in,
    int64_t contour_rule) {
  const LandmarkSizes s =
      check_landmarks_args(v_in, poses_in, tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
                           dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, contour_rule);
  check_kernel_device(v_in, "v");
  const DeviceGuard guard(v_in.device());
  const Stream stream = current_stream();
  const bool contour = contour_rule != kContourNone;
  at::Tensor lmk = at::empty({s.batch, s.n_contour + s.n_static, 3}, v_in.options());
  at::Tensor bins = at::empty({s.batch}, v_in.options().dtype(at::kLong));
  if (s.batch == 0) return {lmk, bins};

  const at::Tensor v = v_in.contiguous();
  // Without a contour rule the pose is never read (and may be an empty placeholder).
  const at::Tensor poses = contour ? poses_in.contiguous() : poses_in;
  const LandmarkTableTensors t =
      contiguous_tables(tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
                        dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, contour);
  const LaunchPlan plan = landmarks_forward_plan(s.batch, device_limits());

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::landmarks", [&] {
    launch(plan, stream, &landmarks_forward_kernel<scalar_t>, v.const_data_ptr<scalar_t>(),
           contour ? poses.const_data_ptr<scalar_t>() : nullptr, contour ? poses.size(1) : 0,
           contour_rule, tables_of<scalar_t>(t, contour), s, lmk.mutable_data_ptr<scalar_t>(),
           bins.mutable_data_ptr<int64_t>());
  });
  return {lmk, bins};
}

at::Tensor landmarks_backward_cuda(const at::Tensor& grad_lmk_in, const at::Tensor& bins_in,
                                   const at::Tensor& tris_in, const at::Tensor& lmk_faces_idx_in,
                                   const at::Tensor& lmk_bary_coords_in,
                                   const at::Tensor& dynamic_lmk_faces_idx_in,
                                   const at::Tensor& dynamic_lmk_bary_coords_in,
                                   int64_t num_vertices) {
  const LandmarkSizes s = check_landmarks_backward_args(
      grad_lmk_in, bins_in, tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
      dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, num_vertices);
  check_kernel_device(grad_lmk_in, "grad_lmk");
  const DeviceGuard guard(grad_lmk_in.device());
  const Stream stream = current_stream();
  const bool contour = s.n_contour > 0;
  at::Tensor grad_v = at::empty({s.batch, s.num_vertices, 3}, grad_lmk_in.options());
  if (s.batch == 0) return grad_v;

  const at::Tensor grad_lmk = grad_lmk_in.contiguous();
  const at::Tensor bins = contour ? bins_in.contiguous() : bins_in;
  const LandmarkTableTensors t =
      contiguous_tables(tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
                        dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, contour);
  const LaunchPlan plan = landmarks_backward_plan(s.batch, device_limits());

  AT_DISPATCH_FLOATING_TYPES(grad_lmk.scalar_type(), "flame_ext::landmarks_backward", [&] {
    launch(plan, stream, &landmarks_backward_kernel<scalar_t>,
           grad_lmk.const_data_ptr<scalar_t>(),
           contour ? bins.const_data_ptr<int64_t>() : nullptr, tables_of<scalar_t>(t, contour),
           s, grad_v.mutable_data_ptr<scalar_t>());
  });
  return grad_v;
}

}  // namespace

TORCH_LIBRARY_IMPL(FLAME_EXT_KERNEL_LIB, FLAME_EXT_KERNEL_KEY, m) {
  m.impl("landmarks", &landmarks_cuda);
  m.impl("landmarks_backward", &landmarks_backward_cuda);
}

}  // namespace flame_ext
