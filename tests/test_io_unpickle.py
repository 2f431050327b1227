"""flame_ext.io's restricted unpickler: hostile pickles (payloads in the model, in
chumpy state, in the landmark file; forged arrays and tensors; attempts to modify or
call allowed globals) are refused by name, and nothing from the file runs."""

import os
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from flame_ext import io as fio
from io_builders import Ch, lmk68_raw, model_raw, py2_pickle, write_lmk68


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
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load.*references"):
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
    with pytest.raises(fio.UnsafePickleError, match="tried to modify numpy.dtype"):
        fio.load_flame_model(path)
    assert fio.unpickle._ALLOWED["numpy", "dtype"]("f8").dtype == np.float64


def test_ndarray_class_cannot_be_called(tmp_path):
    # numpy.ndarray((2**40,)) would allocate 8 TB of address space
    data = _raw_pickle(b"cnumpy\nndarray\n", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R")
    path = tmp_path / "m.pkl"
    path.write_bytes(data)
    with pytest.raises(fio.UnsafePickleError, match="numpy.ndarray may only appear as an arg"):
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
    with pytest.raises(fio.ModelFileError, match=match):
        fio.load_flame_model(path)


class ForgedDtype:
    """Pickles as numpy.dtype(spec) and a chosen state for numpy's dtype.__setstate__."""

    def __init__(self, spec, state):
        self.spec, self.state = spec, state

    def __reduce__(self):
        return np.dtype, (self.spec, False, True), self.state


# What numpy writes for an object dtype, with flags 63 (holds objects, needs zeroing).
_OBJECT_STATE = (3, "|", None, None, None, -1, -1, 63)


@pytest.mark.parametrize(
    "state",
    [
        _OBJECT_STATE[:-1] + (3,),  # told it needs no zeroing: numpy fills unzeroed memory
        _OBJECT_STATE[:-1] + (0,),  # told it holds no objects: the file's bytes as pointers
        _OBJECT_STATE[:5] + (16, 8, 63),  # another item size and alignment
        (3, "|", None, ("x",), {"x": (np.dtype("f8"), 0)}, 8, 8, 63),  # fields
    ],
    ids=["no-init", "no-objects", "itemsize", "fields"],
)
def test_forged_dtype_state_refused(tmp_path, state):
    """A dtype's state other than numpy's own for its spec is refused before any array
    uses it: otherwise a 257-byte file could make numpy read a pointer it holds."""
    data = np.array([1], dtype=object).tobytes()  # 8 bytes: one pointer's worth
    array = ForgedArray((1, (1,), ForgedDtype("O8", state), False, data))
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"f": array}, protocol=2))
    with pytest.raises(fio.UnsafePickleError, match=r"numpy.dtype\('O8'\) with the state"):
        fio.load_flame_model(path)


def test_dtype_state_given_twice_refused(tmp_path):
    # numpy.dtype('f8'), its own state applied with BUILD, then again
    state = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    data = _raw_pickle(b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R", state, state)
    path = tmp_path / "m.pkl"
    path.write_bytes(data)
    with pytest.raises(fio.UnsafePickleError, match="given a state twice"):
        fio.load_flame_model(path)


@pytest.mark.parametrize("dtype", ["<f8", ">f8", ">i4", "u1", "O"])
def test_arrays_of_every_byte_order_and_objects_load(dtype):
    """What numpy writes for these dtypes (either byte order; object arrays) loads as
    numpy's own unpickling gives it, through the dtype checks above."""
    import io

    array = np.arange(6).astype(dtype).reshape(2, 3)
    for protocol in (0, 2, 5):
        data = pickle.dumps({"a": array}, protocol=protocol)
        loaded = fio.unpickle._restricted_load(io.BytesIO(data), "x.pkl")["a"]
        want = pickle.loads(data)["a"]
        assert loaded.dtype == want.dtype and (loaded == array).all()


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
    with pytest.raises(fio.ModelFileError, match="reaches element 999999999 of a storage of 4"):
        fio.load_landmark_embedding("68", path)


def test_tensor_pickle_references_only_allowed_globals():
    """What the installed torch writes for a tensor must stay inside the allow-list."""
    import pickletools

    data = pickle.dumps({"t": torch.arange(6).reshape(2, 3), "a": np.arange(3)}, protocol=2)
    ops = pickletools.genops(data)
    globals_ = {tuple(arg.split(" ", 1)) for op, arg, _ in ops if op.name == "GLOBAL"}
    assert ("torch._utils", "_rebuild_tensor_v2") in globals_
    assert globals_ <= set(fio.unpickle._ALLOWED), globals_ - set(fio.unpickle._ALLOWED)
