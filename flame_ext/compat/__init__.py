"""Drop-in FLAME layers for smplx and DECA users, on flame_ext's kernels, and their switches.

- `flame_ext.compat.smplx.FLAME`: smplx's FLAME layer (`smplx.FLAME`, PyPI smplx).
- `flame_ext.compat.deca.FLAME` / `FLAMETex`: DECA's classes (decalib/models/FLAME.py,
  copied into EMOCA, MICA, SMIRK and others).

Each keeps its library's constructor, forward, outputs, parameter and buffer names and
rules (see the modules) and computes on flame_ext's fused ops. The switches replace the
library's classes without editing it, like `flame_ext.patch_medusa`:

    import flame_ext.compat
    flame_ext.compat.patch_smplx()   # smplx.FLAME and smplx.create(model_type='flame')
    flame_ext.compat.patch_deca()    # decalib.models.FLAME's FLAME and FLAMETex
    with flame_ext.compat.patched_smplx(): ...   # only for a block

Patch early: a module that already ran ``from smplx import FLAME`` holds smplx's class;
the switch also swaps that name in every loaded module of the library's package
(``smplx.*``, ``decalib.*``), and with ``everywhere=True`` in every loaded module. Not
reached: objects already built, subclasses of the library's class (smplx's FLAMELayer),
references kept elsewhere. A switch raises ImportError, with the reason, when its
library cannot be imported.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterator

from .._patching import ClassSwap

__all__ = [
    "patch_deca",
    "patch_smplx",
    "patched_deca",
    "patched_smplx",
    "unpatch_deca",
    "unpatch_smplx",
]

SMPLX_MODULE = "smplx.body_models"
DECA_MODULE = "decalib.models.FLAME"


def _smplx_classes() -> Dict[str, type]:
    from .smplx import FLAME

    return {"FLAME": FLAME}


def _deca_classes() -> Dict[str, type]:
    from .deca import FLAME, FLAMETex

    return {"FLAME": FLAME, "FLAMETex": FLAMETex}


def _smplx_missing(err: ImportError) -> str:
    return (
        f"flame_ext.compat.patch_smplx(): smplx is not importable ({type(err).__name__}: "
        f"{err}); install it (pip install smplx) or use the layer directly: "
        "from flame_ext.compat.smplx import FLAME"
    )


def _deca_missing(module: str):
    def message(err: ImportError) -> str:
        return (
            f"flame_ext.compat.patch_deca(): {module} is not importable "
            f"({type(err).__name__}: {err}); DECA is not on PyPI: put its repository on "
            "sys.path (module= names another copy of its FLAME module, e.g. EMOCA's "
            "'gdl.models.DecaFLAME'), or use the classes directly: "
            "from flame_ext.compat.deca import FLAME, FLAMETex"
        )
    return message


_smplx_swap = ClassSwap(
    SMPLX_MODULE, ("FLAME",), _smplx_classes, _smplx_missing,
    "this smplx version has no FLAME layer",
)
# One swap per module holding a copy of DECA's classes.
_deca_swaps: Dict[str, ClassSwap] = {}
_deca_lock = threading.Lock()


def _deca_swap(module: str) -> ClassSwap:
    if not isinstance(module, str) or not module:
        raise TypeError(f"module must be a module name, got {module!r}")
    with _deca_lock:
        if module not in _deca_swaps:
            _deca_swaps[module] = ClassSwap(
                module, ("FLAME", "FLAMETex"), _deca_classes, _deca_missing(module),
                "not a copy of DECA's FLAME module",
            )
        return _deca_swaps[module]


def patch_smplx(*, everywhere: bool = False) -> Dict[str, type]:
    """Makes smplx build flame_ext.compat.smplx.FLAME for `smplx.FLAME(...)` and
    `smplx.create(..., model_type='flame')`.

    Replaces FLAME in smplx.body_models and in every loaded ``smplx.*`` module that
    imported it (every loaded module with ``everywhere=True``). Returns smplx's original
    class by name. Raises ImportError when smplx cannot be imported.
    """
    return _smplx_swap.patch(everywhere=everywhere)


def unpatch_smplx() -> bool:
    """Puts smplx's FLAME back; False when it was not patched."""
    return _smplx_swap.unpatch()


def patched_smplx(*, everywhere: bool = False) -> Iterator[Dict[str, type]]:
    """``with patched_smplx(): ...``: patched inside the block, restored on exit (unless
    the patch was in effect on entry)."""
    return _smplx_swap.patched(everywhere=everywhere)


def patch_deca(*, module: str = DECA_MODULE, everywhere: bool = False) -> Dict[str, type]:
    """Makes DECA build flame_ext.compat.deca.FLAME and FLAMETex.

    Replaces FLAME and FLAMETex in `module` (DECA's decalib.models.FLAME by default; a
    copy such as EMOCA's 'gdl.models.DecaFLAME' works the same) and in every loaded
    module of its package that imported them (every loaded module with
    ``everywhere=True``). Returns the original classes by name. Raises ImportError when
    the module cannot be imported.
    """
    return _deca_swap(module).patch(everywhere=everywhere)


def unpatch_deca(*, module: str = DECA_MODULE) -> bool:
    """Puts the module's classes back; False when it was not patched."""
    return _deca_swap(module).unpatch()


def patched_deca(*, module: str = DECA_MODULE, everywhere: bool = False
                 ) -> Iterator[Dict[str, type]]:
    """``with patched_deca(): ...``: patched inside the block, restored on exit (unless
    the patch was in effect on entry)."""
    return _deca_swap(module).patched(everywhere=everywhere)
