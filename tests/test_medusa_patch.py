"""flame_ext.medusa_patch on a stand-in `medusa` package written to tmp_path.

The stand-in mirrors the layout the patch relies on: `medusa.recon.flame.decoders`
defining the three classes, and `medusa.recon.flame.deca.recon` importing two of them by
name (as medusa's DECA reconstruction does), plus a pipeline function that constructs a
decoder the way medusa does.
"""

import importlib
import sys
import textwrap

import pytest
import torch

import flame_ext
from flame_ext.medusa_patch import is_patched, patch_medusa, patched_medusa, unpatch_medusa

STANDARD_DECODERS = """
    class FlameShape:
        origin = "medusa"
        def __init__(self, *args, **kwargs):
            raise AssertionError("medusa's FlameShape ran")

    class FlameLandmark:
        origin = "medusa"

    class FlameTex:
        origin = "medusa"

    FLAME = "untouched"
"""

DECA_RECON = """
    from ..decoders import FlameShape, FlameTex

    def build_decoder():
        return FlameShape(n_shape=6, n_expr=4, device="cpu")
"""


def _write(root, relative, text=""):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _forget_modules(prefixes):
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


@pytest.fixture
def make_medusa(tmp_path, monkeypatch):
    """Writes a stand-in medusa (decoders source given) and puts it first on sys.path."""

    def make(decoders=STANDARD_DECODERS):
        for package in ("medusa", "medusa/recon", "medusa/recon/flame", "medusa/recon/flame/deca"):
            _write(tmp_path, f"{package}/__init__.py")
        _write(tmp_path, "medusa/recon/flame/decoders.py", decoders)
        _write(tmp_path, "medusa/recon/flame/deca/recon.py", DECA_RECON)
        importlib.invalidate_caches()
        return tmp_path

    _forget_modules(["medusa", "user_pipeline"])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    unpatch_medusa()
    _forget_modules(["medusa", "user_pipeline"])


def test_patch_swaps_decoders_and_known_importers(make_medusa):
    make_medusa()
    decoders = importlib.import_module("medusa.recon.flame.decoders")
    deca = importlib.import_module("medusa.recon.flame.deca.recon")
    medusa_shape, medusa_tex = decoders.FlameShape, decoders.FlameTex
    medusa_landmark = decoders.FlameLandmark

    originals = patch_medusa()

    assert originals == {
        "FlameShape": medusa_shape, "FlameLandmark": medusa_landmark, "FlameTex": medusa_tex,
    }
    assert is_patched()
    assert decoders.FlameShape is flame_ext.FlameShape
    assert decoders.FlameLandmark is flame_ext.FlameLandmark
    assert decoders.FlameTex is flame_ext.FlameTex
    assert decoders.FLAME == "untouched"
    # imported by name before the patch: swapped in that module too
    assert deca.FlameShape is flame_ext.FlameShape
    assert deca.FlameTex is flame_ext.FlameTex
    # imported after the patch: flame_ext's through the decoders module
    from medusa.recon.flame.decoders import FlameLandmark

    assert FlameLandmark is flame_ext.FlameLandmark

    assert unpatch_medusa() is True
    assert not is_patched()
    assert decoders.FlameShape is medusa_shape and decoders.FlameTex is medusa_tex
    assert decoders.FlameLandmark is medusa_landmark
    assert deca.FlameShape is medusa_shape and deca.FlameTex is medusa_tex
    assert unpatch_medusa() is False  # nothing left to undo


def test_pipeline_runs_on_flame_ext_without_edits(make_medusa, monkeypatch):
    make_medusa()
    monkeypatch.setenv("FLAME_EXT_DATA", "synthetic-small")
    deca = importlib.import_module("medusa.recon.flame.deca.recon")
    with pytest.raises(AssertionError, match="medusa's FlameShape ran"):
        deca.build_decoder()

    with patched_medusa():
        decoder = deca.build_decoder()
    assert isinstance(decoder, flame_ext.FlameShape)
    expr = torch.randn(3, 4)
    v, R = decoder(expr=expr)
    assert v.shape == (3, 67, 3) and R.shape == (3, 67, 4, 4)
    # restored on exit
    with pytest.raises(AssertionError, match="medusa's FlameShape ran"):
        deca.build_decoder()


def test_second_patch_keeps_medusa_originals(make_medusa):
    make_medusa()
    decoders = importlib.import_module("medusa.recon.flame.decoders")
    medusa_shape = decoders.FlameShape
    first = patch_medusa()
    # a module of medusa imported while patched, then a second call: nothing to swap
    late = importlib.import_module("medusa.recon.flame.deca.recon")
    second = patch_medusa()
    assert first == second and second["FlameShape"] is medusa_shape
    assert late.FlameShape is flame_ext.FlameShape
    unpatch_medusa()
    assert decoders.FlameShape is medusa_shape
    # imported while patched, so it took flame_ext's class by name: restored as well
    assert late.FlameShape is medusa_shape and late.FlameTex is decoders.FlameTex


def test_context_manager_restores_after_exception_and_nests(make_medusa):
    make_medusa()
    decoders = importlib.import_module("medusa.recon.flame.decoders")
    medusa_shape = decoders.FlameShape

    with pytest.raises(KeyError):
        with patched_medusa() as originals:
            assert originals["FlameShape"] is medusa_shape
            assert decoders.FlameShape is flame_ext.FlameShape
            raise KeyError("inside")
    assert decoders.FlameShape is medusa_shape and not is_patched()

    patch_medusa()
    with patched_medusa():
        assert decoders.FlameShape is flame_ext.FlameShape
    # patched before entering: the block leaves it patched
    assert decoders.FlameShape is flame_ext.FlameShape and is_patched()


def test_everywhere_reaches_user_modules(make_medusa, tmp_path):
    make_medusa()
    _write(tmp_path, "user_pipeline.py", "from medusa.recon.flame.decoders import FlameShape\n")
    importlib.invalidate_caches()
    user = importlib.import_module("user_pipeline")
    medusa_shape = user.FlameShape

    patch_medusa()
    assert user.FlameShape is medusa_shape  # outside medusa: left alone by default
    patch_medusa(everywhere=True)
    assert user.FlameShape is flame_ext.FlameShape
    unpatch_medusa()
    assert user.FlameShape is medusa_shape


def test_unpatch_leaves_reassigned_attributes(make_medusa):
    make_medusa()
    decoders = importlib.import_module("medusa.recon.flame.decoders")
    medusa_tex = decoders.FlameTex
    patch_medusa()

    class Custom:
        pass

    decoders.FlameShape = Custom  # the user's own replacement, made while patched
    unpatch_medusa()
    assert decoders.FlameShape is Custom
    assert decoders.FlameTex is medusa_tex


def test_partial_medusa_patches_what_it_has(make_medusa):
    make_medusa("class FlameShape:\n    pass\n")
    decoders = importlib.import_module("medusa.recon.flame.decoders")
    medusa_shape = decoders.FlameShape
    assert patch_medusa() == {"FlameShape": medusa_shape}
    assert decoders.FlameShape is flame_ext.FlameShape
    assert not hasattr(decoders, "FlameTex")  # not added where medusa had none


def test_old_medusa_without_the_api_is_refused(make_medusa):
    make_medusa("class FLAME:\n    pass\n")
    with pytest.raises(RuntimeError, match="defines none of"):
        patch_medusa()
    assert not is_patched()


def test_missing_medusa_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "medusa", None)  # import medusa -> ModuleNotFoundError
    with pytest.raises(ImportError, match="medusa is not importable"):
        patch_medusa()
    with pytest.raises(ImportError, match="medusa is not importable"):
        with patched_medusa():
            pass
    assert not is_patched()
