// The normals CUDA launchers and kernels (csrc/normals/normals.cu), compiled by the host compiler
// for the SIMT runtime (FLAME_EXT_SIMT): registered as flame_ext_simt::<op> for CPU tensors.
#include "normals/normals.cu"
