"""flame_ext.compat.deca (DECA's FLAME and FLAMETex) against DECA's behaviour, detail by detail.

DECA (decalib/models/FLAME.py) is not on PyPI, so its behaviour is checked piece by piece
against flame_ext's reference and against small independent computations in this file:
the buffers DECA registers (names, shapes, the column selection, the (1, 68) full set);
the neck pose fixed at the module's zero parameter; the default eye pose and pose; the
pose layout (global then jaw); landmarks2d as 17 contour points (DECA's rule: Rodrigues
rotations of the chain [1, 0], R_global @ R_neck, positive yaw) followed by the 51 static
ones; landmarks3d from the 68 full-set faces; the texture models (BFM's MU / PC as
stored, FLAME's mean / tex_dir divided by 255, reshaped to (B, 512, 512, 3), channels
first, nearest 256 x 256, channels reversed). The switch is tested on a stand-in decalib
package written to tmp_path.
"""

import importlib
import math
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

import flame_ext.compat
from flame_ext import (FlameLandmark, FlameShape, ModelFileError, load_flame_model,
                       load_landmark_embedding, synthetic)
from flame_ext.compat import _layer
from flame_ext.compat.deca import FLAME, FLAMETex

BACKENDS = ["ext", "reference"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return synthetic.write_assets(tmp_path_factory.mktemp("deca"), "small", 0)


def _config(assets, **overrides):
    values = dict(
        flame_model_path=str(assets / "generic_model.pkl"),
        flame_lmk_embedding_path=str(assets / "landmark_embedding.npy"),
        n_shape=6, n_exp=4, tex_type="BFM", tex_path=str(assets / "FLAME_albedo_from_BFM.npz"),
        flame_tex_path=str(assets / "FLAME_texture.npz"), n_tex=5,
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


def _params(batch, seed=0, dtype=torch.float32, scale=0.4):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    return rand(batch, 6), rand(batch, 4), rand(batch, 6, s=scale), rand(batch, 6, s=0.1)


def _reference(assets, dtype=torch.float32):
    shape = FlameShape(6, 4, device="cpu", model_path=assets, transforms="none",
                       backend="reference").to(dtype)
    lmk2d = FlameLandmark("68", "2d", "cpu", model_path=assets, contour_rule="deca",
                          backend="reference").to(dtype)
    lmk3d = FlameLandmark("68", "3d", "cpu", model_path=assets, backend="reference").to(dtype)
    return shape, lmk2d, lmk3d


def _expected(assets, shape_params, expr, pose, eye, neck=None, dtype=torch.float32):
    """DECA's forward from flame_ext's reference: the full pose is global, neck (zero),
    jaw, eyes; landmarks2d the 'deca' contour rule; landmarks3d the full 68."""
    shape, lmk2d, lmk3d = _reference(assets, dtype)
    batch = pose.shape[0]
    neck = torch.zeros(batch, 3, dtype=dtype) if neck is None else neck.expand(batch, -1)
    v, _ = shape(shape=shape_params, expr=expr, global_pose=pose[:, :3], neck_pose=neck,
                 jaw_pose=pose[:, 3:], eye_pose=eye)
    full_pose = torch.cat([pose[:, :3], neck, pose[:, 3:], eye], dim=1)
    return v, lmk2d(v, full_pose), lmk3d(v, full_pose)


# --------------------------------------------------------------------------------------
# FLAME: construction


def test_buffers_and_parameters_are_decas(assets):
    """DECA's names, shapes and dtypes; shapedirs = columns [:n_shape] and
    [n_model_shape : n_model_shape + n_exp]; posedirs (P, 3V); the full 68 set keeps the
    file's leading axis; eye_pose (1, 6) and neck_pose (1, 3) frozen zero parameters."""
    flame = FLAME(_config(assets, n_shape=3, n_exp=2))
    model = load_flame_model(assets)
    embedding = load_landmark_embedding("68", assets / "landmark_embedding.npy")
    state = flame.state_dict()
    assert list(state) == [
        "eye_pose", "neck_pose", "faces_tensor", "v_template", "shapedirs", "posedirs",
        "J_regressor", "parents", "lbs_weights", "lmk_faces_idx", "lmk_bary_coords",
        "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords", "full_lmk_faces_idx",
        "full_lmk_bary_coords", "neck_kin_chain"]
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    V = model.v_template.shape[0]
    expect = {
        "faces_tensor": torch.from_numpy(model.faces),
        "v_template": f32(model.v_template),
        "shapedirs": f32(np.concatenate([model.shapedirs[:, :, :3], model.shapedirs[:, :, 6:8]],
                                        axis=2)),
        "posedirs": f32(model.posedirs.reshape(3 * V, -1).T),
        "J_regressor": f32(model.J_regressor),
        "parents": torch.tensor([-1, 0, 1, 1, 1]),
        "lbs_weights": f32(model.lbs_weights),
        "lmk_faces_idx": torch.from_numpy(embedding.static_lmk_faces_idx),
        "lmk_bary_coords": f32(embedding.static_lmk_bary_coords),
        "dynamic_lmk_faces_idx": torch.from_numpy(embedding.dynamic_lmk_faces_idx),
        "dynamic_lmk_bary_coords": f32(embedding.dynamic_lmk_bary_coords),
        "full_lmk_faces_idx": torch.from_numpy(embedding.full_lmk_faces_idx)[None],
        "full_lmk_bary_coords": f32(embedding.full_lmk_bary_coords)[None],
        "neck_kin_chain": torch.tensor([1, 0]),
        "eye_pose": torch.zeros(1, 6), "neck_pose": torch.zeros(1, 3),
    }
    for name, value in expect.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert state["full_lmk_faces_idx"].shape == (1, 68)
    assert state["shapedirs"].shape == (V, 3, 5) and state["posedirs"].shape == (36, 3 * V)
    assert not flame.eye_pose.requires_grad and not flame.neck_pose.requires_grad
    assert flame.dtype == torch.float32
    # strict round trip, into a fresh module
    fresh = FLAME(_config(assets, n_shape=3, n_exp=2))
    fresh.load_state_dict(state)


@pytest.mark.parametrize("key", ["faces_tensor", "parents", "lmk_faces_idx",
                                 "dynamic_lmk_faces_idx", "full_lmk_faces_idx"])
def test_a_bad_index_table_is_refused_at_load(assets, key):
    flame = FLAME(_config(assets))
    state = {k: v.clone() for k, v in flame.state_dict().items()}
    state[key].view(-1)[-1] = 10**6
    with pytest.raises(ValueError, match=repr(key)):
        flame.load_state_dict(state)
    assert flame.state_dict()[key].max() < 10**6


def test_config_may_be_a_dict_and_errors_name_the_entry(assets):
    as_dict = vars(_config(assets))
    FLAME(as_dict)
    with pytest.raises(ValueError, match="the config has no 'n_exp'"):
        FLAME({k: v for k, v in as_dict.items() if k != "n_exp"})
    with pytest.raises(ValueError, match=r"config.n_shape must be in \[0, 6\], got 300"):
        FLAME(_config(assets, n_shape=300))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        FLAME(_config(assets, flame_lmk_embedding_path=str(assets / "missing.npy")))
    with pytest.raises(ModelFileError, match="reads an .npy file"):
        FLAME(_config(assets, flame_lmk_embedding_path=str(assets / "FLAME_texture.npz")))
    with pytest.raises(ValueError, match="backend must be one of"):
        FLAME(_config(assets), backend="medusa")


# --------------------------------------------------------------------------------------
# FLAME: forward


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_is_decas(assets, backend):
    flame = FLAME(_config(assets), backend=backend)
    shape_params, expr, pose, eye = _params(8, seed=1)
    vertices, landmarks2d, landmarks3d = flame(shape_params, expr, pose, eye)
    want = _expected(assets, shape_params, expr, pose, eye)
    assert vertices.shape == (8, 67, 3)
    assert landmarks2d.shape == landmarks3d.shape == (8, 68, 3)
    for got, expect, name in zip((vertices, landmarks2d, landmarks3d), want,
                                 ("vertices", "landmarks2d", "landmarks3d")):
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=2e-6, msg=name)
    torch.testing.assert_close(flame.seletec_3d68(vertices), landmarks3d, rtol=0, atol=0)


def _deca_bins(pose):
    """DECA's contour bin, computed independently: Rodrigues of global and neck (zero),
    rel = R_global @ R_neck, yaw = atan2(-rel[2, 0], hypot(rel[0, 0], rel[1, 0])) in
    degrees, clamped above at 39, rounded; bins 0..39 for yaw >= 0, 39 - yaw for
    -39 <= yaw < 0, 78 below."""
    bins = []
    for g in pose[:, :3].double().numpy():
        angle = np.linalg.norm(g + 1e-8)
        k = g / angle
        K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rel = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K  # @ I (neck)
        yaw = math.degrees(math.atan2(-rel[2, 0], math.hypot(rel[0, 0], rel[1, 0])))
        y = int(np.round(min(yaw, 39.0)))
        bins.append(y if y >= 0 else (39 - y if y >= -39 else 78))
    return bins


def test_landmarks2d_contour_then_static_with_decas_rule(assets):
    """Yaw swept from -60 to 60 degrees in steps of one: the first 17 landmarks are the barycentric
    points of the bin DECA's rule picks, the next 51 the static ones, computed here from
    the buffers with numpy."""
    flame = FLAME(_config(assets), backend="ext")
    batch = 121
    shape_params, expr, pose, eye = _params(batch, seed=2)
    yaw = torch.linspace(-60, 60, batch) * math.pi / 180
    pose[:, :3] = torch.stack([0.05 * torch.ones(batch), yaw, -0.05 * torch.ones(batch)], 1)
    vertices, landmarks2d, _ = flame(shape_params, expr, pose, eye)
    bins = _deca_bins(pose)
    assert len(set(bins)) == 79  # every bin: both signs, the clamp and the last bin
    v, faces = vertices.double().numpy(), flame.faces_tensor.numpy()

    def points(face_idx, bary, b):
        return np.einsum("lk,lkc->lc", bary, v[b][faces[face_idx]])

    for b, bin_ in enumerate(bins):
        contour = points(flame.dynamic_lmk_faces_idx[bin_].numpy(),
                         flame.dynamic_lmk_bary_coords[bin_].double().numpy(), b)
        static = points(flame.lmk_faces_idx.numpy(), flame.lmk_bary_coords.double().numpy(), b)
        np.testing.assert_allclose(landmarks2d[b].double().numpy(),
                                   np.concatenate([contour, static]), atol=2e-6)


def test_defaults_neck_and_eye_pose(assets):
    """pose_params None: DECA takes the eye-pose parameter (zeros) as the pose; eye pose
    None: the eye-pose parameter; the neck is the neck-pose parameter, in the skinning and
    in the contour bin."""
    flame = FLAME(_config(assets))
    shape_params, expr, pose, eye = _params(3, seed=3)
    zeros = torch.zeros(3, 6)
    want_default = _expected(assets, shape_params, expr, zeros, zeros)
    for got, want in zip(flame(shape_params, expr), want_default):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    for got, want in zip(flame(shape_params, expr, pose),
                         _expected(assets, shape_params, expr, pose, zeros)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    with torch.no_grad():
        flame.neck_pose.copy_(torch.tensor([[0.0, 0.6, 0.0]]))
        flame.eye_pose.copy_(torch.full((1, 6), 0.05))
    neck = flame.neck_pose.detach()
    eyes = torch.full((3, 6), 0.05)
    got = flame(shape_params, expr, pose)
    want = _expected(assets, shape_params, expr, pose, eyes, neck=neck)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    # the neck turns the head: another contour than without it
    without_neck = _expected(assets, shape_params, expr, pose, eyes)[1]
    assert not torch.allclose(got[1][:, :17], without_neck[:, :17])


def test_batch_one_identity_broadcasts(assets):
    """Beyond DECA: one shape row for many frames (blended once) is the same as repeating it."""
    flame = FLAME(_config(assets))
    shape_params, expr, pose, eye = _params(5, seed=4)
    one = flame(shape_params[:1], expr, pose, eye)
    repeated = flame(shape_params[:1].expand(5, -1), expr, pose, eye)
    for a, b in zip(one, repeated):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expression_params has batch size 4 but the batch size"):
        flame(shape_params, expr[:4], pose, eye)
    with pytest.raises(TypeError, match="shape_params is required"):
        flame(None, expr)
    with pytest.raises(ValueError, match=r"pose_params must have shape \(\*, 6\)"):
        flame(shape_params, expr, pose[:, :3])
    with pytest.raises(TypeError, match="has dtype torch.float64"):
        flame(shape_params.double(), expr, pose, eye)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_the_reference(assets, backend):
    flame = FLAME(_config(assets), backend=backend).double()
    inputs = [t.requires_grad_() for t in _params(4, seed=5, dtype=torch.float64)]
    outputs = flame(*inputs)
    expected = _expected(assets, *inputs, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]
    got = torch.autograd.grad(outputs, inputs, upstream)
    want = torch.autograd.grad(expected, inputs, upstream)
    for a, b, name in zip(got, want, ("shape", "expression", "pose", "eye_pose")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for a, b in zip(outputs, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def decoded(*args):
        return flame(*args)

    assert torch.autograd.gradcheck(decoded, tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_follow_their_buffers(assets, backend):
    """The joint basis follows the buffers: a v_template written in place is read at the
    next call, and one that requires grad gets the reference's gradient (the joints'
    path included)."""
    from flame_ext import reference

    flame = FLAME(_config(assets), backend=backend).double()
    shape, expression, pose, _ = _params(2, seed=7, dtype=torch.float64)
    flame(shape, expression, pose)
    flame.v_template.add_(0.05)
    flame.v_template.requires_grad_(True)
    v, _, _ = flame(shape, expression, pose)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    full_pose = torch.cat([pose[:, :3], zeros, pose[:, 3:], zeros, zeros], dim=1)
    want, _ = reference.lbs(torch.cat([shape, expression], 1), full_pose, flame.v_template,
                            flame.shapedirs, flame.posedirs, flame.J_regressor, flame.parents,
                            flame.lbs_weights)
    torch.testing.assert_close(v, want, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(v.square().sum(), flame.v_template)[0]
    expected = torch.autograd.grad(want.square().sum(), flame.v_template)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_torch_func_grad_and_vmap(assets):
    """With the default backend the layer composes with torch.func: grad equals eager
    autograd through the ops, vmap over single frames equals the batched call."""
    flame = FLAME(_config(assets)).double()
    inputs = _params(3, seed=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in flame(*inputs)]

    def loss(*args):
        return sum((u * o).sum() for u, o in zip(upstream, flame(*args)))

    leaves = [t.clone().requires_grad_() for t in inputs]
    # the eager gradient through the ops, the transformed one through the reference
    assert _layer.steps(flame.backend, torch.device("cpu")).lbs is not _layer.steps(
        "reference", torch.device("cpu")).lbs
    want = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    mapped = torch.func.vmap(lambda *a: flame(*(t[None] for t in a))[0][0])(*inputs)
    torch.testing.assert_close(mapped, flame(*inputs)[0], rtol=1e-12, atol=1e-12)


def test_compile_fullgraph(assets):
    """On the compiled ops (their fake kernels and registered autograd)."""
    flame = FLAME(_config(assets), backend="ext")
    inputs = [t.requires_grad_() for t in _params(3, seed=7)]
    eager = flame(*inputs)
    compiled = torch.compile(flame, fullgraph=True)(*inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(sum(o.sum() for o in compiled), inputs)
    want = torch.autograd.grad(sum(o.sum() for o in eager), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu(assets):
    flame = FLAME(_config(assets))
    inputs = _params(16, seed=8)
    on_gpu = flame.to("cuda")(*[t.cuda() for t in inputs])
    on_cpu = FLAME(_config(assets))(*inputs)
    for a, b in zip(on_gpu, on_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------
# FLAMETex


def _deca_texture(mean, basis, code, size):
    """DECA's texture, computed here: mean + basis . code, reshaped (B, size, size, 3),
    channels first, nearest 256 x 256 (source index floor(i * size / 256)), channels
    reversed."""
    image = (mean[None] + code @ basis.T).reshape(code.shape[0], size, size, 3)
    image = np.transpose(image, (0, 3, 1, 2))
    index = np.arange(256) * size // 256
    return image[:, :, index][:, :, :, index][:, ::-1]


@pytest.fixture(scope="module")
def textures512(tmp_path_factory):
    """Full-size (512 x 512) texture files, as DECA's hard-coded reshape expects: BFM flat
    and image-shaped, and FLAME's."""
    out = tmp_path_factory.mktemp("tex")
    assets = synthetic.build_assets("full", 0, n_tex=3)
    bfm = assets["FLAME_albedo_from_BFM.npz"]
    np.savez(out / "FLAME_albedo_from_BFM.npz", **bfm)
    (out / "image").mkdir()
    np.savez(out / "image" / "FLAME_albedo_from_BFM.npz", MU=bfm["MU"].reshape(512, 512, 3),
             PC=bfm["PC"].reshape(512, 512, 3, -1))
    np.savez(out / "FLAME_texture.npz", **assets["FLAME_texture.npz"])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["BFM", "BFM-image", "FLAME"])
def test_flametex_is_decas(textures512, kind, backend):
    if kind == "FLAME":
        path, keys, divisor = textures512 / "FLAME_texture.npz", ("mean", "tex_dir"), 255.0
    else:
        folder = textures512 / "image" if kind == "BFM-image" else textures512
        path, keys, divisor = folder / "FLAME_albedo_from_BFM.npz", ("MU", "PC"), 1.0
    tex_type = kind.split("-")[0]
    config = types.SimpleNamespace(tex_type=tex_type, tex_path=str(path),
                                   flame_tex_path=str(path), n_tex=2)
    tex = FLAMETex(config, backend=backend)
    with np.load(path) as data:
        mean = data[keys[0]].reshape(-1) / divisor
        basis = data[keys[1]].reshape(mean.size, -1)[:, :2] / divisor
    assert tex.texture_mean.shape == (1, 1, 512 * 512 * 3)
    assert tex.texture_basis.shape == (1, 512 * 512 * 3, 2)
    np.testing.assert_allclose(tex.texture_mean.numpy().reshape(-1), mean, rtol=1e-6)
    np.testing.assert_allclose(tex.texture_basis.numpy()[0], basis, rtol=1e-6, atol=1e-9)
    code = torch.randn(3, 2, generator=torch.Generator().manual_seed(9))
    out = tex(code)
    assert out.shape == (3, 3, 256, 256)
    want = _deca_texture(tex.texture_mean.double().numpy()[0, 0],
                         tex.texture_basis.double().numpy()[0], code.double().numpy(), 512)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_flametex_config(textures512, tmp_path):
    bfm = textures512 / "FLAME_albedo_from_BFM.npz"
    flame_tex = textures512 / "FLAME_texture.npz"
    with pytest.raises(ModelFileError, match=r"tex_type='BFM' reads MU and PC.*tex_type='FLAME'"):
        FLAMETex(types.SimpleNamespace(tex_type="BFM", tex_path=str(flame_tex), n_tex=2))
    with pytest.raises(ModelFileError, match=r"tex_type='FLAME' reads mean and tex_dir"):
        FLAMETex(types.SimpleNamespace(tex_type="FLAME", flame_tex_path=str(bfm), n_tex=2))
    with pytest.raises(ValueError, match="texture type 'PCA' does not exist"):
        FLAMETex(types.SimpleNamespace(tex_type="PCA", n_tex=2))
    with pytest.raises(ValueError, match="the config has no 'flame_tex_path'"):
        FLAMETex(types.SimpleNamespace(tex_type="FLAME", tex_path=str(bfm), n_tex=2))
    with pytest.raises(FileNotFoundError, match="config.tex_path"):
        FLAMETex(types.SimpleNamespace(tex_type="BFM", tex_path=str(tmp_path / "x.npz"), n_tex=2))
    with pytest.raises(ValueError, match="n_tex must be in"):
        FLAMETex(types.SimpleNamespace(tex_type="BFM", tex_path=str(bfm), n_tex=4))
    # a directory: the file of the type's usual name in it
    tex = FLAMETex({"tex_type": "FLAME", "flame_tex_path": str(textures512), "n_tex": 1})
    assert tex.n_tex == 1


# --------------------------------------------------------------------------------------
# The switch, on a stand-in decalib


DECA_FLAME = """
    class FLAME:
        origin = "deca"
        def __init__(self, config):
            raise AssertionError("DECA's FLAME ran")

    class FLAMETex:
        origin = "deca"
"""

DECA_MAIN = """
    from .models.FLAME import FLAME, FLAMETex

    def build(config):
        return FLAME(config), FLAMETex(config)
"""


def _write(root, relative, text=""):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _forget(prefixes):
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


@pytest.fixture
def decalib(tmp_path, monkeypatch):
    for package in ("decalib", "decalib/models", "gdl", "gdl/models"):
        _write(tmp_path, f"{package}/__init__.py")
    _write(tmp_path, "decalib/models/FLAME.py", DECA_FLAME)
    _write(tmp_path, "decalib/deca.py", DECA_MAIN)
    _write(tmp_path, "gdl/models/DecaFLAME.py", DECA_FLAME)
    importlib.invalidate_caches()
    _forget(["decalib", "gdl"])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    flame_ext.compat.unpatch_deca()
    flame_ext.compat.unpatch_deca(module="gdl.models.DecaFLAME")
    _forget(["decalib", "gdl"])


def test_patch_deca_swaps_both_classes(decalib, assets, textures512):
    deca = importlib.import_module("decalib.deca")  # imported the classes by name
    models = importlib.import_module("decalib.models.FLAME")
    original = models.FLAME
    config = _config(assets, tex_path=str(textures512 / "FLAME_albedo_from_BFM.npz"), n_tex=2)
    with flame_ext.compat.patched_deca() as originals:
        assert originals == {"FLAME": original, "FLAMETex": originals["FLAMETex"]}
        assert models.FLAME is FLAME and deca.FLAME is FLAME and deca.FLAMETex is FLAMETex
        flame, tex = deca.build(config)
        assert isinstance(flame, FLAME) and isinstance(tex, FLAMETex)
    assert models.FLAME is original and deca.FLAME is original
    with pytest.raises(AssertionError, match="DECA's FLAME ran"):
        deca.build(config)
    # another copy of DECA's module (EMOCA's), named explicitly
    flame_ext.compat.patch_deca(module="gdl.models.DecaFLAME")
    emoca = importlib.import_module("gdl.models.DecaFLAME")
    assert emoca.FLAME is FLAME and models.FLAME is original
    assert flame_ext.compat.unpatch_deca(module="gdl.models.DecaFLAME")
    assert emoca.FLAME is not FLAME and not flame_ext.compat.unpatch_deca()


def test_patch_deca_without_decalib(monkeypatch):
    _forget(["decalib"])
    monkeypatch.setitem(sys.modules, "decalib", None)
    with pytest.raises(ImportError, match=r"decalib.models.FLAME is not importable.*not on PyPI"):
        flame_ext.compat.patch_deca()
    with pytest.raises(ImportError, match="is not importable"):
        with flame_ext.compat.patched_deca():
            pass
    with pytest.raises(TypeError, match="module must be a module name"):
        flame_ext.compat.patch_deca(module="")
