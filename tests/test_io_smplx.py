"""flame_ext.io on smplx's FLAME folder: FLAME_<GENDER>.npz models, flame_static_embedding.pkl
(a pickled dict, read with the restricted unpickler) and flame_dynamic_embedding.npy (a
pickled dict behind an .npy header), their validation, and the synthetic writer of that
layout."""

import pickle
import re

import numpy as np
import pytest
import torch

from flame_ext import io as fio
from flame_ext import synthetic
from io_builders import assert_model_matches, model_raw, py2_pickle


def _bary(rng, *shape):
    b = rng.uniform(0.1, 1.0, shape + (3,))
    return b / b.sum(-1, keepdims=True)


def static_raw(seed=0, F=10, L=6):
    rng = np.random.default_rng(seed)
    return {"lmk_face_idx": rng.integers(0, F, L).astype(np.uint32), "lmk_b_coords": _bary(rng, L)}


def dynamic_raw(seed=0, F=10, NB=79, Ld=4, as_lists=False):
    rng = np.random.default_rng(seed)
    faces, bary = rng.integers(0, F, (NB, Ld)), _bary(rng, NB, Ld)
    if as_lists:  # one row per yaw bin, as lists of arrays
        return {"lmk_face_idx": list(faces), "lmk_b_coords": list(bary)}
    return {"lmk_face_idx": faces, "lmk_b_coords": bary}


def write_static(path, raw):
    path.write_bytes(py2_pickle(raw))
    return path


def write_dynamic(path, raw):
    np.save(path, raw, allow_pickle=True)
    return path


def test_static_embedding_python2_pickle(tmp_path):
    raw = static_raw(1)
    path = write_static(tmp_path / "flame_static_embedding.pkl", raw)
    for where in (path, tmp_path):  # the file, or the folder holding it
        emb = fio.load_static_embedding(where, num_faces=10)
        assert isinstance(emb, fio.StaticLandmarkEmbedding) and emb.source == str(path)
        np.testing.assert_array_equal(emb.lmk_faces_idx, raw["lmk_face_idx"].astype(np.int64))
        np.testing.assert_array_equal(emb.lmk_bary_coords, raw["lmk_b_coords"])
        assert emb.lmk_faces_idx.dtype == np.int64 and emb.lmk_bary_coords.dtype == np.float64


@pytest.mark.parametrize("form", ["arrays", "lists", "tensors"])
def test_dynamic_embedding_forms(tmp_path, form):
    raw = dynamic_raw(2, as_lists=form == "lists")
    if form == "tensors":
        raw = {k: torch.as_tensor(v) for k, v in raw.items()}
    path = write_dynamic(tmp_path / "flame_dynamic_embedding.npy", raw)
    emb = fio.load_dynamic_embedding(tmp_path, num_faces=10)
    assert isinstance(emb, fio.DynamicLandmarkEmbedding) and emb.source == str(path)
    want = dynamic_raw(2)
    np.testing.assert_array_equal(emb.lmk_faces_idx, want["lmk_face_idx"])
    np.testing.assert_array_equal(emb.lmk_bary_coords, want["lmk_b_coords"])
    assert emb.lmk_faces_idx.shape == (79, 4) and emb.lmk_bary_coords.shape == (79, 4, 3)


@pytest.mark.parametrize(
    "loader, name, raw, match",
    [
        ("static", "flame_static_embedding.pkl", {"lmk_face_idx": np.zeros(3, np.int64)},
         r"the static landmark embedding lacks \['lmk_b_coords'\]"),
        ("static", "flame_static_embedding.pkl",
         dict(static_raw(3), lmk_b_coords=np.ones((5, 3))), "lmk_bary_coords must have shape"),
        ("static", "flame_static_embedding.pkl",
         dict(static_raw(3), lmk_face_idx=-np.ones(6, np.int64)), "lmk_faces_idx holds a negative"),
        ("static", "flame_static_embedding.pkl",
         dict(static_raw(3), lmk_b_coords=np.full((6, 3), np.inf)), "holds 18 non-finite"),
        ("dynamic", "flame_dynamic_embedding.npy", dynamic_raw(4, NB=40),
         r"the contour table lmk_face_idx has 40 yaw bins \(shape \(40, 4\)\); it must have 79"),
        ("dynamic", "flame_dynamic_embedding.npy",
         {"lmk_face_idx": [np.zeros(4, np.int64)] * 78 + [np.zeros(3, np.int64)],
          "lmk_b_coords": dynamic_raw(4)["lmk_b_coords"]},
         "lmk_face_idx is a list that is not a rectangular array"),
        ("dynamic", "flame_dynamic_embedding.npy",
         dict(dynamic_raw(4), lmk_face_idx=np.ones((79, 4))),
         "lmk_face_idx must be an integer array, got dtype float64"),
    ],
)
def test_bad_embeddings_are_model_file_errors(tmp_path, loader, name, raw, match):
    path = tmp_path / name
    (write_static if loader == "static" else write_dynamic)(path, raw)
    load = fio.load_static_embedding if loader == "static" else fio.load_dynamic_embedding
    with pytest.raises(fio.ModelFileError, match=match) as info:
        load(path)
    assert str(info.value).startswith(str(path))


def test_embedding_faces_checked_against_the_mesh(tmp_path):
    raw = static_raw(5)
    raw["lmk_face_idx"][2] = 10
    path = write_static(tmp_path / "flame_static_embedding.pkl", raw)
    fio.load_static_embedding(path)  # no mesh to check against
    with pytest.raises(fio.ModelFileError, match="sits on face 10, but the model has only 10"):
        fio.load_static_embedding(path, num_faces=10)
    raw = dynamic_raw(5)
    raw["lmk_face_idx"][78, 3] = 12
    path = write_dynamic(tmp_path / "flame_dynamic_embedding.npy", raw)
    with pytest.raises(fio.ModelFileError, match="sits on face 12"):
        fio.load_dynamic_embedding(path, num_faces=12)


class _Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_embeddings_refuse_pickled_code(tmp_path, capsys):
    path = tmp_path / "flame_static_embedding.pkl"
    path.write_bytes(pickle.dumps(dict(static_raw(6), extra=_Payload()), protocol=2))
    with pytest.raises(fio.UnsafePickleError, match=re.escape(str(path)) + ".*refused.*print"):
        fio.load_static_embedding(path)
    path = tmp_path / "flame_dynamic_embedding.npy"
    write_dynamic(path, dict(dynamic_raw(6), extra=_Payload()))
    with pytest.raises(fio.UnsafePickleError, match="refused.*print"):
        fio.load_dynamic_embedding(path)
    assert "ran" not in capsys.readouterr().out


def test_embedding_arguments(tmp_path):
    write_static(tmp_path / "flame_static_embedding.pkl", static_raw(7))
    write_dynamic(tmp_path / "flame_dynamic_embedding.npy", dynamic_raw(7))
    with pytest.raises(fio.ModelFileError, match=r"flame_static_embedding.pkl is an \.pkl file"):
        fio.load_static_embedding(tmp_path / "flame_dynamic_embedding.npy")
    with pytest.raises(fio.ModelFileError, match=r"is an \.npy file"):
        fio.load_dynamic_embedding(tmp_path / "flame_static_embedding.pkl")
    with pytest.raises(TypeError, match="num_faces must be an int"):
        fio.load_static_embedding(tmp_path, num_faces="10")
    with pytest.raises(FileNotFoundError, match="missing.* does not exist"):
        fio.load_static_embedding(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        fio.load_dynamic_embedding(tmp_path / "empty")
    # a truncated pickle: a ModelFileError naming the file, not an unpickling traceback
    data = (tmp_path / "flame_static_embedding.pkl").read_bytes()
    (tmp_path / "flame_static_embedding.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(fio.ModelFileError, match="truncated or corrupt"):
        fio.load_static_embedding(tmp_path)


def test_flame_model_npz(tmp_path):
    """smplx's FLAME_<GENDER>.npz: the model's arrays (J_regressor dense), read without
    pickle; an object array (a pickled sparse matrix) is refused."""
    raw = model_raw(8)
    path = tmp_path / "FLAME_NEUTRAL.npz"
    np.savez(path, **raw)
    assert_model_matches(fio.load_flame_model(path), raw, path)
    sparse = np.empty((), dtype=object)
    np.savez(path, **dict(raw, J_regressor=sparse))
    with pytest.raises(fio.ModelFileError, match=r"\[J_regressor\]: is an object array"):
        fio.load_flame_model(path)


@pytest.mark.parametrize("ext", ["pkl", "npz"])
def test_synthetic_smplx_layout_matches_the_68_point_set(tmp_path, ext, recwarn):
    """write_smplx_assets: the model of write_assets, and the static / contour points of
    the 68-point embedding, in smplx's files; the loaders read the same from
    'synthetic-small'."""
    out = synthetic.write_smplx_assets(tmp_path, "small", 0, gender="female", ext=ext)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"FLAME_FEMALE.{ext}", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy"])
    model = fio.load_flame_model(out / f"FLAME_FEMALE.{ext}")
    mem = fio.load_flame_model("synthetic-small")
    for name in ("faces", "v_template", "shapedirs", "posedirs", "J_regressor", "parents",
                 "lbs_weights"):
        np.testing.assert_array_equal(getattr(model, name), getattr(mem, name), err_msg=name)
    assert (model.n_shape, model.n_expr) == (6, 4)
    full = fio.load_landmark_embedding("68", "synthetic-small")
    static = fio.load_static_embedding(out, num_faces=model.faces.shape[0])
    dynamic = fio.load_dynamic_embedding(out, num_faces=model.faces.shape[0])
    np.testing.assert_array_equal(static.lmk_faces_idx, full.static_lmk_faces_idx)
    np.testing.assert_array_equal(static.lmk_bary_coords, full.static_lmk_bary_coords)
    np.testing.assert_array_equal(dynamic.lmk_faces_idx, full.dynamic_lmk_faces_idx)
    np.testing.assert_array_equal(dynamic.lmk_bary_coords, full.dynamic_lmk_bary_coords)
    for load, disk in ((fio.load_static_embedding, static), (fio.load_dynamic_embedding, dynamic)):
        synth = load("synthetic-small")
        assert synth.source == "synthetic:small"
        np.testing.assert_array_equal(synth.lmk_faces_idx, disk.lmk_faces_idx)
        np.testing.assert_array_equal(synth.lmk_bary_coords, disk.lmk_bary_coords)


def test_synthetic_smplx_layout_arguments(tmp_path):
    with pytest.raises(ValueError, match="ext must be 'pkl' or 'npz'"):
        synthetic.write_smplx_assets(tmp_path, "small", ext="json")
    with pytest.raises(ValueError, match="chumpy=True .* only for ext='pkl'"):
        synthetic.write_smplx_assets(tmp_path, "small", ext="npz", chumpy=True)
    with pytest.raises(ValueError, match="gender must be a word"):
        synthetic.write_smplx_assets(tmp_path, "small", gender="../x")
    with pytest.raises(ValueError, match="kintree_dtype"):
        synthetic.write_smplx_assets(tmp_path, "small", kintree_dtype="int8")
