// The CPU hand loops of the blend op family, included by blend_cpu.cpp once per
// instruction set: each inclusion sits in its own namespace (FLAME_BLEND_ISA) under its own
// `#pragma GCC target`, with vectors of FLAME_BLEND_VECTOR_BYTES (64 for AVX-512, 32 for
// AVX2, 16 for the x86-64 baseline SSE2), so each build keeps its vectors in registers.
// No include guard on purpose. The per-element steps come from blend.h.
//
// Vectors are GCC/Clang vector extensions; without them (other compilers) the loops run on
// scalars, one lane.

namespace FLAME_BLEND_ISA {

#if defined(__GNUC__)
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(FLAME_BLEND_VECTOR_BYTES)));
  typedef int32_t lane_bits;
  typedef lane_bits bits __attribute__((vector_size(FLAME_BLEND_VECTOR_BYTES)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(FLAME_BLEND_VECTOR_BYTES)));
  typedef int64_t lane_bits;
  typedef lane_bits bits __attribute__((vector_size(FLAME_BLEND_VECTOR_BYTES)));
};
#else
template <typename T>
struct Simd {
  typedef T type;
  typedef int64_t lane_bits;
  typedef lane_bits bits;
};
#endif

// Register budget: AVX-512 has 32 vector registers, AVX2 and SSE 16. Tiles keep at most
// 16 (resp. 12) accumulators so that they and their operands fit:
// - forward and pose: kTileSamples samples times 4 rows of dirs (4 vectors of n);
// - grad_coeffs: kAdjointSamples samples times kAdjointVectors vectors of columns. With 16
//   registers 4 x 3 (12 accumulators, 3 row vectors, 1 broadcast; 7 loads per 12 FMAs)
//   ran 1.4x faster on an AMD EPYC (Zen 3) than 2 x 4 (6 loads per 8 FMAs).
// The forward's 4 x 2 was kept for 16 registers: 3 rows x 4 samples was 1.25x faster at
// K = 400 but 1.35x slower at K = 50 (more lane sums per FMA); 2 x 6 was no faster at
// K = 400 and 1.45x slower at K = 50.
constexpr int kTileSamples = FLAME_BLEND_VECTOR_BYTES >= 64 ? 4 : 2;
constexpr int kAdjointSamples = 4;
constexpr int kAdjointVectors = FLAME_BLEND_VECTOR_BYTES >= 64 ? 4 : 3;

template <typename T>
using Vec = typename Simd<T>::type;
template <typename T>
using Bits = typename Simd<T>::bits;
template <typename T>
constexpr int kLanes = int(sizeof(Vec<T>) / sizeof(T));

template <typename T>
FLAME_CPU_INLINE void load(Vec<T>& v, const T* p) {
  std::memcpy(&v, p, sizeof(Vec<T>));
}
template <typename T>
FLAME_CPU_INLINE void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(Vec<T>));
}
// The k tail of a row when K is not a multiple of the lane count: the last full vector of
// the row (k = K - W, overlapping the vector loop) with the lanes already counted zeroed,
// so every load stays inside the row. Zeroing is a bit mask (exact, unlike multiplying by
// 0, which would turn an inf into a NaN); both factors are masked so 0 * 0 is added.
template <typename T>
struct KTail {
  int64_t vector_end;  // k covered by full vectors
  bool masked;         // K % W != 0 and K >= W: one masked vector at K - W
  Bits<T> mask;
};

template <typename T>
KTail<T> make_tail(int64_t K) {
  constexpr int W = kLanes<T>;
  KTail<T> tail;
  tail.vector_end = K - K % W;
  tail.masked = K >= W && K % W != 0;
  typedef typename Simd<T>::lane_bits Int;
  Int lanes[W];
  FLAME_UNROLL
  for (int i = 0; i < W; ++i) lanes[i] = i >= W - K % W ? Int(-1) : Int(0);
  std::memcpy(&tail.mask, lanes, sizeof(lanes));
  return tail;
}

template <typename T>
FLAME_CPU_INLINE void load_masked(Vec<T>& v, const T* p, const Bits<T>& mask) {
  static_assert(sizeof(Bits<T>) == sizeof(Vec<T>), "mask and vector must have one size");
  Bits<T> bits;
  std::memcpy(&bits, p, sizeof(bits));
  bits &= mask;
  std::memcpy(&v, &bits, sizeof(v));
}

// Lanes of `yes` where mask is set, of `no` elsewhere (bitwise, exact).
template <typename T>
FLAME_CPU_INLINE Vec<T> select(const Bits<T>& mask, const Vec<T>& yes, const Vec<T>& no) {
  Bits<T> y, n;
  std::memcpy(&y, &yes, sizeof(y));
  std::memcpy(&n, &no, sizeof(n));
  y = (y & mask) | (n & ~mask);
  Vec<T> out;
  std::memcpy(&out, &y, sizeof(out));
  return out;
}

// Horizontal sums of M accumulators of W lanes at once: a fixed tree that halves the lanes
// per accumulator at each level and packs two accumulators per vector, so M sums cost
// about M shuffle pairs instead of M log2(W). sums[m] is the total of acc[m]; acc is
// clobbered.
#ifdef FLAME_BLEND_SHUFFLE
// Output lane i of folding x, y (each holding accumulators of L lanes, y's after x's): the
// (i % (L/2))-th lane of accumulator i / (L/2), from its low (Hi false) or high half.
template <int L, bool Hi>
constexpr int fold_index(int i) {
  return (i / (L / 2)) * L + i % (L / 2) + (Hi ? L / 2 : 0);
}
template <typename T, int L, int... I>
FLAME_CPU_INLINE void fold(Vec<T>& out, const Vec<T>& x, const Vec<T>& y,
                           std::integer_sequence<int, I...>) {
  out = __builtin_shufflevector(x, y, fold_index<L, false>(I)...) +
        __builtin_shufflevector(x, y, fold_index<L, true>(I)...);
}
template <typename T, int L, int Count>
FLAME_CPU_INLINE void fold_levels(Vec<T>* acc) {
  if constexpr (L > 1) {
    constexpr auto lanes = std::make_integer_sequence<int, kLanes<T>>{};
    if constexpr (Count > 1) {
      FLAME_UNROLL
      for (int i = 0; i < Count / 2; ++i) fold<T, L>(acc[i], acc[2 * i], acc[2 * i + 1], lanes);
      fold_levels<T, L / 2, Count / 2>(acc);
    } else {
      fold<T, L>(acc[0], acc[0], acc[0], lanes);
      fold_levels<T, L / 2, 1>(acc);
    }
  }
}
template <typename T, int M>
FLAME_CPU_INLINE void sum_lanes(Vec<T> (&acc)[M], T (&sums)[M]) {
  static_assert((M & (M - 1)) == 0, "accumulator count must be a power of two");
  fold_levels<T, kLanes<T>, M>(acc);
  T flat[M > kLanes<T> ? M : kLanes<T>];
  std::memcpy(flat, acc, sizeof(flat));
  FLAME_UNROLL
  for (int m = 0; m < M; ++m) sums[m] = flat[m];
}
#else
template <typename T, int M>
FLAME_CPU_INLINE void sum_lanes(Vec<T> (&acc)[M], T (&sums)[M]) {
  FLAME_UNROLL
  for (int m = 0; m < M; ++m) {
    T lanes[kLanes<T>];
    std::memcpy(lanes, &acc[m], sizeof(lanes));
    sums[m] = blend::lane_sum<kLanes<T>>(lanes);
  }
}
#endif

// The next block of rows of dirs (the dot tiles' rows ahead, the forward's next strip, the
// backward's next 64 rows), prefetched into L2 a cache line or two per step of the tiles
// that read the current block (row by row, row_bytes from each row's start). Issued all
// at once, the prefetches queue behind each other and stall the tiles; spread over the
// FMAs, the loads from memory overlap the arithmetic (docs/PERFORMANCE.md has the
// measurements). A value-initialised cursor has no rows: nothing to prefetch.
struct LineCursor {
  const char* row;
  int64_t stride;     // bytes between rows
  int64_t row_bytes;  // bytes of the block per row
  int64_t rows;       // rows left
  int64_t offset;
  int64_t per_step;   // lines per step_many()
  FLAME_CPU_INLINE void step() {
    prefetch_l2(row + offset);
    offset += 64;
    if (offset >= row_bytes) {
      offset = 0;
      row += stride;
      --rows;
    }
  }
  FLAME_CPU_INLINE void step_many() {
    for (int64_t i = 0; i < per_step && rows > 0; ++i) step();
  }
  // per_step such that `steps` calls of step_many() cover every line left.
  void spread_over(int64_t steps) {
    const int64_t lines = rows * ((row_bytes + 63) / 64);
    per_step = std::max<int64_t>(1, (lines + steps - 1) / std::max<int64_t>(1, steps));
  }
};

// Rows [n, n + rows) of a (., stride) table, columns [k0, k1); none when rows <= 0.
template <typename T>
FLAME_CPU_INLINE LineCursor block_lines(const T* table, int64_t stride, int64_t n, int64_t rows,
                                        int64_t k0, int64_t k1) {
  if (rows <= 0) return LineCursor{};
  return LineCursor{reinterpret_cast<const char*>(table + n * stride + k0),
                    int64_t(stride * sizeof(T)), int64_t((k1 - k0) * sizeof(T)), rows, 0, 1};
}

// ---------------------------------------------------------------------------------------
// Dot products of short rows, the inner loop of the forward (rows of dirs with rows of
// coeffs, over k) and of grad_pose_coeffs (rows of pose_dirs with rows of grad_out, over a
// chunk of n). Lanes run along the rows; R x S accumulators stay in registers.

// sums[s * R + r] = sum_i x[r * ldx + i] * y[s * ldy + i] for i in [0, length), where
// tail = make_tail(length). Each vector step also prefetches up to two lines of `next`.
template <typename T, int R, int S>
FLAME_CPU_INLINE void dot_tile(const T* x, int64_t ldx, const T* y, int64_t ldy, int64_t length,
                               const KTail<T>& tail, T (&sums)[S * R], LineCursor& next) {
  constexpr int W = kLanes<T>;
  // acc[s][r], sample-major: after the lane sums each sample's R results are adjacent.
  Vec<T> acc[S][R];
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    FLAME_UNROLL
    for (int r = 0; r < R; ++r) acc[s][r] = Vec<T>{};
  }
  auto step = [&](int64_t i) {
    Vec<T> vx[R], vy[S];
    FLAME_UNROLL
    for (int r = 0; r < R; ++r) load(vx[r], x + r * ldx + i);
    FLAME_UNROLL
    for (int s = 0; s < S; ++s) load(vy[s], y + s * ldy + i);
    blend::outer_step(vy, vx, acc);
  };
  int64_t i = 0;
  for (; i < tail.vector_end && next.rows > 0; i += W) {
    next.step();
    if (next.rows > 0) next.step();
    step(i);
  }
  for (; i < tail.vector_end; i += W) step(i);
  if (tail.masked) {
    const int64_t i = length - W;
    Vec<T> vx[R], vy[S];
    FLAME_UNROLL
    for (int r = 0; r < R; ++r) load_masked(vx[r], x + r * ldx + i, tail.mask);
    FLAME_UNROLL
    for (int s = 0; s < S; ++s) load_masked(vy[s], y + s * ldy + i, tail.mask);
    blend::outer_step(vy, vx, acc);
  }
  sum_lanes(reinterpret_cast<Vec<T>(&)[S * R]>(acc), sums);
  if (!tail.masked && tail.vector_end < length) {
    // length < W: the rest one by one.
    FLAME_UNROLL
    for (int r = 0; r < R; ++r) {
      T row_sums[S];
      FLAME_UNROLL
      for (int s = 0; s < S; ++s) row_sums[s] = sums[s * R + r];
      blend::row_dots(x + r * ldx, y, ldy, tail.vector_end, length, row_sums);
      FLAME_UNROLL
      for (int s = 0; s < S; ++s) sums[s * R + r] = row_sums[s];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward.

// The row of base that sample b starts from (times base_stride): its own, or the one
// base_rows picks for it.
template <typename T>
FLAME_CPU_INLINE int64_t base_row(const ForwardArgs<T>& a, int64_t b) {
  return a.base_rows != nullptr ? a.base_rows[b] : b;
}

// out[b0..b0+S, n..n+R] = base + R rows of dirs dotted with S rows of coeffs.
template <typename T, int R, int S>
FLAME_CPU_INLINE void forward_tile(const ForwardArgs<T>& a, const KTail<T>& tail, int64_t n,
                                   int64_t b0, LineCursor& next, LineCursor& ahead) {
  T sums[S * R];
  dot_tile<T, R, S>(a.dirs + n * a.dirs_stride, a.dirs_stride, a.coeffs + b0 * a.K, a.K, a.K,
                    tail, sums, next);
  ahead.step_many();
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    const int64_t b = b0 + s;
    T* out = a.out + b * a.out_stride + n;
    const T* base = a.base + base_row(a, b) * a.base_stride + n;
    FLAME_UNROLL
    for (int r = 0; r < R; ++r) out[r] = base[r] + sums[s * R + r];
  }
}

template <typename T, int R>
FLAME_CPU_INLINE void forward_rows_all_samples(const ForwardArgs<T>& a, const KTail<T>& tail,
                                               int64_t n, int64_t b0, int64_t b1,
                                               LineCursor& next, LineCursor& ahead) {
  constexpr int S = kTileSamples;
  int64_t b = b0;
  for (; b + S <= b1; b += S) forward_tile<T, R, S>(a, tail, n, b, next, ahead);
  if constexpr (S > 2) {
    for (; b + 2 <= b1; b += 2) forward_tile<T, R, 2>(a, tail, n, b, next, ahead);
  }
  for (; b < b1; ++b) forward_tile<T, R, 1>(a, tail, n, b, next, ahead);
}

// The tile calls of a loop over B samples in tiles of S, then 2 (when S > 2), then 1.
constexpr int64_t tile_calls(int64_t B, int S) {
  return B / S + (S > 2 ? (B % S) / 2 + (B % S) % 2 : B % S);
}

// acc[s][u] += c[s * ldc] * row[u W .. (u + 1) W): U vectors of one row, each scaled by S
// coefficients (one per sample) that are broadcast.
template <typename T, int S, int U>
FLAME_CPU_INLINE void broadcast_step(const T* row, const T* c, int64_t ldc, Vec<T> (&acc)[S][U]) {
  constexpr int W = kLanes<T>;
  Vec<T> d[U];
  T cs[S];
  FLAME_UNROLL
  for (int u = 0; u < U; ++u) load(d[u], row + u * W);
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) cs[s] = c[s * ldc];
  blend::scaled_step(cs, d, acc);
}

// out[b0..b0+S, n0:n1] += pose_coeffs @ pose_dirs[:, n0:n1], in order of p for each element:
// U vectors of n times S samples per step, so each pose_dirs load feeds S FMAs.
template <typename T, int S, int U = 4>
FLAME_CPU_INLINE void forward_pose_tile(const ForwardArgs<T>& a, int64_t n0, int64_t n1,
                                        int64_t b0, LineCursor& ahead) {
  constexpr int W = kLanes<T>;
  T* out = a.out + b0 * a.out_stride;
  const T* pc = a.pose_coeffs + b0 * a.P;
  int64_t n = n0;
  for (; n + U * W <= n1; n += U * W) {
    ahead.step_many();
    Vec<T> acc[S][U];
    FLAME_UNROLL
    for (int s = 0; s < S; ++s) {
      FLAME_UNROLL
      for (int u = 0; u < U; ++u) load(acc[s][u], out + s * a.out_stride + n + u * W);
    }
    for (int64_t p = 0; p < a.P; ++p)
      broadcast_step(a.pose_dirs + p * a.pose_stride + n, pc + p, a.P, acc);
    FLAME_UNROLL
    for (int s = 0; s < S; ++s) {
      FLAME_UNROLL
      for (int u = 0; u < U; ++u) store(out + s * a.out_stride + n + u * W, acc[s][u]);
    }
  }
  for (; n < n1; ++n) {
    FLAME_UNROLL
    for (int s = 0; s < S; ++s)
      out[s * a.out_stride + n] = blend::pose_sum(out[s * a.out_stride + n], pc + s * a.P,
                                                  a.pose_dirs + n, a.pose_stride, a.P);
  }
}

template <typename T>
FLAME_CPU_INLINE void forward_pose(const ForwardArgs<T>& a, int64_t n0, int64_t n1,
                                   LineCursor& ahead) {
  int64_t b = 0;
  for (; b + kTileSamples <= a.B; b += kTileSamples)
    forward_pose_tile<T, kTileSamples>(a, n0, n1, b, ahead);
  for (; b < a.B; ++b) forward_pose_tile<T, 1>(a, n0, n1, b, ahead);
}

// Samples per group of the forward: one group's coefficients (16 x 400 floats = 25 KB for
// FLAME) stay in L1 while every row tile of the task reads them, and the task's rows of
// dirs (kForwardRows of them) are re-read from L2 by the next group. Without groups a large
// batch streams all its coefficients from L2 (or beyond) for every 4 rows: the working set
// would grow with B. (On the 2-core test machine the difference was within the noise up
// to B = 256; the groups bound the working set for any B.)
constexpr int64_t kForwardGroup = 16;

// ---------------------------------------------------------------------------------------
// Forward for large batches: strips of rows packed k-major.
//
// The dot tiles above reduce over k inside vectors and sum lanes at the end; with many
// samples the forward is compute bound and that form ran at half the FMA rate of the
// backward's broadcast tiles (AVX-512 and AVX2, AMD EPYC). Here a strip of kStripVectors
// vectors of rows is copied k-major into a block on the stack (strip_block_columns() of
// k at a time, so it stays in L1), and every sample of the batch reads it: acc[s][u] += coeffs[b+s, k]
// * strip[k][u], the lanes along n, each output's sum in order of k from its base value,
// then the pose correctives in order of p. The copy costs about one load and store per
// element of dirs, shared by all B samples.
// Below strip_min_batch() samples the copy is not paid back (the batch is memory bound:
// the dot tiles stream dirs once). Without prefetching the strips were level at B = 16
// and faster above (FlameShape's sizes on one thread, AMD EPYC: 1.9x at B = 64, 2.5x at
// B = 256). With the dot tiles' prefetch, a dirs streamed from memory (FlameShape's
// 24 MB) ran one group of 16 samples 15-40% faster on dot tiles than on strips (Intel
// Xeon), and a second group (B = 17-32) made the dot tiles 1.5-2x slower; a dirs that
// stays in cache (the landmark decoder's 600 x 100) ran B = 16 10-30% faster on strips.
// So: strips from 16 samples, from 17 when dirs is larger than kStreamedDirsBytes. A size
// rule, the same on every machine: both paths are hand loops with their time per sample
// falling with the batch.
constexpr int64_t kStreamedDirsBytes = 4 << 20;
template <typename T>
int64_t strip_min_batch(const ForwardArgs<T>& a) {
  const int64_t dirs_bytes = a.N * a.K * int64_t(sizeof(T));
  return dirs_bytes > kStreamedDirsBytes ? kForwardGroup + 1 : kForwardGroup;
}
constexpr int kStripVectors = FLAME_BLEND_VECTOR_BYTES >= 64 ? 4 : 3;
constexpr int kStripSamples = 4;
constexpr int64_t kStripBlockBytes = 16 << 10;
// Columns of dirs per packed block: a multiple of the lane count, at least 8 vectors.
template <typename T>
constexpr int64_t strip_block_columns() {
  constexpr int64_t W = kLanes<T>;
  constexpr int64_t columns = kStripBlockBytes / int64_t(kStripVectors * W * sizeof(T));
  return std::max<int64_t>(8 * W, columns - columns % W);
}

// Samples [b, b + S) of rows [n, n + U W): `steps` k-major rows of the packed block, the
// coefficients of sample b + s at c[(b + s) * ldc + j] for step j (dirs' or pose_dirs'
// block), added to base (first) or to the outputs so far.
template <typename T, int S, int U>
FLAME_CPU_INLINE void strip_tile(const ForwardArgs<T>& a, const T* strip, int64_t n,
                                 const T* coeffs, int64_t ldc, int64_t steps, int64_t b,
                                 bool first, LineCursor& next) {
  constexpr int W = kLanes<T>;
  Vec<T> acc[S][U];
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    const T* src = first ? a.base + base_row(a, b + s) * a.base_stride + n
                         : a.out + (b + s) * a.out_stride + n;
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) load(acc[s][u], src + u * W);
  }
  const T* c = coeffs + b * ldc;
  int64_t j = 0;
  for (; j < steps && next.rows > 0; ++j) {
    next.step();
    broadcast_step(strip + j * (U * W), c + j, ldc, acc);
  }
  for (; j < steps; ++j) broadcast_step(strip + j * (U * W), c + j, ldc, acc);
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) store(a.out + (b + s) * a.out_stride + n + u * W, acc[s][u]);
  }
}

// strip[(k - k0) * U W + j] = rows[j * stride + k] for j < U W, k in [k0, k1): W x W
// blocks transposed in registers, the last k < W of the range one by one.
#ifdef FLAME_BLEND_SHUFFLE
template <int W, bool Hi>
constexpr int zip_index(int t) {
  return (t % 2 == 0 ? 0 : W) + (Hi ? W / 2 : 0) + t / 2;
}
template <typename T, bool Hi, int... I>
FLAME_CPU_INLINE Vec<T> zip(const Vec<T>& x, const Vec<T>& y, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(x, y, zip_index<kLanes<T>, Hi>(I)...);
}
// r[i] holds row i of a W x W block; afterwards r[j] holds its column j. log2(W) rounds of
// pairing row i with row i + W/2 and interleaving their halves.
template <typename T>
FLAME_CPU_INLINE void transpose(Vec<T> (&r)[kLanes<T>]) {
  constexpr int W = kLanes<T>;
  constexpr auto lanes = std::make_integer_sequence<int, W>{};
  FLAME_UNROLL
  for (int round = 1; round < W; round *= 2) {
    Vec<T> out[W];
    FLAME_UNROLL
    for (int i = 0; i < W / 2; ++i) {
      out[2 * i] = zip<T, false>(r[i], r[i + W / 2], lanes);
      out[2 * i + 1] = zip<T, true>(r[i], r[i + W / 2], lanes);
    }
    FLAME_UNROLL
    for (int i = 0; i < W; ++i) r[i] = out[i];
  }
}
#endif

template <typename T, int U>
FLAME_CPU_INLINE void pack_strip(const T* rows, int64_t stride, int64_t k0, int64_t k1,
                                 T* strip) {
  constexpr int W = kLanes<T>;
  int64_t k = k0;
#ifdef FLAME_BLEND_SHUFFLE
  for (; k + W <= k1; k += W) {
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) {
      Vec<T> r[W];
      FLAME_UNROLL
      for (int i = 0; i < W; ++i) load(r[i], rows + (u * W + i) * stride + k);
      transpose<T>(r);
      FLAME_UNROLL
      for (int i = 0; i < W; ++i) store(strip + (k - k0 + i) * (U * W) + u * W, r[i]);
    }
  }
#endif
  for (; k < k1; ++k) {
    T* dst = strip + (k - k0) * (U * W);
    FLAME_UNROLL
    for (int j = 0; j < U * W; ++j) dst[j] = rows[j * stride + k];
  }
}

// Every sample's strip_tile over one packed block.
template <typename T, int U>
FLAME_CPU_INLINE void strip_samples(const ForwardArgs<T>& a, const T* strip, int64_t n,
                                    const T* coeffs, int64_t ldc, int64_t steps, bool first,
                                    LineCursor& next, LineCursor& ahead) {
  constexpr int S = kStripSamples;
  int64_t b = 0;
  for (; b + S <= a.B; b += S) {
    strip_tile<T, S, U>(a, strip, n, coeffs, ldc, steps, b, first, next);
    ahead.step_many();
  }
  for (; b + 2 <= a.B; b += 2) {
    strip_tile<T, 2, U>(a, strip, n, coeffs, ldc, steps, b, first, next);
    ahead.step_many();
  }
  for (; b < a.B; ++b) {
    strip_tile<T, 1, U>(a, strip, n, coeffs, ldc, steps, b, first, next);
    ahead.step_many();
  }
}

// Rows [n, n + U W) for every sample; the task's rows end at n_end (the next strip's
// rows are prefetched up to there, not into another thread's task).
template <typename T, int U>
FLAME_CPU_INLINE void forward_strip(const ForwardArgs<T>& a, T* strip, int64_t n,
                                    int64_t n_end, LineCursor& ahead) {
  constexpr int W = kLanes<T>;
  constexpr int64_t kb = strip_block_columns<T>();
  for (int64_t k0 = 0;; k0 += kb) {  // once when K = 0: the outputs start from base
    const int64_t k1 = std::min(a.K, k0 + kb);
    pack_strip<T, U>(a.dirs + n * a.dirs_stride, a.dirs_stride, k0, k1, strip);
    const int64_t next_n = n + U * W;
    LineCursor next = block_lines(a.dirs, a.dirs_stride, next_n,
                                  std::min<int64_t>(U * W, n_end - next_n), k0, k1);
    strip_samples<T, U>(a, strip, n, a.coeffs + k0, a.K, k1 - k0, k0 == 0, next, ahead);
    if (k1 >= a.K) break;
  }
  // The pose correctives: rows of pose_dirs run along n already, so a block of them is
  // packed by a plain copy, and every sample group then reads one contiguous block, as
  // for dirs (the same FMAs in the same order as reading the P rows, N apart, in place
  // for each group: the outputs are the same bits). One thread, FlameShape's sizes, Intel
  // Xeon: B = 32-64 3-15% faster than in place; B = 256 and two threads level.
  for (int64_t p0 = 0; p0 < a.P; p0 += kb) {
    const int64_t p1 = std::min(a.P, p0 + kb);
    for (int64_t p = p0; p < p1; ++p) {
      FLAME_UNROLL
      for (int u = 0; u < U; ++u) {
        Vec<T> v;
        load(v, a.pose_dirs + p * a.pose_stride + n + u * W);
        store(strip + (p - p0) * (U * W) + u * W, v);
      }
    }
    LineCursor none{};
    strip_samples<T, U>(a, strip, n, a.pose_coeffs + p0, a.P, p1 - p0, false, none, ahead);
  }
}

// Rows [n0, n1): strips of kStripVectors vectors, then narrower ones; returns where the
// strips end (fewer than W rows remain).
template <typename T>
FLAME_CPU_INLINE int64_t forward_strips(const ForwardArgs<T>& a, int64_t n0, int64_t n1,
                                        LineCursor& ahead) {
  constexpr int W = kLanes<T>;
  alignas(64) T strip[strip_block_columns<T>() * kStripVectors * W];
  int64_t n = n0;
  for (; n + kStripVectors * W <= n1; n += kStripVectors * W)
    forward_strip<T, kStripVectors>(a, strip, n, n1, ahead);
  if constexpr (kStripVectors > 3) {
    if (n + 3 * W <= n1) {
      forward_strip<T, 3>(a, strip, n, n1, ahead);
      n += 3 * W;
    }
  }
  if (n + 2 * W <= n1) {
    forward_strip<T, 2>(a, strip, n, n1, ahead);
    n += 2 * W;
  }
  if (n + W <= n1) {
    forward_strip<T, 1>(a, strip, n, n1, ahead);
    n += W;
  }
  return n;
}

// ForwardArgs::ahead as a cursor spread over the tile calls of forward_range(a, n0, n1)
// (strips or dot tiles, then the dot rows' pose tiles): a few lines after each.
template <typename T>
LineCursor ahead_lines(const ForwardArgs<T>& a, int64_t n0, int64_t n1) {
  if (a.ahead_rows <= 0) return LineCursor{};
  constexpr int W = kLanes<T>;
  constexpr int64_t kb = strip_block_columns<T>();
  const int64_t rows = n1 - n0;
  int64_t tiles = 0;
  if (a.B >= strip_min_batch(a)) {
    const int64_t blocks = std::max<int64_t>(1, (a.K + kb - 1) / kb) + (a.P + kb - 1) / kb;
    tiles = (rows + W - 1) / W / kStripVectors * blocks * tile_calls(a.B, kStripSamples);
  } else {
    const int64_t groups = (a.B + kForwardGroup - 1) / kForwardGroup;
    tiles = (rows + 3) / 4 * groups * tile_calls(std::min(a.B, kForwardGroup), kTileSamples);
    if (a.P > 0) tiles += (rows + 4 * W - 1) / (4 * W) * tile_calls(a.B, kTileSamples);
  }
  LineCursor c{static_cast<const char*>(a.ahead), a.ahead_stride, a.ahead_row_bytes,
               a.ahead_rows, 0, 1};
  c.spread_over(tiles);
  return c;
}

// The dot tiles read rows of dirs in order; the hardware prefetchers run too little ahead
// of them to hide memory behind the FMAs. The rows kDotPrefetchBytes ahead of each step of
// 4 rows (never past the task's rows) are prefetched into L2 by the step's tiles, two lines
// per k vector, the rest after the step. One thread, FlameShape's sizes, Intel Xeon: B = 8
// 4.5 ms with the hardware prefetchers alone, 3.2-3.4 with this.
constexpr int64_t kDotPrefetchBytes = 16 << 10;
template <typename T>
constexpr int64_t dot_prefetch_rows(int64_t stride) {
  const int64_t row_bytes = std::max<int64_t>(1, stride * int64_t(sizeof(T)));
  return (kDotPrefetchBytes + row_bytes - 1) / row_bytes;
}

template <typename T>
FLAME_CPU_INLINE void forward_range(const ForwardArgs<T>& a, int64_t n0, int64_t n1) {
  constexpr int R = 4;
  const KTail<T> tail = make_tail<T>(a.K);
  LineCursor later = ahead_lines(a, n0, n1);
  // Large batches: strips first (pose included); the dot tiles take the rows left over.
  const int64_t dot0 = a.B >= strip_min_batch(a) ? forward_strips(a, n0, n1, later) : n0;
  const int64_t ahead = dot_prefetch_rows<T>(a.dirs_stride);
  for (int64_t b0 = 0; b0 < a.B; b0 += kForwardGroup) {
    const int64_t b1 = std::min(a.B, b0 + kForwardGroup);
    int64_t n = dot0;
    for (; n + R <= n1; n += R) {
      // The first group streams the rows from memory: prefetched a distance ahead.
      const int64_t pn = n + ahead;
      LineCursor next = block_lines(a.dirs, a.dirs_stride, pn,
                                    b0 == 0 ? std::min<int64_t>(R, n1 - pn) : 0, 0, a.K);
      forward_rows_all_samples<T, R>(a, tail, n, b0, b1, next, later);
      while (next.rows > 0) next.step();
    }
    for (; n < n1; ++n) {
      LineCursor none{};
      forward_rows_all_samples<T, 1>(a, tail, n, b0, b1, none, later);
    }
  }
  if (a.P > 0 && dot0 < n1) forward_pose(a, dot0, n1, later);
  while (later.rows > 0) later.step();
}

// ---------------------------------------------------------------------------------------
// Backward: per-chunk partial sums into a workspace, reduced in chunk order.

// Stores one vector of an adjoint's partial sums at dst: `accumulate` adds what an
// earlier row block stored there; `masked` (the row's final vector, at K - W) keeps the
// lanes before vector_end, which belong to the vector before it.
template <typename T>
FLAME_CPU_INLINE void store_partial(T* dst, Vec<T> value, bool accumulate, bool masked,
                                    const KTail<T>& tail) {
  if (accumulate || masked) {
    Vec<T> old;
    load(old, dst);
    if (accumulate) value += old;
    if (masked) value = select<T>(tail.mask, value, old);
  }
  store(dst, value);
}

// partial[b0..b0+S, columns] (+)= sum over n in [m0, m1) of grad_out[b, n] * dirs[n, columns]
// for U vectors of columns starting at k; with LastMasked the last vector is the row's
// final one (at K - W) and only its lanes from vector_end on are written (the others
// belong to the vector before it). The S x U accumulators stay in registers over the rows.
// `accumulate` adds to what an earlier row block stored.
template <typename T, int S, int U, bool LastMasked>
FLAME_CPU_INLINE void adjoint_tile(const BackwardArgs<T>& a, const KTail<T>& tail, T* partial,
                                   int64_t m0, int64_t m1, int64_t b0, int64_t k,
                                   bool accumulate, LineCursor& next) {
  constexpr int W = kLanes<T>;
  int64_t column[U];
  FLAME_UNROLL
  for (int u = 0; u < U; ++u) column[u] = k + u * W;
  if (LastMasked) column[U - 1] = a.K - W;
  Vec<T> acc[S][U];
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) acc[s][u] = Vec<T>{};
  }
  const T* g = a.grad_out + b0 * a.N;
  auto step = [&](int64_t n) {
    const T* row = a.dirs + n * a.dirs_stride;
    Vec<T> d[U];
    T gs[S];
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) load(d[u], row + column[u]);
    FLAME_UNROLL
    for (int s = 0; s < S; ++s) gs[s] = g[s * a.N + n];
    blend::scaled_step(gs, d, acc);
  };
  int64_t n = m0;
  for (; n < m1 && next.rows > 0; ++n) {
    next.step_many();
    step(n);
  }
  for (; n < m1; ++n) step(n);
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    FLAME_UNROLL
    for (int u = 0; u < U; ++u)
      store_partial(partial + (b0 + s) * a.K + column[u], acc[s][u], accumulate,
                    LastMasked && u == U - 1, tail);
  }
}

template <typename T, int S, int U>
FLAME_CPU_INLINE void adjoint_tile(const BackwardArgs<T>& a, const KTail<T>& tail, T* partial,
                                   int64_t m0, int64_t m1, int64_t b0, int64_t k,
                                   bool masked, bool accumulate, LineCursor& next) {
  if (masked)
    adjoint_tile<T, S, U, true>(a, tail, partial, m0, m1, b0, k, accumulate, next);
  else
    adjoint_tile<T, S, U, false>(a, tail, partial, m0, m1, b0, k, accumulate, next);
}

// One column block of adjoint_tile with a run-time vector count (1 to kAdjointVectors).
template <typename T, int S>
FLAME_CPU_INLINE void adjoint_block(const BackwardArgs<T>& a, const KTail<T>& tail, T* partial,
                                    int64_t m0, int64_t m1, int64_t b0, int64_t k, int vectors,
                                    bool masked, bool accumulate, LineCursor& next) {
  static_assert(kAdjointVectors == 3 || kAdjointVectors == 4, "column blocks of 3 or 4");
  switch (vectors) {
    case 1:
      adjoint_tile<T, S, 1>(a, tail, partial, m0, m1, b0, k, masked, accumulate, next);
      break;
    case 2:
      adjoint_tile<T, S, 2>(a, tail, partial, m0, m1, b0, k, masked, accumulate, next);
      break;
    case 3:
      adjoint_tile<T, S, 3>(a, tail, partial, m0, m1, b0, k, masked, accumulate, next);
      break;
    default:
      if constexpr (kAdjointVectors == 4)
        adjoint_tile<T, S, 4>(a, tail, partial, m0, m1, b0, k, masked, accumulate, next);
      break;
  }
}

// partial[b, c] (+)= sum over n in [m0, m1) of grad_out[b, n] * dirs[n, c], one column at a
// time: the K < W case.
template <typename T>
FLAME_CPU_INLINE void adjoint_columns(const BackwardArgs<T>& a, T* partial, int64_t m0,
                                      int64_t m1, int64_t b0, int64_t b1, bool accumulate) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* g = a.grad_out + b * a.N;
    for (int64_t c = 0; c < a.K; ++c) {
      T sum = accumulate ? partial[b * a.K + c] : T(0);
      for (int64_t n = m0; n < m1; ++n) sum += g[n] * a.dirs[n * a.dirs_stride + c];
      partial[b * a.K + c] = sum;
    }
  }
}


template <typename T, int R, int S>
FLAME_CPU_INLINE void pose_adjoint_tile(const BackwardArgs<T>& a, const KTail<T>& tail,
                                        T* partial, int64_t n0, int64_t n1, int64_t p,
                                        int64_t b) {
  T sums[S * R];
  LineCursor none{};
  dot_tile<T, R, S>(a.pose_dirs + p * a.pose_stride + n0, a.pose_stride,
                    a.grad_out + b * a.N + n0, a.N, n1 - n0, tail, sums, none);
  FLAME_UNROLL
  for (int s = 0; s < S; ++s) {
    FLAME_UNROLL
    for (int r = 0; r < R; ++r) partial[(b + s) * a.P + p + r] = sums[s * R + r];
  }
}

// One sample, a whole row of dirs per step: the rows are read in order, one after the
// other, where the column blocks of adjoint_tile read each row a block at a time (a shared
// identity's adjoint: one sample over 300 columns, 18 MB of FLAME streamed from memory).
// The sums live in a block of vectors in L1 instead of registers (the one sample is memory
// bound); each output's sum still runs over the rows in order from zero, then adds what
// an earlier row block stored, and the last vector is the row's final one (at K - W), its
// lanes before vector_end left to the vector before it: the bits of the column blocks.
// For K up to kAdjointRowColumns (at least W).
constexpr int64_t kAdjointRowColumns = 1024;
template <typename T>
FLAME_CPU_INLINE void adjoint_one_sample(const BackwardArgs<T>& a, const KTail<T>& tail,
                                         T* partial, int64_t m0, int64_t m1, int64_t b,
                                         bool accumulate, LineCursor& next) {
  constexpr int W = kLanes<T>;
  constexpr int64_t kMaxVectors = kAdjointRowColumns / W;
  const int64_t vectors = (a.K + W - 1) / W;
  const bool masked = a.K % W != 0;
  Vec<T> acc[kMaxVectors];
  for (int64_t u = 0; u < vectors; ++u) acc[u] = Vec<T>{};
  const T* g = a.grad_out + b * a.N;
  for (int64_t n = m0; n < m1; ++n) {
    next.step_many();
    const T* row = a.dirs + n * a.dirs_stride;
    const T c = g[n];
    int64_t u = 0;
    for (; u + 1 < vectors; ++u) {
      Vec<T> d;
      load(d, row + u * W);
      acc[u] += d * c;
    }
    Vec<T> d;
    load(d, row + (masked ? a.K - W : u * W));
    acc[u] += d * c;
  }
  for (int64_t u = 0; u < vectors; ++u) {
    const bool last_masked = masked && u == vectors - 1;
    store_partial(partial + b * a.K + (last_masked ? a.K - W : u * W), acc[u], accumulate,
                  last_masked, tail);
  }
}

// The partial sums of one chunk of rows [n0, n1) for the samples [b0, b1).
template <typename T>
FLAME_CPU_INLINE void backward_chunk(const BackwardArgs<T>& a, int64_t chunk, int64_t n0,
                                     int64_t n1, int64_t b0, int64_t b1) {
  constexpr int W = kLanes<T>;
  if (a.partial_coeffs != nullptr) {
    T* partial = a.partial_coeffs + chunk * a.B * a.K;
    const KTail<T> tail = make_tail<T>(a.K);
    for (int64_t m0 = n0; m0 < n1; m0 += kAdjointRows) {
      const int64_t m1 = std::min(n1, m0 + kAdjointRows);
      const bool accumulate = m0 > n0;
      // The first sample group streams the chunk from memory: the next block of rows is
      // prefetched while this one computes (the later groups find the chunk in L2).
      LineCursor next = block_lines(a.dirs, a.dirs_stride, m1,
                                    b0 == 0 ? std::min(kAdjointRows, n1 - m1) : 0, 0, a.K);
      if (a.K < W) {
        adjoint_columns(a, partial, m0, m1, b0, b1, accumulate);
        continue;
      }
      if (b1 - b0 == 1 && a.K <= kAdjointRowColumns) {
        next.spread_over(m1 - m0);
        adjoint_one_sample(a, tail, partial, m0, m1, b0, accumulate, next);
        continue;
      }
      // The tiles below step the cursor once per row each: with few samples (a shared
      // identity's one row) that is fewer steps than the block has lines, so each step
      // then prefetches several (docs/PERFORMANCE.md has the measurements).
      {
        const int64_t samples = b1 - b0, S = kAdjointSamples;
        const int64_t tiles = samples / S + (S > 2 ? samples % S / 2 : 0) +
                              (S > 2 ? samples % S % 2 : samples % S);
        const int64_t column_blocks = (a.K + kAdjointVectors * W - 1) / (kAdjointVectors * W);
        next.spread_over(tiles * column_blocks * (m1 - m0));
      }
      // Column blocks of up to kAdjointVectors vectors; a block reaching past K ends with
      // the masked tail vector. Samples inside, so the block's slab of rows is reused from
      // L1.
      for (int64_t k = 0; k < a.K; k += kAdjointVectors * W) {
        const int vectors = int(std::min<int64_t>(kAdjointVectors, (a.K - k + W - 1) / W));
        const bool masked = k + vectors * W > a.K;
        int64_t b = b0;
        constexpr int S = kAdjointSamples;
        for (; b + S <= b1; b += S)
          adjoint_block<T, S>(a, tail, partial, m0, m1, b, k, vectors, masked, accumulate, next);
        if constexpr (S > 2) {
          for (; b + 2 <= b1; b += 2)
            adjoint_block<T, 2>(a, tail, partial, m0, m1, b, k, vectors, masked, accumulate, next);
        }
        for (; b < b1; ++b)
          adjoint_block<T, 1>(a, tail, partial, m0, m1, b, k, vectors, masked, accumulate, next);
      }
    }
  }
  if (a.partial_pose_coeffs != nullptr) {
    // partial[b, p] = dot(pose_dirs[p, n0:n1], grad_out[b, n0:n1]): the forward's dot tile
    // with pose rows for dirs rows and grad_out rows for coeffs.
    T* partial = a.partial_pose_coeffs + chunk * a.B * a.P;
    const KTail<T> tail = make_tail<T>(n1 - n0);
    int64_t b = b0;
    for (; b + kTileSamples <= b1; b += kTileSamples) {
      int64_t p = 0;
      for (; p + 4 <= a.P; p += 4)
        pose_adjoint_tile<T, 4, kTileSamples>(a, tail, partial, n0, n1, p, b);
      for (; p < a.P; ++p) pose_adjoint_tile<T, 1, kTileSamples>(a, tail, partial, n0, n1, p, b);
    }
    for (; b < b1; ++b) {
      int64_t p = 0;
      for (; p + 4 <= a.P; p += 4) pose_adjoint_tile<T, 4, 1>(a, tail, partial, n0, n1, p, b);
      for (; p < a.P; ++p) pose_adjoint_tile<T, 1, 1>(a, tail, partial, n0, n1, p, b);
    }
  }
}

// ---------------------------------------------------------------------------------------
// A half-precision dirs: rows widened to T, into a block the loops above then read from
// cache. The values are read by their bits, exactly: a bfloat16 is the top half of a
// float32; a float16 normal, infinity or NaN moves its exponent (rebiased) and mantissa into
// float32's fields, a zero or subnormal one is its 10-bit mantissa times 2^-24.

template <HalfFormat F>
FLAME_CPU_INLINE float half_value(uint16_t h) {
  uint32_t bits;
  if constexpr (F == HalfFormat::kBFloat16) {
    bits = uint32_t(h) << 16;
  } else {
    const uint32_t em = h & 0x7fffu;
    if (em < 0x400u) {
      const float magnitude = float(int32_t(em)) * 0x1p-24f;
      std::memcpy(&bits, &magnitude, sizeof(bits));
    } else {
      bits = (em << 13) + (em >= 0x7c00u ? 0x70000000u : 0x38000000u);
    }
    bits |= uint32_t(h & 0x8000u) << 16;
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

#if defined(__GNUC__)
// half_value for one vector of float lanes, branch-free.
typedef uint16_t HalfBits __attribute__((vector_size(FLAME_BLEND_VECTOR_BYTES / 2)));
typedef uint32_t WideBits __attribute__((vector_size(FLAME_BLEND_VECTOR_BYTES)));
template <HalfFormat F>
FLAME_CPU_INLINE Vec<float> half_vector(const uint16_t* p) {
  typedef HalfBits Narrow;
  typedef WideBits Wide;
  typedef Bits<float> Signed;
  typedef Vec<float> Float;
#if FLAME_BLEND_VECTOR_BYTES >= 64
  if constexpr (F == HalfFormat::kFloat16) {
    // AVX-512F has the conversion itself (vcvtph2ps): the same values, fewer instructions.
    const __m512 value = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    Vec<float> out;
    std::memcpy(&out, &value, sizeof(out));
    return out;
  }
#endif
  Narrow narrow;
  std::memcpy(&narrow, p, sizeof(narrow));
  const Wide h = __builtin_convertvector(narrow, Wide);
  Wide bits;
  if constexpr (F == HalfFormat::kBFloat16) {
    bits = h << 16;
  } else {
    const Wide em = h & 0x7fffu;
    const Wide special = (Wide)(em >= 0x7c00u);  // all ones for infinity and NaN
    const Wide small = (Wide)(em < 0x400u);      // all ones for zero and subnormals
    const Wide normal = (em << 13) + (0x38000000u + (special & 0x38000000u));
    const Float magnitude = __builtin_convertvector((Signed)em, Float) * 0x1p-24f;
    Wide sub;
    std::memcpy(&sub, &magnitude, sizeof(sub));
    bits = (normal & ~small) | (sub & small) | ((h & 0x8000u) << 16);
  }
  Vec<float> value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
#endif

// dst[i] = T(src[i]) for i in [0, count). The values come from memory: the hardware
// prefetchers alone left the loads waiting (most of the time of a batch-1 blend), so a
// line kDotPrefetchBytes ahead is prefetched into L2 per line read, while it is one of the
// `available` values src holds.
template <typename T, HalfFormat F>
FLAME_CPU_INLINE void widen_span(const uint16_t* src, int64_t count, T* dst, int64_t available) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(uint16_t));
  constexpr int64_t kAhead = kDotPrefetchBytes / int64_t(sizeof(uint16_t));
  int64_t i = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = kLanes<float>;
    for (; i + W <= count; i += W) {
      if (i % kLine < W && i + kAhead < available) prefetch_l2(src + i + kAhead);
      store(dst + i, half_vector<F>(src + i));
    }
  }
#endif
  for (; i < count; ++i) dst[i] = T(half_value<F>(src[i]));
}

// dst[r * K + k] = T(src[r * stride + k]) for r in [0, rows), k in [0, K); src holds
// `available` rows. Contiguous rows are one span (the vectors run across rows).
template <typename T, HalfFormat F>
void widen_rows(const uint16_t* src, int64_t stride, int64_t rows, int64_t K, T* dst,
                int64_t available) {
  if (stride == K) {
    widen_span<T, F>(src, rows * K, dst, available * K);
    return;
  }
  const int64_t ahead = dot_prefetch_rows<uint16_t>(stride);
  const int64_t row_bytes = K * int64_t(sizeof(uint16_t));
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = src + r * stride;
    if (r + ahead < available) {
      const char* line = reinterpret_cast<const char*>(row + ahead * stride);
      for (int64_t offset = 0; offset < row_bytes; offset += 64) prefetch_l2(line + offset);
    }
    widen_span<T, F>(row, K, dst + r * K, 0);
  }
}

// ---------------------------------------------------------------------------------------
// Entry points (their addresses are what blend_cpu.cpp dispatches to).

// out[i] = the sum over b in [0, B) of rows[b * stride + i] for i in [0, n), added in order
// of b for each i: the batch's gradient rows for a shared identity's adjoint, and the
// backward's partial sums over its chunks. Vectors along i, 4 of them (4 cache lines of
// each row) per step of b.
template <typename T>
void sum_rows(const T* rows, int64_t stride, int64_t B, int64_t n, T* out) {
  constexpr int W = kLanes<T>, U = 4;
  int64_t i = 0;
  for (; i + U * W <= n; i += U * W) {
    Vec<T> acc[U];
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) load(acc[u], rows + i + u * W);
    for (int64_t b = 1; b < B; ++b) {
      FLAME_UNROLL
      for (int u = 0; u < U; ++u) {
        Vec<T> x;
        load(x, rows + b * stride + i + u * W);
        acc[u] += x;
      }
    }
    FLAME_UNROLL
    for (int u = 0; u < U; ++u) store(out + i + u * W, acc[u]);
  }
  for (; i < n; ++i) {
    T acc = rows[i];
    for (int64_t b = 1; b < B; ++b) acc += rows[b * stride + i];
    out[i] = acc;
  }
}

template <typename T>
void forward_rows(const ForwardArgs<T>& a, int64_t n0, int64_t n1) {
  forward_range(a, n0, n1);
}

template <typename T>
void backward_rows(const BackwardArgs<T>& a, int64_t chunk, int64_t n0, int64_t n1, int64_t b0,
                   int64_t b1) {
  backward_chunk(a, chunk, n0, n1, b0, b1);
}

}  // namespace FLAME_BLEND_ISA
