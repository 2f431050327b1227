// CPU implementation of flame_ext::vertex_normals and flame_ext::vertex_normals_backward:
// argument checks, a check of the adjacency's values, then loops over (sample, vertex)
// that call the shared math of normals.h.
//
// Every output element is written by one iteration that sums in adjacency order, so the
// result is the same bits whatever the number of threads and however at::parallel_for
// splits the range.
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "normals/normals.h"
#include "normals/normals_checks.h"

namespace flame_ext {
namespace {

// A vertex costs ~50 ns (FLAME: ~6 incident faces, each normal formed again per corner),
// so a task of this many is ~1 ms: one FLAME mesh (5023 vertices) up to B = 3 runs on
// one thread. Smaller tasks measured slower on a busy 2-core machine, where waking the
// second thread of a parallel region costs milliseconds.
constexpr int64_t kVerticesPerTask = 16384;

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
    at::parallel_for(0, s.batch * s.num_vertices, kVerticesPerTask,
                     [&](int64_t begin, int64_t end) {
                       for (int64_t t = begin; t < end; ++t) {
                         const int64_t base = (t / s.num_vertices) * s.num_vertices * 3;
                         vertex_normal(v_p + base, a, s, t % s.num_vertices, n_p + 3 * t);
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
  // g_s of every vertex, complete before the gather reads the g_s of a face's corners
  // (the two parallel_for calls are the CUDA launchers' two launches).
  at::Tensor grad_sum = at::empty({s.batch, s.num_vertices, 3}, v_in.options());

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "flame_ext::vertex_normals_backward", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const scalar_t* g_p = grad_n.const_data_ptr<scalar_t>();
    scalar_t* gs_p = grad_sum.mutable_data_ptr<scalar_t>();
    scalar_t* out_p = grad_v.mutable_data_ptr<scalar_t>();
    const int64_t n_items = s.batch * s.num_vertices;
    at::parallel_for(0, n_items, kVerticesPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t base = (t / s.num_vertices) * s.num_vertices * 3;
        vertex_sum_gradient(v_p + base, g_p + base, a, s, t % s.num_vertices, gs_p + 3 * t);
      }
    });
    at::parallel_for(0, n_items, kVerticesPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t base = (t / s.num_vertices) * s.num_vertices * 3;
        vertex_gradient(v_p + base, gs_p + base, a, s, t % s.num_vertices, out_p + 3 * t);
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
