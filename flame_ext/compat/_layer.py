"""What the compat layers share: the op path, FLAME's tables as the ops read them, the decode.

The layers keep their library's buffers (names, shapes, dtypes, so that state dicts load
both ways) and derive from them, as non-persistent buffers, what flame_ext's ops read:
the blend basis as one (3V, K) matrix, identity columns first, and the joint basis
J_regressor . [v_template | basis] (computed in float64 and rounded once, as FlameShape
does). `decode` runs FlameShape's op sequence on those tables: blend (joints) ->
rigid_transforms -> blend with pose correctives -> skin, as one autograd node on the
compiled ops in eager mode, with the identity blended once when it has batch 1.
Rotation-matrix poses (smplx's ``pose2rot=False``) take the kinematic chain from
`flame_ext.reference.kinematic_chain` and the two blends and the skinning from the ops.

The op path is the decoders' (flame_ext._backend; `backend='auto'`: the compiled ops
when loaded and built for the device, else `flame_ext.reference` with one warning).
The layers run FlameShapeLandmark's four ops (blend, rigid_transforms, skin, landmarks),
so they resolve 'auto' as it does; `steps` is the one place that reads the path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .. import _backend, reference
from .._checks import TREE, check_tensor

BACKENDS = ("auto", "ext", "reference")
# The decoder of flame_ext._backend.DECODER_OPS whose ops the layers run.
_OPS_OF = "FlameShapeLandmark"


def check_backend(backend: str) -> str:
    return _backend.check_backend(backend, BACKENDS)


def steps(backend: str, device: torch.device):
    """The step functions (blend, rigid_transforms, skin, landmarks, lbs) of the path
    `backend` takes for tensors on `device`; all have flame_ext.reference's signatures."""
    return _backend.steps(_backend.resolve(backend, device.type, _OPS_OF))


class Tables(NamedTuple):
    """A layer's tables in the form the ops read (views of its buffers where possible)."""

    v_template: torch.Tensor  # (V, 3)
    dirs: torch.Tensor  # (3V, K): identity columns first, then the rest
    j_template: torch.Tensor  # (3J,)
    j_dirs: torch.Tensor  # (3J, K)
    pose_dirs: torch.Tensor  # (P, 3V)
    parents: torch.Tensor  # (J,)
    lbs_weights: torch.Tensor  # (V, J)
    # dirs' identity and rest columns as contiguous (3V, n) and (3V, K - n) tables, where
    # the layer has them: the one-identity path blends them apart, and column slices of
    # dirs (None: what it reads then) stream slower (docs/PERFORMANCE.md).
    identity_dirs: Optional[torch.Tensor] = None
    rest_dirs: Optional[torch.Tensor] = None


def index_tables(module, get):
    """The layers' index tables and their bounds (`refuse_bad_loaded_indices`): the faces
    over the vertices, the parents a tree, the landmark faces (each table the layer has)
    over the faces."""
    faces = get("faces_tensor").shape[0]
    tables = [("faces_tensor", get("v_template").shape[0]), ("parents", TREE)]
    for name in ("lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
        if name in module._buffers:
            tables.append((name, faces))
    return tables


def check_input(name: str, value, dim: int, like: torch.Tensor, trailing=None) -> torch.Tensor:
    """An input of shape (B, dim) (or (B, *trailing)) in the layer's dtype and device."""
    shape = (None,) + (tuple(trailing) if trailing is not None else (dim,))
    check_tensor(name, value, shape=shape, floating=True)
    if value.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but the model is {like.dtype}; convert one of "
            "them (e.g. model.double())"
        )
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the model is on {like.device}")
    return value


def batch_of(values: dict) -> int:
    """The batch size of the inputs: each has batch 1 (broadcast) or the common size B."""
    batch = 1
    for value in values.values():
        if value.shape[0] != 1:
            batch = value.shape[0]
            break
    for name, value in values.items():
        size = value.shape[0]
        if size != 1 and size != batch:
            raise ValueError(
                f"{name} has batch size {size} but the batch size is {batch}; it must be "
                f"{batch} or 1"
            )
    return batch


def decode(
    k,
    tables: Tables,
    identity: torch.Tensor,
    rest: torch.Tensor,
    batch: int,
    pose: Optional[torch.Tensor] = None,
    rotations: Optional[torch.Tensor] = None,
    need_joints: bool = False,
):
    """Posed vertices of FLAME coefficients [identity | rest] and one pose per joint.

    identity (1 or B, n) and rest (1 or B, K - n) are the coefficients of the columns of
    tables.dirs; pose (B, J, 3) axis-angle, or rotations (B, J, 3, 3) taken as given.
    Returns (v (B, V, 3), transforms A (B, J, 4, 4), rest-pose joints (B, J, 3) or None
    unless need_joints).
    """
    num_joints, num_vertices = tables.parents.shape[0], tables.v_template.shape[0]
    v_base, j_base = tables.v_template.reshape(-1), tables.j_template
    v_dirs, j_dirs = tables.dirs, tables.j_dirs
    n = identity.shape[1]
    shared = (None, None, None)  # (shared_dirs, shared_coeffs, shared_joint_dirs) of lbs
    if identity.shape[0] == 1 and batch > 1:
        # one identity for the whole batch (a fitting loop): blended once, in the same
        # pass as the rest where the fused node runs
        identity_dirs, rest_dirs = tables.identity_dirs, tables.rest_dirs
        if identity_dirs is None:
            identity_dirs, rest_dirs = v_dirs[:, :n], v_dirs[:, n:]
        shared = (identity_dirs, identity, j_dirs[:, :n])
        v_dirs, j_dirs, coeffs = rest_dirs, j_dirs[:, n:], rest.expand(batch, -1)
    else:
        coeffs = torch.cat([identity.expand(batch, -1), rest.expand(batch, -1)], dim=1)

    if rotations is None:
        fused = k.lbs(v_base, v_dirs, j_base, j_dirs, coeffs, pose, tables.pose_dirs,
                      tables.parents, tables.lbs_weights, False, *shared)
        if fused is not None:
            v, _, transforms, joints = fused
            return v, transforms, (joints if need_joints else None)
    if shared[0] is not None:
        v_base = k.blend(v_base, shared[0], shared[1])
    if shared[2] is not None:
        j_base = k.blend(j_base, shared[2], shared[1])
    joints = k.blend(j_base, j_dirs, coeffs).view(batch, num_joints, 3)
    if rotations is None:
        transforms, pose_feature = k.rigid_transforms(pose, joints, tables.parents)
    else:
        transforms = reference.kinematic_chain(rotations, joints, tables.parents)
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        pose_feature = (rotations[:, 1:] - eye).flatten(1)
    v_posed = k.blend(v_base, v_dirs, coeffs, tables.pose_dirs, pose_feature)
    v, _ = k.skin(v_posed.view(batch, num_vertices, 3), transforms, tables.lbs_weights, False)
    return v, transforms, joints


def posed_joints(transforms: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
    """The world positions of the joints, (B, J, 3): A_j applied to the rest-pose joint
    J_j (A_j = [R_j | t_j - R_j J_j], so this is t_j, the chain's joint translation)."""
    rot, trans = transforms[..., :3, :3], transforms[..., :3, 3]
    return (rot @ joints.unsqueeze(-1)).squeeze(-1) + trans


# Points per call from which translate() takes the BLAS form on the CPU (below it the
# broadcast add is as fast: the product's fixed cost is ~30 us).
_TRANSLATE_BLAS_ELEMENTS = 1 << 17


@functools.lru_cache(maxsize=8)
def _coordinate_selector(num_points: int, dtype: torch.dtype, device: torch.device):
    """(3, 3 num_points): row c is 1 at the columns of coordinate c of every point. A
    normal tensor even when first asked for under inference mode, so that later calls
    with autograd can save it."""
    with torch.inference_mode(False):
        selector = torch.zeros(3, num_points, 3, dtype=dtype, device=device)
        selector[0, :, 0] = selector[1, :, 1] = selector[2, :, 2] = 1
        return selector.view(3, 3 * num_points)


def translate(points: torch.Tensor, transl: torch.Tensor) -> torch.Tensor:
    """points (B, n, 3) + transl (B or 1, 3) per sample, equal to
    ``points + transl.unsqueeze(1)`` bit for bit.

    On the CPU torch's broadcast add over an inner dimension of 3 runs at about a third of
    its same-shape rate (1.4 ms for a FLAME mesh at B = 64 on 2 threads, against 0.4 ms for
    a plain add of two meshes). Large float batches there go through one BLAS update
    instead, points (B, 3n) + transl @ S with the 0/1 selector S: each output is its
    point plus one translation coordinate plus zeros, exactly the sum of the add, and the
    gradients are those of the add. Non-finite translations (0 * inf is NaN) take the
    add, and so do traced and transformed calls (torch.compile, torch.func), where the
    finiteness test would be a data-dependent branch.
    """
    batch, num_points = points.shape[0], points.shape[1]
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or points.device.type != "cpu"
        or points.dtype not in (torch.float32, torch.float64)
        or transl.dtype != points.dtype
        or points.numel() < _TRANSLATE_BLAS_ELEMENTS
        or not bool(torch.isfinite(transl).all())
    ):
        return points + transl.unsqueeze(1)
    selector = _coordinate_selector(num_points, points.dtype, points.device)
    flat = torch.addmm(points.reshape(batch, 3 * num_points), transl.expand(batch, 3), selector)
    return flat.view(batch, num_points, 3)
