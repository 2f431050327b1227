// The CUDA kernels of the blend op family and their launch plans (the launchers are in
// blend.cu, the per-element math in blend.h).
//
// Small batches (the per-frame decoder call, B <= kSmallBatch): dirs is read once for all
// samples of a batch tile.
// - forward: one warp per R rows of dirs and S samples (R * S <= 32: R = 8 below 8 samples,
//   4 from 8; see tile_rows); lanes stride along k,
//   so every load of a row is coalesced; each lane keeps the R x S partial dots in
//   registers, a butterfly of warp shuffles leaves lane l with the total of dot l, and the
//   lane adds base and the pose correctives and writes out[b, n].
// - backward: two deterministic stages, no atomics. grad_coeffs: a thread per column k and
//   a fixed chunk of rows sums grad_out[b, n] * dirs[n, k] over its rows into a workspace
//   (chunks, B, K); grad_pose_coeffs: the forward's warp dots over a chunk of n, into
//   (chunks, B, P); then one thread per output adds the chunks in order.
// Large batches go to cuBLAS (blend_use_gemm; see blend.cu).
//
// dirs may be stored in half precision (D = c10::Half or c10::BFloat16, FlameTex's
// basis_dtype): each value is widened to T where it is loaded; everything else is T.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "blend/blend.h"
#include "common.h"
#include "launch.h"

namespace flame_ext {
namespace blend_kernels {

// Largest batch for the hand kernels; above it, cuBLAS. A first guess (dirs is read once per
// tile of 8 samples, from L2 after the first tile): to be tuned on hardware.
constexpr int64_t kSmallBatch = 16;
// Samples per tile, at most (the grid's y or z dimension walks the tiles).
constexpr int kMaxTileSamples = 8;

constexpr int kWarp = 32;
constexpr int kForwardWarps = 8;    // warps per block, forward and grad_pose kernels
constexpr int kAdjointThreads = 128;  // threads (columns) per block, grad_coeffs kernel
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxReduceBlocks = 4096;  // sum_chunks_kernel strides over the rest
// Backward chunks: at least kMinChunkRows rows, at most kMaxChunks chunks, and at most
// kMaxWorkspace values in the (chunks, B, max(K, P)) workspace (large batches reach the
// hand kernels in deterministic mode only: fewer, longer chunks there).
constexpr int64_t kMinChunkRows = 32;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMaxWorkspace = int64_t(1) << 22;

// ---------------------------------------------------------------------------------------
// Kernels.

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

// A value of dirs (or of any T table) as T, through the read-only cache; a half-precision
// one is loaded as its bits and widened exactly.
template <typename T, typename D>
__device__ __forceinline__ T load_as(const D* p) {
  if constexpr (std::is_same_v<T, D>) {
    return __ldg(p);
  } else {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    return static_cast<T>(static_cast<float>(D(bits, D::from_bits())));
  }
}

// The R x S dot products (R = tile_rows<S>()) of rows x[n0 .. n0+R) (row stride ldx) with
// rows y[b0 .. b0+S) (row stride ldy) over k in [k0, k1), computed by one warp with lanes
// along k (coalesced loads). Returns, in every lane of group g = lane / (32 / (R S)), dot
// (r, s) = (g / S, g % S). Rows and samples past the end (n >= rows, b >= samples) read
// the last valid one instead: their results are discarded by the caller.
template <typename T, int S, typename X>
__device__ __forceinline__ T warp_dots(const X* __restrict__ x, int64_t ldx, int64_t n0,
                                       int64_t rows, const T* __restrict__ y, int64_t ldy,
                                       int64_t b0, int64_t samples, int64_t k0, int64_t k1,
                                       int lane) {
  constexpr int R = tile_rows<S>();
  const X* xr[R];
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
    for (int r = 0; r < R; ++r) d[r] = load_as<T>(xr[r] + k);
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
template <typename T, int S, typename D>
__global__ void blend_forward_kernel(const T* __restrict__ base, int64_t base_stride,
                                     const D* __restrict__ dirs, int64_t dirs_stride,
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
template <typename T, int S, typename D>
__global__ void adjoint_coeffs_kernel(const T* __restrict__ grad_out,
                                      const D* __restrict__ dirs, int64_t dirs_stride,
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
    const T d[1] = {load_as<T>(dirs + n * dirs_stride + k)};  // coalesced along k
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

// ---------------------------------------------------------------------------------------
// Launch plans (host code).

// Samples per tile: the smallest power of two >= min(B, kMaxTileSamples), so a single
// sample does not pay for eight.
inline int tile_samples(int64_t B) {
  int s = 1;
  while (s < kMaxTileSamples && s < B) s *= 2;
  return s;
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

// Whether batch B goes to cuBLAS rather than the hand kernels: above kSmallBatch, unless
// torch.use_deterministic_algorithms is on (`deterministic`): then the hand kernels serve
// every batch, in slices of at most blend_batch_slice samples per launch.
inline bool blend_use_gemm(int64_t B, bool deterministic) {
  return B > kSmallBatch && !deterministic;
}

// Samples per launch of the hand kernels with tiles of S samples: as many tiles as the
// grid's y (forward) or z (backward) dimension holds; the backward also keeps its
// (chunks, slice, max(K, P)) workspace within kMaxWorkspace values with at least two
// chunks of rows.
inline int64_t blend_forward_slice(int S, const DeviceLimits& limits) {
  return S * limits.max_grid_y;
}

inline int64_t blend_backward_slice(int S, int64_t K, int64_t P, const DeviceLimits& limits) {
  const int64_t by_workspace = kMaxWorkspace / (2 * std::max<int64_t>({K, P, 1})) / S * S;
  return std::max<int64_t>(S, std::min<int64_t>(S * limits.max_grid_z, by_workspace));
}

// blend_forward_kernel<T, S>: x over blocks of kForwardWarps warps of R rows, y over tiles
// of S samples.
template <int S>
LaunchPlan blend_forward_plan(int64_t B, int64_t N, const DeviceLimits& limits) {
  constexpr int R = tile_rows<S>();
  const int64_t blocks = ceil_div(ceil_div(N, R), kForwardWarps);
  TORCH_CHECK(blocks <= limits.max_grid_x, "blend: N = ", N, " is too large for one launch");
  const int64_t tiles = ceil_div(B, S);
  TORCH_CHECK(tiles <= limits.max_grid_y, "blend: B = ", B, " is too large for one launch");
  return {"blend_forward_kernel", dim3(unsigned(blocks), unsigned(tiles)),
          dim3(kForwardWarps * kWarp)};
}

// Rows per chunk of the backward's partial sums, and the number of chunks (the grid's y
// dimension of both adjoint kernels).
struct BackwardChunks {
  int64_t rows;
  int64_t count;
};

inline BackwardChunks blend_backward_chunks(int64_t B, int64_t N, int64_t K, int64_t P,
                                            const DeviceLimits& limits) {
  const int64_t width = std::max({K, P, int64_t(1)});
  const int64_t max_chunks = std::clamp<int64_t>(kMaxWorkspace / (B * width), 1,
                                                 std::min(kMaxChunks, limits.max_grid_y));
  const int64_t rows = std::max(kMinChunkRows, ceil_div(N, max_chunks));
  return {rows, ceil_div(N, rows)};
}

// adjoint_coeffs_kernel<T, S>: x over blocks of columns, y over chunks, z over tiles of S
// samples.
template <int S>
LaunchPlan adjoint_coeffs_plan(int64_t B, int64_t K, const BackwardChunks& chunks,
                               const DeviceLimits& limits) {
  const int64_t tiles = ceil_div(B, S);
  TORCH_CHECK(tiles <= limits.max_grid_z, "blend_backward: B = ", B,
              " is too large for one launch");
  return {"adjoint_coeffs_kernel",
          dim3(unsigned(ceil_div(K, kAdjointThreads)), unsigned(chunks.count), unsigned(tiles)),
          dim3(kAdjointThreads)};
}

// adjoint_pose_kernel<T, S>: x over warps of R pose rows (fewer warps per block when P is
// small), y over chunks, z over tiles of S samples.
template <int S>
LaunchPlan adjoint_pose_plan(int64_t B, int64_t P, const BackwardChunks& chunks,
                             const DeviceLimits& limits) {
  constexpr int R = tile_rows<S>();
  const int64_t warps = ceil_div(P, R);
  const int threads = int(std::min<int64_t>(warps, kForwardWarps)) * kWarp;
  const int64_t tiles = ceil_div(B, S);
  TORCH_CHECK(tiles <= limits.max_grid_z, "blend_backward: B = ", B,
              " is too large for one launch");
  return {"adjoint_pose_kernel",
          dim3(unsigned(ceil_div(warps * kWarp, threads)), unsigned(chunks.count),
               unsigned(tiles)),
          dim3(threads)};
}

// sum_chunks_kernel<T> over `count` outputs: a grid-stride loop, so the grid is capped.
inline LaunchPlan sum_chunks_plan(int64_t count, const DeviceLimits& limits) {
  const int64_t blocks =
      std::min({ceil_div(count, kReduceThreads), kMaxReduceBlocks, limits.max_grid_x});
  return {"sum_chunks_kernel", dim3(unsigned(blocks)), dim3(kReduceThreads)};
}

}  // namespace blend_kernels
}  // namespace flame_ext
