"""Python side of the skin op family: the kinematic chain and linear blend skinning.

`rigid_transforms(pose, joints, parents)` and `skin(v_posed, transforms, lbs_weights,
write_vertex_transforms)` check their arguments (ValueError / TypeError naming the
argument) and call `torch.ops.flame_ext.{rigid_transforms, skin}`. This module also
registers the fake kernels of the four ops (so `torch.compile(fullgraph=True)` traces
them) and their autograd: gradients reach pose, joints, v_posed, transforms and
lbs_weights through the hand-written backward ops (lbs_weights through a torch
expression, see `_skin_backward`). Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import check_same, check_tensor

# kMaxJoints of csrc/common.h: the kernels keep per-joint state in fixed-size arrays.
MAX_JOINTS = 16

_ops = torch.ops.flame_ext


def _check_parents(parents, n_joints: int, device: torch.device) -> None:
    check_tensor("parents", parents, shape=(n_joints,), dtype=torch.int64)
    if parents.device.type != "cpu" and parents.device != device:
        raise ValueError(
            f"parents must be on the CPU or on {device} (the device of pose), "
            f"got {parents.device}"
        )
    # Reading a CPU tensor is free; a CUDA one would synchronise, so the kernel guards
    # it instead (an invalid tree gives NaN there). Under tracing the values are unknown:
    # the CPU kernel checks them when it runs.
    if parents.device.type != "cpu" or torch.compiler.is_compiling():
        return
    values = parents.tolist()
    if values[0] != -1 or any(not 0 <= p < j for j, p in enumerate(values) if j > 0):
        raise ValueError(
            f"parents must have parents[0] = -1 and 0 <= parents[j] < j, got {values}"
        )


def rigid_transforms(
    pose: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kinematic chain (SPEC 3 steps 3-5), as flame_ext.reference.rigid_transforms.

    pose (B, J, 3) axis-angle, joints (B, J, 3), parents (J,) int64 on the CPU or on the
    device of pose, with parents[0] = -1 and 0 <= parents[j] < j; 1 <= J <= 16.
    Returns transforms (B, J, 4, 4) and pose_feature (B, 9 (J - 1)). Differentiable
    w.r.t. pose and joints.
    """
    check_tensor("pose", pose, ndim=3, floating=True)
    batch, n_joints = pose.shape[:2]
    check_tensor("pose", pose, shape=(batch, n_joints, 3))
    if not 1 <= n_joints <= MAX_JOINTS:
        raise ValueError(f"pose must have 1 to {MAX_JOINTS} joints (dim 1), got {n_joints}")
    check_tensor("joints", joints, shape=(batch, n_joints, 3))
    check_same("joints", joints, pose, "pose")
    _check_parents(parents, n_joints, pose.device)
    return _ops.rigid_transforms(pose, joints, parents)


def skin(
    v_posed: torch.Tensor,
    transforms: torch.Tensor,
    lbs_weights: torch.Tensor,
    write_vertex_transforms: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Linear blend skinning (SPEC 3 step 6), as flame_ext.reference.skin.

    v_posed (B, V, 3), transforms (B, J, 4, 4), lbs_weights (V, J), one dtype and device.
    Returns v (B, V, 3) and T (B, V, 4, 4) with T_v = sum_j lbs_weights[v, j] A_j, or None
    when write_vertex_transforms is False (T is 5x the bytes of v). Differentiable w.r.t.
    all three tensors.
    """
    check_tensor("v_posed", v_posed, ndim=3, floating=True)
    batch, n_verts = v_posed.shape[:2]
    check_tensor("v_posed", v_posed, shape=(batch, n_verts, 3))
    check_tensor("transforms", transforms, shape=(batch, None, 4, 4))
    n_joints = transforms.shape[1]
    if not 1 <= n_joints <= MAX_JOINTS:
        raise ValueError(
            f"transforms must have 1 to {MAX_JOINTS} joints (dim 1), got {n_joints}"
        )
    check_tensor("lbs_weights", lbs_weights, shape=(n_verts, n_joints))
    check_same("transforms", transforms, v_posed, "v_posed")
    check_same("lbs_weights", lbs_weights, v_posed, "v_posed")
    if not isinstance(write_vertex_transforms, bool):
        raise TypeError(
            "write_vertex_transforms must be a bool, got "
            f"{type(write_vertex_transforms).__name__}"
        )
    return skin_unchecked(v_posed, transforms, lbs_weights, write_vertex_transforms)


# The decoders' hot path: their arguments are checked where they enter or are the
# module's buffers, and the C++ ops validate shapes again (see blend.blend_unchecked).
rigid_transforms_unchecked = _ops.rigid_transforms


def skin_unchecked(v_posed, transforms, lbs_weights, write_vertex_transforms=True):
    """`skin` without the Python argument checks."""
    v, vertex_transforms = _ops.skin(v_posed, transforms, lbs_weights, write_vertex_transforms)
    return v, (vertex_transforms if write_vertex_transforms else None)


# Fake kernels: shapes, dtypes and devices of the outputs, for tracing.


@torch.library.register_fake("flame_ext::rigid_transforms")
def _rigid_transforms_fake(pose, joints, parents):
    batch, n_joints = pose.shape[:2]
    return (
        pose.new_empty((batch, n_joints, 4, 4)),
        pose.new_empty((batch, 9 * (n_joints - 1))),
    )


@torch.library.register_fake("flame_ext::rigid_transforms_backward")
def _rigid_transforms_backward_fake(grad_transforms, grad_pose_feature, pose, joints, parents):
    return torch.empty_like(pose, memory_format=torch.contiguous_format), torch.empty_like(
        pose, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("flame_ext::skin")
def _skin_fake(v_posed, transforms, lbs_weights, write_vertex_transforms):
    batch, n_verts = v_posed.shape[:2]
    v = v_posed.new_empty((batch, n_verts, 3))
    if write_vertex_transforms:
        return v, v_posed.new_empty((batch, n_verts, 4, 4))
    return v, v_posed.new_empty((0,))


@torch.library.register_fake("flame_ext::skin_backward")
def _skin_backward_fake(grad_v, grad_vertex_transforms, v_posed, transforms, lbs_weights):
    return (
        v_posed.new_empty(v_posed.shape),
        transforms.new_empty(transforms.shape),
    )


# Autograd.


def _rigid_transforms_setup(ctx, inputs, output):
    pose, joints, parents = inputs
    ctx.save_for_backward(pose, joints, parents)


def _rigid_transforms_backward(ctx, grad_transforms, grad_pose_feature):
    pose, joints, parents = ctx.saved_tensors
    grad_pose, grad_joints = _ops.rigid_transforms_backward(
        grad_transforms, grad_pose_feature, pose, joints, parents
    )
    return grad_pose, grad_joints, None


def _skin_setup(ctx, inputs, output):
    v_posed, transforms, lbs_weights, write_vertex_transforms = inputs
    ctx.save_for_backward(v_posed, transforms, lbs_weights)
    ctx.write_vertex_transforms = write_vertex_transforms
    # An unused vertex_transforms then arrives as None rather than a (B, V, 4, 4) tensor
    # of zeros that the backward would have to read.
    ctx.set_materialize_grads(False)


def _skin_backward(ctx, grad_v, grad_vertex_transforms):
    v_posed, transforms, lbs_weights = ctx.saved_tensors
    if not ctx.write_vertex_transforms:
        grad_vertex_transforms = None
    if grad_v is None:
        grad_v = torch.zeros_like(v_posed)
    grad_v_posed, grad_transforms = _ops.skin_backward(
        grad_v, grad_vertex_transforms, v_posed, transforms, lbs_weights
    )
    grad_weights = None
    if ctx.needs_input_grad[2]:
        # d/dw[v, j] = sum_b <grad T_v, A_j>, grad T_v = grad_v (x) [v_posed; 1] (top rows)
        # + grad_vertex_transforms. Rarely needed (weights are model constants), so a
        # plain torch expression rather than another kernel.
        moved = transforms[:, :, :3, :3] @ v_posed.unsqueeze(1).mT + transforms[:, :, :3, 3:]
        grad_weights = torch.einsum("bjrv,bvr->vj", moved, grad_v)
        if grad_vertex_transforms is not None:
            grad_weights = grad_weights + torch.einsum(
                "bvrc,bjrc->vj", grad_vertex_transforms, transforms
            )
    return grad_v_posed, grad_transforms, grad_weights, None


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward through flame_ext::{op} is not supported")

    return backward


torch.library.register_autograd(
    "flame_ext::rigid_transforms",
    _rigid_transforms_backward,
    setup_context=_rigid_transforms_setup,
)
torch.library.register_autograd(
    "flame_ext::skin", _skin_backward, setup_context=_skin_setup
)
def _no_setup(ctx, inputs, output):
    pass


for _op in ("rigid_transforms_backward", "skin_backward"):
    torch.library.register_autograd(
        f"flame_ext::{_op}", _no_double_backward(_op), setup_context=_no_setup
    )
