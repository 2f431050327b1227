"""File readers: bytes on disk -> the raw objects FLAME's files hold.

- `_read_pickle_file`: a model pickle, through the restricted unpickler;
- `_read_landmark_npy`: landmark_embedding.npy, a pickled dict behind an .npy header that
  is read here (bounded) so that np.load's unrestricted unpickling never runs;
- `_read_npz` / `_NpzArchive`: .npz archives member by member (`_NpzMember`), each .npy
  header checked against the bytes present before numpy allocates anything, large members
  streamed in chunks along their first axis.

Every error names the file (and the archive member).
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .errors import ModelFileError, _fail
from .unpickle import _restricted_load

# A real .npy header is a few hundred bytes; the cap keeps a corrupt length field from
# making us read (and allocate) gigabytes.
_MAX_NPY_HEADER = 1 << 16


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
    except ModelFileError:
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


def _unwrap_object_array(value, source: str):
    # np.load(...) gives a 0-d object array; np.load(...)[()] the dict inside.
    if isinstance(value, np.ndarray):
        if value.dtype != object or value.shape != ():
            raise _fail(
                source, f"expected a pickled dict, got an array {value.dtype} {value.shape}"
            )
        return value[()]
    return value


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

