"""The rigid_transforms CUDA kernels executed by the SIMT runtime.

rigid_transforms_kernel and rigid_transforms_backward_kernel, in each instantiation
(exactly FLAME's 5 joints; at most 8; up to 16), one and several blocks of samples, random
valid trees, and batch 0; against the float64 reference and its autograd, bitwise the same
under every schedule and (emulated) bitwise the CPU loops' results.
"""

import pytest
import torch

from _simt import (DTYPES, F32, F64, assert_matches_cpu, launches, rand,
                   under_every_schedule)
from flame_ext import reference

FORWARD, BACKWARD = "rigid_transforms_kernel", "rigid_transforms_backward_kernel"
TOL = {F32: dict(rtol=2e-5, atol=2e-5), F64: dict(rtol=1e-11, atol=1e-11)}


def _tree(num_joints, gen):
    parents = [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, num_joints)]
    return torch.tensor(parents, dtype=torch.int64)


def _inputs(batch, num_joints, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pose = rand(g, batch, num_joints, 3, dtype=dtype, scale=0.8)
    joints = rand(g, batch, num_joints, 3, dtype=dtype, scale=0.5)
    return pose, joints, _tree(num_joints, g)


CASES = [(1, 5), (3, 1), (3, 2), (33, 5), (5, 8), (2, 9), (4, 16), (40, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, num_joints", CASES)
def test_forward_matches_reference(kernels, batch, num_joints, dtype):
    pose, joints, parents = _inputs(batch, num_joints, dtype)
    with launches(FORWARD, exactly=True):
        transforms, feature = under_every_schedule(
            lambda: kernels.rigid_transforms(pose, joints, parents))
    exact_t, exact_f = reference.rigid_transforms(pose.double(), joints.double(), parents)
    torch.testing.assert_close(transforms.double(), exact_t, **TOL[dtype])
    torch.testing.assert_close(feature.double(), exact_f, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, num_joints", CASES)
def test_backward_matches_reference_autograd(kernels, batch, num_joints, dtype):
    pose, joints, parents = _inputs(batch, num_joints, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    grad_t = rand(g, batch, num_joints, 4, 4, dtype=dtype)
    grad_f = rand(g, batch, 9 * (num_joints - 1), dtype=dtype)
    with launches(BACKWARD, exactly=True):
        grad_pose, grad_joints = under_every_schedule(
            lambda: kernels.rigid_transforms_backward(grad_t, grad_f, pose, joints, parents))
    p64 = pose.double().requires_grad_()
    j64 = joints.double().requires_grad_()
    t, f = reference.rigid_transforms(p64, j64, parents)
    exact_p, exact_j = torch.autograd.grad((t, f), (p64, j64), (grad_t.double(), grad_f.double()))
    scale = 1.0 + exact_p.abs().max().item()
    tol = dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)
    torch.testing.assert_close(grad_pose.double(), exact_p, **tol)
    torch.testing.assert_close(grad_joints.double(), exact_j, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_zero_launches_nothing(kernels, dtype):
    pose, joints, parents = _inputs(0, 5, dtype)
    with launches(exactly=True):
        transforms, feature = kernels.rigid_transforms(pose, joints, parents)
        grads = kernels.rigid_transforms_backward(
            transforms, feature, pose, joints, parents)
    assert transforms.shape == (0, 5, 4, 4) and feature.shape == (0, 36)
    assert grads[0].shape == (0, 5, 3) and grads[1].shape == (0, 5, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_joints", [5, 3, 9])
def test_matches_the_cpu_kernel(kernels, num_joints, dtype):
    """The kernels and the CPU loops run the same chain math (rotation.h, the family's
    header) in the same order; FLAME's 5 joints take the kernels compiled for exactly that
    count (the chain in registers), other trees the ones indexed at run time. Compiled
    alike (the emulation, no FMA contraction), the results are the same bits; a GPU
    contracts multiply-adds, so there they agree to a few ulps."""
    pose, joints, parents = _inputs(7, num_joints, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    grad_t = rand(g, 7, num_joints, 4, 4, dtype=dtype)
    grad_f = rand(g, 7, 9 * (num_joints - 1), dtype=dtype)
    cpu = (*torch.ops.flame_ext.rigid_transforms(pose, joints, parents),
           *torch.ops.flame_ext.rigid_transforms_backward(grad_t, grad_f, pose, joints, parents))
    ran = (*kernels.rigid_transforms(pose, joints, parents),
           *kernels.rigid_transforms_backward(grad_t, grad_f, pose, joints, parents))
    assert_matches_cpu(ran, cpu, "kernel vs CPU loop")
