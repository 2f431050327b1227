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
