"""The blend CUDA kernels (csrc/blend/blend_kernels.cuh) executed by the SIMT runtime.

Forward: blend_forward_kernel for every tile size S in {1, 2, 4, 8} (batch 1, 2, 3-4,
5+), several batch tiles, K = 0 and K not a multiple of the warp, odd N, pose correctives
or none, base shared / per-sample / flat, dirs a column slice of a wider matrix.
Backward: adjoint_coeffs_kernel, adjoint_pose_kernel and sum_chunks_kernel, each output
alone and together, one and several row chunks. Large batches: under
use_deterministic_algorithms the hand kernels serve any batch; with the grid limits
scaled down, the batch spreads over several launches. Every result is compared with the
float64 reference within a rounding bound, and is bitwise the same under every schedule.
A half-precision dirs (float16 / bfloat16): every stored value widens exactly, the hand
kernels give the bits of the same kernels on the widened table, and the cuBLAS path
widens it in blocks (one, and several with a short last one).
blend_shared and its backward: the same kernels on the shared row and on the batch sum of
grad_out, against the reference, the per-sample gradients bitwise blend_backward's; with
S shared rows and an identity per sample, the rows gathered per sample (NaN for an index
out of range, which the launcher never reads on the host) and each row's samples summed
by the blend kernels (an unused row's gradient exactly zero).
"""

import pytest
import torch

from _simt import (DTYPES, F32, F64, assert_bitwise, assert_within, launches, rand, sum_bound,
                   under_every_schedule)

FORWARD = "blend_forward_kernel"
BACKWARD = ("adjoint_coeffs_kernel", "adjoint_pose_kernel", "sum_chunks_kernel")


def _inputs(batch, n, k, p, dtype, base_kind="shared", seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = rand(g, n, k + 8, dtype=dtype)
    dirs = wide[:, 3 : 3 + k]  # row stride k + 8: read in place
    coeffs = rand(g, batch, k, dtype=dtype)
    base = {"flat": rand(g, n, dtype=dtype), "shared": rand(g, 1, n, dtype=dtype),
            "batched": rand(g, batch, n, dtype=dtype)}[base_kind]
    pose_dirs = rand(g, p, n, dtype=dtype)
    pose_coeffs = rand(g, batch, p, dtype=dtype)
    return base, dirs, coeffs, pose_dirs, pose_coeffs


def _forward_exact(base, dirs, coeffs, pose_dirs, pose_coeffs):
    d = [x.double() for x in (base, dirs, coeffs, pose_dirs, pose_coeffs)]
    exact = d[0] + d[2] @ d[1].T + d[4] @ d[3]
    magnitude = d[0].abs() + d[2].abs() @ d[1].abs().T + d[4].abs() @ d[3].abs()
    return exact, magnitude


def _check_forward(kernels, args, dtype):
    out = under_every_schedule(lambda: kernels.blend(*args))
    exact, magnitude = _forward_exact(*args)
    k, p = args[1].shape[1], args[3].shape[0]
    assert_within(out, exact.expand_as(out), sum_bound(k + p + 1, magnitude, dtype), "blend")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, n, k, p, base_kind",
    [
        (1, 61, 37, 36, "shared"),    # S = 1, FLAME-like P
        (2, 61, 37, 5, "batched"),    # S = 2
        (3, 61, 70, 0, "flat"),       # S = 4, tail tile, no pose correctives
        (4, 33, 1, 36, "batched"),    # S = 4, K = 1
        (5, 61, 33, 36, "shared"),    # S = 8, one partial tile
        (8, 17, 0, 36, "shared"),     # S = 8, K = 0: pose correctives only
        (13, 61, 40, 7, "batched"),   # two tiles of 8
        (16, 129, 64, 36, "shared"),  # the largest hand-kernel batch, K = 2 warps
        (3, 1, 5, 2, "shared"),       # one row
    ],
)
def test_forward_matches_reference(kernels, batch, n, k, p, base_kind, dtype):
    args = _inputs(batch, n, k, p, dtype, base_kind)
    with launches(FORWARD, exactly=True):
        _check_forward(kernels, args, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_batch_zero_launches_nothing(kernels, dtype):
    args = _inputs(0, 61, 37, 36, dtype)
    with launches(exactly=True):
        out = kernels.blend(*args)
    assert out.shape == (0, 61)


def _backward_exact(grad, dirs, pose_dirs):
    g, d, pd = grad.double(), dirs.double(), pose_dirs.double()
    return (g @ d, g.abs() @ d.abs()), (g @ pd.T, g.abs() @ pd.abs().T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(
    "batch, n, k, p",
    [
        (1, 61, 37, 36),    # one row chunk
        (3, 613, 70, 36),   # several chunks, S = 4
        (6, 200, 33, 5),    # S = 8, partial tile
        (16, 97, 129, 36),  # K over one block of columns
    ],
)
def test_backward_matches_reference(kernels, batch, n, k, p, need, dtype):
    _, dirs, _, pose_dirs, _ = _inputs(batch, n, k, p, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    grad = rand(g, batch, n, dtype=dtype)
    expected = [name for name, on in zip(BACKWARD[:2], need) if on] + [BACKWARD[2]]
    with launches(*expected, exactly=True):
        grad_coeffs, grad_pose = under_every_schedule(
            lambda: kernels.blend_backward(grad, dirs, pose_dirs, *need))
    (gc, gc_mag), (gp, gp_mag) = _backward_exact(grad, dirs, pose_dirs)
    if need[0]:
        assert_within(grad_coeffs, gc, sum_bound(n, gc_mag, dtype), "grad_coeffs")
    if need[1]:
        assert_within(grad_pose, gp, sum_bound(n, gp_mag, dtype), "grad_pose_coeffs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_k_zero(kernels, dtype):
    _, dirs, _, pose_dirs, _ = _inputs(3, 61, 0, 36, dtype)
    grad = rand(torch.Generator().manual_seed(3), 3, 61, dtype=dtype)
    grad_coeffs, grad_pose = kernels.blend_backward(grad, dirs, pose_dirs, True, True)
    assert grad_coeffs.shape == (3, 0)
    (_, _), (gp, gp_mag) = _backward_exact(grad, dirs, pose_dirs)
    assert_within(grad_pose, gp, sum_bound(61, gp_mag, dtype), "grad_pose_coeffs")


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_grid", [(0, 0, 0), (0, 2, 2)])
def test_large_batch_deterministic_hand_kernels(kernels, deterministic, max_grid, dtype):
    """B = 40 > 16 under use_deterministic_algorithms: the hand kernels, not a GEMM; with
    grid.y / grid.z limited to 2 tiles the batch needs several launches."""
    from _simt import configure

    batch, n, k, p = 40, 61, 37, 36
    args = _inputs(batch, n, k, p, dtype, "batched", seed=4)
    configure(max_grid=max_grid)
    with launches(FORWARD):
        out = kernels.blend(*args)
    exact, magnitude = _forward_exact(*args)
    assert_within(out, exact, sum_bound(k + p + 1, magnitude, dtype), "blend")
    grad = rand(torch.Generator().manual_seed(5), batch, n, dtype=dtype)
    with launches(*BACKWARD):
        grad_coeffs, grad_pose = kernels.blend_backward(grad, args[1], args[3], True, True)
    (gc, gc_mag), (gp, gp_mag) = _backward_exact(grad, args[1], args[3])
    assert_within(grad_coeffs, gc, sum_bound(n, gc_mag, dtype), "grad_coeffs")
    assert_within(grad_pose, gp, sum_bound(n, gp_mag, dtype), "grad_pose_coeffs")


def test_large_batch_uses_the_gemm_outside_deterministic_mode(kernels):
    args = _inputs(40, 61, 37, 36, F64, "batched")
    with launches(exactly=True):  # at::addmm: no hand kernel
        out = kernels.blend(*args)
    exact, _ = _forward_exact(*args)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# blend_shared: the launcher runs the blend kernels twice (the shared row, then the batch
# on it); its backward runs the adjoint kernels on the batch sum of grad_out, then
# blend_backward's.


def _check_shared_backward(grads, grad, shared_dirs, dirs, pose_dirs, dtype):
    """blend_shared_backward's three gradients (one shared row) against the reference."""
    batch, n = grad.shape
    summed = grad.double().sum(0, keepdim=True)
    assert_within(grads[0], summed @ shared_dirs.double(),
                  sum_bound(n + batch, grad.double().abs().sum(0, keepdim=True)
                            @ shared_dirs.double().abs(), dtype), "grad_shared_coeffs")
    (gc, gc_mag), (gp, gp_mag) = _backward_exact(grad, dirs, pose_dirs)
    assert_within(grads[1], gc, sum_bound(n, gc_mag, dtype), "grad_coeffs")
    assert_within(grads[2], gp, sum_bound(n, gp_mag, dtype), "grad_pose_coeffs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, n, ks, k, p", [(1, 61, 37, 5, 36), (6, 613, 9, 70, 5),
                                                (16, 97, 40, 0, 36)])
def test_blend_shared_matches_reference(kernels, batch, n, ks, k, p, dtype):
    base, dirs, coeffs, pose_dirs, pose_coeffs = _inputs(batch, n, k, p, dtype, "flat", seed=6)
    g = torch.Generator().manual_seed(7)
    shared_dirs, shared_coeffs = rand(g, n, ks, dtype=dtype), rand(g, 1, ks, dtype=dtype)
    with launches(FORWARD, exactly=True):
        out = under_every_schedule(lambda: kernels.blend_shared(
            base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs))
    shaped, shaped_mag = _forward_exact(base, shared_dirs, shared_coeffs, pose_dirs[:0],
                                        pose_coeffs[:1, :0])
    d = [x.double() for x in (dirs, coeffs, pose_dirs, pose_coeffs)]
    exact = shaped + d[1] @ d[0].T + d[3] @ d[2]
    magnitude = shaped_mag + d[1].abs() @ d[0].abs().T + d[3].abs() @ d[2].abs()
    assert_within(out, exact, sum_bound(ks + k + p + 2, magnitude, dtype), "blend_shared")

    grad = rand(g, batch, n, dtype=dtype)
    with launches(*BACKWARD):
        grads = under_every_schedule(lambda: kernels.blend_shared_backward(
            grad, shared_dirs, dirs, pose_dirs, True, True, True))
    _check_shared_backward(grads, grad, shared_dirs, dirs, pose_dirs, dtype)
    assert_bitwise(grads[1:], kernels.blend_backward(grad, dirs, pose_dirs, True, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ks, k, p", [(37, 0, 0), (0, 5, 3), (0, 0, 0)])
def test_blend_shared_backward_empty_tables(kernels, ks, k, p, dtype):
    """blend_shared_backward where a table has no columns: every gradient asked for, of
    the sizes the tables give, the non-empty ones against the reference (a backward of
    shared coefficients alone once divided by zero sizing the batch's workspace)."""
    batch, n = 2, 61
    _, dirs, _, pose_dirs, _ = _inputs(batch, n, k, p, dtype, seed=10)
    g = torch.Generator().manual_seed(11)
    shared_dirs, grad = rand(g, n, ks, dtype=dtype), rand(g, batch, n, dtype=dtype)
    grads = under_every_schedule(lambda: kernels.blend_shared_backward(
        grad, shared_dirs, dirs, pose_dirs, True, True, True))
    assert [tuple(x.shape) for x in grads] == [(1, ks), (batch, k), (batch, p)]
    _check_shared_backward(grads, grad, shared_dirs, dirs, pose_dirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, rows, n, ks, k, p", [(7, 3, 61, 37, 5, 36),
                                                      (20, 6, 613, 9, 70, 5)])
def test_blend_shared_identity_matches_reference(kernels, batch, rows, n, ks, k, p, dtype):
    base, dirs, coeffs, pose_dirs, pose_coeffs = _inputs(batch, n, k, p, dtype, "flat", seed=8)
    g = torch.Generator().manual_seed(9)
    shared_dirs, shared_coeffs = rand(g, n, ks, dtype=dtype), rand(g, rows, ks, dtype=dtype)
    identity = torch.randint(0, rows - 1, (batch,), generator=g)  # the last row unused
    identity[-1] = rows  # out of range: that sample's outputs are NaN
    with launches(FORWARD):
        out = under_every_schedule(lambda: kernels.blend_shared(
            base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs, identity))
    assert torch.isnan(out[-1]).all()
    shaped, shaped_mag = _forward_exact(base, shared_dirs, shared_coeffs, pose_dirs[:0],
                                        pose_coeffs[:rows, :0])
    d = [x.double() for x in (dirs, coeffs, pose_dirs, pose_coeffs)]
    picked = identity[:-1]
    exact = shaped[picked] + d[1][:-1] @ d[0].T + d[3][:-1] @ d[2]
    magnitude = shaped_mag[picked] + d[1][:-1].abs() @ d[0].abs().T + d[3][:-1].abs() @ d[2].abs()
    assert_within(out[:-1], exact, sum_bound(ks + k + p + 2, magnitude, dtype),
                  "blend_shared with identity")

    grad = rand(g, batch, n, dtype=dtype)
    valid = identity.clone()
    valid[-1] = 0
    with launches("adjoint_coeffs_kernel"):  # at B = 20 the rest goes to the GEMM path
        grads = under_every_schedule(lambda: kernels.blend_shared_backward(
            grad, shared_dirs, dirs, pose_dirs, True, True, True, valid, rows))
    one_hot = (torch.arange(rows)[:, None] == valid[None]).double()
    summed, summed_mag = one_hot @ grad.double(), one_hot @ grad.double().abs()
    assert grads[0].shape == (rows, ks)
    assert_within(grads[0], summed @ shared_dirs.double(),
                  sum_bound(n + batch, summed_mag @ shared_dirs.double().abs(), dtype),
                  "grad_shared_coeffs")
    assert torch.equal(grads[0][-1], torch.zeros_like(grads[0][-1]))
    assert_bitwise(grads[1:], kernels.blend_backward(grad, dirs, pose_dirs, True, True))


# ---------------------------------------------------------------------------------------
# A half-precision dirs (float16 / bfloat16 storage): each value widened where it is
# loaded, everything else as for a dirs of the other arguments' dtype.

HALF = (torch.float16, torch.bfloat16)


def _every_half_value(half):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    return bits.view(half).reshape(1024, 64)


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("batch", [1, 5])  # tiles of 1 and 8 samples
def test_half_dirs_every_value_widens_exactly(kernels, half, batch):
    dirs = _every_half_value(half)
    coeffs = torch.zeros(batch, 64)
    coeffs[torch.arange(batch), torch.arange(batch) * 13 % 64] = 1.0
    with launches(FORWARD, exactly=True):
        out = kernels.blend(torch.zeros(1024), dirs, coeffs, torch.empty(0, 1024),
                            torch.empty(batch, 0))
    want = (coeffs.double() @ dirs.double().T).float()  # NaN where 0 * inf, as IEEE says
    assert bool(((out == want) | (out.isnan() & want.isnan())).all())


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, n, k, p", [(1, 61, 37, 36), (5, 613, 70, 0), (13, 97, 129, 5)])
def test_half_dirs_give_the_bits_of_the_widened_table(kernels, half, dtype, batch, n, k, p):
    base, dirs, coeffs, pose_dirs, pose_coeffs = _inputs(batch, n, k, p, dtype, seed=6)
    stored = dirs.to(half)
    stored = torch.cat([stored, stored[:, :3]], 1)[:, :k]  # a column slice, row stride k + 3
    widened = stored.to(dtype)
    with launches(FORWARD, exactly=True):
        out = under_every_schedule(
            lambda: kernels.blend(base, stored, coeffs, pose_dirs, pose_coeffs))
    assert_bitwise(out, kernels.blend(base, widened, coeffs, pose_dirs, pose_coeffs), "blend")
    grad = rand(torch.Generator().manual_seed(7), batch, n, dtype=dtype)
    expected = [BACKWARD[0], BACKWARD[2]] + ([BACKWARD[1]] if p else [])
    with launches(*expected):
        got = under_every_schedule(
            lambda: kernels.blend_backward(grad, stored, pose_dirs, True, True))
    want = kernels.blend_backward(grad, widened, pose_dirs, True, True)
    assert_bitwise(got[0], want[0], "grad_coeffs")
    assert_bitwise(got[1], want[1], "grad_pose_coeffs")


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("base_kind", ["flat", "shared", "batched"])
@pytest.mark.parametrize("n, k", [(61, 37), (90001, 50)])  # one block; two, the last short
def test_half_dirs_large_batch_widens_blocks_for_the_gemm(kernels, half, base_kind, n, k):
    """B = 40: cuBLAS's path, which reads one dtype: dirs widened 2^22 values at a time
    into its columns of the output (no hand kernel runs), against the float64 reference
    of the stored values."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = _inputs(40, n, k, 9, F32, base_kind)
    stored = dirs.to(half)
    with launches(exactly=True):
        out = kernels.blend(base, stored, coeffs, pose_dirs, pose_coeffs)
    exact, magnitude = _forward_exact(base, stored, coeffs, pose_dirs, pose_coeffs)
    assert_within(out, exact.expand_as(out), sum_bound(k + 9 + 1, magnitude, F32), "blend")
    grad = rand(torch.Generator().manual_seed(8), 40, n, dtype=F32)
    with launches(exactly=True):
        grad_coeffs, grad_pose = kernels.blend_backward(grad, stored, pose_dirs, True, True)
    (gc, gc_mag), (gp, gp_mag) = _backward_exact(grad, stored, pose_dirs)
    assert_within(grad_coeffs, gc, sum_bound(n, gc_mag, F32), "grad_coeffs")
    assert_within(grad_pose, gp, sum_bound(n, gp_mag, F32), "grad_pose_coeffs")
