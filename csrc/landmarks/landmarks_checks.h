// Argument checks of the landmarks op family, shared by the CPU and CUDA launchers (host
// code, ATen) so both reject the same inputs with the same messages. Shapes, dtypes and devices
// only: index values are checked where they are read (a TORCH_CHECK in the CPU loop, a
// guarded read in the CUDA kernel), since reading them here would sync with the GPU.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "landmarks/landmarks.h"

namespace flame_ext {

// The index and weight tables of one call, contiguous, as every launcher reads them.
// Without contour landmarks the dynamic tables are never read (and may be empty
// placeholders): they are kept as given.
struct LandmarkTableTensors {
  at::Tensor tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary;
};

inline LandmarkTableTensors contiguous_tables(const at::Tensor& tris,
                                              const at::Tensor& lmk_faces_idx,
                                              const at::Tensor& lmk_bary_coords,
                                              const at::Tensor& dyn_faces,
                                              const at::Tensor& dyn_bary, bool contour) {
  return {tris.contiguous(), lmk_faces_idx.contiguous(), lmk_bary_coords.contiguous(),
          contour ? dyn_faces.contiguous() : dyn_faces,
          contour ? dyn_bary.contiguous() : dyn_bary};
}

inline void check_landmark_tables(const at::Tensor& ref, const at::Tensor& tris,
                                  const at::Tensor& lmk_faces_idx,
                                  const at::Tensor& lmk_bary_coords) {
  FLAME_CHECK_INDEX(tris);
  FLAME_CHECK_DIM(tris, 2);
  TORCH_CHECK(tris.size(1) == 3, "tris must have shape (F, 3), got ", tris.sizes());
  FLAME_CHECK_INDEX(lmk_faces_idx);
  FLAME_CHECK_DIM(lmk_faces_idx, 1);
  FLAME_CHECK_DIM(lmk_bary_coords, 2);
  TORCH_CHECK(lmk_bary_coords.size(0) == lmk_faces_idx.size(0) && lmk_bary_coords.size(1) == 3,
              "lmk_bary_coords must have shape (", lmk_faces_idx.size(0), ", 3), got ",
              lmk_bary_coords.sizes());
  FLAME_CHECK_SAME_DTYPE(lmk_bary_coords, ref);
  FLAME_CHECK_SAME_DEVICE(tris, ref);
  FLAME_CHECK_SAME_DEVICE(lmk_faces_idx, ref);
  FLAME_CHECK_SAME_DEVICE(lmk_bary_coords, ref);
}

inline void check_dynamic_landmark_tables(const at::Tensor& ref,
                                          const at::Tensor& dynamic_lmk_faces_idx,
                                          const at::Tensor& dynamic_lmk_bary_coords) {
  FLAME_CHECK_INDEX(dynamic_lmk_faces_idx);
  FLAME_CHECK_DIM(dynamic_lmk_faces_idx, 2);
  TORCH_CHECK(dynamic_lmk_faces_idx.size(0) > 0,
              "dynamic_lmk_faces_idx must have at least one bin (row), got ",
              dynamic_lmk_faces_idx.sizes());
  FLAME_CHECK_DIM(dynamic_lmk_bary_coords, 3);
  TORCH_CHECK(dynamic_lmk_bary_coords.size(0) == dynamic_lmk_faces_idx.size(0) &&
                  dynamic_lmk_bary_coords.size(1) == dynamic_lmk_faces_idx.size(1) &&
                  dynamic_lmk_bary_coords.size(2) == 3,
              "dynamic_lmk_bary_coords must have shape (", dynamic_lmk_faces_idx.size(0), ", ",
              dynamic_lmk_faces_idx.size(1), ", 3), got ", dynamic_lmk_bary_coords.sizes());
  FLAME_CHECK_SAME_DTYPE(dynamic_lmk_bary_coords, ref);
  FLAME_CHECK_SAME_DEVICE(dynamic_lmk_faces_idx, ref);
  FLAME_CHECK_SAME_DEVICE(dynamic_lmk_bary_coords, ref);
}

// flame_ext::landmarks. Without a contour rule the pose and the dynamic tables are not
// read, so they are not checked either (the wrapper passes empty tensors).
inline LandmarkSizes check_landmarks_args(const at::Tensor& v, const at::Tensor& poses,
                                          const at::Tensor& tris,
                                          const at::Tensor& lmk_faces_idx,
                                          const at::Tensor& lmk_bary_coords,
                                          const at::Tensor& dynamic_lmk_faces_idx,
                                          const at::Tensor& dynamic_lmk_bary_coords,
                                          int64_t contour_rule) {
  FLAME_CHECK_DIM(v, 3);
  TORCH_CHECK(v.size(2) == 3, "v must have shape (B, V, 3), got ", v.sizes());
  check_float(v, "v");
  TORCH_CHECK(contour_rule == kContourNone || contour_rule == kContourMedusa ||
                  contour_rule == kContourDeca,
              "contour_rule must be 0 (none), 1 (medusa) or 2 (deca), got ", contour_rule);
  check_landmark_tables(v, tris, lmk_faces_idx, lmk_bary_coords);
  LandmarkSizes s{v.size(0), v.size(1), tris.size(0), 0, 0, lmk_faces_idx.size(0)};
  if (contour_rule != kContourNone) {
    check_dynamic_landmark_tables(v, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords);
    FLAME_CHECK_DIM(poses, 2);
    TORCH_CHECK(poses.size(0) == s.batch && poses.size(1) >= 6 && poses.size(1) % 3 == 0,
                "poses must have shape (", s.batch,
                ", 3J) with J >= 2 (global, neck, ...), got ", poses.sizes());
    FLAME_CHECK_SAME_DTYPE(poses, v);
    FLAME_CHECK_SAME_DEVICE(poses, v);
    s.num_bins = dynamic_lmk_faces_idx.size(0);
    s.n_contour = dynamic_lmk_faces_idx.size(1);
  }
  return s;
}

// flame_ext::landmarks_backward. The forward wrote the contour points first; how many
// there are follows from grad_lmk (0 or the dynamic tables' Ld).
inline LandmarkSizes check_landmarks_backward_args(const at::Tensor& grad_lmk,
                                                   const at::Tensor& bins,
                                                   const at::Tensor& tris,
                                                   const at::Tensor& lmk_faces_idx,
                                                   const at::Tensor& lmk_bary_coords,
                                                   const at::Tensor& dynamic_lmk_faces_idx,
                                                   const at::Tensor& dynamic_lmk_bary_coords,
                                                   int64_t num_vertices) {
  FLAME_CHECK_DIM(grad_lmk, 3);
  TORCH_CHECK(grad_lmk.size(2) == 3, "grad_lmk must have shape (B, L, 3), got ",
              grad_lmk.sizes());
  check_float(grad_lmk, "grad_lmk");
  TORCH_CHECK(num_vertices >= 0, "num_vertices must be >= 0, got ", num_vertices);
  check_landmark_tables(grad_lmk, tris, lmk_faces_idx, lmk_bary_coords);
  LandmarkSizes s{grad_lmk.size(0), num_vertices, tris.size(0), 0, 0, lmk_faces_idx.size(0)};
  const int64_t n_contour = grad_lmk.size(1) - s.n_static;
  TORCH_CHECK(n_contour >= 0, "grad_lmk has ", grad_lmk.size(1), " landmarks, fewer than the ",
              s.n_static, " of lmk_faces_idx");
  if (n_contour > 0) {
    check_dynamic_landmark_tables(grad_lmk, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords);
    TORCH_CHECK(dynamic_lmk_faces_idx.size(1) == n_contour, "grad_lmk has ", n_contour,
                " landmarks beyond the static ones but dynamic_lmk_faces_idx has ",
                dynamic_lmk_faces_idx.size(1), " per bin");
    FLAME_CHECK_INDEX(bins);
    TORCH_CHECK(bins.dim() == 1 && bins.size(0) == s.batch, "bins must have shape (", s.batch,
                "), got ", bins.sizes());
    FLAME_CHECK_SAME_DEVICE(bins, grad_lmk);
    s.num_bins = dynamic_lmk_faces_idx.size(0);
    s.n_contour = n_contour;
  }
  return s;
}

}  // namespace flame_ext
