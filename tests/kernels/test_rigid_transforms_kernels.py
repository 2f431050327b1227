"""The rigid_transforms CUDA kernels executed by the SIMT runtime.

rigid_transforms_kernel and rigid_transforms_backward_kernel, for both chain capacities
(J <= 8 and up to 16 joints), one and several blocks of samples, random valid trees, and
batch 0; against the float64 reference and its autograd, and bitwise the same under every
schedule.
"""

import pytest
import torch

from _simt import DTYPES, F32, F64, launches, rand, under_every_schedule
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
def test_matches_the_cpu_kernel(kernels, dtype):
    """The kernels and the CPU loops call the same chain math (rotation.h, the family's
    header): the same results to the last few bits."""
    pose, joints, parents = _inputs(7, 5, dtype, seed=3)
    cpu = torch.ops.flame_ext.rigid_transforms(pose, joints, parents)
    emulated = kernels.rigid_transforms(pose, joints, parents)
    eps = torch.finfo(dtype).eps
    for a, b in zip(cpu, emulated):
        torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps)
