"""Seeded synthetic FLAME asset set: the licensed FLAME files, faked.

`build_assets(size, seed)` returns the objects exactly as the real files load
(`generic_model.pkl`, `landmark_embedding.npy`, `mediapipe_landmark_embedding.npz`,
`FLAME_albedo_from_BFM.npz`, `FLAME_texture.npz`, AlbedoMM's
`albedoModel2020_FLAME_albedoPart.npz`), keyed by file name;
`write_assets(out_dir, ...)` writes them in the real file formats, down to the Python 2
pickle opcodes and the `chumpy.ch.Ch` / `scipy.sparse.csc.csc_matrix` globals of the
official model file. `python -m flame_ext.synthetic --out DIR` does the same from a shell.
`write_smplx_assets(out_dir, ...)` writes the same model in smplx's FLAME folder layout
(FLAME_<GENDER>.pkl or .npz, flame_static_embedding.pkl, flame_dynamic_embedding.npy).

Two sizes:
- 'full': FLAME's exact dimensions (V=5023, F=9976, 5 joints, 300+100 components,
  36 pose correctives, 51 + 79x17 / 68 / 105 landmarks, 512x512x3 textures with 199 BFM and
  200 FLAME components, 145 AlbedoMM diffuse + specular). Looks exactly like the real file: no extra keys.
- 'small': 67 vertices, 6 shape + 4 expression components, 8x8 textures with 5 / 6 / 7
  components, the same joints and landmark counts, so float64 gradcheck is fast. Its model
  dict carries the extra int key 'flame_ext_n_shape' (FLAME files lack it and mean 300).

One module per part: `mesh` (the head surface, its triangulation and UVs), `bases` (the
model's arrays and the landmark embeddings), `texture` (the albedo spaces), `writers`
(the files). Everything comes from `numpy.random.default_rng([seed, stream])`, one stream
per part: the same seed gives bit-identical output, and the first k texture components do
not depend on how many were asked for.

`build_assets` returns a read-only mapping whose entries are built on first access and
cached (`functools.lru_cache`): callers get shared arrays and must not mutate them (copy
first).
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Mapping
from typing import Optional

import numpy as np

from flame_ext._checks import check_count

from .bases import _LMK_FILE, _MODEL_FILE, _MP_FILE, _build_model
from .mesh import SIZES, _mesh, _size_spec
from .texture import (
    _ALBEDOMM_FILE,
    _BFM_FILE,
    _FLAME_TEX_FILE,
    _build_albedomm,
    _build_bfm,
    _build_flame_texture,
)
from .writers import _write_files, _write_smplx_files

__all__ = ["ASSET_NAMES", "SIZES", "build_assets", "write_assets", "write_smplx_assets"]

ASSET_NAMES = (_MODEL_FILE, _LMK_FILE, _MP_FILE, _BFM_FILE, _FLAME_TEX_FILE, _ALBEDOMM_FILE)

# The builders' caches, read by name (flame_ext.synthetic._build_model.cache_clear(), ...).
_CACHED = (_build_model, _build_bfm, _build_flame_texture, _build_albedomm, _mesh, _size_spec)


class _AssetSet(Mapping):
    """The asset set by file name; each file's objects are built on first access."""

    def __init__(self, size, seed, n_bfm, n_flame, n_albedomm):
        self._args = (size, seed, n_bfm, n_flame, n_albedomm)

    def __getitem__(self, name):
        size, seed, n_bfm, n_flame, n_albedomm = self._args
        if name in (_MODEL_FILE, _LMK_FILE, _MP_FILE):
            return _build_model(size, seed)[name]
        if name == _BFM_FILE:
            return _build_bfm(size, seed, n_bfm)
        if name == _FLAME_TEX_FILE:
            return _build_flame_texture(size, seed, n_flame)
        if name == _ALBEDOMM_FILE:
            return _build_albedomm(size, seed, n_albedomm)
        raise KeyError(name)

    def __iter__(self):
        return iter(ASSET_NAMES)

    def __len__(self):
        return len(ASSET_NAMES)

    def __repr__(self):
        size, seed, n_bfm, n_flame, n_albedomm = self._args
        return (f"<synthetic FLAME assets size={size!r} seed={seed} "
                f"n_tex={n_bfm}/{n_flame}/{n_albedomm}>")


def _check_size_seed(size, seed):
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def build_assets(
    size: str = 'full', seed: int = 0, *, n_tex: Optional[int] = None
) -> Mapping[str, object]:
    """The synthetic asset set as the real files load: a read-only mapping from file name
    (ASSET_NAMES) to the object that file holds. Each file's objects are built on first
    access, so asking for the model never builds the (large) texture spaces.

    - 'generic_model.pkl': the unpickled model dict (plain numpy arrays, J_regressor a
      scipy.sparse.csc_matrix, kintree_table int64 with 4294967295 as the root's parent;
      'small' adds 'flame_ext_n_shape').
    - 'landmark_embedding.npy': the dict np.load(...)[()] gives (dynamic entries are torch
      tensors, the rest numpy).
    - 'mediapipe_landmark_embedding.npz': dict of its arrays.
    - 'FLAME_albedo_from_BFM.npz': {'MU': (H*W*3,), 'PC': (H*W*3, P)} float64, flat, BGR.
    - 'FLAME_texture.npz': {'mean': (H,W,3), 'tex_dir': (H,W,3,P)} float32 in 0..255,
      'vt' (NVT,2), 'ft' (F,3).
    - 'albedoModel2020_FLAME_albedoPart.npz' (AlbedoMM): {'MU', 'specMU': (H,W,3),
      'PC', 'specPC': (H,W,3,P)} float32 in 0..1, BGR, image-shaped as published (P = 145
      full size, 7 small), 'vt', 'ft'.

    n_tex: keep only the first n_tex texture components of each texture file (all by
    default; the full-size BFM basis alone is 1.25 GB, so ask for few when texture is not
    the point). Component k is the same whatever n_tex is.

    The objects are cached and shared between calls: do not mutate them (copy what you
    change). size: 'full' or 'small'; seed: int >= 0.
    """
    seed = _check_size_seed(size, seed)
    spec = _size_spec(size)
    n_max = max(spec.n_tex_bfm, spec.n_tex_flame)
    if n_tex is not None:
        n_tex = check_count('n_tex', n_tex, 1, n_max)
    n_bfm = spec.n_tex_bfm if n_tex is None else min(n_tex, spec.n_tex_bfm)
    n_flame = spec.n_tex_flame if n_tex is None else min(n_tex, spec.n_tex_flame)
    n_albedomm = spec.n_tex_albedomm if n_tex is None else min(n_tex, spec.n_tex_albedomm)
    return _AssetSet(size, seed, n_bfm, n_flame, n_albedomm)


def write_assets(
    out_dir,
    size: str = 'full',
    seed: int = 0,
    *,
    chumpy: bool = False,
    kintree_dtype: str = 'int64',
    model_name: str = _MODEL_FILE,
    texture_layout: str = 'flat',
    n_tex: Optional[int] = None,
) -> pathlib.Path:
    """Writes the synthetic asset set in the real file formats into out_dir (created).

    chumpy: pickle v_template, shapedirs, posedirs, weights and J as `chumpy.ch.Ch`
    objects, as the official file does. kintree_dtype: 'int64' or 'uint32'. model_name:
    file name of the model pickle (generic_model.pkl, FLAME_NEUTRAL.pkl, flame2023.pkl...).
    texture_layout: 'flat' (MU (H*W*3,), PC (H*W*3,P), as published) or 'image'
    (MU (H,W,3), PC (H,W,3,P)) for FLAME_albedo_from_BFM.npz; FLAME_texture.npz is always
    image-shaped. n_tex: write only the first n_tex texture components (default all:
    199 BFM / 200 FLAME for 'full'). Returns out_dir as a Path.
    """
    if kintree_dtype not in ('int64', 'uint32'):
        raise ValueError(f"kintree_dtype must be 'int64' or 'uint32', got {kintree_dtype!r}")
    if texture_layout not in ('flat', 'image'):
        raise ValueError(f"texture_layout must be 'flat' or 'image', got {texture_layout!r}")
    plain = isinstance(model_name, str) and pathlib.Path(model_name).name == model_name
    if not plain or model_name in ('', '.', '..'):
        raise ValueError(f"model_name must be a plain file name, got {model_name!r}")
    assets = build_assets(size, seed, n_tex=n_tex)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_files(
        out, assets, _size_spec(size).tex_hw, chumpy=chumpy, kintree_dtype=kintree_dtype,
        model_name=model_name, texture_layout=texture_layout,
    )
    return out


def write_smplx_assets(
    out_dir,
    size: str = 'full',
    seed: int = 0,
    *,
    gender: str = 'neutral',
    ext: str = 'pkl',
    chumpy: bool = False,
    kintree_dtype: str = 'int64',
) -> pathlib.Path:
    """Writes the synthetic model in smplx's FLAME folder layout into out_dir (created).

    The folder `smplx.FLAME(out_dir, gender=gender, ext=ext, use_face_contour=True)`
    reads: FLAME_<GENDER>.<ext> (ext 'pkl': the model pickle of `write_assets`, chumpy
    and kintree_dtype as there; 'npz': the same arrays with J_regressor dense, which needs
    no pickle and no chumpy to read), flame_static_embedding.pkl (the 51 static
    landmarks) and flame_dynamic_embedding.npy (the 79 x 17 contour table): the points of
    the set's 68-point embedding, under smplx's keys `lmk_face_idx` / `lmk_b_coords`.
    No texture files. Returns out_dir as a Path.
    """
    if ext not in ('pkl', 'npz'):
        raise ValueError(f"ext must be 'pkl' or 'npz', got {ext!r}")
    if kintree_dtype not in ('int64', 'uint32'):
        raise ValueError(f"kintree_dtype must be 'int64' or 'uint32', got {kintree_dtype!r}")
    if chumpy and ext == 'npz':
        raise ValueError("chumpy=True pickles chumpy objects: only for ext='pkl'")
    if not (isinstance(gender, str) and gender.isalnum()):
        raise ValueError(f"gender must be a word such as 'neutral', got {gender!r}")
    assets = build_assets(size, seed, n_tex=1)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_smplx_files(
        out, assets, model_name=f'FLAME_{gender.upper()}.{ext}', ext=ext, chumpy=chumpy,
        kintree_dtype=kintree_dtype,
    )
    return out


def _main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m flame_ext.synthetic',
        description='Write the seeded synthetic FLAME asset set in the real file formats.',
    )
    parser.add_argument('--out', required=True, help='output directory (created)')
    parser.add_argument('--size', choices=SIZES, default='full')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--chumpy', action='store_true', help='pickle arrays as chumpy.ch.Ch')
    parser.add_argument('--kintree-dtype', choices=('int64', 'uint32'), default='int64')
    parser.add_argument('--model-name', default=_MODEL_FILE)
    parser.add_argument('--texture-layout', choices=('flat', 'image'), default='flat')
    parser.add_argument('--n-tex', type=int, default=None, help='texture components kept')
    args = parser.parse_args(argv)
    try:
        out = write_assets(
            args.out, args.size, args.seed, chumpy=args.chumpy,
            kintree_dtype=args.kintree_dtype, model_name=args.model_name,
            texture_layout=args.texture_layout, n_tex=args.n_tex,
        )
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    print(out)

