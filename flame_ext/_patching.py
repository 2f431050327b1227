"""Swapping another library's classes for flame_ext's: the machinery of every patch switch.

`ClassSwap` replaces named classes of one module of a library (medusa's decoders, smplx's
body models, DECA's FLAME module) with flame_ext's, in that module and in every loaded
module of the same package whose attribute *is* the library's class (the modules that
ran ``from ... import Name`` before the patch), or in every loaded module with
``everywhere=True``; it puts them back on unpatch. `flame_ext.patch_medusa` and the
switches of `flame_ext.compat` are thin front ends over one `ClassSwap` each.

What a swap cannot reach: objects already constructed, subclasses defined from the
library's class, and references kept elsewhere (a dict of classes, a default argument, a
closure).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from typing import Callable, Dict, Iterator, List, Tuple


class ClassSwap:
    """The swap of `names` in `module_name` for the classes `replacements()` returns.

    Args:
        module_name: the module that defines the library's classes.
        names: the class names to swap (a library version may define only some).
        replacements: () -> {name: flame_ext's class}; called when patching, so that
            importing the front end does not import the replacements.
        import_error: (the ImportError) -> the message of the ImportError raised when
            `module_name` cannot be imported.
        none_found: the RuntimeError message when the module defines none of `names`.
    """

    def __init__(
        self,
        module_name: str,
        names: Tuple[str, ...],
        replacements: Callable[[], Dict[str, type]],
        import_error: Callable[[ImportError], str],
        none_found: str,
    ):
        self.module_name = module_name
        self.package = module_name.split(".")[0]
        self.names = tuple(names)
        self._replacements = replacements
        self._import_error = import_error
        self._none_found = none_found
        self._lock = threading.RLock()
        # While patched: the library's classes by name, and every (module, name) swapped.
        self._originals: Dict[str, type] = {}
        self._swapped: List[Tuple[object, str]] = []

    def _import(self):
        try:
            return importlib.import_module(self.module_name)
        except ImportError as err:
            raise ImportError(self._import_error(err)) from err

    def _loaded_modules(self, everywhere: bool):
        """(module, namespace) of the loaded modules of the package (all loaded modules
        if `everywhere`). The namespace is the module's own dict: reading it runs no
        module-level __getattr__ hook and imports nothing."""
        prefix = self.package + "."
        for module_name, module in list(sys.modules.items()):
            if module is None:
                continue
            if not everywhere and module_name != self.package and not module_name.startswith(
                prefix
            ):
                continue
            namespace = getattr(module, "__dict__", None)
            if isinstance(namespace, dict):
                yield module, namespace

    def patch(self, *, everywhere: bool = False) -> Dict[str, type]:
        """Swaps the classes in; again while patched, extends the swap to modules loaded
        since. Returns the library's original classes by name (those it defines)."""
        target = self._import()
        with self._lock:
            replacements = self._replacements()
            if not self._originals:
                found = {
                    name: getattr(target, name)
                    for name in self.names
                    if hasattr(target, name) and getattr(target, name) is not replacements[name]
                }
                if not found:
                    raise RuntimeError(
                        f"{self.module_name} ({getattr(target, '__file__', '?')}) defines none "
                        f"of {self.names}: {self._none_found}"
                    )
                self._originals.update(found)
            for module, namespace in self._loaded_modules(everywhere):
                for name, original in self._originals.items():
                    if namespace.get(name) is original:
                        setattr(module, name, replacements[name])
                        self._swapped.append((module, name))
            return dict(self._originals)

    def unpatch(self) -> bool:
        """Puts the library's classes back where `patch` swapped them, and in the
        package's modules imported while patched (they imported flame_ext's classes by
        name). An attribute reassigned since (no longer flame_ext's class) is left alone.
        Returns False when nothing was patched."""
        with self._lock:
            if not self._originals:
                return False
            replacements = self._replacements()
            for module, name in reversed(self._swapped):
                if getattr(module, "__dict__", {}).get(name) is replacements[name]:
                    setattr(module, name, self._originals[name])
            # Inside the package a flame_ext class can only have come from the patch.
            # Other modules may import flame_ext's classes themselves: only recorded swaps.
            for module, namespace in self._loaded_modules(everywhere=False):
                for name, original in self._originals.items():
                    if namespace.get(name) is replacements[name]:
                        setattr(module, name, original)
            self._swapped.clear()
            self._originals.clear()
            return True

    def is_patched(self) -> bool:
        with self._lock:
            return bool(self._originals)

    @contextlib.contextmanager
    def patched(self, *, everywhere: bool = False) -> Iterator[Dict[str, type]]:
        """The context-manager form: yields the originals; restores them on exit (also by
        an exception) unless the patch was already in effect on entry."""
        with self._lock:
            was_patched = self.is_patched()
            originals = self.patch(everywhere=everywhere)
        try:
            yield originals
        finally:
            if not was_patched:
                self.unpatch()
