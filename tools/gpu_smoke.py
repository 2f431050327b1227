"""Every op of flame_ext once, forward and backward, at small sizes, against flame_ext.reference.

    python tools/gpu_smoke.py --device cuda [--json smoke.json]
    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/gpu_smoke.py --device cuda
    python tools/gpu_smoke.py --device cpu          # the same checks on the CPU kernels

The program that compute-sanitizer runs (tools/gpu_check.sh): short enough for the
slowest of its tools, yet it launches every CUDA kernel of csrc/ on the launch paths
that differ: blend at each sample-tile size (B = 1, 2, 3-4, 5-16), above the small-batch
limit (cuBLAS) and there in deterministic mode (the hand kernels again, several tiles),
with a (N,), (1, N) and (B, N) base, a column-sliced basis and no pose correctives;
blend_shared (one row of coefficients for the batch) at one and two tiles, cuBLAS and
deterministic;
rigid_transforms over FLAME's 5-joint tree and a 16-joint one, parents on the host and
on the device, one and two blocks of samples; skin with and without the per-vertex
transforms, over more vertices than one backward block takes (so the partial sums are
reduced); landmarks with the 79-bin contour (medusa's and DECA's rule) and without, with
more terms than one backward tile holds; vertex normals (with their adjacency) over one
and several blocks; then FlameShape (every `transforms` option, shared identity),
FlameLandmark ('68', 'mp', 3d) and FlameTex (with a half-precision basis too, below and
above the cuBLAS batch), forward and backward, on the small synthetic model. Each op is
compared with the reference on the same device, in float32 and float64; a profiler
records which flame_ext ops ran, and an op that never ran is a failure too.

Exit status: 0 when every check passed, 3 when one failed (a mismatch, an exception, an
op not exercised), 2 for a usage error; the sanitizer's own status (--error-exitcode)
stays distinct from these.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import torch

# The checkout's flame_ext first (as bench/run.py does): an in-place build needs no install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAILED = 3

# Tolerances against the reference: float64 agrees to rounding; float32 to a few ulps of
# the magnitudes involved (sums of tens of products of O(1) values).
TOLERANCE = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5)}
FLAME_PARENTS = [-1, 0, 1, 1, 1]
TREE16 = [-1, 0, 0, 1, 2, 2, 3, 4, 4, 5, 0, 7, 11, 12, 3, 14]
N_BINS = 79  # the contour table's yaw bins (SPEC 2)


class Smoke:
    """Runs named checks, records their outcome, never stops at a failure."""

    def __init__(self, device: torch.device, verbose: bool, only: Sequence[str] = ()):
        self.device, self.verbose, self.only = device, verbose, list(only)
        self.results: List[dict] = []
        self.generator = torch.Generator().manual_seed(0)

    def randn(self, *shape, dtype=torch.float64, scale=1.0) -> torch.Tensor:
        # Drawn on the CPU: the same values on every device.
        values = torch.randn(*shape, generator=self.generator, dtype=torch.float64) * scale
        return values.to(self.device, dtype)

    def rand(self, *shape, dtype=torch.float64) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, dtype=torch.float64).to(
            self.device, dtype)

    def randint(self, high: int, *shape) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.generator).to(self.device)

    def check(self, name: str, body: Callable[[], Dict[str, tuple]]) -> None:
        """body() returns {label: (got, want, dtype)}; every pair must agree."""
        if self.only and not any(pattern in name for pattern in self.only):
            return
        start = time.perf_counter()
        result = {"name": name, "ok": True, "max_abs_err": 0.0, "compared": 0}
        try:
            pairs = body()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # an asynchronous fault lands here
            for label, (got, want, dtype) in pairs.items():
                err = _compare(got, want, dtype)
                result["compared"] += 1
                if err is None:
                    continue
                if isinstance(err, str):
                    result["ok"] = False
                    result.setdefault("mismatches", []).append(f"{label}: {err}")
                else:
                    result["max_abs_err"] = max(result["max_abs_err"], err)
        except Exception as exc:  # reported, and the other checks still run
            result["ok"] = False
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc(limit=6)
        result["seconds"] = round(time.perf_counter() - start, 4)
        self.results.append(result)
        if self.verbose or not result["ok"]:
            status = "ok  " if result["ok"] else "FAIL"
            detail = result.get("error") or "; ".join(result.get("mismatches", []))
            print(f"{status} {name:<52} max|err| {result['max_abs_err']:.2e} "
                  f"{result['seconds'] * 1e3:7.1f} ms {detail}", flush=True)


def _compare(got, want, dtype) -> Optional[object]:
    """None when both are None; the largest absolute error when close; else a message."""
    if got is None and want is None:
        return None
    if got is None or want is None:
        return f"one side is None (got {got is None}, want {want is None})"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    rtol, atol = TOLERANCE[dtype]
    if not torch.isfinite(got).all():
        return "non-finite values"
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    bound = atol + rtol * want.abs()
    if bool((diff > bound).any()):
        worst = int((diff - bound).argmax())
        return (f"max |err| {float(diff.max()):.3e} (at flat index {worst}: got "
                f"{float(got.flatten()[worst]):.9g}, want {float(want.flatten()[worst]):.9g}; "
                f"rtol {rtol:g}, atol {atol:g})")
    return float(diff.max()) if diff.numel() else 0.0


def _grads(outputs: Sequence, inputs: Sequence[torch.Tensor], upstream: Sequence) -> tuple:
    """d(sum(output * upstream))/d(inputs); outputs that are None are left out."""
    pairs = [(o, g) for o, g in zip(outputs, upstream) if o is not None]
    return torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                               allow_unused=True)


def _leaves(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _pairs(prefix: str, got: Sequence, want: Sequence, dtype) -> Dict[str, tuple]:
    return {f"{prefix}[{i}]": (g, w, dtype) for i, (g, w) in enumerate(zip(got, want))}


def _wrapper(op: str) -> Callable:
    """The Python entry of op `op` (argument checks, then the op and its autograd),
    found in whichever module of flame_ext._ops holds its family."""
    import importlib
    import inspect
    import pkgutil

    import flame_ext._ops as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        entry = getattr(module, op, None)
        if inspect.isfunction(entry):
            return entry
    raise LookupError(f"no Python wrapper of flame_ext::{op} in {package.__name__}")


@contextmanager
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def check_blend(s: Smoke, dtype) -> None:
    from flame_ext import reference

    blend = _wrapper("blend")
    n, k, p = 203, 7, 36
    # (batch, base layout, column-sliced dirs, pose correctives, deterministic mode)
    configs = [(1, "N", False, True, False), (2, "1N", True, True, False),
               (3, "BN", False, False, False), (13, "N", True, True, False),
               (20, "BN", False, True, False), (20, "1N", True, True, True)]
    for batch, layout, sliced, with_pose, det in configs:
        def body(batch=batch, layout=layout, sliced=sliced, with_pose=with_pose, det=det):
            shape = {"N": (n,), "1N": (1, n), "BN": (batch, n)}[layout]
            base = s.randn(*shape, dtype=dtype)
            wide = s.randn(n, k + 5, dtype=dtype)
            dirs = wide[:, 2:2 + k] if sliced else wide[:, :k].contiguous()
            coeffs = s.randn(batch, k, dtype=dtype)
            pose_dirs = s.randn(p, n, dtype=dtype, scale=0.1) if with_pose else None
            pose_coeffs = s.randn(batch, p, dtype=dtype) if with_pose else None
            grad_out = s.randn(batch, n, dtype=dtype)
            diff = [coeffs] + ([pose_coeffs] if with_pose else [])
            ref_in, ext_in = _leaves(diff), _leaves(diff)

            def call(fn, leaves):
                return fn(base, dirs, leaves[0], pose_dirs, leaves[1] if with_pose else None)

            want = call(reference.blend, ref_in)
            want_grads = _grads([want], ref_in, [grad_out])
            # Deterministic mode keeps the hand kernels above the cuBLAS threshold; the
            # reference's own matmul stays outside it (cuBLAS refuses it there).
            with deterministic() if det else _nothing():
                got = call(blend, ext_in)
                got_grads = _grads([got], ext_in, [grad_out])
            return {"out": (got, want, dtype), **_pairs("grad", got_grads, want_grads, dtype)}

        label = (f"blend {_dt(dtype)} B={batch} base={layout}{' sliced' if sliced else ''}"
                 f"{'' if with_pose else ' P=0'}{' deterministic' if det else ''}")
        s.check(label, body)


def check_blend_shared(s: Smoke, dtype) -> None:
    """blend_shared against the reference's two blends (the shared row, then the batch)."""
    from flame_ext import reference

    blend_shared = _wrapper("blend_shared")
    n, ks, k, p = 203, 9, 7, 36
    for batch, det in ((1, False), (13, False), (20, False), (20, True)):
        def body(batch=batch, det=det):
            base = s.randn(n, dtype=dtype)
            shared_dirs = s.randn(n, ks, dtype=dtype)
            dirs = s.randn(n, k, dtype=dtype)
            pose_dirs = s.randn(p, n, dtype=dtype, scale=0.1)
            leaves = [s.randn(1, ks, dtype=dtype), s.randn(batch, k, dtype=dtype),
                      s.randn(batch, p, dtype=dtype)]
            grad_out = s.randn(batch, n, dtype=dtype)
            ref_in, ext_in = _leaves(leaves), _leaves(leaves)
            shaped = reference.blend(base, shared_dirs, ref_in[0])
            want = reference.blend(shaped, dirs, ref_in[1], pose_dirs, ref_in[2])
            want_grads = _grads([want], ref_in, [grad_out])
            with deterministic() if det else _nothing():
                got = blend_shared(base, shared_dirs, ext_in[0], dirs, ext_in[1], pose_dirs,
                                   ext_in[2])
                got_grads = _grads([got], ext_in, [grad_out])
            return {"out": (got, want, dtype), **_pairs("grad", got_grads, want_grads, dtype)}

        s.check(f"blend_shared {_dt(dtype)} B={batch}{' deterministic' if det else ''}", body)


@contextmanager
def _nothing():
    yield


def check_rigid_transforms(s: Smoke, dtype) -> None:
    from flame_ext import reference

    rigid_transforms = _wrapper("rigid_transforms")
    for tree, batch, parents_on_device in ((FLAME_PARENTS, 1, False),
                                           (FLAME_PARENTS, 33, True), (TREE16, 5, False)):
        def body(tree=tree, batch=batch, parents_on_device=parents_on_device):
            joints_n = len(tree)
            parents = torch.tensor(tree, dtype=torch.int64,
                                   device=s.device if parents_on_device else "cpu")
            pose = s.randn(batch, joints_n, 3, dtype=dtype, scale=0.7)
            joints = s.randn(batch, joints_n, 3, dtype=dtype)
            grad_t = s.randn(batch, joints_n, 4, 4, dtype=dtype)
            grad_f = s.randn(batch, 9 * (joints_n - 1), dtype=dtype)
            ref_in, ext_in = _leaves([pose, joints]), _leaves([pose, joints])
            want = reference.rigid_transforms(*ref_in, parents)
            got = rigid_transforms(*ext_in, parents)
            want_grads = _grads(want, ref_in, [grad_t, grad_f])
            got_grads = _grads(got, ext_in, [grad_t, grad_f])
            return {**_pairs("out", got, want, dtype),
                    **_pairs("grad", got_grads, want_grads, dtype)}

        where = "device" if parents_on_device else "host"
        s.check(f"rigid_transforms {_dt(dtype)} J={len(tree)} B={batch} parents on {where}",
                body)


def check_skin(s: Smoke, dtype) -> None:
    from flame_ext import reference

    skin = _wrapper("skin")
    verts, joints_n = 1500, 5  # > 1024 vertices: more than one backward block per sample
    for batch, write_t in ((1, True), (3, False), (2, True)):
        def body(batch=batch, write_t=write_t):
            v_posed = s.randn(batch, verts, 3, dtype=dtype)
            transforms = s.randn(batch, joints_n, 4, 4, dtype=dtype)
            weights = s.rand(verts, joints_n, dtype=dtype) + 0.1
            weights = weights / weights.sum(1, keepdim=True)
            grad_v = s.randn(batch, verts, 3, dtype=dtype)
            grad_t = s.randn(batch, verts, 4, 4, dtype=dtype) if write_t else None
            tensors = [v_posed, transforms, weights]
            ref_in, ext_in = _leaves(tensors), _leaves(tensors)
            want = reference.skin(*ref_in, write_vertex_transforms=write_t)
            got = skin(*ext_in, write_vertex_transforms=write_t)
            want_grads = _grads(want, ref_in, [grad_v, grad_t])
            got_grads = _grads(got, ext_in, [grad_v, grad_t])
            return {**_pairs("out", got, want, dtype),
                    **_pairs("grad", got_grads, want_grads, dtype)}

        s.check(f"skin {_dt(dtype)} B={batch} V={verts} "
                f"{'with' if write_t else 'without'} vertex transforms", body)


def check_landmarks(s: Smoke, dtype) -> None:
    from flame_ext import reference

    landmarks = _wrapper("landmarks")
    verts, faces = 300, 500
    # (batch, static landmarks, contour landmarks (0: none), rule); 3 (17 + 100) terms is
    # more than one backward tile.
    for batch, n_static, n_contour, rule in ((1, 51, 17, "medusa"), (6, 100, 17, "deca"),
                                              (5, 105, 0, "medusa")):
        def body(batch=batch, n_static=n_static, n_contour=n_contour, rule=rule):
            v = s.randn(batch, verts, 3, dtype=dtype)
            tris = s.randint(verts, faces, 3)
            faces_idx = s.randint(faces, n_static)
            bary = s.rand(n_static, 3, dtype=dtype)
            bary = bary / bary.sum(1, keepdim=True)
            poses = s.randn(batch, 15, dtype=dtype, scale=0.5)
            if n_contour:
                dyn_faces = s.randint(faces, N_BINS, n_contour)
                dyn_bary = s.rand(N_BINS, n_contour, 3, dtype=dtype)
                dyn_bary = dyn_bary / dyn_bary.sum(2, keepdim=True)
            else:
                dyn_faces = dyn_bary = None
            grad = s.randn(batch, n_static + n_contour, 3, dtype=dtype)
            ref_in, ext_in = _leaves([v]), _leaves([v])
            args = (tris, faces_idx, bary, dyn_faces, dyn_bary, rule)
            want = reference.landmarks(ref_in[0], poses, *args)
            got = landmarks(ext_in[0], poses, *args)
            return {"out": (got, want, dtype),
                    **_pairs("grad", _grads([got], ext_in, [grad]),
                             _grads([want], ref_in, [grad]), dtype)}

        contour = f"{n_contour} contour ({rule})" if n_contour else "no contour"
        s.check(f"landmarks {_dt(dtype)} B={batch} L={n_static} + {contour}", body)


def check_normals(s: Smoke, dtype) -> None:
    # The draws of the checks after this one stay what they were before it existed (their
    # float32 inputs are part of what their tolerances were set for).
    state = s.generator.get_state()
    try:
        _check_normals(s, dtype)
    finally:
        s.generator.set_state(state)


def _check_normals(s: Smoke, dtype) -> None:
    from flame_ext import reference

    vertex_normals = _wrapper("vertex_normals")
    # A height field over an n x n grid (two triangles per cell): every vertex's face
    # normals point the same way, so float32 meets the common tolerance; n x n > 256
    # vertices, more than one block per sample.
    for batch, n in ((1, 9), (3, 20)):
        def body(batch=batch, n=n):
            index = torch.arange(n * n, device=s.device).view(n, n)
            a, b = index[:-1, :-1].reshape(-1), index[:-1, 1:].reshape(-1)
            c, d = index[1:, :-1].reshape(-1), index[1:, 1:].reshape(-1)
            faces = torch.cat([torch.stack([a, b, d], 1), torch.stack([a, d, c], 1)])
            grid = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"),
                               -1).reshape(1, n * n, 2).to(s.device, dtype)
            v = torch.cat([grid.expand(batch, -1, -1), s.randn(batch, n * n, 1, dtype=dtype,
                                                               scale=0.3)], -1)
            grad = s.randn(batch, n * n, 3, dtype=dtype)
            ref_in, ext_in = _leaves([v]), _leaves([v])
            want = reference.vertex_normals(ref_in[0], faces)
            got = vertex_normals(ext_in[0], faces)
            return {"out": (got, want, dtype),
                    **_pairs("grad", _grads([got], ext_in, [grad]),
                             _grads([want], ref_in, [grad]), dtype)}

        s.check(f"vertex_normals {_dt(dtype)} B={batch} V={n * n}", body)


def check_decoders(s: Smoke, dtype, model_path: str) -> None:
    from flame_ext import FlameLandmark, FlameShape, FlameTex, load_flame_model
    from flame_ext.decoders import INPUT_NAMES

    def pair(make):
        return [make(backend).to(s.device, dtype) for backend in ("ext", "reference")]

    model = load_flame_model(model_path)

    for transforms, batch, shared in (("vertex", 4, False), ("joint", 1, False),
                                      ("none", 5, True)):
        def body(transforms=transforms, batch=batch, shared=shared):
            ext, ref = pair(lambda backend: FlameShape(
                model.n_shape, model.n_expr, device="cpu", model_path=model_path,
                backend=backend, transforms=transforms))
            sizes = {"shape": model.n_shape, "expr": model.n_expr, "eye_pose": 6}
            inputs = {name: s.randn(1 if (shared and name == "shape") else batch,
                                    sizes.get(name, 3), dtype=dtype, scale=0.3)
                      for name in INPUT_NAMES}
            ref_in, ext_in = _leaves(list(inputs.values())), _leaves(list(inputs.values()))
            want = ref(**dict(zip(inputs, ref_in)))
            got = ext(**dict(zip(inputs, ext_in)))
            upstream = [s.randn(*t.shape, dtype=dtype) if t is not None else None
                        for t in want]
            return {**_pairs("out", got, want, dtype),
                    **_pairs("grad", _grads(got, ext_in, upstream),
                             _grads(want, ref_in, upstream), dtype)}

        s.check(f"FlameShape {_dt(dtype)} transforms={transforms} B={batch}"
                f"{' shared identity' if shared else ''}", body)

    for lm_type, lm_dim, batch in (("68", "2d", 3), ("mp", "2d", 2), ("68", "3d", 2)):
        def body(lm_type=lm_type, lm_dim=lm_dim, batch=batch):
            ext, ref = pair(lambda backend: FlameLandmark(
                lm_type, lm_dim, device="cpu", model_path=model_path, backend=backend))
            v = s.randn(batch, ext.num_vertices, 3, dtype=dtype)
            poses = s.randn(batch, 15, dtype=dtype, scale=0.5)
            ref_in, ext_in = _leaves([v]), _leaves([v])
            want, got = ref(ref_in[0], poses), ext(ext_in[0], poses)
            grad = s.randn(*want.shape, dtype=dtype)
            return {"out": (got, want, dtype),
                    **_pairs("grad", _grads([got], ext_in, [grad]),
                             _grads([want], ref_in, [grad]), dtype)}

        s.check(f"FlameLandmark {_dt(dtype)} {lm_type} {lm_dim} B={batch}", body)

    def texture():
        ext, ref = pair(lambda backend: FlameTex(model_path=model_path, n_tex=5,
                                                 backend=backend))
        code = s.randn(2, ext.n_tex, dtype=dtype)
        ref_in, ext_in = _leaves([code]), _leaves([code])
        want, got = ref(ref_in[0]), ext(ext_in[0])
        grad = s.randn(*want.shape, dtype=dtype)
        return {"out": (got, want, dtype),
                **_pairs("grad", _grads([got], ext_in, [grad]),
                         _grads([want], ref_in, [grad]), dtype)}

    s.check(f"FlameTex {_dt(dtype)} B=2", texture)

    if dtype != torch.float32:
        return  # a half basis is read with float32 sums
    for half in (torch.float16, torch.bfloat16):
        for batch in (2, 40):  # the hand kernels; cuBLAS over widened blocks
            def half_texture(half=half, batch=batch):
                ext, ref = [FlameTex(model_path=model_path, n_tex=5, backend=backend,
                                     basis_dtype=half).to(s.device)
                            for backend in ("ext", "reference")]
                code = s.randn(batch, ext.n_tex, dtype=dtype)
                ext_in = _leaves([code])
                want, got = ref(code), ext(ext_in[0])
                # The backward runs for the sanitizer; its values (float32 sums over the
                # 196608 rows, which the fixed tolerance here cannot judge) are tested
                # against their rounding bound in tests/test_ops_blend_half.py.
                _grads([got], ext_in, [s.randn(*want.shape, dtype=dtype)])
                return {"out": (got, want, dtype)}

            s.check(f"FlameTex half basis {str(half)[6:]} B={batch}", half_texture)


def _dt(dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


@contextmanager
def op_recorder(enabled: bool):
    """Yields a set that, on exit, holds the flame_ext ops that ran (autograd's backward
    threads included), read from a CPU-only profiler; None when disabled."""
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    seen: set = set()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield seen
    seen.update(e.key.split("::", 1)[1] for e in prof.key_averages()
                if e.key.startswith("flame_ext::"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--model-path", default="synthetic-small",
                        help="the decoders' model (default: the small synthetic one)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                        choices=["float32", "float64"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-coverage", action="store_true",
                        help="do not record which ops ran (no profiler)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the checks whose name contains TEXT (repeatable; "
                             "the op coverage is then not required)")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per check")
    args = parser.parse_args(argv)

    import warnings

    import flame_ext
    from flame_ext import _ops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if not _ops.available():
        print(f"FAIL the compiled ops did not load: {_ops.load_error()}", flush=True)
        return FAILED
    missing = [op for op in _ops.OPS if not _ops.has_kernel(op, device.type.upper())]
    if missing:
        print(f"FAIL no {device.type} kernel for {missing}", flush=True)
        return FAILED
    warnings.filterwarnings("ignore", message=".*SYNTHETIC FLAME model.*")

    smoke = Smoke(device, args.verbose, args.only or ())
    start = time.perf_counter()
    dtypes = [getattr(torch, name) for name in args.dtypes]
    with op_recorder(not (args.no_coverage or args.only)) as seen:
        for dtype in dtypes:
            check_blend(smoke, dtype)
            check_blend_shared(smoke, dtype)
            check_rigid_transforms(smoke, dtype)
            check_skin(smoke, dtype)
            check_landmarks(smoke, dtype)
            check_normals(smoke, dtype)
            check_decoders(smoke, dtype, args.model_path)
    if not smoke.results:
        smoke.results.append({"name": "selection", "ok": False,
                              "error": f"--only {args.only} selects no check"})
    not_run = [] if seen is None else [op for op in _ops.OPS if op not in seen]
    if not_run:
        smoke.results.append({"name": "coverage", "ok": False,
                              "error": f"ops never dispatched: {not_run}"})
        print(f"FAIL coverage: ops never dispatched: {not_run}", flush=True)

    failed = [r["name"] for r in smoke.results if not r["ok"]]
    report = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else "cpu"),
        "torch": torch.__version__,
        "flame_ext_build": flame_ext.build_info()["cuda_archs"] or "cpu",
        "dtypes": args.dtypes,
        "ops_dispatched": None if seen is None else sorted(seen),
        "checks": len(smoke.results),
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 2),
        "results": smoke.results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"gpu_smoke on {device}: {len(smoke.results) - len(failed)}/{len(smoke.results)} "
          f"checks passed in {report['seconds']:.1f} s"
          + (f"; ops dispatched: {', '.join(sorted(seen))}" if seen is not None else "")
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
