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
#include <vector>

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace flame_ext {

constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;
constexpr std::size_t kHugeOutputBytes = std::size_t(4) << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)

// Freed huge-page blocks, most recent first, for reuse (see the top of this file).
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
  // the smallest such, else a new one; nullptr when there is no memory. *block_bytes is
  // the block's size.
  void* take(std::size_t bytes, std::size_t* block_bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = blocks_.end();
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 &&
            (best == blocks_.end() || it->bytes < best->bytes))
          best = it;
      }
      if (best != blocks_.end()) {
        void* data = best->data;
        *block_bytes = best->bytes;
        cached_bytes_ -= best->bytes;
        blocks_.erase(best);
        ++reused_;
        return data;
      }
      ++mapped_;
    }
    void* data = nullptr;
    if (posix_memalign(&data, kHugePageBytes, bytes) != 0) return nullptr;
    // Advice only: a kernel without transparent huge pages refuses it, and the block is
    // then an ordinary one.
    (void)madvise(data, bytes, MADV_HUGEPAGE);
    *block_bytes = bytes;
    return data;
  }

  // Keeps a freed block (the most recent first), dropping the oldest beyond the limit.
  void give(void* data, std::size_t bytes) {
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes <= limit_bytes_) {
        blocks_.insert(blocks_.begin(), Block{data, bytes});
        cached_bytes_ += bytes;
        data = nullptr;
      }
      while (cached_bytes_ > limit_bytes_) {
        dropped.push_back(blocks_.back().data);
        cached_bytes_ -= blocks_.back().bytes;
        blocks_.pop_back();
      }
    }
    if (data != nullptr) std::free(data);
    for (void* block : dropped) std::free(block);
  }

  // Frees every cached block; returns the bytes freed.
  std::size_t empty() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
      cached_bytes_ = 0;
    }
    std::size_t freed = 0;
    for (const Block& block : blocks) {
      freed += block.bytes;
      std::free(block.data);
    }
    return freed;
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, blocks_.size(), limit_bytes_, reused_, mapped_};
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };

  OutputCache() : limit_bytes_(read_limit()) {}

  static std::size_t read_limit() {
    const char* value = std::getenv("FLAME_EXT_CPU_OUTPUT_CACHE_MB");
    std::size_t mib = 1024;
    if (value != nullptr) {
      char* end = nullptr;
      const long long parsed = std::strtoll(value, &end, 10);
      // Up to 1 PiB: beyond any machine, short of overflowing the shift below.
      if (end != value && *end == '\0' && parsed >= 0)
        mib = static_cast<std::size_t>(std::min<long long>(parsed, 1LL << 30));
    }
    return mib << 20;
  }

  std::mutex mutex_;
  std::vector<Block> blocks_;
  std::size_t cached_bytes_ = 0;
  const std::size_t limit_bytes_;
  std::size_t reused_ = 0, mapped_ = 0;
};

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t nbytes) override {
    const std::size_t rounded = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    std::size_t block_bytes = 0;
    void* data = rounded == 0 ? nullptr : OutputCache::instance().take(rounded, &block_bytes);
    TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "flame_ext: could not allocate ",
                     nbytes, " bytes for an output tensor");
    // The context remembers the block's size for the cache.
    auto* block = new Block{data, block_bytes};
    return {data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // The deleter takes the context, not the data pointer: no raw allocation API.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    OutputCache::instance().give(block->data, block->bytes);
    delete block;
  }
};

inline HugePageAllocator* huge_page_allocator() {
  static HugePageAllocator allocator;
  return &allocator;
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
