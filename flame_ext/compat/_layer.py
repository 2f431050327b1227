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
What the smplx layer computes after the decode (posed joints, landmarks, translation) is
`posed_outputs`, a second autograd node there.

The op path is the decoders' (flame_ext._backend; `backend='auto'`: the compiled ops
when loaded and built for the device, else `flame_ext.reference` with one warning).
The layers run FlameShapeLandmark's four ops (blend, rigid_transforms, skin, landmarks),
so they resolve 'auto' as it does; `steps` is the one place that reads the path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .. import _backend, _ops, reference
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
    return _translate(points, transl, _translate_by_blas(points, transl))


def _translate(points: torch.Tensor, transl: torch.Tensor, by_blas: bool) -> torch.Tensor:
    """translate() in the form `by_blas` names (`_translate_by_blas`)."""
    if not by_blas:
        return points + transl.unsqueeze(1)
    batch, num_points = points.shape[0], points.shape[1]
    selector = _coordinate_selector(num_points, points.dtype, points.device)
    flat_points, rows = points.reshape(batch, 3 * num_points), transl.expand(batch, 3)
    if torch.is_grad_enabled() and (points.requires_grad or transl.requires_grad):
        return torch.addmm(flat_points, rows, selector).view(batch, num_points, 3)
    # Without autograd the product is written into a fresh (B, n, 3) tensor rather than
    # returned as a view of one: an autograd.Function returning this (posed_outputs)
    # hands out tensors that may be changed in place, as the add's may.
    out = points.new_empty(points.shape)
    torch.addmm(flat_points, rows, selector, out=out.view(batch, 3 * num_points))
    return out


def _translate_by_blas(points: torch.Tensor, transl: torch.Tensor) -> bool:
    """Whether translate() takes the BLAS form for these arguments."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or points.device.type != "cpu"
        or points.dtype not in (torch.float32, torch.float64)
        or transl.dtype != points.dtype
        or points.numel() < _TRANSLATE_BLAS_ELEMENTS
        or not bool(torch.isfinite(transl).all())
    )


def _translate_grad(grad: torch.Tensor, transl: torch.Tensor, by_blas: bool) -> torch.Tensor:
    """The gradient of translate(points, transl) for transl, as autograd takes it from the
    form translate() ran: the selector's product for the BLAS form, a sum for the add."""
    if by_blas:
        selector = _coordinate_selector(grad.shape[1], grad.dtype, grad.device)
        per_sample = grad.reshape(grad.shape[0], -1) @ selector.t()
        return per_sample.sum_to_size(transl.shape)
    return grad.sum_to_size((transl.shape[0], 1, 3)).view(transl.shape)


def posed_outputs(
    k,
    v: torch.Tensor,
    transforms: torch.Tensor,
    joints: torch.Tensor,
    transl: Optional[torch.Tensor],
    poses: Optional[torch.Tensor],
    tris: torch.Tensor,
    lmk_faces_idx: torch.Tensor,
    lmk_bary_coords: torch.Tensor,
    dyn_faces: Optional[torch.Tensor] = None,
    dyn_bary: Optional[torch.Tensor] = None,
    contour_rule: str = "deca",
):
    """What the smplx layer returns after the decode, in one autograd node on the compiled
    ops: (joints, vertices) with joints = [posed_joints(transforms, joints) | static
    landmarks | contour landmarks] (B, J + L + Ld, 3), both translated by transl (1 or B,
    3) unless it is None. The landmarks are those of `k.landmarks` with the same tables
    (poses (B, 3J), J >= 2, of which the op reads the global and neck poses, and the
    dynamic tables only with contour landmarks).

    None where the caller must take the op-by-op path: steps that are not the compiled ops,
    torch.compile (which traces the ops' own registrations), torch.func transforms and
    forward-mode AD. In eager mode that path is a dozen small autograd nodes (the
    landmark op's through Python, the slices and cats of the landmark order, the joints'
    product, two translations): at B = 1 on the CPU their forward and backward cost a fifth
    of the whole layer's (docs/PERFORMANCE.md). The backward is written in
    differentiable ops, so double backward runs through it.
    """
    if not k.compiled or torch.compiler.is_compiling() or _ops.ops_not_differentiable_here():
        return None
    from .._ops.landmarks import contour_arguments  # the ops are loaded where k.compiled

    poses, dyn_faces, dyn_bary, rule = contour_arguments(v, poses, dyn_faces, dyn_bary,
                                                         contour_rule)
    out = _PosedOutputs.apply(v, transforms, joints, transl, poses, tris, lmk_faces_idx,
                              lmk_bary_coords, dyn_faces, dyn_bary, rule)
    return (out, v) if transl is None else out


def _rows_and_homogeneous(transforms: torch.Tensor, joints: torch.Tensor):
    """The rows [R_j | t_j] of every A_j, (B J, 3, 4), and the joints (J_j, 1), (B, J, 4):
    A_j J_j + t_j as one batched product."""
    batch, n_joints = joints.shape[:2]
    homogeneous = torch.cat([joints, joints.new_ones(batch, n_joints, 1)], dim=2)
    return transforms[:, :, :3].reshape(batch * n_joints, 3, 4), homogeneous


class _PosedOutputs(torch.autograd.Function):
    """posed_outputs' node: joints_out, and v_out when transl is given."""

    @staticmethod
    def forward(ctx, v, transforms, joints, transl, poses, tris, lmk_faces_idx,
                lmk_bary_coords, dyn_faces, dyn_bary, rule):
        with torch._C._AutoDispatchBelowAutograd():
            lmk, bins = torch.ops.flame_ext.landmarks.default(
                v, poses, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, rule
            )
        n_contour = lmk.shape[1] - lmk_faces_idx.shape[0]
        batch, n_joints = joints.shape[:2]
        rows, homogeneous = _rows_and_homogeneous(transforms, joints)
        posed = torch.bmm(rows, homogeneous.view(batch * n_joints, 4, 1))
        # smplx's order: the static landmarks, then the contour (the op writes it first)
        joints_out = torch.cat(
            [posed.view(batch, n_joints, 3), lmk[:, n_contour:], lmk[:, :n_contour]], dim=1
        )
        # the inputs themselves, not rows and homogeneous: double backward differentiates
        # the backward through what it saved
        ctx.save_for_backward(transforms, joints, transl, bins, tris, lmk_faces_idx,
                              lmk_bary_coords, dyn_faces, dyn_bary)
        ctx.set_materialize_grads(False)
        ctx.num_vertices, ctx.n_contour = v.shape[1], n_contour
        if transl is None:
            return joints_out
        ctx.blas = (_translate_by_blas(joints_out, transl), _translate_by_blas(v, transl))
        return (_translate(joints_out, transl, ctx.blas[0]),
                _translate(v, transl, ctx.blas[1]))

    @staticmethod
    def backward(ctx, grad_joints_out, grad_v_out=None):
        (transforms, joints, transl, bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces,
         dyn_bary) = ctx.saved_tensors
        need_v, need_transforms, need_joints, need_transl = ctx.needs_input_grad[:4]
        grad_v = grad_transforms = grad_joints = grad_transl = None
        if grad_joints_out is not None:
            batch, n_joints = joints.shape[:2]
            rows, homogeneous = _rows_and_homogeneous(transforms, joints)
            grad_posed = grad_joints_out[:, :n_joints].reshape(batch * n_joints, 3, 1)
            if need_v:
                grad_lmk = grad_joints_out[:, n_joints:]
                n_static = grad_lmk.shape[1] - ctx.n_contour
                if ctx.n_contour:
                    grad_lmk = torch.cat([grad_lmk[:, n_static:], grad_lmk[:, :n_static]], 1)
                args = (grad_lmk, bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces,
                        dyn_bary, ctx.num_vertices)
                if torch.is_grad_enabled():  # create_graph: through its registered autograd
                    grad_v = torch.ops.flame_ext.landmarks_backward(*args)
                else:
                    with torch._C._AutoDispatchBelowAutograd():
                        grad_v = torch.ops.flame_ext.landmarks_backward.default(*args)
            if need_transforms:  # the rows' adjoint; A_j's last row takes none
                grad_rows = torch.bmm(grad_posed, homogeneous.view(batch * n_joints, 1, 4))
                grad_transforms = torch.nn.functional.pad(
                    grad_rows.view(batch, n_joints, 3, 4), (0, 0, 0, 1))
            if need_joints:
                grad_joints = torch.bmm(rows[:, :, :3].transpose(1, 2), grad_posed)
                grad_joints = grad_joints.view(batch, n_joints, 3)
            if need_transl:
                grad_transl = _translate_grad(grad_joints_out, transl, ctx.blas[0])
        if grad_v_out is not None:
            if need_v:
                grad_v = grad_v_out if grad_v is None else grad_v + grad_v_out
            if need_transl:
                from_v = _translate_grad(grad_v_out, transl, ctx.blas[1])
                grad_transl = from_v if grad_transl is None else grad_transl + from_v
        return (grad_v, grad_transforms, grad_joints, grad_transl) + (None,) * 7
