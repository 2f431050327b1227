// Large CPU outputs on transparent huge pages.
//
// glibc maps every block above its largest mmap threshold (32 MiB on 64-bit Linux) anew
// on each allocation and unmaps it on free, so an op that returns such a tensor (medusa's
// (B, V, 4, 4) vertex transforms at B = 256 are 82 MB, a texture batch of 43 is 32 MiB)
// faults in every 4 KiB page of it on every call: under a hypervisor that costs more than
// writing the bytes. An output of kHugeOutputBytes or more is therefore allocated aligned
// to 2 MiB and advised MADV_HUGEPAGE, so that where the kernel grants transparent huge
// pages (its `enabled` setting `madvise` or `always`) the first write takes one fault per
// 2 MiB. It is still a fresh block, freed with the tensor: nothing is cached, and where
// huge pages are off the block behaves as any other. Smaller outputs, other devices and
// other systems take at::empty.
#pragma once

#include <cstddef>
#include <cstdlib>

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
constexpr std::size_t kHugeOutputBytes = std::size_t(32) << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t nbytes) override {
    const std::size_t rounded = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* data = nullptr;
    if (rounded == 0 || posix_memalign(&data, kHugePageBytes, rounded) != 0 || !data) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "flame_ext: could not allocate ", nbytes,
                       " bytes for an output tensor");
    }
    // Advice only: a kernel without transparent huge pages refuses it, and the block is
    // then an ordinary one.
    (void)madvise(data, rounded, MADV_HUGEPAGE);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* data) { std::free(data); }
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

#else

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

#endif

}  // namespace flame_ext
