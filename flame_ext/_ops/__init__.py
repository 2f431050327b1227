"""The compiled operators: loads the library, then registers fakes and autograd.

`flame_ext._C` is the extension built by setup.py; `$FLAME_EXT_LIB` (a path to a shared
library built by tools/dev_build.py) replaces it during development. When neither loads,
`available()` is False, `load_error()` says why, and the decoders fall back to
`flame_ext.reference`.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Optional

import torch
from torch.autograd import forward_ad

_lock = threading.Lock()
_loaded: Optional[bool] = None
_error: Optional[str] = None

OPS = (
    "blend",
    "blend_backward",
    "blend_shared",
    "blend_shared_backward",
    "rigid_transforms",
    "rigid_transforms_backward",
    "skin",
    "skin_backward",
    "landmarks",
    "landmarks_backward",
    "vertex_face_adjacency",
    "vertex_normals",
    "vertex_normals_backward",
)


def _load() -> bool:
    global _loaded, _error
    # Settled after the first call: read without the lock from then on (the decoders ask
    # on every call, and torch.compile cannot trace a lock).
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            path = os.environ.get("FLAME_EXT_LIB")
            if path:
                torch.ops.load_library(path)
            else:
                from flame_ext import _C  # noqa: F401  (loading registers the ops)
            # Fakes and autograd live beside each op family's Python wrapper.
            from flame_ext._ops import (  # noqa: F401
                blend, landmarks, normals, rigid_transforms, skin,
            )

            _loaded = True
        except Exception as exc:  # ImportError, OSError (undefined symbol), ...
            _loaded, _error = False, f"{type(exc).__name__}: {exc}"
        return _loaded


def register_no_double_backward(backward_op: str) -> None:
    """Registers autograd for `flame_ext::<backward_op>` (a backward op that is not
    differentiable itself) that raises a clear error when it is differentiated."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"double backward through flame_ext::{backward_op} is not supported")

    torch.library.register_autograd(
        f"flame_ext::{backward_op}", backward, setup_context=setup_context
    )


def ops_not_differentiable_here() -> bool:
    """Whether a torch.func transform or a forward-mode AD level is active: the ops'
    autograd, registered with `torch.library.register_autograd` (an autograd.Function
    without setup_context or vmap rule to functorch, and no forward-mode derivative),
    does not serve there; torch ops on the same tables do (see `_backend.resolve`)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


@torch.compiler.assume_constant_result
def _jvp_levels() -> tuple:
    """The levels of the torch.func jvp transforms now active (jvp, jacfwd, hessian's
    forward part). A constant to torch.compile, which guards on the transform stack."""
    from torch._C._functorch import TransformType
    from torch._functorch import pyfunctorch

    return tuple(i.level() for i in pyfunctorch.retrieve_all_functorch_interpreters()
                 if i.key() == TransformType.Jvp)


def _wrapped_at(t, levels) -> bool:
    """Whether torch.func wraps `t` at one of `levels` (under the transforms above it)."""
    functorch = torch._C._functorch
    while isinstance(t, torch.Tensor) and functorch.is_functorch_wrapped_tensor(t):
        if functorch.maybe_get_level(t) in levels:
            return True
        t = functorch.get_unwrapped(t)
    return False


def tangents_dropped(tensors) -> bool:
    """Whether one of `tensors`, on its way into a compiled op, carries a forward-mode
    tangent: a dual tensor of `torch.autograd.forward_ad`, or a tensor of a torch.func
    jvp transform (jvp, jacfwd). The ops have no forward-mode derivative, and torch passes
    their outputs on without a tangent, a silent zero: the callers refuse instead."""
    if forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled():
        for t in tensors:
            if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
                return True
    if torch._C._are_functorch_transforms_active():
        levels = _jvp_levels()
        if levels and any(_wrapped_at(t, levels) for t in tensors):
            return True
    return False


def available() -> bool:
    """True when the compiled ops are loaded."""
    return _load()


def load_error() -> Optional[str]:
    """Why the compiled ops could not be loaded, or None."""
    _load()
    return _error


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """Whether `flame_ext::<op>` has a kernel for the dispatch key ('CPU' or 'CUDA').

    Cached: the decoders ask on every call, and registrations do not change once loaded.
    An op written in torch ops (vertex_face_adjacency, CompositeExplicitAutograd) has a
    kernel for every key.
    """
    if not available():
        return False
    name = f"flame_ext::{op}"
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        name, device_type
    ) or torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")


def build_config() -> dict:
    """What the library was built with, and its CPU path: {'cuda': bool, 'cuda_archs': str,
    'torch': str, 'cpu_isa': 'avx512' | 'avx2' | 'baseline' | None} (cpu_isa: the
    instruction set csrc/cpu_isa.h picked for this process's CPU loops; None without the
    library, or from a library built before it was reported)."""
    if not available():
        return {"cuda": False, "cuda_archs": "", "torch": "", "cpu_isa": None}
    config = json.loads(torch.ops.flame_ext.build_config())
    config.setdefault("cpu_isa", None)
    return config


CPU_OUTPUT_CACHE_KEYS = ("cached_bytes", "cached_blocks", "limit_bytes", "reused", "mapped")


def cpu_output_cache_stats() -> dict:
    """The reuse cache of large CPU output blocks (csrc/cpu_output.h), as counters named by
    CPU_OUTPUT_CACHE_KEYS; all 0 without the library."""
    if not available():
        return dict.fromkeys(CPU_OUTPUT_CACHE_KEYS, 0)
    return dict(zip(CPU_OUTPUT_CACHE_KEYS, torch.ops.flame_ext.cpu_output_cache_stats()))


def empty_cpu_output_cache() -> int:
    """Frees the cached blocks; returns the bytes freed (0 without the library)."""
    if not available():
        return 0
    return int(torch.ops.flame_ext.empty_cpu_output_cache())
