"""FlameLandmark: buffers and outputs of the 68-point and MediaPipe sets in 2D and 3D, the
contour rules, agreement of the three paths, gradients, option and input errors,
properties over any inputs, and agreement of every device with the CPU reference.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from _oracle import (
    a64,
    ambiguous_bins,
    assert_bad_decoder_input_is_named,
    assert_error_names,
    assert_matches,
    assert_within,
    d64,
)
from _samples import (
    CORRUPTIONS,
    F32,
    F64,
    FULL,
    SMALL,
    dtypes,
    flame_inputs,
    lay_out,
    layouts,
    random_values,
    seeds,
    specials,
)
from flame_ext import FlameLandmark, FlameShape, load_flame_model

BACKENDS = ["ext", "reference", "medusa"]


def _shape():
    """FlameShape on the small model (reference path), to make meshes."""
    model = load_flame_model(SMALL)
    return FlameShape(model.n_shape, model.n_expr, device="cpu", model_path=SMALL,
                      backend="reference")


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
    inputs = flame_inputs(m, 6, gen, scale=0.6)
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
    v, _ = m(**flame_inputs(m, 2, gen))
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


@given(option=st.sampled_from(["lm_type", "lm_dim", "contour_rule", "backend"]),
       value=st.one_of(st.text(max_size=4), st.integers(), st.none()))
def test_flame_landmark_options_are_checked(option, value):
    valid = {"lm_type": ("68", "mp"), "lm_dim": ("2d", "3d"), "contour_rule": ("medusa", "deca"),
             "backend": ("auto", "ext", "reference", "medusa")}[option]
    assume(value not in valid)
    kwargs = dict(lm_type="68", lm_dim="2d", device="cpu", model_path=SMALL)
    kwargs[option] = value
    with pytest.raises((ValueError, TypeError)) as info:
        FlameLandmark(**kwargs)
    assert_error_names(info, option)


@pytest.mark.parametrize("name", ["v", "poses"])
@given(how=st.sampled_from(CORRUPTIONS + ("batch",)), variant=st.integers(0, 11),
       backend=st.sampled_from(["ext", "reference", "medusa"]))
def test_flame_landmark_bad_input_is_named(decoder_cache, device, name, how, variant, backend):
    gen = torch.Generator().manual_seed(variant)
    module = decoder_cache("landmark", backend, F32, device, ("68", "2d", "medusa"))
    good = dict(v=torch.rand(3, module.num_vertices, 3, generator=gen).to(device),
                poses=torch.rand(3, 15, generator=gen).to(device))
    assert_bad_decoder_input_is_named(lambda args: module(args["v"], args["poses"]), good, name,
                                      how, variant)


# --- properties: any inputs, against the float64 reference path ---------------------------


@st.composite
def landmark_decoder_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 3, 8])),
        option=draw(st.sampled_from([("68", "2d", "medusa"), ("68", "2d", "deca"),
                                     ("68", "3d", "medusa"), ("mp", "2d", "medusa"),
                                     ("mp", "3d", "medusa")])),
        backend=draw(st.sampled_from(["ext", "medusa"])),
        broadcast_poses=draw(st.booleans()),
        layouts=draw(st.lists(layouts, min_size=2, max_size=2)),
        dtype=draw(dtypes),
        seed=draw(seeds),
        pose_scale=draw(st.sampled_from([0.2, 1.0, 3.0])),
        inject=draw(st.lists(specials, min_size=2, max_size=2)),
    )


@given(case=landmark_decoder_cases())
def test_flame_landmark_matches_reference(decoder_cache, device, case):
    option = case["option"]
    backend = case["backend"] if option[2] == "medusa" else "ext"
    module = decoder_cache("landmark", backend, case["dtype"], device, option)
    oracle = decoder_cache("landmark", "reference", F64, "cpu", option)
    batch = case["batch"]
    v = random_values(case["seed"], (batch, module.num_vertices, 3), inject=case["inject"][0])
    v = lay_out(v.to(case["dtype"]), case["layouts"][0], device).requires_grad_(True)
    poses = random_values(case["seed"] + 1, (1 if case["broadcast_poses"] else batch, 15),
                          case["pose_scale"], case["inject"][1])
    poses = lay_out(poses.to(case["dtype"]), case["layouts"][1], device)
    lmk = module(v, poses)
    exact = oracle(d64(v), d64(poses))
    assert lmk.shape == exact.shape and lmk.dtype == case["dtype"]
    # Samples whose yaw is within rounding of a bin boundary may take either bin.
    keep = torch.ones(batch, dtype=torch.bool)
    if option[:2] == ("68", "2d") and batch:
        keep = ~ambiguous_bins(d64(poses).expand(batch, -1), option[2], case["dtype"])
    magnitude = oracle(a64(v), d64(poses)).abs()
    assert_matches(lmk[keep.to(lmk.device)], exact[keep], magnitude[keep], 3, "landmarks")
    if batch and keep.any():
        g = random_values(case["seed"] + 2, lmk.shape)
        (got,) = torch.autograd.grad(lmk, v, g.to(lmk))
        rv = d64(v).requires_grad_(True)
        (want,) = torch.autograd.grad(oracle(rv, d64(poses)), rv, g)
        bound = 3 * 2 * torch.finfo(case["dtype"]).eps * 68 * g.abs().amax() + 1e-300
        assert_within(got[keep.to(got.device)], want[keep], bound, "grad v")


# --- every device against the CPU reference (full-size model) -----------------------------


@pytest.mark.parametrize("lm_type", ["68", "mp"])
def test_device_matches_cpu_reference(ops, device, lm_type, decoder_cache):
    gen = torch.Generator().manual_seed(6)
    option = (lm_type, "2d", "medusa")
    cpu = decoder_cache("landmark", "reference", F64, "cpu", option, FULL)
    module = decoder_cache("landmark", "ext", F64, device, option, FULL)
    v = torch.randn(9, 5023, 3, generator=gen, dtype=torch.float64) * 0.1
    poses = torch.randn(9, 15, generator=gen, dtype=torch.float64) * 0.5
    torch.testing.assert_close(module(v.to(device), poses.to(device)).cpu(), cpu(v, poses))
