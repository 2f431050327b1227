"""flame_ext.io on the landmark embeddings: landmark_embedding.npy (numpy arrays and
torch tensors, Python 2 pickles) and mediapipe_landmark_embedding.npz, their validation
and the face-index check against the mesh."""

import pickle
import re

import numpy as np
import pytest
import torch

from flame_ext import io as fio
from io_builders import lmk68_raw, mp_raw, write_asset_dir, write_lmk68


# --------------------------------------------------------------------------------------
# Landmark embeddings


@pytest.mark.parametrize("tensors", [True, False])
def test_landmark_npy_with_torch_tensors(tmp_path, tensors):
    raw = lmk68_raw(24, tensors=tensors)
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    emb = fio.load_landmark_embedding("68", path, num_faces=10)
    assert isinstance(emb, fio.LandmarkEmbedding68) and emb.source == str(path)
    np.testing.assert_array_equal(emb.static_lmk_faces_idx, raw["static_lmk_faces_idx"])
    np.testing.assert_array_equal(emb.static_lmk_bary_coords, raw["static_lmk_bary_coords"])
    np.testing.assert_array_equal(
        emb.dynamic_lmk_faces_idx, np.asarray(raw["dynamic_lmk_faces_idx"])
    )
    np.testing.assert_array_equal(
        emb.dynamic_lmk_bary_coords, np.asarray(raw["dynamic_lmk_bary_coords"], np.float64)
    )
    np.testing.assert_array_equal(emb.full_lmk_faces_idx, raw["full_lmk_faces_idx"][0])
    np.testing.assert_array_equal(emb.full_lmk_bary_coords, raw["full_lmk_bary_coords"][0])
    for name in ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
        assert getattr(emb, name).dtype == np.int64
    assert emb.dynamic_lmk_bary_coords.dtype == np.float64
    assert emb.full_lmk_faces_idx.shape == (68,) and emb.full_lmk_bary_coords.shape == (68, 3)


def test_landmark_npy_protocol2_python2_style(tmp_path):
    """An embedding pickled with protocol 2 (numpy.core paths, _codecs bytes) loads too."""
    raw = lmk68_raw(25)
    array = np.empty((), dtype=object)
    array[()] = raw
    path = tmp_path / "landmark_embedding.npy"
    with open(path, "wb") as fp:
        header = {"descr": "|O", "fortran_order": False, "shape": ()}
        np.lib.format.write_array_header_1_0(fp, header)
        pickle.dump(array, fp, protocol=2)
    emb = fio.load_landmark_embedding("68", path)
    np.testing.assert_array_equal(emb.dynamic_lmk_faces_idx, raw["dynamic_lmk_faces_idx"].numpy())


def test_landmark_face_index_out_of_range(tmp_path):
    raw = lmk68_raw(26)
    raw["full_lmk_faces_idx"][0, 5] = 10
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    fio.load_landmark_embedding("68", path)  # fine without a mesh to check against
    message = f"{path}: a landmark sits on face 10, but the model has only 10"
    with pytest.raises(fio.ModelFileError, match=re.escape(message)):
        fio.load_landmark_embedding("68", path, num_faces=10)
    fio.load_landmark_embedding("68", path, num_faces=11)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("static_lmk_bary_coords", np.ones((5, 3)), r"static_lmk_bary_coords must have shape"),
        ("dynamic_lmk_bary_coords", torch.ones(4, 3, 2), "dynamic_lmk_bary_coords must have shape"),
        ("static_lmk_bary_coords", np.full((51, 3), np.nan), "static_lmk_bary_coords holds 153 non"),
        ("static_lmk_faces_idx", -np.ones(51, np.int64), "static_lmk_faces_idx holds a negative"),
    ],
)
def test_bad_landmark_embedding(tmp_path, key, value, match):
    raw = dict(lmk68_raw(27), **{key: value})
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(fio.ModelFileError, match=match):
        fio.load_landmark_embedding("68", path)


@pytest.mark.parametrize(
    "static, contour, full, match",
    [
        (40, 3, 68, "has 40 points and dynamic_lmk_faces_idx 3 contour points per bin: 43"),
        (51, 16, 68, "51 points and dynamic_lmk_faces_idx 16 contour points per bin: 67"),
        (51, 17, 10, "full_lmk_faces_idx has 10 points, not the 68"),
    ],
)
def test_landmark_counts_must_make_68(tmp_path, static, contour, full, match):
    """A 68-point embedding holds 68 points (static + contour, and the full set): a file
    of other counts is refused at load time, not turned into fewer landmarks."""
    raw = lmk68_raw(29, L=static, Ld=contour)
    raw["full_lmk_faces_idx"] = raw["full_lmk_faces_idx"][:, :full]
    raw["full_lmk_bary_coords"] = raw["full_lmk_bary_coords"][:, :full]
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(fio.ModelFileError, match=re.escape(f"{path}: ") + ".*" + match):
        fio.load_landmark_embedding("68", path)


def test_float_face_indices_refused(tmp_path):
    raw = dict(lmk68_raw(28), static_lmk_faces_idx=np.ones(51))
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    message = "static_lmk_faces_idx must be an integer array, got dtype float64"
    with pytest.raises(TypeError, match=message) as info:
        fio.load_landmark_embedding("68", path)
    assert isinstance(info.value, fio.ModelFileError)  # and a TypeError


def test_mediapipe_embedding(tmp_path):
    raw = mp_raw(29)
    path = tmp_path / "mediapipe_landmark_embedding.npz"
    np.savez(path, **raw)
    emb = fio.load_landmark_embedding("mp", path, num_faces=10)
    assert isinstance(emb, fio.MediapipeEmbedding) and emb.source == str(path)
    np.testing.assert_array_equal(emb.lmk_faces_idx, raw["lmk_face_idx"].astype(np.int64))
    np.testing.assert_array_equal(emb.lmk_bary_coords, raw["lmk_b_coords"])
    np.testing.assert_array_equal(emb.landmark_indices, raw["landmark_indices"])
    assert emb.lmk_faces_idx.dtype == np.int64 and emb.landmark_indices.dtype == np.int64
    with pytest.raises(fio.ModelFileError, match="sits on face"):
        fio.load_landmark_embedding("mp", path, num_faces=int(raw["lmk_face_idx"].max()))
    np.savez(path, **dict(raw, landmark_indices=raw["landmark_indices"][:3]))
    with pytest.raises(fio.ModelFileError, match=r"landmark_indices must have shape"):
        fio.load_landmark_embedding("mp", path)


def test_landmark_arguments(tmp_path):
    write_asset_dir(tmp_path)
    with pytest.raises(ValueError, match=r"lm_type must be one of \['68', 'mp'\], got 'dense'"):
        fio.load_landmark_embedding("dense", tmp_path)
    with pytest.raises(TypeError, match="num_faces must be an int"):
        fio.load_landmark_embedding("68", tmp_path, num_faces=9.0)
    with pytest.raises(fio.ModelFileError, match=r"lm_type='mp' reads an \.npz file"):
        fio.load_landmark_embedding("mp", tmp_path / "landmark_embedding.npy")
    with pytest.raises(fio.ModelFileError, match=r"\.npy file .*points to .*mediapipe"):
        fio.load_landmark_embedding("68", tmp_path / "mediapipe_landmark_embedding.npz")


# --------------------------------------------------------------------------------------
# The contour table: exactly 79 yaw bins


@pytest.mark.parametrize("bins", [0, 1, 4, 78, 80, 158])
def test_contour_table_must_have_79_bins(tmp_path, bins):
    """Both contour-bin rules (medusa's and DECA's) map every pose to a bin in 0..78: with
    a table of another size most poses would get another pose's contour (or none), so the
    file is refused at load time, naming the file and both sizes."""
    raw = lmk68_raw(40, NB=bins)
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    message = (rf"{re.escape(str(path))}: the contour table dynamic_lmk_faces_idx has "
               rf"{bins} yaw bins \(shape \({bins}, 17\)\); it must have 79")
    with pytest.raises(fio.ModelFileError, match=message):
        fio.load_landmark_embedding("68", path)
    with pytest.raises(fio.ModelFileError, match="must have 79"):
        fio.parse_landmark_embedding_68(raw, "mem")


def test_contour_table_of_79_bins_loads(tmp_path):
    path = write_lmk68(tmp_path / "landmark_embedding.npy", lmk68_raw(41, NB=79, Ld=17))
    emb = fio.load_landmark_embedding("68", path, num_faces=10)
    assert emb.dynamic_lmk_faces_idx.shape == (79, 17)
    assert emb.dynamic_lmk_bary_coords.shape == (79, 17, 3)


def test_contour_table_checks_keep_their_order(tmp_path):
    """A bin count that is right does not excuse the other checks: barycentrics must
    match the faces, and faces must lie on the mesh."""
    raw = dict(lmk68_raw(42, NB=79), dynamic_lmk_bary_coords=torch.ones(79, 2, 3))
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(fio.ModelFileError, match="dynamic_lmk_bary_coords must have shape"):
        fio.load_landmark_embedding("68", path)
    raw = lmk68_raw(43, NB=79)
    raw["dynamic_lmk_faces_idx"][78, 2] = 10
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(fio.ModelFileError, match="sits on face 10, but the model has only 10"):
        fio.load_landmark_embedding("68", path, num_faces=10)
