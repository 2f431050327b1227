"""Writing the synthetic asset set in the real file formats.

The model pickle is written the way FLAME's Python 2 pickler wrote the official file,
down to the opcodes (byte strings as Python 2 `str`) and the globals (`chumpy.ch.Ch`,
`scipy.sparse.csc.csc_matrix`, `numpy.core.multiarray._reconstruct`), so that the loaders
are exercised on exactly what they meet in the wild; the landmark and texture files are
written with numpy (np.save of a pickled dict, np.savez).
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
from .texture import _BFM_FILE, _FLAME_TEX_FILE


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
