"""FLAME model files: discovery, safe reading, parsing and validation.

The public loaders live here; each layer of the work has its own module, so that files on
disk and the in-memory synthetic assets go through the same checks:

- `discovery`: which file to read (`find_data_dir`, `_locate`), or the synthetic assets;
- `unpickle`: a restricted unpickler that never runs code from the file (only numpy /
  scipy.sparse / chumpy / torch-tensor reconstructors, each mapped to a safe stand-in);
- `readers`: bytes -> the raw objects the files hold (pickles, .npy, .npz members);
- `parsers`: raw objects -> the dataclasses of `formats`, validated, every error naming
  the file and the problem;
- `formats`: those frozen dataclasses of plain numpy arrays, which check their own
  consistency on construction;
- `errors`: the exceptions a refused file raises.
"""

from __future__ import annotations

import importlib
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from .discovery import (
    ALBEDOMM_FILE_NAME,
    DYNAMIC_EMBEDDING_FILE,
    ENV_VAR,
    LANDMARK_FILE_NAMES,
    MODEL_FILE_NAMES,
    STATIC_EMBEDDING_FILE,
    TEXTURE_FILE_NAMES,
    PathLike,
    _locate,
    _Synthetic,
    find_data_dir,
)
from .errors import ModelFileError, UnsafePickleError
from .formats import (
    DynamicLandmarkEmbedding,
    FlameModel,
    LandmarkEmbedding68,
    MediapipeEmbedding,
    StaticLandmarkEmbedding,
    TextureSpace,
)
from . import parsers as _parsers
from .parsers import (
    FLAME_N_SHAPE,
    N_SHAPE_KEY,
    _check_num_faces,
    parse_dynamic_embedding,
    parse_flame_model,
    parse_landmark_embedding_68,
    parse_mediapipe_embedding,
    parse_static_embedding,
    parse_texture_space,
)
from .readers import (
    _archive_errors,
    _check_file,
    _NpzArchive,
    _read_landmark_npy,
    _read_npz,
    _read_pickle_file,
)

__all__ = [
    "ENV_VAR",
    "FLAME_N_SHAPE",
    "N_SHAPE_KEY",
    "MODEL_FILE_NAMES",
    "TEXTURE_FILE_NAMES",
    "LANDMARK_FILE_NAMES",
    "STATIC_EMBEDDING_FILE",
    "DYNAMIC_EMBEDDING_FILE",
    "DynamicLandmarkEmbedding",
    "FlameModel",
    "LandmarkEmbedding68",
    "MediapipeEmbedding",
    "ModelFileError",
    "StaticLandmarkEmbedding",
    "TextureSpace",
    "UnsafePickleError",
    "find_data_dir",
    "load_dynamic_embedding",
    "load_flame_model",
    "load_landmark_embedding",
    "load_static_embedding",
    "load_texture_space",
    "parse_dynamic_embedding",
    "parse_flame_model",
    "parse_landmark_embedding_68",
    "parse_mediapipe_embedding",
    "parse_static_embedding",
    "parse_texture_space",
]

# Read by name as flame_ext.io._LMK68_KEYS (the key list of landmark_embedding.npy).
_LMK68_KEYS = _parsers._LMK68_KEYS

# The synthetic-model notice is given once per size and process; a lock keeps it once
# when threads load at the same time.
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


# What every zip archive (and so every .npz) starts with: a local file header, or the end
# record of an empty archive.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _load_texture_file(path: Path, n_tex, specular: bool = False) -> TextureSpace:
    source = _check_file(path)
    with open(path, "rb") as fp:
        magic = fp.read(4)
    if magic not in _ZIP_MAGIC:
        hint = ""
        if path.suffix.lower() == ".pkl":
            hint = (" (a FLAME model pickle? for the texture beside it, pass the texture "
                    "file or the directory)")
        raise ModelFileError(
            f"{source}: not a texture model: texture spaces are .npz archives "
            f"({' or '.join(TEXTURE_FILE_NAMES)}) and this file is not one{hint}"
        )
    with _archive_errors(source):
        archive = zipfile.ZipFile(path)
    with archive:  # member errors are named by _NpzMember; n_tex errors pass through
        return parse_texture_space(_NpzArchive(archive, source), source, n_tex,
                                   specular=specular)


# --------------------------------------------------------------------------------------
# Loaders


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fp:
        return fp.read(4) in _ZIP_MAGIC


def load_flame_model(model_path: Optional[PathLike] = None) -> FlameModel:
    """Loads and validates the FLAME model (a .pkl file, a directory, or 'synthetic...').

    A file that is an .npz archive (smplx's FLAME_<GENDER>.npz form: the model's arrays,
    J_regressor dense) is read as one, without pickle.
    """
    where = _locate(MODEL_FILE_NAMES, model_path, pkl_means_directory=False)
    if isinstance(where, _Synthetic):
        return parse_flame_model(_synthetic_raw(where, MODEL_FILE_NAMES), where.source)
    _check_file(where)
    raw = _read_npz(where) if _is_zip(where) else _read_pickle_file(where)
    return parse_flame_model(raw, str(where))


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
            raise ModelFileError(
                f"lm_type={lm_type!r} reads an {want} file like {name}; model_path points "
                f"to {source}"
            )
        raw = _read_landmark_npy(where) if lm_type == "68" else _read_npz(where)
    if lm_type == "68":
        return parse_landmark_embedding_68(raw, source, num_faces)
    return parse_mediapipe_embedding(raw, source, num_faces)


def _load_smplx_embedding(name: str, model_path, num_faces, parse, read):
    num_faces = _check_num_faces(num_faces)
    where = _locate((name,), model_path, pkl_means_directory=False)
    if isinstance(where, _Synthetic):
        # The synthetic set's 68-point embedding holds the same points: its static part
        # and its contour table.
        full = _synthetic_raw(where, (LANDMARK_FILE_NAMES["68"],))
        prefix = "static" if name == STATIC_EMBEDDING_FILE else "dynamic"
        raw = {"lmk_face_idx": full[f"{prefix}_lmk_faces_idx"],
               "lmk_b_coords": full[f"{prefix}_lmk_bary_coords"]}
        return parse(raw, where.source, num_faces)
    source = str(where)
    want = Path(name).suffix
    if where.suffix.lower() != want:
        raise ModelFileError(f"{name} is an {want} file; model_path points to {source}")
    return parse(read(where), source, num_faces)


def load_static_embedding(
    model_path: Optional[PathLike] = None, num_faces: Optional[int] = None
) -> StaticLandmarkEmbedding:
    """Loads smplx's flame_static_embedding.pkl (the file, a directory holding it, or
    'synthetic...'), through the restricted unpickler. `num_faces`, when given, is the
    face count every landmark face index must stay below."""
    return _load_smplx_embedding(
        STATIC_EMBEDDING_FILE, model_path, num_faces, parse_static_embedding,
        _read_pickle_file,
    )


def load_dynamic_embedding(
    model_path: Optional[PathLike] = None, num_faces: Optional[int] = None
) -> DynamicLandmarkEmbedding:
    """Loads smplx's flame_dynamic_embedding.npy (a pickled dict behind an .npy header,
    read without np.load's unpickling) like `load_static_embedding`."""
    return _load_smplx_embedding(
        DYNAMIC_EMBEDDING_FILE, model_path, num_faces, parse_dynamic_embedding,
        _read_landmark_npy,
    )


def load_texture_space(
    model_path: Optional[PathLike] = None, n_tex: int = 50, *, specular: bool = False
) -> TextureSpace:
    """Loads the albedo texture space, keeping its first `n_tex` components as float32.

    `model_path` names the texture: a file (read as it is: a file that is not a texture
    space is refused, never swapped for one beside it), a directory holding one,
    'synthetic...', or None for discovery. `specular=True` also reads AlbedoMM's specular
    part (specMU / specPC) and looks for albedoModel2020_FLAME_albedoPart.npz first; a
    texture without one is a ValueError naming it. An AlbedoMM file's specular arrays
    are checked when it is loaded either way.
    """
    names = ((ALBEDOMM_FILE_NAME,) + TEXTURE_FILE_NAMES) if specular is True \
        else TEXTURE_FILE_NAMES
    where = _locate(names, model_path, pkl_means_directory=False)
    if isinstance(where, _Synthetic):
        raw = _synthetic_raw(where, names, n_tex)
        return parse_texture_space(raw, where.source, n_tex, specular=specular)
    return _load_texture_file(where, n_tex, specular)
