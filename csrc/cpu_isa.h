// Which x86 instruction set the CPU loops run with, for every op family at once.
//
// The extension is built without -march flags so that it runs on any x86-64 CPU; the hot
// CPU loops are compiled a second (and third) time for AVX2 + FMA (and AVX-512) and one
// build is picked at run time: the widest the CPU has, or a narrower one named by
// $FLAME_EXT_CPU_ISA ("avx2" or "baseline"; never a wider one), so that tests can run
// every variant on one machine. The choice is made once per process.
//
// Two ways of compiling the wider builds, depending on the compiler:
// - FLAME_EXT_ISA_TARGET_ATTRIBUTE (GCC and Clang on x86): per-function
//   `__attribute__((target(...)))`, as FLAME_TARGET_AVX2 / FLAME_TARGET_AVX512 below
//   (skin's vertex loops);
// - FLAME_EXT_ISA_TARGET_PRAGMA (g++ on x86-64 only): `#pragma GCC target` around a whole
//   included file of loops (blend's), which Clang does not honour.
// A family reports to cpu_isa() only the builds it compiled: where it has none, it runs
// its baseline loops whatever cpu_isa() says.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FLAME_EXT_ISA_TARGET_ATTRIBUTE 1
#define FLAME_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FLAME_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FLAME_EXT_ISA_TARGET_PRAGMA 1
#endif

namespace flame_ext {

// Ordered: a wider set includes the narrower ones.
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest of Isa the CPU supports, capped by $FLAME_EXT_CPU_ISA.
inline Isa cpu_isa() {
#if defined(FLAME_EXT_ISA_TARGET_ATTRIBUTE)
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      best = Isa::kAvx512;
    const char* forced = std::getenv("FLAME_EXT_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return Isa::kBaseline;
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && best == Isa::kAvx512)
      return Isa::kAvx2;
    return best;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

// A hint to bring the cache line at p into L2 (prefetcht1), for the loops of every build
// (inlined into each); nothing without GCC/Clang.
#if defined(__GNUC__)
inline __attribute__((always_inline)) void prefetch_l2(const void* p) {
  __builtin_prefetch(p, 0, 2);
}
#else
inline void prefetch_l2(const void*) {}
#endif

// A whole number, 0 or more, from the environment variable `name`; `fallback` when it is
// unset or anything else.
inline int64_t env_count(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  return end != value && *end == '\0' && parsed >= 0 ? int64_t(parsed) : fallback;
}

}  // namespace flame_ext
