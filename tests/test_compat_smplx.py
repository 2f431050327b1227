"""flame_ext.compat.smplx.FLAME against smplx.FLAME (PyPI smplx) on the same files and inputs.

Both layers read the full-size synthetic model written in smplx's folder layout
(flame_ext.synthetic.write_smplx_assets: FLAME_NEUTRAL.pkl without chumpy objects, which
smplx's plain pickle.load reads, or FLAME_NEUTRAL.npz). Every output field, the state
dict and the gradients are compared: float64 values to 1e-10 and gradients to 1e-8;
float32 relative to the largest value of each compared tensor, values to 8 float32
epsilons (both sides round each of the ~400-term blend sums and 4x4 products once per
step, in another order: ~1e-7 measured) and gradients to 1e-5 (the backward sums run
over all 5023 vertices, ~1e-6 measured). Tests that need no smplx (argument errors,
safety, compile) run without it.
"""

import pickle
import sys

import numpy as np
import pytest
import torch

import flame_ext.compat
from flame_ext import ModelFileError, UnsafePickleError, reference, synthetic
from flame_ext.compat import _layer
from flame_ext.compat.smplx import FLAME, FLAMEOutput

from conftest import DEVICES

NUM_BETAS, NUM_EXPR = 300, 100
POSE_PARTS = ("global_orient", "neck_pose", "jaw_pose", "leye_pose", "reye_pose")
FIELDS = ("vertices", "joints", "full_pose", "global_orient", "transl", "v_shaped", "betas",
          "expression", "jaw_pose", "neck_pose")
BACKENDS = ["ext", "reference"]
F32_VALUES, F32_GRADS = 8 * torch.finfo(torch.float32).eps, 1e-5


def _smplx():
    return pytest.importorskip("smplx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """smplx's FLAME folder, with the model as .pkl and as .npz."""
    out = synthetic.write_smplx_assets(tmp_path_factory.mktemp("smplx"), "full", 0)
    synthetic.write_smplx_assets(out, "full", 0, ext="npz")
    return out


_cache = {}


def _pair(folder, backend="ext", **kwargs):
    """(smplx.FLAME, compat FLAME) built with the same arguments (cached: loading the
    full-size model takes a second)."""
    smplx = _smplx()
    kwargs = {"num_betas": NUM_BETAS, "num_expression_coeffs": NUM_EXPR,
              "use_face_contour": True, **kwargs}
    key = (str(folder), backend, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _cache:
        _cache[key] = (smplx.FLAME(str(folder), **kwargs),
                       FLAME(str(folder), backend=backend, **kwargs))
    return _cache[key]


def _inputs(batch, dtype, seed=0, scale=0.4, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    values = {"betas": rand(batch, NUM_BETAS), "expression": rand(batch, NUM_EXPR),
              "transl": rand(batch, 3, s=0.1)}
    values.update({name: rand(batch, 3, s=scale) for name in POSE_PARTS})
    return values


def _close(got, want, dtype, what, grads=False):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if dtype == torch.float64:
        bound = 1e-8 if grads else 1e-10
    else:
        bound = (F32_GRADS if grads else F32_VALUES) * max(want.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: max abs difference {err:.3g} > {bound:.3g}"


def _compare_outputs(ours, theirs, dtype):
    assert isinstance(ours, FLAMEOutput)
    assert list(ours.keys()) == list(theirs.keys()) == list(FIELDS)
    for name in FIELDS:
        a, b = ours[name], theirs[name]
        assert (a is None) == (b is None), name
        if b is not None:
            _close(a, b, dtype, name)


def _grads(out, wrt, seed=1):
    """Gradients of a fixed random linear function of vertices and joints."""
    g = torch.Generator().manual_seed(seed)
    outputs = [o for o in (out.vertices, out.joints) if o is not None]
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    return torch.autograd.grad(outputs, wrt, upstream, allow_unused=True)


def _compare_grads(ours, theirs, wrt_names, dtype):
    for name, a, b in zip(wrt_names, ours, theirs):
        assert (a is None) == (b is None), name
        if b is not None:
            _close(a, b, dtype, f"d/d{name}", grads=True)


# --------------------------------------------------------------------------------------
# Parity with smplx.FLAME


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("contour", [True, False], ids=["contour", "static"])
def test_state_dict_matches_smplx(folder, dtype, contour):
    """Same keys, shapes, dtypes and values (smplx rounds every model array to float32
    before converting it to dtype; the barycentrics it converts directly), and each
    layer loads the other's state dict strictly."""
    theirs, ours = _pair(folder, dtype=dtype, use_face_contour=contour)
    want, got = theirs.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    fresh = FLAME(str(folder), num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPR,
                  use_face_contour=contour, dtype=dtype)
    fresh.load_state_dict(want)
    theirs.load_state_dict(got)
    assert ours.num_betas == theirs.num_betas and ours.name() == theirs.name()
    assert ours.num_expression_coeffs == theirs.num_expression_coeffs
    assert ours.get_num_verts() == theirs.get_num_verts() == 5023
    assert ours.get_num_faces() == theirs.get_num_faces() == 9976
    np.testing.assert_array_equal(ours.faces, theirs.faces)
    assert ours.extra_repr() == theirs.extra_repr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_explicit_inputs(folder, backend, dtype):
    """Every input given: every output field, and the gradients to every input."""
    theirs, ours = _pair(folder, backend, dtype=dtype)
    values = {k: v.requires_grad_() for k, v in _inputs(4, dtype).items()}
    names = list(values)
    out_theirs = theirs(**values, return_full_pose=True)
    out_ours = ours(**values, return_full_pose=True)
    _compare_outputs(out_ours, out_theirs, dtype)
    wrt = list(values.values())
    _compare_grads(_grads(out_ours, wrt), _grads(out_theirs, wrt), names, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_large_batch_translation(folder, dtype):
    """A batch large enough for the BLAS form of the translation (12 x 5023 x 3 values):
    every field and gradient against smplx, as at batch 4."""
    theirs, ours = _pair(folder, dtype=dtype)
    values = {k: v.requires_grad_() for k, v in _inputs(12, dtype, seed=3).items()}
    assert 12 * 5023 * 3 >= _layer._TRANSLATE_BLAS_ELEMENTS
    out_ours, out_theirs = ours(**values), theirs(**values)
    _compare_outputs(out_ours, out_theirs, dtype)
    wrt = list(values.values())
    _compare_grads(_grads(out_ours, wrt), _grads(out_theirs, wrt), list(values), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("transl_batch", [12, 1], ids=["per-sample", "broadcast"])
def test_translate_is_the_broadcast_add(dtype, transl_batch):
    """_layer.translate against points + transl[:, None]: the same bits, the same point
    gradient, the translation gradient up to the order of its sum over the points; under
    inference mode first (its cached selector must still serve autograd later); and
    non-finite translations (the add's infs and NaNs, coordinate by coordinate)."""
    g = torch.Generator().manual_seed(5)
    points = torch.randn(12, 5023, 3, generator=g, dtype=torch.float64).to(dtype)
    transl = torch.randn(transl_batch, 3, generator=g, dtype=torch.float64).to(dtype)
    _layer._coordinate_selector.cache_clear()
    with torch.inference_mode():
        assert torch.equal(_layer.translate(points, transl), points + transl.unsqueeze(1))
    points.requires_grad_()
    transl.requires_grad_()
    got, want = _layer.translate(points, transl), points + transl.unsqueeze(1)
    assert got.shape == want.shape and torch.equal(got, want)
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64).to(dtype)
    got_grads = torch.autograd.grad(got, [points, transl], upstream)
    want_grads = torch.autograd.grad(want, [points, transl], upstream)
    assert torch.equal(got_grads[0], want_grads[0])
    # The translation's gradient sums the upstream over the points (and the batch, for a
    # broadcast transl), in BLAS's order on one side and the reduction's on the other:
    # both within the rounding bound of that sum, 2 n eps sum |terms| (a fixed tolerance
    # held on one CPU and not on another).
    terms = upstream.double().abs().sum(1)
    if transl_batch == 1:
        terms = terms.sum(0, keepdim=True)
    count = points.shape[1] * (points.shape[0] if transl_batch == 1 else 1)
    bound = 2 * count * torch.finfo(dtype).eps * terms
    error = (got_grads[1].double() - want_grads[1].double()).abs()
    assert bool((error <= bound).all()), float((error - bound).max())
    for bad in (float("inf"), float("nan")):
        shift = transl.detach().clone()
        shift[0, 1] = bad
        torch.testing.assert_close(_layer.translate(points.detach(), shift),
                                   points.detach() + shift.unsqueeze(1), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_parameters_stand_in_for_omitted_inputs(folder, backend):
    """No inputs: both layers use their parameters (initial values from the
    constructor, batch_size rows, requires_grad=True); gradients reach them."""
    dtype = torch.float64
    init = _inputs(3, dtype, seed=2)
    theirs, ours = _pair(folder, backend, dtype=dtype, batch_size=3, **init)
    for name, value in init.items():
        assert torch.equal(getattr(ours, name), value) and getattr(ours, name).requires_grad
    assert ours.body_pose.shape == theirs.body_pose.shape == (3, 69)
    out_theirs, out_ours = theirs(return_full_pose=True), ours(return_full_pose=True)
    _compare_outputs(out_ours, out_theirs, dtype)
    names = list(init)
    _compare_grads(_grads(out_ours, [getattr(ours, n) for n in names]),
                   _grads(out_theirs, [getattr(theirs, n) for n in names]), names, dtype)
    # some inputs given, the rest from the parameters
    given = {"expression": init["expression"].flip(0), "jaw_pose": 2 * init["jaw_pose"]}
    _compare_outputs(ours(**given), theirs(**given), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_large_angles_and_every_contour_bin(folder, dtype):
    """Rotations up to and beyond pi, and head turns sweeping yaw from -70 to 70 degrees:
    the contour landmarks come from the same bins as smplx's (its rule: the global
    orientation alone, negated yaw), so the joints agree to rounding everywhere."""
    theirs, ours = _pair(folder, "ext", dtype=dtype)
    batch = 64
    values = _inputs(batch, dtype, seed=3, scale=1.5)
    yaw = torch.linspace(-70, 70, batch, dtype=torch.float64) * np.pi / 180
    tilt = 0.3 * torch.randn(batch, 2, generator=torch.Generator().manual_seed(4),
                             dtype=torch.float64)
    values["global_orient"] = torch.stack([tilt[:, 0], yaw, tilt[:, 1]], 1).to(dtype)
    values["neck_pose"] = values["neck_pose"] * 2  # up to ~3 rad: ignored by the bin
    values["jaw_pose"][0] = torch.tensor([np.pi, 0.0, 0.0], dtype=dtype)
    values["leye_pose"][1] = torch.tensor([0.0, 2 * np.pi - 1e-3, 0.0], dtype=dtype)
    values = {k: v.requires_grad_() for k, v in values.items()}
    out_theirs, out_ours = theirs(**values), ours(**values)
    _compare_outputs(out_ours, out_theirs, dtype)
    wrt = list(values.values())
    _compare_grads(_grads(out_ours, wrt), _grads(out_theirs, wrt), list(values), dtype)


def _rotations(batch, dtype, seed, flat=False, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for name in POSE_PARTS:
        rot = reference.rodrigues(0.6 * torch.randn(batch, 3, generator=g, dtype=torch.float64))
        # not orthonormal: both layers use the matrices as given
        rot = rot + skew * torch.randn(batch, 3, 3, generator=g, dtype=torch.float64)
        rot = rot.to(dtype).unsqueeze(1)
        parts[name] = rot.flatten(2) if flat else rot
    return parts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", [False, True], ids=["3x3", "9"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_pose2rot_false(folder, backend, flat, dtype):
    """Rotation matrices (B, 1, 3, 3) or (B, 1, 9), taken as given (also when not
    orthonormal); the contour bin read from them as smplx's FLAME reads it; gradients
    to the matrices' nine entries."""
    theirs, ours = _pair(folder, backend, dtype=dtype)
    values = _rotations(5, dtype, seed=5, flat=flat, skew=0.02)
    codes = _inputs(5, dtype, seed=6)
    values["betas"], values["expression"] = codes["betas"], codes["expression"]
    values = {k: v.requires_grad_() for k, v in values.items()}
    out_theirs = theirs(**values, pose2rot=False, return_full_pose=True)
    out_ours = ours(**values, pose2rot=False, return_full_pose=True)
    _compare_outputs(out_ours, out_theirs, dtype)
    wrt = list(values.values())
    _compare_grads(_grads(out_ours, wrt), _grads(out_theirs, wrt), list(values), dtype)


def test_return_flags_transl_and_batch_one_betas(folder):
    dtype = torch.float64
    theirs, ours = _pair(folder, dtype=dtype, create_transl=False, use_face_contour=False)
    values = _inputs(4, dtype, seed=7)
    values["betas"] = values["betas"][:1]  # one identity: expanded, as smplx reports it
    del values["transl"]
    for flags in ({"return_verts": False}, {"return_full_pose": True}, {}):
        out_ours, out_theirs = ours(**values, **flags), theirs(**values, **flags)
        _compare_outputs(out_ours, out_theirs, dtype)
    assert out_ours.betas.shape == (4, NUM_BETAS) and out_ours.joints.shape == (4, 5 + 51, 3)
    assert ours(**values, return_verts=False).vertices is None
    # no transl parameter: none applied, unless given
    shift = torch.full((4, 3), 0.25, dtype=dtype)
    _compare_outputs(ours(**values, transl=shift), theirs(**values, transl=shift), dtype)


def test_component_counts_are_clamped_as_smplx_clamps_them(folder):
    theirs, ours = _pair(folder, num_betas=500, num_expression_coeffs=7)
    assert (ours.num_betas, ours.num_expression_coeffs) == (300, 7)
    assert (theirs.num_betas, theirs.num_expression_coeffs) == (300, 7)
    assert ours.expr_dirs.shape == theirs.expr_dirs.shape == (5023, 3, 7)
    _compare_outputs(ours(), theirs(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("contour", [True, False], ids=["contour", "static"])
@pytest.mark.parametrize("batch, transl_batch", [(1, 1), (12, 12), (12, 1), (3, None)],
                         ids=["B1", "B12-blas", "B12-broadcast", "B3-no-transl"])
def test_posed_outputs_node_is_the_op_by_op_path(folder, monkeypatch, dtype, contour, batch,
                                                 transl_batch):
    """The layer's outputs after the decode as one autograd node (`_layer.posed_outputs`):
    the same bits as the op-by-op path it replaces, forward and every input's gradient,
    with and without the contour, with a per-sample, a broadcast and no translation (the
    BLAS form of the translation from B = 12)."""
    layer = FLAME(str(folder), num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPR,
                  use_face_contour=contour, dtype=dtype, backend="ext")
    values = _inputs(batch, dtype, seed=21)
    if transl_batch is None:
        del values["transl"]
    else:
        values["transl"] = values["transl"][:transl_batch]
    values = {k: v.requires_grad_() for k, v in values.items()}
    wrt = list(values.values())
    fused = layer(**values)
    assert type(fused.joints.grad_fn).__name__ == "_PosedOutputsBackward"
    monkeypatch.setattr(_layer, "posed_outputs", lambda *args: None)
    steps = layer(**values)
    assert type(steps.joints.grad_fn).__name__ != "_PosedOutputsBackward"
    assert torch.equal(fused.vertices, steps.vertices)
    assert torch.equal(fused.joints, steps.joints)
    for name, a, b in zip(values, _grads(fused, wrt), _grads(steps, wrt)):
        assert torch.equal(a, b), name


def test_posed_outputs_may_be_changed_in_place(folder, monkeypatch):
    """Vertices and joints from the node take in-place edits, as the op-by-op path's do,
    where the translation takes its BLAS form (B = 12 for the vertices) too: the same
    values and gradients after recentring the mesh and scaling the joints in place."""
    layer = FLAME(str(folder), num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPR,
                  use_face_contour=True, dtype=torch.float64, backend="ext")
    values = {k: v.requires_grad_() for k, v in _inputs(12, torch.float64, seed=23).items()}
    wrt = list(values.values())
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(_layer, "posed_outputs", lambda *args: None)
        out = layer(**values)
        assert (type(out.joints.grad_fn).__name__ == "_PosedOutputsBackward") == fused
        out.vertices -= out.vertices.mean(1, keepdim=True)
        out.joints.mul_(2.0)
        results.append((out.vertices, out.joints) + _grads(out, wrt))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("contour", [True, False], ids=["contour", "static"])
@pytest.mark.parametrize("transl_batch", [2, 1, None], ids=["per-sample", "broadcast", "none"])
def test_posed_outputs_gradients_and_double_backward(small, contour, transl_batch):
    """The node's backward against finite differences, and its backward's (written in
    differentiable ops, the landmarks' through the op's registered double backward), on
    random vertices, transforms, joints and translations, float64."""
    layer = FLAME(str(small), use_face_contour=contour, dtype=torch.float64, backend="ext")
    g = torch.Generator().manual_seed(22)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    num_vertices = layer.v_template.shape[0]
    v, transforms, joints = rand(2, num_vertices, 3), rand(2, 5, 4, 4), rand(2, 5, 3)
    pose = 0.3 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    tables = layer._landmark_tables(v, pose)
    k = _layer.steps("ext", v.device)
    inputs = (v, transforms, joints) + (() if transl_batch is None else (rand(transl_batch, 3),))

    def outputs(v, transforms, joints, transl=None):
        out = _layer.posed_outputs(k, v, transforms, joints, transl, *tables)
        assert out is not None
        return out

    assert torch.autograd.gradcheck(outputs, inputs)
    assert torch.autograd.gradgradcheck(outputs, inputs)


def test_v_template_joint_mapper_and_forward_shape(folder):
    smplx = _smplx()
    dtype = torch.float64
    template = torch.from_numpy(np.random.default_rng(8).normal(0, 0.1, (5023, 3)))

    class Mapper(torch.nn.Module):
        def forward(self, joints, vertices):
            return torch.cat([joints[:, :5], vertices[:, :3]], dim=1)

    kwargs = dict(num_betas=20, num_expression_coeffs=10, dtype=dtype, v_template=template,
                  joint_mapper=Mapper(), use_face_contour=True)
    theirs, ours = smplx.FLAME(str(folder), **kwargs), FLAME(str(folder), **kwargs)
    values = _inputs(2, dtype, seed=9)
    values["betas"], values["expression"] = values["betas"][:, :20], values["expression"][:, :10]
    out_ours, out_theirs = ours(**values), theirs(**values)
    _compare_outputs(out_ours, out_theirs, dtype)
    assert out_ours.joints.shape == (2, 8, 3)
    shaped_ours = ours.forward_shape(values["betas"])
    shaped_theirs = theirs.forward_shape(values["betas"])
    _close(shaped_ours.vertices, shaped_theirs.vertices, dtype, "forward_shape")
    _close(shaped_ours.v_shaped, shaped_theirs.v_shaped, dtype, "v_shaped")


def test_torch_func_grad_and_vmap(folder):
    """With the default backend the layer composes with torch.func: grad equals eager
    autograd through the ops, vmap over single frames equals the batched call."""
    flame = FLAME(str(folder), num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPR,
                  use_face_contour=True).double()
    inputs = _inputs(3, torch.float64, seed=4)
    names = list(inputs)
    g = torch.Generator().manual_seed(5)
    upstream = torch.randn(flame(**inputs).vertices.shape, generator=g, dtype=torch.float64)

    def loss(*values):
        return (upstream * flame(**dict(zip(names, values))).vertices).sum()

    leaves = [t.clone().requires_grad_() for t in inputs.values()]
    # the eager gradient through the ops, the transformed one through the reference
    assert _layer.steps(flame.backend, torch.device("cpu")).lbs is not _layer.steps(
        "reference", torch.device("cpu")).lbs
    want = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.func.grad(loss, argnums=tuple(range(len(names))))(*inputs.values())
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    mapped = torch.func.vmap(
        lambda *v: flame(**{k: t[None] for k, t in zip(names, v)}).vertices[0])(*inputs.values())
    torch.testing.assert_close(mapped, flame(**inputs).vertices, rtol=1e-12, atol=1e-12)


def test_tables_follow_their_buffers(folder):
    """A v_template written in place is read at the next call, and one that requires
    grad gets smplx's gradient (the joints' path included)."""
    smplx = _smplx()
    kwargs = dict(num_betas=NUM_BETAS, num_expression_coeffs=NUM_EXPR, dtype=torch.float64)
    theirs, ours = smplx.FLAME(str(folder), **kwargs), FLAME(str(folder), **kwargs)
    values = _inputs(2, torch.float64, seed=11)
    ours(**values)
    for layer in (theirs, ours):
        layer.v_template.add_(0.05)
        layer.v_template.requires_grad_(True)
    out_ours, out_theirs = ours(**values), theirs(**values)
    _compare_outputs(out_ours, out_theirs, torch.float64)
    grads = [torch.autograd.grad(out.vertices.square().sum() + out.joints.square().sum(),
                                 layer.v_template)[0]
             for out, layer in ((out_ours, ours), (out_theirs, theirs))]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_npz_model(folder):
    theirs, ours = _pair(folder, ext="npz", dtype=torch.float64)
    values = _inputs(2, torch.float64, seed=10)
    _compare_outputs(ours(**values), theirs(**values), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_double_and_device_moves_keep_parity(folder, device):
    """.to(device) / .double() convert the buffers and derive the kernels' tables again;
    outputs and gradients against smplx there (on CUDA through the CUDA kernels and the
    layer's fused nodes)."""
    theirs, ours = _pair(folder, "ext")
    theirs, ours = _copy_to(theirs, device), _copy_to(ours, device)
    values = {k: v.requires_grad_() for k, v in
              _inputs(3, torch.float64, seed=11, device=device).items()}
    out_ours, out_theirs = ours(**values), theirs(**values)
    _compare_outputs(out_ours, out_theirs, torch.float64)
    wrt = list(values.values())
    _compare_grads(_grads(out_ours, wrt), _grads(out_theirs, wrt), list(values), torch.float64)


def _copy_to(module, device):
    import copy

    return copy.deepcopy(module).to(device).double()


# --------------------------------------------------------------------------------------
# The switch


@pytest.fixture
def smplx_unpatched():
    smplx = _smplx()
    yield smplx
    flame_ext.compat.unpatch_smplx()


def test_patch_smplx_swaps_flame_and_create(folder, smplx_unpatched):
    smplx = smplx_unpatched
    original = smplx.FLAME
    assert original is not FLAME
    root = folder.parent / "models"
    (root / "flame").mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        target = root / "flame" / item.name
        if not target.exists():
            target.symlink_to(item)
    with flame_ext.compat.patched_smplx() as originals:
        assert originals == {"FLAME": original}
        assert smplx.FLAME is FLAME and smplx.body_models.FLAME is FLAME
        layer = smplx.create(str(root), model_type="flame", use_face_contour=True)
        assert isinstance(layer, FLAME)
        assert layer().joints.shape == (1, 5 + 51 + 17, 3)
    assert smplx.FLAME is original and smplx.body_models.FLAME is original
    assert not isinstance(smplx.create(str(root), model_type="flame"), FLAME)
    flame_ext.compat.patch_smplx()
    assert smplx.FLAME is FLAME
    assert flame_ext.compat.unpatch_smplx() and not flame_ext.compat.unpatch_smplx()
    assert smplx.FLAME is original


def test_patch_smplx_without_smplx(monkeypatch):
    for name in [n for n in sys.modules if n == "smplx" or n.startswith("smplx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "smplx", None)
    with pytest.raises(ImportError, match=r"smplx is not importable .*pip install smplx"):
        flame_ext.compat.patch_smplx()
    with pytest.raises(ImportError, match="smplx is not importable"):
        with flame_ext.compat.patched_smplx():
            pass
    assert not flame_ext.compat.unpatch_smplx()


# --------------------------------------------------------------------------------------
# Without smplx: files, errors, safety, compile


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.write_smplx_assets(tmp_path_factory.mktemp("small"), "small", 0)


@pytest.mark.parametrize("key", ["faces_tensor", "parents", "lmk_faces_idx",
                                 "dynamic_lmk_faces_idx"])
def test_a_bad_index_table_is_refused_at_load(small, key):
    layer = FLAME(str(small), use_face_contour=True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state[key].view(-1)[-1] = 10**6
    with pytest.raises(ValueError, match=repr(key)):
        layer.load_state_dict(state)
    assert layer.state_dict()[key].max() < 10**6


def test_errors_name_the_problem(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="FLAME_MALE.pkl does not exist"):
        FLAME(str(small), gender="male")
    with pytest.raises(ValueError, match="Unknown extension: obj"):
        FLAME(str(small), ext="obj")
    with pytest.raises(ValueError, match="backend must be one of"):
        FLAME(str(small), backend="medusa")
    with pytest.raises(TypeError, match="dtype must be"):
        FLAME(str(small), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"betas must have shape \(\*, 6\)"):
        FLAME(str(small), betas=torch.zeros(1, 5))
    layer = FLAME(str(small), create_jaw_pose=False, use_face_contour=True)
    with pytest.raises(ValueError, match="jaw_pose was not given .* create_jaw_pose=False"):
        layer()
    assert layer(jaw_pose=torch.zeros(1, 3)).joints.shape == (1, 73, 3)
    with pytest.raises(ValueError, match=r"expression must have shape \(\*, 4\)"):
        layer(jaw_pose=torch.zeros(1, 3), expression=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="global_orient has dtype torch.float64"):
        layer(jaw_pose=torch.zeros(1, 3), global_orient=torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="jaw_pose has batch size 2 but the batch size is 3"):
        layer(jaw_pose=torch.zeros(2, 3), neck_pose=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="rotation|shape"):
        layer(jaw_pose=torch.zeros(1, 3), global_orient=torch.zeros(1, 4), pose2rot=False)
    (tmp_path / "FLAME_NEUTRAL.pkl").write_bytes((small / "FLAME_NEUTRAL.pkl").read_bytes())
    with pytest.raises(FileNotFoundError, match="flame_static_embedding.pkl"):
        FLAME(str(tmp_path))


def test_files_are_read_without_running_code(small, tmp_path, capsys):
    """smplx unpickles flame_static_embedding.pkl with pickle.load; the compat layer reads
    it with the restricted unpickler and refuses the payload, naming the global."""

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    for item in small.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    data = {"lmk_face_idx": np.zeros(51, np.int64), "lmk_b_coords": np.ones((51, 3)) / 3,
            "x": Payload()}
    (tmp_path / "flame_static_embedding.pkl").write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(UnsafePickleError, match="flame_static_embedding.pkl.*print"):
        FLAME(str(tmp_path))
    assert "payload ran" not in capsys.readouterr().out
    (tmp_path / "flame_static_embedding.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match="flame_static_embedding.pkl"):
        FLAME(str(tmp_path))


def test_model_file_and_synthetic_paths(small, recwarn):
    by_folder = FLAME(str(small), use_face_contour=True)
    by_file = FLAME(str(small / "FLAME_NEUTRAL.pkl"), use_face_contour=True)
    synthetic_layer = FLAME("synthetic-small", use_face_contour=True)
    values = {"global_orient": torch.tensor([[0.1, 0.5, 0.0]]), "betas": torch.ones(1, 6)}
    want = by_folder(**values).joints
    assert torch.equal(by_file(**values).joints, want)
    assert torch.equal(synthetic_layer(**values).joints, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_and_compile_fullgraph(small, backend):
    layer = FLAME(str(small), use_face_contour=True, backend=backend, batch_size=2)
    values = {k: v[:, : getattr(layer, k).shape[1]].requires_grad_()
              for k, v in _inputs(2, torch.float32, seed=12).items()}
    eager = layer(**values, return_full_pose=True)
    compiled = torch.compile(layer, fullgraph=True)(**values, return_full_pose=True)
    for name in FIELDS:
        if eager[name] is not None:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6)
    wrt = list(values.values())
    for a, b in zip(_grads(compiled, wrt), _grads(eager, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rotations = _rotations(2, torch.float32, seed=13)
    eager = layer(pose2rot=False, **rotations)
    compiled = torch.compile(layer, fullgraph=True)(pose2rot=False, **rotations)
    torch.testing.assert_close(compiled.joints, eager.joints, rtol=1e-5, atol=1e-6)


def test_gradcheck_small_float64(small):
    layer = FLAME(str(small), use_face_contour=True, dtype=torch.float64, backend="ext")
    values = {k: v[:, : getattr(layer, k).shape[1]].requires_grad_()
              for k, v in _inputs(2, torch.float64, seed=14).items()}
    names = list(values)

    def joints_and_vertices(*args):
        out = layer(**dict(zip(names, args)))
        return out.vertices, out.joints

    # fast mode: random projections of the Jacobian (the full one takes a backward per
    # output element)
    assert torch.autograd.gradcheck(joints_and_vertices, tuple(values.values()), fast_mode=True)
    # one identity for the batch: its columns blended once, from their own table
    values["betas"] = values["betas"][:1].detach().requires_grad_()
    assert torch.autograd.gradcheck(joints_and_vertices, tuple(values.values()), fast_mode=True)
    rotations = {k: v.requires_grad_() for k, v in _rotations(2, torch.float64, seed=15).items()}
    rot_names = list(rotations)

    def from_matrices(*args):
        return layer(pose2rot=False, **dict(zip(rot_names, args))).joints

    assert torch.autograd.gradcheck(from_matrices, tuple(rotations.values()), fast_mode=True)


def test_reset_params_and_pickling(small):
    layer = FLAME(str(small), batch_size=2, betas=torch.ones(2, 6))
    layer.reset_params(expression=np.full((2, 4), 0.5))
    assert torch.equal(layer.betas, torch.zeros(2, 6))
    assert torch.equal(layer.expression, torch.full((2, 4), 0.5))
    copy = pickle.loads(pickle.dumps(layer))
    assert torch.equal(copy().vertices, layer().vertices)
