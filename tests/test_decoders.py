"""The decoders' contract (SPEC section 2): medusa's API semantics, outputs, gradients,
and agreement of the three computation paths (compiled ops, reference, medusa's).

Runs on the small synthetic model so float64 gradcheck stays fast; a few checks use the
full-size synthetic model.
"""

import pytest
import torch

from flame_ext import FlameLandmark, FlameShape, FlameTex, load_flame_model
from flame_ext.decoders import INPUT_NAMES

SMALL = "synthetic-small"
BACKENDS = ["ext", "reference", "medusa"]


@pytest.fixture(scope="module")
def small_model():
    return load_flame_model(SMALL)


def _random_inputs(module, batch, gen, scale=0.3, dtype=None, device=None):
    dtype = dtype or module.v_template.dtype
    device = device or module.v_template.device
    return {
        name: (torch.randn(batch, getattr(module, name).shape[1], generator=gen, dtype=torch.float64)
               * scale).to(dtype=dtype, device=device)
        for name in INPUT_NAMES
    }


def _shape(backend="reference", device="cpu", **kwargs):
    return FlameShape(n_shape=kwargs.pop("n_shape", None) or load_flame_model(SMALL).n_shape,
                      n_expr=kwargs.pop("n_expr", None) or load_flame_model(SMALL).n_expr,
                      device=device, model_path=SMALL, backend=backend, **kwargs)


# --- FlameShape: medusa's API semantics -------------------------------------------------

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
    inputs = _random_inputs(m, 5, gen)
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


# --- FlameShape: outputs and the three paths --------------------------------------------

@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_paths_agree_with_medusa_float64(backend, batch, shared):
    gen = torch.Generator().manual_seed(batch)
    m, base = _shape(backend).double(), _shape("medusa").double()
    inputs = _random_inputs(m, batch, gen, scale=0.5)
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
    inputs = _random_inputs(m, 4, gen, scale=0.5)
    v, R = m(**inputs)
    v0, R0 = base(**inputs)
    torch.testing.assert_close(v, v0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(R, R0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_transforms_option(backend):
    gen = torch.Generator().manual_seed(1)
    full = _shape(backend).double()
    inputs = _random_inputs(full, 2, gen)
    v, R = full(**inputs)
    v_j, A = _shape(backend, transforms="joint").double()(**inputs)
    v_n, none = _shape(backend, transforms="none").double()(**inputs)
    assert none is None and A.shape == (2, full.parents.shape[0], 4, 4)
    torch.testing.assert_close(v_j, v)
    torch.testing.assert_close(v_n, v)
    # R is the lbs_weights blend of the per-joint transforms
    torch.testing.assert_close(torch.einsum("vj,bjxy->bvxy", full.lbs_weights, A), R)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_every_input(backend, shared):
    gen = torch.Generator().manual_seed(3)
    m = _shape(backend, n_shape=3, n_expr=2).double()
    inputs = _random_inputs(m, 2, gen, scale=0.4)
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
    inputs = _random_inputs(b, 2, gen)
    v, _ = b(**inputs)
    ref = _shape("medusa")
    ref.load_state_dict(state)
    v0, _ = ref(**inputs)
    torch.testing.assert_close(v, v0, rtol=1e-4, atol=1e-5)


def test_decoders_pickle_and_run_where_no_constructor_ran(monkeypatch):
    """torch.save of a whole module, or a module sent to a spawned worker, arrives in a
    process where no decoder constructor prepared the compiled-op step table."""
    import pickle

    from flame_ext import FlameShapeLandmark, _backend

    modules = [_shape("ext"), _landmark(backend="ext"), FlameTex(SMALL, n_tex=3, backend="ext"),
               FlameShapeLandmark(6, 4, model_path=SMALL, backend="ext", device="cpu")]
    blobs = [pickle.dumps(m) for m in modules]
    monkeypatch.setattr(_backend, "_STEPS", {"reference": _backend._STEPS["reference"]})
    monkeypatch.setattr(_backend, "_AUTO", {})
    shape, landmark, texture, fit = (pickle.loads(b) for b in blobs)
    gen = torch.Generator().manual_seed(8)
    inputs = _random_inputs(shape, 2, gen)
    v, R = shape(**inputs)
    torch.testing.assert_close(v, modules[0](**inputs)[0])
    assert landmark(v, shape.get_full_pose().expand(2, -1)).shape == (2, 68, 3)
    assert texture(torch.randn(2, 3)).shape == (2, 3, 256, 256)
    assert fit(**inputs).shape == (2, 68, 3)
    # the derived buffers come back with load_state_dict on the unpickled module too
    shape.load_state_dict(modules[0].state_dict())
    torch.testing.assert_close(shape(**inputs)[0], v)


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


def test_nan_in_gives_nan_out():
    m = _shape("ext")
    expr = torch.randn(2, m.n_expr)
    expr[1, 0] = float("nan")
    v, _ = m(expr=expr)
    assert torch.isfinite(v[0]).all() and torch.isnan(v[1]).any()


# --- FlameLandmark -----------------------------------------------------------------------

def _landmark(lm_type="68", lm_dim="2d", backend="reference", **kwargs):
    return FlameLandmark(lm_type, lm_dim, device="cpu", model_path=SMALL, backend=backend, **kwargs)


@pytest.mark.parametrize("lm_type, lm_dim, count", [("68", "2d", 68), ("68", "3d", 68),
                                                     ("mp", "2d", 105), ("mp", "3d", 105)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_landmark_shapes_and_buffers(lm_type, lm_dim, count, backend):
    lm = _landmark(lm_type, lm_dim, backend)
    assert lm.neck_kin_chain.tolist() == [1, 0]
    expected = {"tris", "neck_kin_chain", "lmk_faces_idx", "lmk_bary_coords"}
    expected |= ({"dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords"} if lm_type == "68"
                 else {"landmark_indices"})
    assert set(lm.state_dict()) == expected
    m = _shape()
    v, _ = m(batch_size=3)
    assert lm(v, m.get_full_pose().expand(3, -1)).shape == (3, count, 3)


@pytest.mark.parametrize("lm_type", ["68", "mp"])
@pytest.mark.parametrize("rule", ["medusa", "deca"])
@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_landmark_paths_agree(lm_type, rule, backend):
    gen = torch.Generator().manual_seed(11)
    m = _shape().double()
    inputs = _random_inputs(m, 6, gen, scale=0.6)
    v, _ = m(**inputs)
    poses = torch.cat([inputs[n] for n in ("global_pose", "neck_pose", "jaw_pose", "eye_pose")], 1)
    got = _landmark(lm_type, backend=backend, contour_rule=rule).double()(v, poses)
    want = _landmark(lm_type, backend="reference", contour_rule=rule).double()(v, poses)
    torch.testing.assert_close(got, want)
    if rule == "medusa":
        torch.testing.assert_close(got, _landmark(lm_type, backend="medusa").double()(v, poses))


@pytest.mark.parametrize("backend", BACKENDS)
def test_landmark_gradcheck(backend):
    gen = torch.Generator().manual_seed(2)
    lm = _landmark(backend=backend).double()
    m = _shape().double()
    v, _ = m(**_random_inputs(m, 2, gen))
    poses = torch.randn(2, 15, generator=gen, dtype=torch.float64) * 0.3
    assert torch.autograd.gradcheck(lambda x: lm(x, poses), (v.detach().requires_grad_(True),))


@pytest.mark.parametrize("kwargs, match", [
    ({"lm_type": "5"}, "lm_type"), ({"lm_dim": "4d"}, "lm_dim"),
    ({"contour_rule": "smplx"}, "contour_rule"),
])
def test_landmark_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _landmark(**kwargs)


def test_landmark_rejects_bad_vertices():
    lm = _landmark()
    with pytest.raises(ValueError, match="v"):
        lm(torch.randn(2, 7, 3), torch.zeros(2, 15))
    with pytest.raises(ValueError, match="poses"):
        m = _shape()
        v, _ = m(batch_size=2)
        lm(v, torch.zeros(2, 14))


# --- FlameTex ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_texture_paths_agree(backend):
    gen = torch.Generator().manual_seed(4)
    tex = FlameTex(model_path=SMALL, n_tex=4, backend=backend)
    base = FlameTex(model_path=SMALL, n_tex=4, backend="medusa")
    code = torch.randn(3, 4, generator=gen)
    out = tex(code)
    assert out.shape == (3, 3, 256, 256)
    # float32 sums of 4 products of O(1) values: 1e-6 is a few ulps
    torch.testing.assert_close(out, base(code), rtol=1e-5, atol=1e-6)


def test_texture_state_dict_and_errors():
    tex = FlameTex(model_path=SMALL, n_tex=3)
    assert set(tex.state_dict()) == {"texture_mean", "texture_basis"}
    with pytest.raises(ValueError, match="texcode"):
        tex(torch.randn(2, 5))
    with pytest.raises(ValueError, match="n_tex"):
        FlameTex(model_path=SMALL, n_tex=10**6)
