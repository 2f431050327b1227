"""FlameShapeLandmark (flame_ext.fitting): FLAME parameters straight to landmarks.

The oracle is the pair it replaces, FlameShape followed by FlameLandmark (medusa's
algorithm where it exists). Checked: values and gradients on the small synthetic model in
float64 for every landmark set, contour rule, lm_dim, shared and per-sample identity and
both backends; float64 gradcheck w.r.t. every input; float32 agreement on the full-size
synthetic model; FlameShape's API semantics; the vertex subset; from_decoders.
"""

import pytest
import torch

from _samples import FULL, SMALL, flame_inputs, full_poses
from flame_ext import FlameLandmark, FlameShape, load_flame_model
from flame_ext.decoders import INPUT_NAMES, POSE_NAMES
from flame_ext.fitting import FlameShapeLandmark
from flame_ext.reference import contour_bins

BACKENDS = ["ext", "reference"]
# (lm_type, contour_rule): the contour rule only matters for the 68-point set.
SETS = [("68", "medusa"), ("68", "deca"), ("mp", "medusa")]


def _counts(model_path):
    model = load_flame_model(model_path)
    return model.n_shape, model.n_expr


def _fit(backend="reference", lm_type="68", lm_dim="2d", model_path=SMALL, **kwargs):
    n_shape, n_expr = _counts(model_path)
    kwargs.setdefault("n_shape", n_shape)
    kwargs.setdefault("n_expr", n_expr)
    return FlameShapeLandmark(
        lm_type=lm_type, lm_dim=lm_dim, device="cpu", model_path=model_path,
        backend=backend, **kwargs,
    )


def _pair(lm_type="68", lm_dim="2d", contour_rule="medusa", model_path=SMALL, **kwargs):
    """The decoders the fit path replaces, on medusa's algorithm where it has the rule."""
    n_shape, n_expr = _counts(model_path)
    kwargs.setdefault("n_shape", n_shape)
    kwargs.setdefault("n_expr", n_expr)
    shape = FlameShape(device="cpu", model_path=model_path, backend="medusa", **kwargs)
    landmark = FlameLandmark(
        lm_type, lm_dim, "cpu", model_path=model_path, contour_rule=contour_rule,
        backend="medusa" if contour_rule == "medusa" else "reference",
    )
    return shape, landmark


def _pair_landmarks(pair, **inputs):
    shape, landmark = pair
    v, _ = shape(**inputs)
    batch = v.shape[0]
    values = {name: inputs.get(name, getattr(shape, name)) for name in POSE_NAMES}
    poses = torch.cat([values[name].expand(batch, -1) for name in POSE_NAMES], dim=1)
    return landmark(v, poses)


def _random_inputs(module, batch, seed, scale=0.5, dtype=torch.float64, shared=False):
    """Inputs on the CPU in float64 (the oracles' precision) whatever the module holds."""
    return flame_inputs(module, batch, seed, scale=scale, dtype=dtype, device="cpu",
                        shared=shared)


def _grads(out, inputs, seed):
    """Gradients of a random linear function of `out` w.r.t. every input."""
    # drawn in float64 whatever out's dtype: float32 draws of one seed are other numbers
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64).to(out.dtype).to(out.device)
    return torch.autograd.grad((out * weight).sum(), list(inputs.values()))


# --- values and gradients: the pair's, on the small model in float64 -----------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lm_type, rule", SETS)
@pytest.mark.parametrize("lm_dim", ["2d", "3d"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_matches_flameshape_then_flamelandmark_float64(backend, lm_type, rule, lm_dim, shared):
    fit = _fit(backend, lm_type, lm_dim, contour_rule=rule).double()
    shape, landmark = (m.double() for m in _pair(lm_type, lm_dim, rule))
    inputs = _random_inputs(fit, 8, seed=1, shared=shared)
    # poses of +-30 degrees spread the samples over several contour bins
    assert contour_bins(full_poses(inputs), rule).unique().numel() >= 3
    for value in inputs.values():
        value.requires_grad_(True)

    got = fit(**inputs)
    want = _pair_landmarks((shape, landmark), **inputs)
    assert got.shape == want.shape == (8, 105 if lm_type == "mp" else 68, 3)
    # The same arithmetic on a subset of rows: only the summation order of the matrix
    # products differs, a few float64 ulps of coordinates ~0.1.
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    for name, g, g0 in zip(inputs, _grads(got, inputs, 2), _grads(want, inputs, 2)):
        torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lm_type, lm_dim", [("68", "2d"), ("68", "3d"), ("mp", "2d")])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_gradcheck_every_input(backend, lm_type, lm_dim, shared):
    fit = _fit(backend, lm_type, lm_dim, n_shape=3, n_expr=2).double()
    inputs = _random_inputs(fit, 2, seed=3, scale=0.4, shared=shared)
    names = list(inputs)

    def fn(*values):
        return fit(**dict(zip(names, values)))

    values = tuple(t.requires_grad_(True) for t in inputs.values())
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_trainable_parameters_as_inputs_do(backend):
    names = list(INPUT_NAMES)
    fit = _fit(backend, parameters=names).double()
    inputs = _random_inputs(fit, 1, seed=4)
    with torch.no_grad():
        for name in names:
            getattr(fit, name).copy_(inputs[name])
    out = fit(batch_size=3)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                         dtype=out.dtype)
    (out * weight).sum().backward()

    plain = _fit(backend).double()
    expanded = {n: v.expand(3, -1).clone().requires_grad_(True) for n, v in inputs.items()}
    out0 = plain(**expanded)
    (out0 * weight).sum().backward()
    torch.testing.assert_close(out, out0, rtol=1e-12, atol=1e-14)
    for name in names:
        torch.testing.assert_close(
            getattr(fit, name).grad, expanded[name].grad.sum(0, keepdim=True), msg=name
        )


# --- the full-size synthetic model in float32 ----------------------------------------------

@pytest.fixture(scope="module")
def full_oracles():
    """float64 FlameShape + FlameLandmark on the full synthetic model, per landmark set."""
    return {
        lm_type: tuple(m.double() for m in _pair(lm_type, model_path=FULL))
        for lm_type in ("68", "mp")
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lm_type", ["68", "mp"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_full_model_float32_agrees(full_oracles, backend, lm_type, shared):
    fit = _fit(backend, lm_type, model_path=FULL)
    inputs32 = _random_inputs(fit, 6, seed=6, scale=0.5, dtype=torch.float32, shared=shared)
    inputs64 = {n: v.double().requires_grad_(True) for n, v in inputs32.items()}
    for value in inputs32.values():
        value.requires_grad_(True)
    got = fit(**inputs32)
    want = _pair_landmarks(full_oracles[lm_type], **inputs64)
    # Sums of ~400 blend terms carried through three 4x4 products, coordinates ~0.15
    # (float32 ulp 1.5e-8): both this path and medusa's own float32 decoders land within
    # ~4e-8 of float64 here; 4e-7 (~25 ulps) leaves room for other BLAS summation orders
    # and is far below any wrong bin or vertex (~1e-3).
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4e-7)
    for name, g, g0 in zip(inputs32, _grads(got, inputs32, 7), _grads(want, inputs64, 7)):
        # The same sums backwards: measured relative errors ~3e-7 here and for medusa's
        # float32 decoders; 3e-6 is 10x that.
        error = (g.double() - g0).norm() / g0.norm()
        assert error < 3e-6, (name, error.item())


@pytest.mark.slow
@pytest.mark.parametrize("lm_type, lm_dim", [("68", "2d"), ("68", "3d"), ("mp", "2d")])
def test_subset_is_small_and_holds_every_landmark_vertex(lm_type, lm_dim):
    fit = _fit("reference", lm_type, lm_dim, model_path=FULL)
    landmark = FlameLandmark(lm_type, lm_dim, "cpu", model_path=FULL, backend="reference")
    num_vertices = load_flame_model(FULL).v_template.shape[0]
    subset = fit.lmk_vertex_idx
    # 68/2d: every contour bin's faces, ~1/10 of the mesh; the others ~1/20.
    assert subset.numel() < num_vertices / 8, subset.numel()
    faces = [landmark.lmk_faces_idx]
    if lm_type == "68" and lm_dim == "2d":
        faces.append(landmark.dynamic_lmk_faces_idx.reshape(-1))
    needed = landmark.tris[torch.cat(faces)].unique()
    # exactly the landmark faces' corners, sorted: nothing missing, nothing extra
    assert torch.equal(subset, needed)
    # the renumbered tables name the same mesh vertices as the originals
    assert torch.equal(subset[fit.tris[fit.lmk_faces_idx]], landmark.tris[landmark.lmk_faces_idx])
    if lm_type == "68" and lm_dim == "2d":
        assert torch.equal(
            subset[fit.tris[fit.dynamic_lmk_faces_idx]],
            landmark.tris[landmark.dynamic_lmk_faces_idx],
        )
    assert fit.v_template.shape == (subset.numel(), 3)
    assert fit.pose_dirs.shape[1] == 3 * subset.numel()


# --- FlameShape's API semantics ------------------------------------------------------------

def test_parameters_trainable_and_init_parameters():
    init = torch.full((1, 3), 0.1)
    fit = _fit(parameters=["jaw_pose", "expr"], jaw_pose=init)
    assert fit.parameters_ == ["jaw_pose", "expr"]
    assert {n for n, p in fit.named_parameters() if p.requires_grad} == {"jaw_pose", "expr"}
    sizes = {"shape": fit.n_shape, "expr": fit.n_expr, "eye_pose": 6}
    for name in INPUT_NAMES:
        p = getattr(fit, name)
        assert isinstance(p, torch.nn.Parameter) and p.shape == (1, sizes.get(name, 3))
    torch.testing.assert_close(fit.jaw_pose.detach(), init)
    assert torch.count_nonzero(fit.expr) == 0


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"n_shape": 10**6}, ValueError, "n_shape"),
    ({"n_expr": -1}, ValueError, "n_expr"),
    ({"parameters": ["nose"]}, ValueError, "nose"),
    ({"nose": torch.zeros(1, 3)}, ValueError, "global_pose"),
    ({"jaw_pose": torch.zeros(1, 4)}, ValueError, "jaw_pose"),
    ({"lm_type": "5"}, ValueError, "lm_type"),
    ({"lm_dim": "4d"}, ValueError, "lm_dim"),
    ({"contour_rule": "smplx"}, ValueError, "contour_rule"),
    ({"backend": "fast"}, ValueError, "backend"),
    ({"backend": "medusa"}, ValueError, "FlameShape \\+ FlameLandmark"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _fit(**kwargs)


def test_forward_error_messages_match_flameshape():
    fit = _fit(parameters=["shape"])
    with pytest.raises(ValueError, match="^Either inputs or batch_size must be provided!$"):
        fit()
    with pytest.raises(ValueError, match="^Parameter shape is also part of inputs!$"):
        fit(shape=torch.randn(2, fit.n_shape))
    with pytest.raises(ValueError, match="pose.*valid keys.*global_pose"):
        fit(pose=torch.randn(2, 3))
    with pytest.raises(ValueError, match="jaw_pose.*3.*5"):
        fit(expr=torch.randn(5, fit.n_expr), jaw_pose=torch.randn(3, 3))


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(2, 7), ValueError, "shape"),                      # wrong width
    (torch.randn(2, 2, 2), ValueError, "shape"),                   # wrong rank
    (torch.randn(2, 3, dtype=torch.float64), TypeError, "dtype"),  # module is float32
    (torch.randint(0, 3, (2, 3)), TypeError, "jaw_pose"),          # integer
    ([[0.0, 0.0, 0.0]], TypeError, "jaw_pose"),                    # not a tensor
])
def test_bad_inputs_raise_clear_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        _fit()(jaw_pose=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_inference_broadcasting_and_parameters(backend):
    fit = _fit(backend).double()
    shape, landmark = (m.double() for m in _pair())
    inputs = _random_inputs(fit, 1, seed=8)
    with torch.no_grad():
        for name in INPUT_NAMES:
            getattr(fit, name).copy_(inputs[name])
            getattr(shape, name).copy_(inputs[name])
    out = fit(batch_size=4)  # every value from the parameters
    assert out.shape == (4, 68, 3)
    torch.testing.assert_close(out, _pair_landmarks((shape, landmark), batch_size=4))
    expr = _random_inputs(fit, 5, seed=9)["expr"]
    assert fit(expr=expr).shape[0] == 5  # the batch size of the inputs
    torch.testing.assert_close(
        fit(expr=expr), _pair_landmarks((shape, landmark), expr=expr), rtol=1e-10, atol=1e-13
    )


def test_get_full_pose_order():
    fit = _fit(global_pose=torch.full((1, 3), 1.0), neck_pose=torch.full((1, 3), 2.0),
               jaw_pose=torch.full((1, 3), 3.0), eye_pose=torch.full((1, 6), 4.0))
    assert fit.get_full_pose().tolist() == [[1.0] * 3 + [2.0] * 3 + [3.0] * 3 + [4.0] * 6]


def test_state_dict_holds_the_parameters_under_flameshape_names():
    fit = _fit(parameters=["expr"])
    assert set(fit.state_dict()) == set(INPUT_NAMES)
    with torch.no_grad():
        fit.expr.normal_()
    shape, _ = _pair()
    result = shape.load_state_dict(fit.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(shape.expr, fit.expr)
    again = _fit()
    again.load_state_dict(shape.state_dict(), strict=False)
    assert torch.equal(again.expr, fit.expr)


def test_dtype_round_trip_restores_the_float32_tables():
    fit, fresh = _fit(), _fit()
    fit.double().float()
    for name, buffer in fresh.named_buffers():
        assert torch.equal(getattr(fit, name), buffer), name
    inputs = _random_inputs(fit, 3, seed=10, dtype=torch.float32)
    assert torch.equal(fit(**inputs), fresh(**inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_follow_this_modules_shape_dirs(backend):
    """The basis' split columns follow this module's own shape_dirs (its rows of the
    landmark vertices): written in place, the next call reads it; fitted (requires grad,
    swapped in by functional_call), it gets its numerical gradient."""
    fit = _fit(backend, n_shape=4, n_expr=3).double()
    inputs = _random_inputs(fit, 3, seed=21, shared=True)
    before = fit(**inputs)
    fit.shape_dirs.mul_(1.5)
    after = fit(**inputs)
    assert not torch.allclose(before, after)
    oracle = _fit(backend, n_shape=4, n_expr=3).double()
    with torch.no_grad():
        oracle.shape_dirs.mul_(1.5)
        # derived by hand
        dirs, n = oracle.shape_dirs.reshape(-1, oracle.shape_dirs.shape[-1]), oracle.n_shape
        oracle.register_buffer("_identity_dirs", dirs[:, :n].contiguous(), persistent=False)
        oracle.register_buffer("_expr_dirs", dirs[:, n:].contiguous(), persistent=False)
        oracle.__dict__["_derived_all_keys"] = oracle._source_keys()
    torch.testing.assert_close(after, oracle(**inputs), rtol=1e-12, atol=1e-12)

    def landmarks(shape_dirs):
        return torch.func.functional_call(fit, {"shape_dirs": shape_dirs}, kwargs=inputs)

    shape_dirs = fit.shape_dirs.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(landmarks, (shape_dirs,), fast_mode=True)


def test_from_decoders_takes_tables_that_require_grad_as_constants():
    """A FlameShape table that requires grad is copied without its graph: iteration after
    iteration of a fit through the landmark path runs backward (the copies are this
    module's constants; the parameters stay shared)."""
    landmark = FlameLandmark("68", "2d", "cpu", model_path=SMALL)
    shape = FlameShape(*_counts(SMALL), device="cpu", model_path=SMALL, parameters=["expr"])
    shape.v_template.requires_grad_(True)
    fit = FlameShapeLandmark.from_decoders(shape, landmark)
    assert not fit.v_template.requires_grad and fit.v_template.grad_fn is None
    for _ in range(2):
        fit(batch_size=2).square().sum().backward()
    assert shape.expr.grad is not None and shape.v_template.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out_per_sample(backend):
    fit = _fit(backend, lm_type="mp")
    expr = torch.randn(2, fit.n_expr)
    expr[1, 0] = float("nan")
    out = fit(expr=expr)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_batch(backend):
    assert _fit(backend)(batch_size=0).shape == (0, 68, 3)


# --- from_decoders: the landmark path of an existing pair -----------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_from_decoders_shares_parameters_and_matches(backend):
    shape, landmark = _pair(parameters=["expr", "jaw_pose"])
    shape.double()
    landmark.double()
    fit = FlameShapeLandmark.from_decoders(shape, landmark, backend=backend)
    assert fit.expr is shape.expr and fit.parameters_ == ["expr", "jaw_pose"]
    assert fit.v_template.dtype == torch.float64
    inputs = _random_inputs(fit, 5, seed=11)
    del inputs["expr"], inputs["jaw_pose"]  # trainable: taken from the parameters
    with torch.no_grad():
        shape.expr.normal_(0, 0.5)
    torch.testing.assert_close(
        fit(**inputs), _pair_landmarks((shape, landmark), **inputs), rtol=1e-10, atol=1e-13
    )
    # an optimizer over the FlameShape's parameters fits through the landmark path
    before = shape.expr.detach().clone()
    optimizer = torch.optim.Adam(shape.parameters(), lr=1e-2)
    fit(**inputs).square().sum().backward()
    optimizer.step()
    assert not torch.equal(shape.expr, before)


def test_from_decoders_rejects_mismatched_or_wrong_objects():
    shape, _ = _pair()
    _, other = _pair(model_path=FULL)
    with pytest.raises(ValueError, match="different FLAME models"):
        FlameShapeLandmark.from_decoders(shape, other)
    with pytest.raises(TypeError, match="landmark"):
        FlameShapeLandmark.from_decoders(shape, shape)
    with pytest.raises(TypeError, match="shape"):
        FlameShapeLandmark.from_decoders(other, other)


# --- devices --------------------------------------------------------------------------------

def test_device_matches_cpu_reference(device):
    """The default path on each device against the CPU reference (CUDA: the CUDA kernels)."""
    fit = _fit("auto", lm_type="68").double().to(device)
    oracle = _fit("reference").double()
    for shared in (False, True):
        inputs = _random_inputs(fit, 16, seed=12, shared=shared)
        on_device = {n: v.to(device).requires_grad_(True) for n, v in inputs.items()}
        on_cpu = {n: v.clone().requires_grad_(True) for n, v in inputs.items()}
        got, want = fit(**on_device), oracle(**on_cpu)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-13)
        for name, g, g0 in zip(inputs, _grads(got, on_device, 13), _grads(want, on_cpu, 13)):
            torch.testing.assert_close(g.cpu(), g0, rtol=1e-9, atol=1e-12, msg=name)
