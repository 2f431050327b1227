// How a CUDA launcher starts a kernel: one source for the real CUDA build and for the SIMT
// emulation that runs the same kernels on the CPU in tests (csrc/simt/).
//
// A family's `<op>_kernels.cuh` holds its `__global__` kernels and, per launch, a host
// function that computes a LaunchPlan (grid, block, shared memory) from the sizes and the
// DeviceLimits. Its `<op>.cu` launcher checks the arguments, checks the device
// (check_kernel_device), takes a DeviceGuard and the current stream, returns early when
// there is no work, dispatches on the dtype and calls `launch(plan, stream, kernel, ...)`,
// which launches and checks the launch. Compiled by nvcc, these are CUDA's own; compiled by
// g++ with FLAME_EXT_SIMT defined, they are the SIMT runtime's, and the launcher registers
// its ops for CPU tensors under the `flame_ext_simt` namespace instead.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(FLAME_EXT_SIMT)
#include "simt/simt.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

// The op library and dispatch key the launchers register under.
#if defined(FLAME_EXT_SIMT)
#ifndef FLAME_EXT_KERNEL_LIB  // the planted-defect builds choose their own
#define FLAME_EXT_KERNEL_LIB flame_ext_simt
#endif
#define FLAME_EXT_KERNEL_KEY CPU
#else
#define FLAME_EXT_KERNEL_LIB flame_ext
#define FLAME_EXT_KERNEL_KEY CUDA
#endif

namespace flame_ext {

// The limits a launch plan must respect. CUDA's for compute capability >= 3.0; the SIMT
// runtime lets tests scale them down so multi-tile paths run at test sizes.
struct DeviceLimits {
  int64_t max_grid_x = std::numeric_limits<int32_t>::max();
  int64_t max_grid_y = 65535;
  int64_t max_grid_z = 65535;
  int64_t max_threads_per_block = 1024;
  int64_t max_shared_bytes = 48 * 1024;  // without the opt-in attribute
};

// What one launch needs: the kernel's name (for error messages), grid, block and dynamic
// shared memory in bytes.
struct LaunchPlan {
  const char* kernel;
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
};

#if defined(FLAME_EXT_SIMT)

using Stream = flame_simt::Stream;

inline DeviceLimits device_limits() {
  const flame_simt::Limits& l = flame_simt::limits();
  DeviceLimits d;
  d.max_grid_x = l.max_grid_x;
  d.max_grid_y = l.max_grid_y;
  d.max_grid_z = l.max_grid_z;
  d.max_threads_per_block = l.max_threads_per_block;
  d.max_shared_bytes = l.max_shared_bytes;
  return d;
}

inline Stream current_stream() { return Stream{}; }

// The emulation has one device: the CPU. Nothing to guard.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the emulated kernels, got one on ",
              t.device());
}

template <typename... Params, typename... Args>
void launch(const LaunchPlan& plan, Stream, void (*kernel)(Params...), Args&&... args) {
  flame_simt::launch(plan.kernel, plan.grid, plan.block, plan.shared_bytes,
                     [&]() { kernel(args...); });
}

#else  // the CUDA build

using Stream = cudaStream_t;

inline DeviceLimits device_limits() { return DeviceLimits{}; }

inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }

using DeviceGuard = c10::cuda::CUDAGuard;

inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// Launches on `stream` and checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename... Params, typename... Args>
void launch(const LaunchPlan& plan, Stream stream, void (*kernel)(Params...), Args&&... args) {
  kernel<<<plan.grid, plan.block, plan.shared_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace flame_ext

// Static shared memory of a kernel: `FLAME_SHARED(tile, float[256][3]);` declares `tile`.
// On CUDA it is `__shared__`; under the SIMT runtime it is fresh storage per block, filled
// with a poison pattern at the block's start, bounds-checked by AddressSanitizer and
// counted against the shared-memory limit.
#if defined(FLAME_EXT_SIMT)
#define FLAME_SHARED(name, ...) FLAME_SIMT_SHARED(name, __VA_ARGS__)
#else
namespace flame_ext {
template <typename T>
struct SharedType {
  using type = T;
};
}  // namespace flame_ext
#define FLAME_SHARED(name, ...) __shared__ typename ::flame_ext::SharedType<__VA_ARGS__>::type name
#endif
