"""The texture blend over a half-precision basis in plain PyTorch: out = mean + coeffs @
basis.T, with the basis stored as float16 or bfloat16 and everything else (coeffs, mean,
the sums, the output) float32.

FlameTex(basis_dtype=torch.float16 | torch.bfloat16) keeps its basis at half the bytes.
The compiled `blend` op reads such a basis itself (flame_ext._ops.blend); this op is the
reference path's (FlameTex(backend="reference"), and the fallback without the
extension), and an oracle of the tests. A float32 matmul cannot read a half operand, and
rounding the codes to half instead would lose their precision, so this op walks the basis
in blocks of rows: each block is widened to float32 (a small temporary, cache-sized on
the CPU) and multiplied in float32 straight into its columns of the output. No float32
copy of the whole basis is ever made, and the basis bytes read per call are half of the
float32 module's.

Plain PyTorch, defined with `torch.library.custom_op` (namespace `flame_ext_py`) so that
torch.compile(fullgraph=True) treats it as one opaque node, with its fake kernel and
autograd: gradients reach coeffs (by `half_blend_backward`, the same blocked walk:
grad_coeffs = grad_out @ basis) and mean (summed over the batch); the basis is a model
constant here and gets none. `half_blend_backward` is linear in grad_out, its own
backward is again a `half_blend`, so double backward works.

Error bound (docs/SPEC.md, FlameTex): against the float32 blend of the unrounded basis,
|out - out32| <= sum_k |c_k| |b_k| u + 2 (K + 1) 2^-24 (|mean| + sum_k |c_k| |b_k|) per
element, u = 2^-11 for float16 (plus K 2^-25 max|c| where a basis value is subnormal in
float16) and 2^-8 for bfloat16: the rounding of each basis value to half, then the two
float32 accumulations.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_same, check_tensor
from . import ops_not_differentiable_here

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Bytes of one widened float32 block. On the CPU a block that stays in the L2 cache
# between its widening and its product is the fast size; on a GPU each block is two
# kernel launches, so the blocks are large (a few per call).
_BLOCK_BYTES = {"cpu": 1 << 20, "cuda": 1 << 24}


def block_rows(n_components: int, device_type: str) -> int:
    """Rows of the basis widened at a time for a basis of n_components columns."""
    block = _BLOCK_BYTES.get(device_type, 1 << 24)
    return max(64, block // (4 * max(1, n_components)))


@torch.library.custom_op("flame_ext_py::half_blend", mutates_args=())
def _half_blend(
    mean: Optional[torch.Tensor], basis: torch.Tensor, coeffs: torch.Tensor, rows: int
) -> torch.Tensor:
    n = basis.shape[0]
    out = coeffs.new_empty((coeffs.shape[0], n))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = basis[lo:hi].to(torch.float32)
        if mean is None:
            torch.mm(coeffs, block.t(), out=out[:, lo:hi])
        else:
            torch.addmm(mean[lo:hi], coeffs, block.t(), out=out[:, lo:hi])
    return out


@_half_blend.register_fake
def _half_blend_fake(mean, basis, coeffs, rows):
    return coeffs.new_empty((coeffs.shape[0], basis.shape[0]))


@torch.library.custom_op("flame_ext_py::half_blend_backward", mutates_args=())
def _half_blend_backward(grad_out: torch.Tensor, basis: torch.Tensor, rows: int) -> torch.Tensor:
    n, k = basis.shape
    grad = grad_out.new_zeros((grad_out.shape[0], k))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        grad.addmm_(grad_out[:, lo:hi], basis[lo:hi].to(torch.float32))
    return grad


@_half_blend_backward.register_fake
def _half_blend_backward_fake(grad_out, basis, rows):
    return grad_out.new_empty((grad_out.shape[0], basis.shape[1]))


def _setup(ctx, inputs, output):
    mean, basis, _coeffs, rows = inputs
    ctx.save_for_backward(basis)
    ctx.rows = rows
    ctx.has_mean = mean is not None


def _backward(ctx, grad):
    (basis,) = ctx.saved_tensors
    need_mean, _, need_coeffs, _ = ctx.needs_input_grad
    grad_mean = grad.sum(0) if (ctx.has_mean and need_mean) else None
    grad_coeffs = _half_blend_backward(grad.contiguous(), basis, ctx.rows) if need_coeffs \
        else None
    return grad_mean, None, grad_coeffs, None


def _setup_backward(ctx, inputs, output):
    _grad_out, basis, rows = inputs
    ctx.save_for_backward(basis)
    ctx.rows = rows


def _backward_backward(ctx, grad):
    (basis,) = ctx.saved_tensors
    return _half_blend(None, basis, grad.contiguous(), ctx.rows), None, None


_half_blend.register_autograd(_backward, setup_context=_setup)
_half_blend_backward.register_autograd(_backward_backward, setup_context=_setup_backward)


def half_blend(mean: Optional[torch.Tensor], basis: torch.Tensor,
               coeffs: torch.Tensor) -> torch.Tensor:
    """out (B, N) float32 = mean + coeffs @ basis.T, basis (N, K) float16 / bfloat16,
    coeffs (B, K) float32, mean (N,) float32 or None. Checked: ValueError / TypeError
    naming the argument."""
    check_tensor("coeffs", coeffs, ndim=2, floating=True)
    if coeffs.dtype != torch.float32:
        raise TypeError(f"coeffs must be float32 (a half basis accumulates in float32), got "
                        f"{coeffs.dtype}")
    check_tensor("basis", basis, ndim=2)
    if basis.dtype not in HALF_DTYPES:
        raise TypeError(f"basis must be float16 or bfloat16, got {basis.dtype}")
    check_tensor("basis", basis, shape=(None, coeffs.shape[1]))
    if basis.device != coeffs.device:
        raise ValueError(f"basis is on {basis.device} but coeffs is on {coeffs.device}")
    if mean is not None:
        check_tensor("mean", mean, shape=(basis.shape[0],))
        check_same("mean", mean, coeffs, "coeffs")
    return half_blend_unchecked(mean, basis, coeffs)


def half_blend_unchecked(mean, basis, coeffs) -> torch.Tensor:
    """half_blend without the argument checks (for the decoder, whose tables are its own
    buffers and whose texcode it has checked).

    Under a torch.func transform or forward-mode AD, where this op's registered autograd
    does not serve (`flame_ext._backend.resolve`), the same product in plain torch ops on
    the basis widened whole (a float32 copy for the call; the sums in another order)."""
    if ops_not_differentiable_here():
        widened = basis.to(coeffs.dtype).t()
        return coeffs @ widened if mean is None else torch.addmm(mean, coeffs, widened)
    return _half_blend(mean, basis, coeffs, block_rows(basis.shape[1], coeffs.device.type))
