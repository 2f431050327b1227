"""The model-file loaders under hostile conditions: damaged and malicious files, bad
arguments, many threads at once.

- Damaged files: random truncations, bit flips, insertions and deletions of each asset
  file either load or are refused with an error naming the file.
- Malicious files: memo bombs (shared sub-lists that expand to 1e9 elements), archive
  members declaring huge arrays, damaged zip fields, object arrays carrying payloads,
  torch storages carrying payloads, a sweep of dangerous globals, and values beyond
  float32's range. Each is refused naming the file; nothing from it runs.
- Arguments: anything but a path is a TypeError naming it; counts and sizes are checked.
- Threads: model loading and the one-time synthetic-model notice from many threads.
"""

import io
import os
import pickle
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from _oracle import assert_error_names
from _process import hang_guard, in_threads, rss_bytes
from _samples import SMALL, model_raw, write_pickle
from flame_ext import _ops, synthetic
from flame_ext import io as fio


# --- damaged files: any mutation of a valid file loads or is refused naming the file ------


class _Files(dict):
    """File name -> bytes, with a short repr for hypothesis' failure reports."""

    def __repr__(self):
        return f"<{len(self)} synthetic-small asset files>"


@pytest.fixture(scope="module")
def asset_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("assets")
    synthetic.write_assets(directory, "small", chumpy=True, kintree_dtype="uint32")
    return _Files({path.name: path.read_bytes() for path in directory.iterdir()})


LOADERS = {
    "generic_model.pkl": lambda path: fio.load_flame_model(path),
    "landmark_embedding.npy": lambda path: fio.load_landmark_embedding("68", path),
    "mediapipe_landmark_embedding.npz": lambda path: fio.load_landmark_embedding("mp", path),
    "FLAME_albedo_from_BFM.npz": lambda path: fio.load_texture_space(path, n_tex=3),
    "FLAME_texture.npz": lambda path: fio.load_texture_space(path, n_tex=3),
}


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    return kind, draw(st.floats(0, 1, exclude_max=True)), draw(st.binary(min_size=1, max_size=8))


def mutate(data, mutation):
    kind, where, payload = mutation
    if not data:
        return payload
    i = int(where * len(data))
    if kind == "truncate":
        return data[:i]
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ (payload[0] or 0xFF)]) + data[i + 1:]
    if kind == "overwrite":
        return data[:i] + payload + data[i + len(payload):]
    if kind == "insert":
        return data[:i] + payload + data[i:]
    return data[:i] + data[i + len(payload):]


@pytest.mark.parametrize("name", sorted(LOADERS))
@given(changes=st.lists(mutations(), min_size=1, max_size=3))
def test_damaged_files_load_or_name_the_file(asset_files, tmp_path_factory, name, changes):
    data = asset_files[name]
    for change in changes:
        data = mutate(data, change)
    path = tmp_path_factory.mktemp("damaged") / name
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's TypedStorage notice
        try:
            LOADERS[name](path)
        except (ValueError, TypeError, pickle.UnpicklingError) as e:
            assert str(path) in str(e), f"{type(e).__name__} does not name the file: {e}"


# --- malicious files ----------------------------------------------------------------------


class Payload:
    """Unpickling it calls func(*args): what a malicious file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch(marker):
    return Payload(os.system, f"touch {marker}")


def _memo_bomb(levels=3, width=1000):
    """Nested lists sharing one sub-list per level: width ** levels elements, a few KB
    pickled (the memo stores each list once)."""
    bomb = [0] * width
    for _ in range(levels - 1):
        bomb = [bomb] * width
    return bomb


@pytest.mark.parametrize("where", ["f", "chumpy", "sparse", "landmarks"])
def test_memo_bomb_refused_without_expanding(tmp_path, where):
    """A ~30 KB pickle whose lists expand to 1e9 elements (as an array, as a chumpy
    value, as sparse data, in the landmark file): refused by counting, before numpy would
    spend minutes and 8 GB building the array."""
    bomb = _memo_bomb()
    if where == "landmarks":
        raw = dict.fromkeys(fio._LMK68_KEYS, np.zeros(3, np.int64))
        raw["static_lmk_faces_idx"] = bomb
        path = tmp_path / "landmark_embedding.npy"
        np.save(path, raw, allow_pickle=True)
        load = lambda: fio.load_landmark_embedding("68", path)  # noqa: E731
    else:
        path = tmp_path / "generic_model.pkl"
        if where == "f":
            write_pickle(path, dict(model_raw(), f=bomb))
        elif where == "chumpy":
            path.write_bytes(_dumps_with_globals(dict(model_raw(), v_template=_Ch(bomb))))
        else:
            state = {"_shape": (5, 12), "data": bomb, "indices": np.zeros(1, np.int32),
                     "indptr": np.zeros(13, np.int32)}
            path.write_bytes(_dumps_with_globals(dict(model_raw(), J_regressor=_Csc(state))))
        load = lambda: fio.load_flame_model(path)  # noqa: E731
    assert path.stat().st_size < 100_000
    rss = rss_bytes()
    with hang_guard(), pytest.raises(ValueError, match=f"{path}.*nested list of more than"):
        load()
    assert rss_bytes() - rss < 512 << 20


class _Ch:
    """Pickled as chumpy.ch.Ch holding `x`."""

    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        return (_copyreg_reconstructor(), (_named("chumpy.ch", "Ch"), object, None),
                {"x": self.x})


class _Csc:
    """Pickled as scipy.sparse.csc_matrix with the given state."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (_copyreg_reconstructor(), (_named("scipy.sparse._csc", "csc_matrix"), object,
                                           None), self.state)


def _named(module, name):
    """A class that pickles as the global module.name (whatever it really is)."""
    cls = type(name, (), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


def _copyreg_reconstructor():
    import copyreg

    return copyreg._reconstructor


def _dumps_with_globals(obj):
    """Pickles obj, writing classes as GLOBAL module.name from their declared path."""
    buf = io.BytesIO()
    pickler = pickle._Pickler(buf, protocol=2)

    def save_global(o, name=None, pickler=pickler):
        pickler.write(pickle.GLOBAL + f"{o.__module__}\n{o.__qualname__}\n".encode())
        pickler.memoize(o)

    pickler.dispatch = dict(pickle._Pickler.dispatch)
    pickler.dispatch[type] = lambda self, o: save_global(o)
    pickler.dump(obj)
    return buf.getvalue()


def _npy_bytes(shape, dtype="<f8", data=b""):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + data


@pytest.mark.parametrize("which", ["mean", "basis", "mediapipe"])
@pytest.mark.parametrize("declared", [3 * 4096**2, 3 * 2**48], ids=["400MB", "6PB"])
def test_npz_member_declaring_a_huge_array(tmp_path, which, declared):
    """A member's header declares far more data than it holds: refused naming the file
    and member before numpy allocates the declared size (6 PB: a MemoryError; 400 MB:
    memory for nothing)."""
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as z:
        if which == "mediapipe":
            z.writestr("lmk_face_idx.npy", _npy_bytes((declared,), "<u4", b"\0" * 64))
            z.writestr("lmk_b_coords.npy", _npy_bytes((4, 3), data=b"\0" * 96))
            z.writestr("landmark_indices.npy", _npy_bytes((4,), "<i8", b"\0" * 32))
        else:
            big, small = _npy_bytes((declared,), data=b"\0" * 64), _npy_bytes((48,), data=b"\0" * 384)
            big_pc = _npy_bytes((declared, 2), data=b"\0" * 64)
            z.writestr("MU.npy", big if which == "mean" else small)
            z.writestr("PC.npy", big_pc if which == "basis" else _npy_bytes((48, 2), data=b"\0" * 768))
    rss = rss_bytes()
    with pytest.raises(ValueError, match=rf"{path}\[\w+\]: declares an array of shape"):
        if which == "mediapipe":
            fio.load_landmark_embedding("mp", path)
        else:
            fio.load_texture_space(path, n_tex=1)
    assert rss_bytes() - rss < 64 << 20


def _patch_zip_field(data, signature, offset, fmt, value):
    """Overwrites a field at `offset` in every zip record starting with `signature`."""
    data = bytearray(data)
    start = 0
    while (i := data.find(signature, start)) >= 0:
        struct.pack_into(fmt, data, i + offset, value)
        start = i + 4
    return bytes(data)


@pytest.mark.parametrize(
    "field",
    ["method", "version", "size", "encrypted"],
)
def test_npz_with_damaged_zip_fields(tmp_path, field):
    """zipfile raises NotImplementedError / RuntimeError for these; the loader names the
    file instead of letting them through. 'size' states a huge uncompressed size for a
    stored member (what numpy would allocate before reading)."""
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(path, MU=np.zeros(48), PC=np.zeros((48, 2)))
    data = path.read_bytes()
    local, central = b"PK\x03\x04", b"PK\x01\x02"
    if field == "method":  # compression method 99 (AES) in both headers
        data = _patch_zip_field(data, local, 8, "<H", 99)
        data = _patch_zip_field(data, central, 10, "<H", 99)
    elif field == "version":  # "needs version 21.0 to extract"
        data = _patch_zip_field(data, central, 6, "<H", 210)
    elif field == "size":  # uncompressed size 4 GB - 1 in the central directory
        data = _patch_zip_field(data, central, 24, "<I", 0xFFFFFFF0)
    else:  # the "encrypted" flag bit
        data = _patch_zip_field(data, local, 6, "<H", 1)
        data = _patch_zip_field(data, central, 8, "<H", 1)
    path.write_bytes(data)
    with pytest.raises(ValueError, match=str(path)):
        fio.load_texture_space(path, n_tex=1)


def test_object_array_of_payloads_in_model(tmp_path):
    """An object array whose items are payloads: the items are pickled inline, and the
    first one stops the load at its global. Nothing runs."""
    marker = tmp_path / "pwned"
    array = np.empty(3, dtype=object)
    array[:] = [_touch(marker), _touch(marker), 1]
    path = write_pickle(tmp_path / "generic_model.pkl", dict(model_raw(), f=array))
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load.*system"):
        fio.load_flame_model(path)
    assert not marker.exists()


def test_harmless_object_array_is_a_type_error(tmp_path):
    array = np.array([[0, 1, 2]] * 10, dtype=object)
    path = write_pickle(tmp_path / "generic_model.pkl", dict(model_raw(), f=array))
    with pytest.raises(TypeError, match=f"{path}: f must be an integer array, got dtype object"):
        fio.load_flame_model(path)


def test_landmark_npy_that_is_an_object_array_of_payloads(tmp_path):
    """np.save of a 1-D object array: refused from the .npy header, never unpickled."""
    marker = tmp_path / "pwned"
    array = np.empty(2, dtype=object)
    array[:] = [_touch(marker), _touch(marker)]
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError, match=f"{path}: expected a pickled dict"):
        fio.load_landmark_embedding("68", path)
    assert not marker.exists()


def test_npz_object_member_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    array = np.empty(1, dtype=object)
    array[0] = _touch(marker)
    path = tmp_path / "mediapipe_landmark_embedding.npz"
    np.savez(path, lmk_face_idx=array, lmk_b_coords=np.zeros((1, 3)),
             landmark_indices=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=rf"{path}\[lmk_face_idx\]: is an object array"):
        fio.load_landmark_embedding("mp", path)
    assert not marker.exists()


class _HostileStorage:
    """Pickled as torch.storage._load_from_bytes(bytes): the bytes are a pickle that
    calls os.system, as a legacy torch.save stream would carry one."""

    def __init__(self, marker):
        self.data = pickle.dumps(_touch(marker), protocol=2)

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


def test_torch_storage_carrying_a_payload(tmp_path):
    """Storage bytes go through torch.load(weights_only=True), which refuses the global."""
    marker = tmp_path / "pwned"
    raw = dict.fromkeys(fio._LMK68_KEYS, np.zeros(3))
    raw["dynamic_lmk_faces_idx"] = _HostileStorage(marker)
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, raw, allow_pickle=True)
    with pytest.raises(ValueError, match=str(path)):
        fio.load_landmark_embedding("68", path)
    assert not marker.exists()


DANGEROUS_GLOBALS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "compile"), ("builtins", "getattr"), ("builtins", "setattr"),
    ("builtins", "__import__"), ("builtins", "open"), ("builtins", "globals"),
    ("__builtin__", "getattr"), ("importlib", "import_module"), ("runpy", "run_path"),
    ("pickle", "loads"), ("_pickle", "loads"), ("marshal", "loads"), ("shutil", "rmtree"),
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("functools", "partial"),
    ("sys", "exit"), ("ctypes", "CDLL"), ("numpy", "load"), ("numpy", "frompyfunc"),
    ("numpy.lib.npyio", "load"), ("numpy.core.multiarray", "array"),
    ("numpy._core.multiarray", "_reconstruct_bogus"), ("numpy.testing", "assert_"),
    ("scipy.sparse", "load_npz"), ("torch", "load"), ("torch.serialization", "load"),
    ("torch.jit", "load"), ("torch._utils", "_rebuild_parameter"), ("torch.nn", "Module"),
    ("torch", "from_file"), ("codecs", "encode"), ("_codecs", "decode"),
    ("collections", "namedtuple"), ("types", "FunctionType"), ("copyreg", "__newobj__"),
    ("webbrowser", "open"), ("pty", "spawn"), ("flame_ext.io", "_read_pickle_file"),
]


@pytest.mark.parametrize("module, name", DANGEROUS_GLOBALS,
                         ids=[f"{m}.{n}" for m, n in DANGEROUS_GLOBALS])
@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST"])
def test_dangerous_global_refused(tmp_path, module, name, opcode):
    """Each global, called with an argument, as a model value: refused by name when the
    unpickler resolves it (before it could be called), with every way of naming one."""
    arg = pickle.BINUNICODE + struct.pack("<I", 4) + b"true"
    if opcode == "GLOBAL":
        call = pickle.GLOBAL + f"{module}\n{name}\n".encode() + arg + pickle.TUPLE1 + pickle.REDUCE
    elif opcode == "STACK_GLOBAL":
        def string(s):
            return pickle.BINUNICODE + struct.pack("<I", len(s)) + s.encode()

        call = string(module) + string(name) + pickle.STACK_GLOBAL + arg + pickle.TUPLE1 + \
            pickle.REDUCE
    else:
        call = pickle.MARK + arg + pickle.INST + f"{module}\n{name}\n".encode()
    data = (pickle.PROTO + bytes([4]) + pickle.EMPTY_DICT + pickle.BINUNICODE +
            struct.pack("<I", 1) + b"f" + call + pickle.SETITEM + pickle.STOP)
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(data)
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load.*{module}.{name}"):
        fio.load_flame_model(path)


@pytest.mark.parametrize(
    "data, match",
    [
        # numpy's _reconstruct asked to build a numpy.dtype instead of an ndarray
        (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R",
         "_reconstruct called with"),
        # bytes(10**12) would allocate a terabyte
        (b"c__builtin__\nbytes\n\x8a\x05\x00\x10\xa5\xd4\xe8\x85R", "only allowed without"),
        # _codecs.encode with a codec other than latin1
        (b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R", "latin1"),
        # numpy.dtype from something other than a string
        (b"cnumpy\ndtype\n}\x85R", "numpy.dtype from dict refused"),
    ],
    ids=["reconstruct-subtype", "bytes-size", "codec", "dtype-spec"],
)
def test_allowed_globals_refuse_bad_arguments(tmp_path, data, match):
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(b"\x80\x02" + data + b".")
    with pytest.raises(pickle.UnpicklingError, match=match):
        fio.load_flame_model(path)


@pytest.mark.parametrize("key", ["shapedirs", "v_template", "weights"])
def test_values_beyond_float32_refused(tmp_path, key):
    """1e39 is finite in float64 but inf in the float32 decoders: refused at load."""
    raw = model_raw()
    raw[key] = raw[key].copy()
    raw[key].reshape(-1)[5] = -1e39
    path = write_pickle(tmp_path / "generic_model.pkl", raw)
    with pytest.raises(ValueError, match=f"{path}: .*beyond the float32 range"):
        fio.load_flame_model(path)


def test_more_joints_than_the_kernels_hold(tmp_path):
    """A 17-joint model is consistent data and loads; the compiled ops refuse 17 joints
    with a clear error (the kernels hold at most 16) before any kernel runs."""
    path = write_pickle(tmp_path / "generic_model.pkl", model_raw(J=17))
    assert fio.load_flame_model(path).parents.shape == (17,)
    if _ops.available():
        from flame_ext._ops import rigid_transforms

        pose = torch.zeros(2, 17, 3)
        with pytest.raises(ValueError, match="pose must have 1 to 16 joints"):
            rigid_transforms.rigid_transforms(pose, pose, torch.tensor([-1] + list(range(16))))


# --- arguments ----------------------------------------------------------------------------


any_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                     st.binary(max_size=4), st.lists(st.integers(), max_size=2))


@given(model_path=any_value)
def test_loader_model_path_is_checked(model_path):
    """Anything but a path (str / PathLike) or None is a TypeError naming model_path; a
    string that names no file is a FileNotFoundError naming it."""
    assume(model_path is not None and model_path not in ("synthetic", "synthetic-small"))
    for load in (fio.load_flame_model, lambda p: fio.load_landmark_embedding("68", p),
                 lambda p: fio.load_texture_space(p, n_tex=1)):
        expected = FileNotFoundError if isinstance(model_path, str) else TypeError
        with pytest.raises(expected) as info:
            load(model_path)
        assert_error_names(info, "model_path")


@given(lm_type=any_value, num_faces=any_value)
def test_landmark_loader_arguments_are_checked(lm_type, num_faces):
    valid_faces = num_faces is None or (
        isinstance(num_faces, int) and not isinstance(num_faces, bool) and num_faces >= 1)
    assume(not (lm_type in ("68", "mp") and valid_faces))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError)) as info:
            fio.load_landmark_embedding(lm_type, SMALL, num_faces=num_faces)
    assert_error_names(info, "lm_type" if lm_type not in ("68", "mp") else "num_faces",
                       "sits on face")  # a valid count too small for the embedding


@given(size=st.one_of(st.sampled_from(["small", "full"]), any_value),
       seed=st.one_of(st.integers(-3, 3), any_value))
def test_synthetic_arguments_are_checked(size, seed):
    valid = size in ("small", "full") and isinstance(seed, int) and not isinstance(
        seed, bool) and seed >= 0
    if valid:
        assert len(synthetic.build_assets(size, seed)) == len(synthetic.ASSET_NAMES)  # builds lazily: cheap
        return
    with pytest.raises((ValueError, TypeError)) as info:
        synthetic.build_assets(size, seed)
    assert_error_names(info, "size" if size not in ("small", "full") else "seed")


# --- threads ------------------------------------------------------------------------------


def _clear_synthetic_caches():
    for name in ("_build_model", "_build_bfm", "_build_flame_texture", "_mesh", "_size_spec"):
        cached = getattr(synthetic, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def test_concurrent_model_loading_and_warning(monkeypatch):
    """Eight threads load the synthetic model (caches cleared, so they build it at the
    same time) and the texture: every one gets the same arrays, and the synthetic-model
    notice is given exactly once."""
    expected = fio.load_flame_model(SMALL)
    _clear_synthetic_caches()
    monkeypatch.setattr(fio, "_warned_synthetic", set())
    notices = []
    real_warn = warnings.warn

    def counting_warn(message, *args, **kwargs):
        if "SYNTHETIC FLAME model" in str(message):
            notices.append(message)
        else:
            real_warn(message, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", counting_warn)

    def load(i):
        model = fio.load_flame_model(SMALL)
        embedding = fio.load_landmark_embedding("68", SMALL, num_faces=model.faces.shape[0])
        texture = fio.load_texture_space(SMALL, n_tex=1 + i % 5)
        return model, embedding, texture

    results = in_threads(load, 8)
    assert len(notices) == 1
    for model, embedding, texture in results:
        for name in ("faces", "v_template", "shapedirs", "posedirs", "J_regressor",
                     "parents", "lbs_weights"):
            np.testing.assert_array_equal(getattr(model, name), getattr(expected, name))
        assert embedding.dynamic_lmk_faces_idx.shape == (79, 17)
    # Components are the same whatever n_tex built them.
    first = results[4][2].basis  # n_tex = 5
    for _, _, texture in results:
        np.testing.assert_array_equal(texture.basis, first[:, : texture.n_tex])
