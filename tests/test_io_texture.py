"""flame_ext.io on the albedo texture spaces: FLAME_albedo_from_BFM.npz (MU / PC) and
FLAME_texture.npz (mean / tex_dir), flat and image-shaped, n_tex bounds, validation."""

import re

import numpy as np
import pytest

import flame_ext
from flame_ext import io as fio
from io_builders import texture_arrays, write_asset_dir


# --------------------------------------------------------------------------------------
# Textures


def _expected_texture(mean, basis, n_tex, divisor):
    """Divided in float64, then rounded once to float32."""
    P = basis.shape[-1]
    return (
        (mean.reshape(-1).astype(np.float64) / divisor).astype(np.float32),
        (basis.reshape(-1, P)[:, :n_tex].astype(np.float64) / divisor).astype(np.float32),
    )


@pytest.mark.parametrize("layout", ["flat", "image", "mixed"])
@pytest.mark.parametrize("fmt", ["bfm", "flame"])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_texture_formats(tmp_path, monkeypatch, layout, fmt, small_chunks):
    if small_chunks:  # several chunks, ending in a partial one
        monkeypatch.setattr(fio.parsers, "_CHUNK_BYTES", 7 * 6 * 3 * 5 * 8)
    mean, basis = texture_arrays(30, H=8, W=8, P=5, flame_format=fmt == "flame")
    if fmt == "flame":
        basis = basis.astype(np.float32)  # the published FLAME_texture.npz stores float32
    if layout in ("flat", "mixed"):
        basis = basis.reshape(-1, 5)
    if layout == "flat":
        mean = mean.reshape(-1)
    keys = ("MU", "PC") if fmt == "bfm" else ("mean", "tex_dir")
    path = tmp_path / "tex.npz"
    np.savez(path, **{keys[0]: mean, keys[1]: basis, "vt": np.zeros((3, 2))})
    tex = fio.load_texture_space(path, n_tex=3)
    want_mean, want_basis = _expected_texture(mean, basis, 3, 255.0 if fmt == "flame" else 1.0)
    assert (tex.height, tex.width, tex.n_tex, tex.source) == (8, 8, 3, str(path))
    assert tex.mean.dtype == np.float32 and tex.basis.dtype == np.float32
    np.testing.assert_array_equal(tex.mean, want_mean)
    np.testing.assert_array_equal(tex.basis, want_basis)
    if fmt == "flame":
        assert tex.mean.max() <= 1.0


def test_texture_non_square_image_and_fortran_order(tmp_path):
    mean, basis = texture_arrays(31, H=4, W=6, P=3)
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(path, MU=mean, PC=np.asfortranarray(basis))
    tex = fio.load_texture_space(path, n_tex=3)
    assert (tex.height, tex.width) == (4, 6)
    np.testing.assert_array_equal(tex.basis, _expected_texture(mean, basis, 3, 1.0)[1])


def test_texture_in_memory_matches_file(tmp_path):
    mean, basis = texture_arrays(32, P=4)
    raw = {"MU": mean.reshape(-1), "PC": basis.reshape(-1, 4)}
    path = tmp_path / "t.npz"
    np.savez(path, **raw)
    a = fio.parse_texture_space(raw, "mem", n_tex=4)
    b = fio.load_texture_space(path, n_tex=4)
    np.testing.assert_array_equal(a.basis, b.basis)
    np.testing.assert_array_equal(a.mean, b.mean)


@pytest.mark.parametrize("n_tex", [6, -1, 100])
def test_n_tex_out_of_range(tmp_path, n_tex):
    write_asset_dir(tmp_path)
    with pytest.raises(ValueError, match=rf"n_tex must be in \[0, P = 5\].*got n_tex = {n_tex}"):
        fio.load_texture_space(tmp_path, n_tex=n_tex)


@pytest.mark.parametrize("n_tex", [2.0, "3", True, None])
def test_n_tex_not_int(tmp_path, n_tex):
    write_asset_dir(tmp_path)
    with pytest.raises(TypeError, match=r"n_tex must be an int.*P = 5"):
        fio.load_texture_space(tmp_path, n_tex=n_tex)


def test_n_tex_bounds_inclusive(tmp_path):
    write_asset_dir(tmp_path)
    assert fio.load_texture_space(tmp_path, n_tex=5).n_tex == 5
    assert fio.load_texture_space(tmp_path, n_tex=0).basis.shape == (6 * 6 * 3, 0)
    np.savez(tmp_path / "no_components.npz", MU=np.ones(48), PC=np.ones((48, 0)))
    assert fio.load_texture_space(tmp_path / "no_components.npz", n_tex=0).n_tex == 0


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"MU": np.zeros(12 * 3), "PC": np.zeros((12 * 3, 2))}, "not H\\*W\\*3 for a square"),
        ({"MU": np.zeros(30), "PC": np.zeros((36, 2))}, "disagree on H\\*W\\*3"),
        ({"MU": np.zeros((4, 4, 3)), "PC": np.zeros((4, 5, 3, 2))}, "disagree on H, W"),
        ({"MU": np.zeros((4, 4, 3)), "PC": np.zeros((4, 4, 3, 2, 1))}, "PC must have shape"),
        ({"mean": np.zeros(48)}, "needs MU and PC .* or mean and tex_dir"),
        ({"MU": np.full(48, np.nan), "PC": np.zeros((48, 2))}, "mean holds 48 non-finite"),
        ({"MU": np.zeros(48), "PC": np.full((48, 2), np.inf)}, "basis holds 48 non-finite"),
    ],
)
def test_bad_texture(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(fio.ModelFileError, match=match):
        fio.load_texture_space(path, n_tex=1)


def test_texture_directory_prefers_bfm(tmp_path):
    write_asset_dir(tmp_path)
    mean, basis = texture_arrays(33, flame_format=True)
    np.savez(tmp_path / "FLAME_texture.npz", mean=mean, tex_dir=basis)
    assert fio.load_texture_space(tmp_path, n_tex=1).source.endswith("FLAME_albedo_from_BFM.npz")
    (tmp_path / "FLAME_albedo_from_BFM.npz").unlink()
    assert fio.load_texture_space(tmp_path, n_tex=1).source.endswith("FLAME_texture.npz")
    # a model .pkl path is not a texture file, even with one beside it
    model = tmp_path / "generic_model.pkl"
    with pytest.raises(fio.ModelFileError, match=rf"{re.escape(str(model))}: not a texture"):
        fio.load_texture_space(model, 1)


# --------------------------------------------------------------------------------------
# A path that names a file is that file: never a texture found beside it


# What a test names -> a file that is not a texture space, in a directory that holds one.
NOT_TEXTURES = {
    "the FLAME model pickle": "generic_model.pkl",
    "another pickle": "anything.pkl",
    "the MediaPipe embedding": "mediapipe_landmark_embedding.npz",
    "an npz without MU/PC or mean/tex_dir": "other.npz",
    "the 68-landmark embedding": "landmark_embedding.npy",
}


@pytest.fixture
def beside_a_texture(tmp_path):
    write_asset_dir(tmp_path)
    (tmp_path / "anything.pkl").write_bytes((tmp_path / "generic_model.pkl").read_bytes())
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    return tmp_path


@pytest.mark.parametrize("what", sorted(NOT_TEXTURES))
def test_texture_path_naming_another_file_is_refused(beside_a_texture, what):
    path = beside_a_texture / NOT_TEXTURES[what]
    for load in (lambda: fio.load_texture_space(path, n_tex=1),
                 lambda: flame_ext.FlameTex(model_path=path, n_tex=1),
                 lambda: flame_ext.FlameTex(model_path=str(path), n_tex=1)):
        with pytest.raises(fio.ModelFileError, match=re.escape(str(path))) as info:
            load()
        assert "FLAME_albedo_from_BFM.npz:" not in str(info.value)


def test_texture_path_refusal_says_what_to_pass(beside_a_texture):
    model = beside_a_texture / "generic_model.pkl"
    with pytest.raises(fio.ModelFileError) as info:
        flame_ext.FlameTex(model_path=model, n_tex=1)
    message = str(info.value)
    assert message.startswith(f"{model}: not a texture model")
    assert "FLAME_albedo_from_BFM.npz" in message and "directory" in message


def test_texture_path_naming_a_texture_or_directory_loads(beside_a_texture):
    bfm = beside_a_texture / "FLAME_albedo_from_BFM.npz"
    assert fio.load_texture_space(bfm, n_tex=2).source == str(bfm)
    assert flame_ext.FlameTex(model_path=beside_a_texture, n_tex=2).n_tex == 2
    with pytest.raises(FileNotFoundError, match=re.escape(str(beside_a_texture / "no.npz"))):
        flame_ext.FlameTex(model_path=beside_a_texture / "no.npz", n_tex=1)


def test_texture_beside_a_model_is_found_through_its_directory(beside_a_texture):
    """Callers that hold a FLAME model path (render, bench) ask for the texture in the
    model's directory explicitly."""
    model = beside_a_texture / "generic_model.pkl"
    where = fio.discovery._texture_location(model)
    assert where == beside_a_texture
    assert fio.load_texture_space(where, n_tex=1).source == str(
        beside_a_texture / "FLAME_albedo_from_BFM.npz")
    for other in (None, "synthetic-small", beside_a_texture):
        assert fio.discovery._texture_location(other) == other


# --------------------------------------------------------------------------------------
# AlbedoMM (albedoModel2020_FLAME_albedoPart.npz): MU / PC plus specMU / specPC


def _albedomm_arrays(H=8, W=8, P=5, dtype=np.float32, seed=40):
    """Arrays in the published file's layout: image-shaped (H,W,3) / (H,W,3,P), 0..1."""
    rng = np.random.default_rng(seed)
    return {
        "MU": rng.uniform(0.2, 0.8, (H, W, 3)).astype(dtype),
        "PC": rng.normal(0, 0.05, (H, W, 3, P)).astype(dtype),
        "specMU": rng.uniform(0.05, 0.3, (H, W, 3)).astype(dtype),
        "specPC": rng.normal(0, 0.02, (H, W, 3, P)).astype(dtype),
        "vt": rng.uniform(0, 1, (11, 2)),
        "ft": rng.integers(0, 11, (7, 3)),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flat", [False, True])
def test_albedomm_file_loads_both_parts(tmp_path, dtype, flat):
    arrays = _albedomm_arrays(dtype=dtype)
    if flat:
        arrays = {k: (v.reshape(-1, *v.shape[3:]) if k in ("MU", "PC", "specMU", "specPC")
                      else v) for k, v in arrays.items()}
    path = tmp_path / "albedoModel2020_FLAME_albedoPart.npz"
    np.savez(path, **arrays)
    tex = fio.load_texture_space(path, n_tex=4, specular=True)
    assert (tex.height, tex.width, tex.n_tex) == (8, 8, 4)
    for got, key in ((tex.mean, "MU"), (tex.basis, "PC"), (tex.specular_mean, "specMU"),
                     (tex.specular_basis, "specPC")):
        want = arrays[key].reshape(192, -1)[:, :4] if key.endswith("PC") else \
            arrays[key].reshape(-1)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))  # 0..1: not divided
    diffuse_only = fio.load_texture_space(path, n_tex=4)
    assert diffuse_only.specular_mean is None and diffuse_only.specular_basis is None
    np.testing.assert_array_equal(diffuse_only.basis, tex.basis)


def test_specular_directory_prefers_albedomm(tmp_path):
    np.savez(tmp_path / "albedoModel2020_FLAME_albedoPart.npz", **_albedomm_arrays())
    mean, basis = texture_arrays(30, H=8, W=8, P=5)
    np.savez(tmp_path / "FLAME_albedo_from_BFM.npz", MU=mean, PC=basis)
    assert fio.load_texture_space(tmp_path, 3, specular=True).source.endswith(
        "albedoModel2020_FLAME_albedoPart.npz")
    # the default keeps the BFM-first discovery
    assert fio.load_texture_space(tmp_path, 3).source.endswith("FLAME_albedo_from_BFM.npz")


@pytest.mark.parametrize("name", ["FLAME_albedo_from_BFM.npz", "FLAME_texture.npz"])
def test_specular_on_a_file_without_it_names_the_file(tmp_path, name):
    mean, basis = texture_arrays(30, H=8, W=8, P=5, flame_format=name == "FLAME_texture.npz")
    keys = ("MU", "PC") if "BFM" in name else ("mean", "tex_dir")
    path = tmp_path / name
    np.savez(path, **{keys[0]: mean, keys[1]: basis})
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        fio.load_texture_space(path, 3, specular=True)
    assert "model_path" in str(info.value) and "specMU" in str(info.value)


@pytest.mark.parametrize("how, key", [
    ("drop", "specPC"), ("drop", "specMU"),
    ("shape", "specPC"), ("shape", "specMU"), ("components", "specPC"),
    ("dtype", "specPC"), ("dtype", "specMU"), ("nan", "specPC"),
])
def test_malformed_albedomm_is_refused_when_loaded(tmp_path, how, key):
    arrays = _albedomm_arrays()
    if how == "drop":
        del arrays[key]
    elif how == "shape":
        arrays[key] = arrays[key][:4]
    elif how == "components":
        arrays[key] = arrays[key][..., :3]
    elif how == "dtype":
        arrays[key] = arrays[key].astype(str)
    else:
        arrays[key] = arrays[key].copy()
        arrays[key][1, 2, 0, 1] = np.nan
    path = tmp_path / "albedoModel2020_FLAME_albedoPart.npz"
    np.savez(path, **arrays)
    # structure is checked on every load; values (NaN) where they are read
    specular_flags = (True,) if how == "nan" else (False, True)
    for specular in specular_flags:
        with pytest.raises((flame_ext.ModelFileError, TypeError)) as info:
            fio.load_texture_space(path, 3, specular=specular)
        message = str(info.value)
        assert str(path) in message and (key in message or "specular" in message), message


def test_specular_with_trust_keys_is_refused(tmp_path):
    mean, basis = texture_arrays(30, H=8, W=8, P=5, flame_format=True)
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, mean=mean, tex_dir=basis, specMU=mean, specPC=basis)
    with pytest.raises(flame_ext.ModelFileError, match="specMU"):
        fio.load_texture_space(path, 3)


@pytest.mark.parametrize("P", [1, 7, 200, 237])
def test_trust_style_files_with_any_component_count(tmp_path, P):
    """mean / tex_dir files (FLAME_texture.npz and TRUST-style ones) of any component
    count keep medusa's rule: values on 0..255, divided by 255."""
    rng = np.random.default_rng(P)
    mean = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    tex_dir = rng.normal(0, 20, (4, 4, 3, P)).astype(np.float32)
    path = tmp_path / "tex.npz"
    np.savez(path, mean=mean, tex_dir=tex_dir)
    tex = fio.load_texture_space(path, n_tex=P)
    want_mean, want_basis = _expected_texture(mean, tex_dir, P, 255.0)
    np.testing.assert_array_equal(tex.mean, want_mean)
    np.testing.assert_array_equal(tex.basis, want_basis)


def test_specular_flag_is_checked(tmp_path):
    with pytest.raises(TypeError, match="specular"):
        fio.parsers.parse_texture_space(_albedomm_arrays(), "x", 3, specular="yes")


def test_synthetic_albedomm_is_in_the_published_layout():
    from flame_ext import synthetic

    raw = synthetic.build_assets("small", 0)["albedoModel2020_FLAME_albedoPart.npz"]
    assert raw["MU"].shape == raw["specMU"].shape == (8, 8, 3)
    assert raw["PC"].shape == raw["specPC"].shape == (8, 8, 3, 7)
    assert raw["MU"].dtype == np.float32
    assert 0 < raw["MU"].min() and raw["MU"].max() < 1
    assert not np.array_equal(raw["PC"], raw["specPC"])
    tex = fio.load_texture_space("synthetic-small", 7, specular=True)
    assert tex.source == "synthetic:small" and tex.n_tex == 7
    np.testing.assert_array_equal(tex.specular_basis, raw["specPC"].reshape(192, 7))
