// CPU implementation of flame_ext::blend, blend_backward, blend_shared and
// blend_shared_backward (schemas in csrc/op_schemas.h, math in blend.h).
//
// out (B,N) = base + coeffs @ dirs^T + pose_coeffs @ pose_dirs is a GEMM with a tall, thin
// dirs (N = 15069 rows of K = 400 for FLAME, 196608 x 50 for the texture). Hand loops run
// it at every batch size:
// - small B (the per-frame decoder call): the cost is streaming dirs once (24 MB for
//   FLAME). The loop reads each block of rows once for all samples, with the coefficients
//   kept hot, and adds base and the pose correctives while the output block is still in
//   cache: one pass over memory where the eager path makes three. The rows are
//   prefetched into L2 ahead of the tiles, so the loads from memory overlap the
//   arithmetic (the strips below prefetch the next strip's block while they compute).
// - large B (16 and more; 17 for a dirs over 4 MiB): compute bound. The forward copies
//   strips of dirs k-major into an L1 block and runs broadcast tiles of samples x vectors
//   of rows over it, every sample of the batch per copy (the dot tiles of the small
//   batches reach half the FMA rate); the backward runs register tiles of samples x
//   columns, prefetching the next rows. The time per sample falls as B grows. BLAS used
//   to take over above a crossover batch measured on one Intel Xeon. On a 2-core AMD
//   EPYC MKL's sgemm at these shapes with 2 threads was 1.5-4x slower than the hand
//   loops up to B = 64 and only even at B = 256 (FlameShape forward: 2.4x the time for
//   1.5x the samples from B = 16 to 24 across the crossover), so no fixed crossover
//   holds on every x86 machine. $FLAME_EXT_BLEND_BLAS_BATCH (read once per process)
//   sends batches of at least that many samples to at::addmm / at::mm instead, for a
//   machine where BLAS is measured faster (python -m flame_ext._bench.blend_cpu prints
//   both); unset or 0, never. docs/PERFORMANCE.md has the numbers.
//
// A half-precision dirs (float16 / bfloat16 storage, everything else float32 or float64:
// FlameTex's basis_dtype) is widened exactly, a chunk of rows at a time, into a block in
// cache that the same loops then read (forward_half, backward_half): the results are the
// bits of the op on the widened table, dirs is read at half the bytes and never copied
// whole. BLAS reads one dtype, so such a dirs always takes the hand loops.
//
// The hand loops (blend_cpu_kernels.h) use GCC/Clang vector extensions and are compiled
// three times, for AVX-512 (64-byte vectors), AVX2+FMA (32) and the x86-64 baseline (16),
// one picked at run time (cpu_isa.h). Every reduction runs in a fixed order over fixed row
// chunks and sample groups that depend on the sizes only, never on the thread count, so
// the results are bit-identical for any number of threads and across repeated runs
// (batches sent to BLAS by $FLAME_EXT_BLEND_BLAS_BATCH make no such promise).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "blend/blend.h"
#include "blend/blend_checks.h"
#include "cpu_isa.h"
#include "cpu_output.h"
#include "cpu_parallel.h"

namespace flame_ext {
namespace {

// Batches of at least this many samples go to BLAS ($FLAME_EXT_BLEND_BLAS_BATCH; 0, the
// default: none do).
int64_t blas_batch() {
  static const int64_t batch = env_count("FLAME_EXT_BLEND_BLAS_BATCH", 0);
  return batch;
}
bool use_blas(int64_t B) { return blas_batch() > 0 && B >= blas_batch(); }

// Rows of dirs per forward task: the (B, rows) output block and the (P, rows) pose block
// stay in L1/L2 while the pose correctives are added.
constexpr int64_t kForwardRows = 256;
// blend_shared's forward: runs of chunks per thread (see blend_shared_cpu).
constexpr int64_t kSharedRunsPerThread = 4;
// Backward: partial sums per fixed chunk of rows, reduced in chunk order. Fixed chunks
// (not one per thread) make the result independent of the thread count. A chunk has
// ceil(N / kMaxChunks) rows, fewer if they would hold more than kBackwardChunkBytes of
// dirs and pose_dirs, never fewer than kBackwardMinRows. The tasks are (chunk, group of
// kBackwardGroup samples) pairs, chunk-major, handed to the threads a chunk at a time, so
// one thread runs the groups of a chunk in a row and re-reads its rows from L2. (Chunks
// that grow with the batch, to keep the (chunks, B, K) workspace small, were tried: every
// group then re-read a chunk larger than L2, and the time per sample rose 1.45x from
// B = 64 to 256 on one thread.
// The reduction of the workspace costs about 1 / kBackwardMinRows of the FMAs.)
constexpr int64_t kBackwardMinRows = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kBackwardChunkBytes = 256 << 10;
constexpr int64_t kBackwardGroup = 16;

#if defined(__GNUC__)
#define FLAME_CPU_INLINE inline __attribute__((always_inline))
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FLAME_BLEND_SHUFFLE 1
#endif
#endif
#else
#define FLAME_CPU_INLINE inline
#endif

// Rows per block of the grad_coeffs loop: one block's column slab (64 rows x 4 vectors,
// 16 KB in float32) stays in L1 while every sample tile reads it.
constexpr int64_t kAdjointRows = 64;

// What the hand loops read and write.
template <typename T>
struct ForwardArgs {
  const T* base;
  int64_t base_stride;  // between base rows (samples, or base_rows' picks); 0: one row
  // Sample b starts from row base_rows[b] of base (blend_shared with an identity per
  // sample); null: from row b.
  const int64_t* base_rows = nullptr;
  const T* dirs;
  int64_t dirs_stride;  // between rows; >= K when dirs is a column slice
  const T* coeffs;      // (B, K) contiguous
  const T* pose_dirs;
  int64_t pose_stride;  // between pose rows
  const T* pose_coeffs;  // (B, P) contiguous
  T* out;                // (B, N), rows out_stride apart (N but for a block of rows)
  int64_t out_stride;
  int64_t B, N, K, P;
  // Rows the caller reads next, prefetched into L2 a few lines at a time while this call
  // computes: `ahead_rows` rows of `ahead_row_bytes` from `ahead`, `ahead_stride` bytes
  // apart; none when ahead_rows is 0. Prefetch only: the same bits either way.
  const void* ahead;
  int64_t ahead_stride, ahead_row_bytes, ahead_rows;
};

template <typename T>
struct BackwardArgs {
  const T* grad_out;  // (B, N) contiguous
  const T* dirs;
  int64_t dirs_stride;
  const T* pose_dirs;
  int64_t pose_stride;
  T* partial_coeffs;       // (chunks, B, K), or null
  T* partial_pose_coeffs;  // (chunks, B, P), or null
  int64_t B, N, K, P;
};

// The storage of a half-precision dirs.
enum class HalfFormat { kFloat16, kBFloat16 };

// ---------------------------------------------------------------------------------------
// The hand loops, compiled once per instruction set.

#define FLAME_BLEND_ISA baseline
#define FLAME_BLEND_VECTOR_BYTES 16
#include "blend/blend_cpu_kernels.h"
#undef FLAME_BLEND_ISA
#undef FLAME_BLEND_VECTOR_BYTES

// The wider builds need `#pragma GCC target` (cpu_isa.h): g++ on x86-64 only; other
// compilers get the baseline build.
#if defined(FLAME_EXT_ISA_TARGET_PRAGMA)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FLAME_BLEND_ISA avx2
#define FLAME_BLEND_VECTOR_BYTES 32
#include "blend/blend_cpu_kernels.h"
#undef FLAME_BLEND_ISA
#undef FLAME_BLEND_VECTOR_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#define FLAME_BLEND_ISA avx512
#define FLAME_BLEND_VECTOR_BYTES 64
#include "blend/blend_cpu_kernels.h"
#undef FLAME_BLEND_ISA
#undef FLAME_BLEND_VECTOR_BYTES
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------------------------------
// Instruction-set dispatch, once per call.

template <typename T>
using ForwardFn = void (*)(const ForwardArgs<T>&, int64_t, int64_t);
template <typename T>
using BackwardFn = void (*)(const BackwardArgs<T>&, int64_t, int64_t, int64_t, int64_t,
                            int64_t);

// The build of the hand loops to run: cpu_isa() among the ones compiled here.
Isa blend_isa() {
#if defined(FLAME_EXT_ISA_TARGET_PRAGMA)
  return cpu_isa();
#else
  return Isa::kBaseline;
#endif
}

// The build among avx512::, avx2:: and baseline:: that blend_isa() picks.
template <typename Fn>
Fn pick_isa(Fn avx512_fn, Fn avx2_fn, Fn baseline_fn) {
  switch (blend_isa()) {
    case Isa::kAvx512:
      return avx512_fn;
    case Isa::kAvx2:
      return avx2_fn;
    default:
      return baseline_fn;
  }
}
#if defined(FLAME_EXT_ISA_TARGET_PRAGMA)
#define FLAME_BLEND_KERNEL(...) \
  pick_isa(&avx512::__VA_ARGS__, &avx2::__VA_ARGS__, &baseline::__VA_ARGS__)
#else
#define FLAME_BLEND_KERNEL(...) (&baseline::__VA_ARGS__)
#endif

template <typename T>
ForwardFn<T> forward_kernel() {
  return FLAME_BLEND_KERNEL(forward_rows<T>);
}

template <typename T>
BackwardFn<T> backward_kernel() {
  return FLAME_BLEND_KERNEL(backward_rows<T>);
}

template <typename T>
using SumFn = void (*)(const T*, int64_t, int64_t, int64_t, T*);

template <typename T>
SumFn<T> sum_kernel() {
  return FLAME_BLEND_KERNEL(sum_rows<T>);
}

template <typename T>
using WidenFn = void (*)(const uint16_t*, int64_t, int64_t, int64_t, T*, int64_t);

template <typename T, HalfFormat F>
WidenFn<T> widen_kernel() {
  return FLAME_BLEND_KERNEL(widen_rows<T, F>);
}

template <typename T>
WidenFn<T> widen_kernel(const at::Tensor& dirs) {
  return dirs.scalar_type() == at::kBFloat16 ? widen_kernel<T, HalfFormat::kBFloat16>()
                                             : widen_kernel<T, HalfFormat::kFloat16>();
}

// The bits of a half-precision dirs, and its row stride.
struct HalfRows {
  const uint16_t* data;
  int64_t stride;
};

HalfRows half_rows(const at::Tensor& dirs) {
  return {reinterpret_cast<const uint16_t*>(dirs.const_data_ptr()), blend::row_stride(dirs)};
}

// A thread's scratch block (widened rows, a shared row, a column sum), reused from call to
// call; one use at a time per thread.
template <typename T>
T* thread_block(int64_t values) {
  thread_local std::vector<T> block;
  if (int64_t(block.size()) < values) block.resize(values);
  return block.data();
}

// A half-precision dirs (float16 or bfloat16 storage: FlameTex's basis_dtype). Each task
// widens its rows, a chunk at a time, into a block of T in cache and runs the same loops on
// it, so dirs is read from memory at half the bytes and is never copied whole; the
// widening is one load and store per element of dirs, shared by all B samples.
template <typename T>
void forward_half(const ForwardArgs<T>& a, HalfRows dirs, WidenFn<T> widen,
                  ForwardFn<T> kernel, int64_t c0, int64_t c1) {
  T* block = thread_block<T>(kForwardRows * a.K);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kForwardRows, rows = std::min(kForwardRows, a.N - n0);
    if (a.K > 0) widen(dirs.data + n0 * dirs.stride, dirs.stride, rows, a.K, block, a.N - n0);
    ForwardArgs<T> chunk = a;
    chunk.base = a.base + n0;
    chunk.dirs = block;
    chunk.dirs_stride = a.K;
    if (a.P > 0) chunk.pose_dirs = a.pose_dirs + n0;
    chunk.out = a.out + n0;
    kernel(chunk, 0, rows);
  }
}

// The backward's tasks [t0, t1) over a half-precision dirs: the sample groups of a chunk
// run one after another, so its rows are widened once for all of them.
template <typename T>
void backward_half(const BackwardArgs<T>& a, HalfRows dirs, WidenFn<T> widen,
                   BackwardFn<T> kernel, int64_t rows, int64_t groups, int64_t t0,
                   int64_t t1) {
  T* block = a.partial_coeffs != nullptr ? thread_block<T>(rows * a.K) : nullptr;
  int64_t widened = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c = t / groups, g = t % groups;
    const int64_t m0 = c * rows, m1 = std::min(a.N, m0 + rows);
    if (block != nullptr && c != widened) {
      widen(dirs.data + m0 * dirs.stride, dirs.stride, m1 - m0, a.K, block, a.N - m0);
      widened = c;
    }
    BackwardArgs<T> chunk = a;
    chunk.grad_out = a.grad_out + m0;
    chunk.dirs = block;
    chunk.dirs_stride = a.K;
    if (a.pose_dirs != nullptr) chunk.pose_dirs = a.pose_dirs + m0;
    kernel(chunk, c, 0, m1 - m0, g * kBackwardGroup, std::min(a.B, (g + 1) * kBackwardGroup));
  }
}

// blend's arguments as the hand loops read them, but for base (left to the caller: null,
// stride 0). dirs is read through a widened block when it is half precision (null here).
template <typename T>
ForwardArgs<T> forward_args(const at::Tensor& dirs, const at::Tensor& coeffs,
                            const at::Tensor& pose_dirs, const at::Tensor& pose_coeffs,
                            at::Tensor& out, const blend::Sizes& s, bool half) {
  ForwardArgs<T> a{};
  a.dirs = half ? nullptr : dirs.const_data_ptr<T>();
  a.dirs_stride = blend::row_stride(dirs);
  a.coeffs = coeffs.const_data_ptr<T>();
  a.pose_dirs = s.P > 0 ? pose_dirs.const_data_ptr<T>() : nullptr;
  a.pose_stride = s.P > 0 ? blend::row_stride(pose_dirs) : 0;
  a.pose_coeffs = s.P > 0 ? pose_coeffs.const_data_ptr<T>() : nullptr;
  a.out = out.mutable_data_ptr<T>();
  a.out_stride = s.N;
  a.B = s.B;
  a.N = s.N;
  a.K = s.K;
  a.P = s.P;
  return a;
}

// The backward's row chunks (fixed by the sizes, never by the thread count: the partial
// sums and their order depend on them) and sample groups.
struct BackwardChunks {
  int64_t rows, chunks, groups;
};

inline BackwardChunks backward_chunks(const blend::Sizes& s, bool do_coeffs, bool do_pose,
                                      int64_t element_size) {
  const int64_t row_bytes =
      std::max<int64_t>(1, ((do_coeffs ? s.K : 0) + (do_pose ? s.P : 0)) * element_size);
  const int64_t rows = std::max(
      kBackwardMinRows,
      std::min((s.N + kMaxChunks - 1) / kMaxChunks, kBackwardChunkBytes / row_bytes));
  return {rows, (s.N + rows - 1) / rows, (s.B + kBackwardGroup - 1) / kBackwardGroup};
}

// The backward kernel's arguments for grad_out (B, N) against dirs and pose_dirs, partial
// sums into the (chunks, B, K) and (chunks, B, P) workspaces of the gradients asked for.
template <typename T>
BackwardArgs<T> backward_args(const at::Tensor& grad_out, const at::Tensor& dirs,
                              const at::Tensor& pose_dirs, const at::Tensor& partial_coeffs,
                              const at::Tensor& partial_pose, const blend::Sizes& s,
                              bool do_coeffs, bool do_pose, bool half) {
  BackwardArgs<T> a{};
  a.grad_out = grad_out.const_data_ptr<T>();
  a.dirs = do_coeffs && !half ? dirs.const_data_ptr<T>() : nullptr;
  a.dirs_stride = blend::row_stride(dirs);
  a.pose_dirs = do_pose ? pose_dirs.const_data_ptr<T>() : nullptr;
  a.pose_stride = do_pose ? blend::row_stride(pose_dirs) : 0;
  a.partial_coeffs = do_coeffs ? partial_coeffs.mutable_data_ptr<T>() : nullptr;
  a.partial_pose_coeffs = do_pose ? partial_pose.mutable_data_ptr<T>() : nullptr;
  a.B = s.B;
  a.N = s.N;
  a.K = s.K;
  a.P = s.P;
  return a;
}

// result = the sum of partial's (chunks, ...) slices in chunk order (vectorised over the
// outputs, not the chunks): the backward's last step.
template <typename T>
void sum_chunks(const at::Tensor& partial, at::Tensor& result) {
  const T* src = partial.const_data_ptr<T>();
  T* dst = result.mutable_data_ptr<T>();
  const int64_t count = result.numel(), chunks = partial.size(0);
  const SumFn<T> sum = sum_kernel<T>();
  at::parallel_for(0, count, 4096, [&](int64_t i0, int64_t i1) {
    sum(src + i0, count, chunks, i1 - i0, dst + i0);
  });
}

// ---------------------------------------------------------------------------------------
// The ops.

at::Tensor blend_cpu(const at::Tensor& base_in, const at::Tensor& dirs_in,
                     const at::Tensor& coeffs_in, const at::Tensor& pose_dirs_in,
                     const at::Tensor& pose_coeffs_in) {
  const blend::Sizes sizes =
      blend::check_forward(base_in, dirs_in, coeffs_in, pose_dirs_in, pose_coeffs_in);
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P;
  if (B == 0 || N == 0) return at::empty({B, N}, coeffs_in.options());
  // BLAS reads one dtype: a half-precision dirs always takes the hand loops.
  const bool half = blend::half_dirs(dirs_in);

  if (use_blas(B) && !half) {
    at::Tensor out = empty_output({B, N}, coeffs_in.options());
    at::addmm_out(out, base_in, coeffs_in, dirs_in.t());
    if (P > 0) out.addmm_(pose_coeffs_in, pose_dirs_in);
    return out;
  }

  const at::Tensor base2 = base_in.dim() == 1 ? base_in.unsqueeze(0) : base_in;
  const at::Tensor base = base2.stride(1) == 1 ? base2 : base2.contiguous();
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor coeffs = coeffs_in.contiguous();
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  const at::Tensor pose_coeffs = P > 0 ? pose_coeffs_in.contiguous() : pose_coeffs_in;
  at::Tensor out = empty_output({B, N}, coeffs.options());

  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "flame_ext::blend", [&] {
    ForwardArgs<scalar_t> a = forward_args<scalar_t>(dirs, coeffs, pose_dirs, pose_coeffs, out,
                                                      sizes, half);
    a.base = base.const_data_ptr<scalar_t>();
    a.base_stride = base.size(0) == 1 ? 0 : base.stride(0);
    const ForwardFn<scalar_t> kernel = forward_kernel<scalar_t>();
    const int64_t chunks = (N + kForwardRows - 1) / kForwardRows;
    // Tiny problems run inline: a task is worth it above ~64K FMAs.
    const int64_t per_chunk = std::max<int64_t>(1, kForwardRows * (K + P + 1) * B);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_chunk);
    if (half) {
      const HalfRows rows = half_rows(dirs);
      const WidenFn<scalar_t> widen = widen_kernel<scalar_t>(dirs);
      dynamic_parallel_for(chunks, grain, [&](int64_t c0, int64_t c1) {
        forward_half(a, rows, widen, kernel, c0, c1);
      });
      return;
    }
    dynamic_parallel_for(chunks, grain, [&](int64_t c0, int64_t c1) {
      kernel(a, c0 * kForwardRows, std::min(N, c1 * kForwardRows));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> blend_backward_cpu(const at::Tensor& grad_out_in,
                                                      const at::Tensor& dirs_in,
                                                      const at::Tensor& pose_dirs_in,
                                                      bool need_coeffs,
                                                      bool need_pose_coeffs) {
  const blend::Sizes sizes = blend::check_backward(grad_out_in, dirs_in, pose_dirs_in);
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

  const bool half = blend::half_dirs(dirs_in);
  if (use_blas(B) && !half) {
    if (do_coeffs) at::mm_out(grad_coeffs, grad_out_in, dirs_in);
    if (do_pose) at::mm_out(grad_pose, grad_out_in, pose_dirs_in.t());
    return {grad_coeffs, grad_pose};
  }

  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  const auto [rows, chunks, groups] =
      backward_chunks(sizes, do_coeffs, do_pose, grad_out.element_size());
  const auto options = grad_out.options();
  at::Tensor partial_coeffs = do_coeffs ? at::empty({chunks, B, K}, options) : at::Tensor();
  at::Tensor partial_pose = do_pose ? at::empty({chunks, B, P}, options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "flame_ext::blend_backward", [&] {
    const BackwardArgs<scalar_t> a = backward_args<scalar_t>(
        grad_out, dirs, pose_dirs, partial_coeffs, partial_pose, sizes, do_coeffs, do_pose, half);
    const BackwardFn<scalar_t> kernel = backward_kernel<scalar_t>();
    const int64_t per_task = std::max<int64_t>(
        1, rows * ((do_coeffs ? K : 0) + (do_pose ? P : 0)) * std::min(B, kBackwardGroup));
    // Task t: chunk t / groups, group t % groups. A block of tasks is whole chunks, so the
    // groups of a chunk run on one thread, one after another, and share its rows.
    const int64_t min_tasks = std::max<int64_t>(1, (int64_t(1) << 16) / per_task);
    const int64_t grain = (min_tasks + groups - 1) / groups * groups;
    const HalfRows half_table = half ? half_rows(dirs) : HalfRows{nullptr, 0};
    const WidenFn<scalar_t> widen = half ? widen_kernel<scalar_t>(dirs) : nullptr;
    dynamic_parallel_for(chunks * groups, grain, [&](int64_t t0, int64_t t1) {
      if (half) {
        backward_half(a, half_table, widen, kernel, rows, groups, t0, t1);
        return;
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / groups, g = t % groups;
        kernel(a, c, c * rows, std::min(N, (c + 1) * rows), g * kBackwardGroup,
               std::min(B, (g + 1) * kBackwardGroup));
      }
    });

    if (do_coeffs) sum_chunks<scalar_t>(partial_coeffs, grad_coeffs);
    if (do_pose) sum_chunks<scalar_t>(partial_pose, grad_pose);
  });
  return {grad_coeffs, grad_pose};
}

// blend_shared in one pass over the rows: a task's chunk of rows first blends the S shared
// rows (base + shared_coeffs @ shared_dirs^T, S samples) into a block in cache, then runs
// the per-sample blend with that block as its base, sample b starting from row
// identity[b] (row 0 without identity). Each table is read once per call and the shared
// rows never go to memory (two calls of blend read them back, and at small batches the
// second one finds shared_dirs' 18 MB of FLAME evicted the rest). Same kernels, same
// chunks, same order of summation: the bits of blend(blend(base, shared_dirs,
// shared_coeffs)[identity], dirs, coeffs, pose_dirs, pose_coeffs). A batch that
// $FLAME_EXT_BLEND_BLAS_BATCH sends to BLAS sends both products there, so the bits are
// those of the composition only where S is on the same side of that threshold as B.
at::Tensor blend_shared_cpu(const at::Tensor& base_in, const at::Tensor& shared_dirs_in,
                            const at::Tensor& shared_coeffs_in, const at::Tensor& dirs_in,
                            const at::Tensor& coeffs_in, const at::Tensor& pose_dirs_in,
                            const at::Tensor& pose_coeffs_in,
                            const std::optional<at::Tensor>& identity_in) {
  int64_t Ks = 0, S = 1;
  const blend::Sizes sizes = blend::check_shared_forward(
      base_in, shared_dirs_in, shared_coeffs_in, dirs_in, coeffs_in, pose_dirs_in,
      pose_coeffs_in, identity_in, &Ks, &S);
  const at::Tensor identity = blend::identity_or_none(identity_in);
  blend::check_identity_range(identity, S, "blend_shared");
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P;
  if (B == 0 || N == 0) return at::empty({B, N}, coeffs_in.options());

  if (use_blas(B)) {
    at::Tensor shaped = at::addmm(base_in.reshape({1, N}), shared_coeffs_in,
                                  shared_dirs_in.t());
    if (identity.defined()) shaped = at::index_select(shaped, 0, identity);
    at::Tensor out = empty_output({B, N}, coeffs_in.options());
    at::addmm_out(out, shaped, coeffs_in, dirs_in.t());
    if (P > 0) out.addmm_(pose_coeffs_in, pose_dirs_in);
    return out;
  }

  const at::Tensor base = base_in.reshape({1, N}).contiguous();
  const at::Tensor shared_dirs = blend::rows_readable(shared_dirs_in);
  const at::Tensor shared_coeffs = shared_coeffs_in.contiguous();
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor coeffs = coeffs_in.contiguous();
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  const at::Tensor pose_coeffs = P > 0 ? pose_coeffs_in.contiguous() : pose_coeffs_in;
  at::Tensor out = empty_output({B, N}, coeffs.options());

  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "flame_ext::blend_shared", [&] {
    // The shared rows: S samples, no pose correctives, written per chunk into a block of
    // S rows kForwardRows apart.
    ForwardArgs<scalar_t> shared = forward_args<scalar_t>(
        shared_dirs, shared_coeffs, pose_dirs, pose_coeffs, out, blend::Sizes{S, N, Ks, 0}, false);
    shared.base = base.const_data_ptr<scalar_t>();
    shared.out_stride = kForwardRows;
    // The batch, its base set per chunk to that block.
    ForwardArgs<scalar_t> a =
        forward_args<scalar_t>(dirs, coeffs, pose_dirs, pose_coeffs, out, sizes, false);
    a.base_stride = identity.defined() ? kForwardRows : 0;  // 0: one row for every sample
    a.base_rows = identity.defined() ? identity.const_data_ptr<int64_t>() : nullptr;
    const ForwardFn<scalar_t> kernel = forward_kernel<scalar_t>();
    const int64_t chunks = (N + kForwardRows - 1) / kForwardRows;
    const int64_t per_chunk = std::max<int64_t>(1, kForwardRows * ((K + P + 1) * B + Ks * S));
    // Runs of chunks, about kSharedRunsPerThread per thread: within a run, the batch's
    // blend of a chunk prefetches the next chunk's shared rows while it computes, and the
    // shared rows' blend the chunk's rows of dirs.
    const int64_t grain = std::max({int64_t(1), (int64_t(1) << 16) / per_chunk,
                                    chunks / (kSharedRunsPerThread * at::get_num_threads())});
    const int64_t elem = int64_t(sizeof(scalar_t));
    dynamic_parallel_for(chunks, grain, [&](int64_t c0, int64_t c1) {
      scalar_t* shaped = thread_block<scalar_t>(S * kForwardRows);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * kForwardRows, rows = std::min(kForwardRows, N - n0);
        ForwardArgs<scalar_t> row = shared;
        row.base += n0;
        row.dirs += n0 * shared.dirs_stride;
        row.out = shaped;
        if (K > 0) {
          row.ahead = a.dirs + n0 * a.dirs_stride;
          row.ahead_stride = a.dirs_stride * elem;
          row.ahead_row_bytes = K * elem;
          row.ahead_rows = rows;
        }
        kernel(row, 0, rows);
        ForwardArgs<scalar_t> chunk = a;
        chunk.base = shaped;
        chunk.dirs += n0 * a.dirs_stride;
        if (P > 0) chunk.pose_dirs += n0;
        chunk.out += n0;
        if (c + 1 < c1 && Ks > 0) {
          const int64_t next0 = n0 + kForwardRows;
          chunk.ahead = shared.dirs + next0 * shared.dirs_stride;
          chunk.ahead_stride = shared.dirs_stride * elem;
          chunk.ahead_row_bytes = Ks * elem;
          chunk.ahead_rows = std::min(kForwardRows, N - next0);
        }
        kernel(chunk, 0, rows);
      }
    });
  });
  return out;
}

// sums[s, 0:rows] = the sum over the samples b with identity[b] = s, in order of b, of
// grad[b, 0:rows] (rows ld apart); zero for an identity without samples.
template <typename T>
void sum_by_identity(const T* grad, int64_t ld, int64_t B, int64_t rows, const int64_t* identity,
                     int64_t S, T* sums) {
  std::fill(sums, sums + S * rows, T(0));
  for (int64_t b = 0; b < B; ++b) {
    T* dst = sums + identity[b] * rows;
    const T* src = grad + b * ld;
    for (int64_t r = 0; r < rows; ++r) dst[r] += src[r];
  }
}

// blend_shared_backward in one pass over the rows: the tasks are blend_backward's (chunk,
// sample group) pairs with its chunks, and the first group of each chunk also sums the
// chunk's grad_out over each shared row's samples (in order of the samples: the whole
// batch without identity) and runs the S-sample adjoint of shared_dirs on those sums.
// grad_coeffs and grad_pose_coeffs have the bits of blend_backward(grad_out, dirs,
// pose_dirs); grad_shared_coeffs[s] is (sum over identity[b] = s of grad_out[b]) @
// shared_dirs, independent of the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_shared_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& shared_dirs_in, const at::Tensor& dirs_in,
    const at::Tensor& pose_dirs_in, bool need_shared_coeffs, bool need_coeffs,
    bool need_pose_coeffs, const std::optional<at::Tensor>& identity_in, int64_t identities) {
  blend::SharedGrads grads = blend::shared_backward_outputs(
      grad_out_in, shared_dirs_in, dirs_in, pose_dirs_in, need_shared_coeffs, need_coeffs,
      need_pose_coeffs, identity_in, identities);
  blend::check_identity_range(grads.identity, grads.S, "blend_shared_backward");
  if (!grads.any()) return grads.result();
  const blend::Sizes sizes = grads.sizes;
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P, Ks = grads.Ks, S = grads.S;
  const bool do_shared = grads.do_shared, do_coeffs = grads.do_coeffs, do_pose = grads.do_pose;
  const at::Tensor& identity = grads.identity;

  if (use_blas(B)) {
    if (do_shared) {
      const at::Tensor sums =
          identity.defined()
              ? at::zeros({S, N}, grad_out_in.options()).index_add_(0, identity, grad_out_in)
              : grad_out_in.sum(0, true);
      at::mm_out(grads.shared, sums, shared_dirs_in);
    }
    if (do_coeffs) at::mm_out(grads.coeffs, grad_out_in, dirs_in);
    if (do_pose) at::mm_out(grads.pose, grad_out_in, pose_dirs_in.t());
    return grads.result();
  }

  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor shared_dirs = blend::rows_readable(shared_dirs_in);
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  // blend_backward's chunks, so that grad_coeffs and grad_pose_coeffs keep its bits.
  const auto [rows, chunks, groups] =
      backward_chunks(sizes, do_coeffs, do_pose, grad_out.element_size());
  const auto options = grad_out.options();
  at::Tensor partial_shared = do_shared ? at::empty({chunks, S, Ks}, options) : at::Tensor();
  at::Tensor partial_coeffs = do_coeffs ? at::empty({chunks, B, K}, options) : at::Tensor();
  at::Tensor partial_pose = do_pose ? at::empty({chunks, B, P}, options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "flame_ext::blend_shared_backward", [&] {
    const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
    const int64_t* id = identity.defined() ? identity.const_data_ptr<int64_t>() : nullptr;
    const BackwardArgs<scalar_t> a = backward_args<scalar_t>(
        grad_out, dirs, pose_dirs, partial_coeffs, partial_pose, sizes, do_coeffs, do_pose, false);
    BackwardArgs<scalar_t> shared{};
    shared.dirs = do_shared ? shared_dirs.const_data_ptr<scalar_t>() : nullptr;
    shared.dirs_stride = blend::row_stride(shared_dirs);
    shared.partial_coeffs = do_shared ? partial_shared.mutable_data_ptr<scalar_t>() : nullptr;
    shared.B = S;
    shared.K = Ks;
    const BackwardFn<scalar_t> kernel = backward_kernel<scalar_t>();
    const SumFn<scalar_t> sum_batch = sum_kernel<scalar_t>();
    const int64_t per_task = std::max<int64_t>(
        1, rows * ((do_coeffs ? K : 0) + (do_pose ? P : 0)) * std::min(B, kBackwardGroup) +
               (do_shared ? rows * (Ks * S + B) / groups : 0));
    const int64_t min_tasks = std::max<int64_t>(1, (int64_t(1) << 16) / per_task);
    const int64_t grain = (min_tasks + groups - 1) / groups * groups;
    dynamic_parallel_for(chunks * groups, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / groups, g = t % groups;
        const int64_t m0 = c * rows, m1 = std::min(N, m0 + rows);
        if (do_shared && g == 0) {
          scalar_t* sums = thread_block<scalar_t>(S * (m1 - m0));
          if (id != nullptr) {
            sum_by_identity(grad + m0, N, B, m1 - m0, id, S, sums);
          } else {
            sum_batch(grad + m0, N, B, m1 - m0, sums);
          }
          BackwardArgs<scalar_t> chunk = shared;
          chunk.grad_out = sums;
          chunk.dirs += m0 * shared.dirs_stride;
          chunk.N = m1 - m0;
          kernel(chunk, c, 0, m1 - m0, 0, S);
        }
        if (do_coeffs || do_pose) {
          kernel(a, c, m0, m1, g * kBackwardGroup, std::min(B, (g + 1) * kBackwardGroup));
        }
      }
    });

    if (do_shared) sum_chunks<scalar_t>(partial_shared, grads.shared);
    if (do_coeffs) sum_chunks<scalar_t>(partial_coeffs, grads.coeffs);
    if (do_pose) sum_chunks<scalar_t>(partial_pose, grads.pose);
  });
  return grads.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CPU, m) {
  m.impl("blend", &blend_cpu);
  m.impl("blend_backward", &blend_backward_cpu);
  m.impl("blend_shared", &blend_shared_cpu);
  m.impl("blend_shared_backward", &blend_shared_backward_cpu);
}

}  // namespace flame_ext
