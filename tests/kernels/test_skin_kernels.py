"""The skin CUDA kernels executed by the SIMT runtime.

skin_kernel with and without T_v (its two instantiations), skin_backward_kernel with and
without grad T_v, and reduce_partials_kernel (more than one chunk of 1024 vertices per
sample); odd vertex counts, a block's partial tail, 1 to 16 joints; against the float64
reference and its autograd, bitwise the same under every schedule.
"""

import pytest
import torch

from _simt import DTYPES, F32, F64, assert_within, launches, rand, sum_bound, under_every_schedule
from flame_ext import reference

FORWARD, BACKWARD, REDUCE = "skin_kernel", "skin_backward_kernel", "reduce_partials_kernel"


def _inputs(batch, num_verts, num_joints, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_posed = rand(g, batch, num_verts, 3, dtype=dtype)
    transforms = rand(g, batch, num_joints, 4, 4, dtype=dtype, scale=0.7)
    transforms[:, :, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=dtype)
    weights = rand(g, num_verts, num_joints, dtype=dtype, low=0.05, scale=0.95)
    weights = weights / weights.sum(1, keepdim=True)
    return v_posed, transforms, weights


CASES = [(1, 37, 5), (3, 256, 5), (2, 300, 1), (3, 1, 16), (1, 1100, 5), (2, 2049, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("write_t", [True, False])
@pytest.mark.parametrize("batch, num_verts, num_joints", CASES)
def test_forward_matches_reference(kernels, batch, num_verts, num_joints, write_t, dtype):
    v_posed, transforms, weights = _inputs(batch, num_verts, num_joints, dtype)
    with launches(FORWARD, exactly=True):
        v, vt = under_every_schedule(lambda: kernels.skin(v_posed, transforms, weights, write_t))
    exact_v, exact_t = reference.skin(v_posed.double(), transforms.double(), weights.double())
    # v = sum_j w_j (A_j [x; 1]): 4 J products per coordinate, |terms| <= |A| (|x| + 1).
    magnitude = reference.skin(v_posed.double().abs(), transforms.double().abs(),
                               weights.double())[0] + 1.0
    assert_within(v, exact_v, sum_bound(4 * num_joints + 4, magnitude, dtype), "v")
    if write_t:
        assert_within(vt, exact_t, sum_bound(num_joints, exact_t.abs() + 1.0, dtype), "T_v")
    else:
        assert vt.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_grad_t", [True, False])
@pytest.mark.parametrize("batch, num_verts, num_joints", CASES)
def test_backward_matches_reference_autograd(kernels, batch, num_verts, num_joints, with_grad_t,
                                             dtype):
    v_posed, transforms, weights = _inputs(batch, num_verts, num_joints, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    grad_v = rand(g, batch, num_verts, 3, dtype=dtype)
    grad_t = rand(g, batch, num_verts, 4, 4, dtype=dtype) if with_grad_t else None
    chunks = (num_verts + 1023) // 1024
    expected = (BACKWARD, REDUCE) if chunks > 1 else (BACKWARD,)
    with launches(*expected, exactly=True):
        grad_p, grad_a = under_every_schedule(
            lambda: kernels.skin_backward(grad_v, grad_t, v_posed, transforms, weights))
    p64 = v_posed.double().requires_grad_()
    a64 = transforms.double().requires_grad_()
    v, vt = reference.skin(p64, a64, weights.double())
    outs, grads = [v], [grad_v.double()]
    if with_grad_t:
        outs.append(vt)
        grads.append(grad_t.double())
    exact_p, exact_a = torch.autograd.grad(outs, (p64, a64), grads)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad_p.double(), exact_p, rtol=64 * eps, atol=64 * eps)
    # grad A_j sums over every vertex: an error bound that grows with V.
    scale = 8 * (num_verts + 16) * eps * (1.0 + exact_a.abs().max().item())
    torch.testing.assert_close(grad_a.double(), exact_a, rtol=0, atol=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_the_cpu_kernel_closely(kernels, dtype):
    v_posed, transforms, weights = _inputs(3, 300, 5, dtype, seed=4)
    grad_v = rand(torch.Generator().manual_seed(5), 3, 300, 3, dtype=dtype)
    cpu = torch.ops.flame_ext.skin_backward(grad_v, None, v_posed, transforms, weights)
    emulated = kernels.skin_backward(grad_v, None, v_posed, transforms, weights)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(emulated[0], cpu[0], rtol=16 * eps, atol=16 * eps)
    torch.testing.assert_close(emulated[1], cpu[1], rtol=1e3 * eps, atol=1e3 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs(kernels, dtype):
    v_posed, transforms, weights = _inputs(0, 37, 5, dtype)
    with launches(exactly=True):
        v, vt = kernels.skin(v_posed, transforms, weights, True)
    assert v.shape == (0, 37, 3) and vt.shape == (0, 37, 4, 4)
    v_posed, transforms, weights = _inputs(2, 0, 5, dtype)
    with launches(exactly=True):
        grad_p, grad_a = kernels.skin_backward(v_posed, None, v_posed, transforms, weights)
    assert grad_p.shape == (2, 0, 3)
    assert bool((grad_a == 0).all())
