// The SIMT test library: the schemas of flame_ext under the `flame_ext_simt` namespace (the
// emulated CUDA launchers of csrc/simt/*_emulated.cpp implement them for CPU tensors), and
// the runtime's controls: the schedule, the launch limits and what ran.
#include <sstream>
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "op_schemas.h"
#include "simt/simt.h"

namespace {

// order: 'in_order', 'reversed' or 'random' (seeded). Limits <= 0 restore CUDA's.
void simt_configure(const std::string& order, int64_t seed, int64_t max_grid_x,
                    int64_t max_grid_y, int64_t max_grid_z) {
  flame_simt::Schedule& s = flame_simt::schedule();
  if (order == "in_order") {
    s.order = flame_simt::Order::kInOrder;
  } else if (order == "reversed") {
    s.order = flame_simt::Order::kReversed;
  } else if (order == "random") {
    s.order = flame_simt::Order::kRandom;
  } else {
    TORCH_CHECK(false, "simt_configure: order must be 'in_order', 'reversed' or 'random', got '",
                order, "'");
  }
  s.seed = static_cast<uint64_t>(seed);
  const flame_simt::Limits cuda;
  flame_simt::Limits& l = flame_simt::limits();
  l.max_grid_x = max_grid_x > 0 && max_grid_x < cuda.max_grid_x ? max_grid_x : cuda.max_grid_x;
  l.max_grid_y = max_grid_y > 0 && max_grid_y < cuda.max_grid_y ? max_grid_y : cuda.max_grid_y;
  l.max_grid_z = max_grid_z > 0 && max_grid_z < cuda.max_grid_z ? max_grid_z : cuda.max_grid_z;
}

// {"kernel": [launches, blocks, threads, barriers, warp_ops], ...} as JSON.
std::string simt_stats() {
  std::ostringstream os;
  os << "{";
  bool first = true;
  for (const auto& [name, k] : flame_simt::stats()) {
    os << (first ? "" : ", ") << "\"" << name << "\": [" << k.launches << ", " << k.blocks
       << ", " << k.threads << ", " << k.barriers << ", " << k.warp_ops << "]";
    first = false;
  }
  os << "}";
  return os.str();
}

bool simt_sanitized() {
#ifdef FLAME_SIMT_ASAN
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(flame_ext_simt, m) {
  for (const char* schema : flame_ext::kOpSchemas) m.def(schema);
  m.def("simt_configure(str order, int seed, int max_grid_x, int max_grid_y, int max_grid_z) -> ()",
        &simt_configure);
  m.def("simt_stats() -> str", &simt_stats);
  m.def("simt_sanitized() -> bool", &simt_sanitized);
}
