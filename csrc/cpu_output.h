// Large CPU outputs on transparent huge pages, their blocks reused.
//
// glibc maps every block above its largest mmap threshold (32 MiB on 64-bit Linux) anew
// on each allocation and unmaps it on free, and below it, once its heap's free top grows
// past the trim threshold, gives the pages back: an op that returns a tensor of some MiB
// faults in its pages again and again (medusa's (B, V, 4, 4) vertex transforms, 20 MB at
// B = 64, took about 1400 faults per call on an AMD EPYC; 82 MB at B = 256), and under a
// hypervisor that costs more than writing the bytes. An output of kHugeOutputBytes or more
// is therefore allocated aligned to 2 MiB and advised MADV_HUGEPAGE, so that where the
// kernel grants transparent huge pages (its `enabled` setting `madvise` or `always`) the
// first write takes one fault per 2 MiB; where huge pages are off the block behaves as any
// other.
//
// Even on huge pages a fresh block costs the kernel's page zeroing (and, with `defrag`
// set to `madvise`, compaction) on every call. So a freed block is kept in a small cache
// (OutputCache) and handed to the next output of about its size, as PyTorch's CUDA
// allocator keeps its blocks: a decoder called in a loop at one batch size maps its large
// outputs once. The cache holds at most its limit in bytes, 1 GiB unless
// $FLAME_EXT_CPU_OUTPUT_CACHE_MB (read once per process) says otherwise (0: no cache,
// every block freed with its tensor), the blocks freed most recently; a larger block is
// freed at once. flame_ext.empty_cpu_output_cache() frees what it holds. Smaller outputs,
// other devices and other systems take at::empty.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include "cpu_isa.h"

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace flame_ext {

constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;
constexpr std::size_t kHugeOutputBytes = std::size_t(4) << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)

// Freed huge-page blocks, most recent first, for reuse (see the top of this file), and the
// sizes of the blocks in use.
class OutputCache {
 public:
  struct Stats {
    std::size_t cached_bytes, cached_blocks, limit_bytes, reused, mapped;
  };

  // Never destroyed: a tensor may be freed by another static's destructor at exit.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  // A block of `bytes` (a multiple of kHugePageBytes): a cached one of bytes to 5/4 bytes,
  // the smallest such, else a new one (after freeing the cached blocks when memory is
  // short); nullptr when there is no memory.
  void* take(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(*mutex_);
      State& s = *state_;
      auto best = s.blocks.end();
      for (auto it = s.blocks.begin(); it != s.blocks.end(); ++it) {
        if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 &&
            (best == s.blocks.end() || it->bytes < best->bytes))
          best = it;
      }
      if (best != s.blocks.end()) {
        const Block block = *best;
        s.live.emplace(block.data, block.bytes);  // may throw: the block stays cached
        s.blocks.erase(best);
        s.cached_bytes -= block.bytes;
        ++s.reused;
        return block.data;
      }
    }
    void* data = map(bytes);
    if (data == nullptr && empty() > 0) data = map(bytes);
    if (data == nullptr) return nullptr;
    try {
      std::lock_guard<std::mutex> lock(*mutex_);
      state_->live.emplace(data, bytes);
      ++state_->mapped;
    } catch (...) {
      std::free(data);
      return nullptr;
    }
    return data;
  }

  // Keeps a freed block (the most recent first), freeing the oldest beyond the limit.
  // Called from a deleter: never throws (a block it cannot keep is freed).
  void give(void* data) noexcept {
    std::lock_guard<std::mutex> lock(*mutex_);
    State& s = *state_;
    const auto it = s.live.find(data);
    if (it == s.live.end()) {  // a block of a forked parent: not ours to keep
      std::free(data);
      return;
    }
    const std::size_t bytes = it->second;
    s.live.erase(it);
    if (bytes > limit_bytes_) {
      std::free(data);
      return;
    }
    try {
      s.blocks.insert(s.blocks.begin(), Block{data, bytes});
    } catch (...) {
      std::free(data);
      return;
    }
    s.cached_bytes += bytes;
    while (s.cached_bytes > limit_bytes_) {
      std::free(s.blocks.back().data);
      s.cached_bytes -= s.blocks.back().bytes;
      s.blocks.pop_back();
    }
  }

  // Frees every cached block; returns the bytes freed.
  std::size_t empty() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(*mutex_);
      blocks.swap(state_->blocks);
      state_->cached_bytes = 0;
    }
    std::size_t freed = 0;
    for (const Block& block : blocks) {
      freed += block.bytes;
      std::free(block.data);
    }
    return freed;
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(*mutex_);
    const State& s = *state_;
    return {s.cached_bytes, s.blocks.size(), limit_bytes_, s.reused, s.mapped};
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };
  struct State {
    std::vector<Block> blocks;
    std::unordered_map<void*, std::size_t> live;
    std::size_t cached_bytes = 0, reused = 0, mapped = 0;
  };

  OutputCache() : limit_bytes_(read_limit()) {
    // A child forked while another thread held the lock (or was changing the lists)
    // starts with a new lock and empty lists; the parent's blocks it inherited are freed
    // as ordinary memory (give() does not know them).
    pthread_atfork(nullptr, nullptr, [] {
      OutputCache& cache = instance();
      cache.mutex_ = new std::mutex();
      cache.state_ = new State();
    });
  }

  static void* map(std::size_t bytes) {
    void* data = nullptr;
    if (posix_memalign(&data, kHugePageBytes, bytes) != 0) return nullptr;
    // Advice only: a kernel without transparent huge pages refuses it, and the block is
    // then an ordinary one.
    (void)madvise(data, bytes, MADV_HUGEPAGE);
    return data;
  }

  // $FLAME_EXT_CPU_OUTPUT_CACHE_MB: a whole number of MiB, 0 or more; 1024 otherwise.
  static std::size_t read_limit() {
    // Up to 1 PiB: beyond any machine, short of overflowing the shift below.
    const int64_t mib = std::min<int64_t>(env_count("FLAME_EXT_CPU_OUTPUT_CACHE_MB", 1024),
                                          int64_t(1) << 30);
    return static_cast<std::size_t>(mib) << 20;
  }

  // Pointers, so that a forked child can replace them (the parent's may be mid-change).
  std::mutex* mutex_ = new std::mutex();
  State* state_ = new State();
  const std::size_t limit_bytes_;
};

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    const std::size_t rounded = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* data = OutputCache::instance().take(rounded);
    TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "flame_ext: could not allocate ",
                     nbytes, " bytes for an output tensor");
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* data) {
    if (data != nullptr) OutputCache::instance().give(data);
  }
};

// Never destroyed: storages keep a pointer to their allocator, and one may be resized or
// freed after static destructors have run.
inline HugePageAllocator* huge_page_allocator() {
  static HugePageAllocator* allocator = new HugePageAllocator();
  return allocator;
}

// at::empty(sizes, options), contiguous; on huge pages when it is a CPU tensor of
// kHugeOutputBytes or more.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) {
    std::size_t nbytes = options.dtype().itemsize();
    for (const int64_t s : sizes) nbytes *= static_cast<std::size_t>(s);
    if (nbytes >= kHugeOutputBytes) {
      return at::detail::empty_generic(sizes, huge_page_allocator(),
                                       c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       options.dtype().toScalarType(), std::nullopt);
    }
  }
  return at::empty(sizes, options);
}

// The cache's counters: cached bytes, cached blocks, limit, blocks reused, blocks mapped.
inline std::vector<int64_t> output_cache_stats() {
  const OutputCache::Stats s = OutputCache::instance().stats();
  return {int64_t(s.cached_bytes), int64_t(s.cached_blocks), int64_t(s.limit_bytes),
          int64_t(s.reused), int64_t(s.mapped)};
}

inline int64_t empty_output_cache() { return int64_t(OutputCache::instance().empty()); }

#else

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// No huge-page allocator here, so nothing is cached.
inline std::vector<int64_t> output_cache_stats() { return {0, 0, 0, 0, 0}; }
inline int64_t empty_output_cache() { return 0; }

#endif

}  // namespace flame_ext
