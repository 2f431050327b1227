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
different classes. The swapping itself is `flame_ext._patching.ClassSwap`, shared with the
switches of `flame_ext.compat`.
"""

from __future__ import annotations

from typing import Dict, Iterator

from ._patching import ClassSwap

DECODERS_MODULE = "medusa.recon.flame.decoders"
PATCHED_NAMES = ("FlameShape", "FlameLandmark", "FlameTex")


def _replacements() -> Dict[str, type]:
    from . import decoders

    return {name: getattr(decoders, name) for name in PATCHED_NAMES}


def _import_error(err: ImportError) -> str:
    return (
        f"flame_ext.patch_medusa(): medusa is not importable ({type(err).__name__}: "
        f"{err}); install medusa (pip install medusa) or use flame_ext's decoders "
        "directly: from flame_ext import FlameShape, FlameLandmark, FlameTex"
    )


_swap = ClassSwap(
    DECODERS_MODULE, PATCHED_NAMES, _replacements, _import_error,
    "this medusa version predates the API flame_ext replaces",
)


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
    return _swap.patch(everywhere=everywhere)


def unpatch_medusa() -> bool:
    """Puts medusa's classes back where `patch_medusa` swapped them, and in medusa
    modules imported while patched (they imported flame_ext's classes by name).

    An attribute that was reassigned since (it no longer holds flame_ext's class) is
    left alone. Returns False when nothing was patched.
    """
    return _swap.unpatch()


def is_patched() -> bool:
    """Whether `patch_medusa` is in effect."""
    return _swap.is_patched()


def patched_medusa(*, everywhere: bool = False) -> Iterator[Dict[str, type]]:
    """``with patched_medusa(): ...`` runs the block on flame_ext's decoders.

    Yields medusa's original classes. On exit (also by an exception) medusa's classes
    are restored, unless the patch was already in effect on entry: then it stays.
    """
    return _swap.patched(everywhere=everywhere)
