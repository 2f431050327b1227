"""Python side of the skin op family: linear blend skinning.

`skin(v_posed, transforms, lbs_weights, write_vertex_transforms)` checks its arguments
(ValueError / TypeError naming the argument) and calls `torch.ops.flame_ext.skin`. This
module also registers the fake kernels of `skin` and `skin_backward` (so
`torch.compile(fullgraph=True)` traces them) and their autograd: gradients reach v_posed
and transforms through the hand-written backward op (`skin_grads`, which the fused node of
lbs.py calls too) and lbs_weights through a torch expression (see `_skin_backward`).
Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import register_no_double_backward
from .._checks import check_same, check_tensor
from .rigid_transforms import MAX_JOINTS

_ops = torch.ops.flame_ext


def skin(
    v_posed: torch.Tensor,
    transforms: torch.Tensor,
    lbs_weights: torch.Tensor,
    write_vertex_transforms: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Linear blend skinning (docs/SPEC.md section 3 step 6), as flame_ext.reference.skin.

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
def skin_unchecked(v_posed, transforms, lbs_weights, write_vertex_transforms=True):
    """`skin` without the Python argument checks."""
    v, vertex_transforms = _ops.skin(v_posed, transforms, lbs_weights, write_vertex_transforms)
    return v, (vertex_transforms if write_vertex_transforms else None)


def skin_grads(
    grad_v: Optional[torch.Tensor],
    grad_vertex_transforms: Optional[torch.Tensor],
    v_posed: torch.Tensor,
    transforms: torch.Tensor,
    lbs_weights: torch.Tensor,
    write_vertex_transforms: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_v_posed, grad_transforms) from the gradients of skin's outputs.

    Either gradient may be None (an output nobody used); grad_vertex_transforms is
    ignored when the forward did not write vertex_transforms.
    """
    if not write_vertex_transforms:
        grad_vertex_transforms = None
    if grad_v is None:
        grad_v = torch.zeros_like(v_posed)
    return _ops.skin_backward(grad_v, grad_vertex_transforms, v_posed, transforms, lbs_weights)


# Fake kernels: shapes, dtypes and devices of the outputs, for tracing.


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
    grad_v_posed, grad_transforms = skin_grads(
        grad_v, grad_vertex_transforms, v_posed, transforms, lbs_weights,
        ctx.write_vertex_transforms,
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


torch.library.register_autograd(
    "flame_ext::skin", _skin_backward, setup_context=_skin_setup
)
register_no_double_backward("skin_backward")
