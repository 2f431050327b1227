"""Python side of the landmarks op family: the checked wrapper, fake kernels and autograd.

`landmarks(...)` checks its arguments (ValueError / TypeError naming the argument) and
calls `flame_ext::landmarks`, which picks each sample's contour bin from its pose and
gathers the barycentric landmarks in one pass. Gradients flow to `v` only: the bin choice
is piecewise constant in the pose, so `poses` gets none, and the barycentric tables are
model constants (a table that requires grad gets none). `flame_ext::landmarks_backward`
is linear in the incoming gradient, so its own derivative (double backward) is the
forward gather with the bins fixed, written in torch ops.

Index values are not checked here (that would need a host-device sync on CUDA): the
loaders validate the model tables once, the CPU kernel raises on a bad index and the CUDA
kernel never reads out of bounds.
"""

from __future__ import annotations

import torch

from .. import reference
from .._checks import check_same, check_tensor

# contour_rule string -> the op's integer argument (0 means no contour landmarks).
CONTOUR_RULES = {rule: code for code, rule in enumerate(reference.CONTOUR_RULES, 1)}

_op = torch.ops.flame_ext.landmarks
_backward_op = torch.ops.flame_ext.landmarks_backward


def _check_tables(v, tris, lmk_faces_idx, lmk_bary_coords):
    check_tensor("tris", tris, shape=(None, 3), dtype=torch.int64)
    check_tensor("lmk_faces_idx", lmk_faces_idx, ndim=1, dtype=torch.int64)
    check_tensor("lmk_bary_coords", lmk_bary_coords, shape=(lmk_faces_idx.shape[0], 3))
    for name, t in (("tris", tris), ("lmk_faces_idx", lmk_faces_idx)):
        if t.device != v.device:
            raise ValueError(
                f"{name} is on {t.device} but v is on {v.device}; "
                "they must be on the same device"
            )
    check_same("lmk_bary_coords", lmk_bary_coords, v, "v")


def _check_contour(v, poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords):
    check_tensor("dynamic_lmk_faces_idx", dynamic_lmk_faces_idx, ndim=2, dtype=torch.int64)
    n_bins, n_contour = dynamic_lmk_faces_idx.shape
    if n_bins == 0:
        raise ValueError(
            "dynamic_lmk_faces_idx must have at least one bin (row), got shape "
            f"{tuple(dynamic_lmk_faces_idx.shape)}"
        )
    if dynamic_lmk_faces_idx.device != v.device:
        raise ValueError(
            f"dynamic_lmk_faces_idx is on {dynamic_lmk_faces_idx.device} but v is on "
            f"{v.device}; they must be on the same device"
        )
    check_tensor(
        "dynamic_lmk_bary_coords", dynamic_lmk_bary_coords, shape=(n_bins, n_contour, 3)
    )
    check_same("dynamic_lmk_bary_coords", dynamic_lmk_bary_coords, v, "v")
    if poses is None:
        raise ValueError("poses is required when dynamic (contour) landmarks are given")
    check_tensor("poses", poses, ndim=2)
    if poses.shape[0] != v.shape[0] or poses.shape[1] < 6 or poses.shape[1] % 3:
        raise ValueError(
            f"poses must have shape ({v.shape[0]}, 3J) with J >= 2 (global, neck, ...), "
            f"got {tuple(poses.shape)}"
        )
    check_same("poses", poses, v, "v")


def landmarks(
    v,
    poses,
    tris,
    lmk_faces_idx,
    lmk_bary_coords,
    dynamic_lmk_faces_idx=None,
    dynamic_lmk_bary_coords=None,
    contour_rule="medusa",
):
    """Barycentric landmarks on the mesh (SPEC.md section 2), (B, Ld + L, 3), contour points first.

    v (B, V, 3) float32/float64; poses (B, 3J) as from FlameShape.get_full_pose() (only
    read with contour landmarks; may be None without them); tris (F, 3) int64;
    lmk_faces_idx (L,) int64; lmk_bary_coords (L, 3) in v's dtype; dynamic_lmk_faces_idx
    (NB, Ld) int64 and dynamic_lmk_bary_coords (NB, Ld, 3), both or neither (neither: no
    contour, only the L static landmarks). contour_rule: 'medusa' (Euler 'XYZ', negated
    yaw: medusa's rule, the default) or 'deca' (Rodrigues, positive yaw).

    The op also returns each sample's bin, (B,) int64 (zeros without contour landmarks),
    which this wrapper keeps for the backward only.

    Contour bin: yaw clamped above at 39 degrees and rounded half to even; bins 0..39
    hold yaw 0..39, 40..78 hold -1..-39, 78 everything below. A NaN pose selects the last
    bin (as medusa's eager code does on the CPU); a table with NB < 79 bins has the bins
    past its end clamped to NB - 1.
    """
    if not isinstance(contour_rule, str):
        raise TypeError(
            f"contour_rule must be a str, one of {tuple(CONTOUR_RULES)}, "
            f"got {type(contour_rule).__name__}"
        )
    rule = CONTOUR_RULES.get(contour_rule)
    if rule is None:
        raise ValueError(
            f"contour_rule must be one of {tuple(CONTOUR_RULES)}, got {contour_rule!r}"
        )
    check_tensor("v", v, ndim=3, floating=True)
    if v.shape[2] != 3:
        raise ValueError(f"v must have shape (B, V, 3), got {tuple(v.shape)}")
    _check_tables(v, tris, lmk_faces_idx, lmk_bary_coords)
    if (dynamic_lmk_faces_idx is None) != (dynamic_lmk_bary_coords is None):
        raise ValueError(
            "dynamic_lmk_faces_idx and dynamic_lmk_bary_coords must be given together "
            "or not at all"
        )
    if dynamic_lmk_faces_idx is not None:
        _check_contour(v, poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords)
    return landmarks_unchecked(
        v, poses, tris, lmk_faces_idx, lmk_bary_coords,
        dynamic_lmk_faces_idx, dynamic_lmk_bary_coords, contour_rule,
    )


def landmarks_unchecked(
    v,
    poses,
    tris,
    lmk_faces_idx,
    lmk_bary_coords,
    dynamic_lmk_faces_idx=None,
    dynamic_lmk_bary_coords=None,
    contour_rule="medusa",
):
    """`landmarks` without the Python argument checks, for the decoders' hot path (their
    inputs are checked where they enter, the tables are their buffers; the C++ op checks
    shapes again)."""
    poses, dyn_faces, dyn_bary, rule = contour_arguments(
        v, poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords, contour_rule
    )
    lmk, _ = _op(v, poses, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, rule)
    return lmk


def contour_arguments(v, poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords, contour_rule):
    """(poses, dynamic faces, dynamic barycentrics, rule code) as `flame_ext::landmarks`
    takes them. Without contour tables (None) the op reads neither the pose nor the
    dynamic tables: empty placeholders and rule 0."""
    rule = CONTOUR_RULES[contour_rule]
    if dynamic_lmk_faces_idx is None:
        empty = v.new_empty(0)
        return empty, empty, empty, 0
    return poses, dynamic_lmk_faces_idx, dynamic_lmk_bary_coords, rule


@torch.library.register_fake("flame_ext::landmarks")
def _landmarks_fake(
    v, poses, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, contour_rule
):
    torch._check(v.dim() == 3 and v.shape[2] == 3, lambda: "v must have shape (B, V, 3)")
    n_contour = 0
    if contour_rule != 0:
        torch._check(dyn_faces.dim() == 2, lambda: "dynamic_lmk_faces_idx must be 2-D")
        n_contour = dyn_faces.shape[1]
    batch = v.shape[0]
    lmk = v.new_empty((batch, n_contour + lmk_faces_idx.shape[0], 3))
    bins = v.new_empty((batch,), dtype=torch.int64)
    return lmk, bins


@torch.library.register_fake("flame_ext::landmarks_backward")
def _landmarks_backward_fake(
    grad_lmk, bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, num_vertices
):
    torch._check(grad_lmk.dim() == 3, lambda: "grad_lmk must have shape (B, L, 3)")
    return grad_lmk.new_empty((grad_lmk.shape[0], num_vertices, 3))


def _setup_context(ctx, inputs, output):
    v, _, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, _ = inputs
    _, bins = output
    ctx.mark_non_differentiable(bins)
    ctx.save_for_backward(bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary)
    ctx.num_vertices = v.shape[1]


def _backward(ctx, grad_lmk, _grad_bins):
    grad_v = None
    if ctx.needs_input_grad[0]:
        grad_v = _backward_op(grad_lmk, *ctx.saved_tensors, ctx.num_vertices)
    # poses: the bin choice is piecewise constant; the tables are model constants.
    return grad_v, None, None, None, None, None, None, None


torch.library.register_autograd(
    "flame_ext::landmarks", _backward, setup_context=_setup_context
)


def _gather(x, bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, n_contour):
    """The forward gather with given bins, in plain torch ops: x (B, V, 3) -> (B, Ld+L, 3).
    A sample without a bin (-1: a non-finite pose) gathers zeros for its contour points
    (they were NaN constants, with no gradient)."""
    batch, n_static = x.shape[0], lmk_faces_idx.shape[0]
    faces = lmk_faces_idx.expand(batch, n_static)
    bary = lmk_bary_coords.expand(batch, n_static, 3)
    if n_contour:
        has_bin = (bins >= 0).to(dyn_bary.dtype).view(batch, 1, 1)
        rows = bins.clamp(min=0)
        faces = torch.cat([dyn_faces.index_select(0, rows), faces], 1)
        bary = torch.cat([dyn_bary.index_select(0, rows) * has_bin, bary], 1)
    corners = tris.index_select(0, faces.reshape(-1)).view(batch, -1)
    points = x.gather(1, corners.unsqueeze(-1).expand(-1, -1, 3))
    return torch.einsum("blkc,blk->blc", points.view(batch, -1, 3, 3), bary)


def _backward_setup_context(ctx, inputs, output):
    grad_lmk, bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary, _ = inputs
    ctx.save_for_backward(bins, tris, lmk_faces_idx, lmk_bary_coords, dyn_faces, dyn_bary)
    ctx.n_contour = grad_lmk.shape[1] - lmk_faces_idx.shape[0]


def _double_backward(ctx, grad_grad_v):
    # landmarks_backward is linear in grad_lmk (the bins are fixed), so its adjoint is the
    # forward gather itself. Written in torch ops, so higher orders work too.
    grad_grad_lmk = None
    if ctx.needs_input_grad[0]:
        grad_grad_lmk = _gather(grad_grad_v, *ctx.saved_tensors, ctx.n_contour)
    return grad_grad_lmk, None, None, None, None, None, None, None


torch.library.register_autograd(
    "flame_ext::landmarks_backward", _double_backward, setup_context=_backward_setup_context
)
