"""Discovery: which FLAME file a loader reads, or the in-memory synthetic asset set.

First hit wins: an explicit `model_path` (a file, a directory, or 'synthetic' /
'synthetic-small'); $FLAME_EXT_DATA (a directory, or a synthetic size);
~/.medusa_ext_data/FLAME/; medusa's package data (landmark embeddings only). When nothing
is found the error says where it looked and how to point at the files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple, Optional, Union

ENV_VAR = "FLAME_EXT_DATA"
MODEL_FILE_NAMES = (
    "generic_model.pkl",
    "FLAME_NEUTRAL.pkl",
    "flame2023.pkl",
    "flame2023_Open.pkl",
    "flame2023_no_jaw.pkl",
)
TEXTURE_FILE_NAMES = ("FLAME_albedo_from_BFM.npz", "FLAME_texture.npz")
# AlbedoMM's FLAME texture (diffuse + specular): what FlameTex(specular=True) looks for
# first.
ALBEDOMM_FILE_NAME = "albedoModel2020_FLAME_albedoPart.npz"
LANDMARK_FILE_NAMES = {
    "68": "landmark_embedding.npy",
    "mp": "mediapipe_landmark_embedding.npz",
}
# smplx's FLAME folder: FLAME_<GENDER>.pkl (or .npz) beside these two landmark files.
STATIC_EMBEDDING_FILE = "flame_static_embedding.pkl"
DYNAMIC_EMBEDDING_FILE = "flame_dynamic_embedding.npy"
_SYNTHETIC_SIZES = {"synthetic": "full", "synthetic-small": "small"}

PathLike = Union[str, "os.PathLike[str]"]


class _Synthetic(NamedTuple):
    size: str  # 'full' or 'small'

    @property
    def source(self) -> str:
        return f"synthetic:{self.size}"


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


def _texture_location(model_path):
    """Where the texture that goes with the FLAME model at `model_path` is looked for: a
    model file's directory; None, a directory or a synthetic size as given.

    For callers whose model_path names the model (render_flame, the benchmark). FlameTex's
    model_path names the texture itself: a file there is read as it is, never swapped for
    one beside it.
    """
    explicit = _explicit(model_path)
    if isinstance(explicit, Path) and explicit.is_file():
        return explicit.parent
    return model_path


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
    """The file to read (the first hit, in the order above), or _Synthetic."""
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


_ALL_ASSET_NAMES = (
    MODEL_FILE_NAMES + TEXTURE_FILE_NAMES + (ALBEDOMM_FILE_NAME,)
    + tuple(LANDMARK_FILE_NAMES.values())
    + (STATIC_EMBEDDING_FILE, DYNAMIC_EMBEDDING_FILE)
)


def find_data_dir(model_path: Optional[PathLike] = None) -> Path:
    """The directory the FLAME files are read from (the discovery order of this module).

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
