"""Run a whole medusa pipeline on flame_ext's decoders, without editing medusa.

`patch_medusa()` replaces the classes `FlameShape`, `FlameLandmark` and `FlameTex` of
`medusa.recon.flame.decoders` with flame_ext's (same constructor arguments, buffers and
outputs), so every later `FlameShape(...)` inside medusa builds a flame_ext module.
`unpatch_medusa()` puts medusa's classes back; `patched_medusa()` is the context-manager
form.

Patch early. Python binds names at import time: a module that already ran
``from medusa.recon.flame.decoders import FlameShape`` holds medusa's class in its own
namespace, and replacing the attribute of the decoders module does not reach it. So the
patch also swaps that name in every already-imported module of the ``medusa`` package
whose attribute *is* medusa's class (e.g. ``medusa.recon.flame.deca.recon``, which
imports FlameShape and FlameTex, and ``medusa.albedo.trust``, which imports FlameTex);
``everywhere=True`` extends this to every loaded module (your own code that imported the
classes from medusa before the patch). Modules imported after the patch get flame_ext's
classes anyway. What the patch cannot reach: objects that were already constructed, and
references kept in other places (a dict of classes, a default argument, a closure).

flame_ext's classes are not subclasses of medusa's: code that checks
``isinstance(x, medusa.recon.flame.decoders.FlameShape)`` sees flame_ext's modules as
different classes.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from typing import Dict, Iterator, List, Tuple

DECODERS_MODULE = "medusa.recon.flame.decoders"
PATCHED_NAMES = ("FlameShape", "FlameLandmark", "FlameTex")

_lock = threading.RLock()
# While patched: medusa's classes by name, and every (module, name) that was swapped.
_originals: Dict[str, type] = {}
_swapped: List[Tuple[object, str]] = []


def _replacements() -> Dict[str, type]:
    from . import decoders

    return {name: getattr(decoders, name) for name in PATCHED_NAMES}


def _import_decoders():
    try:
        return importlib.import_module(DECODERS_MODULE)
    except ImportError as err:
        raise ImportError(
            f"flame_ext.patch_medusa(): medusa is not importable ({type(err).__name__}: "
            f"{err}); install medusa (pip install medusa) or use flame_ext's decoders "
            "directly: from flame_ext import FlameShape, FlameLandmark, FlameTex"
        ) from err


def _loaded_modules(everywhere: bool):
    """(module, namespace) of the loaded medusa modules (all loaded modules if
    `everywhere`). The namespace is the module's own dict: reading it runs no
    module-level __getattr__ hook and imports nothing."""
    for module_name, module in list(sys.modules.items()):
        if module is None:
            continue
        if not everywhere and module_name != "medusa" and not module_name.startswith("medusa."):
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            yield module, namespace


def _swap_in_loaded_modules(originals: Dict[str, type], replacements: Dict[str, type],
                            everywhere: bool) -> None:
    for module, namespace in _loaded_modules(everywhere):
        for name, original in originals.items():
            if namespace.get(name) is original:
                setattr(module, name, replacements[name])
                _swapped.append((module, name))


def patch_medusa(*, everywhere: bool = False) -> Dict[str, type]:
    """Makes medusa use flame_ext's FlameShape, FlameLandmark and FlameTex.

    Replaces those attributes of `medusa.recon.flame.decoders` and of every loaded
    ``medusa.*`` module that imported them (every loaded module with
    ``everywhere=True``); see the module docstring for what a patch cannot reach.
    Calling it again while patched only extends the swap to modules loaded since.

    Returns medusa's original classes by name (the names this medusa defines).
    Raises ImportError (with the reason) when medusa cannot be imported, and
    RuntimeError when its decoders module defines none of the three classes (medusa
    versions before FlameShape, whose FLAME class has another API).
    """
    decoders = _import_decoders()
    with _lock:
        replacements = _replacements()
        if not _originals:
            found = {
                name: getattr(decoders, name)
                for name in PATCHED_NAMES
                if hasattr(decoders, name) and getattr(decoders, name) is not replacements[name]
            }
            if not found:
                raise RuntimeError(
                    f"{DECODERS_MODULE} ({getattr(decoders, '__file__', '?')}) defines none of "
                    f"{PATCHED_NAMES}: this medusa version predates the API flame_ext replaces"
                )
            _originals.update(found)
        _swap_in_loaded_modules(_originals, replacements, everywhere)
        return dict(_originals)


def unpatch_medusa() -> bool:
    """Puts medusa's classes back where `patch_medusa` swapped them, and in medusa
    modules imported while patched (they imported flame_ext's classes by name).

    An attribute that was reassigned since (it no longer holds flame_ext's class) is
    left alone. Returns False when nothing was patched.
    """
    with _lock:
        if not _originals:
            return False
        replacements = _replacements()
        for module, name in reversed(_swapped):
            if getattr(module, "__dict__", {}).get(name) is replacements[name]:
                setattr(module, name, _originals[name])
        # Inside medusa a flame_ext class can only have come from the patch. Other
        # modules may import flame_ext's classes themselves: only recorded swaps there.
        for module, namespace in _loaded_modules(everywhere=False):
            for name, original in _originals.items():
                if namespace.get(name) is replacements[name]:
                    setattr(module, name, original)
        _swapped.clear()
        _originals.clear()
        return True


def is_patched() -> bool:
    """Whether `patch_medusa` is in effect."""
    with _lock:
        return bool(_originals)


@contextlib.contextmanager
def patched_medusa(*, everywhere: bool = False) -> Iterator[Dict[str, type]]:
    """``with patched_medusa(): ...`` runs the block on flame_ext's decoders.

    Yields medusa's original classes. On exit (also by an exception) medusa's classes
    are restored, unless the patch was already in effect on entry: then it stays.
    """
    with _lock:
        was_patched = is_patched()
        originals = patch_medusa(everywhere=everywhere)
    try:
        yield originals
    finally:
        if not was_patched:
            unpatch_medusa()
