"""Tests of the normals op family: flame_ext::vertex_face_adjacency, vertex_normals and
vertex_normals_backward, their wrapper flame_ext._ops.normals, the public
flame_ext.vertex_normals and FlameShape.vertex_normals.

The oracle is flame_ext.reference.vertex_normals (index_add of the face normals)
evaluated in float64. Meshes: random ones (random faces over few vertices, so vertices
share many faces, some have none, some faces repeat a vertex) and the synthetic FLAME
mesh (5023 vertices, 9976 faces) with its vertices displaced.

float32 tolerance. Per vertex i with d_i incident faces, every face normal c = a x b
(a, b edges) is computed with an error below ~4 eps |a| |b| (the edges are exact
differences rounded once, then a product pair and a subtraction), and their sum adds
d_i eps sum|c| more, so |s - s_exact| <= (4 + d_i) eps A_i with A_i = sum_f |a_f| |b_f|;
normalising adds 2 |s - s_exact| / |s| + 3 eps. The tests check
|n - n_exact| <= 2 ((4 + d_i) 2 eps A_i / |s_i| + 4 eps) (a factor 2 of margin), so a
vertex whose face normals nearly cancel (|s_i| << A_i, ill-conditioned) gets a wide
bound and a smooth surface's vertex (|s_i| ~ A_i) a tight one. Gradients: g_s is
(g - n (n.g)) / |s|, so its relative error is that of n times 1 / |s| scaling, and each
vertex gathers ~2 d_i cross products of it: the float32 gradient is compared with the
float64 one relative to the largest gradient, at 2e-4 (~1700 eps), on the synthetic mesh
whose vertices all have |s_i| ~ A_i.
"""

import pytest
import torch

from _oracle import assert_error_names, assert_independent_of_thread_count
from _samples import F64

import flame_ext
from flame_ext import reference

F32 = torch.float32


@pytest.fixture(scope="module")
def nrm(ops):
    from flame_ext._ops import normals

    return normals


@pytest.fixture(scope="module")
def flame_mesh(quiet_module):
    model = flame_ext.load_flame_model("synthetic")
    v = torch.from_numpy(model.v_template).double()
    faces = torch.from_numpy(model.faces.astype("int64"))
    return v, faces


@pytest.fixture(scope="module")
def quiet_module():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-model notice
        yield


def random_mesh(n_verts=30, n_faces=50, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    faces = torch.randint(0, n_verts, (n_faces, 3), generator=g)
    return faces.to(device)


def random_vertices(batch, n_verts, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_verts, 3, generator=g, dtype=F64).to(device, dtype)


def displaced(v, batch, dtype, seed=2, scale=1e-3):
    """batch copies of the mesh v (V, 3), each displaced by small random offsets."""
    g = torch.Generator().manual_seed(seed)
    out = v.expand(batch, -1, -1) + scale * torch.randn(batch, *v.shape, generator=g, dtype=F64)
    return out.to(dtype)


def normal_bound(v, faces, dtype):
    """The float32 error bound of the module docstring, per vertex (B, V, 1)."""
    v = v.double()
    p0, p1, p2 = (v[:, faces[:, k]] for k in range(3))
    area = ((p1 - p0).norm(dim=-1) * (p2 - p0).norm(dim=-1)).unsqueeze(-1)
    magnitude = torch.zeros(v.shape[:2] + (1,), dtype=F64)
    degree = torch.zeros(v.shape[1], dtype=F64)
    for k in range(3):
        magnitude = magnitude.index_add(1, faces[:, k], area)
        degree = degree.index_add(0, faces[:, k], torch.ones(faces.shape[0], dtype=F64))
    summed = torch.zeros_like(v)
    cross = torch.linalg.cross(p1 - p0, p2 - p0, dim=-1)
    for k in range(3):
        summed = summed.index_add(1, faces[:, k], cross)
    length = summed.norm(dim=-1, keepdim=True)
    eps = torch.finfo(dtype).eps
    cond = torch.where(length > 0, magnitude / length, torch.full_like(length, float("inf")))
    return 2 * ((4 + degree.view(1, -1, 1)) * 2 * eps * cond + 4 * eps)


def assert_normals_close(got, v, faces):
    exact = reference.vertex_normals(v.double(), faces)
    if got.dtype == F64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
        return
    bound = normal_bound(v, faces, got.dtype)
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), f"float32 error {err.max():.3g} over the bound"


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_meshes_match_reference(nrm, device, dtype, batch, seed):
    faces = random_mesh(seed=seed, device=device)
    v = random_vertices(batch, 30, dtype, device, seed=seed + 10)
    got = nrm.vertex_normals(v, faces)
    assert got.shape == v.shape and got.dtype == dtype
    assert_normals_close(got.cpu(), v.cpu(), faces.cpu())


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("batch", [1, 3])
def test_flame_mesh_matches_reference(nrm, device, dtype, batch, flame_mesh):
    template, faces = flame_mesh
    v = displaced(template, batch, dtype).to(device)
    got = nrm.vertex_normals(v, faces.to(device))
    assert_normals_close(got.cpu(), v.cpu(), faces)
    # A closed-ish smooth surface: every vertex has faces and a unit normal.
    torch.testing.assert_close(got.double().norm(dim=-1).cpu(), torch.ones(v.shape[:2], dtype=F64),
                               rtol=0, atol=1e-6 if dtype == F32 else 1e-13)


def test_public_function_and_unbatched_input(nrm, device):
    faces = random_mesh(device=device)
    v = random_vertices(1, 30, F64, device)[0]
    got = flame_ext.vertex_normals(v, faces)
    assert got.shape == (30, 3)
    torch.testing.assert_close(got, nrm.vertex_normals(v[None], faces)[0], rtol=0, atol=0)
    assert "vertex_normals" in flame_ext.__all__


def test_batch_zero(nrm, device):
    faces = random_mesh(device=device)
    v = torch.empty(0, 30, 3, dtype=F64, device=device, requires_grad=True)
    out = nrm.vertex_normals(v, faces)
    assert out.shape == (0, 30, 3)
    (grad,) = torch.autograd.grad(out.sum(), v)
    assert grad.shape == (0, 30, 3)


def test_int32_faces(nrm, device):
    faces = random_mesh(device=device)
    v = random_vertices(2, 30, F64, device)
    torch.testing.assert_close(nrm.vertex_normals(v, faces.int()), nrm.vertex_normals(v, faces),
                               rtol=0, atol=0)


def test_isolated_and_degenerate_vertices_get_zero_normals_and_gradients(nrm, device):
    # vertex 0..3: a proper triangle and one sharing its edge; 4: isolated; 5: only in a
    # face that repeats it (exactly zero area); 6..8: a nearly collinear face, whose
    # normal only has to be finite; 9, 10: only in a face that repeats its last corner
    # (zero area again, the cross product of two equal edges).
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [5, 5, 6], [6, 7, 8], [9, 10, 10]],
                         device=device)
    v = random_vertices(2, 11, F64, device)
    v[:, 8] = v[:, 7] + (v[:, 7] - v[:, 6])  # 6, 7, 8 collinear up to rounding
    v = v.requires_grad_(True)
    out = nrm.vertex_normals(v, faces)
    assert bool(torch.isfinite(out).all())
    assert bool((out[:, 4] == 0).all()) and bool((out[:, 5] == 0).all())
    assert bool((out[:, 9:] == 0).all())
    # the reference too (a library cross product of two equal edges is not always 0)
    ref = reference.vertex_normals(v.detach(), faces)
    assert bool((ref[:, 4] == 0).all()) and bool((ref[:, 5] == 0).all())
    assert bool((ref[:, 9:] == 0).all())
    torch.testing.assert_close(ref, out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, :4].norm(dim=-1), torch.ones(2, 4, dtype=F64,
                                                                     device=device))
    (grad,) = torch.autograd.grad(out, v, torch.randn_like(out))
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[:, 4] == 0).all())
    # vertex 5 gets nothing: its only face has zero area, and its normal is constant zero.
    exact_zero = torch.tensor([[0, 1, 2], [4, 4, 5]], device=device)
    w = random_vertices(1, 6, F64, device).requires_grad_(True)
    out = nrm.vertex_normals(w, exact_zero)
    assert bool((out[0, 3:] == 0).all())
    (grad,) = torch.autograd.grad(out, w, torch.randn_like(out))
    assert bool((grad[0, 3:] == 0).all())


def test_zero_faces(nrm, device):
    faces = torch.empty(0, 3, dtype=torch.int64, device=device)
    v = random_vertices(2, 5, F64, device).requires_grad_(True)
    out = nrm.vertex_normals(v, faces)
    assert bool((out == 0).all())
    (grad,) = torch.autograd.grad(out, v, torch.randn_like(out))
    assert bool((grad == 0).all())


def test_nan_in_gives_nan_out(nrm, device):
    faces = torch.tensor([[0, 1, 2], [2, 3, 4]], device=device)
    v = random_vertices(2, 6, F64, device)
    v[0, 0, 1] = float("nan")
    out = nrm.vertex_normals(v, faces)
    assert bool(torch.isnan(out[0, :3]).all())  # every vertex of the NaN vertex's face
    assert bool(torch.isfinite(out[0, 3:5]).all()) and bool(torch.isfinite(out[1]).all())
    assert bool((out[0, 5] == 0).all())  # isolated


def test_non_contiguous_v(nrm, device, flame_mesh):
    template, faces = flame_mesh
    faces = faces.to(device)
    v = displaced(template, 3, F64).to(device)
    wide = torch.zeros(3, v.shape[1], 5, dtype=F64, device=device)
    wide[..., 1:4] = v
    strided = wide[..., 1:4]
    assert not strided.is_contiguous()
    torch.testing.assert_close(nrm.vertex_normals(strided, faces), nrm.vertex_normals(v, faces),
                               rtol=0, atol=0)
    leaf = strided.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    grad_out = torch.randn_like(v).transpose(0, 1).contiguous().transpose(0, 1)
    (got,) = torch.autograd.grad(nrm.vertex_normals(leaf, faces), leaf, grad_out)
    vv = v.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(nrm.vertex_normals(vv, faces), vv, grad_out.contiguous())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- gradients ----------------------------------------------------------------------------


def test_gradcheck_random_mesh(nrm, device):
    faces = random_mesh(n_verts=12, n_faces=20, seed=3, device=device)
    v = random_vertices(2, 12, F64, device, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: nrm.vertex_normals(x, faces), (v,))


def test_gradcheck_flame_patch(nrm, device, flame_mesh):
    """A patch of the FLAME mesh: its first 200 faces over the vertices they use."""
    template, faces = flame_mesh
    patch = faces[:200]
    used, local = torch.unique(patch, return_inverse=True)
    v = displaced(template[used], 1, F64).to(device).requires_grad_(True)
    local = local.to(device)
    assert torch.autograd.gradcheck(lambda x: nrm.vertex_normals(x, local), (v,))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_backward_matches_reference(nrm, device, dtype, flame_mesh):
    template, faces = flame_mesh
    v = displaced(template, 2, dtype).to(device).requires_grad_(True)
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(5),
                           dtype=F64).to(device, dtype)
    (got,) = torch.autograd.grad(nrm.vertex_normals(v, faces.to(device)), v, grad_out)
    v64 = v.detach().cpu().double().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.vertex_normals(v64, faces), v64, grad_out.cpu().double())
    tol = 1e-10 if dtype == F64 else 2e-4
    scale = want.abs().max()
    torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=0, atol=tol)


def test_double_backward_raises(nrm, device):
    faces = random_mesh(device=device)
    v = random_vertices(1, 30, F64, device).requires_grad_(True)
    (grad,) = torch.autograd.grad(nrm.vertex_normals(v, faces).sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --- dispatcher, fakes, compile -----------------------------------------------------------


def test_opcheck(nrm, device):
    faces = random_mesh(device=device)
    torch.library.opcheck(torch.ops.flame_ext.vertex_face_adjacency.default, (faces, 30))
    offsets, entries = nrm.vertex_face_adjacency(faces, 30)
    v = random_vertices(3, 30, F64, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.flame_ext.vertex_normals.default, (v, faces, offsets, entries))
    grad = random_vertices(3, 30, F64, device, seed=9)
    torch.library.opcheck(torch.ops.flame_ext.vertex_normals_backward.default,
                          (grad, v.detach(), faces, offsets, entries))


def test_adjacency_layout(nrm, device):
    faces = random_mesh(device=device)
    offsets, entries = nrm.vertex_face_adjacency(faces, 31)  # vertex 30 has no faces
    assert offsets.shape == (32,) and entries.shape == (150,)
    assert offsets[0] == 0 and offsets[-1] == 150 and offsets[30] == offsets[31]
    flat = faces.reshape(-1)
    for i in range(31):
        run = entries[offsets[i]:offsets[i + 1]]
        assert bool((flat[run] == i).all())
        assert bool((run[1:] > run[:-1]).all())  # in (face, corner) order


def test_compile_fullgraph(nrm, device):
    faces = random_mesh(device=device)
    v = random_vertices(4, 30, F32, device).requires_grad_(True)

    def f(v):
        return flame_ext.vertex_normals(v, faces).square().sum(-1).mul(v[..., 0]).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(v)
    (grad,) = torch.autograd.grad(value, v)
    (want_grad,) = torch.autograd.grad(f(v), v)
    torch.testing.assert_close(value, f(v))
    torch.testing.assert_close(grad, want_grad)


# --- bad input ----------------------------------------------------------------------------


def test_bad_faces_are_named(nrm, device):
    v = random_vertices(2, 10, F64, device)
    good = random_mesh(n_verts=10, n_faces=8, device=device)
    cases = [
        (ValueError, good.clone().index_fill_(0, torch.tensor([3], device=device), 10)),
        (ValueError, good.clone().index_fill_(0, torch.tensor([1], device=device), -1)),
        (ValueError, good[:, :2]),
        (ValueError, good.reshape(-1)),
        (TypeError, good.double()),
        (TypeError, good.to(torch.uint8)),
        (TypeError, [[0, 1, 2]]),
    ]
    for fn in (nrm.vertex_normals, flame_ext.vertex_normals, reference.vertex_normals):
        for error, faces in cases:
            if fn is reference.vertex_normals and error is ValueError and faces.dim() == 2 \
                    and faces.shape[1] == 3:
                continue  # the reference does not read the index values (no sync)
            with pytest.raises(error) as info:
                fn(v, faces)
            assert_error_names(info, "faces")


def test_bad_v_is_named(nrm, device):
    faces = random_mesh(n_verts=10, n_faces=8, device=device)
    for error, v in [
        (ValueError, torch.randn(2, 10, 4, device=device)),
        (ValueError, torch.randn(2, 2, 10, 3, device=device)),
        (TypeError, torch.randn(2, 10, 3, device=device).half()),
        (TypeError, torch.ones(2, 10, 3, dtype=torch.int64, device=device)),
        (TypeError, "v"),
    ]:
        with pytest.raises(error) as info:
            nrm.vertex_normals(v, faces)
        assert_error_names(info, "v")


def test_adjacency_num_vertices_checked(nrm):
    faces = random_mesh(n_verts=10, n_faces=8)
    with pytest.raises(ValueError) as info:
        nrm.vertex_face_adjacency(faces, 5)
    assert_error_names(info, "faces")
    with pytest.raises(ValueError) as info:
        nrm.vertex_face_adjacency(faces, -1)
    assert_error_names(info, "num_vertices")
    # The registered op checks its arguments itself.
    op = torch.ops.flame_ext.vertex_face_adjacency
    for bad, error, name in ((faces.double(), TypeError, "faces"),
                             (faces[:, :2], ValueError, "faces"),
                             (faces, ValueError, "num_vertices")):
        with pytest.raises(error) as info:
            op(bad, -1 if name == "num_vertices" else 10)
        assert_error_names(info, name)


def test_op_rejects_a_bad_adjacency_on_cpu(nrm):
    """Direct calls with a table that does not belong to the faces raise, never read out
    of bounds."""
    faces = random_mesh(n_verts=10, n_faces=8)
    offsets, entries = nrm.vertex_face_adjacency(faces, 10)
    v = random_vertices(1, 10, F64)
    op = torch.ops.flame_ext.vertex_normals
    bad_entries = entries.clone()
    bad_entries[0] = 10**6
    bad_offsets = offsets.clone()
    bad_offsets[3] = 10**6
    swapped = entries.flip(0)
    for o, e in ((offsets, bad_entries), (bad_offsets, entries), (offsets, swapped)):
        with pytest.raises(RuntimeError, match="vertex_normals"):
            op(v, faces, o, e)
    with pytest.raises(RuntimeError, match="offsets"):
        op(v, faces, offsets[:-1], entries)


# --- caching, determinism -----------------------------------------------------------------


def test_adjacency_cached_per_faces_tensor_and_version(nrm):
    faces = random_mesh(n_verts=10, n_faces=8)
    first = nrm._adjacency_of(faces, 10)
    assert nrm._adjacency_of(faces, 10)[1] is first[1]
    faces[0, 0] = 9 - faces[0, 0]  # in place: a new version
    second = nrm._adjacency_of(faces, 10)
    assert second[1] is not first[1]
    v = random_vertices(1, 10, F64)
    torch.testing.assert_close(nrm.vertex_normals(v, faces), reference.vertex_normals(v, faces))
    # The entry goes with its tensor (first and second hold faces too: int64 already).
    key = id(faces)
    del faces, first, second
    assert key not in nrm._cache


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_faces_changed_through_numpy_are_read_again(nrm, dtype):
    """A write through numpy into faces made by torch.from_numpy bumps no version: the
    kept table no longer matches, and the normals are those of the faces as they are."""
    faces_np = random_mesh(n_verts=10, n_faces=8).numpy().astype(dtype)
    faces = torch.from_numpy(faces_np)
    v = random_vertices(1, 10, F64)
    before = nrm.vertex_normals(v, faces)
    faces_np[:] = faces_np[:, [0, 2, 1]]  # every face turned over
    after = nrm.vertex_normals(v, faces)
    torch.testing.assert_close(after, reference.vertex_normals(v, faces.long()))
    torch.testing.assert_close(after, -before)
    faces.data = torch.cat([faces, faces[:3]])  # more faces, the same version
    torch.testing.assert_close(nrm.vertex_normals(v, faces),
                               reference.vertex_normals(v, faces.long()))


def test_results_do_not_depend_on_the_thread_count(nrm, flame_mesh):
    template, faces = flame_mesh
    # 8 x 5023 vertices: three tasks of the CPU loops' 16384, so two threads split them.
    v = displaced(template, 8, F32).requires_grad_(True)
    assert_independent_of_thread_count([("vertex_normals", lambda x: nrm.vertex_normals(x, faces),
                                         [v])])


def test_deterministic_runs(nrm, device, flame_mesh, deterministic):
    template, faces = flame_mesh
    faces = faces.to(device)
    v = displaced(template, 2, F32).to(device).requires_grad_(True)
    grad_out = torch.randn_like(v)
    runs = [torch.autograd.grad(nrm.vertex_normals(v, faces), v, grad_out)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# --- FlameShape -----------------------------------------------------------------------------


def test_flame_shape_vertex_normals(ops, quiet):
    from flame_ext import FlameShape

    shape = FlameShape(n_shape=6, n_expr=4, model_path="synthetic-small", device="cpu",
                       transforms="none", backend="ext")
    v, _ = shape(shape=torch.randn(2, 6), expr=torch.randn(2, 4))
    got = shape.vertex_normals(v)
    assert shape._normal_offsets is not None
    assert "_normal_offsets" not in shape.state_dict()
    torch.testing.assert_close(got, reference.vertex_normals(v, shape.tris), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shape.vertex_normals(v[0]), got[0], rtol=0, atol=0)
    reference_shape = FlameShape(n_shape=6, n_expr=4, model_path="synthetic-small",
                                 device="cpu", transforms="none", backend="reference")
    torch.testing.assert_close(reference_shape.vertex_normals(v), got, rtol=1e-5, atol=1e-5)
    # .double() keeps the (integer) adjacency; load_state_dict forgets it.
    offsets = shape._normal_offsets
    shape.double()
    assert shape._normal_offsets is offsets
    shape.load_state_dict(shape.state_dict())
    assert shape._normal_offsets is None
    # tris changed in place, replaced, or written where torch cannot see (numpy, .data):
    # the normals follow.
    turned = shape.tris[:, [0, 2, 1]].clone()
    shape.tris.copy_(turned)
    torch.testing.assert_close(shape.vertex_normals(v), -got, rtol=1e-5, atol=1e-5)
    shape.tris = turned[:, [0, 2, 1]].clone()
    torch.testing.assert_close(shape.vertex_normals(v), got, rtol=1e-5, atol=1e-5)
    shape.tris.numpy()[:] = turned.numpy()
    torch.testing.assert_close(shape.vertex_normals(v), -got, rtol=1e-5, atol=1e-5)
    shape.tris.data = turned[:, [0, 2, 1]].clone()
    torch.testing.assert_close(shape.vertex_normals(v), got, rtol=1e-5, atol=1e-5)
    more = torch.cat([shape.tris, turned[:5]])  # .data with more faces: no new version
    shape.tris.data = more
    torch.testing.assert_close(shape.vertex_normals(v), reference.vertex_normals(v, more),
                               rtol=1e-5, atol=1e-5)
    shape.tris.data = more[:-5].clone()
    # traced after an eager call (the kept table) and in a fresh module (none kept)
    for module in (shape, FlameShape(n_shape=6, n_expr=4, model_path="synthetic-small",
                                     device="cpu", transforms="none", backend="ext")):
        compiled = torch.compile(module.vertex_normals, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(v.detach()), got, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError) as info:
        shape.vertex_normals(v[:, :5])
    assert_error_names(info, "v")


@pytest.mark.cuda
def test_flame_shape_adjacency_moves_with_to(ops, quiet):
    from flame_ext import FlameShape

    shape = FlameShape(n_shape=6, n_expr=4, model_path="synthetic-small", device="cpu",
                       transforms="none")
    v, _ = shape()
    cpu = shape.vertex_normals(v)
    shape.to("cuda")
    assert shape._normal_offsets.is_cuda
    torch.testing.assert_close(shape.vertex_normals(v.cuda()).cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32])
def test_cuda_matches_cpu(nrm, dtype, flame_mesh):
    template, faces = flame_mesh
    v = displaced(template, 3, dtype).requires_grad_(True)
    grad_out = torch.randn_like(v)
    out_cpu = nrm.vertex_normals(v, faces)
    (g_cpu,) = torch.autograd.grad(out_cpu, v, grad_out)
    vc = v.detach().cuda().requires_grad_(True)
    out_gpu = nrm.vertex_normals(vc, faces.cuda())
    (g_gpu,) = torch.autograd.grad(out_gpu, vc, grad_out.cuda())
    # The device contracts products into FMAs: last-bit differences only.
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=tol, atol=tol)
    scale = g_cpu.abs().max()
    torch.testing.assert_close(g_gpu.cpu() / scale, g_cpu / scale, rtol=0, atol=10 * tol)
