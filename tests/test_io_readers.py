"""flame_ext.io readers on damaged files: truncated, empty, corrupt or forged pickles,
.npy headers and .npz archives are refused naming the file, before anything large is
allocated."""

import pickle
import struct

import numpy as np
import pytest

from flame_ext import io as fio
from io_builders import lmk68_raw, model_raw, mp_raw, write_asset_dir, write_lmk68


# --------------------------------------------------------------------------------------
# Damaged files


def test_truncated_and_empty_model(tmp_path):
    data = pickle.dumps(model_raw(18), protocol=2)
    for cut in (1, len(data) // 3, len(data) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(data[:cut])
        with pytest.raises(fio.ModelFileError, match=f"{path}: cannot read the pickled data"):
            fio.load_flame_model(path)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(fio.ModelFileError, match=f"{empty}: file is empty"):
        fio.load_flame_model(empty)
    text = tmp_path / "text.pkl"
    text.write_text("this is not a pickle\n")
    with pytest.raises(fio.ModelFileError, match=f"{text}: cannot read"):
        fio.load_flame_model(text)


def test_truncated_landmark_npy(tmp_path):
    path = write_lmk68(tmp_path / "landmark_embedding.npy", lmk68_raw(19))
    data = path.read_bytes()
    for cut in (4, 60, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(fio.ModelFileError, match=str(path)):
            fio.load_landmark_embedding("68", path)


def test_huge_npy_header_is_not_read(tmp_path):
    path = tmp_path / "landmark_embedding.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{'descr': '|O'")
    with pytest.raises(fio.ModelFileError, match=r"header claims 4294967280 bytes"):
        fio.load_landmark_embedding("68", path)


def test_landmark_npy_must_be_object_array(tmp_path):
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, np.arange(5.0))
    with pytest.raises(fio.ModelFileError, match=r"expected a pickled dict.*float64"):
        fio.load_landmark_embedding("68", path)


@pytest.mark.parametrize("which", ["mp", "tex"])
def test_truncated_npz(tmp_path, which):
    write_asset_dir(tmp_path)
    name = "mediapipe_landmark_embedding.npz" if which == "mp" else "FLAME_albedo_from_BFM.npz"
    path = tmp_path / name
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:cut])
        with pytest.raises(fio.ModelFileError, match=f"{path}.*cannot read the archive"):
            if which == "mp":
                fio.load_landmark_embedding("mp", path)
            else:
                fio.load_texture_space(path, n_tex=2)


def test_corrupt_npz_member_data(tmp_path):
    """A member whose bytes are damaged (CRC mismatch) is reported, not half-read."""
    write_asset_dir(tmp_path)
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    data = bytearray(path.read_bytes())
    offset = data.index(b"PC.npy") + 200  # inside PC's array data (stored uncompressed)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(fio.ModelFileError, match=r"FLAME_albedo_from_BFM\.npz\[PC\].*cannot read"):
        fio.load_texture_space(path, n_tex=2)


@pytest.mark.parametrize("which", ["mp", "tex"])
def test_object_arrays_in_npz_refused(tmp_path, which):
    path = tmp_path / "x.npz"
    if which == "mp":
        raw = dict(mp_raw(), landmark_indices=np.array([{"a": 1}], dtype=object))
        np.savez(path, **raw)
        with pytest.raises(fio.ModelFileError, match=f"{path}.*(pickle|object)"):
            fio.load_landmark_embedding("mp", path)
    else:
        np.savez(path, MU=np.zeros(12), PC=np.array([[{"a": 1}]] * 12, dtype=object))
        with pytest.raises(fio.ModelFileError, match=r"x\.npz\[PC\]: is an object array"):
            fio.load_texture_space(path, n_tex=1)
