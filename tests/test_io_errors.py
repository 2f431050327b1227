"""The public exception types of the loaders: every refused file raises a ModelFileError
(a ValueError) naming the file, a refused pickle global an UnsafePickleError (a
ModelFileError), from flame_ext.io and through the decoders alike."""

import os
import pickle

import numpy as np
import pytest
import torch

import flame_ext
from flame_ext import io as fio
from io_builders import lmk68_raw, model_raw, write_asset_dir, write_lmk68


def test_exception_types_are_public_and_ordered():
    assert flame_ext.ModelFileError is fio.ModelFileError
    assert flame_ext.UnsafePickleError is fio.UnsafePickleError
    assert {"ModelFileError", "UnsafePickleError"} <= set(flame_ext.__all__) & set(fio.__all__)
    assert issubclass(fio.ModelFileError, ValueError)
    assert issubclass(fio.UnsafePickleError, fio.ModelFileError)
    assert issubclass(fio.UnsafePickleError, pickle.UnpicklingError)


class _System:
    def __reduce__(self):
        return os.system, ("true",)


class _Storage:
    """Pickled as torch storage bytes whose own pickle names os.system."""

    def __reduce__(self):
        return torch.storage._load_from_bytes, (pickle.dumps(_System(), protocol=2),)


def _model(tmp_path, raw):
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=2))
    return path


REFUSED = {
    "empty": lambda d: (d / "generic_model.pkl").write_bytes(b"") or d / "generic_model.pkl",
    "truncated": lambda d: _truncated(_model(d, model_raw(1))),
    "inconsistent": lambda d: _model(d, dict(model_raw(2), weights=np.ones((3, 5)))),
    "wrong dtype": lambda d: _model(d, dict(model_raw(3), f=np.ones((10, 3)))),
    "not a dict": lambda d: _model(d, [1, 2, 3]),
}


def _truncated(path):
    path.write_bytes(path.read_bytes()[:-40])
    return path


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_model_files_raise_model_file_error(tmp_path, kind):
    path = REFUSED[kind](tmp_path)
    with pytest.raises(fio.ModelFileError, match=str(path)) as info:
        fio.load_flame_model(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(flame_ext.ModelFileError, match=str(path)):
        flame_ext.FlameShape(4, 3, device="cpu", model_path=path)


def test_refused_global_raises_unsafe_pickle_error(tmp_path):
    path = _model(tmp_path, dict(model_raw(4), f=_System()))
    with pytest.raises(flame_ext.UnsafePickleError, match=f"{path}: refused to load.*system"):
        flame_ext.FlameShape(4, 3, device="cpu", model_path=path)


def test_global_refused_inside_torch_storage_is_unsafe(tmp_path):
    """torch's weights-only loader refuses the global inside the storage bytes: the error
    is an UnsafePickleError naming the global, without torch's hint to load unsafely."""
    path = write_lmk68(tmp_path / "landmark_embedding.npy",
                       dict(lmk68_raw(5), dynamic_lmk_faces_idx=_Storage()))
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load.*system") as info:
        fio.load_landmark_embedding("68", path)
    assert "weights_only=False" not in str(info.value)


def test_refused_landmark_and_texture_files(tmp_path):
    write_asset_dir(tmp_path, seed=6)
    lmk = tmp_path / "landmark_embedding.npy"
    lmk.write_bytes(lmk.read_bytes()[:200])
    with pytest.raises(fio.ModelFileError, match=str(lmk)):
        flame_ext.FlameLandmark("68", device="cpu", model_path=tmp_path)
    tex = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(tex, MU=np.zeros(48), PC=np.zeros((30, 2)))
    with pytest.raises(fio.ModelFileError, match=str(tex)):
        flame_ext.FlameTex(tex, n_tex=1)


def test_missing_files_stay_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fio.load_flame_model(tmp_path / "missing.pkl")
    assert not isinstance(info.value, fio.ModelFileError)
