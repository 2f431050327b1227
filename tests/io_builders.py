"""Fixture builders for the tests of flame_ext.io (tests/test_io_*.py).

Small random models, landmark embeddings and textures laid out as the real files hold
them, and a pickler that writes what Python 2 wrote for FLAME (bytes as py2 `str`, old
global paths, chumpy / old scipy classes), so the loaders are tested on the real formats.
For integration, the tests also read what flame_ext.synthetic.write_assets writes.
"""

import copyreg
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from flame_ext import io as fio

J = 5
FLAME_PARENTS = np.array([-1, 0, 1, 1, 1])
ROOT_U32 = 4294967295


def model_raw(seed=0, V=12, F=10, S=4, E=3, n_shape_key=True, kintree_dtype=np.int64):
    """A small model dict laid out as generic_model.pkl holds it (J_regressor dense)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.1, 1.0, (V, J))
    regressor = rng.uniform(0.1, 1.0, (J, V)) * (rng.uniform(size=(J, V)) < 0.4)
    regressor[:, 0] += 0.5  # every joint regresses from at least one vertex
    raw = {
        "f": rng.integers(0, V, (F, 3)).astype(np.uint32),
        "v_template": rng.normal(size=(V, 3)),
        "shapedirs": rng.normal(size=(V, 3, S + E)),
        "posedirs": rng.normal(size=(V, 3, 9 * (J - 1))),
        "J_regressor": regressor / regressor.sum(1, keepdims=True),
        "kintree_table": np.array([[ROOT_U32, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=kintree_dtype),
        "weights": weights / weights.sum(1, keepdims=True),
        "J": rng.normal(size=(J, 3)),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    if n_shape_key:
        raw[fio.N_SHAPE_KEY] = S
    return raw


def lmk68_raw(seed=0, F=10, L=51, NB=79, Ld=17, tensors=True):
    """A landmark_embedding.npy dict: dynamic entries torch tensors as in DECA's file, a
    contour table of NB yaw bins (the loaders accept only FLAME's 79) and L static + Ld
    contour points (only 68 in all)."""
    rng = np.random.default_rng(seed)

    def bary(*shape):
        b = rng.uniform(0.1, 1.0, shape + (3,))
        return b / b.sum(-1, keepdims=True)

    dyn_faces = rng.integers(0, F, (NB, Ld))
    dyn_bary = bary(NB, Ld).astype(np.float32)
    return {
        "static_lmk_faces_idx": rng.integers(0, F, L),
        "static_lmk_bary_coords": bary(L),
        "dynamic_lmk_faces_idx": torch.from_numpy(dyn_faces) if tensors else dyn_faces,
        "dynamic_lmk_bary_coords": torch.from_numpy(dyn_bary) if tensors else dyn_bary,
        "full_lmk_faces_idx": rng.integers(0, F, (1, 68)),
        "full_lmk_bary_coords": bary(1, 68),
    }


def mp_raw(seed=0, F=10, L=7):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.1, 1.0, (L, 3))
    return {
        "lmk_face_idx": rng.integers(0, F, L).astype(np.uint32),
        "lmk_b_coords": b / b.sum(1, keepdims=True),
        "landmark_indices": rng.permutation(400)[:L],
    }


def texture_arrays(seed=0, H=6, W=6, P=5, flame_format=False):
    """(mean (H,W,3), basis (H,W,3,P)) image-shaped; 0..255 scale for FLAME_texture."""
    rng = np.random.default_rng(seed)
    scale = 255.0 if flame_format else 1.0
    return rng.uniform(0, 1, (H, W, 3)) * scale, rng.normal(size=(H, W, 3, P)) * scale


class Ch:
    """Written as chumpy.ch.Ch: a plain Ch holding an array, with chumpy's pickled state."""

    def __init__(self, x):
        self.x = x
        self._dirty_vars = set()
        self._itr = None
        self._depends_on_deps = {}
        self._make_dense = False
        self._make_sparse = False


class OldCsc:
    """Written as scipy.sparse.csc.csc_matrix with an old scipy's instance state."""

    def __init__(self, dense, shape_key="_shape"):
        m = scipy.sparse.csc_matrix(dense)
        self.__dict__.update(
            {shape_key: m.shape, "data": m.data, "indices": m.indices, "indptr": m.indptr,
             "format": "csc", "maxprint": 50, "has_sorted_indices": True}
        )


class OldCoo:
    """Written as scipy.sparse.coo.coo_matrix with row / col arrays (old scipy)."""

    def __init__(self, dense):
        m = scipy.sparse.coo_matrix(dense)
        self.__dict__.update(
            {"shape": m.shape, "data": m.data, "row": m.row, "col": m.col, "format": "coo"}
        )


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's pickler wrote for FLAME: bytes as py2 `str`, old global paths."""

    RENAMES = {
        "numpy._core.multiarray": "numpy.core.multiarray",
        "builtins": "__builtin__",
        "copyreg": "copy_reg",
    }
    CLASS_PATHS = {Ch: ("chumpy.ch", "Ch"), OldCsc: ("scipy.sparse.csc", "csc_matrix"),
                   OldCoo: ("scipy.sparse.coo", "coo_matrix")}
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if obj in self.CLASS_PATHS:
            module, name = self.CLASS_PATHS[obj]
        else:
            module, name = obj.__module__, name or obj.__qualname__
            module = self.RENAMES.get(module, module)
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[type(copyreg._reconstructor)] = save_global


def py2_pickle(obj, protocol=2):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_lmk68(path, raw):
    np.save(path, raw, allow_pickle=True)
    return path


def write_asset_dir(directory, seed=0, model_name="generic_model.pkl", raw=None):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / model_name).write_bytes(pickle.dumps(raw or model_raw(seed), protocol=2))
    write_lmk68(directory / "landmark_embedding.npy", lmk68_raw(seed))
    np.savez(directory / "mediapipe_landmark_embedding.npz", **mp_raw(seed))
    mean, basis = texture_arrays(seed)
    np.savez(directory / "FLAME_albedo_from_BFM.npz", MU=mean.reshape(-1), PC=basis.reshape(-1, 5))
    return directory


def assert_model_matches(model, raw, source):
    assert model.source == str(source)
    np.testing.assert_array_equal(model.faces, raw["f"].astype(np.int64))
    np.testing.assert_array_equal(model.v_template, raw["v_template"])
    np.testing.assert_array_equal(model.shapedirs, raw["shapedirs"])
    np.testing.assert_array_equal(model.posedirs, raw["posedirs"])
    np.testing.assert_array_equal(model.J_regressor, raw["J_regressor"])
    np.testing.assert_array_equal(model.lbs_weights, raw["weights"])
    np.testing.assert_array_equal(model.parents, FLAME_PARENTS)
    assert model.parents.dtype == np.int64 and model.faces.dtype == np.int64
    assert model.n_shape == raw.get(fio.N_SHAPE_KEY, 300)
    assert model.n_expr == raw["shapedirs"].shape[2] - model.n_shape
