"""FLAME model files: discovery, safe reading, parsing and validation (SPEC sections 4, 7).

Three layers, so that files on disk and the in-memory synthetic assets go through the same
checks:

- discovery (`find_data_dir`, `_locate`): which file to read, or the synthetic assets;
- readers (`_read_pickle_file`, `_read_landmark_npy`, `_read_npz`, `_load_texture_file`):
  bytes -> the raw objects the files hold, through a restricted unpickler that never runs
  code from the file (only numpy / scipy.sparse / chumpy / torch-tensor reconstructors,
  each mapped to a safe stand-in);
- parsers (`parse_*`): raw objects -> the frozen dataclasses below, validated, every error
  naming the file and the problem.

The dataclasses hold plain numpy arrays and check their own consistency on construction.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import os
import pickle
import struct
import sys
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

try:  # numpy >= 2 moved the pickle reconstructors to numpy._core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

__all__ = [
    "ENV_VAR",
    "MODEL_FILE_NAMES",
    "TEXTURE_FILE_NAMES",
    "LANDMARK_FILE_NAMES",
    "FlameModel",
    "LandmarkEmbedding68",
    "MediapipeEmbedding",
    "TextureSpace",
    "UnsafePickleError",
    "find_data_dir",
    "load_flame_model",
    "load_landmark_embedding",
    "load_texture_space",
    "parse_flame_model",
    "parse_landmark_embedding_68",
    "parse_mediapipe_embedding",
    "parse_texture_space",
]

ENV_VAR = "FLAME_EXT_DATA"
MODEL_FILE_NAMES = (
    "generic_model.pkl",
    "FLAME_NEUTRAL.pkl",
    "flame2023.pkl",
    "flame2023_Open.pkl",
    "flame2023_no_jaw.pkl",
)
TEXTURE_FILE_NAMES = ("FLAME_albedo_from_BFM.npz", "FLAME_texture.npz")
LANDMARK_FILE_NAMES = {
    "68": "landmark_embedding.npy",
    "mp": "mediapipe_landmark_embedding.npz",
}

# FLAME files put 300 shape columns before the expression ones; the small synthetic
# variant declares its own split under this key.
FLAME_N_SHAPE = 300
N_SHAPE_KEY = "flame_ext_n_shape"

_SYNTHETIC_SIZES = {"synthetic": "full", "synthetic-small": "small"}
_MODEL_KEYS = (
    "f", "v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights"
)
_LMK68_KEYS = (
    "static_lmk_faces_idx",
    "static_lmk_bary_coords",
    "dynamic_lmk_faces_idx",
    "dynamic_lmk_bary_coords",
    "full_lmk_faces_idx",
    "full_lmk_bary_coords",
)
_MP_KEYS = ("lmk_face_idx", "lmk_b_coords", "landmark_indices")

# A real .npy header is a few hundred bytes; the cap keeps a corrupt length field from
# making us read (and allocate) gigabytes.
_MAX_NPY_HEADER = 1 << 16
# Densifying a sparse matrix is bounded so a forged shape cannot ask for terabytes.
_MAX_DENSE_ELEMENTS = 1 << 28
# Nested lists are accepted as arrays up to this many elements (FLAME files hold arrays;
# a list is at most a small table). Pickled lists can share structure through the memo:
# three levels of 1000 references to one list are 1e9 elements from a 28 KB file.
_MAX_LIST_ELEMENTS = 1 << 20
# The largest float32: model values beyond it would become inf in the float32 decoders.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Texture bases are converted in chunks of about this many source bytes.
_CHUNK_BYTES = 1 << 26

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------
# Dataclasses


class _FormatError(ValueError):
    """A file (or in-memory asset) that does not hold what it should; names the source."""


def _fail(source: str, message: str) -> ValueError:
    return _FormatError(f"{source}: {message}")


def _expect_array(source: str, name: str, value, dtype, ndim: int) -> None:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{source}: {name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{source}: {name} must have dtype {np.dtype(dtype)}, got {value.dtype}")
    if value.ndim != ndim:
        raise _fail(source, f"{name} must have {ndim} dimensions, got shape {value.shape}")


def _expect_shape(source: str, name: str, value: np.ndarray, expected, label: str) -> None:
    """`expected` entries that are None match any size; `label` names the sizes."""
    ok = len(expected) == value.ndim and all(
        want is None or want == got for want, got in zip(expected, value.shape)
    )
    if not ok:
        sizes = "(" + ", ".join("*" if s is None else str(s) for s in expected) + ")"
        raise _fail(source, f"{name} must have shape {label} = {sizes}, got {value.shape}")


def _expect_finite(source: str, name: str, value: np.ndarray) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        bad = value.size - int(np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise _fail(source, f"{name} holds {bad} non-finite values (NaN or inf), first at {first}")
    # The decoders compute in float32 by default, where these would be inf.
    huge = np.abs(value) > _FLOAT32_MAX
    if huge.any():
        first = tuple(int(i) for i in np.argwhere(huge)[0])
        raise _fail(
            source,
            f"{name} holds {int(np.count_nonzero(huge))} values beyond the float32 range "
            f"(|x| > {_FLOAT32_MAX:.4g}), first {value[first]!r} at {first}",
        )


def _expect_indices(source: str, name: str, value: np.ndarray, upper: Optional[int], what: str):
    if value.size == 0:
        return
    low, high = int(value.min()), int(value.max())
    if low < 0:
        raise _fail(source, f"{name} holds a negative index ({low})")
    if upper is not None and high >= upper:
        raise _fail(source, f"{name} holds index {high}, but there are only {upper} {what}")


def _expect_int(source: str, name: str, value, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{source}: {name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(source, f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


@dataclass(frozen=True, eq=False)
class FlameModel:
    """The FLAME model arrays, validated: every array agrees on V, F and the joint count J."""

    faces: np.ndarray  # (F, 3) int64, 0 <= faces < V
    v_template: np.ndarray  # (V, 3) float64
    shapedirs: np.ndarray  # (V, 3, S + E) float64, the S shape columns first
    n_shape: int  # S
    posedirs: np.ndarray  # (V, 3, 9 * (J - 1)) float64
    J_regressor: np.ndarray  # (J, V) float64, dense
    parents: np.ndarray  # (J,) int64, parents[0] = -1, 0 <= parents[j] < j
    lbs_weights: np.ndarray  # (V, J) float64
    source: str  # the file, or 'synthetic:full' / 'synthetic:small'

    @property
    def n_expr(self) -> int:
        return self.shapedirs.shape[2] - self.n_shape

    def __post_init__(self):
        src = self.source
        _expect_array(src, "v_template", self.v_template, np.float64, 2)
        V = self.v_template.shape[0]
        _expect_shape(src, "v_template", self.v_template, (V, 3), "(V, 3)")
        if V == 0:
            raise _fail(src, "v_template has no vertices")
        _expect_array(src, "faces (f)", self.faces, np.int64, 2)
        _expect_shape(src, "faces (f)", self.faces, (None, 3), "(F, 3)")
        if self.faces.shape[0] == 0:
            raise _fail(src, "faces (f) has no faces")
        _expect_indices(src, "faces (f)", self.faces, V, "vertices in v_template")
        _expect_array(src, "shapedirs", self.shapedirs, np.float64, 3)
        _expect_shape(src, "shapedirs", self.shapedirs, (V, 3, None), "(V, 3, K)")
        _expect_int(src, "n_shape", self.n_shape, 0, self.shapedirs.shape[2])
        _expect_array(src, "parents (kintree_table)", self.parents, np.int64, 1)
        J = self.parents.shape[0]
        if J == 0:
            raise _fail(src, "the kinematic tree (kintree_table) has no joints")
        if self.parents[0] != -1:
            raise _fail(src, f"the root joint's parent must be -1, got {self.parents[0]}")
        children = np.arange(1, J)
        bad = np.flatnonzero((self.parents[1:] < 0) | (self.parents[1:] >= children))
        if bad.size:
            j = int(children[bad[0]])
            raise _fail(
                src,
                f"joint {j} has parent {self.parents[j]}; parents must come before their "
                "children (0 <= parent < joint)",
            )
        _expect_array(src, "posedirs", self.posedirs, np.float64, 3)
        _expect_shape(src, "posedirs", self.posedirs, (V, 3, 9 * (J - 1)), "(V, 3, 9*(J-1))")
        _expect_array(src, "J_regressor", self.J_regressor, np.float64, 2)
        _expect_shape(src, "J_regressor", self.J_regressor, (J, V), "(J, V)")
        _expect_array(src, "lbs_weights (weights)", self.lbs_weights, np.float64, 2)
        _expect_shape(src, "lbs_weights (weights)", self.lbs_weights, (V, J), "(V, J)")
        for name in ("v_template", "shapedirs", "posedirs", "J_regressor", "lbs_weights"):
            _expect_finite(src, name, getattr(self, name))


def _check_embedding(src: str, prefix: str, faces: np.ndarray, bary: np.ndarray, ndim: int):
    _expect_array(src, f"{prefix}_faces_idx", faces, np.int64, ndim)
    _expect_array(src, f"{prefix}_bary_coords", bary, np.float64, ndim + 1)
    _expect_shape(
        src, f"{prefix}_bary_coords", bary, faces.shape + (3,), f"{prefix}_faces_idx.shape + (3,)"
    )
    _expect_indices(src, f"{prefix}_faces_idx", faces, None, "faces")
    _expect_finite(src, f"{prefix}_bary_coords", bary)


@dataclass(frozen=True, eq=False)
class LandmarkEmbedding68:
    """iBUG-68 landmark embedding: static points, contour points per yaw bin, full 68 set."""

    static_lmk_faces_idx: np.ndarray  # (L,) int64
    static_lmk_bary_coords: np.ndarray  # (L, 3) float64
    dynamic_lmk_faces_idx: np.ndarray  # (NB, Ld) int64
    dynamic_lmk_bary_coords: np.ndarray  # (NB, Ld, 3) float64
    full_lmk_faces_idx: np.ndarray  # (68,) int64
    full_lmk_bary_coords: np.ndarray  # (68, 3) float64
    source: str

    def __post_init__(self):
        for prefix, ndim in (("static_lmk", 1), ("dynamic_lmk", 2), ("full_lmk", 1)):
            faces = getattr(self, f"{prefix}_faces_idx")
            bary = getattr(self, f"{prefix}_bary_coords")
            _check_embedding(self.source, prefix, faces, bary, ndim)

    def max_face_index(self) -> int:
        arrays = (self.static_lmk_faces_idx, self.dynamic_lmk_faces_idx, self.full_lmk_faces_idx)
        return max((int(a.max()) for a in arrays if a.size), default=-1)


@dataclass(frozen=True, eq=False)
class MediapipeEmbedding:
    """MediaPipe landmark embedding: one face and barycentric weights per landmark."""

    lmk_faces_idx: np.ndarray  # (L,) int64 (file: lmk_face_idx)
    lmk_bary_coords: np.ndarray  # (L, 3) float64 (file: lmk_b_coords)
    landmark_indices: np.ndarray  # (L,) int64: the MediaPipe point each landmark is
    source: str

    def __post_init__(self):
        _check_embedding(self.source, "lmk", self.lmk_faces_idx, self.lmk_bary_coords, 1)
        _expect_array(self.source, "landmark_indices", self.landmark_indices, np.int64, 1)
        _expect_shape(
            self.source, "landmark_indices", self.landmark_indices,
            self.lmk_faces_idx.shape, "(L,) like lmk_faces_idx",
        )
        _expect_indices(self.source, "landmark_indices", self.landmark_indices, None, "")

    def max_face_index(self) -> int:
        return int(self.lmk_faces_idx.max()) if self.lmk_faces_idx.size else -1


@dataclass(frozen=True, eq=False)
class TextureSpace:
    """Linear albedo model, flat in (h, w, c) order, values on the 0..1 scale."""

    mean: np.ndarray  # (H*W*3,) float32
    basis: np.ndarray  # (H*W*3, n_tex) float32
    height: int
    width: int
    source: str

    @property
    def n_tex(self) -> int:
        return self.basis.shape[1]

    def __post_init__(self):
        src = self.source
        for name in ("height", "width"):
            _expect_int(src, name, getattr(self, name), 1, 1 << 20)
        n = self.height * self.width * 3
        _expect_array(src, "mean", self.mean, np.float32, 1)
        _expect_shape(src, "mean", self.mean, (n,), "(H*W*3,)")
        _expect_array(src, "basis", self.basis, np.float32, 2)
        _expect_shape(src, "basis", self.basis, (n, None), "(H*W*3, n_tex)")
        _expect_finite(src, "mean", self.mean)
        _expect_finite(src, "basis", self.basis)


# --------------------------------------------------------------------------------------
# Restricted unpickler


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; nothing it referenced was run."""


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
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError("malformed numpy array dtype")
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
    if not isinstance(dtype, (str, bytes, np.dtype)):
        raise UnsafePickleError(f"numpy _reconstruct with dtype {type(dtype).__name__} refused")
    # numpy always writes (0,): the real shape arrives with __setstate__.
    if math.prod(shape) > 1024 or min(shape, default=0) < 0:
        raise pickle.UnpicklingError(f"numpy _reconstruct with shape {shape} refused")
    return np.ndarray.__new__(_CheckedArray, shape, np.dtype(dtype))


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy.dtype from {type(spec).__name__} refused")
    return np.dtype(spec, bool(align), bool(copy))


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a dtype")
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
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
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
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


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


# --------------------------------------------------------------------------------------
# Raw values -> numpy


def _sparse_to_dense(obj: _SparseStandIn, source: str, key: str) -> np.ndarray:
    state = getattr(obj, "_state", None)
    where = f"{key} ({obj.origin})"
    if not isinstance(state, dict):
        raise _fail(source, f"{where} has no sparse-matrix state")
    shape = state.get("_shape", state.get("shape"))
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in shape)
    ):
        raise _fail(source, f"{where} has a malformed shape {shape!r}")
    rows, cols = (int(s) for s in shape)
    if rows * cols > _MAX_DENSE_ELEMENTS:
        raise _fail(source, f"{where} has shape {shape}, too large to densify")

    def field(name, kind):
        if name not in state:
            raise _fail(source, f"{where} lacks its '{name}' array")
        arr = np.asarray(_to_numpy(state[name], source, f"{key}.{name}"))
        if arr.ndim != 1 or arr.dtype.kind not in kind:
            raise _fail(source, f"{where}.{name} must be a 1-d array, got {arr.dtype} {arr.shape}")
        return arr

    data = field("data", "fiub")
    fmt = obj.sparse_format
    if fmt in ("csc", "csr"):
        indices, indptr = field("indices", "iu"), field("indptr", "iu").astype(np.int64)
        n_major, n_minor = (cols, rows) if fmt == "csc" else (rows, cols)
        nnz = int(indptr[-1]) if indptr.size else -1
        if (
            indptr.size != n_major + 1
            or indptr[0] != 0
            or np.any(np.diff(indptr) < 0)
            or not 0 <= nnz <= min(indices.size, data.size)
        ):
            raise _fail(source, f"{where} has an inconsistent index pointer (indptr)")
        minor = indices[:nnz].astype(np.int64)
        major = np.repeat(np.arange(n_major, dtype=np.int64), np.diff(indptr))
        r, c = (minor, major) if fmt == "csc" else (major, minor)
        data = data[:nnz]
    else:
        if "coords" in state:
            coords = state["coords"]
            if not isinstance(coords, tuple) or len(coords) != 2:
                raise _fail(source, f"{where} has malformed coords")
            state = dict(state, row=coords[0], col=coords[1])
        r, c = field("row", "iu").astype(np.int64), field("col", "iu").astype(np.int64)
        if not r.size == c.size == data.size:
            raise _fail(source, f"{where}: row, col and data lengths differ")
    if r.size and (r.min() < 0 or r.max() >= rows or c.min() < 0 or c.max() >= cols):
        raise _fail(source, f"{where} holds an index outside its shape {shape}")
    dense = np.zeros((rows, cols), dtype=np.float64)
    np.add.at(dense, (r, c), data.astype(np.float64))  # duplicates sum, as in scipy
    return dense


def _to_numpy(value, source: str, key: str, depth: int = 0):
    """Turns what a file holds for `key` (array, chumpy, sparse, tensor) into an ndarray."""
    if isinstance(value, np.ndarray):
        return np.asarray(value)  # drops the _CheckedArray subclass
    if isinstance(value, _ChumpyStandIn):
        state = getattr(value, "_state", None)
        if not isinstance(state, dict) or "x" not in state or depth > 8:
            raise TypeError(
                f"{source}: {key} is a chumpy expression ({value.origin}) without a stored "
                "value; re-save the model with plain numpy arrays"
            )
        return _to_numpy(state["x"], source, key, depth + 1)
    if isinstance(value, _SparseStandIn):
        return _sparse_to_dense(value, source, key)
    module = type(value).__module__ or ""
    if module.startswith("scipy.sparse") and hasattr(value, "toarray"):
        return np.asarray(value.toarray())  # in-memory synthetic assets hold real scipy objects
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            value = value.double()
        return value.numpy()
    if isinstance(value, (list, tuple)):
        _check_list_size(value, source, key)
        return np.asarray(value)
    if isinstance(value, (np.generic, int, float)):
        return np.asarray(value)
    raise TypeError(f"{source}: {key} must be an array, got {type(value).__name__}")


def _check_list_size(value, source: str, key: str) -> None:
    """Refuses nested lists of more than _MAX_LIST_ELEMENTS items before numpy expands
    them; the walk stops as soon as the count passes the limit, so shared sub-lists (a
    memo bomb) cost at most that many steps."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            count += len(item)
            if count > _MAX_LIST_ELEMENTS:
                raise _fail(
                    source,
                    f"{key} is a nested list of more than {_MAX_LIST_ELEMENTS} items; FLAME "
                    "files hold arrays (a corrupt or hostile file?)",
                )
            stack.extend(item)


def _numeric(value, source: str, key: str, kinds: str, dtype) -> np.ndarray:
    arr = _to_numpy(value, source, key)
    if arr.dtype.kind not in kinds:
        what = "an integer" if kinds == "iu" else "a numeric"
        raise TypeError(f"{source}: {key} must be {what} array, got dtype {arr.dtype}")
    # Always a private, writable copy: in-memory assets are shared caches, and
    # torch.from_numpy warns on the read-only arrays np.frombuffer gives.
    return np.array(arr, dtype=dtype, order="C")


def _floats(value, source, key):
    return _numeric(value, source, key, "fiu", np.float64)


def _ints(value, source, key):
    # uint32 -> int64 keeps every value; the root marker 4294967295 is handled by the caller.
    return _numeric(value, source, key, "iu", np.int64)


def _require_keys(raw, keys, source: str, what: str) -> None:
    if not isinstance(raw, Mapping):
        raise _fail(source, f"expected {what} (a dict of arrays), got {type(raw).__name__}")
    missing = [k for k in keys if k not in raw]
    if missing:
        present = sorted(str(k) for k in raw.keys())
        raise _fail(source, f"{what} lacks {missing}; it holds {present}")


def _unwrap_object_array(value, source: str):
    # np.load(...) gives a 0-d object array; np.load(...)[()] the dict inside.
    if isinstance(value, np.ndarray):
        if value.dtype != object or value.shape != ():
            raise _fail(
                source, f"expected a pickled dict, got an array {value.dtype} {value.shape}"
            )
        return value[()]
    return value


# --------------------------------------------------------------------------------------
# Parsers: raw objects -> validated dataclasses


def _parents_from_kintree(kintree: np.ndarray, source: str) -> np.ndarray:
    if kintree.ndim != 2 or kintree.shape[0] != 2 or kintree.shape[1] == 0:
        raise _fail(source, f"kintree_table must have shape (2, J), got {kintree.shape}")
    J = kintree.shape[1]
    ids = kintree[1]
    if np.array_equal(ids, np.arange(J)):
        parents = kintree[0].copy()
    else:  # the second row names the joints; map parent names to columns
        column = {int(i): c for c, i in enumerate(ids)}
        if len(column) != J:
            raise _fail(source, f"kintree_table names a joint twice: {ids.tolist()}")
        parents = np.empty(J, dtype=np.int64)
        for c in range(1, J):
            pid = int(kintree[0, c])
            if pid not in column:
                raise _fail(source, f"kintree_table: joint {ids[c]} has unknown parent {pid}")
            parents[c] = column[pid]
    # The root's "no parent" is 4294967295 (uint32 -1) in FLAME files; set it on the int64
    # copy, which numpy 2 allows where uint32[0] = -1 would raise.
    parents[0] = -1
    return parents


def parse_flame_model(raw: Mapping, source: str) -> FlameModel:
    """Parses the dict a FLAME model pickle holds (after the restricted unpickler)."""
    _require_keys(raw, _MODEL_KEYS, source, "the FLAME model")
    n_shape = raw.get(N_SHAPE_KEY, FLAME_N_SHAPE)
    if isinstance(n_shape, np.ndarray) and n_shape.shape == ():
        n_shape = n_shape[()]
    if isinstance(n_shape, (bool, np.bool_)) or not isinstance(n_shape, (int, np.integer)):
        raise TypeError(f"{source}: {N_SHAPE_KEY} must be an int, got {type(n_shape).__name__}")
    shapedirs = _floats(raw["shapedirs"], source, "shapedirs")
    if shapedirs.ndim == 3 and not 0 <= n_shape <= shapedirs.shape[2]:
        raise _fail(
            source,
            f"the model declares {n_shape} shape components but shapedirs has only "
            f"{shapedirs.shape[2]} columns (shape {shapedirs.shape})",
        )
    return FlameModel(
        faces=_ints(raw["f"], source, "f"),
        v_template=_floats(raw["v_template"], source, "v_template"),
        shapedirs=shapedirs,
        n_shape=int(n_shape),
        posedirs=_floats(raw["posedirs"], source, "posedirs"),
        J_regressor=_floats(raw["J_regressor"], source, "J_regressor"),
        parents=_parents_from_kintree(_ints(raw["kintree_table"], source, "kintree_table"), source),
        lbs_weights=_floats(raw["weights"], source, "weights"),
        source=source,
    )


def _check_num_faces(num_faces) -> Optional[int]:
    if num_faces is None:
        return None
    if isinstance(num_faces, (bool, np.bool_)) or not isinstance(num_faces, (int, np.integer)):
        raise TypeError(f"num_faces must be an int or None, got {type(num_faces).__name__}")
    if num_faces < 1:
        raise ValueError(f"num_faces must be positive, got {num_faces}")
    return int(num_faces)


def _check_face_range(embedding, num_faces: Optional[int]):
    if num_faces is not None and embedding.max_face_index() >= num_faces:
        raise _fail(
            embedding.source,
            f"a landmark sits on face {embedding.max_face_index()}, but the model has only "
            f"{num_faces} faces: the embedding does not belong to this mesh",
        )
    return embedding


def parse_landmark_embedding_68(
    raw, source: str, num_faces: Optional[int] = None
) -> LandmarkEmbedding68:
    """Parses the dict in landmark_embedding.npy (numpy arrays and torch tensors)."""
    num_faces = _check_num_faces(num_faces)
    raw = _unwrap_object_array(raw, source)
    _require_keys(raw, _LMK68_KEYS, source, "the 68-landmark embedding")
    full_faces = _ints(raw["full_lmk_faces_idx"], source, "full_lmk_faces_idx")
    full_bary = _floats(raw["full_lmk_bary_coords"], source, "full_lmk_bary_coords")
    # The file stores the full set with a leading batch axis: (1, 68) and (1, 68, 3).
    if full_faces.ndim == 2 and full_faces.shape[0] == 1:
        full_faces = full_faces[0]
    if full_bary.ndim == 3 and full_bary.shape[0] == 1:
        full_bary = full_bary[0]
    indices = ("static_lmk_faces_idx", "dynamic_lmk_faces_idx")
    weights = ("static_lmk_bary_coords", "dynamic_lmk_bary_coords")
    embedding = LandmarkEmbedding68(
        **{k: _ints(raw[k], source, k) for k in indices},
        **{k: _floats(raw[k], source, k) for k in weights},
        full_lmk_faces_idx=np.ascontiguousarray(full_faces),
        full_lmk_bary_coords=np.ascontiguousarray(full_bary),
        source=source,
    )
    return _check_face_range(embedding, num_faces)


def parse_mediapipe_embedding(
    raw, source: str, num_faces: Optional[int] = None
) -> MediapipeEmbedding:
    """Parses the arrays of mediapipe_landmark_embedding.npz."""
    num_faces = _check_num_faces(num_faces)
    _require_keys(raw, _MP_KEYS, source, "the MediaPipe landmark embedding")
    embedding = MediapipeEmbedding(
        lmk_faces_idx=_ints(raw["lmk_face_idx"], source, "lmk_face_idx"),
        lmk_bary_coords=_floats(raw["lmk_b_coords"], source, "lmk_b_coords"),
        landmark_indices=_ints(raw["landmark_indices"], source, "landmark_indices"),
        source=source,
    )
    return _check_face_range(embedding, num_faces)


class _InMemoryArray:
    """An ndarray behind the interface of `_NpzMember`, so both parse the same way."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def read(self) -> np.ndarray:
        return self.array

    def leading_chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.shape[0], rows):
            yield self.array[start : start + rows]


class _NpzMember:
    """One array of an .npz archive, read whole or in chunks along its first axis.

    Streaming lets the texture loader keep n_tex of the basis's columns without first
    holding the whole float64 basis (1.25 GB for FLAME_albedo_from_BFM.npz) in memory.
    """

    def __init__(self, archive: zipfile.ZipFile, member: str, source: str, key: str):
        self.archive, self.member, self.where = archive, member, f"{source}[{key}]"
        with _archive_errors(self.where):
            info = archive.getinfo(member)
            with archive.open(member) as fp:
                self.shape, self.fortran_order, self.dtype = _read_npy_header(fp, self.where)
                header_bytes = fp.tell()
        if self.dtype.hasobject:
            raise _fail(self.where, "is an object array (pickled data); refusing to load it")
        _check_member_size(info, self.where)
        # numpy allocates the declared shape before reading: a forged header must not get
        # that far.
        declared = math.prod(self.shape) * self.dtype.itemsize
        present = info.file_size - header_bytes
        if declared > present:
            raise _fail(
                self.where,
                f"declares an array of shape {self.shape} and dtype {self.dtype} "
                f"({declared} bytes) but holds {present} bytes of data: truncated or corrupt",
            )

    def read(self) -> np.ndarray:
        with _archive_errors(self.where), self.archive.open(self.member) as fp:
            return np.lib.format.read_array(fp, allow_pickle=False)

    def leading_chunks(self, rows: int) -> Iterator[np.ndarray]:
        if self.fortran_order or not self.shape:  # rows are not contiguous: read it whole
            yield from _InMemoryArray(self.read()).leading_chunks(rows)
            return
        row_shape = self.shape[1:]
        row_bytes = math.prod(row_shape) * self.dtype.itemsize
        with _archive_errors(self.where), self.archive.open(self.member) as fp:
            _read_npy_header(fp, self.where)
            for start in range(0, self.shape[0], rows):
                n = min(rows, self.shape[0] - start)
                data = _read_exact(fp, n * row_bytes, self.where, "array data")
                yield np.frombuffer(data, dtype=self.dtype).reshape((n,) + row_shape)


# Deflate expands at most 1032:1, so a member's stated size is bounded by its compressed
# one (numpy's savez stores, savez_compressed deflates; it never uses other methods).
_DEFLATE_MAX_RATIO = 1032


def _check_member_size(info: zipfile.ZipInfo, where: str) -> None:
    """The uncompressed size an archive member states must be one its bytes can yield:
    it bounds what numpy allocates for the member before reading it."""
    if info.compress_type == zipfile.ZIP_STORED:
        ok = info.file_size == info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        ok = info.file_size <= _DEFLATE_MAX_RATIO * info.compress_size + 1024
    else:
        raise _fail(where, f"compressed with zip method {info.compress_type}, which numpy "
                    "never writes; refusing to read it")
    if not ok:
        raise _fail(
            where,
            f"states {info.file_size} bytes uncompressed from {info.compress_size} stored "
            "bytes: corrupt archive",
        )


def _array_source(value, source: str, key: str):
    if isinstance(value, (_NpzMember, _InMemoryArray)):
        return value
    return _InMemoryArray(_to_numpy(value, source, key))


def _texture_grid(mean_shape, basis_shape, source, keys) -> Tuple[int, int, int]:
    """(H, W, P) from flat (N,) / (N, P) or image (H, W, 3) / (H, W, 3, P) layouts."""
    mean_key, basis_key = keys
    if len(basis_shape) == 4 and basis_shape[2] == 3:
        hw = basis_shape[:2]
    elif len(basis_shape) == 2:
        hw = None
    else:
        raise _fail(
            source, f"{basis_key} must have shape (H*W*3, P) or (H, W, 3, P), got {basis_shape}"
        )
    n, P = math.prod(basis_shape[:-1]), basis_shape[-1]
    if len(mean_shape) == 3 and mean_shape[2] == 3:
        if hw is not None and tuple(mean_shape[:2]) != tuple(hw):
            raise _fail(source, f"{mean_key} {mean_shape} and {basis_key} {basis_shape} "
                        "disagree on H, W")
        hw = mean_shape[:2]
    elif len(mean_shape) != 1:
        raise _fail(source, f"{mean_key} must have shape (H*W*3,) or (H, W, 3), got {mean_shape}")
    if math.prod(mean_shape) != n:
        raise _fail(source, f"{mean_key} {mean_shape} and {basis_key} {basis_shape} "
                    "disagree on H*W*3")
    if hw is None:  # flat arrays: the published files hold square textures
        side = math.isqrt(n // 3)
        if n == 0 or n % 3 or side * side * 3 != n:
            raise _fail(
                source,
                f"flat {mean_key} has {n} values, which is not H*W*3 for a square H == W texture",
            )
        hw = (side, side)
    return int(hw[0]), int(hw[1]), int(P)


def parse_texture_space(raw: Mapping, source: str, n_tex: int = 50) -> TextureSpace:
    """Parses a texture archive's arrays: MU / PC (0..1) or mean / tex_dir (0..255).

    Values of the mapping may be ndarrays or lazy npz members (see `_NpzArchive`).
    """
    if not isinstance(raw, Mapping):
        raise _fail(source, f"expected a dict of texture arrays, got {type(raw).__name__}")
    if "MU" in raw and "PC" in raw:
        keys, divisor = ("MU", "PC"), None
    elif "mean" in raw and "tex_dir" in raw:
        keys, divisor = ("mean", "tex_dir"), 255.0
    else:
        raise _fail(
            source,
            "a texture space needs MU and PC (FLAME_albedo_from_BFM.npz) or mean and tex_dir "
            f"(FLAME_texture.npz); it holds {sorted(raw.keys())}",
        )
    mean_src, basis_src = (_array_source(raw[k], source, k) for k in keys)
    for key, src in zip(keys, (mean_src, basis_src)):
        if src.dtype.kind not in "fiu":
            raise TypeError(f"{source}: {key} must be a numeric array, got dtype {src.dtype}")
    height, width, P = _texture_grid(mean_src.shape, basis_src.shape, source, keys)
    if isinstance(n_tex, (bool, np.bool_)) or not isinstance(n_tex, (int, np.integer)):
        raise TypeError(f"n_tex must be an int, got {type(n_tex).__name__} ({source} has P = {P})")
    if not 0 <= n_tex <= P:
        raise ValueError(f"n_tex must be in [0, P = {P}] for {source}, got n_tex = {n_tex}")
    n_tex = int(n_tex)

    mean = mean_src.read().reshape(-1).astype(np.float64)
    if divisor is not None:
        mean /= divisor
    n = mean.size
    basis = np.empty((n, n_tex), dtype=np.float32)
    row_bytes = max(1, math.prod(basis_src.shape[1:]) * basis_src.dtype.itemsize)
    rows = max(1, _CHUNK_BYTES // row_bytes)
    start = 0
    chunks = basis_src.leading_chunks(rows) if n_tex else ()  # n_tex = 0 needs no basis
    for chunk in chunks:
        block = chunk.reshape(-1, P)[:, :n_tex]
        if divisor is not None:  # in float64, rounded once to float32 below
            block = block.astype(np.float64) / divisor
        basis[start : start + block.shape[0]] = block
        start += block.shape[0]
    if n_tex and start != n:
        raise _fail(source, f"{keys[1]} ended after {start} of {n} rows")
    return TextureSpace(
        mean=mean.astype(np.float32), basis=basis, height=height, width=width, source=source
    )


# --------------------------------------------------------------------------------------
# File readers


def _read_exact(fp, size: int, source: str, what: str) -> bytes:
    data = fp.read(size)
    while len(data) < size:
        more = fp.read(size - len(data))
        if not more:
            raise _fail(source, f"file is truncated: {what} needs {size} bytes, found {len(data)}")
        data += more
    return data


def _read_npy_header(fp, source: str):
    """(shape, fortran_order, dtype) of the .npy stream at `fp`, with a bounded header."""
    try:
        major, _ = np.lib.format.read_magic(fp)
    except ValueError as e:
        raise _fail(source, f"not an .npy file ({e})") from e
    if major not in (1, 2, 3):
        raise _fail(source, f"unsupported .npy format version {major}")
    length_format = "<H" if major == 1 else "<I"
    length_bytes = _read_exact(fp, struct.calcsize(length_format), source, ".npy header length")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > _MAX_NPY_HEADER:
        raise _fail(
            source, f".npy header claims {length} bytes (at most {_MAX_NPY_HEADER}); corrupt file"
        )
    header = io.BytesIO(length_bytes + _read_exact(fp, length, source, ".npy header"))
    fmt = np.lib.format
    reader = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
    try:
        return reader(header, max_header_size=_MAX_NPY_HEADER)
    except Exception as e:  # ValueError, SyntaxError, tokenize.TokenError, ...: all malformed
        raise _fail(source, f"malformed .npy header ({type(e).__name__}: {e})") from e


def _check_file(path: Path) -> str:
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise _fail(source, "file is empty")
    return source


def _read_pickle_file(path: Path):
    source = _check_file(path)
    with open(path, "rb") as fp:
        return _restricted_load(fp, source)


def _read_landmark_npy(path: Path):
    # np.load(allow_pickle=True) would run whatever the pickle asks for; we read the
    # header ourselves and hand the rest to the restricted unpickler.
    source = _check_file(path)
    with open(path, "rb") as fp:
        shape, _, dtype = _read_npy_header(fp, source)
        if dtype != np.dtype(object) or shape != ():
            raise _fail(
                source,
                f"expected a pickled dict (a 0-d object array written by np.save), got an "
                f"array of dtype {dtype} and shape {shape}",
            )
        return _unwrap_object_array(_restricted_load(fp, source), source)


@contextlib.contextmanager
def _archive_errors(source: str):
    """Turns zip / zlib / numpy errors from a damaged archive into one naming the file."""
    try:
        yield
    except _FormatError:
        raise
    except (
        zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError, struct.error,
        # zipfile: NotImplementedError for a damaged compression method or version field,
        # RuntimeError for a member flagged as encrypted.
        RuntimeError,
    ) as e:
        raise _fail(
            source, f"cannot read the archive (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _read_npz(path: Path) -> dict:
    # Member by member through _NpzMember, which checks each header against the bytes
    # present before numpy allocates anything.
    source = _check_file(path)
    with _archive_errors(source):
        archive = zipfile.ZipFile(path)
    with archive:
        members = _NpzArchive(archive, source)
        return {key: members[key].read() for key in members}


class _NpzArchive(Mapping):
    """Lazy view of an .npz archive's arrays, each an `_NpzMember`."""

    def __init__(self, archive: zipfile.ZipFile, source: str):
        self._members = {
            name[: -len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")
        }
        self._archive, self._source = archive, source

    def __getitem__(self, key):
        return _NpzMember(self._archive, self._members[key], self._source, key)

    def __iter__(self):
        return iter(self._members)

    def __len__(self):
        return len(self._members)


def _load_texture_file(path: Path, n_tex) -> TextureSpace:
    source = _check_file(path)
    with _archive_errors(source):
        archive = zipfile.ZipFile(path)
    with archive:  # member errors are named by _NpzMember; n_tex errors pass through
        return parse_texture_space(_NpzArchive(archive, source), source, n_tex)


# --------------------------------------------------------------------------------------
# Discovery


class _Synthetic(NamedTuple):
    size: str  # 'full' or 'small'

    @property
    def source(self) -> str:
        return f"synthetic:{self.size}"


_warned_synthetic: set = set()
_warn_lock = threading.Lock()


def _warn_synthetic(size: str) -> None:
    with _warn_lock:
        if size in _warned_synthetic:
            return
        _warned_synthetic.add(size)
    warnings.warn(
        f"flame_ext: using the SYNTHETIC FLAME model ({size}, seeded random data in FLAME's "
        "formats): not a real face model. Set FLAME_EXT_DATA or pass model_path= to use "
        "the real FLAME files.",
        UserWarning,
        stacklevel=4,
    )


def _synthetic_raw(where: _Synthetic, names, n_tex: Optional[int] = None) -> Any:
    """The raw objects of the first of `names` in the synthetic asset set.

    `n_tex` (textures only) builds just the components that will be kept: the full BFM
    basis is 1.25 GB. Out-of-range values build everything and are refused by the parser.
    """
    synthetic = importlib.import_module("flame_ext.synthetic")
    _warn_synthetic(where.size)
    if not (isinstance(n_tex, int) and not isinstance(n_tex, bool) and 1 <= n_tex <= 200):
        n_tex = None
    try:
        assets = synthetic.build_assets(size=where.size, seed=0, n_tex=n_tex)
    except ValueError:  # more components than this size has: the parser says how many
        assets = synthetic.build_assets(size=where.size, seed=0)
    for name in names:
        if name in assets:
            return assets[name]
    raise FileNotFoundError(f"the synthetic asset set ({where.size}) has none of {list(names)}")


def _explicit(model_path) -> Union[None, _Synthetic, Path]:
    if model_path is None:
        return None
    if isinstance(model_path, str) and model_path in _SYNTHETIC_SIZES:
        return _Synthetic(_SYNTHETIC_SIZES[model_path])
    if isinstance(model_path, (str, os.PathLike)):
        # os.path.expanduser leaves an unknown user's '~name' as it is (then not found);
        # Path.expanduser would raise a RuntimeError that names nothing.
        return Path(os.path.expanduser(os.fspath(model_path)))
    raise TypeError(
        f"model_path must be a str, a Path, 'synthetic' or 'synthetic-small', got "
        f"{type(model_path).__name__}"
    )


def _env_dir() -> Union[None, _Synthetic, Path]:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value in _SYNTHETIC_SIZES:
        return _Synthetic(_SYNTHETIC_SIZES[value])
    path = Path(os.path.expanduser(value))
    if not path.is_dir():
        raise FileNotFoundError(
            f"${ENV_VAR}={value!r} is not a directory: point it at the directory holding "
            "the FLAME files, or set it to 'synthetic' / 'synthetic-small'"
        )
    return path


def _home_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".medusa_ext_data" / "FLAME"


def _medusa_data_dir() -> Optional[Path]:
    # find_spec locates the package without importing (running) it.
    try:
        spec = importlib.util.find_spec("medusa")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "flame"


def _first_in(directory: Path, names) -> Optional[Path]:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _how_to_point() -> str:
    return (
        "Point flame_ext at the files with model_path=..., or set "
        f"{ENV_VAR}=/dir/with/the/files, or put them in ~/.medusa_ext_data/FLAME/. FLAME is "
        "licensed and not shipped: get generic_model.pkl (or flame2023.pkl) from "
        "https://flame.is.tue.mpg.de; the landmark embeddings come with DECA / medusa. "
        f"Without the real model, {ENV_VAR}=synthetic selects a synthetic stand-in."
    )


def _locate(names, model_path, *, pkl_means_directory: bool, landmarks: bool = False):
    """The file to read (first hit of SPEC 4's order), or _Synthetic."""
    explicit = _explicit(model_path)
    if isinstance(explicit, _Synthetic):
        return explicit
    if explicit is not None:
        if not explicit.exists():
            raise FileNotFoundError(f"model_path {str(explicit)!r} does not exist")
        directory = explicit if explicit.is_dir() else None
        if directory is None and pkl_means_directory and explicit.suffix.lower() == ".pkl":
            directory = explicit.parent
        if directory is None:
            return explicit
        hit = _first_in(directory, names)
        if hit is None:
            raise FileNotFoundError(
                f"model_path {str(explicit)!r}: the directory {str(directory)!r} holds none "
                f"of {list(names)}. {_how_to_point()}"
            )
        return hit

    looked = []
    env = _env_dir()
    if isinstance(env, _Synthetic):
        return env
    if env is None:
        looked.append(f"${ENV_VAR} (not set)")
    else:
        hit = _first_in(env, names)
        if hit is not None:
            return hit
        looked.append(f"${ENV_VAR}={str(env)!r}")
    candidates = [_home_dir()]
    if landmarks:
        medusa = _medusa_data_dir()
        if medusa is None:
            looked.append("medusa's package data (medusa not installed)")
        else:
            candidates.append(medusa)
    for directory in candidates:
        hit = _first_in(directory, names)
        if hit is not None:
            return hit
        looked.append(repr(str(directory)) + ("" if directory.is_dir() else " (does not exist)"))
    raise FileNotFoundError(
        f"none of {list(names)} found. Looked in: {'; '.join(looked)}. {_how_to_point()}"
    )


_ALL_ASSET_NAMES = MODEL_FILE_NAMES + TEXTURE_FILE_NAMES + tuple(LANDMARK_FILE_NAMES.values())


def find_data_dir(model_path: Optional[PathLike] = None) -> Path:
    """The directory the FLAME files are read from (SPEC 4's discovery order).

    An explicit `model_path` (a directory, or a file whose directory is meant) wins, then
    $FLAME_EXT_DATA, then ~/.medusa_ext_data/FLAME/ when it holds any FLAME file.
    """
    explicit = _explicit(model_path)
    if explicit is None:
        explicit = _env_dir()
        if isinstance(explicit, Path) and _first_in(explicit, _ALL_ASSET_NAMES) is None:
            explicit = None  # holds none of the files: go on to the default location
    if isinstance(explicit, _Synthetic):
        raise ValueError(
            f"'{'synthetic' if explicit.size == 'full' else 'synthetic-small'}' selects the "
            "in-memory synthetic assets, which have no data directory"
        )
    if explicit is not None:
        if not explicit.exists():
            raise FileNotFoundError(f"model_path {str(explicit)!r} does not exist")
        return explicit if explicit.is_dir() else explicit.parent
    home = _home_dir()
    if _first_in(home, _ALL_ASSET_NAMES) is not None:
        return home
    env = os.environ.get(ENV_VAR, "").strip()
    raise FileNotFoundError(
        "no FLAME data directory found. Looked in: "
        f"${ENV_VAR} ({repr(env) + ', which holds no FLAME file' if env else 'not set'}); "
        f"{str(home)!r} ({'holds no FLAME file' if home.is_dir() else 'does not exist'}). "
        f"{_how_to_point()}"
    )


# --------------------------------------------------------------------------------------
# Loaders


def load_flame_model(model_path: Optional[PathLike] = None) -> FlameModel:
    """Loads and validates the FLAME model (a .pkl file, a directory, or 'synthetic...')."""
    where = _locate(MODEL_FILE_NAMES, model_path, pkl_means_directory=False)
    if isinstance(where, _Synthetic):
        return parse_flame_model(_synthetic_raw(where, MODEL_FILE_NAMES), where.source)
    return parse_flame_model(_read_pickle_file(where), str(where))


def load_landmark_embedding(
    lm_type: str = "68", model_path: Optional[PathLike] = None, num_faces: Optional[int] = None
) -> Union[LandmarkEmbedding68, MediapipeEmbedding]:
    """Loads the landmark embedding for `lm_type` '68' (.npy) or 'mp' (.npz).

    A .pkl `model_path` means the embedding beside that model; `num_faces`, when given,
    is the face count every landmark face index must stay below.
    """
    if not isinstance(lm_type, str) or lm_type not in LANDMARK_FILE_NAMES:
        raise ValueError(f"lm_type must be one of {sorted(LANDMARK_FILE_NAMES)}, got {lm_type!r}")
    num_faces = _check_num_faces(num_faces)
    name = LANDMARK_FILE_NAMES[lm_type]
    where = _locate((name,), model_path, pkl_means_directory=True, landmarks=True)
    if isinstance(where, _Synthetic):
        raw, source = _synthetic_raw(where, (name,)), where.source
    else:
        source = str(where)
        want = Path(name).suffix
        if where.suffix.lower() != want:
            raise ValueError(
                f"lm_type={lm_type!r} reads an {want} file like {name}; model_path points "
                f"to {source}"
            )
        raw = _read_landmark_npy(where) if lm_type == "68" else _read_npz(where)
    if lm_type == "68":
        return parse_landmark_embedding_68(raw, source, num_faces)
    return parse_mediapipe_embedding(raw, source, num_faces)


def load_texture_space(model_path: Optional[PathLike] = None, n_tex: int = 50) -> TextureSpace:
    """Loads the albedo texture space, keeping its first `n_tex` components as float32."""
    where = _locate(TEXTURE_FILE_NAMES, model_path, pkl_means_directory=True)
    if isinstance(where, _Synthetic):
        raw = _synthetic_raw(where, TEXTURE_FILE_NAMES, n_tex)
        return parse_texture_space(raw, where.source, n_tex)
    return _load_texture_file(where, n_tex)
