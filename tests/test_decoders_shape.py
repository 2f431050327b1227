"""FlameShape: medusa's API semantics (buffers, parameters, inputs and their errors), its
outputs and gradients on the three paths (compiled ops, reference, medusa's algorithm),
properties over any inputs, and agreement of every device with the CPU reference.

Runs on the small synthetic model so float64 gradcheck stays fast; the device checks use
the full-size one (the kernels' real launch shapes).
"""

import copy
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from _oracle import assert_bad_decoder_input_is_named, assert_error_names, assert_within
from _oracle import d64, decoder_bound, needs_kernels
from _samples import (
    CORRUPTIONS,
    F32,
    F64,
    FULL,
    NAN,
    SMALL,
    dtypes,
    flame_inputs,
    lay_out,
    layouts,
    model_raw,
    random_values,
    seeds,
    write_pickle,
)
from flame_ext import FlameShape, load_flame_model, reference
from flame_ext.decoders import INPUT_NAMES

BACKENDS = ["ext", "reference", "medusa"]


@pytest.fixture(scope="module")
def small_model():
    return load_flame_model(SMALL)


def _shape(backend="reference", device="cpu", **kwargs):
    return FlameShape(n_shape=kwargs.pop("n_shape", None) or load_flame_model(SMALL).n_shape,
                      n_expr=kwargs.pop("n_expr", None) or load_flame_model(SMALL).n_expr,
                      device=device, model_path=SMALL, backend=backend, **kwargs)


# --- medusa's API semantics ---------------------------------------------------------------


def test_buffers_and_parameters_match_medusa(small_model):
    m = _shape()
    V, K = small_model.v_template.shape[0], small_model.n_shape + small_model.n_expr
    J = small_model.parents.shape[0]
    assert m.tris.dtype == torch.int64 and m.tris.shape == small_model.faces.shape
    assert m.v_template.shape == (V, 3) and m.v_template.dtype == torch.float32
    assert m.shape_dirs.shape == (V, 3, K)
    assert m.pose_dirs.shape == (9 * (J - 1), 3 * V)
    assert m.J_regressor.shape == (J, V)
    assert m.parents.tolist()[0] == -1 and m.parents.dtype == torch.int64
    assert m.lbs_weights.shape == (V, J)
    assert set(m.state_dict()) == {
        "tris", "v_template", "shape_dirs", "pose_dirs", "J_regressor", "parents",
        "lbs_weights", "shape", "expr", "eye_pose", "neck_pose", "jaw_pose", "global_pose"}
    sizes = {"shape": small_model.n_shape, "expr": small_model.n_expr, "eye_pose": 6}
    for name in INPUT_NAMES:
        p = getattr(m, name)
        assert isinstance(p, torch.nn.Parameter) and p.shape == (1, sizes.get(name, 3))
        assert not p.requires_grad and torch.count_nonzero(p) == 0


def test_shape_dirs_columns_select_shape_then_expression(small_model):
    m = _shape(n_shape=2, n_expr=3)
    S = small_model.n_shape
    expected = torch.from_numpy(small_model.shapedirs[:, :, [0, 1, S, S + 1, S + 2]]).float()
    torch.testing.assert_close(m.shape_dirs, expected)
    pose_dirs = torch.from_numpy(small_model.posedirs.reshape(-1, small_model.posedirs.shape[2]).T)
    torch.testing.assert_close(m.pose_dirs, pose_dirs.float())


def test_parameters_trainable_and_init_parameters():
    init = torch.full((1, 3), 0.1)
    m = _shape(parameters=["jaw_pose", "expr"], jaw_pose=init)
    assert m.parameters_ == ["jaw_pose", "expr"]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"jaw_pose", "expr"}
    torch.testing.assert_close(m.jaw_pose.detach(), init)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_shape": 10**6}, "n_shape"),
    ({"n_expr": -1}, "n_expr"),
    ({"parameters": ["nose"]}, "nose"),
    ({"transforms": "all"}, "transforms"),
    ({"backend": "fast"}, "backend"),
    ({"jaw_pose": torch.zeros(1, 4)}, "jaw_pose"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _shape(**kwargs)


def test_unknown_init_parameter_names_valid_keys():
    with pytest.raises(ValueError, match="global_pose"):
        _shape(nose=torch.zeros(1, 3))


def test_forward_error_messages_match_medusa():
    m = _shape(parameters=["shape"])
    with pytest.raises(ValueError, match="^Either inputs or batch_size must be provided!$"):
        m()
    with pytest.raises(ValueError, match="^Parameter shape is also part of inputs!$"):
        m(shape=torch.randn(2, m.n_shape))


def test_unknown_input_key_names_the_valid_keys():
    m = _shape()
    with pytest.raises(ValueError, match="pose.*valid keys.*global_pose"):
        m(pose=torch.randn(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_inference_and_broadcasting(backend):
    m = _shape(backend)
    gen = torch.Generator().manual_seed(0)
    v, R = m(batch_size=4)
    assert v.shape == (4, m.v_template.shape[0], 3) and R.shape == (4, m.v_template.shape[0], 4, 4)
    inputs = flame_inputs(m, 5, gen)
    v, _ = m(expr=inputs["expr"])  # batch size from the first input
    assert v.shape[0] == 5
    # a batch-1 input broadcasts like a parameter
    shared = inputs["shape"][:1]
    v_b, _ = m(shape=shared, expr=inputs["expr"])
    v_e, _ = m(shape=shared.expand(5, -1).contiguous(), expr=inputs["expr"])
    torch.testing.assert_close(v_b, v_e, rtol=1e-5, atol=1e-6)


def test_batch_mismatch_names_key_and_sizes():
    m = _shape()
    with pytest.raises(ValueError, match="jaw_pose.*3.*5"):
        m(expr=torch.randn(5, m.n_expr), jaw_pose=torch.randn(3, 3))


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(2, 7, dtype=torch.float32), ValueError, "shape"),     # wrong width
    (torch.randn(2, 2, 2), ValueError, "shape"),                         # wrong rank
    (torch.randn(2, 3, dtype=torch.float64), TypeError, "dtype"),        # model is float32
    (torch.randint(0, 3, (2, 3)), TypeError, "jaw_pose"),                # integer
    ([[0.0, 0.0, 0.0]], TypeError, "jaw_pose"),                          # not a tensor
])
def test_bad_inputs_raise_clear_errors(bad, exc, match):
    m = _shape()
    with pytest.raises(exc, match=match):
        m(jaw_pose=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_full_pose_order(backend):
    m = _shape(backend, global_pose=torch.full((1, 3), 1.0), neck_pose=torch.full((1, 3), 2.0),
               jaw_pose=torch.full((1, 3), 3.0), eye_pose=torch.full((1, 6), 4.0))
    assert m.get_full_pose().tolist() == [[1.0] * 3 + [2.0] * 3 + [3.0] * 3 + [4.0] * 6]


@given(
    n_shape=st.one_of(st.integers(-3, 9), st.floats(0, 6), st.booleans(), st.none(), st.text(max_size=2)),
    n_expr=st.one_of(st.integers(-3, 6), st.none()),
)
def test_flame_shape_counts_are_checked(n_shape, n_expr):
    valid = lambda n, high: isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= high  # noqa: E731
    # No components at all: test_flame_shape_without_components.
    assume((n_shape, n_expr) != (0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if valid(n_shape, 6) and valid(n_expr, 4):
            module = FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL)
            assert module.shape_dirs.shape[2] == n_shape + n_expr
            return
        with pytest.raises((ValueError, TypeError)) as info:
            FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL)
    assert_error_names(info, "n_shape" if not valid(n_shape, 6) else "n_expr")


@pytest.mark.parametrize("name", INPUT_NAMES)
@given(how=st.sampled_from(CORRUPTIONS + ("batch",)), variant=st.integers(0, 11),
       backend=st.sampled_from(["ext", "reference", "medusa"]))
def test_flame_shape_bad_input_is_named(decoder_cache, device, name, how, variant, backend):
    needs_kernels(device, "blend")  # building the modules runs no kernel, but keep it simple
    gen = torch.Generator().manual_seed(variant)
    module = decoder_cache("shape", backend, F32, device, "vertex")
    good = {n: torch.rand(3, getattr(module, n).shape[1], generator=gen).to(device)
            for n in INPUT_NAMES}
    assert_bad_decoder_input_is_named(lambda args: module(**args), good, name, how, variant)


# --- models it cannot or can barely use ---------------------------------------------------


@pytest.mark.parametrize("backend", ["ext", "reference", "medusa"])
def test_flame_shape_refuses_a_model_without_five_joints(tmp_path, backend, quiet):
    path = write_pickle(tmp_path / "generic_model.pkl", model_raw(J=7))
    with pytest.raises(ValueError, match=rf"{path}.*7 joints"):
        FlameShape(4, 3, device="cpu", model_path=path, backend=backend)


@pytest.mark.parametrize("backend", ["ext", "reference", "medusa"])
def test_flame_shape_without_components(backend, quiet):
    """n_shape = n_expr = 0 is in range (0..the model's counts): the mean shape, posed."""
    module = FlameShape(0, 0, device="cpu", model_path=SMALL, backend=backend).double()
    pose = 0.3 * torch.randn(2, 15, generator=torch.Generator().manual_seed(0), dtype=F64)
    v, _ = module(global_pose=pose[:, :3], neck_pose=pose[:, 3:6], jaw_pose=pose[:, 6:9],
                  eye_pose=pose[:, 9:])
    want, _ = reference.lbs(torch.zeros(1, 0, dtype=F64), pose, module.v_template,
                            module.shape_dirs, module.pose_dirs, module.J_regressor,
                            module.parents, module.lbs_weights)
    torch.testing.assert_close(v, want)


# --- outputs and the three paths ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_paths_agree_with_medusa_float64(backend, batch, shared):
    gen = torch.Generator().manual_seed(batch)
    m, base = _shape(backend).double(), _shape("medusa").double()
    inputs = flame_inputs(m, batch, gen, scale=0.5)
    if shared:
        inputs["shape"] = inputs["shape"][:1]
    v, R = m(**inputs)
    v0, R0 = base(**inputs)
    torch.testing.assert_close(v, v0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(R, R0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_paths_agree_with_medusa_float32(backend):
    # float32: 400-term blend sums of ~1e-3 magnitudes and a chain of 3 rigid transforms,
    # so a few ulps of the ~0.1 m coordinates: 1e-5 absolute is ~100 ulps of headroom.
    gen = torch.Generator().manual_seed(7)
    m, base = _shape(backend), _shape("medusa")
    inputs = flame_inputs(m, 4, gen, scale=0.5)
    v, R = m(**inputs)
    v0, R0 = base(**inputs)
    torch.testing.assert_close(v, v0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(R, R0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_transforms_option(backend):
    gen = torch.Generator().manual_seed(1)
    full = _shape(backend).double()
    inputs = flame_inputs(full, 2, gen)
    v, R = full(**inputs)
    v_j, A = _shape(backend, transforms="joint").double()(**inputs)
    v_n, none = _shape(backend, transforms="none").double()(**inputs)
    assert none is None and A.shape == (2, full.parents.shape[0], 4, 4)
    torch.testing.assert_close(v_j, v)
    torch.testing.assert_close(v_n, v)
    # R is the lbs_weights blend of the per-joint transforms
    torch.testing.assert_close(torch.einsum("vj,bjxy->bvxy", full.lbs_weights, A), R)
    v_m, R_mean = _shape(backend, transforms="mean").double()(**inputs)
    assert R_mean.shape == (2, 4, 4)
    torch.testing.assert_close(v_m, v)
    torch.testing.assert_close(R_mean, R.mean(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("shared", [False, True])
def test_mean_transform_matches_the_vertex_mean(backend, shared):
    """transforms='mean' is R.mean(1) of transforms='vertex' (float32: a sum of 5 weighted
    transforms instead of a mean of V blended ones, entries of magnitude ~1: a few ulps),
    and its gradients are those of R.mean(1) for every input."""
    gen = torch.Generator().manual_seed(11)
    full, mean = _shape(backend), _shape(backend, transforms="mean")
    inputs = flame_inputs(full, 5, gen, scale=0.5)
    if shared:
        inputs["shape"] = inputs["shape"][:1]
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    v, R = full(**leaves)
    v_m, R_mean = mean(**leaves)
    torch.testing.assert_close(v_m, v)
    torch.testing.assert_close(R_mean, R.mean(1), rtol=1e-5, atol=1e-6)
    g_v = torch.randn(v.shape, generator=gen)
    g_R = torch.randn(R_mean.shape, generator=gen)
    want = torch.autograd.grad((v, R.mean(1)), list(leaves.values()), (g_v, g_R))
    got = torch.autograd.grad((v_m, R_mean), list(leaves.values()), (g_v, g_R))
    for name, a, b in zip(leaves, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_gradcheck_mean_transform(backend):
    gen = torch.Generator().manual_seed(5)
    m = _shape(backend, n_shape=3, n_expr=2, transforms="mean").double()
    inputs = flame_inputs(m, 2, gen, scale=0.4)
    names = list(inputs)

    def fn(*values):
        return m(**dict(zip(names, values)))

    values = tuple(t.requires_grad_(True) for t in inputs.values())
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-7, fast_mode=True)


def test_mean_transform_is_refused_with_medusa_backend():
    with pytest.raises(ValueError, match="transforms='vertex'"):
        _shape("medusa", transforms="mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_every_input(backend, shared):
    gen = torch.Generator().manual_seed(3)
    m = _shape(backend, n_shape=3, n_expr=2).double()
    inputs = flame_inputs(m, 2, gen, scale=0.4)
    if shared:
        inputs["shape"] = inputs["shape"][:1]
    names = list(inputs)

    def fn(*values):
        v, R = m(**dict(zip(names, values)))
        return v, R

    values = tuple(t.requires_grad_(True) for t in inputs.values())
    # fast_mode checks random projections of the Jacobian (the op tests do full checks)
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradients_reach_trainable_parameters():
    m = _shape("ext", parameters=["shape", "expr", "global_pose", "neck_pose", "jaw_pose",
                                  "eye_pose"])
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    v, R = m(batch_size=3)
    (v.square().sum() + R.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_state_dict_round_trip_recomputes_joint_basis():
    a, b = _shape(), _shape()
    state = a.state_dict()
    state["shape_dirs"] = state["shape_dirs"] * 1.5
    b.load_state_dict(state)
    gen = torch.Generator().manual_seed(5)
    inputs = flame_inputs(b, 2, gen)
    v, _ = b(**inputs)
    ref = _shape("medusa")
    ref.load_state_dict(state)
    v0, _ = ref(**inputs)
    torch.testing.assert_close(v, v0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_shared_identity_tables_follow_the_basis(backend):
    """The shared-identity path blends contiguous copies of the basis' shape and expression
    columns: they are those columns after construction, .double() and load_state_dict, so
    its outputs follow a loaded basis exactly as the per-frame path does."""
    a, b = _shape(backend), _shape(backend)
    state = a.state_dict()
    state["shape_dirs"] = state["shape_dirs"] * 1.5
    b.load_state_dict(state)
    for convert in (lambda m: m, lambda m: m.double()):
        module = convert(b)
        dirs = module.shape_dirs.reshape(-1, module.shape_dirs.shape[-1])
        n = module.n_shape
        for table, columns in ((module._identity_dirs, dirs[:, :n]),
                               (module._expr_dirs, dirs[:, n:])):
            assert table.is_contiguous() and table.dtype == dirs.dtype
            assert torch.equal(table, columns)
    inputs = flame_inputs(b, 3, 7, shared=True)
    v_shared, _ = b(**inputs)
    inputs["shape"] = inputs["shape"].expand(3, -1)
    v_frames, _ = b(**inputs)
    torch.testing.assert_close(v_shared, v_frames, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_a_fitted_basis_gets_its_gradient_on_the_shared_path(backend):
    """A basis that requires grad is read through slices of itself, so its gradient with one
    identity is the per-frame path's."""
    m = _shape(backend).double()
    m.shape_dirs.requires_grad_(True)
    inputs = flame_inputs(m, 3, 11, shared=True)
    grads = []
    for shape in (inputs["shape"], inputs["shape"].expand(3, -1)):
        v, _ = m(**{**inputs, "shape": shape})
        grads.append(torch.autograd.grad(v.square().sum(), m.shape_dirs)[0])
    assert torch.count_nonzero(grads[0]) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


TABLES = ("v_template", "shape_dirs", "J_regressor", "lbs_weights")


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("transforms", ["vertex", "mean"])
def test_fitted_tables_get_medusa_gradients(backend, shared, transforms):
    """Model tables that require grad get medusa's gradients, the joints' path included:
    the joint basis and the mean weights are derived from them with autograd then, not
    read from the cache (which would leave J_regressor without a gradient)."""
    grads = {}
    for path in (backend, "medusa"):
        # medusa returns R; transforms="mean" is its R.mean(1)
        m = _shape(path, transforms=transforms if path != "medusa" else "vertex").double()
        for name in TABLES:
            getattr(m, name).requires_grad_(True)
        v, R = m(**flame_inputs(m, 3, 12, shared=shared))
        if path == "medusa" and transforms == "mean":
            R = R.mean(1)
        loss = v.square().sum() + R.square().sum()
        grads[path] = torch.autograd.grad(loss, [getattr(m, name) for name in TABLES])
    for name, got, want in zip(TABLES, grads[backend], grads["medusa"]):
        assert torch.count_nonzero(want) > 0, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


# The groups of derived tables each model table is a source of: computed with autograd on
# every call while that table alone requires grad.
DERIVED_FROM = {
    "v_template": {"joint_template"},
    "shape_dirs": {"joint_dirs", "split_dirs"},
    "J_regressor": {"joint_template", "joint_dirs"},
    "lbs_weights": {"mean_weights"},
}


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("name", TABLES)
def test_one_fitted_table_derives_only_its_own_tables_again(backend, name, monkeypatch):
    """One table requiring grad gets medusa's gradient, and only the tables derived from
    it are computed again per call (fitting v_template does not copy the basis columns),
    for that call only: the registered tables carry no graph."""
    m = _shape(backend, transforms="mean").double()
    ref = _shape("medusa").double()
    for module in (m, ref):
        getattr(module, name).requires_grad_(True)
    inputs = flame_inputs(m, 3, 15, shared=True)
    m(**inputs)
    computed = []
    compute = m._compute_derived
    monkeypatch.setattr(m, "_compute_derived", lambda groups: computed.extend(groups)
                        or compute(groups))
    v, R = m(**inputs)
    assert set(computed) == DERIVED_FROM[name] and len(computed) == len(set(computed))
    assert all(t.grad_fn is None for t in m._registered().values())
    vr, Rr = ref(**inputs)
    got = torch.autograd.grad(v.square().sum() + R.square().sum(), getattr(m, name))[0]
    want = torch.autograd.grad(vr.square().sum() + Rr.mean(1).square().sum(),
                               getattr(ref, name))[0]
    assert torch.count_nonzero(want) > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def _fitted_pair(backend, table, seed):
    """(FlameShape on `backend`, on medusa's algorithm, inputs), float64, `table`
    requiring grad in both."""
    m, ref = _shape(backend).double(), _shape("medusa").double()
    for module in (m, ref):
        getattr(module, table).requires_grad_(True)
    return m, ref, flame_inputs(m, 3, seed)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_a_fitted_table_gets_its_gradient_after_calls_without_grad(backend):
    """Calls under no_grad (evaluation during a fit) derive the tables without a graph;
    the next call with grad derives them with autograd again: J_regressor still gets
    medusa's gradient."""
    m, ref, inputs = _fitted_pair(backend, "J_regressor", 16)
    grads = []
    for module in (m, ref):
        with torch.no_grad():
            module(**inputs)
            module(**inputs)
        v, _ = module(**inputs)
        grads.append(torch.autograd.grad(v.square().sum(), module.J_regressor)[0])
    assert torch.count_nonzero(grads[1]) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)


def _medusa_after(m, inputs):
    """medusa's algorithm on m's current buffers."""
    ref = _shape("medusa").double()
    ref.load_state_dict(m.state_dict())
    return ref(**inputs)[0]


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_tables_after_a_pickle_round_trip_follow_the_buffers(backend):
    """torch.save / torch.load of a whole module whose buffer was written in place after
    the last call: the copy derives its tables from its own buffers (the keys the
    original compared hold the storage addresses of the saving process)."""
    import io

    m = _shape(backend).double()
    inputs = flame_inputs(m, 3, 17)
    m(**inputs)
    with torch.no_grad():
        m.v_template.add_(0.1)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert "_derived_keys" not in copy.__dict__
    torch.testing.assert_close(copy(**inputs)[0], _medusa_after(m, inputs),
                               rtol=1e-10, atol=1e-12)


def test_a_table_with_a_graph_swapped_in_leaves_no_graph_behind():
    """functional_call with a table that carries a graph (no_grad call): the module holds
    nothing of that graph afterwards, and deep-copies."""
    m = _shape("auto").double()
    inputs = flame_inputs(m, 2, 22)
    swapped = m.v_template + torch.zeros_like(m.v_template).requires_grad_(True)
    with torch.no_grad():
        torch.func.functional_call(m, {"v_template": swapped}, kwargs=inputs)
    held = [t for t in m.__dict__.values() if isinstance(t, tuple)]
    assert not any(isinstance(t, torch.Tensor) and t.grad_fn is not None
                   for group in held for t in group)
    copy.deepcopy(m)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_tables_derived_in_inference_mode_serve_autograd_later(backend):
    """A table written in place, then a call under torch.inference_mode: the tables are
    derived there as ordinary tensors, so a later call with autograd can save them."""
    m = _shape(backend, parameters=["shape"]).double()
    inputs = flame_inputs(m, 3, 18)
    del inputs["shape"]  # the module's parameter, trained
    m(**inputs)
    with torch.no_grad():
        m.shape_dirs.mul_(1.1)
    with torch.inference_mode():
        m(**inputs)
    assert not m._J_dirs.is_inference()
    v, _ = m(**inputs)
    grad = torch.autograd.grad(v.square().sum(), m.shape)[0]
    ref = _shape("medusa", parameters=["shape"]).double()
    ref.load_state_dict(m.state_dict())
    want = torch.autograd.grad(ref(**inputs)[0].square().sum(), ref.shape)[0]
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_forward_ad_through_a_table_swapped_in_by_functional_call():
    """A dual tensor of forward-mode AD swapped in for v_template shares the buffer's
    storage and version: the tables are derived from it anyway, so the tangent carries
    the joints' part (against medusa's algorithm, whose joints are regressed per call)."""
    from torch.autograd import forward_ad

    m = _shape("auto").double()
    ref = _shape("medusa").double()
    inputs = flame_inputs(m, 2, 19)
    m(**inputs)
    tangent = torch.randn(m.v_template.shape, generator=torch.Generator().manual_seed(20),
                          dtype=F64)
    tangents = []
    for module in (m, ref):
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(module.v_template, tangent)
            v, _ = torch.func.functional_call(module, {"v_template": dual}, kwargs=inputs)
            tangents.append(forward_ad.unpack_dual(v).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("eager_first", [False, True])
def test_compiled_fit_of_a_table_gets_medusa_gradient(backend, eager_first, fresh_dynamo):
    """Under torch.compile(fullgraph=True) a table that requires grad has its derived
    tables derived in the graph: its gradient includes the joints' part, as eager."""
    m, ref, inputs = _fitted_pair(backend, "v_template", 21)
    grads = []
    for module in (m, ref):
        if eager_first:
            module(**inputs)[0].sum().backward()
        call = torch.compile(module, fullgraph=True, backend="aot_eager") if module is m \
            else module
        v, _ = call(**inputs)
        grads.append(torch.autograd.grad(v.square().sum(), module.v_template)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)
    # The graph's tables were this call's: the registered ones carry none, so freezing
    # the table and fitting a parameter runs backward again (eager and compiled), and
    # the module deep-copies.
    assert all(t.grad_fn is None for t in m._registered().values())
    m.v_template.requires_grad_(False)
    m.expr.requires_grad_(True)
    no_expr = {k: v for k, v in inputs.items() if k != "expr"}
    for call in (m, torch.compile(m, fullgraph=True, backend="aot_eager")):
        call(**no_expr)[0].sum().backward()
    assert m.expr.grad is not None
    copy.deepcopy(m)


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize(
    "change",
    ["v_template in place", "J_regressor in place", "shape_dirs in place", "reassigned",
     "functional_call", "then restored"],
)
def test_changed_tables_are_read_at_the_next_call(backend, change):
    """The derived tables (joint basis, the basis' split columns, mean weights) follow
    their buffers: written in place, reassigned, or swapped in by functional_call."""
    m = _shape(backend).double()
    ref = _shape("medusa").double()
    inputs = flame_inputs(m, 3, 13, shared=True)
    m(**inputs)  # derived once
    g = torch.Generator().manual_seed(14)
    new = m.v_template + 0.05 * torch.randn(m.v_template.shape, generator=g, dtype=F64)
    if change == "v_template in place":
        m.v_template.copy_(new)
    elif change == "J_regressor in place":
        m.J_regressor.copy_(m.J_regressor.roll(1, dims=1))
    elif change == "shape_dirs in place":
        m.shape_dirs.mul_(2)
    elif change == "reassigned":
        m.v_template = new.clone()
    if change in ("functional_call", "then restored"):
        got, _ = torch.func.functional_call(m, {"v_template": new}, kwargs=inputs)
        if change == "then restored":
            got, _ = m(**inputs)
        else:
            ref.v_template.copy_(new)
    else:
        got, _ = m(**inputs)
        ref.load_state_dict(m.state_dict())
    want, _ = ref(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_module_in_an_unsupported_dtype_is_named():
    m = _shape("ext").half()
    with pytest.raises(TypeError, match="float32 or float64"):
        m(batch_size=1)
    m = _shape("ext")
    m.jaw_pose = torch.nn.Parameter(torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="parameter jaw_pose"):
        m(batch_size=2)


def test_zero_batch():
    m = _shape("ext")
    v, R = m(batch_size=0)
    assert v.shape == (0, m.v_template.shape[0], 3) and R.shape[0] == 0


def test_numpy_integers_are_counts():
    import numpy as np

    m = FlameShape(np.int64(6), np.int32(4), device="cpu", model_path=SMALL, backend="ext")
    assert type(m.n_shape) is int and m.n_shape == 6 and m.n_expr == 4
    v, _ = m(batch_size=np.int64(2))
    assert v.shape[0] == 2
    with pytest.raises(TypeError, match="^n_shape must be an int, got bool"):
        FlameShape(np.bool_(True), 4, device="cpu", model_path=SMALL)


def test_huge_batch_is_a_value_error_naming_it():
    m = _shape("ext")
    for batch in (2**31, 2**62):
        with pytest.raises(ValueError, match="^batch_size must be in"):
            m(batch_size=batch)


def test_nan_in_gives_nan_out():
    m = _shape("ext")
    expr = torch.randn(2, m.n_expr)
    expr[1, 0] = float("nan")
    v, _ = m(expr=expr)
    assert torch.isfinite(v[0]).all() and torch.isnan(v[1]).any()


# --- properties: any inputs, against the float64 reference path ---------------------------


@st.composite
def shape_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 5])),
        names=draw(st.lists(st.sampled_from(INPUT_NAMES), unique=True, max_size=6)),
        broadcast=draw(st.lists(st.booleans(), min_size=6, max_size=6)),
        layouts=draw(st.lists(layouts, min_size=6, max_size=6)),
        dtype=draw(dtypes),
        seed=draw(seeds),
        scale=draw(st.sampled_from([0.05, 0.5, 1.5])),
        transforms=draw(st.sampled_from(["vertex", "joint", "none"])),
        backend=draw(st.sampled_from(["ext", "medusa"])),
        # NaN inputs on the compiled path only: the medusa baseline reproduces medusa's
        # NaN spreading (a NaN joint reaches R's constant bottom row through 0 * NaN).
        nan_input=draw(st.one_of(st.none(), st.integers(0, 5))),
        grad=draw(st.booleans()),
    )


@given(case=shape_cases())
def test_flame_shape_matches_reference(decoder_cache, device, case):
    needs_kernels(device, "blend", "skin")
    transforms = "vertex" if case["backend"] == "medusa" else case["transforms"]
    module = decoder_cache("shape", case["backend"], case["dtype"], device, transforms)
    oracle = decoder_cache("shape", "reference", F64, "cpu", transforms)
    batch, inputs = case["batch"], {}
    for i, name in enumerate(case["names"]):
        rows = 1 if case["broadcast"][i] else batch
        x = random_values(case["seed"] + i, (rows, getattr(module, name).shape[1]), case["scale"])
        if case["nan_input"] == i and case["backend"] == "ext" and x.numel():
            x.view(-1)[-1] = NAN
        x = lay_out(x.to(case["dtype"]), case["layouts"][i], device)
        inputs[name] = x.detach().requires_grad_(case["grad"])
    # medusa takes the batch from the first input; all of batch 1 (or none) need it given.
    explicit = all(x.shape[0] == 1 for x in inputs.values()) and batch != 1
    kwargs = dict(batch_size=batch) if explicit or not inputs else {}
    v, R = module(**kwargs, **inputs)
    v0, R0 = oracle(**kwargs, **{n: d64(x).requires_grad_(case["grad"]) for n, x in inputs.items()})
    assert v.shape == (batch, module.v_template.shape[0], 3) and v.dtype == case["dtype"]
    assert (R is None) == (transforms == "none")
    outputs = [(v, v0, "v")] + ([(R, R0, "R")] if R is not None else [])
    for got, exact, what in outputs:
        assert_within(got, exact.detach(), decoder_bound(exact.detach(), case["dtype"]), what,
                      exact_nan=False)
    if not case["grad"] or not inputs:
        return
    # batch 0 included: the backward of an empty batch must run too (empty gradients)
    grads = [random_values(case["seed"] + 20 + i, got.shape) for i, (got, _, _) in enumerate(outputs)]
    got_g = torch.autograd.grad([o[0] for o in outputs], list(inputs.values()),
                                [g.to(v) for g in grads])
    oracle_inputs = [d64(x).requires_grad_(True) for x in inputs.values()]
    v0, R0 = oracle(**kwargs, **dict(zip(inputs, oracle_inputs)))
    want_g = torch.autograd.grad([v0, R0][: len(outputs)], oracle_inputs, grads)
    for name, got, exact in zip(inputs, got_g, want_g):
        # A gradient sums over every vertex (and sample, for a broadcast input).
        magnitude = exact.abs().nan_to_num(nan=0.0, posinf=0.0)
        scale = (magnitude.amax().item() if magnitude.numel() else 0.0) + 1.0
        assert_within(got, exact, decoder_bound(exact, case["dtype"], scale) * 10,
                      f"grad {name}", exact_nan=False, keep_sample_nan=False)


# --- every device against the CPU reference (full-size model) -----------------------------


def _full_pair(decoder_cache, device, transforms="vertex"):
    """FlameShape on the full-size model: the float64 reference on the CPU, and the
    compiled ops on `device`."""
    cpu = decoder_cache("shape", "reference", F64, "cpu", transforms, FULL)
    return cpu, decoder_cache("shape", "ext", F64, device, transforms, FULL)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 300])
def test_device_matches_cpu_reference_float64(ops, device, batch, shared, decoder_cache):
    cpu, module = _full_pair(decoder_cache, device)
    inputs = flame_inputs(cpu, batch, batch, shared=shared)
    v0, R0 = cpu(**inputs)
    v, R = module(**{k: t.to(device) for k, t in inputs.items()})
    torch.testing.assert_close(v.cpu(), v0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(R.cpu(), R0, rtol=1e-9, atol=1e-12)


def _grads(module, inputs, device):
    """Gradients of a loss on v and R w.r.t. every input, moved to the CPU."""
    leaves = {k: t.detach().to(device).requires_grad_(True) for k, t in inputs.items()}
    v, R = module(**leaves)
    (v.square().sum() + R.sum()).backward()
    return {k: t.grad.cpu() for k, t in leaves.items()}


def test_device_gradients_match_cpu_reference(ops, device, decoder_cache):
    cpu, module = _full_pair(decoder_cache, device)
    inputs = flame_inputs(cpu, 5, 3)
    want, got = _grads(cpu, inputs, "cpu"), _grads(module, inputs, device)
    for name in inputs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_gradients_above_the_small_batch_path(ops, device, shared, decoder_cache):
    """B = 33 > 16: blend takes cuBLAS on a GPU (three sample groups of the hand loops on
    the CPU) forward and backward; values and gradients stay the float64 reference's."""
    cpu, module = _full_pair(decoder_cache, device)
    inputs = flame_inputs(cpu, 33, 17, shared=shared)
    v0, R0 = cpu(**inputs)
    v, R = module(**{k: t.to(device) for k, t in inputs.items()})
    torch.testing.assert_close(v.cpu(), v0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(R.cpu(), R0, rtol=1e-9, atol=1e-12)
    want, got = _grads(cpu, inputs, "cpu"), _grads(module, inputs, device)
    for name in inputs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_deterministic_mode_above_the_small_batch_path(ops, device, dtype, deterministic, quiet):
    """torch.use_deterministic_algorithms(True) at B = 33 > 16 (where blend would take
    cuBLAS): runs without an error, and two runs give the same bits, values and
    gradients."""
    module = FlameShape(device=device, model_path=FULL, backend="ext").to(dtype)

    def run():
        inputs = flame_inputs(module, 33, 21, requires_grad=True)
        v, R = module(**inputs)
        grads = torch.autograd.grad(v.square().sum() + R.square().sum(), list(inputs.values()))
        return [v, R, *grads]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b) and not a.isnan().any()


# --- CUDA only ----------------------------------------------------------------------------


@pytest.mark.cuda
def test_backward_captures_in_a_cuda_graph(ops, quiet):
    shape = FlameShape(device="cuda", model_path=FULL, backend="ext", transforms="none")
    static = flame_inputs(shape, 8, 0, requires_grad=True)

    def step():
        for t in static.values():
            t.grad = None
        v, _ = shape(**static)
        v.square().sum().backward()

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    # The warm-up left .grad set: captured with it, the graph's backward would add to
    # it, and a replay would give 2g. Captured with none, it writes fresh gradients.
    for t in static.values():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v, _ = shape(**static)
        v.square().sum().backward()
    graph.replay()
    captured = {k: t.grad.clone() for k, t in static.items()}
    step()
    for k, t in static.items():
        torch.testing.assert_close(captured[k], t.grad)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device(ops, quiet):
    cpu = FlameShape(device="cpu", model_path=FULL, backend="reference")
    other = FlameShape(device="cuda:1", model_path=FULL, backend="ext")
    inputs = flame_inputs(cpu, 4, 5)
    v0, _ = cpu(**inputs)
    v, _ = other(**{k: t.to("cuda:1") for k, t in inputs.items()})
    assert v.device == torch.device("cuda:1")
    torch.testing.assert_close(v.cpu(), v0, rtol=1e-4, atol=1e-5)


def test_mean_transform_compiles_fullgraph(fresh_dynamo, quiet):
    m = _shape("ext", transforms="mean")
    leaves = {k: v.requires_grad_(True)
              for k, v in flame_inputs(m, 3, torch.Generator().manual_seed(2), scale=0.4).items()}
    compiled = torch.compile(m, fullgraph=True)
    got_v, got_R = compiled(**leaves)
    want_v, want_R = m(**leaves)
    torch.testing.assert_close(got_R, want_R, rtol=1e-5, atol=1e-6)
    names = list(leaves)
    got = torch.autograd.grad(got_R.sum() + got_v.sum(), [leaves[n] for n in names])
    want = torch.autograd.grad(want_R.sum() + want_v.sum(), [leaves[n] for n in names])
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
