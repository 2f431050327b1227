"""flame_ext: fast drop-in replacements for medusa's FLAME decoders.

    from flame_ext import FlameShape, FlameLandmark, FlameTex

works wherever ``from medusa.recon.flame.decoders import ...`` did. The compiled ops
(fused C++/CUDA kernels with hand-written backward) are used when they load; otherwise the
decoders run on ``flame_ext.reference`` (pure PyTorch) and warn once. A model file the
loaders refuse raises ``ModelFileError`` (a ValueError), ``UnsafePickleError`` when a
pickle names a global outside the allow-list. ``vertex_normals(v, faces)`` gives the
meshes' unit vertex normals (deterministic compiled kernels, differentiable).
``cpu_output_cache_info()`` / ``empty_cpu_output_cache()``: the blocks the CPU ops keep for
reuse by their large outputs.
"""

from . import synthetic
from ._info import build_info, cpu_output_cache_info, empty_cpu_output_cache
from .decoders import DEVICE, FlameLandmark, FlameShape, FlameTex
from .fitting import FlameShapeLandmark
from .geometry import vertex_normals
from .io import (
    ModelFileError,
    UnsafePickleError,
    load_flame_model,
    load_landmark_embedding,
    load_texture_space,
)
from .medusa_patch import patch_medusa, patched_medusa, unpatch_medusa

__version__ = "0.1.0"

__all__ = [
    "DEVICE",
    "FlameLandmark",
    "FlameShape",
    "FlameShapeLandmark",
    "FlameTex",
    "ModelFileError",
    "UnsafePickleError",
    "build_info",
    "cpu_output_cache_info",
    "empty_cpu_output_cache",
    "load_flame_model",
    "load_landmark_embedding",
    "load_texture_space",
    "patch_medusa",
    "patched_medusa",
    "synthetic",
    "unpatch_medusa",
    "vertex_normals",
]

# The compiled ops are registered on import, so that torch.ops.flame_ext.* is there for
# direct calls; when the library does not load, the decoders say why on first use.
from . import _ops as _compiled_ops  # noqa: E402

_compiled_ops._load()
