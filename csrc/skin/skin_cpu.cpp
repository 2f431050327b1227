// CPU implementation of the skin op family: skin (+ backward), one vertex per loop
// iteration. The math is in skin.h; this file checks inputs, splits the work over threads
// and, for the reduction of grad_transforms over vertices, fixes the summation order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "cpu_isa.h"
#include "skin/skin.h"
#include "skin/skin_checks.h"

namespace flame_ext {
namespace {

// Vertices per partial sum of grad_transforms. Fixed (not derived from the thread count)
// so that the summation order, and so the result, is the same on every run and machine.
constexpr int64_t kReduceChunk = 512;
// Vertices per task of skin forward.
constexpr int64_t kVertexGrain = 2048;

// Calls fn(b, v_begin, v_end) for the (sample, vertex) pairs of the flat range
// [begin, end) of B * V, one contiguous vertex run per sample.
template <typename Fn>
void for_each_vertex_run(int64_t begin, int64_t end, int64_t num_verts, const Fn& fn) {
  int64_t b = begin / num_verts, v = begin % num_verts;
  while (begin < end) {
    const int64_t v_end = std::min(num_verts, v + (end - begin));
    fn(b, v, v_end);
    begin += v_end - v;
    ++b;
    v = 0;
  }
}

// A transform row as one SIMD value (GCC/Clang vector extension): skin.h's per-vertex
// functions then compile to a handful of vector instructions per vertex.
template <typename scalar_t>
struct CpuRow;
template <>
struct CpuRow<float> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct CpuRow<double> {
  typedef double type __attribute__((vector_size(32)));
};

// The vertex loops are compiled twice: for the baseline ISA of the build, and for
// AVX2 + FMA, chosen at run time (cpu_isa.h; ~1.3x here, mostly from FMA).
#if defined(FLAME_EXT_ISA_TARGET_ATTRIBUTE)
#define FLAME_SKIN_AVX2 1
bool use_avx2() { return cpu_isa() >= Isa::kAvx2; }
#else
#define FLAME_SKIN_AVX2 0
#endif
#define FLAME_ALWAYS_INLINE inline __attribute__((always_inline))

// Skins n consecutive vertices of one sample; a points to its J transforms. They are
// first copied to an aligned local array, which the outputs cannot alias.
template <int kRows, typename scalar_t>
FLAME_ALWAYS_INLINE void skin_run_impl(const scalar_t* vp, const scalar_t* w,
                                       const scalar_t* a, int nj, int64_t n, scalar_t* v_out,
                                       scalar_t* t_out) {
  using row_t = typename CpuRow<scalar_t>::type;
  row_t rows[4 * kMaxJoints];
  std::memcpy(rows, a, sizeof(scalar_t) * 16 * nj);
  for (int64_t i = 0; i < n; ++i) {
    row_t t[4];
    skin_vertex<kRows>(vp + 3 * i, w + i * nj, rows, nj, v_out + 3 * i, t);
    if (kRows == 4) std::memcpy(t_out + 16 * i, t, sizeof(t));
  }
}

// Backward of n consecutive vertices of one sample: grad_v_posed, and the sum over these
// vertices of their contributions to grad_transforms, in vertex order, into partial
// (16 J).
template <bool kHasGradT, typename scalar_t>
FLAME_ALWAYS_INLINE void skin_backward_run_impl(const scalar_t* gv, const scalar_t* gvt,
                                                const scalar_t* vp, const scalar_t* w,
                                                const scalar_t* a, int nj, int64_t n,
                                                scalar_t* grad_vp, scalar_t* partial) {
  using row_t = typename CpuRow<scalar_t>::type;
  row_t rows[4 * kMaxJoints], acc[4 * kMaxJoints];
  std::memcpy(rows, a, sizeof(scalar_t) * 16 * nj);
  std::memset(acc, 0, sizeof(acc));
  for (int64_t i = 0; i < n; ++i) {
    row_t grad_t[4], grad_vt[4];
    if (kHasGradT) std::memcpy(grad_vt, gvt + 16 * i, sizeof(grad_vt));
    skin_vertex_backward<kHasGradT>(gv + 3 * i, grad_vt, vp + 3 * i, w + i * nj, rows, nj,
                                    grad_vp + 3 * i, grad_t);
    accumulate_joint_grads<kHasGradT ? 4 : 3>(w + i * nj, grad_t, nj, acc);
  }
  std::memcpy(partial, acc, sizeof(scalar_t) * 16 * nj);
}

template <int kRows, typename scalar_t>
void skin_run(const scalar_t* vp, const scalar_t* w, const scalar_t* a, int nj, int64_t n,
              scalar_t* v_out, scalar_t* t_out) {
  skin_run_impl<kRows>(vp, w, a, nj, n, v_out, t_out);
}

template <bool kHasGradT, typename scalar_t>
void skin_backward_run(const scalar_t* gv, const scalar_t* gvt, const scalar_t* vp,
                       const scalar_t* w, const scalar_t* a, int nj, int64_t n,
                       scalar_t* grad_vp, scalar_t* partial) {
  skin_backward_run_impl<kHasGradT>(gv, gvt, vp, w, a, nj, n, grad_vp, partial);
}

#if FLAME_SKIN_AVX2
template <int kRows, typename scalar_t>
FLAME_TARGET_AVX2 void skin_run_avx2(const scalar_t* vp, const scalar_t* w, const scalar_t* a,
                                     int nj, int64_t n, scalar_t* v_out, scalar_t* t_out) {
  skin_run_impl<kRows>(vp, w, a, nj, n, v_out, t_out);
}

template <bool kHasGradT, typename scalar_t>
FLAME_TARGET_AVX2 void skin_backward_run_avx2(const scalar_t* gv, const scalar_t* gvt,
                                              const scalar_t* vp, const scalar_t* w,
                                              const scalar_t* a, int nj, int64_t n,
                                              scalar_t* grad_vp, scalar_t* partial) {
  skin_backward_run_impl<kHasGradT>(gv, gvt, vp, w, a, nj, n, grad_vp, partial);
}
#endif

template <int kRows, typename scalar_t>
auto pick_skin_run() {
#if FLAME_SKIN_AVX2
  if (use_avx2()) return &skin_run_avx2<kRows, scalar_t>;
#endif
  return &skin_run<kRows, scalar_t>;
}

template <bool kHasGradT, typename scalar_t>
auto pick_skin_backward_run() {
#if FLAME_SKIN_AVX2
  if (use_avx2()) return &skin_backward_run_avx2<kHasGradT, scalar_t>;
#endif
  return &skin_backward_run<kHasGradT, scalar_t>;
}

template <int kRows, typename scalar_t>
void skin_loop(const scalar_t* vp, const scalar_t* a, const scalar_t* w, int64_t batch,
               int64_t num_verts, int nj, scalar_t* v_out, scalar_t* t_out) {
  const auto run = pick_skin_run<kRows, scalar_t>();
  at::parallel_for(0, batch * num_verts, kVertexGrain, [&](int64_t begin, int64_t end) {
    for_each_vertex_run(begin, end, num_verts, [&](int64_t b, int64_t v0, int64_t v1) {
      const int64_t i = b * num_verts + v0;
      run(vp + 3 * i, w + v0 * nj, a + b * 16 * nj, nj, v1 - v0, v_out + 3 * i,
          kRows == 4 ? t_out + 16 * i : nullptr);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> skin_cpu(const at::Tensor& v_posed_in,
                                            const at::Tensor& transforms_in,
                                            const at::Tensor& lbs_weights_in,
                                            bool write_vertex_transforms) {
  check_skin_inputs(v_posed_in, transforms_in, lbs_weights_in);
  const int64_t batch = v_posed_in.size(0), num_verts = v_posed_in.size(1);
  const int64_t num_joints = transforms_in.size(1);
  const at::Tensor v_posed = v_posed_in.contiguous(), transforms = transforms_in.contiguous();
  const at::Tensor lbs_weights = lbs_weights_in.contiguous();
  at::Tensor v = at::empty({batch, num_verts, 3}, v_posed.options());
  at::Tensor vertex_transforms =
      write_vertex_transforms ? at::empty({batch, num_verts, 4, 4}, v_posed.options())
                              : at::empty({0}, v_posed.options());
  if (batch == 0 || num_verts == 0) return {v, vertex_transforms};

  AT_DISPATCH_FLOATING_TYPES(v_posed.scalar_type(), "skin_cpu", [&] {
    const scalar_t* vp = v_posed.const_data_ptr<scalar_t>();
    const scalar_t* a = transforms.const_data_ptr<scalar_t>();
    const scalar_t* w = lbs_weights.const_data_ptr<scalar_t>();
    scalar_t* v_out = v.mutable_data_ptr<scalar_t>();
    const int nj = static_cast<int>(num_joints);
    if (write_vertex_transforms)
      skin_loop<4>(vp, a, w, batch, num_verts, nj, v_out,
                   vertex_transforms.mutable_data_ptr<scalar_t>());
    else
      skin_loop<3>(vp, a, w, batch, num_verts, nj, v_out, static_cast<scalar_t*>(nullptr));
  });
  return {v, vertex_transforms};
}

// grad_v_posed per vertex, and per (sample, chunk of kReduceChunk vertices) the partial
// sum of grad_transforms, written to partials (B, chunks, J, 16); the chunks are then
// summed in chunk order.
template <bool kHasGradT, typename scalar_t>
void skin_backward_loop(const scalar_t* gv, const scalar_t* gvt, const scalar_t* vp,
                        const scalar_t* a, const scalar_t* w, int64_t batch, int64_t num_verts,
                        int nj, scalar_t* grad_vp, scalar_t* partials, scalar_t* grad_a) {
  const auto run = pick_skin_backward_run<kHasGradT, scalar_t>();
  const int64_t chunks = (num_verts + kReduceChunk - 1) / kReduceChunk;
  const int64_t width = 16 * nj;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, v0 = (task % chunks) * kReduceChunk;
      const int64_t v1 = std::min(num_verts, v0 + kReduceChunk);
      const int64_t i = b * num_verts + v0;
      run(gv + 3 * i, kHasGradT ? gvt + 16 * i : nullptr, vp + 3 * i, w + v0 * nj,
          a + b * width, nj, v1 - v0, grad_vp + 3 * i, partials + task * width);
    }
  });
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* out = grad_a + b * width;
      const scalar_t* part = partials + b * chunks * width;
      std::copy(part, part + width, out);
      for (int64_t c = 1; c < chunks; ++c)
        for (int64_t k = 0; k < width; ++k) out[k] += part[c * width + k];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> skin_backward_cpu(
    const at::Tensor& grad_v_in, const std::optional<at::Tensor>& grad_vertex_transforms_in,
    const at::Tensor& v_posed_in, const at::Tensor& transforms_in,
    const at::Tensor& lbs_weights_in) {
  check_skin_inputs(v_posed_in, transforms_in, lbs_weights_in);
  check_skin_grads(grad_v_in, grad_vertex_transforms_in, v_posed_in);
  const int64_t batch = v_posed_in.size(0), num_verts = v_posed_in.size(1);
  const int64_t num_joints = transforms_in.size(1);
  const bool has_gvt = grad_vertex_transforms_in.has_value();
  const at::Tensor gvt = has_gvt ? grad_vertex_transforms_in->contiguous() : at::Tensor();
  const at::Tensor grad_v = grad_v_in.contiguous(), v_posed = v_posed_in.contiguous();
  const at::Tensor transforms = transforms_in.contiguous();
  const at::Tensor lbs_weights = lbs_weights_in.contiguous();
  at::Tensor grad_v_posed = at::empty({batch, num_verts, 3}, v_posed.options());
  at::Tensor grad_transforms = at::empty({batch, num_joints, 4, 4}, v_posed.options());
  if (batch == 0 || num_verts == 0) return {grad_v_posed, grad_transforms.zero_()};

  const int64_t chunks = (num_verts + kReduceChunk - 1) / kReduceChunk;
  at::Tensor partials = at::empty({batch, chunks, num_joints, 16}, v_posed.options());
  AT_DISPATCH_FLOATING_TYPES(v_posed.scalar_type(), "skin_backward_cpu", [&] {
    const scalar_t* gvt_ptr = has_gvt ? gvt.const_data_ptr<scalar_t>() : nullptr;
    const int nj = static_cast<int>(num_joints);
    // Without grad_vertex_transforms the bottom rows get no gradient: skip them.
    auto loop = has_gvt ? skin_backward_loop<true, scalar_t> : skin_backward_loop<false, scalar_t>;
    loop(grad_v.const_data_ptr<scalar_t>(), gvt_ptr, v_posed.const_data_ptr<scalar_t>(),
         transforms.const_data_ptr<scalar_t>(), lbs_weights.const_data_ptr<scalar_t>(), batch,
         num_verts, nj, grad_v_posed.mutable_data_ptr<scalar_t>(),
         partials.mutable_data_ptr<scalar_t>(), grad_transforms.mutable_data_ptr<scalar_t>());
  });
  return {grad_v_posed, grad_transforms};
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CPU, m) {
  m.impl("skin", &skin_cpu);
  m.impl("skin_backward", &skin_backward_cpu);
}

}  // namespace flame_ext
