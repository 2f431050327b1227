"""Tests of flame_ext.io: file formats, discovery, the restricted unpickler, validation.

Fixtures are built here (small random models written in the real formats, including a
Python-2 style pickle with chumpy / old scipy globals) and, for integration, by
flame_ext.synthetic.write_assets.
"""

import copyreg
import dataclasses
import io
import os
import pickle
import re
import struct
import sys
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from flame_ext import io as fio

J = 5
REAL_MEDUSA_DATA_DIR = fio._medusa_data_dir
FLAME_PARENTS = np.array([-1, 0, 1, 1, 1])
ROOT_U32 = 4294967295


# --------------------------------------------------------------------------------------
# Fixture builders


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


def lmk68_raw(seed=0, F=10, L=6, NB=4, Ld=3, tensors=True):
    """A landmark_embedding.npy dict: dynamic entries torch tensors as in DECA's file."""
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


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No FLAME_EXT_DATA, an empty HOME and no medusa: discovery sees only what a test adds."""
    monkeypatch.delenv(fio.ENV_VAR, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(fio, "_medusa_data_dir", lambda: None)
    return home


# --------------------------------------------------------------------------------------
# Model pickle formats


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_model_pickle_protocols(tmp_path, protocol):
    raw = model_raw(1)
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))
    assert_model_matches(fio.load_flame_model(path), raw, path)


@pytest.mark.parametrize("protocol", [1, 2])
def test_python2_chumpy_pickle(tmp_path, protocol):
    """The official file: py2 str data, numpy.core paths, chumpy.ch.Ch, old sparse path.

    Protocol 1 reaches the classes through copy_reg._reconstructor, 2 through NEWOBJ.
    """
    raw = model_raw(2, n_shape_key=False, S=300, E=2, V=5)
    written = dict(raw)
    for key in ("v_template", "shapedirs", "posedirs", "weights", "J"):
        written[key] = Ch(raw[key])
    written["J_regressor"] = OldCsc(raw["J_regressor"])
    data = py2_pickle(written, protocol)
    for expected in (b"chumpy.ch\nCh", b"scipy.sparse.csc\ncsc_matrix", b"numpy.core.multiarray"):
        assert expected in data
    assert b"_codecs" not in data  # bytes went out as Python 2 str
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(data)
    model = fio.load_flame_model(path)
    assert_model_matches(model, raw, path)
    assert (model.n_shape, model.n_expr) == (300, 2)


@pytest.mark.parametrize("protocol", [2, 4])
def test_single_joint_model_with_empty_posedirs(tmp_path, protocol):
    """J = 1: posedirs has 0 columns, pickled (protocol 2) with an empty bytes object."""
    raw = model_raw(3)
    raw.update(
        posedirs=np.zeros((12, 3, 0)),
        J_regressor=raw["J_regressor"][:1],
        weights=np.ones((12, 1)),
        kintree_table=np.array([[ROOT_U32], [0]], np.uint32),
    )
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))
    model = fio.load_flame_model(path)
    assert model.posedirs.shape == (12, 3, 0)
    np.testing.assert_array_equal(model.parents, [-1])


@pytest.mark.parametrize("kintree_dtype", [np.uint32, np.int64, np.uint64])
def test_kintree_root_marker(tmp_path, kintree_dtype):
    raw = model_raw(3, kintree_dtype=kintree_dtype)
    if kintree_dtype == np.int64:
        raw["kintree_table"][0, 0] = -1
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(raw))
    np.testing.assert_array_equal(fio.load_flame_model(path).parents, FLAME_PARENTS)


def test_kintree_with_named_joints(tmp_path):
    """The second kintree row names joints; parents refer to those names (smplx's reading)."""
    raw = model_raw(4)
    raw["kintree_table"] = np.array([[ROOT_U32, 10, 11, 11, 11], [10, 11, 12, 13, 14]], np.uint32)
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(raw))
    np.testing.assert_array_equal(fio.load_flame_model(path).parents, FLAME_PARENTS)


@pytest.mark.parametrize(
    "make",
    [
        scipy.sparse.csc_matrix,
        scipy.sparse.csr_matrix,
        scipy.sparse.coo_matrix,
        scipy.sparse.csc_array,
        lambda d: OldCsc(d, shape_key="shape"),
        OldCoo,
    ],
    ids=["csc", "csr", "coo", "csc_array", "old_csc_shape_key", "old_coo_row_col"],
)
def test_sparse_j_regressor(tmp_path, make):
    raw = model_raw(5)
    written = dict(raw, J_regressor=make(raw["J_regressor"]))
    old_scipy = isinstance(written["J_regressor"], (OldCsc, OldCoo))
    data = py2_pickle(written) if old_scipy else pickle.dumps(written)
    path = tmp_path / "m.pkl"
    path.write_bytes(data)
    model = fio.load_flame_model(path)
    np.testing.assert_array_equal(model.J_regressor, raw["J_regressor"])


def test_sparse_duplicates_sum(tmp_path):
    """Duplicate coordinates add up, as scipy's toarray does."""
    raw = model_raw(6)
    dense = raw["J_regressor"]
    r, c = np.nonzero(dense)
    r, c, v = np.r_[r, r[:3]], np.r_[c, c[:3]], np.r_[dense[r, c], [0.25, 0.5, 0.125]]
    written = dict(raw, J_regressor=scipy.sparse.coo_matrix((v, (r, c)), shape=dense.shape))
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(written))
    expected = scipy.sparse.coo_matrix((v, (r, c)), shape=dense.shape).toarray()
    np.testing.assert_array_equal(fio.load_flame_model(path).J_regressor, expected)


def test_sparse_index_out_of_shape(tmp_path):
    raw = model_raw(7)
    bad = OldCsc(raw["J_regressor"])
    bad.indices = bad.indices.copy()
    bad.indices[0] = 99
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle(dict(raw, J_regressor=bad)))
    with pytest.raises(ValueError, match="J_regressor.*outside its shape"):
        fio.load_flame_model(path)


def test_chumpy_expression_without_value(tmp_path):
    raw = model_raw(8)
    ch = Ch(raw["shapedirs"])
    del ch.x  # a chumpy expression (e.g. ch_ops.add) stores terms, not 'x'
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle(dict(raw, shapedirs=ch)))
    with pytest.raises(TypeError, match=r"m\.pkl: shapedirs is a chumpy expression"):
        fio.load_flame_model(path)


@pytest.mark.parametrize("name", fio.MODEL_FILE_NAMES)
def test_every_model_file_name_loads_from_a_directory(tmp_path, name):
    write_asset_dir(tmp_path, seed=9, model_name=name)
    assert fio.load_flame_model(tmp_path).source == str(tmp_path / name)


def test_model_name_order_in_directory(tmp_path):
    raw = model_raw(10)
    for name in reversed(fio.MODEL_FILE_NAMES):
        (tmp_path / name).write_bytes(pickle.dumps(raw))
    for name in fio.MODEL_FILE_NAMES:
        assert fio.load_flame_model(tmp_path).source == str(tmp_path / name)
        (tmp_path / name).unlink()


# --------------------------------------------------------------------------------------
# Model validation


def _write(tmp_path, raw, name="m.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(raw))
    return path


@pytest.mark.parametrize(
    "key, change, match",
    [
        ("shapedirs", lambda a: a.__setitem__((3, 1, 2), np.nan),
         r"shapedirs holds 1 non-finite.*\(3, 1, 2\)"),
        ("posedirs", lambda a: a.__setitem__((0, 0, 0), np.inf), "posedirs holds 1 non-finite"),
        ("v_template", lambda a: a.__setitem__((1, 1), np.nan), "v_template holds 1 non-finite"),
        ("weights", lambda a: a.__setitem__((1, 1), np.nan), "lbs_weights.*non-finite"),
        ("J_regressor", lambda a: a.__setitem__((1, 1), np.nan), "J_regressor holds 1 non-finite"),
        ("f", lambda a: a.__setitem__((4, 2), 12),
         r"faces \(f\) holds index 12, but there are only 12 vertices"),
    ],
)
def test_bad_values_name_file_and_array(tmp_path, key, change, match):
    raw = model_raw(11)
    change(raw[key])
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + match):
        fio.load_flame_model(path)


def test_negative_face_index(tmp_path):
    raw = model_raw(12)
    raw["f"] = raw["f"].astype(np.int64)
    raw["f"][0, 0] = -1
    with pytest.raises(ValueError, match=r"faces \(f\) holds a negative index"):
        fio.load_flame_model(_write(tmp_path, raw))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("shapedirs", np.zeros((11, 3, 7)),
         r"shapedirs must have shape \(V, 3, K\) = \(12, 3, \*\)"),
        ("posedirs", np.ones((12, 3, 35)),
         r"posedirs must have shape \(V, 3, 9\*\(J-1\)\) = \(12, 3, 36\)"),
        ("J_regressor", np.ones((4, 12)), r"J_regressor must have shape \(J, V\) = \(5, 12\)"),
        ("weights", np.ones((12, 4)),
         r"lbs_weights \(weights\) must have shape \(V, J\) = \(12, 5\)"),
        ("f", np.ones((10, 4), np.int64), r"faces \(f\) must have shape \(F, 3\)"),
        ("v_template", np.ones((12, 2)), r"v_template must have shape \(V, 3\)"),
        ("kintree_table", np.array([[ROOT_U32, 0, 2, 1, 1], [0, 1, 2, 3, 4]]),
         "joint 2 has parent 2"),
        ("kintree_table", np.ones((3, 5), np.int64), r"kintree_table must have shape \(2, J\)"),
        (fio.N_SHAPE_KEY, 8, "declares 8 shape components but shapedirs has only 7"),
        ("shapedirs", np.array(["a"] * 12), "shapedirs must be a numeric array"),
    ],
)
def test_inconsistent_model(tmp_path, key, value, match):
    raw = model_raw(13)
    raw[key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        fio.load_flame_model(_write(tmp_path, raw))


def test_missing_keys_listed(tmp_path):
    raw = model_raw(14)
    del raw["posedirs"], raw["weights"]
    with pytest.raises(ValueError, match=r"lacks \['posedirs', 'weights'\]"):
        fio.load_flame_model(_write(tmp_path, raw))


def test_not_a_dict(tmp_path):
    with pytest.raises(ValueError, match="expected the FLAME model"):
        fio.load_flame_model(_write(tmp_path, [1, 2, 3]))


def test_n_shape_defaults_to_300_and_bounds(tmp_path):
    raw = model_raw(15, n_shape_key=False)  # 7 columns: a FLAME file must hold 300+
    with pytest.raises(ValueError, match="declares 300 shape components"):
        fio.load_flame_model(_write(tmp_path, raw))


def test_dataclass_validates_direct_construction():
    model = fio.parse_flame_model(model_raw(16), "mem")
    with pytest.raises(TypeError, match="mem: shapedirs must have dtype float64, got float32"):
        dataclasses.replace(model, shapedirs=model.shapedirs.astype(np.float32))
    with pytest.raises(ValueError, match=r"mem: n_shape must be in \[0, 7\], got 8"):
        dataclasses.replace(model, n_shape=8)
    with pytest.raises(AttributeError):
        model.n_shape = 1  # frozen


def test_parse_copies_shared_inputs():
    """In-memory assets are shared caches: the model must not alias them."""
    raw = model_raw(17)
    model = fio.parse_flame_model(raw, "mem")
    model.shapedirs[0, 0, 0] += 1.0
    assert model.shapedirs[0, 0, 0] != raw["shapedirs"][0, 0, 0]
    assert all(getattr(model, k).flags.writeable for k in ("shapedirs", "faces", "parents"))


# --------------------------------------------------------------------------------------
# Damaged files


def test_truncated_and_empty_model(tmp_path):
    data = pickle.dumps(model_raw(18), protocol=2)
    for cut in (1, len(data) // 3, len(data) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{path}: cannot read the pickled data"):
            fio.load_flame_model(path)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{empty}: file is empty"):
        fio.load_flame_model(empty)
    text = tmp_path / "text.pkl"
    text.write_text("this is not a pickle\n")
    with pytest.raises(ValueError, match=f"{text}: cannot read"):
        fio.load_flame_model(text)


def test_truncated_landmark_npy(tmp_path):
    path = write_lmk68(tmp_path / "landmark_embedding.npy", lmk68_raw(19))
    data = path.read_bytes()
    for cut in (4, 60, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(path)):
            fio.load_landmark_embedding("68", path)


def test_huge_npy_header_is_not_read(tmp_path):
    path = tmp_path / "landmark_embedding.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{'descr': '|O'")
    with pytest.raises(ValueError, match=r"header claims 4294967280 bytes"):
        fio.load_landmark_embedding("68", path)


def test_landmark_npy_must_be_object_array(tmp_path):
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, np.arange(5.0))
    with pytest.raises(ValueError, match=r"expected a pickled dict.*float64"):
        fio.load_landmark_embedding("68", path)


@pytest.mark.parametrize("which", ["mp", "tex"])
def test_truncated_npz(tmp_path, which):
    write_asset_dir(tmp_path)
    name = "mediapipe_landmark_embedding.npz" if which == "mp" else "FLAME_albedo_from_BFM.npz"
    path = tmp_path / name
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{path}.*cannot read the archive"):
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
    with pytest.raises(ValueError, match=r"FLAME_albedo_from_BFM\.npz\[PC\].*cannot read"):
        fio.load_texture_space(path, n_tex=2)


@pytest.mark.parametrize("which", ["mp", "tex"])
def test_object_arrays_in_npz_refused(tmp_path, which):
    path = tmp_path / "x.npz"
    if which == "mp":
        raw = dict(mp_raw(), landmark_indices=np.array([{"a": 1}], dtype=object))
        np.savez(path, **raw)
        with pytest.raises(ValueError, match=f"{path}.*(pickle|object)"):
            fio.load_landmark_embedding("mp", path)
    else:
        np.savez(path, MU=np.zeros(12), PC=np.array([[{"a": 1}]] * 12, dtype=object))
        with pytest.raises(ValueError, match=r"x\.npz\[PC\]: is an object array"):
            fio.load_texture_space(path, n_tex=1)


# --------------------------------------------------------------------------------------
# Hostile pickles


class Payload:
    """Unpickling it calls func(arg): what a malicious model file would do."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker):
    import builtins
    import subprocess

    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.call"])
def test_hostile_model_pickle_refused(tmp_path, kind, protocol):
    marker = tmp_path / "pwned"
    raw = dict(model_raw(20), f=_payloads(marker)[kind])
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match=f"{path}: refused to load.*references"):
        fio.load_flame_model(path)
    assert not marker.exists()


def test_hostile_payload_inside_chumpy_state(tmp_path):
    marker = tmp_path / "pwned"
    raw = model_raw(21)
    ch = Ch(raw["shapedirs"])
    ch._itr = _payloads(marker)["os.system"]
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle(dict(raw, shapedirs=ch)))
    with pytest.raises(fio.UnsafePickleError, match=r"(posix|os)\.system"):
        fio.load_flame_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_hostile_payload_inside_landmark_npy(tmp_path, kind):
    marker = tmp_path / "pwned"
    raw = dict(lmk68_raw(22), static_lmk_faces_idx=_payloads(marker)[kind])
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load"):
        fio.load_landmark_embedding("68", path)
    assert not marker.exists()


def _raw_pickle(*ops):
    return b"\x80\x02" + b"".join(ops) + b"."


def test_allowed_globals_cannot_be_modified(tmp_path):
    """BUILD on an allow-listed global (slot state) would change it process-wide."""
    # numpy.dtype, then state (None, {'__call__': 1}) applied with BUILD
    data = _raw_pickle(b"cnumpy\ndtype\n", b"N}X\x08\x00\x00\x00__call__K\x01s\x86", b"b")
    path = tmp_path / "m.pkl"
    path.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError, match="tried to modify numpy.dtype"):
        fio.load_flame_model(path)
    assert fio._ALLOWED["numpy", "dtype"]("f8") == np.float64


def test_ndarray_class_cannot_be_called(tmp_path):
    # numpy.ndarray((2**40,)) would allocate 8 TB of address space
    data = _raw_pickle(b"cnumpy\nndarray\n", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R")
    path = tmp_path / "m.pkl"
    path.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError, match="numpy.ndarray may only appear as an arg"):
        fio.load_flame_model(path)


class ForgedArray:
    """Pickles as numpy's array reconstruction with a chosen (inconsistent) state."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return np.array(0).__reduce__()[0], (np.ndarray, (0,), b"b"), self.state


@pytest.mark.parametrize(
    "state, match",
    [
        ((1, (10**12,), np.dtype(object), False, [1, 2]), "does not match its 2 items"),
        ((1, (10**12,), np.dtype("f8"), False, b"\x00" * 16), "needs 8000000000000 bytes"),
        ((1, (-3,), np.dtype("f8"), False, b"\x00" * 8), "malformed numpy array shape"),
    ],
)
def test_forged_array_state_refused_before_allocation(tmp_path, state, match):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"f": ForgedArray(state)}, protocol=2))
    with pytest.raises(ValueError, match=match):
        fio.load_flame_model(path)


class ForgedTensor:
    """Pickles as torch's tensor rebuild over a storage too small for the declared size."""

    def __reduce__(self):
        storage = torch.arange(4, dtype=torch.float64).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (10**9,), (1,), False, OrderedDict())


def test_forged_tensor_refused(tmp_path):
    raw = dict(lmk68_raw(23), dynamic_lmk_bary_coords=ForgedTensor())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation while writing the fixture
        path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(ValueError, match="reaches element 999999999 of a storage of 4"):
        fio.load_landmark_embedding("68", path)


def test_tensor_pickle_references_only_allowed_globals():
    """What the installed torch writes for a tensor must stay inside the allow-list."""
    import pickletools

    data = pickle.dumps({"t": torch.arange(6).reshape(2, 3), "a": np.arange(3)}, protocol=2)
    ops = pickletools.genops(data)
    globals_ = {tuple(arg.split(" ", 1)) for op, arg, _ in ops if op.name == "GLOBAL"}
    assert ("torch._utils", "_rebuild_tensor_v2") in globals_
    assert globals_ <= set(fio._ALLOWED), globals_ - set(fio._ALLOWED)


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
    with pytest.raises(ValueError, match=re.escape(message)):
        fio.load_landmark_embedding("68", path, num_faces=10)
    fio.load_landmark_embedding("68", path, num_faces=11)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("static_lmk_bary_coords", np.ones((5, 3)), r"static_lmk_bary_coords must have shape"),
        ("dynamic_lmk_bary_coords", torch.ones(4, 3, 2), "dynamic_lmk_bary_coords must have shape"),
        ("static_lmk_bary_coords", np.full((6, 3), np.nan), "static_lmk_bary_coords holds 18 non"),
        ("static_lmk_faces_idx", -np.ones(6, np.int64), "static_lmk_faces_idx holds a negative"),
    ],
)
def test_bad_landmark_embedding(tmp_path, key, value, match):
    raw = dict(lmk68_raw(27), **{key: value})
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises((ValueError, TypeError), match=match):
        fio.load_landmark_embedding("68", path)


def test_float_face_indices_refused(tmp_path):
    raw = dict(lmk68_raw(28), static_lmk_faces_idx=np.ones(6))
    path = write_lmk68(tmp_path / "landmark_embedding.npy", raw)
    with pytest.raises(TypeError, match="static_lmk_faces_idx must be an integer array, got dtype float64"):
        fio.load_landmark_embedding("68", path)


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
    with pytest.raises(ValueError, match="sits on face"):
        fio.load_landmark_embedding("mp", path, num_faces=int(raw["lmk_face_idx"].max()))
    np.savez(path, **dict(raw, landmark_indices=raw["landmark_indices"][:3]))
    with pytest.raises(ValueError, match=r"landmark_indices must have shape"):
        fio.load_landmark_embedding("mp", path)


def test_landmark_arguments(tmp_path):
    write_asset_dir(tmp_path)
    with pytest.raises(ValueError, match=r"lm_type must be one of \['68', 'mp'\], got 'dense'"):
        fio.load_landmark_embedding("dense", tmp_path)
    with pytest.raises(TypeError, match="num_faces must be an int"):
        fio.load_landmark_embedding("68", tmp_path, num_faces=9.0)
    with pytest.raises(ValueError, match=r"lm_type='mp' reads an \.npz file"):
        fio.load_landmark_embedding("mp", tmp_path / "landmark_embedding.npy")
    with pytest.raises(ValueError, match=r"\.npy file .*points to .*mediapipe"):
        fio.load_landmark_embedding("68", tmp_path / "mediapipe_landmark_embedding.npz")


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
        monkeypatch.setattr(fio, "_CHUNK_BYTES", 7 * 6 * 3 * 5 * 8)
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
    with pytest.raises(ValueError, match=match):
        fio.load_texture_space(path, n_tex=1)


def test_texture_directory_prefers_bfm(tmp_path):
    write_asset_dir(tmp_path)
    mean, basis = texture_arrays(33, flame_format=True)
    np.savez(tmp_path / "FLAME_texture.npz", mean=mean, tex_dir=basis)
    assert fio.load_texture_space(tmp_path, n_tex=1).source.endswith("FLAME_albedo_from_BFM.npz")
    (tmp_path / "FLAME_albedo_from_BFM.npz").unlink()
    assert fio.load_texture_space(tmp_path, n_tex=1).source.endswith("FLAME_texture.npz")
    # a model .pkl path means "the directory it sits in"
    beside_model = fio.load_texture_space(tmp_path / "generic_model.pkl", 1)
    assert beside_model.source.endswith("FLAME_texture.npz")


# --------------------------------------------------------------------------------------
# Discovery


def test_nothing_found_says_where_and_how(clean_env):
    with pytest.raises(FileNotFoundError) as info:
        fio.load_flame_model()
    message = str(info.value)
    home_flame = str(clean_env / ".medusa_ext_data" / "FLAME")
    for needle in ("generic_model.pkl", "FLAME_EXT_DATA (not set)", home_flame, "does not exist",
                   "model_path=", "~/.medusa_ext_data/FLAME/"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="no FLAME data directory found"):
        fio.find_data_dir()


def test_discovery_order(clean_env, tmp_path, monkeypatch):
    home_dir = write_asset_dir(clean_env / ".medusa_ext_data" / "FLAME", seed=1)
    assert fio.load_flame_model().source == str(home_dir / "generic_model.pkl")
    assert fio.find_data_dir() == home_dir

    env_dir = write_asset_dir(tmp_path / "env", seed=2)
    monkeypatch.setenv(fio.ENV_VAR, str(env_dir))
    assert fio.load_flame_model().source == str(env_dir / "generic_model.pkl")
    assert fio.load_texture_space(n_tex=1).source == str(env_dir / "FLAME_albedo_from_BFM.npz")
    assert fio.load_landmark_embedding("mp").source == str(env_dir / fio.LANDMARK_FILE_NAMES["mp"])
    assert fio.find_data_dir() == env_dir

    explicit = write_asset_dir(tmp_path / "explicit", seed=3)
    assert fio.load_flame_model(explicit).source == str(explicit / "generic_model.pkl")
    model_file = str(explicit / "generic_model.pkl")
    assert fio.load_flame_model(model_file).source == model_file
    assert fio.find_data_dir(explicit / "generic_model.pkl") == explicit
    assert fio.find_data_dir(str(explicit)) == explicit

    # a file missing from the env directory is looked up further down the order
    (env_dir / "landmark_embedding.npy").unlink()
    assert fio.load_landmark_embedding("68").source == str(home_dir / "landmark_embedding.npy")


def test_landmarks_next_to_explicit_model(clean_env, tmp_path):
    d = write_asset_dir(tmp_path / "d")
    emb = fio.load_landmark_embedding("68", d / "generic_model.pkl", num_faces=10)
    assert emb.source == str(d / "landmark_embedding.npy")
    (d / "landmark_embedding.npy").unlink()
    write_asset_dir(clean_env / ".medusa_ext_data" / "FLAME")
    # an explicit path is authoritative: no silent fallback to another location
    with pytest.raises(FileNotFoundError, match=r"holds none of \['landmark_embedding.npy'\]"):
        fio.load_landmark_embedding("68", d / "generic_model.pkl")


def test_medusa_package_data_for_landmarks(clean_env, tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "medusa"
    (pkg / "data" / "flame").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('medusa must not be imported')\n")
    write_lmk68(pkg / "data" / "flame" / "landmark_embedding.npy", lmk68_raw(34))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(fio, "_medusa_data_dir", REAL_MEDUSA_DATA_DIR)  # undo clean_env's stub
    monkeypatch.delitem(sys.modules, "medusa", raising=False)
    emb = fio.load_landmark_embedding("68")
    assert emb.source == str(pkg / "data" / "flame" / "landmark_embedding.npy")
    assert "medusa" not in sys.modules
    with pytest.raises(FileNotFoundError, match="mediapipe_landmark_embedding.npz.*medusa"):
        fio.load_landmark_embedding("mp")
    with pytest.raises(FileNotFoundError):
        fio.load_flame_model()  # package data holds no model


def test_missing_explicit_paths(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv(fio.ENV_VAR, "synthetic-small")
    missing = tmp_path / "nope" / "generic_model.pkl"
    for call in (
        lambda: fio.load_flame_model(missing),
        lambda: fio.load_landmark_embedding("68", missing),
        lambda: fio.load_texture_space(missing),
        lambda: fio.find_data_dir(missing),
    ):
        with pytest.raises(FileNotFoundError, match=f"model_path '{missing}' does not exist"):
            call()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds none of \['generic_model.pkl'"):
        fio.load_flame_model(empty)


def test_env_must_be_a_directory(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv(fio.ENV_VAR, str(tmp_path / "missing"))
    write_asset_dir(clean_env / ".medusa_ext_data" / "FLAME")
    with pytest.raises(FileNotFoundError, match=r"\$FLAME_EXT_DATA=.*missing' is not a directory"):
        fio.load_flame_model()


def test_model_path_types(clean_env):
    with pytest.raises(TypeError, match="model_path must be a str, a Path"):
        fio.load_flame_model(3)
    with pytest.raises(ValueError, match="no data directory"):
        fio.find_data_dir("synthetic")


# --------------------------------------------------------------------------------------
# Synthetic assets


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fio, "_warned_synthetic", set())


def _synthetic_warnings(record):
    return [w for w in record if "SYNTHETIC FLAME model" in str(w.message)]


def test_synthetic_small_warns_once(clean_env, fresh_warnings):
    expected = r"flame_ext: using the SYNTHETIC FLAME model \(small.*not a real face model"
    with pytest.warns(UserWarning, match=expected):
        model = fio.load_flame_model("synthetic-small")
    assert model.source == "synthetic:small"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fio.load_flame_model("synthetic-small")
        fio.load_landmark_embedding("68", "synthetic-small", num_faces=model.faces.shape[0])
        fio.load_texture_space("synthetic-small", n_tex=2)
    assert not _synthetic_warnings(record)


def test_synthetic_warning_once_across_threads(monkeypatch, fresh_warnings):
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda *a, **k: calls.append(a))
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        fio._warn_synthetic("small")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    fio._warn_synthetic("full")  # a different size warns on its own
    assert len(calls) == 2


def test_synthetic_from_env(clean_env, monkeypatch, fresh_warnings):
    monkeypatch.setenv(fio.ENV_VAR, "synthetic-small")
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        model = fio.load_flame_model()
    assert model.source == "synthetic:small"
    emb = fio.load_landmark_embedding("mp", num_faces=model.faces.shape[0])
    assert emb.source == "synthetic:small"


def test_synthetic_never_stands_in_silently(clean_env, tmp_path):
    # no env, no home files: an error, never the synthetic model
    with pytest.raises(FileNotFoundError):
        fio.load_flame_model()
    with pytest.raises(FileNotFoundError):
        fio.load_flame_model(tmp_path / "missing.pkl")


def test_synthetic_small_matches_its_written_files(tmp_path, fresh_warnings):
    """Synthetic in memory and the same assets written as real files parse identically."""
    from flame_ext import synthetic

    with pytest.warns(UserWarning):
        mem = fio.load_flame_model("synthetic-small")
    for chumpy, kintree_dtype in ((True, "uint32"), (False, "int64")):
        d = synthetic.write_assets(
            tmp_path / f"{chumpy}", "small", chumpy=chumpy, kintree_dtype=kintree_dtype
        )
        disk = fio.load_flame_model(d)
        for name in ("faces", "v_template", "shapedirs", "posedirs", "J_regressor", "parents",
                     "lbs_weights"):
            np.testing.assert_array_equal(getattr(disk, name), getattr(mem, name), err_msg=name)
        assert (disk.n_shape, disk.n_expr) == (mem.n_shape, mem.n_expr) == (6, 4)
        np.testing.assert_array_equal(disk.parents, FLAME_PARENTS)
    data = (d / "generic_model.pkl").read_bytes()
    assert b"scipy.sparse.csc\ncsc_matrix" in data


@pytest.mark.parametrize("layout", ["flat", "image"])
def test_synthetic_small_files_all_formats(tmp_path, layout, fresh_warnings):
    from flame_ext import synthetic

    d = synthetic.write_assets(
        tmp_path, "small", chumpy=True, texture_layout=layout, model_name="flame2023.pkl"
    )
    model = fio.load_flame_model(d)
    F = model.faces.shape[0]
    emb68 = fio.load_landmark_embedding("68", d / "flame2023.pkl", num_faces=F)
    assert emb68.static_lmk_faces_idx.shape == (51,)
    assert emb68.dynamic_lmk_faces_idx.shape == (79, 17)
    assert emb68.full_lmk_faces_idx.shape == (68,)
    embmp = fio.load_landmark_embedding("mp", d, num_faces=F)
    assert embmp.lmk_faces_idx.shape == (105,)
    with pytest.warns(UserWarning):
        mem68 = fio.load_landmark_embedding("68", "synthetic-small")
    np.testing.assert_array_equal(emb68.dynamic_lmk_bary_coords, mem68.dynamic_lmk_bary_coords)
    bfm = fio.load_texture_space(d, n_tex=3)
    mem_bfm = fio.load_texture_space("synthetic-small", n_tex=3)
    np.testing.assert_array_equal(bfm.basis, mem_bfm.basis)
    assert (bfm.height, bfm.width) == (8, 8)
    flame_tex = fio.load_texture_space(d / "FLAME_texture.npz", n_tex=6)
    assert flame_tex.basis.shape == (8 * 8 * 3, 6)
    assert 0.0 <= flame_tex.mean.min() and flame_tex.mean.max() <= 1.0  # divided by 255
    with pytest.raises(ValueError, match=r"n_tex must be in \[0, P = 6\]"):
        fio.load_texture_space(d / "FLAME_texture.npz", n_tex=7)
