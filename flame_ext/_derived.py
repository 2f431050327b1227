"""Tables a module derives from its buffers, kept in step with them.

The decoders and the compat layers keep, beside their state-dict buffers, non-persistent
tables computed from them: the joint basis J_regressor . [v_template | basis], the basis'
identity and expression columns apart, the mean skinning weights, FlameTex's gathered
texels. `DerivedTables` derives them again whenever they could disagree with their
sources:

- after `.to()` / `.double()` (`_apply`) and `load_state_dict`: the modules call `_derive`;
- when a source changed since they were derived: written in place (its version counter
  moved), reassigned, or swapped in by `torch.func.functional_call`. `_refresh_derived`,
  called where a forward reads the tables, compares each source's storage, version
  counter, gradient flag and shape with those it was derived from (a new dtype or device
  is a new storage);
- on every call while a source needs a gradient and grad mode is on (fitting the model's
  tables): derived with autograd then, so the gradient reaches the sources through the
  joints and the other derived tables too, as it does in medusa, which regresses the
  joints from the shaped mesh on every call.

Under `torch.compile` nothing is checked: the compiled graph reads the derived buffers it
traced (derive them before compiling if the buffers change). Under a torch.func transform
over the buffers themselves (grad or vmap of `functional_call`), the tables are derived
from the transformed buffers on every call.
"""

from __future__ import annotations

from typing import Tuple

import torch


class DerivedTables:
    """Mixin for an nn.Module whose `_register_derived()` (re)registers its derived
    buffers from the buffers named in `_derived_from`."""

    _derived_from: Tuple[str, ...] = ()

    def _register_derived(self) -> None:  # pragma: no cover - every user defines it
        raise NotImplementedError

    def _source_key(self):
        # Each source's storage, version counter, gradient flag and shape: a new dtype or
        # device is a new storage. Buffers are read from _buffers directly (the forward
        # pays for this on every call); a source held otherwise through getattr.
        buffers = self._buffers
        key = []
        for name in self._derived_from:
            t = buffers[name] if name in buffers else getattr(self, name, None)
            key.append(None if t is None else (t.data_ptr(), t._version, t.requires_grad,
                                               t.shape))
        return tuple(key)

    def _derive(self, track: bool = False) -> None:
        """Registers the derived buffers; with `track`, computed with autograd (from
        sources that need a gradient), else without a graph."""
        with torch.enable_grad() if track else torch.no_grad():
            self._register_derived()
        # A tracked derivation holds this call's graph: never reused.
        self.__dict__["_derived_key"] = None if track else self._source_key()

    def _refresh_derived(self) -> None:
        """Derives the tables again if a source changed since, or needs a gradient."""
        if not self._derived_from or torch.compiler.is_compiling():
            return
        try:
            key = self._source_key()
        except RuntimeError:
            # A source wrapped by a torch.func transform (functional_call of grad or vmap
            # over the buffers) has no storage to compare: derived from it on every call,
            # in the transform's own grad mode.
            self._register_derived()
            self.__dict__["_derived_key"] = None
            return
        track = torch.is_grad_enabled() and any(k is not None and k[2] for k in key)
        if track or key != self.__dict__.get("_derived_key"):
            self._derive(track)
