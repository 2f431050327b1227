"""Python side of the normals op family: the adjacency, the checked wrapper, fakes, autograd.

`vertex_normals(v, faces)` returns area-weighted unit vertex normals (pytorch3d's
``verts_normals``): n_i = normalize(sum over the faces incident to vertex i of
cross(v1 - v0, v2 - v0)), zero for a vertex whose sum is zero. The kernels gather per
vertex over a vertex-face adjacency instead of scattering per face, so they need no
atomics and give the same bits on every run, thread count and block order:

- `flame_ext::vertex_face_adjacency(faces, num_vertices) -> (offsets, entries)`, in torch
  ops (below, registered for every device): entries (3F,) lists every face corner
  3 * face + corner ordered by its vertex (a stable sort, so by face then corner within a
  vertex), offsets (V + 1,) where each vertex's run starts. It range-checks the faces (a
  ValueError naming `faces`): the one place the index values are read on the host.
- `flame_ext::vertex_normals(v, faces, offsets, entries)` and
  `flame_ext::vertex_normals_backward(grad_n, v, faces, offsets, entries) -> grad_v`, the
  C++/CUDA kernels (csrc/normals/).

The wrapper builds the adjacency once per faces tensor and keeps it (`_adjacency_of`);
`FlameShape.vertex_normals` keeps its own as non-persistent buffers.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from . import register_no_double_backward
from .._checks import check_tensor

_op = torch.ops.flame_ext.vertex_normals
_backward_op = torch.ops.flame_ext.vertex_normals_backward
_adjacency_op = torch.ops.flame_ext.vertex_face_adjacency

# Integer dtypes `faces` may have; int32 is converted to the kernels' int64.
FACE_DTYPES = (torch.int64, torch.int32)


@torch.library.impl("flame_ext::vertex_face_adjacency", "CompositeExplicitAutograd")
def _vertex_face_adjacency(faces, num_vertices):
    _check_adjacency_args(faces, num_vertices)
    flat = faces.reshape(-1)
    # One host read per faces tensor, the index check; skipped while a CUDA graph is
    # captured (a read would break the capture). Unchecked, a face with a corner out of
    # range never reaches a kernel's loads: its vertices' normals are NaN (normals.h).
    capturing = flat.is_cuda and torch.cuda.is_current_stream_capturing()
    if flat.numel() and not capturing:
        low, high = torch.aminmax(flat)
        low, high = int(low), int(high)
        if low < 0 or high >= num_vertices:
            bad = low if low < 0 else high
            raise ValueError(
                f"faces holds vertex index {bad}, out of range for {num_vertices} vertices"
            )
    # A stable sort keeps each vertex's corners in (face, corner) order: the order every
    # kernel sums in, on every device.
    values, entries = torch.sort(flat, stable=True)
    vertices = torch.arange(num_vertices + 1, dtype=values.dtype, device=values.device)
    offsets = torch.searchsorted(values, vertices)
    return offsets, entries


@torch.library.register_fake("flame_ext::vertex_face_adjacency")
def _vertex_face_adjacency_fake(faces, num_vertices):
    torch._check(faces.dim() == 2 and faces.shape[1] == 3, lambda: "faces must be (F, 3)")
    offsets = faces.new_empty((num_vertices + 1,))
    entries = faces.new_empty((faces.shape[0] * 3,))
    return offsets, entries


def _check_adjacency_args(faces, num_vertices):
    check_tensor("faces", faces, shape=(None, 3), dtype=FACE_DTYPES)
    if isinstance(num_vertices, torch.SymInt):  # traced: the fake checks the shapes
        return
    if isinstance(num_vertices, bool) or not isinstance(num_vertices, int) or num_vertices < 0:
        raise ValueError(f"num_vertices must be an int >= 0, got {num_vertices!r}")


def vertex_face_adjacency(faces, num_vertices):
    """The vertex-face adjacency of `faces` (F, 3) int64/int32 over `num_vertices`
    vertices: (offsets (V + 1,), entries (3F,)) int64 on faces' device, see the module
    docstring. Raises ValueError when a face index is outside [0, num_vertices)."""
    _check_adjacency_args(faces, num_vertices)
    return _adjacency_op(faces.long(), num_vertices)


# Adjacencies of recent faces tensors: id(faces) -> (weak reference to faces, its
# version, num_vertices, offsets, entries). The weak reference drops an entry when its
# tensor dies (so a new tensor at a reused id or address never meets a stale table), the
# version catches in-place changes through torch. A change torch does not see (a write
# through numpy into a tensor made by torch.from_numpy) is caught by the CPU kernel, which
# checks every entry against the faces it is given (check_adjacency_values in
# csrc/normals/normals_cpu.cpp): `vertex_normals` then builds the table again. So the
# faces given to a kernel are always the caller's current ones, never a kept copy.
_CACHE_SIZE = 8
_cache: "OrderedDict[int, tuple]" = OrderedDict()
_cache_lock = threading.Lock()
# The start of the CPU kernel's error for an entry that is not a corner of its vertex.
_STALE_ENTRY = "flame_ext::vertex_normals: entries["


def _forget(key, ref=None):
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None and (ref is None or entry[0] is ref):
            del _cache[key]


def _build(faces, num_vertices):
    faces64 = faces.to(torch.int64).contiguous()
    offsets, entries = _adjacency_op(faces64, num_vertices)
    return faces64, offsets, entries


def _adjacency_of(faces, num_vertices):
    """(int64 faces, offsets, entries) for `faces`, the adjacency built once per faces
    tensor and version. Under torch.compile the adjacency op is traced instead (no cache)."""
    if torch.compiler.is_compiling():
        return _build(faces, num_vertices)
    try:
        version = faces._version
    except RuntimeError:  # an inference tensor tracks no version: build every time
        return _build(faces, num_vertices)
    key = id(faces)
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None and entry[0]() is faces and entry[1:3] == (version, num_vertices):
            _cache.move_to_end(key)
            return faces.to(torch.int64).contiguous(), entry[3], entry[4]
    faces64, offsets, entries = _build(faces, num_vertices)
    ref = weakref.ref(faces, lambda r, key=key: _forget(key, r))
    with _cache_lock:
        _cache[key] = (ref, version, num_vertices, offsets, entries)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return faces64, offsets, entries


def _check_v(v):
    check_tensor("v", v, floating=True)
    if v.dim() not in (2, 3) or v.shape[-1] != 3:
        raise ValueError(f"v must have shape (B, V, 3) or (V, 3), got {tuple(v.shape)}")


def _check_faces(faces, v):
    check_tensor("faces", faces, shape=(None, 3), dtype=FACE_DTYPES)
    if faces.device != v.device:
        raise ValueError(
            f"faces is on {faces.device} but v is on {v.device}; they must be on the same device"
        )


def vertex_normals(v, faces):
    """Unit area-weighted vertex normals of `v` (B, V, 3) or (V, 3), float32/float64, of
    v's shape; `faces` (F, 3) int64 or int32 with values in [0, V) (ValueError naming
    `faces` otherwise). A vertex without faces or with only degenerate ones gets a zero
    normal and zero gradient; NaN in v gives NaN. Differentiable in v."""
    _check_v(v)
    _check_faces(faces, v)
    def rebuild():
        _forget(id(faces))
        return _adjacency_of(faces, v.shape[-2])

    return normals_with_kept_adjacency(v, *_adjacency_of(faces, v.shape[-2]), rebuild)


def normals_with_kept_adjacency(v, faces, offsets, entries, rebuild):
    """`vertex_normals_with_adjacency` on a kept table; where the CPU kernel finds that
    the table no longer matches faces (they changed where torch cannot see), once more
    on the (faces, offsets, entries) that `rebuild()` returns; at once where the table has
    entries for another number of faces (the kernel checks only the entries it has)."""
    if entries.shape[0] != faces.numel():
        faces, offsets, entries = rebuild()
    try:
        return vertex_normals_with_adjacency(v, faces, offsets, entries)
    except RuntimeError as error:
        if not str(error).startswith(_STALE_ENTRY):
            raise
        return vertex_normals_with_adjacency(v, *rebuild())


def vertex_normals_with_adjacency(v, faces, offsets, entries):
    """`vertex_normals` with a prebuilt adjacency (`vertex_face_adjacency(faces, V)`) and
    int64 faces, unchecked: FlameShape's path (its own buffers)."""
    if v.dim() == 2:
        return _op(v.unsqueeze(0), faces, offsets, entries).squeeze(0)
    return _op(v, faces, offsets, entries)


@torch.library.register_fake("flame_ext::vertex_normals")
def _vertex_normals_fake(v, faces, offsets, entries):
    torch._check(v.dim() == 3 and v.shape[2] == 3, lambda: "v must have shape (B, V, 3)")
    return v.new_empty(v.shape)


@torch.library.register_fake("flame_ext::vertex_normals_backward")
def _vertex_normals_backward_fake(grad_n, v, faces, offsets, entries):
    torch._check(v.dim() == 3 and v.shape[2] == 3, lambda: "v must have shape (B, V, 3)")
    return v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_n):
    grad_v = None
    if ctx.needs_input_grad[0]:
        grad_v = _backward_op(grad_n, *ctx.saved_tensors)
    # faces and the adjacency are integer tables.
    return grad_v, None, None, None


torch.library.register_autograd(
    "flame_ext::vertex_normals", _backward, setup_context=_setup_context
)
register_no_double_backward("vertex_normals_backward")
