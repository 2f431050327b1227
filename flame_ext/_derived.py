"""Tables a module derives from its buffers, kept in step with them.

The decoders and the compat layers keep, beside their state-dict buffers, non-persistent
tables computed from them: the joint basis J_regressor . [v_template | basis], the basis'
identity and expression columns apart, the mean skinning weights, FlameTex's gathered
texels. `DerivedTables` keeps them in step with their sources, group by group
(`_derived_from` maps each group to the buffers it is computed from, `_derived_tables` to
the tables it computes, `_compute_derived` computes them). A forward reads them through
`_derived()`, which returns the tables of this call by name:

- the registered (cached) tables, derived again and registered when a source changed
  since: written in place (its version counter moved), reassigned, or swapped in by
  `torch.func.functional_call`. Each source's storage, version counter, gradient flag
  and shape are compared with those the group was derived from (a new dtype or device
  is a new storage). The sources of the last derivation are held, so that their storage
  addresses cannot be reused by other tensors meanwhile. A constructor's last step,
  `_start_deriving()`, derives every group; from then on every group is derived again
  after `.to()` / `.double()` (`_apply`) and `load_state_dict` (`derive_after_load`, the
  post-hook it registers); an unpickled or deep-copied module drops the keys (they name
  the old storages) and derives at its first call;
- computed for this call only, with autograd, for each group with a source that
  requires grad while grad mode is on (fitting the model's tables), so the gradient
  reaches the sources through the joints too, as in medusa, which regresses the joints
  from the shaped mesh on every call. The other groups keep their tables: fitting
  v_template computes the joints' template (3J values), not the 24 MB basis columns.
  Registered tables never carry a graph (nor are they inference tensors), so a module
  deep-copies, and a later call without that gradient reads plain tables;
- computed for this call only from sources wrapped by a torch.func transform (grad or
  vmap of `functional_call` over the buffers) and from dual tensors of forward-mode AD
  (which share their primal's storage and version);
- under `torch.compile` nothing is compared: a compiled graph reads the registered
  tables it traced (derive them before compiling if the buffers change), except the
  groups with a source that requires grad, which it computes itself.

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
    """Mixin for an nn.Module whose `_compute_derived(groups)` computes the derived tables
    of the named groups (name -> tensor) from the buffers `_derived_from[group]` names."""

    # group -> the buffers (or attributes) its tables are computed from; a group without
    # sources is derived by `_derive` only
    _derived_from: Dict[str, Tuple[str, ...]] = {}
    # group -> the names of the tables it computes
    _derived_tables: Dict[str, Tuple[str, ...]] = {}
    # set per class from the two: every source and table name once, each group's sources'
    # positions
    _derived_sources: Tuple[str, ...] = ()
    _derived_names: Tuple[str, ...] = ()
    _derived_positions: Dict[str, Tuple[int, ...]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sources = tuple(dict.fromkeys(n for group in cls._derived_from.values() for n in group))
        cls._derived_sources = sources
        cls._derived_names = tuple(n for names in cls._derived_tables.values() for n in names)
        cls._derived_positions = {
            group: tuple(sources.index(n) for n in names)
            for group, names in cls._derived_from.items()
        }

    def _compute_derived(self, groups: Iterable[str]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - every user defines it

    def _source(self, name: str):
        buffers = self._buffers
        return buffers[name] if name in buffers else getattr(self, name, None)

    def _start_deriving(self) -> None:
        """A constructor's last step, once every source is in place (and on its device):
        derives every table, and again after each `.to()` and `load_state_dict` from
        here on."""
        self.__dict__["_derived_started"] = True
        self._derive()
        self.register_load_state_dict_post_hook(derive_after_load)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double(): derived again from the converted buffers, so that a table
        # carries no rounding of the old dtype (float32 rounding would show in float64).
        # Not before `_start_deriving` (a constructor moving its sources to the device).
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_derived_started", False):
            self._derive()
        return self

    def __setstate__(self, state):
        # Unpickled (or deep-copied): the stored keys name the old process' storages. A
        # module pickled before `_derived_started` existed was constructed all the same.
        state = dict(state)
        for name in ("_derived_keys", "_derived_all_keys", "_derived_sources_held"):
            state.pop(name, None)
        state["_derived_started"] = True
        super().__setstate__(state)

    def _source_keys(self) -> tuple:
        # Each source's storage, version counter, gradient flag and shape (a new dtype or
        # device is a new storage), in `_derived_sources` order; the forward pays for this
        # on every call. An inference tensor has no version counter: a write to one in
        # place goes unseen.
        keys = []
        for name in self._derived_sources:
            t = self._source(name)
            keys.append(None if t is None else (
                t.data_ptr(), -1 if t.is_inference() else t._version, t.requires_grad,
                t.shape))
        return tuple(keys)

    def _group_key(self, group: str, keys: tuple) -> tuple:
        return tuple(keys[i] for i in self._derived_positions[group])

    def _derive(self, groups: Optional[Iterable[str]] = None,
                keys: Optional[tuple] = None) -> None:
        """Computes and registers the tables of `groups` (default: all), without a graph
        and never as inference tensors (a later call with autograd saves them); `keys`:
        the sources' `_source_keys()` where the caller has them."""
        groups = tuple(self._derived_from if groups is None else groups)
        with torch.inference_mode(False), torch.no_grad():
            tables = self._compute_derived(groups)
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        state = self.__dict__
        stored = state.setdefault("_derived_keys", {})
        if keys is None:
            keys = self._source_keys()
        for group in groups:
            stored[group] = self._group_key(group, keys)
        state["_derived_all_keys"] = None  # `_derived` compares the groups next
        # The keys hold storage addresses: holding the sources' storages (detached: no
        # graph kept alive, and the module deep-copies) keeps those addresses from being
        # reused by other tensors.
        state["_derived_sources_held"] = tuple(
            t.detach() if isinstance(t, torch.Tensor) else t
            for t in (self._source(n) for n in self._derived_sources))

    def _registered(self) -> Dict[str, torch.Tensor]:
        buffers = self._buffers
        return {name: buffers.get(name) for name in self._derived_names}

    def _derived(self) -> Dict[str, torch.Tensor]:
        """The derived tables for this call, by name (see the module docstring)."""
        if not self._derived_from:
            return self._registered()
        if torch.compiler.is_compiling():
            return self._derived_traced()
        state = self.__dict__
        try:
            keys = self._source_keys()
        except RuntimeError:
            keys = None  # a source wrapped by a torch.func transform: no storage to compare
        if keys is None:
            tables = self._registered()
            tables.update(self._compute_derived(tuple(self._derived_from)))
            return tables
        dual = forward_ad._current_level >= 0
        if not dual and keys == state.get("_derived_all_keys"):
            return self._registered()  # every group derived from these sources
        stored = state.get("_derived_keys", {})
        grad = torch.is_grad_enabled()
        fresh, stale = [], []
        for group, names in self._derived_from.items():
            key = self._group_key(group, keys)
            if (grad and any(k is not None and k[2] for k in key)) or (
                    dual and any(_has_tangent(self._source(n)) for n in names)):
                fresh.append(group)
            elif key != stored.get(group):
                stale.append(group)
        if stale:
            self._derive(stale, keys)  # computing tables writes no source: the same keys
        # The shortcut above holds only while no source requires grad (one that does is
        # computed or not by the grad mode of each call) and outside forward AD.
        needs_grad = any(k is not None and k[2] for k in keys)
        state["_derived_all_keys"] = None if (needs_grad or dual) else keys
        tables = self._registered()
        if fresh:
            tables.update(self._compute_derived(fresh))
        return tables

    def _derived_traced(self) -> Dict[str, torch.Tensor]:
        # Under torch.compile: a requires_grad flag is one of the graph's guards.
        tables = self._registered()
        fresh = [group for group, names in self._derived_from.items()
                 if any(getattr(self._source(n), "requires_grad", False) for n in names)]
        if fresh:
            tables.update(self._compute_derived(fresh))
        return tables


def _has_tangent(t) -> bool:
    return isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None


def derive_after_load(module, _incompatible_keys) -> None:
    """load_state_dict post-hook of the DerivedTables modules: derives every table from
    the loaded buffers, then runs the module's `_after_load()` where it has one. A
    module-level function, so the modules pickle."""
    module._derive()
    after = getattr(module, "_after_load", None)
    if after is not None:
        after()
