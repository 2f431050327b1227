"""Which path each decoder takes, and the step functions of every path.

The decoders (FlameShape, FlameLandmark, FlameTex, FlameShapeLandmark) compute through one
of three interchangeable paths:

- ``'ext'``: the compiled ops (flame_ext._ops), fused kernels with hand-written backward;
- ``'reference'``: flame_ext.reference, the same decomposition in plain PyTorch;
- ``'medusa'``: flame_ext.medusa_baseline, medusa's own algorithm (the benchmark baseline).

``backend='auto'`` takes the compiled ops when they are loaded and every op the decoder
runs has a kernel (forward and backward) for the tensors' device type, else the reference,
warning once when the library is missing. `DECODER_OPS` says which ops each decoder runs;
`build_info()` reports what it resolves to.

Tracing. A forward under `torch.compile` must not reach the library loading (it takes a
lock, which dynamo cannot trace) nor the dispatcher queries. So `prepare(backend)`, called
by every decoder's constructor, loads the library, fills the step table `_STEPS` and
resolves 'auto' for both device types into the plain dict `_AUTO`; a forward only reads
those dicts, which torch.compile treats as constants. A decoder unpickled in another
process (torch.save of a whole module, a spawned worker) prepares them as it is restored
(`DecoderModule.__setstate__`); any other lookup that misses fills them then.

This module imports only torch and the op loader at import time (reference is imported
when its table is filled), so the lower layers can take their shared constants from here.
"""

from __future__ import annotations

import sys
import threading
import warnings
from types import SimpleNamespace

import torch
from torch import nn

from . import _ops, reference
from ._ops import ops_not_differentiable_here, tangents_dropped

BACKENDS = ("auto", "ext", "reference", "medusa")

# The contour-bin rules of FlameLandmark (defined with their math in reference.py):
# medusa's Euler-angle rule and DECA's Rodrigues one.
CONTOUR_RULES = reference.CONTOUR_RULES

# The compiled ops each decoder runs (each with its `<op>_backward`), by class name.
DECODER_OPS = {
    "FlameShape": ("blend", "rigid_transforms", "skin"),
    "FlameLandmark": ("landmarks",),
    "FlameTex": ("blend",),
    "FlameShapeLandmark": ("blend", "rigid_transforms", "skin", "landmarks"),
}

# The device types `prepare` resolves 'auto' for ahead of any forward.
DEVICE_TYPES = ("cpu", "cuda")

# path -> step functions, all with the reference's signatures.
_STEPS: dict = {}
# (decoder, device type) -> the path 'auto' takes.
_AUTO: dict = {}

_warn_lock = threading.Lock()
_warned_no_ext = False


def _warn_no_extension() -> None:
    global _warned_no_ext
    with _warn_lock:
        if _warned_no_ext:
            return
        _warned_no_ext = True
    warnings.warn(
        "flame_ext: the compiled ops could not be loaded "
        f"({_ops.load_error()}); using the pure-PyTorch reference, which is slower. "
        "Rebuild with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=_first_frame_outside_package(),
    )


def _first_frame_outside_package() -> int:
    """The stacklevel, for a warning given here, of the caller's first frame outside
    flame_ext (the call paths into it differ in depth)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "flame_ext":
        frame, level = frame.f_back, level + 1
    return level


def check_backend(backend, allowed=BACKENDS) -> str:
    """Validates a decoder's `backend` argument and prepares its paths; returns it.

    ValueError for a name outside `allowed`; RuntimeError for 'ext' when the library did
    not load.
    """
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "ext" and not _ops.available():
        raise RuntimeError(
            f"backend='ext' asked for, but the compiled ops did not load: {_ops.load_error()}"
        )
    prepare(backend)
    return backend


def prepare(backend: str = "auto") -> None:
    """Fills the step tables `backend` can use, and resolves 'auto' for every decoder and
    device type, so that a forward only reads dicts (see the module docstring)."""
    if "reference" not in _STEPS:
        _STEPS["reference"] = _reference_steps()
    if backend not in ("auto", "ext"):
        return
    if "ext" not in _STEPS and _ops.available():
        _STEPS["ext"] = _ext_steps()
    if backend == "auto":
        for decoder in DECODER_OPS:
            for device_type in DEVICE_TYPES:
                _auto_path(decoder, device_type)


def _auto_path(decoder: str, device_type: str) -> str:
    path = _AUTO.get((decoder, device_type))
    if path is not None:
        return path
    if not _ops.available():
        _warn_no_extension()
        path = "reference"
    else:
        key = "CUDA" if device_type == "cuda" else "CPU"
        ops = DECODER_OPS[decoder]
        kernels = all(
            _ops.has_kernel(op, key) and _ops.has_kernel(f"{op}_backward", key) for op in ops
        )
        path = "ext" if kernels else "reference"
    _AUTO[(decoder, device_type)] = path
    return path


def resolve(backend: str, device_type: str, decoder: str) -> str:
    """The path ('ext', 'reference' or 'medusa') `decoder` (a key of DECODER_OPS) takes
    with `backend` for tensors on `device_type` ('cpu', 'cuda', ...).

    Under a `torch.func` transform (grad, jacrev, jacfwd, jvp, vmap, ...), also one that
    torch.compile traces, and inside a forward-mode AD level (`forward_ad.dual_level`)
    'auto' takes the reference: torch registers the ops' autograd as an autograd.Function
    that functorch refuses to differentiate, the ops have no forward-mode derivative, and
    vmap would run them one sample at a time. The reference's plain PyTorch has every rule
    these need. An explicit 'ext' keeps the ops: vmap runs them through functorch's
    fallback, grad raises torch's error where it would differentiate them, and a
    forward-mode tangent reaching them is a RuntimeError (`check_no_tangents`: torch
    would drop it silently).
    """
    if backend != "auto":
        return backend
    path = _AUTO.get((decoder, device_type))
    if path is None:
        # a device type `prepare` does not resolve ahead, or a decoder whose constructor
        # did not run in this process
        path = _auto_path(decoder, device_type)
    if path == "ext" and ops_not_differentiable_here():
        return "reference"
    return path


def check_no_tangents(what: str, *tensors) -> None:
    """Raises where a forward-mode tangent would enter the compiled ops
    (`_ops.tangents_dropped`): an explicit backend='ext' under torch.func's jvp / jacfwd
    or with dual tensors of torch.autograd.forward_ad."""
    if tangents_dropped(tensors):
        raise RuntimeError(
            f"{what} with backend='ext': the compiled ops have no forward-mode derivative "
            "(torch.func.jvp / jacfwd, torch.autograd.forward_ad) and their outputs would "
            "carry no tangent; use backend='auto' (the reference there) or "
            "backend='reference'"
        )


def _refusing_tangents(name: str, fn):
    """`fn`, one of the ext steps, raising where a forward-mode tangent would enter it."""

    def step(*args, **kwargs):
        if ops_not_differentiable_here():  # the cheap test first: no transform, no dual level
            check_no_tangents(f"flame_ext::{name}", *args, *kwargs.values())
        return fn(*args, **kwargs)

    return step


def steps(path: str) -> SimpleNamespace:
    """The step functions of path 'ext' or 'reference': lbs (the fused FlameShape chain,
    or None where the steps must run one by one), blend, rigid_transforms, skin,
    landmarks; `compiled` says whether they are flame_ext's compiled ops."""
    table = _STEPS.get(path)
    if table is None:
        # a decoder unpickled where no constructor ran, or whose backend was changed
        # after construction
        prepare(path)
        table = _STEPS[path]
    return table


class DecoderModule(nn.Module):
    """Base of the decoders: a module whose ``backend`` attribute names its path, prepared
    again when it is unpickled (where no constructor ran)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        prepare(self.backend)


def _no_fused_chain(*args, **kwargs) -> None:
    return None


def _reference_steps() -> SimpleNamespace:
    return SimpleNamespace(
        compiled=False,
        lbs=_no_fused_chain,
        blend=reference.blend,
        rigid_transforms=reference.rigid_transforms,
        skin=reference.skin,
        landmarks=reference.landmarks,
    )


def _ext_steps() -> SimpleNamespace:
    from ._ops import blend, landmarks, lbs, rigid_transforms, skin

    # Unchecked entries: the decoders check what enters them, and the rest are their
    # own buffers (the checks would cost as much as the kernels at B=1 on a GPU).
    return SimpleNamespace(
        compiled=True,
        lbs=lbs.lbs,
        blend=_refusing_tangents("blend", blend.blend_unchecked),
        rigid_transforms=_refusing_tangents(
            "rigid_transforms", rigid_transforms.rigid_transforms_unchecked
        ),
        skin=_refusing_tangents("skin", skin.skin_unchecked),
        landmarks=_refusing_tangents("landmarks", landmarks.landmarks_unchecked),
    )
