// CPU implementation of flame_ext::landmarks and flame_ext::landmarks_backward: argument
// checks, then loops over samples that call the shared math of landmarks.h.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "landmarks/landmarks.h"
#include "landmarks/landmarks_checks.h"

namespace flame_ext {
namespace {

// One landmark is ~30 flops; below this many samples a thread pool costs more than it
// saves.
constexpr int64_t kSamplesPerTask = 32;
// The static landmarks' vertices of the sample this many ahead are prefetched while a
// sample is gathered: each sample reads a few hundred scattered vertices, a few
// microseconds of cache misses once the batch's meshes leave the cache (at B = 256 FLAME's
// are 15 MB), and a sample's arithmetic alone does not hide them.
constexpr int64_t kPrefetchSamples = 4;

// The three vertex indices of face `face`, after checking that the face and its corners
// exist: a bad index is an error, never a read out of bounds.
inline const int64_t* checked_corners(const int64_t* tris, int64_t face, int64_t num_faces,
                                      int64_t num_vertices, const char* what) {
  TORCH_CHECK(in_range(face, num_faces), "flame_ext::landmarks: ", what, " holds face index ",
              face, ", out of range for tris with ", num_faces, " faces");
  const int64_t* corners = tris + 3 * face;
  for (int k = 0; k < 3; ++k)
    TORCH_CHECK(in_range(corners[k], num_vertices), "flame_ext::landmarks: tris[", face,
                "] holds vertex index ", corners[k], ", out of range for ", num_vertices,
                " vertices");
  return corners;
}

// The static landmarks are the same for every sample: their corners are looked up (and
// checked) once per call.
std::vector<int64_t> static_corners(const int64_t* tris, const int64_t* faces, int64_t n_lmk,
                                    int64_t num_faces, int64_t num_vertices) {
  std::vector<int64_t> corners(3 * n_lmk);
  for (int64_t l = 0; l < n_lmk; ++l) {
    const int64_t* c = checked_corners(tris, faces[l], num_faces, num_vertices, "lmk_faces_idx");
    std::memcpy(&corners[3 * l], c, 3 * sizeof(int64_t));
  }
  return corners;
}

std::tuple<at::Tensor, at::Tensor> landmarks_cpu(
    const at::Tensor& v_in, const at::Tensor& poses_in, const at::Tensor& tris_in,
    const at::Tensor& lmk_faces_idx_in, const at::Tensor& lmk_bary_coords_in,
    const at::Tensor& dynamic_lmk_faces_idx_in, const at::Tensor& dynamic_lmk_bary_coords_in,
    int64_t contour_rule) {
  const LandmarkSizes s =
      check_landmarks_args(v_in, poses_in, tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
                           dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, contour_rule);
  const bool contour = contour_rule != kContourNone;
  const int64_t n_lmk = s.n_contour + s.n_static;
  at::Tensor lmk = at::empty({s.batch, n_lmk, 3}, v_in.options());
  at::Tensor bins = at::zeros({s.batch}, v_in.options().dtype(at::kLong));
  if (s.batch == 0) return {lmk, bins};

  const at::Tensor v = v_in.contiguous();
  // Without a contour rule the pose is never read (and may be an empty placeholder).
  const at::Tensor poses = contour ? poses_in.contiguous() : poses_in;
  const LandmarkTableTensors t =
      contiguous_tables(tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
                        dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, contour);
  const int64_t* tris_p = t.tris.const_data_ptr<int64_t>();
  const std::vector<int64_t> corners =
      static_corners(tris_p, t.lmk_faces_idx.const_data_ptr<int64_t>(), s.n_static,
                     s.num_faces, s.num_vertices);
  int64_t* bins_p = bins.mutable_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::landmarks", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const scalar_t* bary_p = t.lmk_bary_coords.const_data_ptr<scalar_t>();
    const scalar_t* poses_p = contour ? poses.const_data_ptr<scalar_t>() : nullptr;
    const int64_t pose_stride = contour ? poses.size(1) : 0;
    const int64_t* dyn_faces_p = contour ? t.dyn_faces.const_data_ptr<int64_t>() : nullptr;
    const scalar_t* dyn_bary_p = contour ? t.dyn_bary.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = lmk.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.batch, kSamplesPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* vb = v_p + b * s.num_vertices * 3;
        scalar_t* out = out_p + b * n_lmk * 3;
        if (contour) {
          const int64_t bin = contour_bin(poses_p + b * pose_stride, contour_rule, s.num_bins);
          bins_p[b] = bin;
          if (bin == kNoContourBin) {  // a non-finite global or neck pose
            std::fill(out, out + 3 * s.n_contour, std::numeric_limits<scalar_t>::quiet_NaN());
          } else {
            const int64_t* row_faces = dyn_faces_p + bin * s.n_contour;
            const scalar_t* row_bary = dyn_bary_p + bin * s.n_contour * 3;
            for (int64_t l = 0; l < s.n_contour; ++l) {
              const int64_t* c = checked_corners(tris_p, row_faces[l], s.num_faces,
                                                 s.num_vertices, "dynamic_lmk_faces_idx");
              barycentric_point(vb, c, row_bary + 3 * l, out + 3 * l);
            }
          }
          out += 3 * s.n_contour;
        }
        // one landmark's corners of the sample ahead per landmark gathered here
        const scalar_t* ahead =
            b + kPrefetchSamples < end ? vb + kPrefetchSamples * s.num_vertices * 3 : nullptr;
        for (int64_t l = 0; l < s.n_static; ++l) {
          if (ahead != nullptr)
            for (int k = 0; k < 3; ++k) prefetch_l2(ahead + 3 * corners[3 * l + k]);
          barycentric_point(vb, &corners[3 * l], bary_p + 3 * l, out + 3 * l);
        }
      }
    });
  });
  return {lmk, bins};
}

at::Tensor landmarks_backward_cpu(const at::Tensor& grad_lmk_in, const at::Tensor& bins_in,
                                  const at::Tensor& tris_in, const at::Tensor& lmk_faces_idx_in,
                                  const at::Tensor& lmk_bary_coords_in,
                                  const at::Tensor& dynamic_lmk_faces_idx_in,
                                  const at::Tensor& dynamic_lmk_bary_coords_in,
                                  int64_t num_vertices) {
  const LandmarkSizes s = check_landmarks_backward_args(
      grad_lmk_in, bins_in, tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
      dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, num_vertices);
  const bool contour = s.n_contour > 0;
  const int64_t n_lmk = s.n_contour + s.n_static;
  at::Tensor grad_v = at::empty({s.batch, s.num_vertices, 3}, grad_lmk_in.options());
  if (s.batch == 0) return grad_v;

  const at::Tensor grad_lmk = grad_lmk_in.contiguous();
  const at::Tensor bins = contour ? bins_in.contiguous() : bins_in;
  const LandmarkTableTensors t =
      contiguous_tables(tris_in, lmk_faces_idx_in, lmk_bary_coords_in,
                        dynamic_lmk_faces_idx_in, dynamic_lmk_bary_coords_in, contour);
  const int64_t* tris_p = t.tris.const_data_ptr<int64_t>();
  const std::vector<int64_t> corners =
      static_corners(tris_p, t.lmk_faces_idx.const_data_ptr<int64_t>(), s.n_static,
                     s.num_faces, s.num_vertices);
  const int64_t* bins_p = contour ? bins.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(grad_lmk.scalar_type(), "flame_ext::landmarks_backward", [&] {
    const scalar_t* g_p = grad_lmk.const_data_ptr<scalar_t>();
    const scalar_t* bary_p = t.lmk_bary_coords.const_data_ptr<scalar_t>();
    const int64_t* dyn_faces_p = contour ? t.dyn_faces.const_data_ptr<int64_t>() : nullptr;
    const scalar_t* dyn_bary_p = contour ? t.dyn_bary.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = grad_v.mutable_data_ptr<scalar_t>();
    // Each sample's gradient is zeroed and scattered by one thread, in landmark order:
    // no atomics, the same bits on every run.
    at::parallel_for(0, s.batch, kSamplesPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* gv = out_p + b * s.num_vertices * 3;
        std::memset(gv, 0, s.num_vertices * 3 * sizeof(scalar_t));
        const scalar_t* g = g_p + b * n_lmk * 3;
        if (contour) {
          const int64_t bin = bins_p[b];
          TORCH_CHECK(bin == kNoContourBin || in_range(bin, s.num_bins),
                      "flame_ext::landmarks_backward: bins[", b, "] = ", bin,
                      ", out of range for ", s.num_bins, " bins");
          // kNoContourBin: the contour points were NaN constants, with no gradient.
          if (bin != kNoContourBin) {
            const int64_t* row_faces = dyn_faces_p + bin * s.n_contour;
            const scalar_t* row_bary = dyn_bary_p + bin * s.n_contour * 3;
            for (int64_t l = 0; l < s.n_contour; ++l) {
              const int64_t* c = checked_corners(tris_p, row_faces[l], s.num_faces,
                                                 s.num_vertices, "dynamic_lmk_faces_idx");
              barycentric_scatter(gv, c, row_bary + 3 * l, g + 3 * l);
            }
          }
          g += 3 * s.n_contour;
        }
        for (int64_t l = 0; l < s.n_static; ++l)
          barycentric_scatter(gv, &corners[3 * l], bary_p + 3 * l, g + 3 * l);
      }
    });
  });
  return grad_v;
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CPU, m) {
  m.impl("landmarks", &landmarks_cpu);
  m.impl("landmarks_backward", &landmarks_backward_cpu);
}

}  // namespace flame_ext
