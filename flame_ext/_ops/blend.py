"""Python side of the blend op family: the linear basis blend and its adjoint.

`blend(base, dirs, coeffs, pose_dirs=None, pose_coeffs=None)` checks its arguments
(ValueError / TypeError naming the argument) and calls `torch.ops.flame_ext.blend`:
out = base + coeffs @ dirs.T + pose_coeffs @ pose_dirs, the shape/expression blend with
the pose correctives (docs/SPEC.md section 3 steps 1 and 4) and the texture blend.

This module also registers the fake kernels of `blend` and `blend_backward` (so
`torch.compile(fullgraph=True)` traces them) and their autograd. Gradients reach every
tensor argument: coeffs and pose_coeffs through the `blend_backward` op (`blend_grads`),
base by summing over the broadcast batch (`blend_base_grad`; the fused node of lbs.py
calls both too), dirs and pose_dirs through plain matrix products (they are model
constants in the decoders, so that path is never hot). `blend` is linear in coeffs, so the
backward of `blend_backward` is again a blend: double backward (and higher) works.

`blend_shared` adds a table whose coefficients are one row for the whole batch (FlameShape
with one identity for many frames), or S rows and an identity per sample picking one
(many identities in one batch); its op pair `blend_shared` / `blend_shared_backward` is
registered the same way, with the same gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_same, check_tensor
from .half_blend import HALF_DTYPES  # the storage dtypes of a half-precision dirs

_ops = torch.ops.flame_ext

# Device types with compiled kernels, read once: a lookup here keeps the wrapper traceable.
_HAS_KERNEL = {
    device: torch._C._dispatch_has_kernel_for_dispatch_key("flame_ext::blend", key)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def blend(
    base: torch.Tensor,
    dirs: torch.Tensor,
    coeffs: torch.Tensor,
    pose_dirs: Optional[torch.Tensor] = None,
    pose_coeffs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear basis blend, as flame_ext.reference.blend.

    base (N,), (1, N) or (B, N); dirs (N, K); coeffs (B, K); pose_dirs (P, N) and
    pose_coeffs (B, P), both or neither (P may be 0). One dtype (float32 or float64) and
    device, except that dirs may be stored as float16 or bfloat16 (a half-precision basis,
    as FlameTex(basis_dtype=...) keeps it): its values are widened exactly and summed in
    the dtype of the rest. Returns out (B, N) = base + coeffs @ dirs.T + pose_coeffs @
    pose_dirs, in that dtype.

    dirs may be a column slice of a wider matrix (row stride > K, unit column stride): it
    is read in place, never copied. Any other layout works too (copied once per call).
    Differentiable w.r.t. every tensor argument, to any order.
    """
    check_tensor("coeffs", coeffs, ndim=2, floating=True)
    batch, n_components = coeffs.shape
    check_tensor("dirs", dirs, ndim=2)
    check_tensor("dirs", dirs, shape=(None, n_components))
    check_same("dirs", dirs, coeffs, "coeffs", dtype=dirs.dtype not in HALF_DTYPES)
    n = dirs.shape[0]
    _check_base(base, n, (1, batch), dirs, coeffs)
    pose_dirs, pose_coeffs = _checked_pose(pose_dirs, pose_coeffs, coeffs, n)
    _check_has_kernel(coeffs, "blend")
    return blend_unchecked(base, dirs, coeffs, pose_dirs, pose_coeffs)


def _check_base(base, n, rows, dirs, coeffs):
    """base is (n,) or (r, n) for an r in `rows`, in coeffs' dtype and device."""
    check_tensor("base", base)
    if not ((base.dim() == 1 and base.shape[0] == n)
            or (base.dim() == 2 and base.shape[1] == n and base.shape[0] in rows)):
        shapes = [f"({n},)"] + [f"({r}, {n})" for r in dict.fromkeys(rows)]
        shapes = ", ".join(shapes[:-1]) + " or " + shapes[-1]
        raise ValueError(
            f"base must have shape {shapes} to match dirs {tuple(dirs.shape)} and coeffs "
            f"{tuple(coeffs.shape)}, got {tuple(base.shape)}"
        )
    check_same("base", base, coeffs, "coeffs")


def _checked_pose(pose_dirs, pose_coeffs, coeffs, n):
    """The pose correctives' pair, checked against coeffs (B, K) and N = n: both or
    neither."""
    if (pose_dirs is None) != (pose_coeffs is None):
        raise ValueError("pose_dirs and pose_coeffs must be given together or not at all")
    if pose_dirs is not None:
        check_tensor("pose_dirs", pose_dirs, ndim=2)
        check_tensor("pose_dirs", pose_dirs, shape=(None, n))
        check_tensor("pose_coeffs", pose_coeffs, shape=(coeffs.shape[0], pose_dirs.shape[0]))
        check_same("pose_dirs", pose_dirs, coeffs, "coeffs")
        check_same("pose_coeffs", pose_coeffs, coeffs, "coeffs")
    return pose_dirs, pose_coeffs


def _check_has_kernel(coeffs, op):
    if not _HAS_KERNEL.get(coeffs.device.type, False):
        raise RuntimeError(
            f"flame_ext::{op} has no kernel for {coeffs.device.type} tensors in this build "
            "(see flame_ext.build_info())"
        )


def blend_unchecked(base, dirs, coeffs, pose_dirs=None, pose_coeffs=None) -> torch.Tensor:
    """`blend` without the Python argument checks, for the decoders' hot path.

    Their arguments are checked where they enter (the decoder's inputs) or are the
    module's own buffers, and the C++ op validates shapes again; at batch size 1 on a GPU
    the Python checks would cost about as much as the kernels.
    """
    if pose_dirs is None:
        pose_dirs = coeffs.new_empty((0, dirs.shape[0]))
        pose_coeffs = coeffs.new_empty((coeffs.shape[0], 0))
    return _ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)


def blend_shared(
    base: torch.Tensor,
    shared_dirs: torch.Tensor,
    shared_coeffs: torch.Tensor,
    dirs: torch.Tensor,
    coeffs: torch.Tensor,
    pose_dirs: Optional[torch.Tensor] = None,
    pose_coeffs: Optional[torch.Tensor] = None,
    identity: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`blend` with one more table whose coefficients are shared by the samples.

    out (B, N) = base + shared_coeffs @ shared_dirs.T + coeffs @ dirs.T + pose_coeffs @
    pose_dirs, with base (N,) or (1, N), shared_dirs (N, Ks), shared_coeffs (1, Ks) and the
    rest as `blend` takes them (one dtype, float32 or float64: no half-precision table).
    The same as ``blend(blend(base, shared_dirs, shared_coeffs), dirs, coeffs, pose_dirs,
    pose_coeffs)`` (FlameShape with one identity for many frames), in one pass over the
    tables on the CPU. With identity (B,) int64, shared_coeffs is (S, Ks) and sample b
    takes row identity[b]: the same as ``blend(blend(base, shared_dirs,
    shared_coeffs)[identity], ...)`` (many identities in one batch), each shared row
    blended once. An identity out of [0, S) is a ValueError on the CPU; on CUDA (no host
    sync) that sample's outputs are NaN. Differentiable w.r.t. every floating-point tensor
    argument, to any order.
    """
    check_tensor("coeffs", coeffs, ndim=2, floating=True)
    n_components = coeffs.shape[1]
    check_tensor("dirs", dirs, ndim=2)
    check_tensor("dirs", dirs, shape=(None, n_components))
    check_same("dirs", dirs, coeffs, "coeffs")
    n = dirs.shape[0]
    check_tensor("shared_coeffs", shared_coeffs, ndim=2)
    if identity is None:
        check_tensor("shared_coeffs", shared_coeffs, shape=(1, None))
    else:
        check_tensor("identity", identity, shape=(coeffs.shape[0],), dtype=torch.int64)
        check_same("identity", identity, coeffs, "coeffs", dtype=False)
        if shared_coeffs.shape[0] < 1:
            raise ValueError("shared_coeffs must have at least one row for identity to pick")
    check_same("shared_coeffs", shared_coeffs, coeffs, "coeffs")
    check_tensor("shared_dirs", shared_dirs, shape=(n, shared_coeffs.shape[1]))
    check_same("shared_dirs", shared_dirs, coeffs, "coeffs")
    _check_base(base, n, (1,), dirs, coeffs)
    pose_dirs, pose_coeffs = _checked_pose(pose_dirs, pose_coeffs, coeffs, n)
    _check_has_kernel(coeffs, "blend_shared")
    return blend_shared_unchecked(
        base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs, identity
    )


def blend_shared_unchecked(
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs=None, pose_coeffs=None,
    identity=None,
) -> torch.Tensor:
    """`blend_shared` without the Python argument checks (as `blend_unchecked`)."""
    if pose_dirs is None:
        pose_dirs = coeffs.new_empty((0, dirs.shape[0]))
        pose_coeffs = coeffs.new_empty((coeffs.shape[0], 0))
    return _ops.blend_shared(base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs,
                             pose_coeffs, identity)


def blend_shared_grads(grad, shared_dirs, dirs, pose_dirs, need_shared_coeffs: bool,
                       need_coeffs: bool, need_pose_coeffs: bool, identity=None,
                       identities: int = 1):
    """(grad_shared_coeffs (S, Ks), grad_coeffs, grad_pose_coeffs) from the gradient (B, N)
    of blend_shared's output, each None unless asked for; S = identities rows picked by
    identity (one row without it)."""
    grads = _ops.blend_shared_backward(
        grad, shared_dirs, dirs, pose_dirs, need_shared_coeffs, need_coeffs, need_pose_coeffs,
        identity, identities,
    )
    return tuple(g if need else None for g, need in
                 zip(grads, (need_shared_coeffs, need_coeffs, need_pose_coeffs)))


def blend_grads(grad, dirs, pose_dirs, need_coeffs: bool, need_pose_coeffs: bool):
    """(grad_coeffs, grad_pose_coeffs) from the gradient (B, N) of blend's output.

    Each is None unless asked for. pose_dirs is (P, N) or empty, as the op takes it.
    """
    grad_coeffs, grad_pose_coeffs = _ops.blend_backward(
        grad, dirs, pose_dirs, need_coeffs, need_pose_coeffs
    )
    return (grad_coeffs if need_coeffs else None), (
        grad_pose_coeffs if need_pose_coeffs else None
    )


def blend_base_grad(grad: torch.Tensor, base_dim: int, base_rows: int) -> torch.Tensor:
    """The gradient of blend's base from the gradient (B, N) of its output.

    The base is (N,) (base_dim 1) or (base_rows, N) with base_rows 1 or B: its gradient is
    summed over the batch it was broadcast along.
    """
    if base_dim == 1:
        return grad.sum(0)
    if base_rows == 1:
        return grad.sum(0, keepdim=True)
    return grad


def _pose_count(pose_dirs: torch.Tensor, n: int) -> int:
    """P as the kernels read it: pose_dirs (P, N), or any empty tensor for P = 0."""
    if pose_dirs.dim() == 2 and pose_dirs.shape[1] == n:
        return pose_dirs.shape[0]
    return 0


# ---------------------------------------------------------------------------------------
# Fake kernels: output shapes only, for tracing.


@torch.library.register_fake("flame_ext::blend")
def _blend_fake(base, dirs, coeffs, pose_dirs, pose_coeffs):
    return coeffs.new_empty((coeffs.shape[0], dirs.shape[0]))


@torch.library.register_fake("flame_ext::blend_backward")
def _blend_backward_fake(grad_out, dirs, pose_dirs, need_coeffs, need_pose_coeffs):
    batch, n = grad_out.shape
    grad_coeffs = grad_out.new_empty((batch, dirs.shape[1]) if need_coeffs else (0,))
    n_pose = _pose_count(pose_dirs, n)
    grad_pose = grad_out.new_empty((batch, n_pose) if need_pose_coeffs else (0,))
    return grad_coeffs, grad_pose


@torch.library.register_fake("flame_ext::blend_shared")
def _blend_shared_fake(base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs,
                       identity=None):
    return coeffs.new_empty((coeffs.shape[0], dirs.shape[0]))


@torch.library.register_fake("flame_ext::blend_shared_backward")
def _blend_shared_backward_fake(grad_out, shared_dirs, dirs, pose_dirs, need_shared_coeffs,
                                need_coeffs, need_pose_coeffs, identity=None, identities=1):
    grad_shared = grad_out.new_empty(
        (identities, shared_dirs.shape[1]) if need_shared_coeffs else (0,))
    return (grad_shared,) + _blend_backward_fake(grad_out, dirs, pose_dirs, need_coeffs,
                                                 need_pose_coeffs)


# ---------------------------------------------------------------------------------------
# Autograd.


def _blend_setup_context(ctx, inputs, output):
    base, dirs, coeffs, pose_dirs, pose_coeffs = inputs
    ctx.save_for_backward(dirs, coeffs, pose_dirs, pose_coeffs)
    ctx.base_dim = base.dim()
    ctx.base_rows = base.shape[0] if base.dim() == 2 else 0


def _blend_backward(ctx, grad):
    dirs, coeffs, pose_dirs, pose_coeffs = ctx.saved_tensors
    need_base, need_dirs, need_coeffs, need_pose_dirs, need_pose_coeffs = ctx.needs_input_grad
    grad_base = grad_dirs = grad_coeffs = grad_pose_dirs = grad_pose_coeffs = None
    if need_coeffs or need_pose_coeffs:
        grad_coeffs, grad_pose_coeffs = blend_grads(
            grad, dirs, pose_dirs, need_coeffs, need_pose_coeffs
        )
    if need_base:
        grad_base = blend_base_grad(grad, ctx.base_dim, ctx.base_rows)
    # Matrix products in torch: dirs and pose_dirs are model constants in the decoders, so
    # these only run when a caller fits the bases themselves.
    if need_dirs:
        grad_dirs = (grad.mT @ coeffs).to(dirs.dtype)
    if need_pose_dirs:
        grad_pose_dirs = pose_coeffs.mT @ grad
    return grad_base, grad_dirs, grad_coeffs, grad_pose_dirs, grad_pose_coeffs


def _blend_backward_setup_context(ctx, inputs, output):
    grad_out, dirs, pose_dirs, need_coeffs, need_pose_coeffs = inputs
    ctx.save_for_backward(grad_out, dirs, pose_dirs)
    ctx.need_coeffs = need_coeffs
    ctx.need_pose_coeffs = need_pose_coeffs


def _blend_backward_backward(ctx, grad_grad_coeffs, grad_grad_pose):
    """Backward of (grad_coeffs, grad_pose) = (grad_out @ dirs, grad_out @ pose_dirs.T).

    Both are linear in grad_out, so its gradient is a blend with zero base; the dirs and
    pose_dirs gradients are the transposed products.
    """
    grad_out, dirs, pose_dirs = ctx.saved_tensors
    need_grad_out, need_dirs, need_pose_dirs = ctx.needs_input_grad[:3]
    batch, n = grad_out.shape
    # An output that was not asked for is (0,); one that was not used may come back as
    # None: both contribute nothing.
    use_coeffs = ctx.need_coeffs and grad_grad_coeffs is not None
    use_pose = ctx.need_pose_coeffs and grad_grad_pose is not None
    d_grad_out = d_dirs = d_pose_dirs = None
    if need_grad_out:
        if use_coeffs:
            blend_dirs, blend_coeffs = dirs, grad_grad_coeffs
        else:
            blend_dirs, blend_coeffs = dirs[:, :0], grad_out.new_zeros((batch, 0))
        if use_pose and _pose_count(pose_dirs, n) > 0:
            blend_pose_dirs, blend_pose_coeffs = pose_dirs, grad_grad_pose
        else:
            blend_pose_dirs, blend_pose_coeffs = (
                grad_out.new_empty((0, n)),
                grad_out.new_zeros((batch, 0)),
            )
        d_grad_out = _ops.blend(
            grad_out.new_zeros((n,)), blend_dirs, blend_coeffs, blend_pose_dirs, blend_pose_coeffs
        )
    if need_dirs and use_coeffs:
        d_dirs = (grad_out.mT @ grad_grad_coeffs).to(dirs.dtype)
    if need_pose_dirs and use_pose and _pose_count(pose_dirs, n) > 0:
        d_pose_dirs = grad_grad_pose.mT @ grad_out
    return d_grad_out, d_dirs, d_pose_dirs, None, None


def sum_by_identity(grad: torch.Tensor, identity: Optional[torch.Tensor],
                    identities: int) -> torch.Tensor:
    """(S, N): each shared row's sum of the rows of grad (B, N) whose sample picks it (the
    whole batch, (1, N), without identity), deterministic: on the CPU index_add_, in order
    of the samples; on a device index_put_ with accumulation, which sorts the indices with
    a stable sort (index_add_ there uses atomics), a sample whose identity is out of range
    (NaN outputs: never checked on a device) adding nothing."""
    if identity is None:
        return grad.sum(0, keepdim=True)
    sums = grad.new_zeros((identities, grad.shape[1]))
    if identity.device.type == "cpu":
        return sums.index_add_(0, identity, grad)
    valid = (identity >= 0) & (identity < identities)
    return sums.index_put_((identity.clamp(0, identities - 1),),
                           torch.where(valid[:, None], grad, 0), accumulate=True)


def _blend_shared_setup_context(ctx, inputs, output):
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs, identity = inputs
    ctx.save_for_backward(shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs,
                          identity)
    ctx.base_dim = base.dim()


def _blend_shared_backward(ctx, grad):
    shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs, identity = ctx.saved_tensors
    (need_base, need_shared_dirs, need_shared_coeffs, need_dirs, need_coeffs, need_pose_dirs,
     need_pose_coeffs) = ctx.needs_input_grad[:7]
    identities = shared_coeffs.shape[0]
    grad_shared_coeffs = grad_coeffs = grad_pose_coeffs = None
    if need_shared_coeffs or need_coeffs or need_pose_coeffs:
        grad_shared_coeffs, grad_coeffs, grad_pose_coeffs = blend_shared_grads(
            grad, shared_dirs, dirs, pose_dirs, need_shared_coeffs, need_coeffs,
            need_pose_coeffs, identity, identities,
        )
    grad_base = None
    if need_base:
        grad_sum = grad.sum(0, keepdim=True)
        grad_base = grad_sum if ctx.base_dim == 2 else grad_sum[0]
    # Plain products, as blend's: the tables are model constants in the decoders.
    grad_shared_dirs = None
    if need_shared_dirs:
        grad_shared_dirs = sum_by_identity(grad, identity, identities).mT @ shared_coeffs
    grad_dirs = grad.mT @ coeffs if need_dirs else None
    grad_pose_dirs = pose_coeffs.mT @ grad if need_pose_dirs else None
    return (grad_base, grad_shared_dirs, grad_shared_coeffs, grad_dirs, grad_coeffs,
            grad_pose_dirs, grad_pose_coeffs, None)


def _blend_shared_backward_setup_context(ctx, inputs, output):
    (grad_out, shared_dirs, dirs, pose_dirs, need_shared, need_coeffs, need_pose, identity,
     identities) = inputs
    ctx.save_for_backward(grad_out, shared_dirs, dirs, pose_dirs, identity)
    ctx.needs = (need_shared, need_coeffs, need_pose)
    ctx.identities = identities


def _blend_shared_backward_backward(ctx, grad_grad_shared, grad_grad_coeffs, grad_grad_pose):
    """Backward of blend_shared_backward, linear in grad_out: its gradient is blend_shared
    with zero base and the incoming gradients as coefficients; the tables' gradients are
    the transposed products."""
    grad_out, shared_dirs, dirs, pose_dirs, identity = ctx.saved_tensors
    need_grad_out, need_shared_dirs, need_dirs, need_pose_dirs = ctx.needs_input_grad[:4]
    batch, n = grad_out.shape
    # An output that was not asked for is (0,); one that was not used may come back as
    # None: both contribute nothing.
    use_shared, use_coeffs, use_pose = (
        need and g is not None
        for need, g in zip(ctx.needs, (grad_grad_shared, grad_grad_coeffs, grad_grad_pose))
    )
    use_pose = use_pose and _pose_count(pose_dirs, n) > 0
    d_grad_out = d_shared_dirs = d_dirs = d_pose_dirs = None
    if need_grad_out:
        shared = (grad_grad_shared if use_shared
                  else grad_out.new_zeros((ctx.identities, shared_dirs.shape[1])))
        coeffs = grad_grad_coeffs if use_coeffs else grad_out.new_zeros((batch, dirs.shape[1]))
        if use_pose:
            pose_pair = (pose_dirs, grad_grad_pose)
        else:
            pose_pair = (grad_out.new_empty((0, n)), grad_out.new_zeros((batch, 0)))
        d_grad_out = _ops.blend_shared(grad_out.new_zeros((n,)), shared_dirs, shared, dirs,
                                       coeffs, *pose_pair, identity)
    if need_shared_dirs and use_shared:
        d_shared_dirs = (sum_by_identity(grad_out, identity, ctx.identities).mT
                         @ grad_grad_shared)
    if need_dirs and use_coeffs:
        d_dirs = grad_out.mT @ grad_grad_coeffs
    if need_pose_dirs and use_pose:
        d_pose_dirs = grad_grad_pose.mT @ grad_out
    return d_grad_out, d_shared_dirs, d_dirs, d_pose_dirs, None, None, None, None, None


torch.library.register_autograd(
    "flame_ext::blend_shared", _blend_shared_backward, setup_context=_blend_shared_setup_context
)
torch.library.register_autograd(
    "flame_ext::blend_shared_backward",
    _blend_shared_backward_backward,
    setup_context=_blend_shared_backward_setup_context,
)
torch.library.register_autograd(
    "flame_ext::blend", _blend_backward, setup_context=_blend_setup_context
)
torch.library.register_autograd(
    "flame_ext::blend_backward",
    _blend_backward_backward,
    setup_context=_blend_backward_setup_context,
)
