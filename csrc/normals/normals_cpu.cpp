// CPU implementation of flame_ext::vertex_normals and flame_ext::vertex_normals_backward:
// argument checks, a check of the adjacency's values, then loops over samples that call
// the shared math of normals.h.
//
// Every output element is written by one iteration that sums in adjacency order, so the
// result is the same bits whatever the number of threads and however at::parallel_for
// splits the range.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "normals/normals.h"
#include "normals/normals_checks.h"

namespace flame_ext {
namespace {

// Each task is whole samples: per sample the face normals (and in the backward the faces'
// summed gradients) are formed once into a scratch table, then every vertex gathers them
// in adjacency order, so a sample's working set (its vertices, outputs and the tables:
// ~0.4 MB for FLAME in float32) stays in cache at any batch size. A task of ~16384
// vertices (3 FLAME meshes) keeps a small batch on one thread: waking the second thread
// of a parallel region costs more than a mesh on a busy 2-core machine.
constexpr int64_t kVerticesPerTask = 16384;

int64_t samples_per_task(int64_t num_vertices) {
  return std::max<int64_t>(1, kVerticesPerTask / std::max<int64_t>(1, num_vertices));
}

// The adjacency's values, checked once per call (O(V + E), shared by every sample): a
// bad table is an error naming what is wrong, never a read out of bounds.
void check_adjacency_values(const Adjacency& a, const NormalSizes& s) {
  for (int64_t i = 0; i < s.num_vertices; ++i) {
    int64_t begin, end;
    TORCH_CHECK(adjacency_range(a.offsets, i, s.num_entries, &begin, &end),
                "flame_ext::vertex_normals: offsets[", i, ":", i + 2, "] = (", a.offsets[i],
                ", ", a.offsets[i + 1], ") is not a range of the ", s.num_entries, " entries");
    for (int64_t e = begin; e < end; ++e) {
      int64_t corners[3];
      TORCH_CHECK(entry_face(a.faces, a.entries[e], s, i, corners),
                  "flame_ext::vertex_normals: entries[", e, "] = ", a.entries[e],
                  " is not a corner of vertex ", i, " in faces with ", s.num_faces,
                  " faces and ", s.num_vertices, " vertices");
    }
  }
}

at::Tensor vertex_normals_cpu(const at::Tensor& v_in, const at::Tensor& faces_in,
                              const at::Tensor& offsets_in, const at::Tensor& entries_in) {
  const NormalSizes s = check_vertex_normals_args(v_in, faces_in, offsets_in, entries_in);
  at::Tensor n = at::empty({s.batch, s.num_vertices, 3}, v_in.options());
  if (s.batch * s.num_vertices == 0) return n;

  const at::Tensor v = v_in.contiguous();
  const AdjacencyTensors tables = contiguous_adjacency(faces_in, offsets_in, entries_in);
  const Adjacency a = tables.pointers();
  check_adjacency_values(a, s);

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::vertex_normals", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    scalar_t* n_p = n.mutable_data_ptr<scalar_t>();
    const int64_t V = s.num_vertices, F = s.num_faces;
    at::parallel_for(0, s.batch, samples_per_task(V), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> face_n(3 * F);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* vb = v_p + b * V * 3;
        for (int64_t f = 0; f < F; ++f) face_normal_of(vb, a.faces, f, V, &face_n[3 * f]);
        for (int64_t i = 0; i < V; ++i) {
          scalar_t sum[3];
          summed_face_normals(face_n.data(), a, i, sum);
          normalize_normal(sum, n_p + (b * V + i) * 3);
        }
      }
    });
  });
  return n;
}

at::Tensor vertex_normals_backward_cpu(const at::Tensor& grad_n_in, const at::Tensor& v_in,
                                       const at::Tensor& faces_in, const at::Tensor& offsets_in,
                                       const at::Tensor& entries_in) {
  const NormalSizes s =
      check_vertex_normals_backward_args(grad_n_in, v_in, faces_in, offsets_in, entries_in);
  at::Tensor grad_v = at::empty({s.batch, s.num_vertices, 3}, v_in.options());
  if (s.batch * s.num_vertices == 0) return grad_v;

  const at::Tensor v = v_in.contiguous();
  const at::Tensor grad_n = grad_n_in.contiguous();
  const AdjacencyTensors tables = contiguous_adjacency(faces_in, offsets_in, entries_in);
  const Adjacency a = tables.pointers();
  check_adjacency_values(a, s);

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::vertex_normals_backward", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const scalar_t* g_p = grad_n.const_data_ptr<scalar_t>();
    scalar_t* out_p = grad_v.mutable_data_ptr<scalar_t>();
    const int64_t V = s.num_vertices, F = s.num_faces;
    at::parallel_for(0, s.batch, samples_per_task(V), [&](int64_t begin, int64_t end) {
      // The face normals, then the faces' G; g_s of every vertex complete before any G
      // reads it (the CUDA launcher's two launches).
      std::vector<scalar_t> face_table(3 * F), grad_sum(3 * V);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* vb = v_p + b * V * 3;
        const scalar_t* gb = g_p + b * V * 3;
        for (int64_t f = 0; f < F; ++f) face_normal_of(vb, a.faces, f, V, &face_table[3 * f]);
        for (int64_t i = 0; i < V; ++i) {
          scalar_t sum[3];
          summed_face_normals(face_table.data(), a, i, sum);
          normalize_backward(sum, gb + 3 * i, &grad_sum[3 * i]);
        }
        for (int64_t f = 0; f < F; ++f)
          face_sum_gradient(grad_sum.data(), a.faces, f, V, &face_table[3 * f]);
        for (int64_t i = 0; i < V; ++i)
          vertex_gradient_of_faces(vb, face_table.data(), a, i, out_p + (b * V + i) * 3);
      }
    });
  });
  return grad_v;
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CPU, m) {
  m.impl("vertex_normals", &vertex_normals_cpu);
  m.impl("vertex_normals_backward", &vertex_normals_backward_cpu);
}

}  // namespace flame_ext
