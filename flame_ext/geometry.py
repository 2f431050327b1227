"""Mesh geometry on FLAME's vertices: `vertex_normals(v, faces)`.

The compiled op (`flame_ext._ops.normals`: deterministic gather kernels, CPU and CUDA)
when the library is loaded and has a kernel for v's device (outside torch.func transforms
and forward-mode AD, as the decoders' 'auto'), else the pure-PyTorch
`flame_ext.reference.vertex_normals` (with the library's one missing-extension warning).
Both check their arguments the same way (ValueError / TypeError naming the argument).
"""

from __future__ import annotations

import torch

from . import _backend, _ops, reference


# device type -> whether the compiled op has kernels there: settled on first use, then a
# dict read.
_USE_OPS: dict = {}


def _use_ops(device_type: str) -> bool:
    """Whether the compiled op serves here: it has kernels for the device type, and no
    torch.func transform or forward-AD level is active (as `_backend.resolve`)."""
    return not _ops.ops_not_differentiable_here() and _has_kernels(device_type)


@torch.compiler.assume_constant_result
def _has_kernels(device_type: str) -> bool:
    # A constant to torch.compile, which would otherwise trace the library loading and
    # the dispatcher queries of a first call made inside a compiled function.
    use = _USE_OPS.get(device_type)
    if use is None:
        if not _ops.available():
            _backend._warn_no_extension()
            use = False
        else:
            key = "CUDA" if device_type == "cuda" else "CPU"
            use = _ops.has_kernel("vertex_normals", key) and _ops.has_kernel(
                "vertex_normals_backward", key
            )
        _USE_OPS[device_type] = use
    return use


def vertex_normals(v: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit area-weighted vertex normals (pytorch3d's ``verts_normals``).

    v (B, V, 3) or (V, 3), float32/float64; faces (F, 3) int64 or int32 with values in
    [0, V). Returns v's shape: n_i = normalize(sum over the faces incident to vertex i of
    cross(v1 - v0, v2 - v0)). A vertex without faces, or with only degenerate ones, gets
    a zero normal and zero gradient; NaN in v gives NaN. Differentiable in v.

    On the compiled path the vertex-face adjacency is built once per faces tensor (and
    its in-place version) and kept; the result has the same bits on every run.
    """
    device_type = v.device.type if isinstance(v, torch.Tensor) else "cpu"
    if _use_ops(device_type):
        from ._ops import normals

        return normals.vertex_normals(v, faces)
    return reference.vertex_normals(v, faces)
