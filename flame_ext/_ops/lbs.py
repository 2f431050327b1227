"""FlameShape's four ops as one autograd node: the decoders' eager hot path.

FlameShape on the compiled ops is blend (joints) -> rigid_transforms -> blend (shape,
expression and pose correctives) -> skin. Each op has its autograd registered through
`torch.library.register_autograd` (flame_ext/_ops/{blend,rigid_transforms,skin}.py), which
is what `torch.compile` traces and what opcheck checks. In eager mode that registration
costs a trip through Python per op and per direction: at batch size 1 on a GPU, where each
kernel takes a few microseconds, it is most of the time of a decode. `FusedLbs` calls the
same ops below the autograd dispatch key, saves what their backward ops need, and chains
the families' own backward functions (`skin_grads`, `blend_grads`, `blend_base_grad`,
`rigid_transforms_grads`) in one Python backward: the same kernels, one autograd node.

`lbs(...)` takes this path when it can (eager mode, model tables that need no gradient)
and otherwise returns None, telling the caller to run the four ops one by one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._parametric import identity_rows
from . import ops_not_differentiable_here
from .blend import blend_base_grad, blend_grads, blend_shared_grads, sum_by_identity
from .rigid_transforms import rigid_transforms_grads
from .skin import skin_grads

_ops = torch.ops.flame_ext
_below_autograd = torch._C._AutoDispatchBelowAutograd


class FusedLbs(torch.autograd.Function):
    """(v, vertex_transforms, transforms, joints) of the FLAME chain; arguments as `lbs`."""

    @staticmethod
    def forward(
        ctx, v_base, v_dirs, j_base, j_dirs, coeffs, pose, pose_dirs, parents, lbs_weights,
        want_vertex_transforms, shared_dirs, shared_coeffs, shared_joint_dirs, identity,
    ):
        batch, n_joints = pose.shape[:2]
        n_verts = lbs_weights.shape[0]
        with _below_autograd():
            no_pose_dirs = coeffs.new_empty((0, j_dirs.shape[0]))
            joint_base = j_base
            if shared_joint_dirs is not None:
                joint_base = _ops.blend.default(
                    j_base, shared_joint_dirs, shared_coeffs, no_pose_dirs,
                    coeffs.new_empty((shared_coeffs.shape[0], 0)),
                )
                if identity is not None:
                    joint_base = identity_rows(joint_base, identity)
            joints = _ops.blend.default(
                joint_base, j_dirs, coeffs, no_pose_dirs, coeffs.new_empty((batch, 0))
            ).view(batch, n_joints, 3)
            transforms, pose_feature = _ops.rigid_transforms.default(pose, joints, parents)
            if shared_dirs is None:
                v_posed = _ops.blend.default(v_base, v_dirs, coeffs, pose_dirs, pose_feature)
            else:
                v_posed = _ops.blend_shared.default(
                    v_base, shared_dirs, shared_coeffs, v_dirs, coeffs, pose_dirs, pose_feature,
                    identity,
                )
            v_posed = v_posed.view(batch, n_verts, 3)
            v, vertex_transforms = _ops.skin.default(
                v_posed, transforms, lbs_weights, want_vertex_transforms
            )
        ctx.save_for_backward(
            v_base, j_base, v_dirs, j_dirs, pose, joints, transforms, v_posed, pose_dirs,
            no_pose_dirs, parents, lbs_weights, shared_dirs, shared_joint_dirs, identity,
        )
        ctx.identities = shared_coeffs.shape[0] if shared_coeffs is not None else 1
        ctx.want_vertex_transforms = want_vertex_transforms
        ctx.set_materialize_grads(False)
        if not want_vertex_transforms:
            ctx.mark_non_differentiable(vertex_transforms)
        return v, vertex_transforms, transforms, joints

    @staticmethod
    def backward(ctx, grad_v, grad_vertex_transforms, grad_transforms, grad_joints_out):
        # create_graph=True: refused outright. once_differentiable raises only where an
        # incoming gradient requires grad; with a constant one (v.sum()) it would return
        # a gradient without its second-order part, silently.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) through FlameShape's fused ops is not "
                "supported; use backend='reference' for higher-order gradients"
            )
        (
            v_base, j_base, v_dirs, j_dirs, pose, joints, transforms, v_posed, pose_dirs,
            no_pose_dirs, parents, lbs_weights, shared_dirs, shared_joint_dirs, identity,
        ) = ctx.saved_tensors
        need_v_base, _, need_j_base, _, need_coeffs, need_pose = ctx.needs_input_grad[:6]
        need_shared = ctx.needs_input_grad[11]
        # the shared row's joints take their gradient through the chain too
        need_shared_joints = need_shared and shared_joint_dirs is not None
        need_chain = need_pose or need_coeffs or need_j_base or need_shared_joints
        batch = pose.shape[0]
        grad_v_base = grad_j_base = grad_coeffs = grad_pose = grad_shared = None
        with _below_autograd():
            grad_v_posed, grad_from_skin = skin_grads(
                grad_v, grad_vertex_transforms, v_posed, transforms, lbs_weights,
                ctx.want_vertex_transforms,
            )
            grad_v_posed = grad_v_posed.view(batch, v_dirs.shape[0])
            if need_v_base:
                grad_v_base = blend_base_grad(grad_v_posed, v_base.dim(), v_base.shape[0])
            if shared_dirs is not None and (need_chain or need_shared):
                grad_shared, grad_coeffs, grad_pose_feature = blend_shared_grads(
                    grad_v_posed, shared_dirs, v_dirs, pose_dirs, need_shared, need_coeffs,
                    need_chain, identity, ctx.identities,
                )
            elif need_chain:
                grad_coeffs, grad_pose_feature = blend_grads(
                    grad_v_posed, v_dirs, pose_dirs, need_coeffs, True
                )
            if need_chain:
                if grad_transforms is not None:
                    grad_from_skin = grad_from_skin + grad_transforms
                grad_pose, grad_joints = rigid_transforms_grads(
                    grad_from_skin, grad_pose_feature, pose, joints, parents
                )
                grad_joints = grad_joints.view(batch, j_dirs.shape[0])
                if grad_joints_out is not None:
                    grad_joints = grad_joints + grad_joints_out.reshape(grad_joints.shape)
                if need_j_base:
                    grad_j_base = blend_base_grad(grad_joints, j_base.dim(), j_base.shape[0])
                if need_coeffs:
                    grad_coeffs = grad_coeffs + blend_grads(
                        grad_joints, j_dirs, no_pose_dirs, True, False
                    )[0]
                if need_shared_joints:
                    grad_shared = grad_shared + blend_grads(
                        sum_by_identity(grad_joints, identity, ctx.identities),
                        shared_joint_dirs, no_pose_dirs, True, False,
                    )[0]
        return (
            grad_v_base, None, grad_j_base, None, grad_coeffs,
            grad_pose if need_pose else None, None, None, None, None, None, grad_shared, None,
            None,
        )


def lbs(
    v_base: torch.Tensor,
    v_dirs: torch.Tensor,
    j_base: torch.Tensor,
    j_dirs: torch.Tensor,
    coeffs: torch.Tensor,
    pose: torch.Tensor,
    pose_dirs: torch.Tensor,
    parents: torch.Tensor,
    lbs_weights: torch.Tensor,
    want_vertex_transforms: bool,
    shared_dirs: Optional[torch.Tensor] = None,
    shared_coeffs: Optional[torch.Tensor] = None,
    shared_joint_dirs: Optional[torch.Tensor] = None,
    identity: Optional[torch.Tensor] = None,
) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """The FLAME chain in one autograd node, or None where the caller must run the steps.

    v_base (N,) or (1, N) with N = 3V, v_dirs (N, K), j_base (3J,) or (1, 3J), j_dirs
    (3J, K), coeffs (B, K), pose (B, J, 3), pose_dirs (P, N), parents (J,), lbs_weights
    (V, J): the decoders' tables and checked inputs (no Python checks here; the ops check
    shapes). With shared_dirs (N, Ks) and shared_coeffs (1, Ks) (one identity for the whole
    batch) the mesh blend is `blend_shared`: v_base is then the template, and the shared
    row is blended in the same pass as the rest; gradients reach shared_coeffs too. With
    shared_joint_dirs (3J, Ks) as well, j_base is the joints' template and the shared
    row's joints j_base + shared_joint_dirs @ shared_coeffs^T are blended here too (one
    autograd node for the whole decode). With identity (B,) as well, shared_coeffs is (S,
    Ks) and frame b takes shared row identity[b] (FlameShape's identity-indexed batches):
    each row is blended once, in the same pass as the rest. Returns (v (B, V, 3),
    vertex_transforms (B, V, 4, 4) or None, transforms (B, J, 4, 4), the rest-pose joints
    (B, J, 3)). Gradients reach v_base, j_base, coeffs and pose; double backward is not
    supported (nor is it through the skin op). None under torch.compile (which traces the
    ops' own registrations), under torch.func transforms and forward-mode AD, and when a
    model table needs a gradient.
    """
    # torch.func transforms accept only autograd.Functions with setup_context and a vmap
    # rule, and the node has no forward-mode derivative; the ops one by one run there
    # (vmap through functorch's fallbacks).
    if torch.compiler.is_compiling() or ops_not_differentiable_here():
        return None
    if torch.is_grad_enabled() and (
        v_dirs.requires_grad or j_dirs.requires_grad or pose_dirs.requires_grad
        or lbs_weights.requires_grad or (shared_dirs is not None and shared_dirs.requires_grad)
        or (shared_joint_dirs is not None and shared_joint_dirs.requires_grad)
    ):
        return None
    v, vertex_transforms, transforms, joints = FusedLbs.apply(
        v_base, v_dirs, j_base, j_dirs, coeffs, pose, pose_dirs, parents, lbs_weights,
        want_vertex_transforms, shared_dirs, shared_coeffs, shared_joint_dirs, identity,
    )
    return v, (vertex_transforms if want_vertex_transforms else None), transforms, joints
