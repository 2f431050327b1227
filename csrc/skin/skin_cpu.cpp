// CPU implementation of the skin op family: skin (+ backward), one vertex per loop
// iteration, or with AVX-512 one vector of 16 vertices (8 in float64) per iteration. The
// math is in skin.h; this file checks inputs, splits the work over threads and, for the
// reduction of grad_transforms over vertices, fixes the summation order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "cpu_output.h"
#include "cpu_parallel.h"
// The AVX-512 loops below instantiate skin.h's functions for 64-byte vectors; flatten
// inlines every call into AVX-512 code, so GCC's note that such a function's ABI differs
// without AVX-512 concerns no call that is made.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "skin/skin.h"
#include "skin/skin_checks.h"

namespace flame_ext {
namespace {

// Vertices per partial sum of grad_transforms. Fixed (not derived from the thread count)
// so that the summation order, and so the result, is the same on every run for any
// thread count (each build of the loops, AVX-512 or narrower, has its own order).
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

#if defined(FLAME_EXT_ISA_TARGET_ATTRIBUTE) && defined(__x86_64__)
#define FLAME_SKIN_AVX512 1
bool use_avx512() { return cpu_isa() >= Isa::kAvx512; }
#else
#define FLAME_SKIN_AVX512 0
#endif

#if FLAME_SKIN_AVX512
// The AVX-512 loops put kLanes vertices of one sample side by side, one per lane, and run
// skin.h's per-vertex functions on whole vectors: scalar_t is the vector of the lanes'
// scalars and a transform entry is broadcast to every lane, so each lane does the
// 4-wide loop's products and sums in the same order (where the compiler fuses a multiply
// and an add may differ). Only grad_transforms' sum over vertices is regrouped, by lane
// (skin_backward_chunk_avx512). A task takes a tile of vertices for a run of
// samples: the tile's weights are transposed to lane order once and reused for every
// sample. The vertex transforms (and their gradient), 16 scalars per vertex in memory,
// are handled a whole 4x4 per vector instead.
// Vertices per forward task, a multiple of kLanes. Each (sample, tile) first broadcasts
// the sample's transforms (16 J vectors); at 128 vertices that took about a third of the
// forward (perf, FLAME on an Intel Xeon), at 512 it is a few percent.
constexpr int kTile = 512;
constexpr int kSampleRun = 16;  // samples per task

// Index vectors that turn kLanes (x, y, z) triples, three vectors as they lie in memory,
// into one vector per coordinate and back, two two-source permutes per vector. Position
// p = 3 l + c of the triples is coordinate c of lane l.
template <typename index, int L>
struct TripleShuffles {
  index split_ab[3][L], split_c[3][L];  // coordinate c from (vector 0, vector 1), then 2
  index join_xy[3][L], join_z[3][L];    // memory vector m from (x, y), then z
  constexpr TripleShuffles() : split_ab{}, split_c{}, join_xy{}, join_z{} {
    for (int c = 0; c < 3; ++c)
      for (int l = 0; l < L; ++l) {
        const int p = 3 * l + c;
        split_ab[c][l] = p < 2 * L ? p : 0;
        split_c[c][l] = p < 2 * L ? l : L + p - 2 * L;
      }
    for (int m = 0; m < 3; ++m)
      for (int i = 0; i < L; ++i) {
        const int q = m * L + i, l = q / 3, c = q % 3;
        join_xy[m][i] = c == 0 ? l : c == 1 ? L + l : 0;
        join_z[m][i] = c == 2 ? L + l : i;
      }
  }
};

// One AVX-512 vector of scalar_t (16 floats or 8 doubles) and the few operations the loops
// need on it; arithmetic is the vector extension's operators.
template <typename scalar_t>
struct Lanes {
  typedef scalar_t vec __attribute__((vector_size(64)));
  using index = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  static constexpr int kLanes = 64 / sizeof(scalar_t);
  static constexpr TripleShuffles<index, kLanes> kTriples{};
  FLAME_TARGET_AVX512 static vec load(const scalar_t* p) {
    vec x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  FLAME_TARGET_AVX512 static void store(scalar_t* p, vec x) { std::memcpy(p, &x, sizeof(x)); }
  // A store that bypasses the caches (p 64-byte aligned); _mm_sfence() orders it.
  FLAME_TARGET_AVX512 static void stream(scalar_t* p, vec x) {
    if constexpr (sizeof(scalar_t) == 4) {
      __m512 value;
      std::memcpy(&value, &x, sizeof(value));
      _mm512_stream_ps(reinterpret_cast<float*>(p), value);
    } else {
      __m512d value;
      std::memcpy(&value, &x, sizeof(value));
      _mm512_stream_pd(reinterpret_cast<double*>(p), value);
    }
  }
  FLAME_TARGET_AVX512 static vec splat(scalar_t s) { return vec{} + s; }
  // Lane i of the result: lane idx[i] of the 2 kLanes lanes of (a, b).
  FLAME_TARGET_AVX512 static vec permute(vec a, const index* idx, vec b) {
    const __m512i i = _mm512_loadu_si512(idx);
    if constexpr (sizeof(scalar_t) == 4)
      return _mm512_permutex2var_ps(a, i, b);
    else
      return _mm512_permutex2var_pd(a, i, b);
  }
  // The (x, y, z) of `lanes` <= kLanes triples at src, one vector per coordinate (the
  // missing lanes 0), into p.
  FLAME_TARGET_AVX512 static void load_triples(const scalar_t* src, int lanes, vec* p) {
    alignas(64) scalar_t tail[3 * kLanes];
    if (lanes < kLanes) {
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, src, sizeof(scalar_t) * 3 * lanes);
      src = tail;
    }
    const vec m0 = load(src), m1 = load(src + kLanes), m2 = load(src + 2 * kLanes);
    for (int c = 0; c < 3; ++c)
      p[c] = permute(permute(m0, kTriples.split_ab[c], m1), kTriples.split_c[c], m2);
  }
  // The reverse: the first `lanes` triples of p written to dst.
  FLAME_TARGET_AVX512 static void store_triples(const vec* p, int lanes, scalar_t* dst) {
    alignas(64) scalar_t tail[3 * kLanes];
    scalar_t* to = lanes < kLanes ? tail : dst;
    for (int m = 0; m < 3; ++m)
      store(to + m * kLanes,
            permute(permute(p[0], kTriples.join_xy[m], p[1]), kTriples.join_z[m], p[2]));
    if (lanes < kLanes) std::memcpy(dst, tail, sizeof(scalar_t) * 3 * lanes);
  }
};

}  // namespace
// Called from skin.h's functions, which have no target attribute: none here either (a
// target-attributed callee would return the vector in a register where a baseline caller
// expects it in memory, had the call not been inlined), and always inlined.
template <>
inline __attribute__((always_inline)) Lanes<float>::vec unit<Lanes<float>::vec>() {
  return Lanes<float>::vec{} + 1.0f;
}
template <>
inline __attribute__((always_inline)) Lanes<double>::vec unit<Lanes<double>::vec>() {
  return Lanes<double>::vec{} + 1.0;
}
namespace {

// weights[block * nj + j] = weight j of the kLanes vertices of block `block` of the n
// vertices from v0 (0 past the end).
template <typename scalar_t, typename vec = typename Lanes<scalar_t>::vec>
FLAME_TARGET_AVX512 FLAME_ALWAYS_INLINE void transpose_weights(const scalar_t* w, int nj,
                                                               int64_t v0, int n, vec* weights) {
  constexpr int kLanes = Lanes<scalar_t>::kLanes;
  for (int blk = 0; blk * kLanes < n; ++blk)
    for (int j = 0; j < nj; ++j) {
      alignas(64) scalar_t lane_w[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const int v = blk * kLanes + l;
        lane_w[l] = v < n ? w[(v0 + v) * nj + j] : scalar_t(0);
      }
      weights[blk * nj + j] = Lanes<scalar_t>::load(lane_w);
    }
}

// Index vectors of the folds of lane_sums: level `level` takes vectors holding
// accumulators of L = kLanes >> level lanes each, two vectors (x, then y) at a time, to one
// vector of accumulators of L / 2 lanes; output lane i (accumulator i / (L/2) of x's then
// y's, element i % (L/2)) is lo[i] + hi[i], the element and its partner half an
// accumulator up.
template <typename index, int L>
struct FoldShuffles {
  static constexpr int kLevels = L == 16 ? 4 : L == 8 ? 3 : 0;
  index lo[kLevels][L], hi[kLevels][L];
  constexpr FoldShuffles() : lo{}, hi{} {
    for (int level = 0; level < kLevels; ++level) {
      const int width = L >> level, half = width / 2;
      for (int i = 0; i < L; ++i) {
        lo[level][i] = (i / half) * width + i % half;
        hi[level][i] = lo[level][i] + half;
      }
    }
  }
};

// Lane m of the result is the sum of the lanes of x[m], for the kLanes accumulators x:
// each sum halves its vector at every step (lane i plus lane i + width / 2, width =
// kLanes, kLanes / 2, ...), the same order on every call. All kLanes sums at once: each
// level packs two vectors' worth of halved accumulators into one, log2(kLanes) levels of
// two-source permutes. x is clobbered.
template <typename scalar_t, typename vec = typename Lanes<scalar_t>::vec>
FLAME_TARGET_AVX512 FLAME_ALWAYS_INLINE vec lane_sums(vec* x) {
  using L = Lanes<scalar_t>;
  static constexpr FoldShuffles<typename L::index, L::kLanes> kFolds{};
  static_assert(FoldShuffles<typename L::index, L::kLanes>::kLevels > 0, "16 or 8 lanes");
  int count = L::kLanes;
  for (int level = 0; count > 1; ++level, count /= 2)
    for (int i = 0; i < count / 2; ++i)
      x[i] = L::permute(x[2 * i], kFolds.lo[level], x[2 * i + 1]) +
             L::permute(x[2 * i], kFolds.hi[level], x[2 * i + 1]);
  return x[0];
}

// One sample's J transforms (16 J scalars) as rows of broadcast entries.
template <typename scalar_t, typename vec = typename Lanes<scalar_t>::vec>
FLAME_TARGET_AVX512 FLAME_ALWAYS_INLINE void broadcast_transforms(const scalar_t* a, int nj,
                                                                  Row4<vec>* rows) {
  for (int e = 0; e < 16 * nj; ++e) rows[e / 4][e % 4] = Lanes<scalar_t>::splat(a[e]);
}

// T_v = sum_j w_j A_j of n vertices, whole 4x4s (16 / kLanes vectors each), written to
// t_out: the same products and sums, in the same order, as the lanes' rows. With kStream
// the 4x4s (each one or two whole cache lines) bypass the caches (see streams_transforms).
template <bool kStream, typename scalar_t>
FLAME_TARGET_AVX512 FLAME_ALWAYS_INLINE void blend_transforms(const scalar_t* a,
                                                              const scalar_t* w, int nj,
                                                              int n, scalar_t* t_out) {
  using L = Lanes<scalar_t>;
  constexpr int kParts = 16 / L::kLanes;
  typename L::vec transforms[kParts * kMaxJoints];
  for (int k = 0; k < kParts * nj; ++k) transforms[k] = L::load(a + k * L::kLanes);
  for (int v = 0; v < n; ++v, w += nj, t_out += 16)
    for (int part = 0; part < kParts; ++part) {
      typename L::vec t = transforms[part] * L::splat(w[0]);
      for (int j = 1; j < nj; ++j) t += transforms[j * kParts + part] * L::splat(w[j]);
      if (kStream)
        L::stream(t_out + part * L::kLanes, t);
      else
        L::store(t_out + part * L::kLanes, t);
    }
}

// Whether the vertex transforms (B, V, 4, 4) of `bytes` at t_out are written with
// streaming stores: from kStreamTransformsBytes on. R is written once and read by nobody in
// the op, and in a decoder the blend before the skin streams the basis (24 MB for FLAME)
// through the caches, so the lines of R's block are gone by the time a call writes them
// again: an ordinary store would first read each line from memory. 4 MiB is more than any
// core's L2. Measured on an AMD EPYC (docs/PERFORMANCE.md), streaming from there on was
// faster than from half the last-level cache at B = 16-32 even when the caller reads R right
// after, and level below. The rows must be 64-byte aligned (the CPU allocators align more).
constexpr int64_t kStreamTransformsBytes = int64_t(4) << 20;
bool streams_transforms(const void* t_out, int64_t bytes) {
  return bytes >= kStreamTransformsBytes && reinterpret_cast<std::uintptr_t>(t_out) % 64 == 0;
}

// Vertices [v0, v0 + n) (n <= kTile) of samples [b0, b1): v_out = skin(v_posed), and with
// kRows = 4 the vertex transforms into t_out. flatten: skin.h's functions are inlined, so
// compiled for AVX-512.
template <int kRows, typename scalar_t>
FLAME_TARGET_AVX512 __attribute__((flatten)) void skin_tile_avx512(
    const scalar_t* vp, const scalar_t* a, const scalar_t* w, int nj, int64_t num_verts,
    int64_t v0, int n, int64_t b0, int64_t b1, scalar_t* v_out, scalar_t* t_out, bool stream) {
  using vec = typename Lanes<scalar_t>::vec;
  constexpr int kLanes = Lanes<scalar_t>::kLanes;
  vec weights[kTile / kLanes * kMaxJoints];
  transpose_weights(w, nj, v0, n, weights);
  for (int64_t b = b0; b < b1; ++b) {
    Row4<vec> rows[4 * kMaxJoints];
    broadcast_transforms(a + b * 16 * nj, nj, rows);
    const int64_t i0 = 3 * (b * num_verts + v0);
    for (int blk = 0; blk * kLanes < n; ++blk) {
      const int lanes = std::min(kLanes, n - blk * kLanes);
      vec p[3], out[3];
      Lanes<scalar_t>::load_triples(vp + i0 + 3 * kLanes * blk, lanes, p);
      Row4<vec> t[3];
      skin_vertex<3>(p, weights + blk * nj, rows, nj, out, t);
      Lanes<scalar_t>::store_triples(out, lanes, v_out + i0 + 3 * kLanes * blk);
    }
    if (kRows == 4) {
      scalar_t* t = t_out + 16 * (b * num_verts + v0);
      if (stream)
        blend_transforms<true>(a + b * 16 * nj, w + v0 * nj, nj, n, t);
      else
        blend_transforms<false>(a + b * 16 * nj, w + v0 * nj, nj, n, t);
    }
  }
  if (stream) _mm_sfence();  // the streamed lines reach memory before the op returns
}

// Joints per pass of sum_transform_grads: their accumulators (two chains of G kParts
// vectors) and a vertex's transform gradient stay in registers.
constexpr int kJointGroup = 6;

// sum[g * kParts + part] += w_v(j0 + g) grad_vertex_transform_v for one vertex v (gt, w:
// its 4x4 and its row of nj weights), whole 4x4s.
template <int G, typename scalar_t, typename vec = typename Lanes<scalar_t>::vec>
FLAME_TARGET_AVX512 FLAME_ALWAYS_INLINE void add_transform_grad(const scalar_t* gt,
                                                                const scalar_t* w, int j0,
                                                                vec* sum) {
  using L = Lanes<scalar_t>;
  constexpr int kLanes = L::kLanes, kParts = 16 / kLanes;
  for (int part = 0; part < kParts; ++part) {
    const vec x = L::load(gt + part * kLanes);
    for (int g = 0; g < G; ++g) sum[g * kParts + part] += x * L::splat(w[j0 + g]);
  }
}

// acc_t[j * kParts + part] for the G joints from j0: the sum over n vertices of
// w_vj grad_vertex_transform_v (gt: the n 4x4s, w: their rows of nj weights), even and
// odd vertices in two chains (each in vertex order), added at the end.
template <int G, typename scalar_t, typename vec = typename Lanes<scalar_t>::vec>
FLAME_TARGET_AVX512 FLAME_ALWAYS_INLINE void sum_transform_grads(const scalar_t* gt,
                                                                 const scalar_t* w, int nj,
                                                                 int j0, int n, vec* acc_t) {
  constexpr int kParts = 16 / Lanes<scalar_t>::kLanes;
  vec even[G * kParts] = {}, odd[G * kParts] = {};
  int v = 0;
  for (; v + 1 < n; v += 2) {
    add_transform_grad<G>(gt + 16 * v, w + v * nj, j0, even);
    add_transform_grad<G>(gt + 16 * (v + 1), w + (v + 1) * nj, j0, odd);
  }
  if (v < n) add_transform_grad<G>(gt + 16 * v, w + v * nj, j0, even);
  for (int k = 0; k < G * kParts; ++k) acc_t[j0 * kParts + k] = even[k] + odd[k];
}

// Backward of chunk `chunk` (kReduceChunk vertices from v0, n of them) of samples
// [b0, b1) through v: grad_v_posed, and per sample the chunk's sum of its vertices'
// grad_v (x) [v_posed; 1] contributions to grad_transforms into partials[b * chunks +
// chunk] (16 J; the bottom rows 0), summed lane-parallel, each lane over its own vertices
// in vertex order, then over the lanes: a fixed order, whatever the thread count. R's
// part, when there is one, is added by add_transform_grads.
// Each (sample, chunk) reads a new stretch of the sample's rows of grad_v
// and v_posed; the loop prefetches the next sample's stretch into L2 a vector of vertices
// at a time, as it goes. Two threads, FLAME's sizes, Intel Xeon, five alternating rounds:
// B = 256 6.1-6.9 -> 4.9-6.0 ms, B = 16 and 64 level. The same in the forward was level
// at B = 64-256 and up to 10% slower at B = 16, so the forward has none.
template <typename scalar_t>
FLAME_TARGET_AVX512 __attribute__((flatten)) void skin_backward_chunk_avx512(
    const scalar_t* gv, const scalar_t* vp, const scalar_t* a, const scalar_t* w, int nj,
    int64_t num_verts, int64_t chunk, int64_t chunks, int n, int64_t b0, int64_t b1,
    scalar_t* grad_vp, scalar_t* partials) {
  using L = Lanes<scalar_t>;
  using vec = typename L::vec;
  constexpr int kLanes = L::kLanes;
  const int64_t v0 = chunk * kReduceChunk;
  vec weights[kReduceChunk / kLanes * kMaxJoints];
  transpose_weights(w, nj, v0, n, weights);
  Row4<vec> vertex_grads[kReduceChunk / kLanes][3];  // grad_t's top rows per block
  const int blocks = (n + kLanes - 1) / kLanes;
  for (int64_t b = b0; b < b1; ++b) {
    Row4<vec> rows[4 * kMaxJoints], acc[4 * kMaxJoints];
    broadcast_transforms(a + b * 16 * nj, nj, rows);
    for (int e = 0; e < 16 * nj; ++e) acc[e / 4][e % 4] = vec{};
    const int64_t i0 = 3 * (b * num_verts + v0);
    const bool prefetch_next = b + 1 < b1;
    for (int blk = 0; blk * kLanes < n; ++blk) {
      const int lanes = std::min(kLanes, n - blk * kLanes);
      const int64_t at = i0 + 3 * kLanes * blk;
      if (prefetch_next) {
        for (int m = 0; m < 3; ++m) {
          prefetch_l2(gv + at + 3 * num_verts + m * kLanes);
          prefetch_l2(vp + at + 3 * num_verts + m * kLanes);
        }
      }
      vec g[3], p[3], grad_p[3];
      Lanes<scalar_t>::load_triples(gv + at, lanes, g);
      Lanes<scalar_t>::load_triples(vp + at, lanes, p);
      skin_vertex_backward<false>(g, static_cast<const Row4<vec>*>(nullptr), p,
                                  weights + blk * nj, rows, nj, grad_p, vertex_grads[blk]);
      Lanes<scalar_t>::store_triples(grad_p, lanes, grad_vp + at);
    }
    // The blocks' contributions, joint by joint: one joint's 12 accumulators stay in
    // registers over the chunk (all joints' at once, 12 J, would not), each summed in
    // block order as before.
    for (int j = 0; j < nj; ++j) {
      Row4<vec> joint[3] = {};
      for (int blk = 0; blk < blocks; ++blk)
        accumulate_joint_grads<3>(weights + blk * nj + j, vertex_grads[blk], 1, joint);
      for (int r = 0; r < 3; ++r) acc[4 * j + r] = joint[r];
    }
    scalar_t* out = partials + (b * chunks + chunk) * 16 * nj;
    for (int e0 = 0; e0 < 16 * nj; e0 += kLanes) {  // 16 nj is a multiple of kLanes
      vec group[kLanes];
      for (int e = 0; e < kLanes; ++e) group[e] = acc[(e0 + e) / 4][(e0 + e) % 4];
      L::store(out + e0, lane_sums<scalar_t>(group));
    }
  }
}

// R's part of the backward for chunk `chunk` (n vertices from v0) of sample b: adds
// sum_v w_vj grad_vertex_transform_v, whole 4x4s, to the chunk's partial sum (16 J) that
// skin_backward_chunk_avx512 wrote. It reads grad R, 16 scalars a vertex and most of
// the backward's bytes, front to back: the tasks run one sample's chunks in a row (the
// chunk loop's tiles of samples jump a whole sample of R at each step).
template <typename scalar_t>
FLAME_TARGET_AVX512 __attribute__((flatten)) void add_transform_grads(
    const scalar_t* gvt, const scalar_t* w, int nj, int64_t num_verts, int64_t chunk,
    int64_t chunks, int n, int64_t b, scalar_t* partials) {
  using L = Lanes<scalar_t>;
  constexpr int kParts = 16 / L::kLanes;
  const int64_t v0 = chunk * kReduceChunk;
  const scalar_t* gt = gvt + 16 * (b * num_verts + v0);
  typename L::vec sums[kParts * kMaxJoints];
  for (int j0 = 0; j0 < nj; j0 += kJointGroup) {
    switch (std::min(kJointGroup, nj - j0)) {
      case 6: sum_transform_grads<6>(gt, w + v0 * nj, nj, j0, n, sums); break;
      case 5: sum_transform_grads<5>(gt, w + v0 * nj, nj, j0, n, sums); break;
      case 4: sum_transform_grads<4>(gt, w + v0 * nj, nj, j0, n, sums); break;
      case 3: sum_transform_grads<3>(gt, w + v0 * nj, nj, j0, n, sums); break;
      case 2: sum_transform_grads<2>(gt, w + v0 * nj, nj, j0, n, sums); break;
      default: sum_transform_grads<1>(gt, w + v0 * nj, nj, j0, n, sums); break;
    }
  }
  scalar_t* out = partials + (b * chunks + chunk) * 16 * nj;
  for (int k = 0; k < kParts * nj; ++k)
    L::store(out + k * L::kLanes, L::load(out + k * L::kLanes) + sums[k]);
}

// Tasks of (run of up to kSampleRun samples, tile) for a loop over `tiles` tiles:
// fn(tile index, b0, b1), in blocks of `grain` tasks.
template <typename Fn>
void for_each_sample_run(int64_t batch, int64_t tiles, int64_t grain, const Fn& fn) {
  const int64_t run = std::min<int64_t>(batch, kSampleRun);
  const int64_t runs = (batch + run - 1) / run;
  dynamic_parallel_for(runs * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b0 = (task / tiles) * run;
      fn(task % tiles, b0, std::min(batch, b0 + run));
    }
  });
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
#if FLAME_SKIN_AVX512
  if (use_avx512()) {
    const int64_t tiles = (num_verts + kTile - 1) / kTile;
    // Tasks of about kVertexGrain vertex-samples or more, as the 4-wide loop's.
    const int64_t grain =
        std::max<int64_t>(1, kVertexGrain / (kTile * std::min<int64_t>(batch, kSampleRun)));
    const bool stream =
        kRows == 4 && streams_transforms(t_out, batch * num_verts * 16 * int64_t(sizeof(scalar_t)));
    for_each_sample_run(batch, tiles, grain, [&](int64_t tile, int64_t b0, int64_t b1) {
      const int64_t v0 = tile * kTile;
      const int n = static_cast<int>(std::min<int64_t>(kTile, num_verts - v0));
      skin_tile_avx512<kRows>(vp, a, w, nj, num_verts, v0, n, b0, b1, v_out, t_out, stream);
    });
    return;
  }
#endif
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
  at::Tensor v = empty_output({batch, num_verts, 3}, v_posed.options());
  at::Tensor vertex_transforms =
      write_vertex_transforms ? empty_output({batch, num_verts, 4, 4}, v_posed.options())
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
  const int64_t chunks = (num_verts + kReduceChunk - 1) / kReduceChunk;
  const int64_t width = 16 * nj;
  // Partial sums of grad_transforms per (sample, chunk), and grad_v_posed.
  const auto four_wide = [&] {
    const auto run = pick_skin_backward_run<kHasGradT, scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, v0 = (task % chunks) * kReduceChunk;
        const int64_t v1 = std::min(num_verts, v0 + kReduceChunk);
        const int64_t i = b * num_verts + v0;
        run(gv + 3 * i, kHasGradT ? gvt + 16 * i : nullptr, vp + 3 * i, w + v0 * nj,
            a + b * width, nj, v1 - v0, grad_vp + 3 * i, partials + task * width);
      }
    });
  };
#if FLAME_SKIN_AVX512
  if (use_avx512()) {
    // One chunk per task at least, as the 4-wide loop's.
    const auto rows = [&](int64_t chunk) {
      return static_cast<int>(std::min(kReduceChunk, num_verts - chunk * kReduceChunk));
    };
    for_each_sample_run(batch, chunks, 1, [&](int64_t chunk, int64_t b0, int64_t b1) {
      skin_backward_chunk_avx512(gv, vp, a, w, nj, num_verts, chunk, chunks, rows(chunk), b0,
                                 b1, grad_vp, partials);
    });
    if (kHasGradT)
      dynamic_parallel_for(batch * chunks, chunks, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          add_transform_grads(gvt, w, nj, num_verts, t % chunks, chunks, rows(t % chunks),
                              t / chunks, partials);
      });
  } else
#endif
    four_wide();
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
