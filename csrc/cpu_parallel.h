// at::parallel_for with dynamic scheduling, for the CPU loops of the blend and skin ops
// (the families whose loops take most of a decode; the others keep at::parallel_for).
//
// at::parallel_for hands each thread one contiguous 1/T of the range up front. On a
// machine whose cores are shared (a VM's vCPUs, another process), a core that is held up
// leaves the others waiting at the end: on the 2-core test VM perf put ~9% of a FlameShape
// forward in libgomp's wait. Here the threads take blocks of `grain` indices from a shared
// counter until none is left, so a slow core takes fewer blocks.
//
// Which thread runs a block never changes a result: every loop that uses this computes
// each block's outputs (or fixed-order partial sums) from its indices alone.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace flame_ext {

// fn(i0, i1) for blocks [i0, i1) of [0, count), `grain` indices each (the last one
// shorter), in any order and on any of at::parallel_for's threads; inline, in order, when
// there is one block or one thread.
template <typename Fn>
void dynamic_parallel_for(int64_t count, int64_t grain, const Fn& fn) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t blocks = (count + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(blocks, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    fn(int64_t(0), count);
    return;
  }
  std::atomic<int64_t> next{0};
  // One index per thread: each thread then loops over the shared counter.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t block = next.fetch_add(1, std::memory_order_relaxed); block < blocks;
         block = next.fetch_add(1, std::memory_order_relaxed))
      fn(block * grain, std::min(count, (block + 1) * grain));
  });
}

}  // namespace flame_ext
