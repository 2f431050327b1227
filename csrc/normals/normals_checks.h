// Argument checks of the normals op family, shared by the CPU and CUDA launchers (host
// code, ATen) so both reject the same inputs with the same messages. Shapes, dtypes and
// devices only: index values are checked where they are read (a TORCH_CHECK in the CPU
// loop, a guarded read in the CUDA kernel that answers NaN), since reading them here
// would sync with the GPU. The Python wrapper builds the adjacency from range-checked
// faces, so a valid call never meets a bad index.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "normals/normals.h"

namespace flame_ext {

// Contiguous copies of the index tables (no copy when they already are) and their
// pointers; the tensors must outlive every use of the pointers.
struct AdjacencyTensors {
  at::Tensor faces, offsets, entries;
  Adjacency pointers() const {
    return {faces.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
            entries.const_data_ptr<int64_t>()};
  }
};

inline AdjacencyTensors contiguous_adjacency(const at::Tensor& faces, const at::Tensor& offsets,
                                             const at::Tensor& entries) {
  return {faces.contiguous(), offsets.contiguous(), entries.contiguous()};
}

// faces (F, 3), offsets (V + 1,), entries (E,): int64, on ref's device.
inline void check_adjacency(const at::Tensor& ref, int64_t num_vertices, const at::Tensor& faces,
                            const at::Tensor& offsets, const at::Tensor& entries) {
  FLAME_CHECK_INDEX(faces);
  FLAME_CHECK_DIM(faces, 2);
  TORCH_CHECK(faces.size(1) == 3, "faces must have shape (F, 3), got ", faces.sizes());
  FLAME_CHECK_INDEX(offsets);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == num_vertices + 1,
              "offsets must have shape (", num_vertices + 1, ",), got ", offsets.sizes());
  FLAME_CHECK_INDEX(entries);
  FLAME_CHECK_DIM(entries, 1);
  FLAME_CHECK_SAME_DEVICE(faces, ref);
  FLAME_CHECK_SAME_DEVICE(offsets, ref);
  FLAME_CHECK_SAME_DEVICE(entries, ref);
}

// flame_ext::vertex_normals.
inline NormalSizes check_vertex_normals_args(const at::Tensor& v, const at::Tensor& faces,
                                             const at::Tensor& offsets,
                                             const at::Tensor& entries) {
  FLAME_CHECK_DIM(v, 3);
  TORCH_CHECK(v.size(2) == 3, "v must have shape (B, V, 3), got ", v.sizes());
  check_float(v, "v");
  check_adjacency(v, v.size(1), faces, offsets, entries);
  return {v.size(0), v.size(1), faces.size(0), entries.size(0)};
}

// flame_ext::vertex_normals_backward.
inline NormalSizes check_vertex_normals_backward_args(const at::Tensor& grad_n,
                                                      const at::Tensor& v,
                                                      const at::Tensor& faces,
                                                      const at::Tensor& offsets,
                                                      const at::Tensor& entries) {
  const NormalSizes s = check_vertex_normals_args(v, faces, offsets, entries);
  TORCH_CHECK(grad_n.sizes() == v.sizes(), "grad_n must have the shape of v, ", v.sizes(),
              ", got ", grad_n.sizes());
  FLAME_CHECK_SAME_DTYPE(grad_n, v);
  FLAME_CHECK_SAME_DEVICE(grad_n, v);
  return s;
}

}  // namespace flame_ext
