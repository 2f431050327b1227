"""Python side of the rigid_transforms op family: the kinematic chain.

`rigid_transforms(pose, joints, parents)` checks its arguments (ValueError / TypeError
naming the argument) and calls `torch.ops.flame_ext.rigid_transforms`. This module also
registers the fake kernels of `rigid_transforms` and `rigid_transforms_backward` (so
`torch.compile(fullgraph=True)` traces them) and their autograd: gradients reach pose and
joints through the hand-written backward op (`rigid_transforms_grads`, which the fused
node of lbs.py calls too). Double backward is not supported.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import register_no_double_backward
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
    """The kinematic chain (SPEC.md section 3 steps 3-5), as flame_ext.reference.rigid_transforms.

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


# The decoders' hot path: their arguments are checked where they enter or are the
# module's buffers, and the C++ ops validate shapes again (see blend.blend_unchecked).
rigid_transforms_unchecked = _ops.rigid_transforms


def rigid_transforms_grads(
    grad_transforms: torch.Tensor,
    grad_pose_feature: torch.Tensor,
    pose: torch.Tensor,
    joints: torch.Tensor,
    parents: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_pose, grad_joints) from the gradients of both outputs of rigid_transforms."""
    return _ops.rigid_transforms_backward(
        grad_transforms, grad_pose_feature, pose, joints, parents
    )


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


# Autograd.


def _rigid_transforms_setup(ctx, inputs, output):
    pose, joints, parents = inputs
    ctx.save_for_backward(pose, joints, parents)


def _rigid_transforms_backward(ctx, grad_transforms, grad_pose_feature):
    pose, joints, parents = ctx.saved_tensors
    grad_pose, grad_joints = rigid_transforms_grads(
        grad_transforms, grad_pose_feature, pose, joints, parents
    )
    return grad_pose, grad_joints, None


torch.library.register_autograd(
    "flame_ext::rigid_transforms",
    _rigid_transforms_backward,
    setup_context=_rigid_transforms_setup,
)
register_no_double_backward("rigid_transforms_backward")
