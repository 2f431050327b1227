// The skin CUDA launchers and kernels (csrc/skin/skin.cu), compiled by the host compiler
// for the SIMT runtime (FLAME_EXT_SIMT): registered as flame_ext_simt::<op> for CPU tensors.
#include "skin/skin.cu"
