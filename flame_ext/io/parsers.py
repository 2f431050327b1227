"""Parsers: the raw objects a file holds -> the validated dataclasses of `formats`.

The raw objects come from the readers (files on disk, lazily read .npz members) or from
`flame_ext.synthetic` (in memory); both go through the same conversion (`_to_numpy`:
arrays, chumpy and scipy.sparse stand-ins, torch tensors, bounded nested lists) and the
same checks. Every error names the source and the key.
"""

from __future__ import annotations

import math
import sys
from typing import Mapping, Optional, Tuple

import numpy as np

from .errors import _fail, _fail_type
from .formats import (
    DynamicLandmarkEmbedding,
    FlameModel,
    LandmarkEmbedding68,
    MediapipeEmbedding,
    StaticLandmarkEmbedding,
    TextureSpace,
)
from .readers import _InMemoryArray, _NpzMember, _unwrap_object_array
from .unpickle import _ChumpyStandIn, _SparseStandIn

# FLAME files put 300 shape columns before the expression ones; the small synthetic
# variant declares its own split under this key.
FLAME_N_SHAPE = 300
N_SHAPE_KEY = "flame_ext_n_shape"

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
# smplx's flame_static_embedding.pkl and flame_dynamic_embedding.npy hold the same two keys.
_SMPLX_LMK_KEYS = ("lmk_face_idx", "lmk_b_coords")

# Densifying a sparse matrix is bounded so a forged shape cannot ask for terabytes.
_MAX_DENSE_ELEMENTS = 1 << 28
# Nested lists are accepted as arrays up to this many elements (FLAME files hold arrays;
# a list is at most a small table). Pickled lists can share structure through the memo:
# three levels of 1000 references to one list are 1e9 elements from a 28 KB file.
_MAX_LIST_ELEMENTS = 1 << 20
# Texture bases are converted in chunks of about this many source bytes.
_CHUNK_BYTES = 1 << 26


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
            raise _fail_type(
                source,
                f"{key} is a chumpy expression ({value.origin}) without a stored value; "
                "re-save the model with plain numpy arrays",
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
        try:
            return np.asarray(value)
        except ValueError as e:  # ragged: rows of different lengths
            raise _fail(source, f"{key} is a list that is not a rectangular array ({e})") from e
    if isinstance(value, (np.generic, int, float)):
        return np.asarray(value)
    raise _fail_type(source, f"{key} must be an array, got {type(value).__name__}")


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
        raise _fail_type(source, f"{key} must be {what} array, got dtype {arr.dtype}")
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
        raise _fail_type(source, f"{N_SHAPE_KEY} must be an int, got {type(n_shape).__name__}")
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

def _parse_smplx_embedding(raw, source, num_faces, what, cls):
    num_faces = _check_num_faces(num_faces)
    raw = _unwrap_object_array(raw, source)
    _require_keys(raw, _SMPLX_LMK_KEYS, source, what)
    embedding = cls(
        lmk_faces_idx=_ints(raw["lmk_face_idx"], source, "lmk_face_idx"),
        lmk_bary_coords=_floats(raw["lmk_b_coords"], source, "lmk_b_coords"),
        source=source,
    )
    return _check_face_range(embedding, num_faces)


def parse_static_embedding(
    raw, source: str, num_faces: Optional[int] = None
) -> StaticLandmarkEmbedding:
    """Parses the dict in smplx's flame_static_embedding.pkl (lmk_face_idx (L,),
    lmk_b_coords (L, 3))."""
    return _parse_smplx_embedding(
        raw, source, num_faces, "the static landmark embedding", StaticLandmarkEmbedding
    )


def parse_dynamic_embedding(
    raw, source: str, num_faces: Optional[int] = None
) -> DynamicLandmarkEmbedding:
    """Parses the dict in smplx's flame_dynamic_embedding.npy (lmk_face_idx (79, Ld),
    lmk_b_coords (79, Ld, 3); arrays, tensors or lists of per-bin rows)."""
    return _parse_smplx_embedding(
        raw, source, num_faces, "the dynamic (contour) landmark embedding",
        DynamicLandmarkEmbedding,
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


# AlbedoMM's FLAME file (albedoModel2020_FLAME_albedoPart.npz) adds its specular part to
# the BFM-style diffuse MU / PC.
SPECULAR_KEYS = ("specMU", "specPC")


def _checked_sources(raw: Mapping, source: str, keys):
    """The lazy array sources of `keys`, each numeric, and their (H, W, P)."""
    sources = [_array_source(raw[k], source, k) for k in keys]
    for key, src in zip(keys, sources):
        if src.dtype.kind not in "fiu":
            raise _fail_type(source, f"{key} must be a numeric array, got dtype {src.dtype}")
    return sources, _texture_grid(sources[0].shape, sources[1].shape, source, keys)


def _read_texture(mean_src, basis_src, P: int, n_tex: int, divisor, source: str, basis_key):
    """mean (H*W*3,) float64 and the first n_tex basis columns (H*W*3, n_tex) float32,
    divided by `divisor` (when not None) in float64 and rounded once; the basis is read
    in chunks of about _CHUNK_BYTES so that only n_tex columns are ever held."""
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
        raise _fail(source, f"{basis_key} ended after {start} of {n} rows")
    return mean, basis


def parse_texture_space(
    raw: Mapping, source: str, n_tex: int = 50, *, specular: bool = False
) -> TextureSpace:
    """Parses a texture archive's arrays: MU / PC (0..1; with specMU / specPC, AlbedoMM's
    specular part, also 0..1) or mean / tex_dir (0..255, any component count).

    Values of the mapping may be ndarrays or lazy npz members (see `_NpzArchive`). The
    specular arrays, when the file has them, are checked (shapes, dtypes, agreement with
    MU / PC) whatever `specular` is; they are read only when `specular` is True, which on
    a file without them is a ValueError naming the file.
    """
    if not isinstance(specular, (bool, np.bool_)):
        raise TypeError(f"specular must be a bool, got {type(specular).__name__}")
    if not isinstance(raw, Mapping):
        raise _fail(source, f"expected a dict of texture arrays, got {type(raw).__name__}")
    if "MU" in raw and "PC" in raw:
        keys, divisor = ("MU", "PC"), None
    elif "mean" in raw and "tex_dir" in raw:
        keys, divisor = ("mean", "tex_dir"), 255.0
    else:
        raise _fail(
            source,
            "not a texture model: a texture space needs MU and PC (FLAME_albedo_from_BFM.npz "
            "or AlbedoMM's albedoModel2020_FLAME_albedoPart.npz) or mean and tex_dir "
            f"(FLAME_texture.npz); it holds {sorted(raw.keys())}",
        )
    (mean_src, basis_src), (height, width, P) = _checked_sources(raw, source, keys)
    present = [k for k in SPECULAR_KEYS if k in raw]
    spec_srcs = None
    if present and keys[0] != "MU":
        raise _fail(source, f"{present} belong with MU / PC (AlbedoMM), not with {list(keys)}")
    if len(present) == 1:
        missing = (set(SPECULAR_KEYS) - set(present)).pop()
        raise _fail(source, f"has {present[0]} but no {missing}: AlbedoMM's specular part "
                    "needs both")
    if present:
        spec_srcs, spec_grid = _checked_sources(raw, source, SPECULAR_KEYS)
        if spec_grid != (height, width, P) or spec_srcs[0].shape != mean_src.shape \
                or spec_srcs[1].shape != basis_src.shape:
            raise _fail(
                source,
                f"specMU {spec_srcs[0].shape} / specPC {spec_srcs[1].shape} must have the "
                f"shapes of MU {mean_src.shape} / PC {basis_src.shape}",
            )
    if specular and spec_srcs is None:
        raise ValueError(
            f"specular=True needs a texture with a specular part (AlbedoMM's specMU and "
            f"specPC); model_path {source} holds {sorted(raw.keys())}"
        )
    if isinstance(n_tex, (bool, np.bool_)) or not isinstance(n_tex, (int, np.integer)):
        raise TypeError(f"n_tex must be an int, got {type(n_tex).__name__} ({source} has P = {P})")
    if not 0 <= n_tex <= P:
        raise ValueError(f"n_tex must be in [0, P = {P}] for {source}, got n_tex = {n_tex}")
    n_tex = int(n_tex)

    mean, basis = _read_texture(mean_src, basis_src, P, n_tex, divisor, source, keys[1])
    spec_mean = spec_basis = None
    if specular:
        spec_mean, spec_basis = _read_texture(*spec_srcs, P, n_tex, None, source, "specPC")
        spec_mean = spec_mean.astype(np.float32)
    return TextureSpace(
        mean=mean.astype(np.float32), basis=basis, height=height, width=width, source=source,
        specular_mean=spec_mean, specular_basis=spec_basis,
    )
