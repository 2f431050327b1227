"""flame_ext.io discovery: which file a loader reads (explicit path, $FLAME_EXT_DATA,
~/.medusa_ext_data/FLAME, medusa's package data), what the errors say, and the synthetic
assets standing in only when asked for (and saying so once)."""

import sys
import threading
import warnings

import numpy as np
import pytest

from flame_ext import io as fio
from io_builders import FLAME_PARENTS, lmk68_raw, write_asset_dir, write_lmk68

REAL_MEDUSA_DATA_DIR = fio.discovery._medusa_data_dir


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No FLAME_EXT_DATA, an empty HOME and no medusa: discovery sees only what a test adds."""
    monkeypatch.delenv(fio.ENV_VAR, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(fio.discovery, "_medusa_data_dir", lambda: None)
    return home


# --------------------------------------------------------------------------------------
# Discovery


def test_nothing_found_says_where_and_how(clean_env):
    with pytest.raises(FileNotFoundError) as info:
        fio.load_flame_model()
    message = str(info.value)
    home_flame = str(clean_env / ".medusa_ext_data" / "FLAME")
    for needle in ("generic_model.pkl", "FLAME_EXT_DATA (not set)", home_flame, "does not exist",
                   "model_path=", "~/.medusa_ext_data/FLAME/"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="no FLAME data directory found"):
        fio.find_data_dir()


def test_discovery_order(clean_env, tmp_path, monkeypatch):
    home_dir = write_asset_dir(clean_env / ".medusa_ext_data" / "FLAME", seed=1)
    assert fio.load_flame_model().source == str(home_dir / "generic_model.pkl")
    assert fio.find_data_dir() == home_dir

    env_dir = write_asset_dir(tmp_path / "env", seed=2)
    monkeypatch.setenv(fio.ENV_VAR, str(env_dir))
    assert fio.load_flame_model().source == str(env_dir / "generic_model.pkl")
    assert fio.load_texture_space(n_tex=1).source == str(env_dir / "FLAME_albedo_from_BFM.npz")
    assert fio.load_landmark_embedding("mp").source == str(env_dir / fio.LANDMARK_FILE_NAMES["mp"])
    assert fio.find_data_dir() == env_dir

    explicit = write_asset_dir(tmp_path / "explicit", seed=3)
    assert fio.load_flame_model(explicit).source == str(explicit / "generic_model.pkl")
    model_file = str(explicit / "generic_model.pkl")
    assert fio.load_flame_model(model_file).source == model_file
    assert fio.find_data_dir(explicit / "generic_model.pkl") == explicit
    assert fio.find_data_dir(str(explicit)) == explicit

    # a file missing from the env directory is looked up further down the order
    (env_dir / "landmark_embedding.npy").unlink()
    assert fio.load_landmark_embedding("68").source == str(home_dir / "landmark_embedding.npy")


def test_landmarks_next_to_explicit_model(clean_env, tmp_path):
    d = write_asset_dir(tmp_path / "d")
    emb = fio.load_landmark_embedding("68", d / "generic_model.pkl", num_faces=10)
    assert emb.source == str(d / "landmark_embedding.npy")
    (d / "landmark_embedding.npy").unlink()
    write_asset_dir(clean_env / ".medusa_ext_data" / "FLAME")
    # an explicit path is authoritative: no silent fallback to another location
    with pytest.raises(FileNotFoundError, match=r"holds none of \['landmark_embedding.npy'\]"):
        fio.load_landmark_embedding("68", d / "generic_model.pkl")


def test_medusa_package_data_for_landmarks(clean_env, tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "medusa"
    (pkg / "data" / "flame").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('medusa must not be imported')\n")
    write_lmk68(pkg / "data" / "flame" / "landmark_embedding.npy", lmk68_raw(34))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(fio.discovery, "_medusa_data_dir", REAL_MEDUSA_DATA_DIR)  # undo clean_env's stub
    monkeypatch.delitem(sys.modules, "medusa", raising=False)
    emb = fio.load_landmark_embedding("68")
    assert emb.source == str(pkg / "data" / "flame" / "landmark_embedding.npy")
    assert "medusa" not in sys.modules
    with pytest.raises(FileNotFoundError, match="mediapipe_landmark_embedding.npz.*medusa"):
        fio.load_landmark_embedding("mp")
    with pytest.raises(FileNotFoundError):
        fio.load_flame_model()  # package data holds no model


def test_missing_explicit_paths(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv(fio.ENV_VAR, "synthetic-small")
    missing = tmp_path / "nope" / "generic_model.pkl"
    for call in (
        lambda: fio.load_flame_model(missing),
        lambda: fio.load_landmark_embedding("68", missing),
        lambda: fio.load_texture_space(missing),
        lambda: fio.find_data_dir(missing),
    ):
        with pytest.raises(FileNotFoundError, match=f"model_path '{missing}' does not exist"):
            call()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds none of \['generic_model.pkl'"):
        fio.load_flame_model(empty)


def test_env_must_be_a_directory(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv(fio.ENV_VAR, str(tmp_path / "missing"))
    write_asset_dir(clean_env / ".medusa_ext_data" / "FLAME")
    with pytest.raises(FileNotFoundError, match=r"\$FLAME_EXT_DATA=.*missing' is not a directory"):
        fio.load_flame_model()


def test_model_path_types(clean_env):
    with pytest.raises(TypeError, match="model_path must be a str, a Path"):
        fio.load_flame_model(3)
    with pytest.raises(ValueError, match="no data directory"):
        fio.find_data_dir("synthetic")


# --------------------------------------------------------------------------------------
# Synthetic assets


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fio, "_warned_synthetic", set())


def _synthetic_warnings(record):
    return [w for w in record if "SYNTHETIC FLAME model" in str(w.message)]


def test_synthetic_small_warns_once(clean_env, fresh_warnings):
    expected = r"flame_ext: using the SYNTHETIC FLAME model \(small.*not a real face model"
    with pytest.warns(UserWarning, match=expected):
        model = fio.load_flame_model("synthetic-small")
    assert model.source == "synthetic:small"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fio.load_flame_model("synthetic-small")
        fio.load_landmark_embedding("68", "synthetic-small", num_faces=model.faces.shape[0])
        fio.load_texture_space("synthetic-small", n_tex=2)
    assert not _synthetic_warnings(record)


def test_synthetic_warning_once_across_threads(monkeypatch, fresh_warnings):
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda *a, **k: calls.append(a))
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        fio._warn_synthetic("small")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    fio._warn_synthetic("full")  # a different size warns on its own
    assert len(calls) == 2


def test_synthetic_from_env(clean_env, monkeypatch, fresh_warnings):
    monkeypatch.setenv(fio.ENV_VAR, "synthetic-small")
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        model = fio.load_flame_model()
    assert model.source == "synthetic:small"
    emb = fio.load_landmark_embedding("mp", num_faces=model.faces.shape[0])
    assert emb.source == "synthetic:small"


def test_synthetic_never_stands_in_silently(clean_env, tmp_path):
    # no env, no home files: an error, never the synthetic model
    with pytest.raises(FileNotFoundError):
        fio.load_flame_model()
    with pytest.raises(FileNotFoundError):
        fio.load_flame_model(tmp_path / "missing.pkl")


def test_synthetic_small_matches_its_written_files(tmp_path, fresh_warnings):
    """Synthetic in memory and the same assets written as real files parse identically."""
    from flame_ext import synthetic

    with pytest.warns(UserWarning):
        mem = fio.load_flame_model("synthetic-small")
    for chumpy, kintree_dtype in ((True, "uint32"), (False, "int64")):
        d = synthetic.write_assets(
            tmp_path / f"{chumpy}", "small", chumpy=chumpy, kintree_dtype=kintree_dtype
        )
        disk = fio.load_flame_model(d)
        for name in ("faces", "v_template", "shapedirs", "posedirs", "J_regressor", "parents",
                     "lbs_weights"):
            np.testing.assert_array_equal(getattr(disk, name), getattr(mem, name), err_msg=name)
        assert (disk.n_shape, disk.n_expr) == (mem.n_shape, mem.n_expr) == (6, 4)
        np.testing.assert_array_equal(disk.parents, FLAME_PARENTS)
    data = (d / "generic_model.pkl").read_bytes()
    assert b"scipy.sparse.csc\ncsc_matrix" in data


@pytest.mark.parametrize("layout", ["flat", "image"])
def test_synthetic_small_files_all_formats(tmp_path, layout, fresh_warnings):
    from flame_ext import synthetic

    d = synthetic.write_assets(
        tmp_path, "small", chumpy=True, texture_layout=layout, model_name="flame2023.pkl"
    )
    model = fio.load_flame_model(d)
    F = model.faces.shape[0]
    emb68 = fio.load_landmark_embedding("68", d / "flame2023.pkl", num_faces=F)
    assert emb68.static_lmk_faces_idx.shape == (51,)
    assert emb68.dynamic_lmk_faces_idx.shape == (79, 17)
    assert emb68.full_lmk_faces_idx.shape == (68,)
    embmp = fio.load_landmark_embedding("mp", d, num_faces=F)
    assert embmp.lmk_faces_idx.shape == (105,)
    with pytest.warns(UserWarning):
        mem68 = fio.load_landmark_embedding("68", "synthetic-small")
    np.testing.assert_array_equal(emb68.dynamic_lmk_bary_coords, mem68.dynamic_lmk_bary_coords)
    bfm = fio.load_texture_space(d, n_tex=3)
    mem_bfm = fio.load_texture_space("synthetic-small", n_tex=3)
    np.testing.assert_array_equal(bfm.basis, mem_bfm.basis)
    assert (bfm.height, bfm.width) == (8, 8)
    flame_tex = fio.load_texture_space(d / "FLAME_texture.npz", n_tex=6)
    assert flame_tex.basis.shape == (8 * 8 * 3, 6)
    assert 0.0 <= flame_tex.mean.min() and flame_tex.mean.max() <= 1.0  # divided by 255
    with pytest.raises(ValueError, match=r"n_tex must be in \[0, P = 6\]"):
        fio.load_texture_space(d / "FLAME_texture.npz", n_tex=7)
