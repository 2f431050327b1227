"""Tables a module derives from its buffers, kept in step with them.

The decoders and the compat layers keep, beside their state-dict buffers, non-persistent
tables computed from them: the joint basis J_regressor . [v_template | basis], the basis'
identity and expression columns apart, the mean skinning weights, FlameTex's gathered
texels. `DerivedTables` derives them again whenever they could disagree with their
sources, group by group (`_derived_from` maps each group of tables to the buffers it is
computed from):

- after `.to()` / `.double()` (`_apply`) and `load_state_dict` (`derive_after_load`, the
  post-hook the modules register): every group, by `_derive`. An unpickled or deep-copied
  module drops the keys below (they name the old storages) and derives at its first
  call;
- when a source changed since its group was derived: written in place (its version
  counter moved), reassigned, or swapped in by `torch.func.functional_call`.
  `_refresh_derived`, called where a forward reads the tables, compares each source's
  storage, version counter, gradient flag and shape with those the group was derived
  from (a new dtype or device is a new storage). The sources of the last derivation are
  held, so that their storage addresses cannot be reused by other tensors meanwhile;
- on every call while one of a group's sources needs a gradient and grad mode is on
  (fitting the model's tables): that group is derived with autograd then, so the
  gradient reaches the sources through the joints and the other derived tables too, as
  it does in medusa, which regresses the joints from the shaped mesh on every call. The
  groups whose sources need none keep their tables: fitting v_template re-derives the
  joints' template (3J values), not the 24 MB basis columns.

Tables are never derived as inference tensors (a call under `torch.inference_mode` may
derive them; a later call with autograd saves them). Under `torch.compile` the keys are
not checked: the compiled graph reads the derived buffers it traced (derive them before
compiling if the buffers change), except the groups with a source that requires grad,
which it derives in the graph. Under a torch.func transform over the buffers themselves
(grad or vmap of `functional_call`) and inside a forward-mode AD level (a dual tensor
shares its primal's storage and version), the tables are derived on every call.

The joint basis is defined here for every module that keeps one (`joint_template`,
`joint_dirs`).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch.autograd import forward_ad


def joint_template(J_regressor: torch.Tensor, v_template: torch.Tensor) -> torch.Tensor:
    """J_regressor @ v_template flattened to (3J,): computed in float64 and stored in
    v_template's dtype, so that a float64 module carries no float32 rounding of its own."""
    template = J_regressor.double() @ v_template.double()
    return template.reshape(template.shape[0] * 3).to(v_template.dtype)


def joint_dirs(J_regressor: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """J_regressor . dirs (V, 3, K) as (3J, K), in float64, stored in dirs' dtype."""
    basis = torch.einsum("jv,vck->jck", J_regressor.double(), dirs.double())
    return basis.reshape(basis.shape[0] * 3, basis.shape[-1]).to(dirs.dtype)


class DerivedTables:
    """Mixin for an nn.Module whose `_register_derived(groups)` (re)registers the derived
    buffers of the named groups from the buffers `_derived_from[group]` names."""

    # group -> the buffers (or attributes) its tables are computed from
    _derived_from: Dict[str, Tuple[str, ...]] = {}
    # set per class from _derived_from: every source once, and each group's positions
    _derived_sources: Tuple[str, ...] = ()
    _derived_positions: Dict[str, Tuple[int, ...]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sources = tuple(dict.fromkeys(n for group in cls._derived_from.values() for n in group))
        cls._derived_sources = sources
        cls._derived_positions = {
            group: tuple(sources.index(n) for n in names)
            for group, names in cls._derived_from.items()
        }

    def _register_derived(self, groups: Iterable[str]) -> None:  # pragma: no cover
        raise NotImplementedError  # every user defines it

    def _current_sources(self) -> tuple:
        buffers = self._buffers
        return tuple(buffers[name] if name in buffers else getattr(self, name, None)
                     for name in self._derived_sources)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double(): derived again from the converted buffers, so that a table
        # carries no rounding of the old dtype (float32 rounding would show in float64).
        super()._apply(fn, *args, **kwargs)
        self._derive()
        return self

    def __setstate__(self, state):
        # Unpickled (or deep-copied): the stored keys name the old process' storages.
        state = dict(state)
        for name in ("_derived_keys", "_derived_all_keys", "_derived_sources_held"):
            state.pop(name, None)
        super().__setstate__(state)

    def _source_keys(self) -> tuple:
        # Each source's storage, version counter, gradient flag and shape (a new dtype or
        # device is a new storage), in `_derived_sources` order. Buffers are read from
        # _buffers directly (the forward pays for this on every call); a source held
        # otherwise through getattr.
        buffers = self._buffers
        keys = []
        for name in self._derived_sources:
            t = buffers[name] if name in buffers else getattr(self, name, None)
            keys.append(None if t is None else (t.data_ptr(), t._version, t.requires_grad,
                                                t.shape))
        return tuple(keys)

    def _group_key(self, group: str, keys: tuple) -> tuple:
        return tuple(keys[i] for i in self._derived_positions[group])

    def _derive(self, track: bool = False, groups: Optional[Iterable[str]] = None) -> None:
        """Registers the derived buffers of `groups` (default: all); with `track`,
        computed with autograd (from sources that need a gradient), else without a
        graph."""
        groups = tuple(self._derived_from if groups is None else groups)
        # Never inference tensors (a later call with autograd could not save them).
        with torch.inference_mode(False), (torch.enable_grad() if track else torch.no_grad()):
            self._register_derived(groups)
        state = self.__dict__
        stored = state.setdefault("_derived_keys", {})
        keys = None if track else self._source_keys()
        for group in groups:
            # A tracked derivation holds this call's graph: never reused.
            stored[group] = None if track else self._group_key(group, keys)
        state["_derived_all_keys"] = None  # `_refresh_derived` checks the groups next
        # The keys hold storage addresses: keeping the sources they were taken from
        # alive keeps those addresses from being reused by other tensors.
        state["_derived_sources_held"] = self._current_sources()

    def _trace_tracked_groups(self) -> None:
        """Under torch.compile: the groups with a source that requires grad are derived
        in the traced graph (with autograd, when grad mode is on), so a compiled fit of a
        table gets the gradient through its derived tables; the others are read as
        traced. Nothing else is checked (a requires_grad flag is one of the compiled
        graph's guards)."""
        if not torch.is_grad_enabled():
            return
        buffers = self._buffers
        tracked = [
            group for group, names in self._derived_from.items()
            if any(getattr(buffers.get(n, getattr(self, n, None)), "requires_grad", False)
                   for n in names)
        ]
        if tracked:
            self._register_derived(tracked)

    def _refresh_derived(self) -> None:
        """Derives again each group whose sources changed since, or need a gradient."""
        if not self._derived_from:
            return
        if torch.compiler.is_compiling():
            self._trace_tracked_groups()
            return
        state = self.__dict__
        try:
            # A dual tensor of forward-mode AD (swapped in by functional_call) shares its
            # primal's storage and version: inside a dual level, no key is trusted.
            keys = None if forward_ad._current_level >= 0 else self._source_keys()
        except RuntimeError:
            # A source wrapped by a torch.func transform (functional_call of grad or vmap
            # over the buffers) has no storage to compare.
            keys = None
        if keys is None:
            # Derived from the sources on every call, in the caller's grad mode.
            with torch.inference_mode(False):
                self._register_derived(tuple(self._derived_from))
            state["_derived_keys"] = {}
            state["_derived_all_keys"] = None
            return
        if keys == state.get("_derived_all_keys"):
            return  # every group derived from these sources, none needing a gradient
        stored = state.get("_derived_keys", {})
        grad = torch.is_grad_enabled()
        tracked, stale = [], []
        for group in self._derived_from:
            key = self._group_key(group, keys)
            if grad and any(k is not None and k[2] for k in key):
                tracked.append(group)
            elif key != stored.get(group):
                stale.append(group)
        if tracked:
            self._derive(True, tracked)
        if stale:
            self._derive(False, stale)
        # The shortcut holds only while no source requires grad: one that does is
        # tracked or not by the grad mode of each call.
        needs_grad = any(k is not None and k[2] for k in keys)
        state["_derived_all_keys"] = None if needs_grad else keys
        state["_derived_sources_held"] = self._current_sources()


def derive_after_load(module, _incompatible_keys) -> None:
    """load_state_dict post-hook of the DerivedTables modules: derives every table from
    the loaded buffers, then runs the module's `_after_load()` where it has one. A
    module-level function, so the modules pickle."""
    module._derive()
    after = getattr(module, "_after_load", None)
    if after is not None:
        after()
