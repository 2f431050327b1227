"""Tests of the landmarks op family: flame_ext::landmarks / landmarks_backward and their
wrapper flame_ext._ops.landmarks.landmarks.

A small random model is built inline (V = 40 vertices, F = 60 faces, 7 static landmarks,
79 bins of 5 contour landmarks); flame_ext.reference is the oracle, and the contour bins
are also checked against the yaw of poses built to have a known yaw. Poses are drawn away
from the .5 rounding ties of the bin rule: at a tie the bin depends on the last bit of
the yaw, which two correct implementations may round differently. Then properties over
any shape, layout and value (bins checked where the yaw is clear of a tie), argument
errors, 64-bit indexing past 2^31 elements, determinism, the CUDA kernels against the CPU
ones.
"""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from _oracle import (
    a64,
    assert_bad_argument_is_named,
    assert_deterministic_and_fully_written,
    assert_error_names,
    assert_independent_of_thread_count,
    assert_matches,
    d64,
    ambiguous_bins,
)
from _process import rss_bytes
from _samples import (
    CORRUPTIONS,
    INDEX_PAD,
    bad_op_cases,
    big_zeros,
    dtypes,
    lay_out,
    layouts,
    random_values,
    seeds,
    specials,
    yaw_degrees,
)
from flame_ext import reference

F64, F32 = torch.float64, torch.float32
N_VERTS, N_FACES, N_STATIC, N_BINS, N_CONTOUR = 40, 60, 7, 79, 5
RULES = ("medusa", "deca")
# Distance (degrees) kept between a pose's yaw and the nearest rounding tie. float32 yaw
# errors are ~1e-5 degrees (a few ulp of sin/cos/atan2 on angles up to 90), so 1e-3
# leaves a wide margin while discarding only ~0.2% of random draws.
TIE_MARGIN = 1e-3
# float32 landmarks are 3-term sums of products with |v| < 5 and weights in (0, 1): the
# op and the reference round differently by at most a few ulp of ~5.
F32_TOL = dict(rtol=1e-6, atol=5e-6)
F64_TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture
def lmk(ops):
    """The wrapper module, imported once the library is known to be loaded."""
    from flame_ext._ops import landmarks as module

    return module


def _ops():
    """The Python wrappers (checks and autograd) of the landmarks ops."""
    from flame_ext._ops import landmarks

    return landmarks


def random_tables(
    dtype=F64, device="cpu", n_bins=N_BINS, seed=0, n_static=N_STATIC, n_verts=N_VERTS
):
    """tris, static and dynamic tables: random valid indices, weights in (0.05, 1).

    In the op's argument order, so `*tables.values()` can be passed positionally.
    """
    g = torch.Generator().manual_seed(seed)
    tris = torch.randint(0, n_verts, (N_FACES, 3), generator=g)
    faces = torch.randint(0, N_FACES, (n_static,), generator=g)
    bary = 0.05 + 0.95 * torch.rand(n_static, 3, generator=g, dtype=F64)
    dyn_faces = torch.randint(0, N_FACES, (n_bins, N_CONTOUR), generator=g)
    dyn_bary = 0.05 + 0.95 * torch.rand(n_bins, N_CONTOUR, 3, generator=g, dtype=F64)
    return dict(
        tris=tris.to(device),
        lmk_faces_idx=faces.to(device),
        lmk_bary_coords=bary.to(dtype=dtype, device=device),
        dynamic_lmk_faces_idx=dyn_faces.to(device),
        dynamic_lmk_bary_coords=dyn_bary.to(dtype=dtype, device=device),
    )


def random_vertices(batch, dtype=F64, device="cpu", seed=1, n_verts=N_VERTS):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, n_verts, 3, generator=g, dtype=F64)
    return v.to(dtype=dtype, device=device)


def near_tie(poses, rule):
    yaw = yaw_degrees(poses, rule)
    return ((yaw - yaw.floor() - 0.5).abs() < TIE_MARGIN) & (yaw < 39.5)


def random_poses(batch, rule, dtype=F64, device="cpu", scale=0.5, seed=2):
    """(B, 15) poses spread over many bins, none within TIE_MARGIN of a tie."""
    g = torch.Generator().manual_seed(seed)
    poses = scale * torch.randn(batch, 15, generator=g, dtype=F64)
    while True:
        bad = near_tie(poses.to(dtype), rule)
        if not bad.any():
            return poses.to(dtype=dtype, device=device)
        poses[bad] += 1e-2 * torch.randn(int(bad.sum()), 15, generator=g, dtype=F64)


def bin_of_yaw(y):
    """The bin of an integer yaw, written from the rule's words: y for y >= 0, 39 - y for
    -39 <= y < 0, 78 below."""
    y = min(y, 39)
    if y >= 0:
        return y
    return 39 - y if y >= -39 else 78


def reference_grad(tables, v, poses, rule):
    v = v.detach().clone().requires_grad_(True)
    out = reference.landmarks(v, poses, contour_rule=rule, **tables)
    return out, v


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_matches_reference(lmk, device, dtype, rule, batch):
    tables = random_tables(dtype, device)
    v = random_vertices(batch, dtype, device)
    poses = random_poses(batch, rule, dtype, device)
    out, bins = lmk._op(v, poses, *tables.values(), lmk.CONTOUR_RULES[rule])
    assert out.shape == (batch, N_CONTOUR + N_STATIC, 3) and out.dtype == dtype
    assert bins.shape == (batch,) and bins.dtype == torch.int64
    assert torch.equal(bins, reference.contour_bins(poses, rule))
    expected = reference.landmarks(v, poses, contour_rule=rule, **tables)
    torch.testing.assert_close(out, expected, **(F64_TOL if dtype == F64 else F32_TOL))
    # The wrapper returns the same landmarks.
    wrapped = lmk.landmarks(v, poses, contour_rule=rule, **tables)
    assert torch.equal(wrapped, out)


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_static_only(lmk, device, dtype, batch):
    """mp-like: no dynamic tables, no contour rule read; poses may be None or anything."""
    tables = random_tables(dtype, device)
    del tables["dynamic_lmk_faces_idx"], tables["dynamic_lmk_bary_coords"]
    v = random_vertices(batch, dtype, device)
    out = lmk.landmarks(v, None, **tables)
    assert out.shape == (batch, N_STATIC, 3)
    expected = reference.landmarks(v, None, **tables)
    torch.testing.assert_close(out, expected, **(F64_TOL if dtype == F64 else F32_TOL))
    nan_poses = torch.full((batch, 15), float("nan"), dtype=dtype, device=device)
    assert torch.equal(lmk.landmarks(v, nan_poses, contour_rule="deca", **tables), out)


def test_landmark_is_barycentric_sum(lmk, device):
    """Against the formula itself, one landmark at a time (independent of reference)."""
    tables = random_tables(F64, device)
    v = random_vertices(2, F64, device)
    poses = random_poses(2, "medusa", F64, device)
    out, bins = lmk._op(v, poses, *tables.values(), 1)
    tris = tables["tris"]
    for b in range(2):
        row = int(bins[b])
        for l in range(N_CONTOUR + N_STATIC):
            if l < N_CONTOUR:
                face = tables["dynamic_lmk_faces_idx"][row, l]
                w = tables["dynamic_lmk_bary_coords"][row, l]
            else:
                face = tables["lmk_faces_idx"][l - N_CONTOUR]
                w = tables["lmk_bary_coords"][l - N_CONTOUR]
            want = sum(w[k] * v[b, tris[face, k]] for k in range(3))
            torch.testing.assert_close(out[b, l], want, **F64_TOL)


# --- the contour bin ----------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_bins_sweep_yaw(lmk, device, dtype, rule):
    """Global yaw from -90 to 90 degrees (a rotation about y, which both readings of the
    pose agree on), no neck: the bin follows from the angle alone."""
    # An irrational offset keeps every angle off the exact .5 ties.
    deg = torch.linspace(-89.5, 89.5, 1001, dtype=F64) + 1 / (7 * math.pi)
    poses = torch.zeros(deg.shape[0], 15, dtype=F64)
    poses[:, 1] = torch.deg2rad(deg)
    keep = ~near_tie(poses.to(dtype), rule)
    poses, deg = poses[keep].to(dtype=dtype, device=device), deg[keep]
    tables = random_tables(dtype, device)
    v = random_vertices(poses.shape[0], dtype, device)
    _, bins = lmk._op(v, poses, *tables.values(), lmk.CONTOUR_RULES[rule])
    sign = -1 if rule == "medusa" else 1
    want = [bin_of_yaw(round(sign * d)) for d in deg.tolist()]
    assert bins.tolist() == want
    assert sorted(set(want)) == list(range(N_BINS))  # the sweep covers every bin


@pytest.mark.parametrize("rule", RULES)
def test_bins_sweep_with_neck(lmk, device, dtype, rule):
    """Global yaw sweep plus small random neck and other rotations: against the
    reference's bins, which compose the global and neck rotations."""
    g = torch.Generator().manual_seed(5)
    deg = torch.linspace(-90, 90, 1500, dtype=F64) + 1 / (7 * math.pi)
    poses = 0.05 * torch.randn(deg.shape[0], 15, generator=g, dtype=F64)
    poses[:, 1] += torch.deg2rad(deg)
    keep = ~near_tie(poses.to(dtype), rule)
    poses = poses[keep].to(dtype=dtype, device=device)
    tables = random_tables(dtype, device)
    v = random_vertices(poses.shape[0], dtype, device)
    _, bins = lmk._op(v, poses, *tables.values(), lmk.CONTOUR_RULES[rule])
    assert torch.equal(bins, reference.contour_bins(poses, rule))
    assert len(set(bins.tolist())) == N_BINS


def test_rules_differ(lmk, device):
    """The medusa rule negates the yaw: a pure +20 degree yaw is bin 59 there, 20 in DECA."""
    tables = random_tables(F64, device)
    poses = torch.zeros(1, 15, dtype=F64, device=device)
    poses[0, 1] = math.radians(20.2)
    v = random_vertices(1, F64, device)
    assert lmk._op(v, poses, *tables.values(), 1)[1].item() == 39 + 20
    assert lmk._op(v, poses, *tables.values(), 2)[1].item() == 20


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_pose_gives_nan_contour_points(lmk, device, dtype, rule):
    """A NaN or infinite global or neck pose has no contour bin: its 17 (here 5) contour
    points are NaN, without gradient; the static points and the other samples are not
    touched. The reference answers the same."""
    tables = random_tables(dtype, device)
    v = random_vertices(4, dtype, device)
    poses = random_poses(4, rule, dtype, device)
    poses[1, 4] = float("nan")
    poses[2, 0] = float("inf")
    poses[3, 9] = float("nan")  # the jaw: not read by the bin rule
    out, bins = lmk._op(v, poses, *tables.values(), lmk.CONTOUR_RULES[rule])
    assert bins[1:3].tolist() == [-1, -1]
    assert torch.equal(bins, reference.contour_bins(poses, rule))
    assert torch.isnan(out[1:3, :N_CONTOUR]).all()
    assert torch.isfinite(out[1:3, N_CONTOUR:]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    want = reference.landmarks(v, poses, *tables.values(), contour_rule=rule)
    tol = F64_TOL if dtype == F64 else F32_TOL
    torch.testing.assert_close(out, want, equal_nan=True, **tol)
    # The NaN points are constants: gradients of the finite ones only, as the reference's.
    grads = []
    for fn in (lambda x: lmk.landmarks(x, poses, contour_rule=rule, **tables),
               lambda x: reference.landmarks(x, poses, *tables.values(), contour_rule=rule)):
        x = v.clone().requires_grad_()
        fn(x).nan_to_num(0.0).sum().backward()
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], **tol)


def test_fewer_bins_clamped(lmk, device):
    """A variant table with NB < 79 rows: bins past its end go to the last row."""
    n_bins = 50
    tables = random_tables(F64, device, n_bins=n_bins)
    poses = torch.zeros(3, 15, dtype=F64, device=device)
    poses[:, 1] = torch.deg2rad(torch.tensor([-10.2, 15.3, 30.1], dtype=F64))
    v = random_vertices(3, F64, device)
    out, bins = lmk._op(v, poses, *tables.values(), 1)
    assert bins.tolist() == [10, 49, 49]  # medusa: -yaw 10, 15 -> 54, 30 -> 69
    row = tables["dynamic_lmk_faces_idx"][49]
    w = tables["dynamic_lmk_bary_coords"][49]
    want = (w[:, :, None] * v[2][tables["tris"][row]]).sum(1)
    torch.testing.assert_close(out[2, :N_CONTOUR], want, **F64_TOL)


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES + (None,))
def test_gradcheck(lmk, device, rule):
    tables = random_tables(F64, device)
    if rule is None:
        del tables["dynamic_lmk_faces_idx"], tables["dynamic_lmk_bary_coords"]
    v = random_vertices(3, F64, device).requires_grad_(True)
    poses = random_poses(3, rule or "medusa", F64, device)
    kwargs = dict(contour_rule=rule) if rule else {}
    assert torch.autograd.gradcheck(
        lambda v: lmk.landmarks(v, poses, **tables, **kwargs), (v,)
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_backward_matches_reference(lmk, device, dtype, rule, batch):
    tables = random_tables(dtype, device)
    poses = random_poses(batch, rule, dtype, device).requires_grad_(True)
    v = random_vertices(batch, dtype, device).requires_grad_(True)
    grad = random_vertices(batch, dtype, device, seed=7)[:, : N_CONTOUR + N_STATIC]
    lmk.landmarks(v, poses, contour_rule=rule, **tables).backward(grad)
    expected, v_ref = reference_grad(tables, v, poses.detach(), rule)
    expected.backward(grad)
    # Each vertex receives a handful of products bary * grad (< 5 in size).
    tol = F64_TOL if dtype == F64 else dict(rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(v.grad, v_ref.grad, **tol)
    assert poses.grad is None  # the bin choice is piecewise constant: no gradient


@pytest.mark.parametrize("rule", RULES + (None,))
def test_gradgradcheck(lmk, device, rule):
    """The backward op's own derivative (w.r.t. the incoming gradient)."""
    tables = random_tables(F64, device)
    if rule is None:
        del tables["dynamic_lmk_faces_idx"], tables["dynamic_lmk_bary_coords"]
    v = random_vertices(3, F64, device).requires_grad_(True)
    poses = random_poses(3, rule or "medusa", F64, device)
    kwargs = dict(contour_rule=rule) if rule else {}
    assert torch.autograd.gradgradcheck(
        lambda v: lmk.landmarks(v, poses, **tables, **kwargs), (v,)
    )


@pytest.mark.parametrize("rule", RULES)
def test_backward_many_shared_vertices(lmk, device, dtype, rule):
    """130 landmarks on a 10-vertex mesh: every vertex collects dozens of terms, and the
    3 * 135 terms per sample span several tiles of the CUDA backward."""
    n_verts, n_static = 10, 130
    tables = random_tables(dtype, device, n_static=n_static, n_verts=n_verts)
    poses = random_poses(5, rule, dtype, device)
    v = random_vertices(5, dtype, device, n_verts=n_verts).requires_grad_(True)
    grad = torch.randn(5, N_CONTOUR + n_static, 3, dtype=F64).to(dtype=dtype, device=device)
    lmk.landmarks(v, poses, contour_rule=rule, **tables).backward(grad)
    expected, v_ref = reference_grad(tables, v, poses, rule)
    expected.backward(grad)
    # ~40 terms of size < 5 per vertex: float32 sums differ by a few ulp of ~50.
    tol = F64_TOL if dtype == F64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v.grad, v_ref.grad, **tol)


# --- dispatcher, fakes, compile -----------------------------------------------------------


@pytest.mark.parametrize("rule", [0, 1, 2])
def test_opcheck(lmk, device, rule):
    tables = random_tables(F64, device)
    if rule == 0:
        tables["dynamic_lmk_faces_idx"] = torch.empty(0, 0, dtype=torch.int64, device=device)
        tables["dynamic_lmk_bary_coords"] = torch.empty(0, 0, 3, dtype=F64, device=device)
    v = random_vertices(3, F64, device).requires_grad_(True)
    poses = random_poses(3, "deca" if rule == 2 else "medusa", F64, device)
    torch.library.opcheck(torch.ops.flame_ext.landmarks.default, (v, poses, *tables.values(), rule))
    _, bins = lmk._op(v, poses, *tables.values(), rule)
    n_lmk = (N_CONTOUR if rule else 0) + N_STATIC
    grad = random_vertices(3, F64, device, seed=8)[:, :n_lmk].requires_grad_(True)
    torch.library.opcheck(
        torch.ops.flame_ext.landmarks_backward.default,
        (grad, bins, *tables.values(), N_VERTS),
    )


@pytest.mark.parametrize("rule", RULES + (None,))
def test_compile_fullgraph(lmk, device, rule):
    tables = random_tables(F32, device)
    if rule is None:
        del tables["dynamic_lmk_faces_idx"], tables["dynamic_lmk_bary_coords"]
    else:
        tables["contour_rule"] = rule
    v = random_vertices(4, F32, device).requires_grad_(True)
    poses = random_poses(4, rule or "medusa", F32, device)

    def f(v, poses):
        return lmk.landmarks(v, poses, **tables).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(v, poses)
    (grad,) = torch.autograd.grad(value, v)
    (want_grad,) = torch.autograd.grad(f(v, poses), v)
    torch.testing.assert_close(value, f(v, poses))
    torch.testing.assert_close(grad, want_grad)


# --- robustness ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_nan_vertices_propagate(lmk, device, rule):
    tables = random_tables(F64, device)
    v = random_vertices(2, F64, device)
    poses = random_poses(2, rule, F64, device)
    clean = lmk.landmarks(v, poses, contour_rule=rule, **tables)
    nan_vertex = int(tables["tris"][tables["lmk_faces_idx"][0], 1])
    v[1, nan_vertex] = float("nan")
    out = lmk.landmarks(v, poses, contour_rule=rule, **tables)
    _, bins = lmk._op(v, poses, *tables.values(), lmk.CONTOUR_RULES[rule])
    assert torch.equal(out[0], clean[0])
    faces = torch.cat([tables["dynamic_lmk_faces_idx"][bins[1]], tables["lmk_faces_idx"]])
    touched = (tables["tris"][faces] == nan_vertex).any(1)
    assert touched[N_CONTOUR]
    assert torch.isnan(out[1][touched]).all()
    assert torch.equal(out[1][~touched], clean[1][~touched])


def test_deterministic(lmk, device):
    tables = random_tables(F32, device)
    v = random_vertices(300, F32, device).requires_grad_(True)
    poses = random_poses(300, "medusa", F32, device)
    grad = random_vertices(300, F32, device, seed=9)[:, : N_CONTOUR + N_STATIC]
    results = []
    for _ in range(2):
        out = lmk.landmarks(v, poses, **tables)
        (g,) = torch.autograd.grad(out, v, grad)
        results.append((out, g))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_non_contiguous_inputs(lmk, device):
    tables = random_tables(F64, device)
    v = random_vertices(6, F64, device)
    poses = random_poses(6, "medusa", F64, device)
    want = lmk.landmarks(v[::2], poses[::2], **tables)
    v_t = v.transpose(1, 2).contiguous().transpose(1, 2)
    noncontig = {k: t.t().contiguous().t() if t.dim() == 2 else t for k, t in tables.items()}
    got = lmk.landmarks(v_t[::2], torch.cat([poses, poses], 1)[::2, :15], **noncontig)
    torch.testing.assert_close(got, want, **F64_TOL)


def test_bad_index_raises_on_cpu(lmk):
    tables = random_tables(F64, "cpu")
    v = random_vertices(2, F64, "cpu")
    poses = random_poses(2, "medusa", F64, "cpu")
    cases = {
        "lmk_faces_idx": (N_FACES, "lmk_faces_idx"),
        "dynamic_lmk_faces_idx": (-1, "dynamic_lmk_faces_idx"),
        "tris": (N_VERTS, "tris"),
    }
    for key, (bad, message) in cases.items():
        broken = dict(tables)
        broken[key] = tables[key].clone()
        broken[key].view(-1)[:] = bad  # every entry, so whichever row is read is bad
        with pytest.raises(RuntimeError, match=message):
            lmk.landmarks(v, poses, **broken)
    _, bins = lmk._op(v, poses, *tables.values(), 1)
    grad = random_vertices(2, F64, "cpu")[:, : N_CONTOUR + N_STATIC]
    with pytest.raises(RuntimeError, match="bins"):
        torch.ops.flame_ext.landmarks_backward(
            grad, torch.full_like(bins, N_BINS), *tables.values(), N_VERTS
        )
    with pytest.raises(RuntimeError, match="contour_rule"):
        lmk._op(v, poses, *tables.values(), 3)


@pytest.mark.cuda
def test_bad_index_gives_nan_on_cuda(lmk):
    """Device tables cannot be read on the host without a sync: a landmark whose face or
    corner index is out of range is NaN and gets no gradient; the kernel reads nothing
    out of bounds, does not trap, and the other landmarks and gradients are exact."""
    tables = random_tables(F64, "cuda")
    v = random_vertices(2, F64, "cuda")
    poses = random_poses(2, "medusa", F64, "cuda")
    broken = dict(tables)
    # static landmark 1: a face index past the table; static landmark 3: a face of its
    # own (appended) with a corner index past the vertices
    bad_face = torch.tensor([[0, 1, N_VERTS + 5]], device="cuda")
    broken["tris"] = torch.cat([tables["tris"], bad_face])
    broken["lmk_faces_idx"] = tables["lmk_faces_idx"].clone()
    broken["lmk_faces_idx"][1] = N_FACES + 1
    broken["lmk_faces_idx"][3] = N_FACES
    leaf = v.clone().requires_grad_(True)
    got = lmk.landmarks(leaf, poses, **broken)
    want_leaf = v.clone().requires_grad_(True)
    want = lmk.landmarks(want_leaf, poses, **tables)
    bad = [N_CONTOUR + 1, N_CONTOUR + 3]
    good = [i for i in range(got.shape[1]) if i not in bad]
    assert got[:, bad].isnan().all()
    torch.testing.assert_close(got[:, good], want[:, good], rtol=0, atol=0)
    grad = torch.randn_like(got)
    grad[:, bad] = 0
    (got.nan_to_num() * grad).sum().backward()
    (want * grad).sum().backward()
    torch.testing.assert_close(leaf.grad, want_leaf.grad, rtol=0, atol=0)
    torch.cuda.synchronize()  # a trapped kernel would surface here


def _argument_cases(device):
    """(override of the good arguments, exception, message fragment) triples."""
    t = random_tables(F64, device)
    v = random_vertices(2, F64, device)
    p = random_poses(2, "medusa", F64, device)
    faces, bary = t["lmk_faces_idx"], t["lmk_bary_coords"]
    dyn_faces, dyn_bary = t["dynamic_lmk_faces_idx"], t["dynamic_lmk_bary_coords"]
    cases = [
        (dict(v=v[0]), ValueError, "v must have 3 dimensions"),
        (dict(v=v[..., :2]), ValueError, "v must have shape"),
        (dict(v=v.long()), TypeError, "v must be float32 or float64"),
        (dict(v=v.tolist()), TypeError, "v must be a torch.Tensor"),
        (dict(tris=t["tris"][:, :2]), ValueError, "tris must have shape"),
        (dict(tris=t["tris"].int()), TypeError, "tris must have dtype"),
        (dict(tris=t["tris"].to("meta")), ValueError, "tris is on"),
        (dict(lmk_faces_idx=faces.int()), TypeError, "lmk_faces_idx must have dtype"),
        (dict(lmk_bary_coords=bary[:-1]), ValueError, "lmk_bary_coords must have shape"),
        (dict(lmk_bary_coords=bary.float()), TypeError, "lmk_bary_coords has dtype"),
        (dict(dynamic_lmk_bary_coords=None), ValueError, "together"),
        (dict(dynamic_lmk_faces_idx=dyn_faces[None]), ValueError, "dynamic_lmk_faces_idx"),
        (
            dict(dynamic_lmk_faces_idx=dyn_faces[:0], dynamic_lmk_bary_coords=dyn_bary[:0]),
            ValueError,
            "at least one bin",
        ),
        (dict(dynamic_lmk_bary_coords=dyn_bary[:, :-1]), ValueError, "dynamic_lmk_bary"),
        (dict(dynamic_lmk_bary_coords=dyn_bary.float()), TypeError, "dynamic_lmk_bary"),
        (dict(poses=None), ValueError, "poses is required"),
        (dict(poses=p[:1]), ValueError, "poses must have shape"),
        (dict(poses=p[:, :4]), ValueError, "poses must have shape"),
        (dict(poses=p.float()), TypeError, "poses has dtype"),
        (dict(poses=p.to("meta")), ValueError, "poses is on"),
        (dict(contour_rule="euler"), ValueError, "contour_rule must be one of"),
        (dict(contour_rule=1), TypeError, "contour_rule must be a str"),
    ]
    return cases, dict(v=v, poses=p, **t)


def test_argument_errors(lmk, device):
    cases, good = _argument_cases(device)
    lmk.landmarks(**good)
    for override, exc, message in cases:
        with pytest.raises(exc, match=message):
            lmk.landmarks(**{**good, **override})


def test_cuda_graph_capture(lmk, device):
    """Forward and backward ops run inside a CUDA graph: no host-device sync in either."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    tables = random_tables(F32, device)
    v = random_vertices(8, F32, device)
    poses = random_poses(8, "medusa", F32, device)
    grad = random_vertices(8, F32, device, seed=3)[:, : N_CONTOUR + N_STATIC].contiguous()
    args = tuple(tables.values())
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
        out, bins = lmk._op(v, poses, *args, 1)
        lmk._backward_op(grad, bins, *args, N_VERTS)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, bins = lmk._op(v, poses, *args, 1)
        grad_v = lmk._backward_op(grad, bins, *args, N_VERTS)
    v.copy_(random_vertices(8, F32, device, seed=11))
    graph.replay()
    torch.testing.assert_close(out, reference.landmarks(v, poses, **tables), **F32_TOL)
    want_bins = reference.contour_bins(poses, "medusa")
    assert torch.equal(bins, want_bins)
    assert torch.equal(grad_v, lmk._backward_op(grad, want_bins, *args, N_VERTS))


# --- properties: any shape, layout and value ----------------------------------------------


@st.composite
def landmark_cases(draw):
    num_verts = draw(st.integers(1, 30))
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 5, 40])),
        num_verts=num_verts,
        num_faces=draw(st.integers(1, 20)),
        n_static=draw(st.integers(0, 10)),
        n_bins=draw(st.sampled_from([None, 1, 5, 79])),  # None: no contour
        n_contour=draw(st.integers(0, 5)),
        num_joints=draw(st.integers(2, 5)),
        rule=draw(st.sampled_from(["medusa", "deca"])),
        dtype=draw(dtypes),
        seed=draw(seeds),
        pose_scale=draw(st.sampled_from([0.3, 2.0, 1e4])),
        layouts=draw(st.lists(layouts, min_size=8, max_size=8)),
        inject=draw(st.lists(specials, min_size=2, max_size=2)),
    )


def make_landmarks(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    b, nv, nf, dtype = case["batch"], case["num_verts"], case["num_faces"], case["dtype"]
    lay = case["layouts"]

    def index(high, shape, i):
        return lay_out(torch.randint(0, high, shape, generator=gen), lay[i], device, INDEX_PAD)

    def weights(shape, i):
        return lay_out(torch.rand(shape, generator=gen, dtype=F64).to(dtype), lay[i], device)

    args = dict(
        v=lay_out(random_values(case["seed"], (b, nv, 3), inject=case["inject"][0]).to(dtype),
                  lay[0], device),
        poses=None,
        tris=index(nv, (nf, 3), 1),
        lmk_faces_idx=index(nf, (case["n_static"],), 2),
        lmk_bary_coords=weights((case["n_static"], 3), 3),
        dynamic_lmk_faces_idx=None,
        dynamic_lmk_bary_coords=None,
        contour_rule=case["rule"],
    )
    if case["n_bins"] is not None:
        nb, nc = case["n_bins"], case["n_contour"]
        poses = random_values(case["seed"] + 1, (b, 3 * case["num_joints"]),
                              case["pose_scale"], case["inject"][1])
        args.update(
            poses=lay_out(poses.to(dtype), lay[4], device),
            dynamic_lmk_faces_idx=index(nf, (nb, nc), 5),
            dynamic_lmk_bary_coords=weights((nb, nc, 3), 6),
        )
    return args


def landmarks_oracle(v64, args, convert, rows=None):
    """The landmarks of float64 vertices `v64` with the tables of `args` (weights through
    `convert`), in plain torch ops; `rows` = (faces (B, Ld), bary (B, Ld, 3)) are the
    contour rows each sample uses (None: static landmarks only), and optionally a (B,)
    mask of the samples that have a bin (the others' contour points are NaN)."""
    tris = args["tris"].cpu()
    static = reference.landmarks(
        v64, None, tris, args["lmk_faces_idx"].cpu(), convert(args["lmk_bary_coords"])
    )
    if rows is None:
        return static
    faces, bary = rows[0].cpu(), convert(rows[1])
    batch, n_contour = faces.shape
    corners = tris[faces.reshape(-1)].view(batch, 3 * n_contour, 1).expand(-1, -1, 3)
    points = v64.gather(1, corners).view(batch, n_contour, 3, 3)
    contour = torch.einsum("blkc,blk->blc", points, bary)
    if len(rows) > 2:
        has_bin = rows[2].view(batch, 1, 1)
        contour = torch.where(has_bin, contour, torch.full_like(contour, float("nan")))
    return torch.cat([contour, static], dim=1)


@given(case=landmark_cases())
def test_landmarks_any_input_match_reference(ops, device, case):
    args = make_landmarks(case, device)
    v = args["v"].detach().requires_grad_(True)
    args["v"] = v
    lmk = _ops().landmarks(**args)
    contour = case["n_bins"] is not None
    n_contour = case["n_contour"] if contour else 0
    n_lmk = n_contour + case["n_static"]
    assert lmk.shape == (case["batch"], n_lmk, 3)
    assert lmk.dtype == case["dtype"] and lmk.device == v.device
    rows = None
    if contour:
        # The bins come from the op itself (it returns them): a yaw within rounding of a
        # .5 tie, or from a huge angle whose last bits decide sin and cos, may fall on
        # either side, and both sides are right. Where the yaw is clear of that, the bins
        # must be the reference's (clamped to the table, as the op documents).
        names = ("v", "poses", "tris", "lmk_faces_idx", "lmk_bary_coords",
                 "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")
        rule = 1 if case["rule"] == "medusa" else 2
        _, bins = torch.ops.flame_ext.landmarks(*(args[n].detach() for n in names), rule)
        bins = bins.cpu()
        # -1: no bin, for a non-finite global or neck pose (NaN contour points).
        assert (((0 <= bins) & (bins < case["n_bins"])) | (bins == -1)).all(), bins
        poses = d64(args["poses"])
        want = reference.contour_bins(poses, case["rule"])
        want = torch.where(want >= 0, want.clamp(max=case["n_bins"] - 1), want)
        clear = ~ambiguous_bins(poses, case["rule"], case["dtype"])
        assert torch.equal(bins[clear], want[clear]), (bins, want)
        rows = (args["dynamic_lmk_faces_idx"].cpu()[bins.clamp(min=0)],
                args["dynamic_lmk_bary_coords"].cpu()[bins.clamp(min=0)], bins >= 0)
    exact = landmarks_oracle(d64(v), args, d64, rows)
    assert_matches(lmk, exact, landmarks_oracle(a64(v), args, a64, rows), 3, "landmarks")
    if lmk.numel() == 0:
        return
    g = random_values(case["seed"] + 5, lmk.shape).to(lmk)
    (got,) = torch.autograd.grad(lmk, v, g)
    rv = d64(v).requires_grad_(True)
    (want,) = torch.autograd.grad(landmarks_oracle(rv, args, d64, rows), rv, d64(g))
    av = a64(v).requires_grad_(True)
    (mag,) = torch.autograd.grad(landmarks_oracle(av, args, a64, rows), av, a64(g))
    assert_matches(got, want, mag, 3 * n_lmk + 1, "grad v")


@pytest.mark.parametrize("name", ["v", "poses", "tris", "lmk_faces_idx", "lmk_bary_coords",
                                  "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords"])
@given(how=st.sampled_from(CORRUPTIONS), variant=st.integers(0, 11))
def test_landmarks_bad_argument_is_named(ops, device, name, how, variant):
    assert_bad_argument_is_named(_ops().landmarks, "landmarks", name, how, variant, device)


@pytest.mark.parametrize("width", [4, 7, 14])
def test_landmarks_op_poses_width_is_checked(lmk, device, width):
    """The op itself refuses poses that are not (B, 3J) with J >= 2, naming poses."""
    good = bad_op_cases(device)["landmarks"][0]
    poses = good["poses"]
    bad = torch.zeros(poses.shape[0], width, dtype=poses.dtype, device=poses.device)
    tables = [good[name] for name in ("tris", "lmk_faces_idx", "lmk_bary_coords",
                                      "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")]
    with pytest.raises((ValueError, RuntimeError)) as info:
        torch.ops.flame_ext.landmarks(good["v"], bad, *tables, lmk.CONTOUR_RULES["medusa"])
    assert_error_names(info, "poses")


@given(value=st.one_of(st.text(max_size=8), st.integers(), st.none()))
def test_landmarks_contour_rule_is_checked(ops, device, value):
    assume(value not in ("medusa", "deca"))
    good = bad_op_cases(device)["landmarks"][0]
    with pytest.raises((ValueError, TypeError)) as info:
        _ops().landmarks(**good, contour_rule=value)
    assert_error_names(info, "contour_rule")


# --- scale and determinism across thread counts -------------------------------------------


def test_landmarks_read_past_2_31(ops, device, nondeterministic_mode):
    """v (B, V, 3) of 2.16e9 elements: the last sample starts past 2^31, so its base
    offset b * V * 3 and every corner read there need 64-bit arithmetic."""
    from flame_ext._ops import landmarks

    batch, n_verts = 1000, 720_000
    assert (batch - 1) * n_verts * 3 > 2**31
    v = big_zeros((batch, n_verts, 3), F32, device)
    tris = torch.tensor([[0, n_verts // 2, n_verts - 1]], device=device)
    corners = torch.arange(9.0, device=device).view(3, 3)
    marked = (0, 1, 500, batch - 2, batch - 1)
    for b in marked:
        v[b, tris[0]] = corners + b
    before = rss_bytes()
    lmk = landmarks.landmarks(
        v, None, tris, torch.tensor([0], device=device),
        torch.tensor([[0.25, 0.5, 0.25]], device=device),
    )
    expected = torch.zeros(batch, 1, 3)
    for b in marked:  # 0.25 * (b + 0..2) + 0.5 * (b + 3..5) + 0.25 * (b + 6..8)
        expected[b, 0] = torch.tensor([3.0, 4.0, 5.0]) + b
    torch.testing.assert_close(lmk.cpu(), expected, rtol=0, atol=0)
    if device.type == "cpu":  # the reads went to the zero page: nothing was committed
        assert rss_bytes() - before < 256 << 20


def _determinism_cases(device, dtype):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype).requires_grad_(True)

    def index(high, *shape):
        return torch.randint(0, high, shape, generator=gen).to(device)

    landmarks = _ops().landmarks
    tris = index(40, 60, 3)
    bary = torch.rand(7, 3, generator=gen, dtype=F64).to(device, dtype)
    dyn_faces, dyn_bary = index(60, 79, 5), torch.rand(79, 5, 3, generator=gen).to(device, dtype)
    poses = torch.randn(33, 15, generator=gen).to(device, dtype)
    faces = index(60, 7)
    return [
        ("landmarks contour",
         lambda v: landmarks(v, poses, tris, faces, bary, dyn_faces, dyn_bary),
         [rand(33, 40, 3)]),
        ("landmarks static", lambda v: landmarks(v, None, tris, faces[:0], bary[:0]),
         [rand(33, 40, 3)]),
    ]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_landmarks_deterministic_and_fully_written(ops, device, dtype, deterministic):
    """Under torch.use_deterministic_algorithms(True): runs, repeats bit for bit, and
    writes every output element."""
    assert_deterministic_and_fully_written(_determinism_cases(device, dtype))


def test_landmarks_results_do_not_depend_on_the_thread_count(ops):
    assert_independent_of_thread_count(_determinism_cases("cpu", F32))


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_landmarks_cuda_float32_matches_cpu(lmk, rule):
    """float32 on one GPU against the CPU kernel: the same bins, landmarks and gradients."""
    tables = random_tables(F32, "cpu")
    v = random_vertices(300, F32, "cpu")
    poses = random_poses(300, rule, F32, "cpu")
    grad = random_vertices(300, F32, "cpu", seed=9)[:, : N_CONTOUR + N_STATIC].contiguous()
    gpu_tables = {k: t.cuda() for k, t in tables.items()}
    rule_code = lmk.CONTOUR_RULES[rule]
    out, bins = lmk._op(v.cuda(), poses.cuda(), *gpu_tables.values(), rule_code)
    want, want_bins = lmk._op(v, poses, *tables.values(), rule_code)
    # poses are kept 1e-3 degrees from a rounding tie: both devices pick the same bins
    assert torch.equal(bins.cpu(), want_bins)
    twice = dict(rtol=2 * F32_TOL["rtol"], atol=2 * F32_TOL["atol"])
    torch.testing.assert_close(out.cpu(), want, **twice)
    got = lmk._backward_op(grad.cuda(), bins, *gpu_tables.values(), N_VERTS)
    want = lmk._backward_op(grad, want_bins, *tables.values(), N_VERTS)
    torch.testing.assert_close(got.cpu(), want, **twice)
