// A small SIMT runtime that runs CUDA kernels on the CPU, for tests.
//
// The very `__global__` functions of csrc/<family>/<family>_kernels.cuh compile with g++
// against this header (FLAME_EXT_SIMT) and run on CPU tensors. Each CUDA thread of a block
// is a fiber with its own stack; blocks run one after the other on the calling
// thread. A fiber runs until it reaches a block barrier (__syncthreads), a warp
// operation (__syncwarp, __shfl_*_sync) or its end; the scheduler then resumes the others.
// Between two barriers the threads of a block run one after the other, in an order the
// schedule chooses: in order, reversed, or a seeded random permutation per block and
// phase. A kernel whose result depends on that order (a missing barrier, a race) gives
// different results under different schedules, which the tests compare.
//
// What is checked, each failure a LaunchError naming the kernel:
// - launch geometry: block <= 1024 threads (x, y <= 1024, z <= 64), grid.x <= 2^31 - 1,
//   grid.y and grid.z <= 65535, no empty grid or block, static + dynamic shared memory
//   <= 48 KiB (the limits are adjustable so tests can reach multi-launch paths);
// - barriers: every live thread of the block must reach the same __syncthreads (the
//   same source line); exited threads count as arrived, as on sm_70 and later;
// - warp operations: the calling lane must be in the mask, every lane the mask names must
//   exist and arrive at a warp operation with the same mask, and a shuffle may read only
//   from a lane in the mask; a lane that exits or waits at a block barrier while its
//   warp waits for it is a deadlock, reported as such;
// - shared memory (FLAME_SHARED) is fresh heap storage per block, filled with 0xff bytes
//   (NaN for floating point, -1 for integers) so a read before a write shows, and bounds
//   checked by AddressSanitizer in the sanitizer build; global memory is the tensors'
//   own storage, also checked there.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FLAME_SIMT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---------------------------------------------------------------------------------------
// CUDA's vocabulary for host compilers.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int warpSize = 32;

namespace flame_simt {

class LaunchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Launch limits; tests may lower them (never raise them past CUDA's).
struct Limits {
  int64_t max_grid_x = std::numeric_limits<int32_t>::max();
  int64_t max_grid_y = 65535;
  int64_t max_grid_z = 65535;
  int64_t max_threads_per_block = 1024;
  int64_t max_shared_bytes = 48 * 1024;
};

enum class Order { kInOrder, kReversed, kRandom };

struct Schedule {
  Order order = Order::kInOrder;
  uint64_t seed = 0;
};

struct Stream {};

// What ran: per kernel name, launches, blocks and threads; totals of barriers and warp
// operations. Tests read it to prove every kernel executed.
struct KernelStats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_ops = 0;
};

inline Limits& limits() {
  static Limits l;
  return l;
}

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

inline std::map<std::string, KernelStats>& stats() {
  static std::map<std::string, KernelStats> s;
  return s;
}

namespace detail {

constexpr size_t kSlotBytes = 16;  // the widest value a shuffle moves

enum class State { kReady, kAtBarrier, kAtWarp, kDone };

// Switching between fibers. On x86-64 a hand-written switch (the callee-saved registers,
// the stack pointer and the floating-point control words, like boost.context): glibc's
// swapcontext also saves the signal mask, a system call per switch that made the
// emulated kernels several times slower. Elsewhere, ucontext.
#if defined(__x86_64__) && !defined(FLAME_SIMT_UCONTEXT)
#define FLAME_SIMT_FAST_SWITCH 1
struct Context {
  void* sp = nullptr;
};

// Saves the current context into *from and resumes `to`.
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*from*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

inline void switch_context(Context* from, const Context* to) { switch_stack(&from->sp, to->sp); }

// A context that starts `entry` (which must never return) on the given stack.
inline void make_context(Context* c, void* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                   // entry's own return address: never used
  *--sp = reinterpret_cast<uint64_t>(entry);  // where switch_stack's ret goes
  for (int i = 0; i < 6; ++i) *--sp = 0;       // rbp rbx r12 r13 r14 r15
  --sp;
  uint32_t* control = reinterpret_cast<uint32_t*>(sp);
  control[0] = 0x1f80;  // MXCSR: all exceptions masked, round to nearest
  control[1] = 0x037f;  // x87 control word, likewise
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context* from, const Context* to) { swapcontext(&from->uc, &to->uc); }

inline void make_context(Context* c, void* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

struct Fiber {
  Context context;
  State state = State::kReady;
  uint3 thread_idx{0, 0, 0};
  int linear = 0;   // x + y X + z X Y
  int lane = 0;     // linear % 32
  int warp = 0;     // linear / 32
  // Waiting at a barrier: its source line. At a warp op: its mask and the op's count.
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  unsigned warp_mask = 0;
  uint64_t warp_seq = 0;
  void* stack = nullptr;
  size_t stack_size = 0;
#ifdef FLAME_SIMT_ASAN
  void* fake_stack = nullptr;
#endif
};

// One block in flight, on the calling thread.
struct BlockRun {
  const char* kernel = nullptr;
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  int threads = 0;
  int64_t shared_limit = 0;
  int64_t dynamic_shared = 0;
  int64_t static_shared = 0;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  int current = -1;
  Context scheduler;
#ifdef FLAME_SIMT_ASAN
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif
  std::string error;
  // Shuffle slots: [parity][thread] (double-buffered by each lane's op count).
  std::vector<unsigned char> slots;
  // Static shared memory of this block, by site id.
  std::vector<void*> shared;
  KernelStats* stat = nullptr;
};

inline thread_local BlockRun* tl_run = nullptr;

inline BlockRun& run() {
  if (tl_run == nullptr)
    throw LaunchError("flame_simt: a device function was called outside a kernel launch");
  return *tl_run;
}

inline Fiber& self() {
  BlockRun& r = run();
  return (*r.fibers)[r.current];
}

[[noreturn]] inline void fail(const std::string& what) {
  std::ostringstream os;
  BlockRun& r = run();
  os << "flame_simt: kernel '" << r.kernel << "', block (" << r.block_idx.x << ","
     << r.block_idx.y << "," << r.block_idx.z << ")";
  if (r.current >= 0) {
    const Fiber& f = (*r.fibers)[r.current];
    os << ", thread (" << f.thread_idx.x << "," << f.thread_idx.y << "," << f.thread_idx.z
       << ")";
  }
  os << ": " << what;
  throw LaunchError(os.str());
}

// Hands control back to the scheduler; returns when this fiber is resumed.
inline void yield_to_scheduler() {
  BlockRun& r = run();
  Fiber& f = (*r.fibers)[r.current];
#ifdef FLAME_SIMT_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, r.scheduler_stack, r.scheduler_stack_size);
#endif
  switch_context(&f.context, &r.scheduler);
#ifdef FLAME_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.scheduler_stack, &r.scheduler_stack_size);
#endif
}

inline void fiber_main() {
  BlockRun& r = *tl_run;
#ifdef FLAME_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack, &r.scheduler_stack_size);
#endif
  try {
    (*r.body)();
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = e.what();
  } catch (...) {
    if (r.error.empty()) r.error = "flame_simt: unknown exception in a kernel";
  }
  Fiber& f = (*r.fibers)[r.current];
  f.state = State::kDone;
#ifdef FLAME_SIMT_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.scheduler_stack, r.scheduler_stack_size);
#endif
  Context dead;  // this fiber is never resumed
  switch_context(&dead, &r.scheduler);
  __builtin_unreachable();
}

// Fiber stacks, kept for the process and reused (with a guard page below each).
inline std::vector<std::pair<void*, size_t>>& stack_pool() {
  static std::vector<std::pair<void*, size_t>> pool;
  return pool;
}

#ifdef FLAME_SIMT_ASAN
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

inline void ensure_stacks(size_t count) {
  auto& pool = stack_pool();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (pool.size() < count) {
    const size_t total = kStackBytes + page;
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw LaunchError("flame_simt: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);  // a stack overflow faults instead of corrupting
    pool.emplace_back(static_cast<char*>(base) + page, kStackBytes);
  }
}

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void order_threads(std::vector<int>& order, int n, const Schedule& s, uint64_t block,
                          uint64_t phase) {
  order.resize(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  if (s.order == Order::kReversed) {
    for (int i = 0; i < n; ++i) order[i] = n - 1 - i;
  } else if (s.order == Order::kRandom) {
    uint64_t state = s.seed * 0x100000001b3ull ^ (block << 20) ^ phase;
    for (int i = n - 1; i > 0; --i) {
      const int j = static_cast<int>(splitmix64(state) % static_cast<uint64_t>(i + 1));
      std::swap(order[i], order[j]);
    }
  }
}

inline void resume(BlockRun& r, int i) {
  r.current = i;
  Fiber& f = (*r.fibers)[i];
#ifdef FLAME_SIMT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
  switch_context(&r.scheduler, &f.context);
#ifdef FLAME_SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  r.current = -1;
}

// Lanes of warp w that exist in this block, as a mask.
inline unsigned existing_lanes(const BlockRun& r, int warp) {
  const int first = warp * warpSize;
  const int n = r.threads - first < warpSize ? r.threads - first : warpSize;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// Releases the lanes of a warp whose warp op is complete: every lane its mask names is
// waiting at a warp op with the same mask.
inline void release_warp_groups(BlockRun& r) {
  std::vector<Fiber>& fs = *r.fibers;
  const int warps = (r.threads + warpSize - 1) / warpSize;
  for (int w = 0; w < warps; ++w) {
    for (int l = 0; l < warpSize; ++l) {
      const int t = w * warpSize + l;
      if (t >= r.threads || fs[t].state != State::kAtWarp) continue;
      const unsigned mask = fs[t].warp_mask;
      bool complete = true;
      for (int m = 0; m < warpSize && complete; ++m) {
        if (!((mask >> m) & 1u)) continue;
        const Fiber& o = fs[w * warpSize + m];
        complete = o.state == State::kAtWarp && o.warp_mask == mask;
      }
      if (!complete) continue;
      for (int m = 0; m < warpSize; ++m)
        if ((mask >> m) & 1u) fs[w * warpSize + m].state = State::kReady;
    }
  }
}

inline std::string describe_waiters(const BlockRun& r) {
  std::ostringstream os;
  int shown = 0;
  for (const Fiber& f : *r.fibers) {
    if (f.state == State::kDone || f.state == State::kReady) continue;
    if (shown++ == 4) {
      os << " ...";
      break;
    }
    os << " thread " << f.linear;
    if (f.state == State::kAtBarrier)
      os << " at __syncthreads (" << f.barrier_file << ":" << f.barrier_line << ")";
    else
      os << " at a warp op with mask 0x" << std::hex << f.warp_mask << std::dec;
  }
  return os.str();
}

inline void run_block(BlockRun& r, uint64_t block_linear) {
  std::vector<Fiber>& fs = *r.fibers;
  for (int i = 0; i < r.threads; ++i) {
    Fiber& f = fs[i];
    f = Fiber{};
    f.linear = i;
    f.thread_idx = {static_cast<unsigned>(i % r.block.x),
                    static_cast<unsigned>((i / r.block.x) % r.block.y),
                    static_cast<unsigned>(i / (r.block.x * r.block.y))};
    f.lane = i % warpSize;
    f.warp = i / warpSize;
    f.stack = stack_pool()[i].first;
    f.stack_size = stack_pool()[i].second;
#ifdef FLAME_SIMT_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
#endif
    make_context(&f.context, f.stack, f.stack_size, fiber_main);
  }
  r.static_shared = 0;
  for (void* p : r.shared) std::free(p);
  r.shared.clear();

  std::vector<int> order;
  uint64_t phase = 0;
  for (;;) {
    order_threads(order, r.threads, schedule(), block_linear, phase);
    bool ran = true;
    while (ran) {
      ran = false;
      for (int i : order) {
        if (fs[i].state != State::kReady) continue;
        resume(r, i);
        ran = true;
        if (!r.error.empty()) return;
        if (fs[i].state == State::kAtWarp || fs[i].state == State::kDone) release_warp_groups(r);
      }
    }
    // Nobody can run: the block is done, at a barrier, or stuck.
    int done = 0, at_barrier = 0;
    const Fiber* first = nullptr;
    bool same_barrier = true;
    for (const Fiber& f : fs) {
      if (f.state == State::kDone) {
        ++done;
      } else if (f.state == State::kAtBarrier) {
        ++at_barrier;
        if (first == nullptr)
          first = &f;
        else if (f.barrier_line != first->barrier_line ||
                 std::strcmp(f.barrier_file, first->barrier_file) != 0)
          same_barrier = false;
      }
    }
    if (done == r.threads) return;
    if (done + at_barrier < r.threads) {
      r.error = std::string("flame_simt: kernel '") + r.kernel +
                "': deadlock, threads wait for lanes that never arrive:" + describe_waiters(r);
      return;
    }
    if (!same_barrier) {
      r.error = std::string("flame_simt: kernel '") + r.kernel +
                "': threads of one block wait at different __syncthreads:" + describe_waiters(r);
      return;
    }
    ++r.stat->barriers;
    for (Fiber& f : fs)
      if (f.state == State::kAtBarrier) f.state = State::kReady;
    ++phase;
  }
}

inline std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

}  // namespace detail

// Runs `body` (the kernel called with its arguments) once per thread of the grid.
inline void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
                   const std::function<void()>& body) {
  const Limits& lim = limits();
  const std::string name = kernel == nullptr ? "?" : kernel;
  auto refuse = [&](const std::string& why) {
    throw LaunchError("flame_simt: kernel '" + name + "': invalid launch: " + why + " (grid " +
                      detail::dims(grid) + ", block " + detail::dims(block) + ")");
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) refuse("empty grid");
  if (block.x == 0 || block.y == 0 || block.z == 0) refuse("empty block");
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > lim.max_threads_per_block)
    refuse("more than " + std::to_string(lim.max_threads_per_block) + " threads per block");
  if (grid.x > lim.max_grid_x) refuse("grid.x over " + std::to_string(lim.max_grid_x));
  if (grid.y > lim.max_grid_y) refuse("grid.y over " + std::to_string(lim.max_grid_y));
  if (grid.z > lim.max_grid_z) refuse("grid.z over " + std::to_string(lim.max_grid_z));
  if (static_cast<int64_t>(dynamic_shared) > lim.max_shared_bytes)
    refuse("dynamic shared memory over " + std::to_string(lim.max_shared_bytes) + " bytes");
  if (detail::tl_run != nullptr) refuse("a kernel launched from inside a kernel");

  static std::mutex one_launch_at_a_time;  // the stacks and the statistics are shared
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  KernelStats& stat = stats()[name];
  ++stat.launches;
  detail::ensure_stacks(static_cast<size_t>(threads));
  std::vector<detail::Fiber> fibers(static_cast<size_t>(threads));
  detail::BlockRun r;
  r.kernel = kernel;
  r.grid = grid;
  r.block = block;
  r.threads = static_cast<int>(threads);
  r.shared_limit = lim.max_shared_bytes;
  r.dynamic_shared = static_cast<int64_t>(dynamic_shared);
  r.body = &body;
  r.fibers = &fibers;
  r.slots.assign(2 * static_cast<size_t>(threads) * detail::kSlotBytes, 0);
  r.stat = &stat;

  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const bool reversed = schedule().order == Order::kReversed;
  detail::tl_run = &r;
  for (uint64_t n = 0; n < blocks && r.error.empty(); ++n) {
    const uint64_t k = reversed ? blocks - 1 - n : n;
    r.block_idx = {static_cast<unsigned>(k % grid.x),
                   static_cast<unsigned>((k / grid.x) % grid.y),
                   static_cast<unsigned>(k / (uint64_t(grid.x) * grid.y))};
    detail::run_block(r, k);
    ++stat.blocks;
    stat.threads += threads;
  }
  detail::tl_run = nullptr;
  for (void* p : r.shared) std::free(p);
  if (!r.error.empty()) throw LaunchError(r.error);
}

// ---------------------------------------------------------------------------------------
// Device-side functions.

inline uint3 thread_idx() { return detail::self().thread_idx; }
inline uint3 block_idx() { return detail::run().block_idx; }
inline uint3 block_dim() {
  const dim3& b = detail::run().block;
  return {b.x, b.y, b.z};
}
inline uint3 grid_dim() {
  const dim3& g = detail::run().grid;
  return {g.x, g.y, g.z};
}

inline void syncthreads(const char* file, int line) {
  detail::Fiber& f = detail::self();
  f.state = detail::State::kAtBarrier;
  f.barrier_file = file;
  f.barrier_line = line;
  detail::yield_to_scheduler();
}

namespace detail {

// Common part of every warp op: mask checks, arrival, wait for the group.
inline void warp_arrive(unsigned mask, const char* op) {
  BlockRun& r = run();
  Fiber& f = self();
  if (!((mask >> f.lane) & 1u)) {
    std::ostringstream os;
    os << op << " called by lane " << f.lane << " with mask 0x" << std::hex << mask
       << ", which does not name it";
    fail(os.str());
  }
  const unsigned exist = existing_lanes(r, f.warp);
  if (mask & ~exist) {
    std::ostringstream os;
    os << op << " mask 0x" << std::hex << mask << " names lanes that do not exist (block of "
       << std::dec << r.threads << " threads: a block size that is not a multiple of 32)";
    fail(os.str());
  }
  ++r.stat->warp_ops;
  f.state = State::kAtWarp;
  f.warp_mask = mask;
  yield_to_scheduler();
}

}  // namespace detail

inline void syncwarp(unsigned mask) { detail::warp_arrive(mask, "__syncwarp"); }

// Exchanges `value` within the warp: every lane in the mask publishes its value, waits
// for the others, then reads the one of `src_of(lane)`.
template <typename T, typename SrcLane>
T shuffle(unsigned mask, T value, int width, const char* op, SrcLane src_of) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= detail::kSlotBytes,
                "a shuffle moves a trivially copyable value of at most 16 bytes");
  if (width <= 0 || width > warpSize || (width & (width - 1)) != 0)
    detail::fail(std::string(op) + ": width must be a power of two <= 32");
  detail::BlockRun& r = detail::run();
  detail::Fiber& f = detail::self();
  const uint64_t parity = f.warp_seq++ & 1u;
  auto slot = [&](int thread) {
    return r.slots.data() + (parity * r.threads + thread) * detail::kSlotBytes;
  };
  std::memcpy(slot(f.linear), &value, sizeof(T));
  detail::warp_arrive(mask, op);
  const int src = src_of(f.lane);
  if (!((mask >> src) & 1u)) {
    std::ostringstream os;
    os << op << " on lane " << f.lane << " reads lane " << src << ", which mask 0x" << std::hex
       << mask << " does not name";
    detail::fail(os.str());
  }
  T out;
  std::memcpy(&out, slot(f.warp * warpSize + src), sizeof(T));
  return out;
}

// Static shared memory of one declaration site (FLAME_SHARED).
class SharedSite {
 public:
  SharedSite(size_t bytes, const char* name) : bytes_(bytes), name_(name), id_(next_id()++) {}

  void* get() const {
    detail::BlockRun& r = detail::run();
    if (r.shared.size() <= id_) r.shared.resize(id_ + 1, nullptr);
    void*& p = r.shared[id_];
    if (p == nullptr) {
      r.static_shared += static_cast<int64_t>(bytes_);
      if (r.static_shared + r.dynamic_shared > r.shared_limit)
        detail::fail("static (" + std::to_string(r.static_shared) + " bytes, '" + name_ +
                     "' the last) plus dynamic (" + std::to_string(r.dynamic_shared) +
                     " bytes) shared memory over " + std::to_string(r.shared_limit) + " bytes");
      // Exact size (so one element past the end is outside the allocation), 64-byte aligned
      // like CUDA's shared memory banks allow any vector type.
      if (posix_memalign(&p, 64, bytes_) != 0) detail::fail("out of memory for shared memory");
      std::memset(p, 0xff, bytes_);
    }
    return p;
  }

 private:
  static size_t& next_id() {
    static size_t id = 0;
    return id;
  }
  size_t bytes_;
  const char* name_;
  size_t id_;
};

}  // namespace flame_simt

#define threadIdx (::flame_simt::thread_idx())
#define blockIdx (::flame_simt::block_idx())
#define blockDim (::flame_simt::block_dim())
#define gridDim (::flame_simt::grid_dim())

#define __syncthreads() ::flame_simt::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) { ::flame_simt::syncwarp(mask); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  return ::flame_simt::shuffle(mask, value, width, "__shfl_xor_sync", [&](int lane) {
    const int src = lane ^ lane_mask;
    // Lanes of a later width-segment are not readable: the caller keeps its own value.
    return (src / width) > (lane / width) ? lane : src;
  });
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  return ::flame_simt::shuffle(mask, value, width, "__shfl_sync", [&](int lane) {
    return (lane / width) * width + (src_lane % width);
  });
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  return ::flame_simt::shuffle(mask, value, width, "__shfl_down_sync", [&](int lane) {
    const int src = lane + static_cast<int>(delta);
    return (src / width) == (lane / width) ? src : lane;
  });
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  return ::flame_simt::shuffle(mask, value, width, "__shfl_up_sync", [&](int lane) {
    const int src = lane - static_cast<int>(delta);
    return src >= 0 && (src / width) == (lane / width) ? src : lane;
  });
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// CUDA's min/max overloads: integers in their common type, floating point as fmin/fmax.
template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value)
    return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}

template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value)
    return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

#define FLAME_SIMT_SHARED(name, ...)                                                     \
  static const ::flame_simt::SharedSite name##_simt_site(sizeof(__VA_ARGS__), #name);   \
  std::add_lvalue_reference_t<__VA_ARGS__> name =                                         \
      *reinterpret_cast<std::add_pointer_t<__VA_ARGS__>>(name##_simt_site.get())
