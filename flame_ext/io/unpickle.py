"""Restricted unpickling: FLAME's pickles read without running code from the file.

`_restricted_load` resolves only the globals FLAME's files need (numpy / scipy.sparse /
chumpy / torch-tensor reconstructors), each mapped to a safe stand-in that checks its
arguments before anything is allocated; any other global is refused by name with
`UnsafePickleError`. chumpy and scipy.sparse objects become `_StandIn`s that only keep
their pickled state (turned into arrays by the parsers), so neither package needs to be
importable.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict

import numpy as np

from .errors import UnsafePickleError, _fail

try:  # numpy >= 2 moved the pickle reconstructors to numpy._core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray


class _Guarded:
    """An allow-listed global as the unpickler hands it out.

    Pickles may BUILD (setstate) any object they can name; these wrappers refuse it, so a
    file cannot mutate numpy / torch functions or our own helpers for the whole process.
    """

    __slots__ = ("name", "func")

    def __init__(self, name: str, func=None):
        self.name = name
        self.func = func

    def __call__(self, *args):
        if self.func is None:
            raise UnsafePickleError(f"{self.name} may only appear as an argument, not be called")
        return self.func(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle tried to modify {self.name}")

    def __repr__(self):
        return f"<allowed {self.name}>"


_NDARRAY = _Guarded("numpy.ndarray")
_OBJECT = _Guarded("builtins.object")


class _PickledDtype:
    """numpy.dtype(spec) as the unpickler hands it out.

    numpy pickles a dtype as a call and a state that BUILD hands to numpy's own
    dtype.__setstate__, which takes whatever flags, item size or fields the file writes:
    an object dtype told it needs no zeroing, or one that no longer holds objects, makes
    numpy fill or read an array's memory as pointers from the file. The state is
    accepted once, and only when it is the one numpy writes for the spec (in either byte
    order); the arrays, scalars and buffers get the dtype through `_dtype`.
    """

    __slots__ = ("spec", "dtype", "built")

    def __init__(self, spec: str, align: bool, copy: bool):
        self.spec = spec
        self.dtype = np.dtype(spec, align, copy)
        self.built = False

    def __setstate__(self, state):
        if self.built:
            raise UnsafePickleError(f"numpy.dtype({self.spec!r}) given a state twice")
        want = self.dtype
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order in ("<", ">") and want.byteorder != "|":
            want = want.newbyteorder(order)
        if not isinstance(state, tuple) or state != want.__reduce__()[2]:
            raise UnsafePickleError(
                f"numpy.dtype({self.spec!r}) with the state {state!r} refused: not the "
                "state numpy writes for it"
            )
        self.dtype = want
        self.built = True


def _dtype(value, what: str) -> np.dtype:
    if not isinstance(value, _PickledDtype):
        raise pickle.UnpicklingError(f"{what} without a numpy dtype")
    return value.dtype


class _CheckedArray(np.ndarray):
    """ndarray whose pickle state is checked before numpy allocates anything.

    numpy's own __setstate__ allocates the declared shape before comparing it with the
    data it was given; a forged shape would ask for any amount of memory.
    """

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, _, data = state[-4:]
        if not isinstance(shape, tuple) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}")
        dtype = _dtype(dtype, "numpy array")
        state = state[:-3] + (dtype,) + state[-2:]
        count = math.prod(shape)
        if dtype.hasobject:
            if dtype != np.dtype(object) or not isinstance(data, list) or len(data) != count:
                raise pickle.UnpicklingError(
                    f"object array of shape {shape} does not match its {_length(data)} items"
                )
        else:
            if not isinstance(data, (bytes, bytearray, str)):
                raise pickle.UnpicklingError("malformed numpy array data")
            if len(data) != count * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"array of shape {shape} and dtype {dtype} needs "
                    f"{count * dtype.itemsize} bytes, the pickle holds {len(data)}"
                )
        super().__setstate__(state)


def _length(data) -> str:
    return str(len(data)) if isinstance(data, list) else "?"


def _np_reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct called with {subtype!r}, not numpy.ndarray")
    if not isinstance(shape, tuple) or not all(isinstance(s, int) for s in shape):
        raise pickle.UnpicklingError(f"malformed numpy _reconstruct shape {shape!r}")
    if not isinstance(dtype, (str, bytes, _PickledDtype)):
        raise UnsafePickleError(f"numpy _reconstruct with dtype {type(dtype).__name__} refused")
    # numpy always writes (0,): the real shape arrives with __setstate__.
    if math.prod(shape) > 1024 or min(shape, default=0) < 0:
        raise pickle.UnpicklingError(f"numpy _reconstruct with shape {shape} refused")
    dtype = dtype.dtype if isinstance(dtype, _PickledDtype) else np.dtype(dtype)
    return np.ndarray.__new__(_CheckedArray, shape, dtype)


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy.dtype from {type(spec).__name__} refused")
    return _PickledDtype(spec, bool(align), bool(copy))


def _np_scalar(dtype, data=None):
    dtype = _dtype(dtype, "numpy scalar")
    if dtype.hasobject:
        return data
    if isinstance(data, str):  # Python 2 pickles, read as latin1
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"malformed numpy {dtype} scalar")
    return _np_multiarray.scalar(dtype, data)


def _np_frombuffer(buffer, dtype, shape, order):
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError("numpy _frombuffer without a buffer")
    dtype = _dtype(dtype, "numpy _frombuffer")
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy _frombuffer with an object dtype")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text, encoding="latin1"):
    # How protocol-2 pickles written by Python 3 carry bytes.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed for latin1 byte strings")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise UnsafePickleError("bytes(...) is only allowed without arguments")
    return b""


class _StandIn:
    """Object the unpickler builds in place of a chumpy or scipy.sparse class.

    It only keeps its pickled state; `_to_numpy` turns it into an array afterwards.
    """

    origin = ""

    def __setstate__(self, state):
        self._state = state


class _ChumpyStandIn(_StandIn):
    pass


class _SparseStandIn(_StandIn):
    sparse_format = ""


def _copyreg_reconstructor(cls, base, state):
    # Protocol 0/1 spelling of `cls.__new__(cls)`, used by old chumpy / scipy pickles.
    if not (isinstance(cls, type) and issubclass(cls, _StandIn)) or base is not _OBJECT:
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r} refused")
    if state is not None:
        raise UnsafePickleError("copyreg._reconstructor with a base state refused")
    return object.__new__(cls)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        raise pickle.UnpicklingError("the file holds torch tensors; torch is not installed") from e
    return torch


def _torch_load_from_bytes(data):
    torch = _torch()
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch storage without bytes")
    # torch's own restricted loader reads the storage bytes.
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # Only the line that names the refused global: the rest of torch's message
        # suggests loading with weights_only=False, which would run the payload.
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise UnsafePickleError(
                f"torch storage bytes refused by torch's weights-only loader: {refused[0].strip()}"
            ) from None
        raise pickle.UnpicklingError("torch storage bytes that torch cannot read") from None


def _torch_rebuild_tensor(storage, storage_offset, size, stride, *rest):
    torch = _torch()
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"torch tensor rebuilt from {type(storage).__name__} refused")
    if len(rest) > 3 or (len(rest) >= 2 and rest[1]):
        raise UnsafePickleError("torch tensor with backward hooks refused")
    ints = (storage_offset,) + tuple(size) + tuple(stride)
    if len(size) != len(stride) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints
    ):
        raise pickle.UnpicklingError(f"malformed torch tensor size {size} / stride {stride}")
    numel = storage._untyped_storage.nbytes() // storage.dtype.itemsize
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        # torch would silently grow the storage (uninitialised memory) instead of failing.
        if last >= numel:
            raise pickle.UnpicklingError(
                f"torch tensor of size {tuple(size)} reaches element {last} of a storage "
                f"of {numel}"
            )
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _torch_device(*args):
    return _torch().device(*args)


def _torch_size(dims=()):
    return _torch().Size(dims)


def _build_allow_list():
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[module, "_reconstruct"] = _Guarded("numpy._reconstruct", _np_reconstruct)
        allowed[module, "scalar"] = _Guarded("numpy.scalar", _np_scalar)
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[module, "_frombuffer"] = _Guarded("numpy._frombuffer", _np_frombuffer)
    allowed["numpy", "ndarray"] = _NDARRAY
    allowed["numpy", "dtype"] = _Guarded("numpy.dtype", _np_dtype)
    for module in ("copy_reg", "copyreg"):
        allowed[module, "_reconstructor"] = _Guarded(
            "copyreg._reconstructor", _copyreg_reconstructor
        )
    for module in ("__builtin__", "builtins"):
        allowed[module, "object"] = _OBJECT
        allowed[module, "set"] = _Guarded("set", set)
        allowed[module, "frozenset"] = _Guarded("frozenset", frozenset)
    allowed["_codecs", "encode"] = _Guarded("_codecs.encode", _latin1_encode)
    for module in ("__builtin__", "builtins"):
        # Python 3 writes an empty bytes object (a zero-size array's data) as bytes().
        allowed[module, "bytes"] = _Guarded("bytes", _empty_bytes)
    allowed["collections", "OrderedDict"] = _Guarded("collections.OrderedDict", OrderedDict)
    rebuild = _Guarded("torch._utils._rebuild_tensor", _torch_rebuild_tensor)
    allowed["torch._utils", "_rebuild_tensor_v2"] = rebuild
    allowed["torch._utils", "_rebuild_tensor"] = rebuild
    allowed["torch.storage", "_load_from_bytes"] = _Guarded(
        "torch.storage._load_from_bytes", _torch_load_from_bytes
    )
    allowed["torch", "device"] = _Guarded("torch.device", _torch_device)
    allowed["torch", "Size"] = _Guarded("torch.Size", _torch_size)
    storage_kinds = (
        "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
        "Untyped",
    )
    for kind in storage_kinds:
        # Storages travel as bytes through _load_from_bytes; the classes are only data.
        allowed["torch", f"{kind}Storage"] = _Guarded(f"torch.{kind}Storage")
    return allowed


_ALLOWED = _build_allow_list()
_SPARSE_CLASSES = {
    (module, f"{fmt}_{kind}"): fmt
    for fmt in ("csc", "csr", "coo")
    for kind in ("matrix", "array")
    for module in (
        "scipy.sparse", f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}", "scipy.sparse._arrays"
    )
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals FLAME's files need, to safe stand-ins."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._stand_ins = {}

    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stand_in(_ChumpyStandIn, module, name, "")
        fmt = _SPARSE_CLASSES.get((module, name))
        if fmt is not None:
            return self._stand_in(_SparseStandIn, module, name, fmt)
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load: the pickle references {module}.{name}, "
                "which FLAME files never need and which could run code. Nothing from the "
                "file was executed. Only numpy, scipy.sparse, chumpy and torch-tensor "
                "reconstructors are allowed."
            )
        return allowed

    def _stand_in(self, base, module, name, fmt):
        key = (module, name)
        if key not in self._stand_ins:
            # One class per pickled class, so messages can name what the file held.
            attrs = {"origin": f"{module}.{name}", "sparse_format": fmt}
            self._stand_ins[key] = type(name, (base,), attrs)
        return self._stand_ins[key]


def _restricted_load(fp, source: str):
    try:
        return _RestrictedUnpickler(fp, source).load()
    except UnsafePickleError as e:
        if str(e).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: refused to load: {e}") from None
    except Exception as e:  # truncated, corrupt or malformed: one clear error naming the file
        raise _fail(
            source,
            f"cannot read the pickled data (truncated or corrupt file?): {type(e).__name__}: {e}",
        ) from e
