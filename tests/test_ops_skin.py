"""Tests of the skin op family: skin and skin_backward (linear blend skinning, optionally
writing the per-vertex transforms T_v).

The compiled ops are compared with flame_ext.reference (the oracle), their gradients with
torch.autograd.gradcheck in float64 and with autograd through the reference; properties
over any shape, layout and value; then the registrations (opcheck), argument errors, NaN
propagation, 64-bit indexing and determinism. The chain feeding skin (rigid_transforms
then skin, as FlameShape runs them) is tested in tests/test_ops_lbs.py.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _oracle import (
    assert_close_to_reference,
    a64,
    assert_bad_argument_is_named,
    assert_deterministic_and_fully_written,
    assert_error_names,
    assert_huge_page_output,
    assert_independent_of_thread_count,
    assert_matches,
    d64,
)
from _samples import (
    CORRUPTIONS,
    F32,
    F64,
    bad_op_cases,
    big_zeros,
    dtypes,
    lay_out,
    layouts,
    random_values,
    seeds,
    skin_inputs,
    specials,
)
from flame_ext import reference

# float32 tolerance: T_v sums J products w * A (|.| <= ~3) and v adds 3 more products with
# |v_posed| ~ 1: ~20 roundings of eps32 * 3, so 1e-5.
F32_SKIN_TOL = 1e-5


def _ops():
    """The Python wrappers (checks and autograd) of the skin ops."""
    from flame_ext._ops import skin

    return skin


# --- forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
@pytest.mark.parametrize("write", [True, False], ids=["T", "noT"])
def test_skin_matches_reference(ops, device, dtype, batch, write):
    # 600 vertices: more than one reduction chunk of the CPU backward, and a partial one.
    v_posed, transforms, weights = skin_inputs(batch, 600 if batch < 300 else 40, 5, dtype, device)
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights, write)
    want_v, want_t = reference.skin(v_posed.double(), transforms.double(), weights.double())
    assert v.shape == v_posed.shape and v.dtype == dtype
    assert_close_to_reference(v, want_v, dtype, F32_SKIN_TOL)
    if write:
        assert vertex_transforms.shape == (batch, v_posed.shape[1], 4, 4)
        assert_close_to_reference(vertex_transforms, want_t, dtype, F32_SKIN_TOL)
    else:
        assert vertex_transforms is None
        raw = ops.skin(v_posed, transforms, weights, False)[1]
        assert raw.shape == (0,)


def test_skin_large_outputs_on_huge_pages(ops):
    # 2 x 263000 vertices: T_v is 33.7 MB float32, over the huge-page threshold; v is not.
    v_posed, transforms, weights = skin_inputs(2, 263000, 5, F32, "cpu")
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights, True)
    want_v, want_t = reference.skin(v_posed.double(), transforms.double(), weights.double())
    assert_close_to_reference(v, want_v, F32, F32_SKIN_TOL)
    assert_close_to_reference(vertex_transforms, want_t, F32, F32_SKIN_TOL)
    assert_huge_page_output(vertex_transforms)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_skin_streamed_transforms_are_the_stored_ones(ops, dtype):
    """T_v of 4 MiB or more is written with streaming stores (skin_cpu.cpp
    streams_transforms): every value is the one the same call writes with ordinary stores
    for a few vertices at a time (each vertex is computed alone, so the bits are the
    same), and v with it. Streaming is the AVX-512 loop's only."""
    from flame_ext import _ops as op_library

    if op_library.build_config()["cpu_isa"] != "avx512":
        pytest.skip("the streaming stores are in the AVX-512 loop")
    # T_v of twice the threshold; each part (batch x chunk vertices, at most 1 MiB) under it.
    batch, num_joints, chunk = 2, 5, 4096
    num_verts = (8 << 20) // (batch * 16 * dtype.itemsize) + 777
    v_posed, transforms, weights = skin_inputs(batch, num_verts, num_joints, dtype, "cpu")
    v, t = _ops().skin(v_posed, transforms, weights, True)
    for v0 in range(0, num_verts, 5 * chunk):  # a sample of the chunks, the last included
        v1 = min(num_verts, v0 + chunk)
        part_v, part_t = _ops().skin(v_posed[:, v0:v1], transforms, weights[v0:v1], True)
        assert torch.equal(v[:, v0:v1], part_v)
        assert torch.equal(t[:, v0:v1], part_t)
    last_v, last_t = _ops().skin(v_posed[:, -chunk:], transforms, weights[-chunk:], True)
    assert torch.equal(t[:, -chunk:], last_t) and torch.equal(v[:, -chunk:], last_v)


@pytest.mark.parametrize("num_joints", [1, 16])
def test_skin_joint_counts_and_views(ops, device, num_joints):
    """Any joint count up to 16; non-contiguous v_posed and transforms are accepted."""
    v_posed, transforms, weights = skin_inputs(3, 50, num_joints, torch.float64, device)
    v_view = v_posed.transpose(0, 1).contiguous().transpose(0, 1)
    t_view = transforms.transpose(2, 3).contiguous().transpose(2, 3)
    assert not v_view.is_contiguous() and not t_view.is_contiguous()
    v, vertex_transforms = _ops().skin(v_view, t_view, weights)
    want_v, want_t = reference.skin(v_posed, transforms, weights)
    torch.testing.assert_close(v, want_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vertex_transforms, want_t, rtol=1e-10, atol=1e-12)


def test_skin_no_vertices(ops, device, dtype):
    v_posed, transforms, weights = skin_inputs(2, 0, 5, dtype, device)
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
    assert v.shape == (2, 0, 3) and vertex_transforms.shape == (2, 0, 4, 4)
    v_posed.requires_grad_(True)
    transforms.requires_grad_(True)
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
    (grad_t,) = torch.autograd.grad(v.sum() + vertex_transforms.sum(), (transforms,))
    assert torch.equal(grad_t, torch.zeros_like(grad_t))


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("write", [True, False], ids=["T", "noT"])
@pytest.mark.parametrize("outputs", ["v", "T", "both"])
def test_skin_gradcheck(ops, device, write, outputs):
    if outputs != "v" and not write:
        pytest.skip("T is not an output without write_vertex_transforms")
    v_posed, transforms, weights = skin_inputs(2, 6, 5, torch.float64, device)
    for x in (v_posed, transforms, weights):
        x.requires_grad_(True)

    def fn(v_posed, transforms, weights):
        v, vertex_transforms = _ops().skin(v_posed, transforms, weights, write)
        return {"v": (v,), "T": (vertex_transforms,), "both": (v, vertex_transforms)}[outputs]

    assert torch.autograd.gradcheck(fn, (v_posed, transforms, weights))


def test_skin_grad_matches_reference(ops, device):
    v_posed, transforms, weights = skin_inputs(3, 600, 5, torch.float64, device)
    gen = torch.Generator().manual_seed(7)
    grad_v = torch.randn(3, 600, 3, generator=gen, dtype=torch.float64).to(device)
    grad_t = torch.randn(3, 600, 4, 4, generator=gen, dtype=torch.float64).to(device)

    def grads(fn):
        inputs = [x.clone().requires_grad_(True) for x in (v_posed, transforms, weights)]
        v, vertex_transforms = fn(*inputs)
        return torch.autograd.grad((v, vertex_transforms), inputs, (grad_v, grad_t))

    for g, w in zip(grads(_ops().skin), grads(reference.skin)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_t", [False, True], ids=["v", "v+T"])
@pytest.mark.parametrize("num_joints", [1, 5, 16])
def test_skin_vector_loop_edges(ops, device, dtype, num_joints, with_t):
    """Sizes at the edges of the CPU's vertex-parallel loops (16 or 8 vertices per vector,
    tiles of 128 and chunks of 512 vertices, runs of 16 samples): 37 samples (two full runs
    and a partial one) of 1100 vertices (partial tiles, chunks and vectors); v (and T) and
    the gradients from v (and T), against the float64 reference."""
    v_posed, transforms, weights = skin_inputs(37, 1100, num_joints, dtype, device, seed=3)
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(37, 1100, 3, generator=gen, dtype=torch.float64)]
    if with_t:
        grads.append(torch.randn(37, 1100, 4, 4, generator=gen, dtype=torch.float64))
    leaves = [x.clone().requires_grad_(True) for x in (v_posed, transforms)]
    outs = _ops().skin(*leaves, weights, with_t)[: len(grads)]
    got = torch.autograd.grad(outs, leaves, [g.to(device, dtype) for g in grads])
    exact = [x.double().requires_grad_(True) for x in (v_posed, transforms)]
    wants = reference.skin(*exact, weights.double(), with_t)[: len(grads)]
    want = torch.autograd.grad(wants, exact, [g.to(device) for g in grads])
    for out, want_out in zip(outs, wants):
        assert_close_to_reference(out, want_out, dtype, F32_SKIN_TOL)
    assert_close_to_reference(got[0], want[0], dtype, F32_SKIN_TOL)
    # grad_transforms sums 1100 vertices' products of |.| ~ 1: the float32 error grows
    # with the count (~sqrt(1100) eps32 per unit of the sum's magnitude, ~30).
    assert_close_to_reference(got[1], want[1], dtype, 30 * F32_SKIN_TOL)


def test_skin_double_backward_is_a_clear_error(ops, device):
    v_posed, transforms, weights = skin_inputs(2, 6, 5, torch.float64, device)
    v_posed.requires_grad_(True)
    v, _ = _ops().skin(v_posed, transforms, weights)
    (g,) = torch.autograd.grad(v.square().sum(), v_posed, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through flame_ext::skin_backward"):
        g.sum().backward()


# --- properties: any shape, layout and value ----------------------------------------------


@st.composite
def skin_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 3, 6])),
        num_verts=draw(st.sampled_from([0, 1, 7, 64, 513, 1100])),  # CPU chunks of 512
        num_joints=draw(st.integers(1, 16)),
        dtype=draw(dtypes),
        seed=draw(seeds),
        write=draw(st.booleans()),
        layouts=draw(st.lists(layouts, min_size=3, max_size=3)),
        inject=draw(st.lists(specials, min_size=3, max_size=3)),
        grad_weights=draw(st.booleans()),
        use_t=draw(st.booleans()),
    )


def make_skin(case, device):
    b, v, j = case["batch"], case["num_verts"], case["num_joints"]
    shapes = [(b, v, 3), (b, j, 4, 4), (v, j)]
    return [
        lay_out(random_values(case["seed"] + i, s, inject=case["inject"][i]).to(case["dtype"]),
                case["layouts"][i], device)
        for i, s in enumerate(shapes)
    ]


@given(case=skin_cases())
def test_skin_any_input_matches_reference(ops, device, case):
    v_posed, transforms, weights = make_skin(case, device)
    leaves = [x.detach().requires_grad_(True) for x in (v_posed, transforms)]
    leaves.append(weights.detach().requires_grad_(case["grad_weights"]))
    v, vt = _ops().skin(*leaves, case["write"])
    assert (vt is None) == (not case["write"])
    exact_v, exact_t = reference.skin(*map(d64, leaves), True)
    mag_v, mag_t = reference.skin(*map(a64, leaves), True)
    terms = case["num_joints"] + 4
    # T_v = sum_j w[v, j] A_j is formed before it is applied: in float32 an entry past the
    # range is inf, and the row of v that reads it is not finite (inf * 0, inf - inf) even
    # where the float64 v is representable (1e30 weights and transforms, a zero point).
    big = torch.finfo(case["dtype"]).max / 2
    t_overflow = mag_t.nan_to_num(nan=0.0) >= big
    v_overflow = t_overflow[..., :3, :].any(-1)
    assert_matches(v, exact_v, mag_v, terms, "v", ignore=v_overflow)
    if case["write"]:
        assert_matches(vt, exact_t, mag_t, terms, "vertex_transforms", ignore=t_overflow)
    if v.numel() == 0:
        return
    outputs, grads = [v], [random_values(case["seed"] + 7, v.shape).to(v)]
    if case["write"] and case["use_t"]:
        outputs.append(vt)
        grads.append(random_values(case["seed"] + 8, vt.shape).to(vt))
    wanted = [x for x in leaves if x.requires_grad]
    got = torch.autograd.grad(outputs, wanted, grads)

    def reference_grads(convert):
        # Without a gradient for T, no gradient reaches the bottom rows of the
        # transforms: exactly zero, even where a weight is NaN (so the reference skins
        # with the top rows only, as the op's backward does).
        ref = [convert(x).requires_grad_(x.requires_grad) for x in leaves]
        rv, rt = reference.skin(*ref, len(outputs) == 2)
        outs = [rv, rt][: len(outputs)]
        return torch.autograd.grad(outs, [x for x in ref if x.requires_grad],
                                   [convert(g) for g in grads])

    want, mags = reference_grads(d64), reference_grads(a64)
    # Gradients of transforms and weights sum over the vertices (and the batch); that of
    # v_posed is T_v^T grad, which reads the overflowing entries of T_v (above).
    terms = max(case["num_verts"], 1) * max(case["batch"], 1) + case["num_joints"] + 4
    ignores = [t_overflow[..., :3, :3].any(-2), None, None]
    for a, e, m, ignore in zip(got, want, mags, [i for i, x in zip(ignores, leaves)
                                                  if x.requires_grad]):
        assert_matches(a, e, m, terms, "skin gradient", ignore=ignore)


# --- registrations ------------------------------------------------------------------------


def test_skin_opcheck(ops, device):
    v_posed, transforms, weights = skin_inputs(3, 20, 5, torch.float64, device)
    grad_v = torch.randn(3, 20, 3, dtype=torch.float64, device=device)
    grad_vt = torch.randn(3, 20, 4, 4, dtype=torch.float64, device=device)
    cases = [
        (ops.skin, (v_posed.requires_grad_(True), transforms.requires_grad_(True), weights, True)),
        (ops.skin, (v_posed, transforms, weights, False)),
        (ops.skin_backward, (grad_v, grad_vt, v_posed.detach(), transforms.detach(), weights)),
        (ops.skin_backward, (grad_v, None, v_posed.detach(), transforms.detach(), weights)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


# --- bad input ----------------------------------------------------------------------------


def test_skin_argument_errors(ops, device):
    v_posed, transforms, weights = skin_inputs(2, 10, 5, torch.float32, device)
    bad = [
        ((v_posed[0], transforms, weights), ValueError, "v_posed must have 3 dimensions"),
        ((v_posed[..., :2], transforms, weights), ValueError, "v_posed must have shape"),
        ((v_posed, transforms[:1], weights), ValueError, r"transforms must have shape \(2, '?\*'?, 4, 4\)"),
        ((v_posed, transforms[..., :3, :], weights), ValueError, "transforms must have shape"),
        ((v_posed, transforms, weights[:9]), ValueError, r"lbs_weights must have shape \(10, 5\)"),
        ((v_posed, transforms, weights[:, :4]), ValueError, r"lbs_weights must have shape \(10, 5\)"),
        ((v_posed, transforms.double(), weights), TypeError, "transforms has dtype"),
        ((v_posed, transforms, weights.double()), TypeError, "lbs_weights has dtype"),
        ((v_posed.half(), transforms, weights), TypeError, "v_posed must be float32 or float64"),
        ((v_posed, transforms.to("meta"), weights), ValueError, "transforms is on meta"),
        ((v_posed, transforms, weights, 1), TypeError, "write_vertex_transforms must be a bool"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            _ops().skin(*args)


@pytest.mark.parametrize("name", ["v_posed", "transforms", "lbs_weights"])
@given(how=st.sampled_from(CORRUPTIONS), variant=st.integers(0, 11))
def test_skin_bad_argument_is_named(ops, device, name, how, variant):
    assert_bad_argument_is_named(_ops().skin, "skin", name, how, variant, device)


@given(value=st.one_of(st.integers(-2, 3), st.none(), st.text(max_size=3), st.floats(),
                       st.just(np.bool_(True)), st.just(torch.tensor(True))))
def test_skin_write_flag_must_be_a_bool(ops, device, value):
    good = bad_op_cases(device)["skin"][0]
    with pytest.raises(TypeError) as info:
        _ops().skin(**good, write_vertex_transforms=value)
    assert_error_names(info, "write_vertex_transforms")


def test_skin_kernels_check_their_inputs(ops):
    """Direct torch.ops calls skip the Python checks: the CPU kernels refuse bad shapes
    with a RuntimeError instead of reading out of bounds."""
    v_posed, transforms, weights = skin_inputs(2, 10, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="lbs_weights must have shape"):
        ops.skin(v_posed, transforms, weights[:5], True)
    with pytest.raises(RuntimeError, match="grad_vertex_transforms must have shape"):
        ops.skin_backward(v_posed, torch.zeros(2, 10, 4), v_posed, transforms, weights)


# --- NaN, scale, determinism --------------------------------------------------------------


def test_skin_nan_propagates(ops, device, dtype):
    v_posed, transforms, weights = skin_inputs(2, 30, 5, dtype, device)
    v_posed[0, 3, 1] = float("nan")
    transforms[1, 2, 0, 0] = float("nan")
    v, vertex_transforms = _ops().skin(v_posed, transforms, weights)
    assert v[0, 3].isnan().all() and v[0].isnan().sum() == 3
    assert not vertex_transforms[0].isnan().any()
    # A NaN in joint 2 of sample 1 reaches every vertex of that sample (weights > 0).
    assert v[1, :, 0].isnan().all() and vertex_transforms[1, :, 0, 0].isnan().all()
    grad_vp, grad_t = ops.skin_backward(torch.ones_like(v), None, v_posed, transforms, weights)
    # Vertex 3's y is NaN: column 1 of every joint's gradient (grad_v (x) [v_posed; 1]).
    assert grad_t[0, :, :3, 1].isnan().all() and not grad_t[0, :, :3, 0].isnan().any()
    assert not grad_vp[0].isnan().any()
    assert grad_vp[1].isnan().any()


@pytest.mark.slow
def test_skin_backward_read_past_2_31(ops, device, nondeterministic_mode):
    """grad_vertex_transforms (B, V, 4, 4) of 2.3e9 elements: the last sample's rows sit
    past 2^31, read at 16 * (b * V + v). Its only non-zero vertex must reach
    grad_transforms of that sample and no other. grad_v_posed (1.7 GB) is dense."""
    batch, n_verts = 16, 9_000_000
    assert (batch - 1) * n_verts * 16 > 2**31
    v_posed = big_zeros((batch, n_verts, 3), F32, device)
    grad_v = big_zeros((batch, n_verts, 3), F32, device)
    grad_vt = big_zeros((batch, n_verts, 4, 4), F32, device)
    weights = big_zeros((n_verts, 1), F32, device)
    weights[-1] = 1.0
    transforms = torch.eye(4, device=device).repeat(batch, 1, 1, 1)
    transforms[:, 0, :3, 3] = torch.arange(3.0 * batch, device=device).view(batch, 3)
    mark = torch.arange(16.0, device=device).view(4, 4)
    grad_vt[-1, -1] = mark
    grad_vt[0, -1] = -mark
    v_posed[-1, -1] = torch.tensor([1.0, 2.0, 3.0])
    grad_v[-1, -1] = torch.tensor([1.0, 10.0, 100.0])
    grad_v_posed, grad_transforms = ops.skin_backward(
        grad_v, grad_vt, v_posed, transforms, weights
    )
    expected = torch.zeros(batch, 1, 4, 4)
    expected[0, 0] = -mark.cpu()
    # grad T_v = grad_v (x) [v_posed; 1] on the top rows, plus grad_vertex_transforms.
    expected[-1, 0] = mark.cpu()
    expected[-1, 0, :3] += torch.tensor([1.0, 10.0, 100.0])[:, None] * torch.tensor(
        [1.0, 2.0, 3.0, 1.0]
    )
    torch.testing.assert_close(grad_transforms.cpu(), expected, rtol=0, atol=0)
    # T_v of the last vertex is A (weight 1, a translation): grad_v_posed = R^T grad_v.
    torch.testing.assert_close(grad_v_posed[-1, -1].cpu(), torch.tensor([1.0, 10.0, 100.0]))
    assert int(torch.count_nonzero(grad_v_posed)) == 3


def test_skin_backward_is_deterministic(ops, device):
    """Repeated runs give bit-identical gradients (fixed-order reductions over V)."""
    v_posed, transforms, weights = skin_inputs(8, 3000, 5, torch.float32, device)
    grad_v = torch.randn_like(v_posed)
    grad_vt = torch.randn(8, 3000, 4, 4, device=device)
    for grad in (None, grad_vt):
        first = ops.skin_backward(grad_v, grad, v_posed, transforms, weights)
        for _ in range(3):
            again = ops.skin_backward(grad_v, grad, v_posed, transforms, weights)
            assert all(torch.equal(a, b) for a, b in zip(first, again))


def _determinism_cases(device, dtype):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype).requires_grad_(True)

    cases = []
    for n_verts in (0, 1100):
        for write in (True, False):
            cases.append((f"skin V={n_verts} T={write}",
                          lambda v, a, w, write=write: _ops().skin(v, a, w, write),
                          [rand(3, n_verts, 3), rand(3, 5, 4, 4), rand(n_verts, 5)]))
    return cases


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_skin_deterministic_and_fully_written(ops, device, dtype, deterministic):
    """Under torch.use_deterministic_algorithms(True): runs, repeats bit for bit, and
    writes every output element."""
    assert_deterministic_and_fully_written(_determinism_cases(device, dtype))


def test_skin_results_do_not_depend_on_the_thread_count(ops):
    assert_independent_of_thread_count(_determinism_cases("cpu", F32))


# --- CUDA only ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("write", [True, False], ids=["T", "noT"])
def test_skin_cuda_float32_matches_cpu(ops, write):
    """float32 on one GPU against the CPU kernel, forward and backward (with and without a
    gradient for T_v)."""
    v_posed, transforms, weights = skin_inputs(33, 1100, 5, F32, "cpu", seed=15)
    gen = torch.Generator().manual_seed(16)
    grad_v = torch.randn(33, 1100, 3, generator=gen)
    grad_vt = torch.randn(33, 1100, 4, 4, generator=gen) if write else None
    on_gpu = [x.cuda() for x in (v_posed, transforms, weights)]
    got = ops.skin(*on_gpu, write)
    want = ops.skin(v_posed, transforms, weights, write)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=2 * F32_SKIN_TOL, atol=2 * F32_SKIN_TOL)
    got = ops.skin_backward(grad_v.cuda(), None if grad_vt is None else grad_vt.cuda(), *on_gpu)
    want = ops.skin_backward(grad_v, grad_vt, v_posed, transforms, weights)
    # grad_v_posed = T_v^T grad_v: a few terms; grad_transforms sums over the 1100
    # vertices products of O(1) values (|sum| ~ 30, its rounding ~1e-5 in float32)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=2 * F32_SKIN_TOL, atol=2 * F32_SKIN_TOL)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-4, atol=1e-3)
