// The blend CUDA launchers and kernels (csrc/blend/blend.cu), compiled by the host compiler
// for the SIMT runtime (FLAME_EXT_SIMT): registered as flame_ext_simt::<op> for CPU tensors.
#include "blend/blend.cu"
