"""The normals CUDA kernels executed by the SIMT runtime.

vertex_normals_kernel (forward), vertex_normals_sum_grad_kernel and
vertex_normals_backward_kernel (the backward's two launches), one thread per (sample,
vertex) with blocks of 256: meshes whose B x V fills blocks exactly and ones that leave
threads idle, with grids cut into many blocks. Against the reference (float64 autograd
for the backward), bitwise equal under every schedule, and equal to the CPU op
(assert_matches_cpu): both run the same math of normals.h per vertex in adjacency order,
bitwise in the emulation (one host compiler), within the tests' bounds on a GPU (nvcc
contracts multiply-adds). A table that does not belong to the faces is never followed: NaN normals,
no gradient, no read out of bounds (the sanitizer build would report one).
"""

import pytest
import torch

from _simt import (DTYPES, F64, assert_bitwise, assert_matches_cpu, launches, rand,
                   under_every_schedule)
from flame_ext import reference

FORWARD = "vertex_normals_kernel"
BACKWARD = ("vertex_normals_sum_grad_kernel", "vertex_normals_backward_kernel")


def _adjacency(faces, num_vertices):
    from flame_ext._ops import normals

    return normals.vertex_face_adjacency(faces, num_vertices)


def _mesh(num_vertices, num_faces, seed=0):
    g = torch.Generator().manual_seed(seed)
    faces = torch.randint(0, num_vertices, (num_faces, 3), generator=g)
    return (faces, *_adjacency(faces, num_vertices))


# (batch, vertices, faces): 256 = one full block, 3 x 100 = two blocks with idle threads,
# 5 x 211 = five blocks.
SIZES = [(1, 256, 400), (3, 100, 180), (5, 211, 300), (2, 7, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, num_vertices, num_faces", SIZES)
def test_forward_matches_reference_and_cpu(kernels, batch, num_vertices, num_faces, dtype):
    tables = _mesh(num_vertices, num_faces, seed=num_vertices)
    v = rand(torch.Generator().manual_seed(1), batch, num_vertices, 3, dtype=dtype)
    with launches(FORWARD, exactly=True):
        n = under_every_schedule(lambda: kernels.vertex_normals(v, *tables))
    exact = reference.vertex_normals(v.double(), tables[0])
    # Random meshes over few vertices: some vertices' face normals nearly cancel, so the
    # bound scales with the conditioning sum|c| / |sum c| (as tests/test_ops_normals.py).
    p0, p1, p2 = (v.double()[:, tables[0][:, k]] for k in range(3))
    area = ((p1 - p0).norm(dim=-1) * (p2 - p0).norm(dim=-1)).unsqueeze(-1)
    magnitude = torch.zeros(batch, num_vertices, 1, dtype=F64)
    for k in range(3):
        magnitude = magnitude.index_add(1, tables[0][:, k], area)
    summed = torch.zeros(batch, num_vertices, 3, dtype=F64)
    cross = torch.linalg.cross(p1 - p0, p2 - p0, dim=-1)
    for k in range(3):
        summed = summed.index_add(1, tables[0][:, k], cross)
    length = summed.norm(dim=-1, keepdim=True)
    cond = torch.where(length > 0, magnitude / length, torch.zeros_like(length))
    eps = torch.finfo(dtype).eps
    degree = torch.bincount(tables[0].reshape(-1), minlength=num_vertices).view(1, -1, 1)
    bound = 2 * ((4 + degree) * 2 * eps * cond + 4 * eps)
    assert bool(((n.double() - exact).abs() <= bound).all())
    assert_matches_cpu(n, torch.ops.flame_ext.vertex_normals(v, *tables), "normals vs CPU",
                       bound=2 * bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, num_vertices, num_faces", SIZES)
def test_backward_matches_reference_and_cpu(kernels, batch, num_vertices, num_faces, dtype):
    tables = _mesh(num_vertices, num_faces, seed=num_vertices + 1)
    v = rand(torch.Generator().manual_seed(2), batch, num_vertices, 3, dtype=dtype)
    grad = rand(torch.Generator().manual_seed(3), batch, num_vertices, 3, dtype=dtype)
    with launches(*BACKWARD, exactly=True):
        grad_v = under_every_schedule(lambda: kernels.vertex_normals_backward(grad, v, *tables))
    v64 = v.double().requires_grad_()
    (exact,) = torch.autograd.grad(reference.vertex_normals(v64, tables[0]), v64, grad.double())
    if dtype == F64:
        torch.testing.assert_close(grad_v, exact, rtol=1e-9, atol=1e-9)
        bound = 1e-9 * (1 + exact.abs())
    else:
        # Ill-conditioned vertices of random meshes (|s| << sum|c|) amplify the float32
        # error by 1 / |s|^2; the CPU comparison below is the exact check (in the
        # emulation, bitwise).
        scale = exact.abs().max()
        torch.testing.assert_close(grad_v.double() / scale, exact / scale, rtol=0, atol=1e-3)
        bound = 1e-3 * scale
    assert_matches_cpu(grad_v, torch.ops.flame_ext.vertex_normals_backward(grad, v, *tables),
                       "grad_v vs CPU", bound=2 * bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_zero_launches_nothing(kernels, dtype):
    tables = _mesh(20, 30)
    v = torch.empty(0, 20, 3, dtype=dtype)
    with launches(exactly=True):
        n = kernels.vertex_normals(v, *tables)
        grad_v = kernels.vertex_normals_backward(v, v, *tables)
    assert n.shape == (0, 20, 3) and grad_v.shape == (0, 20, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_and_isolated_vertices(kernels, dtype):
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [4, 4, 5]])
    tables = (faces, *_adjacency(faces, 7))
    v = rand(torch.Generator().manual_seed(4), 2, 7, 3, dtype=dtype)
    n = kernels.vertex_normals(v, *tables)
    assert bool((n[:, 4:] == 0).all()) and bool(torch.isfinite(n).all())
    grad_v = kernels.vertex_normals_backward(torch.ones_like(v), v, *tables)
    assert bool((grad_v[:, 4:] == 0).all())
    assert_matches_cpu(grad_v, torch.ops.flame_ext.vertex_normals_backward(torch.ones_like(v),
                                                                           v, *tables))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_table_gives_nan_not_a_read(kernels, dtype):
    """Entries past the faces, offsets past the entries, an entry of another vertex: the
    vertex is NaN without gradient, the others are what the intact tables give."""
    faces, offsets, entries = _mesh(20, 30, seed=5)
    v = rand(torch.Generator().manual_seed(6), 2, 20, 3, dtype=dtype)
    good = kernels.vertex_normals(v, faces, offsets, entries)  # the intact tables
    bad_entries = entries.clone()
    bad_entries[offsets[3]] = 10**6  # vertex 3's first entry
    bad_offsets = offsets.clone()
    bad_offsets[8] = 10**6  # vertex 7's end and vertex 8's start
    other = entries.clone()
    other[offsets[5]] = entries[offsets[6]]  # vertex 5 is handed a corner of vertex 6
    assert offsets[4] > offsets[3] and offsets[6] > offsets[5] and offsets[7] > offsets[6]
    grad = torch.ones_like(v)
    for o, e, broken in ((offsets, bad_entries, [3]), (bad_offsets, entries, [7, 8]),
                         (offsets, other, [5])):
        n = kernels.vertex_normals(v, faces, o, e)
        assert bool(torch.isnan(n[:, broken]).all())
        keep = [i for i in range(20) if i not in broken]
        assert_bitwise(n[:, keep], good[:, keep])
        grad_v = kernels.vertex_normals_backward(grad, v, faces, o, e)
        assert bool(torch.isfinite(grad_v).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_unchecked_adjacency_of_bad_faces_gives_nan(kernels, dtype):
    """The adjacency of faces with an index out of range, built without the range check
    (as inside a CUDA graph capture): the bad corners are in no vertex's run, and the
    in-range vertices of a bad face are NaN without gradient."""
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [3, 4, 9], [-2, 4, 5]])
    values, entries = torch.sort(faces.reshape(-1), stable=True)
    offsets = torch.searchsorted(values, torch.arange(7))
    v = rand(torch.Generator().manual_seed(7), 2, 6, 3, dtype=dtype)
    n = kernels.vertex_normals(v, faces, offsets, entries)
    assert bool(torch.isnan(n[:, 3:6]).all())  # vertices of the bad faces
    assert bool(torch.isfinite(n[:, :3]).all())
    grad_v = kernels.vertex_normals_backward(torch.ones_like(v), v, faces, offsets, entries)
    assert bool(torch.isfinite(grad_v).all())
