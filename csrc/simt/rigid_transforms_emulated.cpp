// The rigid_transforms CUDA launchers and kernels (csrc/rigid_transforms/rigid_transforms.cu), compiled by the host compiler
// for the SIMT runtime (FLAME_EXT_SIMT): registered as flame_ext_simt::<op> for CPU tensors.
#include "rigid_transforms/rigid_transforms.cu"
