// CUDA implementation of flame_ext::blend and flame_ext::blend_backward (schemas in
// csrc/registration.cpp, math in blend.h, argument checks in blend_checks.h).
//
// Small batches (the per-frame decoder call, B <= kSmallBatch): dirs is read once for all
// samples of a batch tile.
// - forward: one warp per R rows of dirs and S samples (R * S = 32); lanes stride along k,
//   so every load of a row is coalesced; each lane keeps the R x S partial dots in
//   registers, a butterfly of warp shuffles leaves lane l with the total of dot l, and the
//   lane adds base and the pose correctives and writes out[b, n].
// - backward: two deterministic stages, no atomics. grad_coeffs: a thread per column k and
//   a fixed chunk of rows sums grad_out[b, n] * dirs[n, k] over its rows into a workspace
//   (chunks, B, K); grad_pose_coeffs: the forward's warp dots over a chunk of n, into
//   (chunks, B, P); then one thread per output adds the chunks in order.
// Large batches: the product is a real GEMM and cuBLAS (at::addmm / at::mm) is the right
// tool; a hand-written kernel would be a slower GEMM. Two exceptions keep the hand
// kernels (deterministic, full fp32 at any batch): torch.use_deterministic_algorithms
// (ATen's CUDA GEMM raises there unless CUBLAS_WORKSPACE_CONFIG is set), and a batch
// too large for one launch's grid.y (the GEMM handles any size). With TF32 enabled
// (torch.backends.cuda.matmul.allow_tf32, off by default) the cuBLAS path follows it.
//
// Every launch is asynchronous on the current stream, allocates through the caching
// allocator and never reads device memory on the host: CUDA-graph capturable.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blend/blend.h"
#include "blend/blend_checks.h"

namespace flame_ext {
namespace {

// Largest batch for the hand kernels; above it, cuBLAS. A first guess (dirs is read once per
// tile of 8 samples, from L2 after the first tile): to be tuned on hardware.
constexpr int64_t kSmallBatch = 16;
// Samples per tile, at most (the grid's y or z dimension walks the tiles).
constexpr int kMaxTileSamples = 8;

constexpr int kWarp = 32;
constexpr int kForwardWarps = 8;    // warps per block, forward and grad_pose kernels
constexpr int kAdjointThreads = 128;  // threads (columns) per block, grad_coeffs kernel
constexpr int kReduceThreads = 256;
// Backward chunks: at least kMinChunkRows rows, at most kMaxChunks chunks, and at most
// kMaxWorkspace values in the (chunks, B, max(K, P)) workspace (large batches reach the
// hand kernels in deterministic mode only: fewer, longer chunks there).
constexpr int64_t kMinChunkRows = 32;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMaxWorkspace = int64_t(1) << 22;
constexpr int64_t kMaxGridY = 65535;  // also the limit of grid.z

// Rows of dirs per warp for a tile of S samples: R * S = M <= 32 partial dots per lane.
template <int S>
constexpr int tile_rows() {
  return S >= 8 ? 4 : 8;
}

// Butterfly reduce-scatter of M values (a power of two <= 32) over the lanes of a warp: on
// return every lane of the group g = lane / (32 / M) holds the sum over all 32 lanes of
// v[g]. The first log2(M) steps halve the values each lane keeps (sending the other half
// to its partner), the rest are plain butterfly sums inside a group; 2M - 1 + log2(32 / M)
// shuffles in a fixed order, so the result is deterministic (and identical across a
// group: a + b == b + a). All 32 lanes must call it.
template <int Half, int Offset, typename T, int M>
__device__ __forceinline__ void scatter_steps(T (&v)[M], int lane) {
  if constexpr (Half >= 1) {
    const bool upper = (lane & Offset) != 0;
#pragma unroll
    for (int i = 0; i < Half; ++i) {
      // Keep the half of the values this lane is responsible for, send the other half.
      const T send = upper ? v[i] : v[i + Half];
      const T keep = upper ? v[i + Half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Offset);
    }
    scatter_steps<Half / 2, Offset / 2>(v, lane);
  }
}

template <typename T, int M>
__device__ __forceinline__ T warp_transpose_sum(T (&v)[M], int lane) {
  static_assert(M >= 1 && M <= kWarp && (M & (M - 1)) == 0, "M: a power of two <= 32");
  scatter_steps<M / 2, kWarp / 2>(v, lane);
#pragma unroll
  for (int offset = kWarp / M / 2; offset >= 1; offset /= 2)
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  return v[0];
}

// The R x S dot products (R = tile_rows<S>()) of rows x[n0 .. n0+R) (row stride ldx) with
// rows y[b0 .. b0+S) (row stride ldy) over k in [k0, k1), computed by one warp with lanes
// along k (coalesced loads). Returns, in every lane of group g = lane / (32 / (R S)), dot
// (r, s) = (g / S, g % S). Rows and samples past the end (n >= rows, b >= samples) read
// the last valid one instead: their results are discarded by the caller.
template <typename T, int S>
__device__ __forceinline__ T warp_dots(const T* __restrict__ x, int64_t ldx, int64_t n0,
                                       int64_t rows, const T* __restrict__ y, int64_t ldy,
                                       int64_t b0, int64_t samples, int64_t k0, int64_t k1,
                                       int lane) {
  constexpr int R = tile_rows<S>();
  const T* xr[R];
  const T* ys[S];
#pragma unroll
  for (int r = 0; r < R; ++r) xr[r] = x + min(n0 + r, rows - 1) * ldx;
#pragma unroll
  for (int s = 0; s < S; ++s) ys[s] = y + min(b0 + s, samples - 1) * ldy;
  T acc[R][S];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int s = 0; s < S; ++s) acc[r][s] = T(0);
  for (int64_t k = k0 + lane; k < k1; k += kWarp) {
    T d[R], c[S];
#pragma unroll
    for (int r = 0; r < R; ++r) d[r] = __ldg(xr[r] + k);
#pragma unroll
    for (int s = 0; s < S; ++s) c[s] = __ldg(ys[s] + k);
    blend::outer_step(d, c, acc);
  }
  return warp_transpose_sum(reinterpret_cast<T(&)[R * S]>(acc), lane);
}

// Which dot a lane holds after warp_dots, and whether it is the one lane of its group that
// writes it.
template <int S>
struct LaneDot {
  static constexpr int kGroup = kWarp / (tile_rows<S>() * S);
  int r, s;
  bool writer;
  __device__ explicit LaneDot(int lane)
      : r(lane / kGroup / S), s(lane / kGroup % S), writer(lane % kGroup == 0) {}
};

// out[b, n] = base[b, n] + dot(dirs[n, :], coeffs[b, :]) + sum_p pose_coeffs[b, p] *
// pose_dirs[p, n]. Grid: x over warps of R rows, y over tiles of S samples.
template <typename T, int S>
__global__ void blend_forward_kernel(const T* __restrict__ base, int64_t base_stride,
                                     const T* __restrict__ dirs, int64_t dirs_stride,
                                     const T* __restrict__ coeffs,
                                     const T* __restrict__ pose_dirs, int64_t pose_stride,
                                     const T* __restrict__ pose_coeffs, T* __restrict__ out,
                                     int64_t B, int64_t N, int64_t K, int64_t P) {
  constexpr int R = tile_rows<S>();
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t n0 = warp * R;
  if (n0 >= N) return;  // uniform across the warp: the shuffles below see all 32 lanes
  const int64_t b0 = int64_t(blockIdx.y) * S;
  const T dot = warp_dots<T, S>(dirs, dirs_stride, n0, N, coeffs, K, b0, B, 0, K, lane);
  const LaneDot<S> mine(lane);
  const int64_t n = n0 + mine.r, b = b0 + mine.s;
  if (mine.writer && n < N && b < B) {
    T value = base[b * base_stride + n] + dot;
    if (P > 0) value = blend::pose_sum(value, pose_coeffs + b * P, pose_dirs + n, pose_stride, P);
    out[b * N + n] = value;
  }
}

// partial[chunk, b, k] = sum over n in the chunk of grad_out[b, n] * dirs[n, k]. Grid: x over
// blocks of columns, y over chunks, z over tiles of S samples.
template <typename T, int S>
__global__ void adjoint_coeffs_kernel(const T* __restrict__ grad_out,
                                      const T* __restrict__ dirs, int64_t dirs_stride,
                                      T* __restrict__ partial, int64_t B, int64_t N, int64_t K,
                                      int64_t chunk_rows) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;  // no block-level synchronisation below
  const int64_t chunk = blockIdx.y;
  const int64_t b0 = int64_t(blockIdx.z) * S;
  const int64_t n0 = chunk * chunk_rows, n1 = min(N, n0 + chunk_rows);
  const T* g[S];
#pragma unroll
  for (int s = 0; s < S; ++s) g[s] = grad_out + min(b0 + s, B - 1) * N;
  T acc[S][1];
#pragma unroll
  for (int s = 0; s < S; ++s) acc[s][0] = T(0);
#pragma unroll 4
  for (int64_t n = n0; n < n1; ++n) {
    const T d[1] = {__ldg(dirs + n * dirs_stride + k)};  // coalesced along k
    T gs[S];
#pragma unroll
    for (int s = 0; s < S; ++s) gs[s] = __ldg(g[s] + n);  // one address per warp: broadcast
    blend::scaled_step(gs, d, acc);
  }
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (b0 + s < B) partial[(chunk * B + b0 + s) * K + k] = acc[s][0];
}

// partial[chunk, b, p] = dot(pose_dirs[p, chunk], grad_out[b, chunk]): the forward's warp
// dots with pose rows for dirs rows and grad_out rows for coeffs, over one chunk of n.
// Grid: x over warps of R pose rows, y over chunks, z over tiles of S samples.
template <typename T, int S>
__global__ void adjoint_pose_kernel(const T* __restrict__ grad_out,
                                    const T* __restrict__ pose_dirs, int64_t pose_stride,
                                    T* __restrict__ partial, int64_t B, int64_t N, int64_t P,
                                    int64_t chunk_rows) {
  constexpr int R = tile_rows<S>();
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t p0 = warp * R;
  if (p0 >= P) return;  // uniform across the warp
  const int64_t chunk = blockIdx.y;
  const int64_t b0 = int64_t(blockIdx.z) * S;
  const int64_t n0 = chunk * chunk_rows, n1 = min(N, n0 + chunk_rows);
  const T dot = warp_dots<T, S>(pose_dirs, pose_stride, p0, P, grad_out, N, b0, B, n0, n1, lane);
  const LaneDot<S> mine(lane);
  const int64_t p = p0 + mine.r, b = b0 + mine.s;
  if (mine.writer && p < P && b < B) partial[(chunk * B + b) * P + p] = dot;
}

// out[i] = sum over chunks c, in order, of partial[c, i].
template <typename T>
__global__ void sum_chunks_kernel(const T* __restrict__ partial, int64_t chunks, int64_t count,
                                  T* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    T sum = partial[i];
    for (int64_t c = 1; c < chunks; ++c) sum += partial[c * count + i];
    out[i] = sum;
  }
}

// Samples per tile: the smallest power of two >= min(B, kMaxTileSamples), so a single
// sample does not pay for eight.
int tile_samples(int64_t B) {
  int s = 1;
  while (s < kMaxTileSamples && s < B) s *= 2;
  return s;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether batch B goes to cuBLAS rather than the hand kernels (see the file comment).
bool use_gemm(int64_t B) {
  if (B <= kSmallBatch) return false;
  const bool fits_grid = ceil_div(B, kMaxTileSamples) <= kMaxGridY;
  return !(at::globalContext().deterministicAlgorithms() && fits_grid);
}

// Calls f(std::integral_constant<int, S>) for the run-time tile size S in {1, 2, 4, 8}.
template <typename F>
void with_tile_samples(int s, F&& f) {
  switch (s) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    default:
      f(std::integral_constant<int, 8>{});
      break;
  }
}

at::Tensor blend_cuda(const at::Tensor& base_in, const at::Tensor& dirs_in,
                      const at::Tensor& coeffs_in, const at::Tensor& pose_dirs_in,
                      const at::Tensor& pose_coeffs_in) {
  const blend::Sizes sizes =
      blend::check_forward(base_in, dirs_in, coeffs_in, pose_dirs_in, pose_coeffs_in);
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P;
  const c10::cuda::CUDAGuard guard(coeffs_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (B == 0 || N == 0) return at::empty({B, N}, coeffs_in.options());

  if (use_gemm(B)) {
    at::Tensor out = at::addmm(base_in, coeffs_in, dirs_in.t());
    if (P > 0) out.addmm_(pose_coeffs_in, pose_dirs_in);
    return out;
  }

  const at::Tensor base2 = base_in.dim() == 1 ? base_in.unsqueeze(0) : base_in;
  const at::Tensor base = base2.stride(1) == 1 ? base2 : base2.contiguous();
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor coeffs = coeffs_in.contiguous();
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  const at::Tensor pose_coeffs = P > 0 ? pose_coeffs_in.contiguous() : pose_coeffs_in;
  at::Tensor out = at::empty({B, N}, coeffs.options());
  const int64_t base_stride = base.size(0) == 1 ? 0 : base.stride(0);
  const int64_t dirs_stride = blend::row_stride(dirs);
  const int64_t pose_stride = P > 0 ? blend::row_stride(pose_dirs) : 0;
  const int S = tile_samples(B);

  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "flame_ext::blend", [&] {
    const scalar_t* pose_dirs_ptr = P > 0 ? pose_dirs.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pose_coeffs_ptr = P > 0 ? pose_coeffs.const_data_ptr<scalar_t>() : nullptr;
    with_tile_samples(S, [&](auto tile) {
      constexpr int kS = decltype(tile)::value;
      constexpr int kR = tile_rows<kS>();
      const int64_t blocks = ceil_div(ceil_div(N, kR), kForwardWarps);
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "blend: N = ", N,
                  " is too large for one launch");
      const dim3 grid(unsigned(blocks), unsigned(ceil_div(B, kS)));
      blend_forward_kernel<scalar_t, kS><<<grid, kForwardWarps * kWarp, 0, stream>>>(
          base.const_data_ptr<scalar_t>(), base_stride, dirs.const_data_ptr<scalar_t>(),
          dirs_stride, coeffs.const_data_ptr<scalar_t>(), pose_dirs_ptr, pose_stride,
          pose_coeffs_ptr, out.mutable_data_ptr<scalar_t>(), B, N, K, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> blend_backward_cuda(const at::Tensor& grad_out_in,
                                                       const at::Tensor& dirs_in,
                                                       const at::Tensor& pose_dirs_in,
                                                       bool need_coeffs,
                                                       bool need_pose_coeffs) {
  const blend::Sizes sizes = blend::check_backward(grad_out_in, dirs_in, pose_dirs_in);
  const int64_t B = sizes.B, N = sizes.N, K = sizes.K, P = sizes.P;
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
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

  if (use_gemm(B)) {
    if (do_coeffs) at::mm_out(grad_coeffs, grad_out_in, dirs_in);
    if (do_pose) at::mm_out(grad_pose, grad_out_in, pose_dirs_in.t());
    return {grad_coeffs, grad_pose};
  }

  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor dirs = blend::rows_readable(dirs_in);
  const at::Tensor pose_dirs = P > 0 ? blend::rows_readable(pose_dirs_in) : pose_dirs_in;
  const int64_t max_chunks =
      std::clamp<int64_t>(kMaxWorkspace / (B * std::max(K, P)), 1, kMaxChunks);
  const int64_t chunk_rows = std::max(kMinChunkRows, ceil_div(N, max_chunks));
  const int64_t chunks = ceil_div(N, chunk_rows);
  const auto options = grad_out.options();
  const at::Tensor partial_coeffs =
      do_coeffs ? at::empty({chunks, B, K}, options) : at::Tensor();
  const at::Tensor partial_pose = do_pose ? at::empty({chunks, B, P}, options) : at::Tensor();
  const int S = tile_samples(B);

  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "flame_ext::blend_backward", [&] {
    const scalar_t* grad_ptr = grad_out.const_data_ptr<scalar_t>();
    auto reduce = [&](const at::Tensor& partial, at::Tensor& result) {
      const int64_t count = result.numel();
      const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(count, kReduceThreads), 4096));
      sum_chunks_kernel<scalar_t><<<blocks, kReduceThreads, 0, stream>>>(
          partial.const_data_ptr<scalar_t>(), chunks, count, result.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_tile_samples(S, [&](auto tile) {
      constexpr int kS = decltype(tile)::value;
      constexpr int kR = tile_rows<kS>();
      if (do_coeffs) {
        const dim3 grid(unsigned(ceil_div(K, kAdjointThreads)), unsigned(chunks),
                        unsigned(ceil_div(B, kS)));
        adjoint_coeffs_kernel<scalar_t, kS><<<grid, kAdjointThreads, 0, stream>>>(
            grad_ptr, dirs.const_data_ptr<scalar_t>(), blend::row_stride(dirs),
            partial_coeffs.mutable_data_ptr<scalar_t>(), B, N, K, chunk_rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (do_pose) {
        const int64_t warps = ceil_div(P, kR);
        const int threads = int(std::min<int64_t>(warps, kForwardWarps)) * kWarp;
        const dim3 grid(unsigned(ceil_div(warps * kWarp, threads)), unsigned(chunks),
                        unsigned(ceil_div(B, kS)));
        adjoint_pose_kernel<scalar_t, kS><<<grid, threads, 0, stream>>>(
            grad_ptr, pose_dirs.const_data_ptr<scalar_t>(), blend::row_stride(pose_dirs),
            partial_pose.mutable_data_ptr<scalar_t>(), B, N, P, chunk_rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (do_coeffs) reduce(partial_coeffs, grad_coeffs);
    if (do_pose) reduce(partial_pose, grad_pose);
  });
  return {grad_coeffs, grad_pose};
}

}  // namespace

TORCH_LIBRARY_IMPL(flame_ext, CUDA, m) {
  m.impl("blend", &blend_cuda);
  m.impl("blend_backward", &blend_backward_cuda);
}

}  // namespace flame_ext
