"""flame_ext.io on FLAME model pickles: the formats the published files use (pickle
protocols 0 to 5, Python 2 pickles with chumpy and old scipy.sparse objects, uint32 or int64
kintree tables, every file name) and the validation of what they hold."""

import dataclasses
import pickle
import re

import numpy as np
import pytest
import scipy.sparse

from flame_ext import io as fio
from io_builders import (
    FLAME_PARENTS, ROOT_U32, Ch, OldCoo, OldCsc, assert_model_matches, model_raw, py2_pickle,
    write_asset_dir,
)


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
    with pytest.raises(fio.ModelFileError, match="J_regressor.*outside its shape"):
        fio.load_flame_model(path)


def test_chumpy_expression_without_value(tmp_path):
    raw = model_raw(8)
    ch = Ch(raw["shapedirs"])
    del ch.x  # a chumpy expression (e.g. ch_ops.add) stores terms, not 'x'
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle(dict(raw, shapedirs=ch)))
    with pytest.raises(TypeError, match=r"m\.pkl: shapedirs is a chumpy expression") as info:
        fio.load_flame_model(path)
    assert isinstance(info.value, fio.ModelFileError)  # and a TypeError


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
    with pytest.raises(fio.ModelFileError, match=re.escape(str(path)) + ": " + match):
        fio.load_flame_model(path)


def test_negative_face_index(tmp_path):
    raw = model_raw(12)
    raw["f"] = raw["f"].astype(np.int64)
    raw["f"][0, 0] = -1
    with pytest.raises(fio.ModelFileError, match=r"faces \(f\) holds a negative index"):
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
    with pytest.raises(fio.ModelFileError, match=match):
        fio.load_flame_model(_write(tmp_path, raw))


def test_missing_keys_listed(tmp_path):
    raw = model_raw(14)
    del raw["posedirs"], raw["weights"]
    with pytest.raises(fio.ModelFileError, match=r"lacks \['posedirs', 'weights'\]"):
        fio.load_flame_model(_write(tmp_path, raw))


def test_not_a_dict(tmp_path):
    with pytest.raises(fio.ModelFileError, match="expected the FLAME model"):
        fio.load_flame_model(_write(tmp_path, [1, 2, 3]))


def test_n_shape_defaults_to_300_and_bounds(tmp_path):
    raw = model_raw(15, n_shape_key=False)  # 7 columns: a FLAME file must hold 300+
    with pytest.raises(fio.ModelFileError, match="declares 300 shape components"):
        fio.load_flame_model(_write(tmp_path, raw))


def test_dataclass_validates_direct_construction():
    model = fio.parse_flame_model(model_raw(16), "mem")
    message = "mem: shapedirs must have dtype float64, got float32"
    with pytest.raises(TypeError, match=message) as info:
        dataclasses.replace(model, shapedirs=model.shapedirs.astype(np.float32))
    assert isinstance(info.value, fio.ModelFileError)  # and a TypeError
    with pytest.raises(fio.ModelFileError, match=r"mem: n_shape must be in \[0, 7\], got 8"):
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
