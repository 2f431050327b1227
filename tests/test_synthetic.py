"""Tests of flame_ext.synthetic: the seeded synthetic FLAME asset set and its file writer.

Most run on the 'small' size; the 'slow' ones build the full size once (about 2 s) and
check FLAME's exact dimensions, the surface and the bases on it, and a full-size write.
The loaders (flame_ext.io) are not used here: files are read back with plain pickle /
numpy, and the chumpy objects with a ten-line stand-in.
"""

import pathlib
import pickle
import pickletools
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import scipy.sparse
import torch

from flame_ext import synthetic

MODEL, LMK, MP = 'generic_model.pkl', 'landmark_embedding.npy', 'mediapipe_landmark_embedding.npz'
BFM, FLAME_TEX = 'FLAME_albedo_from_BFM.npz', 'FLAME_texture.npz'
ALBEDOMM = 'albedoModel2020_FLAME_albedoPart.npz'
SLOW = pytest.mark.slow

# The globals a plain (non-chumpy) model pickle may reference: those of FLAME's own file.
MODEL_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('scipy.sparse.csc', 'csc_matrix'),
}


@pytest.fixture(scope='module')
def small():
    return synthetic.build_assets('small', 0)


@pytest.fixture(scope='module')
def full():
    return synthetic.build_assets('full', 0, n_tex=2)


def lmk_points(model, faces_idx, bary):
    """Landmark positions on the template: sum_k bary[..., k] * v[f[face, k]]."""
    v, f = model['v_template'], model['f'].astype(np.int64)
    return np.einsum('...k,...kc->...c', np.asarray(bary, np.float64), v[f[np.asarray(faces_idx)]])


def pickle_globals(data: bytes):
    """(module, name) of every GLOBAL opcode; STACK_GLOBAL must not appear in protocol 2."""
    found = set()
    for op, arg, _ in pickletools.genops(data):
        assert op.name != 'STACK_GLOBAL', 'protocol-2 pickles have no STACK_GLOBAL'
        if op.name == 'GLOBAL':
            found.add(tuple(arg.split(' ', 1)))
    return found


def load_plain(path):
    # FLAME's file references scipy.sparse.csc, which scipy deprecates but still serves
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        with open(path, 'rb') as fh:
            return pickle.load(fh, encoding='latin1')


class _ChStandIn:
    def __setstate__(self, state):
        self.__dict__.update(state)


class _ChumpyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ('chumpy.ch', 'Ch'):
            return _ChStandIn
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            return super().find_class(module, name)


def assert_model_equal(loaded, ref):
    assert set(loaded) == set(ref)
    for key, want in ref.items():
        got = loaded[key]
        if isinstance(got, _ChStandIn):
            got = got.x
        if scipy.sparse.issparse(want):
            assert isinstance(got, scipy.sparse.csc_matrix), key
            got, want = got.toarray(), want.toarray()
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want), key
        else:
            assert got == want, key


def mesh_edges(f):
    f = np.asarray(f, np.int64)
    return np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])


def check_surface(model, n_boundary):
    """A consistently oriented surface, a disk (one open boundary loop), outward normals."""
    v, f = model['v_template'], model['f'].astype(np.int64)
    n_v = len(v)
    assert f.min() >= 0 and f.max() < n_v
    assert np.array_equal(np.unique(f), np.arange(n_v)), 'every vertex is used'
    directed = Counter(map(tuple, mesh_edges(f)))
    # consistent orientation: no directed edge twice, so an interior edge (shared by two
    # faces) appears once in each direction
    assert max(directed.values()) == 1
    boundary = [e for e in directed if (e[1], e[0]) not in directed]
    assert len(boundary) == n_boundary
    # the boundary edges chain into a single loop
    nxt = dict(boundary)
    assert len(nxt) == n_boundary
    start = node = boundary[0][0]
    for _ in range(n_boundary):
        node = nxt[node]
    assert node == start and len({nxt[a] for a in nxt}) == n_boundary
    n_edges = (len(directed) + n_boundary) // 2
    assert n_v - n_edges + len(f) == 1, 'Euler characteristic of a disk'

    a, b, c = (v[f[:, k]] for k in range(3))
    normals = np.cross(b - a, c - a)
    assert np.linalg.norm(normals, axis=1).min() > 1e-7, 'degenerate triangle'
    centre = (a + b + c) / 3
    # outward: away from the head's vertical axis
    radial = centre * np.array([1.0, 0.0, 1.0])
    assert (np.einsum('ij,ij->i', normals, radial) > 0).all()
    ring = np.unique([e[0] for e in boundary])
    closed_at = v[ring].mean(0)
    volume = np.einsum('ij,ij->i', a - closed_at, np.cross(b - closed_at, c - closed_at)).sum() / 6
    extent = v.max(0) - v.min(0)
    # head-and-neck sized, metres
    assert ((0.12 < extent) & (extent < 0.35)).all(), extent
    assert 0.3 * extent.prod() < volume < extent.prod()


def check_weights_and_joints(model):
    v, w, reg, j = model['v_template'], model['weights'], model['J_regressor'], model['J']
    n_v = len(v)
    assert w.shape == (n_v, 5) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-12)
    assert (w.max(0) > 0.5).all(), 'every joint dominates some vertices'
    # top of the head moves with the neck, the open neck ring with the root
    assert w[np.argmax(v[:, 1])].argmax() == 1
    bottom = v[:, 1] < v[:, 1].min() + 1e-3
    assert (w[bottom].argmax(1) == 0).all()

    assert isinstance(reg, scipy.sparse.csc_matrix) and reg.shape == (5, n_v)
    dense = reg.toarray()
    assert (dense >= 0).all()
    np.testing.assert_allclose(dense.sum(1), 1.0, rtol=0, atol=1e-12)
    assert ((dense > 0).sum(1) <= 8).all(), 'a few vertices per joint'
    assert np.array_equal(j, reg @ v)

    root, neck, jaw, eye_l, eye_r = j
    lo, hi = v.min(0), v.max(0)
    assert ((j > lo) & (j < hi)).all(), 'joints inside the bounding box'
    assert root[1] < neck[1] < jaw[1] < eye_l[1], 'root, neck, jaw, eyes from bottom up'
    assert eye_l[2] > jaw[2] + 0.03 and eye_r[2] > jaw[2] + 0.03, 'eyes in front'
    assert eye_l[0] > 0.015 and eye_r[0] < -0.015
    np.testing.assert_allclose(eye_l * [-1, 1, 1], eye_r, atol=2e-3)


def check_landmarks(model, lmk, mp):
    n_f = len(model['f'])
    assert lmk['static_lmk_faces_idx'].shape == (51,)
    assert lmk['static_lmk_faces_idx'].dtype == np.int64
    assert lmk['static_lmk_bary_coords'].shape == (51, 3)
    assert lmk['static_lmk_bary_coords'].dtype == np.float64
    assert lmk['full_lmk_faces_idx'].shape == (1, 68)
    assert lmk['full_lmk_faces_idx'].dtype == np.int64
    assert lmk['full_lmk_bary_coords'].shape == (1, 68, 3)
    assert lmk['full_lmk_bary_coords'].dtype == np.float64
    dyn_f, dyn_b = lmk['dynamic_lmk_faces_idx'], lmk['dynamic_lmk_bary_coords']
    assert isinstance(dyn_f, torch.Tensor) and dyn_f.dtype == torch.int64
    assert dyn_f.shape == (79, 17)
    assert isinstance(dyn_b, torch.Tensor) and dyn_b.dtype == torch.float32
    assert dyn_b.shape == (79, 17, 3)
    assert mp['lmk_face_idx'].shape == (105,) and mp['lmk_face_idx'].dtype == np.uint32
    assert mp['lmk_b_coords'].shape == (105, 3) and mp['lmk_b_coords'].dtype == np.float64
    assert mp['landmark_indices'].shape == (105,)
    assert mp['landmark_indices'].dtype == np.int64
    assert len(np.unique(mp['landmark_indices'])) == 105

    for faces, bary, atol in [
        (lmk['static_lmk_faces_idx'], lmk['static_lmk_bary_coords'], 1e-12),
        (lmk['full_lmk_faces_idx'], lmk['full_lmk_bary_coords'], 1e-12),
        # float32 like DECA's file: the sum is 1 to float32 rounding
        (dyn_f.numpy(), dyn_b.numpy(), 1e-6),
        (mp['lmk_face_idx'], mp['lmk_b_coords'], 1e-12),
    ]:
        faces = np.asarray(faces).astype(np.int64)
        assert faces.min() >= 0 and faces.max() < n_f
        assert (bary > 0).all()
        np.testing.assert_allclose(bary.sum(-1), 1.0, rtol=0, atol=atol)

    # the 51 static points are the 68 without the contour; yaw 0 (bin 0) is the frontal contour
    assert np.array_equal(lmk['static_lmk_faces_idx'], lmk['full_lmk_faces_idx'][0, 17:])
    assert np.array_equal(lmk['static_lmk_bary_coords'], lmk['full_lmk_bary_coords'][0, 17:])
    assert np.array_equal(dyn_f[0].numpy(), lmk['full_lmk_faces_idx'][0, :17])

    p = lmk_points(model, lmk['full_lmk_faces_idx'][0], lmk['full_lmk_bary_coords'][0])
    assert np.argmin(p[:, 1]) == 8, 'the chin is the lowest of the 68'
    assert np.argmax(p[:, 2]) in range(27, 36), 'the nose sticks out furthest'
    assert (p[42:48, 0] > 0).all() and (p[36:42, 0] < 0).all(), 'left eye at +x'
    assert p[36:48, 1].min() > p[48:68, 1].max(), 'eyes above the mouth'
    assert p[0, 0] < p[8, 0] < p[16, 0], 'contour from the right ear to the left'


# ----------------------------------------------------------------------------- small


def test_small_dimensions(small):
    model = small[MODEL]
    n_v, n_f = len(model['v_template']), len(model['f'])
    assert 40 <= n_v <= 80
    assert model['f'].shape == (n_f, 3) and model['f'].dtype == np.uint32
    assert model['shapedirs'].shape == (n_v, 3, 10)
    assert model['flame_ext_n_shape'] == 6 and type(model['flame_ext_n_shape']) is int
    assert model['posedirs'].shape == (n_v, 3, 36)
    assert model['J'].shape == (5, 3)
    assert np.array_equal(
        model['kintree_table'], [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]
    )
    assert model['kintree_table'].dtype == np.int64
    bfm, tex = small[BFM], small[FLAME_TEX]
    assert bfm['MU'].shape == (8 * 8 * 3,) and bfm['PC'].shape == (8 * 8 * 3, 5)
    assert tex['mean'].shape == (8, 8, 3) and tex['tex_dir'].shape == (8, 8, 3, 6)
    assert tex['ft'].shape == (n_f, 3)


def test_small_surface(small):
    model = small[MODEL]
    n_v, n_f = len(model['v_template']), len(model['f'])
    # pole fan plus ring strips: F = 2 (V - 1) - boundary length
    check_surface(model, n_boundary=2 * (n_v - 1) - n_f)


def test_small_weights_and_joints(small):
    check_weights_and_joints(small[MODEL])


def test_small_landmarks(small):
    check_landmarks(small[MODEL], small[LMK], small[MP])


def test_mapping_is_lazy_and_complete():
    misses = synthetic._build_bfm.cache_info().misses
    lazy = synthetic.build_assets('small', 11)
    lazy[MODEL]
    assert synthetic._build_bfm.cache_info().misses == misses, 'texture built unasked'
    lazy[BFM]
    assert synthetic._build_bfm.cache_info().misses == misses + 1

    assets = synthetic.build_assets('small', 0)
    assert list(assets) == list(synthetic.ASSET_NAMES) and len(assets) == 6
    assert set(assets) == {MODEL, LMK, MP, BFM, FLAME_TEX, ALBEDOMM}
    assert MODEL in assets and 'nope.pkl' not in assets
    with pytest.raises(KeyError):
        assets['nope.pkl']
    # cached: the same objects on every call
    assert synthetic.build_assets('small', 0)[MODEL] is assets[MODEL]


def test_same_seed_is_bit_identical_and_seeds_differ():
    def flat(assets):
        out = {}
        for name, obj in assets.items():
            for key, value in obj.items():
                if scipy.sparse.issparse(value):
                    value = value.toarray()
                if isinstance(value, torch.Tensor):
                    value = value.numpy()
                out[name, key] = value
        return out

    def build(seed):
        # bypass the caches: a second build must reproduce the first bit for bit
        model = synthetic._build_model.__wrapped__('small', seed)
        return flat({
            **model,
            BFM: synthetic._build_bfm.__wrapped__('small', seed, 5),
            FLAME_TEX: synthetic._build_flame_texture.__wrapped__('small', seed, 6),
        })

    a, b, c = build(3), build(3), build(4)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        value = a[key]
        if isinstance(value, np.ndarray):
            assert value.dtype == b[key].dtype and value.tobytes() == b[key].tobytes(), key
        else:
            assert value == b[key], key
    for key in [(MODEL, 'v_template'), (MODEL, 'shapedirs'), (MODEL, 'posedirs'),
                (MODEL, 'J'), (MP, 'landmark_indices'), (BFM, 'PC'), (FLAME_TEX, 'tex_dir')]:
        assert not np.array_equal(a[key], c[key]), key
    # the cached public path agrees with the uncached build
    cached = flat(synthetic.build_assets('small', 3))
    assert all(np.array_equal(cached[k], a[k]) for k in a if isinstance(a[k], np.ndarray))


def test_texture_components_do_not_depend_on_n_tex(small):
    for n in (1, 2, 3):
        part = synthetic.build_assets('small', 0, n_tex=n)
        assert part[BFM]['PC'].shape == (192, n) and part[FLAME_TEX]['tex_dir'].shape[-1] == n
        # bit-identical, not merely close
        assert np.array_equal(part[BFM]['PC'], small[BFM]['PC'][:, :n])
        assert np.array_equal(part[BFM]['MU'], small[BFM]['MU'])
        assert np.array_equal(part[FLAME_TEX]['tex_dir'], small[FLAME_TEX]['tex_dir'][..., :n])
        assert np.array_equal(part[FLAME_TEX]['mean'], small[FLAME_TEX]['mean'])
    # n_tex beyond the BFM count keeps all 5 BFM components and 6 FLAME ones
    six = synthetic.build_assets('small', 0, n_tex=6)
    assert six[BFM]['PC'].shape[-1] == 5 and six[FLAME_TEX]['tex_dir'].shape[-1] == 6


def test_texture_values(small):
    bfm, tex = small[BFM], small[FLAME_TEX]
    assert bfm['MU'].dtype == np.float64 and bfm['PC'].dtype == np.float64
    assert 0.0 < bfm['MU'].min() and bfm['MU'].max() < 1.0
    assert 0.0 < tex['mean'].min() and tex['mean'].max() < 255.0
    # component k has RMS amplitude / (1 + k) over pixels and channels (orthogonal DCT
    # patterns make it exact up to rounding)
    k = np.arange(5)
    np.testing.assert_allclose(np.sqrt((bfm['PC'] ** 2).mean(0)), 0.06 / (1 + k), rtol=1e-9)
    rms = np.sqrt((tex['tex_dir'].astype(np.float64) ** 2).mean((0, 1, 2)))
    # tex_dir is stored as float32: relative rounding 6e-8 per value
    np.testing.assert_allclose(rms, 15.0 / (1 + np.arange(6)), rtol=1e-6)
    vt, ft = tex['vt'], tex['ft']
    assert vt.ndim == 2 and vt.shape[1] == 2 and vt.min() >= 0.0 and vt.max() <= 1.0
    assert np.array_equal(np.unique(ft), np.arange(len(vt))), 'every uv used, none missing'


def test_shape_basis_magnitudes(small):
    model = small[MODEL]
    dirs = model['shapedirs']
    rms = np.sqrt((dirs ** 2).sum(1).mean(0))
    # 4 mm RMS per unit coefficient for the first component of each block, then 1/(1 + k)
    want = 4e-3 / (1 + np.concatenate([np.arange(6), np.arange(4)]))
    np.testing.assert_allclose(rms, want, rtol=1e-9)
    pose_rms = np.sqrt((model['posedirs'] ** 2).sum(1).mean(0))
    np.testing.assert_allclose(pose_rms, 2e-3, rtol=1e-9)
    # orthogonal columns within each block, as a PCA basis has
    for block in (dirs[..., :6], dirs[..., 6:]):
        gram = np.einsum('vck,vcl->kl', block, block)
        off = gram - np.diag(np.diag(gram))
        assert np.abs(off).max() < 1e-12 * np.diag(gram).max()
    assert np.linalg.matrix_rank(dirs.reshape(-1, 10)) == 10


@pytest.mark.parametrize('chumpy', [False, True])
@pytest.mark.parametrize('kintree_dtype', ['int64', 'uint32'])
def test_write_model_round_trip(tmp_path, small, chumpy, kintree_dtype):
    out = synthetic.write_assets(
        tmp_path / 'a' / 'b', 'small', 0, chumpy=chumpy, kintree_dtype=kintree_dtype
    )
    assert out == tmp_path / 'a' / 'b'
    path = out / MODEL
    data = path.read_bytes()
    assert data[:2] == b'\x80\x02', 'protocol 2'
    found = pickle_globals(data)
    ref = dict(small[MODEL])
    ref['kintree_table'] = ref['kintree_table'].astype(kintree_dtype)
    if chumpy:
        assert ('chumpy.ch', 'Ch') in found
        # chumpy's Ch state holds a set, pickled through Python 2's builtins
        assert found == MODEL_GLOBALS | {('chumpy.ch', 'Ch'), ('__builtin__', 'set')}
        with open(path, 'rb') as fh:
            loaded = _ChumpyUnpickler(fh, encoding='latin1').load()
        for key in ['v_template', 'shapedirs', 'posedirs', 'weights', 'J']:
            assert isinstance(loaded[key], _ChStandIn), key
            assert loaded[key]._dirty_vars == set()
        assert isinstance(loaded['f'], np.ndarray)
    else:
        assert found == MODEL_GLOBALS
        loaded = load_plain(path)
    assert_model_equal(loaded, ref)
    if kintree_dtype == 'uint32':
        assert loaded['kintree_table'][0, 0] == 4294967295


def test_model_pickle_is_python2_style(tmp_path):
    out = synthetic.write_assets(tmp_path, 'small', 0)
    data = (out / MODEL).read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    # Python 2 str for both array bytes and text, never Python 3 bytes/unicode opcodes
    assert 'BINSTRING' in ops and 'SHORT_BINSTRING' in ops
    assert not ops & {'BINBYTES', 'SHORT_BINBYTES', 'BINUNICODE', 'SHORT_BINUNICODE'}
    # like the real file, it needs encoding='latin1'
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)


def test_write_other_files(tmp_path, small):
    out = synthetic.write_assets(tmp_path, 'small', 0, model_name='flame2023.pkl')
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ['flame2023.pkl', LMK, MP, BFM, FLAME_TEX, ALBEDOMM]
    )
    assert_model_equal(load_plain(out / 'flame2023.pkl'), small[MODEL])

    saved = np.load(out / LMK, allow_pickle=True)
    assert saved.dtype == object and saved.shape == ()
    lmk = saved[()]
    assert set(lmk) == set(small[LMK])
    for key, want in small[LMK].items():
        got = lmk[key]
        assert type(got) is type(want), key
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), key
        else:
            assert got.dtype == want.dtype and np.array_equal(got, want), key

    for name in (MP, BFM, FLAME_TEX):
        with np.load(out / name) as npz:
            assert set(npz.files) == set(small[name])
            for key, want in small[name].items():
                assert npz[key].dtype == want.dtype, (name, key)
                assert np.array_equal(npz[key], want), (name, key)


def test_write_image_layout_and_n_tex(tmp_path, small):
    out = synthetic.write_assets(tmp_path, 'small', 0, texture_layout='image', n_tex=3)
    with np.load(out / BFM) as npz:
        assert npz['MU'].shape == (8, 8, 3) and npz['PC'].shape == (8, 8, 3, 3)
        # flat index order is h, w, c
        assert np.array_equal(npz['PC'].reshape(-1, 3), small[BFM]['PC'][:, :3])
        assert np.array_equal(npz['MU'].reshape(-1), small[BFM]['MU'])
    with np.load(out / FLAME_TEX) as npz:
        assert npz['tex_dir'].shape == (8, 8, 3, 3)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='size'):
        synthetic.build_assets('medium')
    with pytest.raises(ValueError, match='seed'):
        synthetic.build_assets('small', -1)
    with pytest.raises(TypeError, match='seed'):
        synthetic.build_assets('small', 1.5)
    with pytest.raises(ValueError, match='n_tex'):
        synthetic.build_assets('small', 0, n_tex=0)
    with pytest.raises(ValueError, match='n_tex'):
        synthetic.build_assets('small', 0, n_tex=7)
    with pytest.raises(ValueError, match='n_tex'):
        synthetic.build_assets('full', 0, n_tex=201)
    with pytest.raises(ValueError, match='kintree_dtype'):
        synthetic.write_assets(tmp_path, 'small', kintree_dtype='int32')
    with pytest.raises(ValueError, match='texture_layout'):
        synthetic.write_assets(tmp_path, 'small', texture_layout='planar')
    with pytest.raises(ValueError, match='model_name'):
        synthetic.write_assets(tmp_path, 'small', model_name='sub/generic_model.pkl')
    with pytest.raises(SystemExit):
        synthetic._main(['--out', str(tmp_path), '--size', 'small', '--seed', '-1'])
    assert not any(tmp_path.iterdir()), 'nothing written on bad arguments'


def test_command_line(tmp_path):
    out = tmp_path / 'cli'
    root = pathlib.Path(synthetic.__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, '-m', 'flame_ext.synthetic', '--out', str(out), '--size', 'small',
         '--seed', '2', '--chumpy'],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL, LMK, MP, BFM, FLAME_TEX, ALBEDOMM])
    assert ('chumpy.ch', 'Ch') in pickle_globals((out / MODEL).read_bytes())
    with open(out / MODEL, 'rb') as fh:
        loaded = _ChumpyUnpickler(fh, encoding='latin1').load()
    want = synthetic.build_assets('small', 2)[MODEL]['v_template']
    assert np.array_equal(loaded['v_template'].x, want)


# ------------------------------------------------------------------------------ full


@SLOW
def test_full_dimensions(full):
    model = full[MODEL]
    assert set(model) == {'f', 'v_template', 'shapedirs', 'posedirs', 'J_regressor',
                          'kintree_table', 'weights', 'J', 'bs_style', 'bs_type'}
    expect = {
        'f': ((9976, 3), np.uint32),
        'v_template': ((5023, 3), np.float64),
        'shapedirs': ((5023, 3, 400), np.float64),
        'posedirs': ((5023, 3, 36), np.float64),
        'J_regressor': ((5, 5023), np.float64),
        'kintree_table': ((2, 5), np.int64),
        'weights': ((5023, 5), np.float64),
        'J': ((5, 3), np.float64),
    }
    for key, (shape, dtype) in expect.items():
        assert model[key].shape == shape and model[key].dtype == dtype, key
    assert isinstance(model['J_regressor'], scipy.sparse.csc_matrix)
    assert model['bs_style'] == 'lbs' and model['bs_type'] == 'lrotmin'
    assert np.array_equal(model['kintree_table'], [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    bfm, tex = full[BFM], full[FLAME_TEX]
    assert bfm['MU'].shape == (786432,) and bfm['PC'].shape == (786432, 2)
    assert bfm['MU'].dtype == np.float64 and bfm['PC'].dtype == np.float64
    assert tex['mean'].shape == (512, 512, 3) and tex['tex_dir'].shape == (512, 512, 3, 2)
    assert tex['ft'].shape == (9976, 3)
    # the published component counts (building them all would take 1.9 GB)
    spec = synthetic._size_spec('full')
    assert (spec.n_tex_bfm, spec.n_tex_flame) == (199, 200)


@SLOW
def test_full_surface(full):
    check_surface(full[MODEL], n_boundary=68)


@SLOW
def test_full_weights_joints_landmarks(full):
    check_weights_and_joints(full[MODEL])
    check_landmarks(full[MODEL], full[LMK], full[MP])


@SLOW
def test_full_contour_moves_smoothly_with_yaw(full):
    lmk = full[LMK]
    pts = lmk_points(full[MODEL], lmk['dynamic_lmk_faces_idx'].numpy(),
                     lmk['dynamic_lmk_bary_coords'].numpy())
    yaw = np.array([b if b < 40 else 39 - b for b in range(79)])
    order = np.argsort(yaw)  # bins sorted by yaw -39 .. 39
    step = np.linalg.norm(np.diff(pts[order], axis=0), axis=-1)
    assert step.max() < 0.01, 'one degree of yaw moves a contour point < 1 cm'
    swing = np.linalg.norm(pts[39] - pts[78], axis=-1)  # yaw 39 vs -39
    assert swing.min() > 0.01


@SLOW
def test_full_bases_are_smooth_and_local(full):
    model = full[MODEL]
    v, f, dirs = model['v_template'], model['f'].astype(np.int64), model['shapedirs']
    rms = np.sqrt((dirs ** 2).sum(1).mean(0))
    k = np.concatenate([np.arange(300), np.arange(100)])
    np.testing.assert_allclose(rms, 4e-3 / (1 + k), rtol=1e-9)
    # smooth: along a mesh edge (about 5 mm) the first components change by ~10% of their
    # size (uncorrelated neighbours would give ~140%)
    e = mesh_edges(f)
    for col in (0, 1, 300, 301):
        d = dirs[:, :, col]
        jump = np.linalg.norm(d[e[:, 0]] - d[e[:, 1]], axis=1).mean()
        assert jump < 0.2 * np.linalg.norm(d, axis=1).mean(), col
    # expressions live on the face, not on the back of the head
    angle = np.arctan2(v[:, 0], v[:, 2])
    face, back = np.abs(angle) < 0.8, np.abs(angle) > 2.4
    expr = np.linalg.norm(dirs[:, :, 300:], axis=1).mean(1)
    assert expr[back].mean() < 0.05 * expr[face].mean()


@SLOW
def test_full_write_plain(tmp_path, full):
    out = synthetic.write_assets(tmp_path, 'full', 0, n_tex=1)
    loaded = load_plain(out / MODEL)
    assert 'flame_ext_n_shape' not in loaded
    assert_model_equal(loaded, full[MODEL])
    assert pickle_globals((out / MODEL).read_bytes()) == MODEL_GLOBALS
    with np.load(out / BFM) as npz:
        assert npz['PC'].shape == (786432, 1)
        assert np.array_equal(npz['PC'][:, 0], full[BFM]['PC'][:, 0])
