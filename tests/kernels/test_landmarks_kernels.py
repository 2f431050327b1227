"""The landmarks CUDA kernels executed by the SIMT runtime.

landmarks_forward_kernel (one warp per sample, four samples a block: batches that fill a
block and ones that leave warps idle) with no contour and with both contour rules, and
landmarks_backward_kernel (one block per sample, the term tiles of 256) with landmark
sets below and above one tile; against the reference, and against the CPU kernels
(assert_matches_cpu): both sum every vertex's terms in term order from the same shared
math, the same bits in the emulation, within a few ulps on a GPU (nvcc's multiply-add
contraction). Contour bins of float32 poses are the CPU kernel's.
"""

import pytest
import torch

from _simt import (DTYPES, F32, F64, assert_bitwise, assert_matches_cpu, launches, rand,
                   under_every_schedule)
from flame_ext import reference

FORWARD, BACKWARD = "landmarks_forward_kernel", "landmarks_backward_kernel"
RULES = {"none": 0, "medusa": 1, "deca": 2}
N_VERTS, N_FACES, N_BINS, N_CONTOUR = 41, 60, 79, 5


def _tables(dtype, n_static=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tris = torch.randint(0, N_VERTS, (N_FACES, 3), generator=g)
    faces = torch.randint(0, N_FACES, (n_static,), generator=g)
    bary = rand(g, n_static, 3, dtype=dtype, low=0.05, scale=0.95)
    dyn_faces = torch.randint(0, N_FACES, (N_BINS, N_CONTOUR), generator=g)
    dyn_bary = rand(g, N_BINS, N_CONTOUR, 3, dtype=dtype, low=0.05, scale=0.95)
    return tris, faces, bary, dyn_faces, dyn_bary


def _poses(batch, dtype, seed=1):
    """Global and neck poses with yaws spread over every bin (medusa and DECA rules)."""
    g = torch.Generator().manual_seed(seed)
    poses = rand(g, batch, 15, dtype=dtype, scale=0.15)
    poses[:, 1] = torch.linspace(-1.2, 1.2, batch, dtype=F64).to(dtype) if batch > 1 else 0.3
    return poses


def _call(simt_or_cpu, v, poses, tables, rule):
    if rule == "none":
        empty_faces = torch.empty(0, 0, dtype=torch.int64)
        empty_bary = torch.empty(0, 0, 3, dtype=v.dtype)
        return simt_or_cpu.landmarks(v, poses, *tables[:3], empty_faces, empty_bary, 0)
    return simt_or_cpu.landmarks(v, poses, *tables, RULES[rule])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", tuple(RULES))
@pytest.mark.parametrize("batch", [1, 3, 4, 9])
def test_forward_matches_reference_and_cpu(kernels, batch, rule, dtype):
    tables = _tables(dtype)
    v = rand(torch.Generator().manual_seed(2), batch, N_VERTS, 3, dtype=dtype)
    poses = _poses(batch, dtype)
    with launches(FORWARD, exactly=True):
        lmk, bins = under_every_schedule(lambda: _call(kernels, v, poses, tables, rule))
    cpu_lmk, cpu_bins = _call(torch.ops.flame_ext, v, poses, tables, rule)
    assert_matches_cpu(lmk, cpu_lmk, "landmarks vs the CPU kernel")
    if rule != "none":
        assert_bitwise(bins, cpu_bins, "bins vs the CPU kernel")
        exact = reference.landmarks(v.double(), poses.double(), tables[0], tables[1],
                                    tables[2].double(), tables[3], tables[4].double(), rule)
    else:
        exact = reference.landmarks(v.double(), None, tables[0], tables[1], tables[2].double())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(lmk.double(), exact, rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ("medusa", "deca"))
def test_float32_bins_match_the_cpu_kernel_over_many_poses(kernels, rule, dtype):
    """Every bin of 512 poses swept through the yaw range, the same as the CPU kernel."""
    tables = _tables(dtype)
    v = rand(torch.Generator().manual_seed(3), 512, N_VERTS, 3, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    poses = rand(g, 512, 15, dtype=dtype, scale=0.3)
    poses[:, 1] = torch.linspace(-1.4, 1.4, 512, dtype=F64).to(dtype)
    _, bins = _call(kernels, v, poses, tables, rule)
    _, cpu_bins = _call(torch.ops.flame_ext, v, poses, tables, rule)
    assert_bitwise(bins, cpu_bins, "bins")
    assert len(set(bins.tolist())) > 40  # the sweep reaches most bins


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", tuple(RULES))
@pytest.mark.parametrize("batch, n_static", [(1, 7), (3, 51), (2, 90)])
def test_backward_matches_cpu(kernels, batch, n_static, rule, dtype):
    """n_static 90 with 5 contour points: 285 terms, more than one tile of 256."""
    tables = _tables(dtype, n_static=n_static, seed=5)
    v = rand(torch.Generator().manual_seed(6), batch, N_VERTS, 3, dtype=dtype)
    poses = _poses(batch, dtype, seed=7)
    _, bins = _call(torch.ops.flame_ext, v, poses, tables, rule)
    n_lmk = n_static + (N_CONTOUR if rule != "none" else 0)
    grad = rand(torch.Generator().manual_seed(8), batch, n_lmk, 3, dtype=dtype)
    if rule == "none":
        args = (grad, bins, *tables[:3], torch.empty(0, 0, dtype=torch.int64),
                torch.empty(0, 0, 3, dtype=dtype), N_VERTS)
    else:
        args = (grad, bins, *tables, N_VERTS)
    with launches(BACKWARD, exactly=True):
        grad_v = under_every_schedule(lambda: kernels.landmarks_backward(*args))
    assert_matches_cpu(grad_v, torch.ops.flame_ext.landmarks_backward(*args), "grad_v vs CPU")
    # And against autograd of the reference.
    v64 = v.double().requires_grad_()
    if rule == "none":
        out = reference.landmarks(v64, None, tables[0], tables[1], tables[2].double())
    else:
        out = reference.landmarks(v64, poses.double(), tables[0], tables[1], tables[2].double(),
                                  tables[3], tables[4].double(), rule)
    (exact,) = torch.autograd.grad(out, v64, grad.double())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad_v.double(), exact, rtol=64 * eps, atol=64 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_zero_launches_nothing(kernels, dtype):
    tables = _tables(dtype)
    v = torch.empty(0, N_VERTS, 3, dtype=dtype)
    with launches(exactly=True):
        lmk, bins = _call(kernels, v, torch.empty(0, 15, dtype=dtype), tables, "medusa")
    assert lmk.shape == (0, 12, 3) and bins.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_table_index_gives_nan_not_a_read(kernels, dtype):
    """A face index past the table is never followed (the sanitizer build would report
    the read): its landmark is NaN, the others are unchanged."""
    tris, faces, bary, dyn_faces, dyn_bary = _tables(dtype)
    faces = faces.clone()
    faces[2] = N_FACES + 5
    v = rand(torch.Generator().manual_seed(9), 2, N_VERTS, 3, dtype=dtype)
    lmk, _ = kernels.landmarks(v, _poses(2, dtype), tris, faces, bary, dyn_faces, dyn_bary, 1)
    assert bool(torch.isnan(lmk[:, N_CONTOUR + 2]).all())
    assert bool(torch.isfinite(lmk[:, N_CONTOUR + 3 :]).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ("medusa", "deca"))
def test_non_finite_pose_gives_nan_contour_and_no_gradient(kernels, rule, dtype):
    """No bin for a NaN or infinite global or neck pose: NaN contour points, the static
    ones intact, no contour gradient; the same as the CPU kernel, bitwise."""
    tables = _tables(dtype)
    v = rand(torch.Generator().manual_seed(10), 3, N_VERTS, 3, dtype=dtype)
    poses = _poses(3, dtype, seed=11)
    poses[0, 3] = float("nan")
    poses[2, 1] = float("inf")
    lmk, bins = _call(kernels, v, poses, tables, rule)
    cpu_lmk, cpu_bins = _call(torch.ops.flame_ext, v, poses, tables, rule)
    assert bins[0] == -1 and bins[2] == -1 and bins[1] >= 0
    assert_bitwise(bins, cpu_bins, "bins")
    assert_matches_cpu(lmk, cpu_lmk, "landmarks")
    assert bool(torch.isnan(lmk[[0, 2], :N_CONTOUR]).all())
    assert bool(torch.isfinite(lmk[:, N_CONTOUR:]).all()) and bool(torch.isfinite(lmk[1]).all())
    grad = rand(torch.Generator().manual_seed(12), 3, N_CONTOUR + 7, 3, dtype=dtype)
    args = (grad, bins, *tables, N_VERTS)
    grad_v = kernels.landmarks_backward(*args)
    assert_matches_cpu(grad_v, torch.ops.flame_ext.landmarks_backward(*args), "grad_v")
    # Sample 0's gradient comes from its static points only.
    static_only = grad.clone()
    static_only[:, :N_CONTOUR] = 0
    only = torch.ops.flame_ext.landmarks_backward(static_only, bins, *tables, N_VERTS)
    assert_matches_cpu(grad_v[0], only[0], "no contour gradient")
