"""Writing the synthetic asset set in the real file formats.

The model pickle is written the way FLAME's Python 2 pickler wrote the official file,
down to the opcodes (byte strings as Python 2 `str`) and the globals (`chumpy.ch.Ch`,
`scipy.sparse.csc.csc_matrix`, `numpy.core.multiarray._reconstruct`), so that the loaders
are exercised on exactly what they meet in the wild; the landmark and texture files are
written with numpy (np.save of a pickled dict, np.savez).

smplx's FLAME folder (`_write_smplx_files`) holds the model as FLAME_<GENDER>.pkl (the
same pickle) or FLAME_<GENDER>.npz (its arrays, J_regressor dense, no pickle), the 51
static landmarks as a Python 2 pickle of a dict (flame_static_embedding.pkl) and the
contour table as an np.save'd dict (flame_dynamic_embedding.npy), each with smplx's keys
`lmk_face_idx` / `lmk_b_coords`: the points of the 68-point embedding.
"""

from __future__ import annotations

import copyreg
import pathlib
import pickle
import struct
from collections.abc import Mapping

import numpy as np
import scipy.sparse

from .bases import _LMK_FILE, _MODEL_FILE, _MP_FILE
from .texture import _ALBEDOMM_FILE, _BFM_FILE, _FLAME_TEX_FILE


class _ChumpyCh:
    """Stand-in pickled as `chumpy.ch.Ch` (see _Py2Pickler)."""

    def __init__(self, x):
        # What chumpy's Ch.__getstate__ returns for a plain Ch holding an array.
        self.state = {
            'x': np.ascontiguousarray(x, dtype=np.float64),
            '_dirty_vars': set(),
            '_itr': None,
            '_depends_on_deps': {},
            '_make_dense': False,
            '_make_sparse': False,
        }


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes what FLAME's Python 2 pickler wrote.

    Byte strings and ASCII str go out as Python 2 `str` (SHORT_BINSTRING / BINSTRING,
    which Python 3 reads back with encoding='latin1'), not through `_codecs.encode`. Class
    and function globals are renamed to their old paths: numpy's `_reconstruct` to
    `numpy.core.multiarray`, `csc_matrix` to `scipy.sparse.csc`, _ChumpyCh to
    `chumpy.ch.Ch`. The pure-Python pickler is used because the C one cannot be told how
    to write bytes.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    _RENAMES = {
        np.array(0.0).__reduce__()[0]: ('numpy.core.multiarray', '_reconstruct'),
        scipy.sparse.csc_matrix: ('scipy.sparse.csc', 'csc_matrix'),
        _ChumpyCh: ('chumpy.ch', 'Ch'),
    }

    def __init__(self, file):
        super().__init__(file, protocol=2, fix_imports=True)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode('ascii')
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        elif n < 2**31:
            self.write(pickle.BINSTRING + struct.pack('<i', n) + data)
        else:
            raise ValueError(f"cannot write a {n}-byte string in a protocol-2 pickle")
        self.memoize(obj)

    def _save_str(self, obj):
        if obj.isascii():
            self._save_py2_str(obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_str

    def reducer_override(self, obj):
        if isinstance(obj, _ChumpyCh):
            return copyreg.__newobj__, (_ChumpyCh,), obj.state
        if isinstance(obj, scipy.sparse.csc_matrix):
            # the instance __dict__ of a csc_matrix, which BUILD restores
            state = {
                '_shape': tuple(int(s) for s in obj.shape),
                'maxprint': 50,
                'indptr': obj.indptr,
                'indices': obj.indices,
                'data': obj.data,
            }
            return copyreg.__newobj__, (type(obj),), state
        return NotImplemented

    def save_global(self, obj, name=None):
        target = self._RENAMES.get(obj)
        if target is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f'{target[0]}\n{target[1]}\n'.encode('ascii'))
        self.memoize(obj)


# Arrays that the official model file holds as chumpy objects.
_CHUMPY_KEYS = ('v_template', 'shapedirs', 'posedirs', 'weights', 'J')


def _write_model_pickle(path: pathlib.Path, model: dict, chumpy: bool, kintree_dtype: str):
    model = dict(model)
    model['kintree_table'] = model['kintree_table'].astype(kintree_dtype)
    if chumpy:
        for key in _CHUMPY_KEYS:
            model[key] = _ChumpyCh(model[key])
    with open(path, 'wb') as fh:
        _Py2Pickler(fh).dump(model)


def _write_files(
    out: pathlib.Path, assets: Mapping, tex_hw: int, *, chumpy: bool, kintree_dtype: str,
    model_name: str, texture_layout: str,
) -> None:
    """Writes every file of `assets` (a `build_assets` mapping) into the directory out."""
    _write_model_pickle(out / model_name, assets[_MODEL_FILE], chumpy, kintree_dtype)
    np.save(out / _LMK_FILE, assets[_LMK_FILE], allow_pickle=True)
    np.savez(out / _MP_FILE, **assets[_MP_FILE])
    bfm = assets[_BFM_FILE]
    if texture_layout == 'image':
        image = (tex_hw, tex_hw, 3)
        bfm = {'MU': bfm['MU'].reshape(image), 'PC': bfm['PC'].reshape(image + (-1,))}
    np.savez(out / _BFM_FILE, **bfm)
    np.savez(out / _FLAME_TEX_FILE, **assets[_FLAME_TEX_FILE])
    np.savez(out / _ALBEDOMM_FILE, **assets[_ALBEDOMM_FILE])


_STATIC_FILE = 'flame_static_embedding.pkl'
_DYNAMIC_FILE = 'flame_dynamic_embedding.npy'


def _dense_model(model: dict, kintree_dtype: str) -> dict:
    """The model dict as the arrays of an .npz: J_regressor dense, no Python objects."""
    model = dict(model)
    model['J_regressor'] = np.asarray(model['J_regressor'].toarray())
    model['kintree_table'] = model['kintree_table'].astype(kintree_dtype)
    return model


def _write_smplx_files(
    out: pathlib.Path, assets: Mapping, *, model_name: str, ext: str, chumpy: bool,
    kintree_dtype: str,
) -> None:
    """Writes smplx's FLAME folder (model, static and dynamic landmark files) into out."""
    model = assets[_MODEL_FILE]
    if ext == 'pkl':
        _write_model_pickle(out / model_name, model, chumpy, kintree_dtype)
    else:
        np.savez(out / model_name, **_dense_model(model, kintree_dtype))
    embedding = assets[_LMK_FILE]
    static = {
        'lmk_face_idx': embedding['static_lmk_faces_idx'].astype(np.uint32),
        'lmk_b_coords': np.asarray(embedding['static_lmk_bary_coords'], dtype=np.float64),
    }
    with open(out / _STATIC_FILE, 'wb') as fh:
        _Py2Pickler(fh).dump(static)
    dynamic = {
        'lmk_face_idx': embedding['dynamic_lmk_faces_idx'].numpy(),
        'lmk_b_coords': embedding['dynamic_lmk_bary_coords'].numpy(),
    }
    np.save(out / _DYNAMIC_FILE, dynamic, allow_pickle=True)
