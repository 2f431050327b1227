"""Tests of flame_ext._backend: the path each decoder takes, build_info's report of it, the
fallback when the library is missing, and the decoders under torch.compile with their
default arguments (backend='auto', the inductor backend), as users run them.
"""

import os
import warnings

import pytest
import torch

from _process import in_threads
from _samples import FULL, SMALL, flame_inputs
import flame_ext
from flame_ext import FlameLandmark, FlameShape, FlameShapeLandmark, FlameTex, _backend, _ops
from flame_ext import build_info, load_flame_model


def _counts():
    model = load_flame_model(SMALL)
    return model.n_shape, model.n_expr


def _small_decoders(device):
    """The four decoders on the small model, every argument but the counts at its default."""
    n_shape, n_expr = _counts()
    return {
        "FlameShape": FlameShape(n_shape, n_expr, device=device, model_path=SMALL),
        "FlameLandmark": FlameLandmark(device=device, model_path=SMALL),
        "FlameTex": FlameTex(SMALL, n_tex=5).to(device),
        "FlameShapeLandmark": FlameShapeLandmark(n_shape, n_expr, device=device,
                                                 model_path=SMALL),
    }


def _call_args(name, module, device, seed=0):
    """Leaves (requiring grad) and a function of them that calls `module`."""
    gen = torch.Generator().manual_seed(seed)
    if name == "FlameLandmark":
        v = torch.randn(3, module.num_vertices, 3, generator=gen).to(device)
        poses = (0.3 * torch.randn(3, 15, generator=gen)).to(device)
        return {"v": v.requires_grad_(True)}, lambda m, v: m(v, poses)
    if name == "FlameTex":
        code = torch.randn(3, module.n_tex, generator=gen).to(device)
        return {"texcode": code.requires_grad_(True)}, lambda m, texcode: m(texcode)
    inputs = flame_inputs(module, 3, seed, device=device, requires_grad=True)
    return inputs, lambda m, **kw: m(**kw)


def _outputs_and_grads(fn, leaves):
    out = fn(**leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    loss = sum(o.square().sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], grads


# --- the path each decoder takes ----------------------------------------------------------


def test_every_decoder_has_its_ops_listed():
    assert set(_backend.DECODER_OPS) == {
        "FlameShape", "FlameLandmark", "FlameTex", "FlameShapeLandmark"
    }
    for ops in _backend.DECODER_OPS.values():
        assert ops and all(op in _ops.OPS and f"{op}_backward" in _ops.OPS for op in ops)


def test_build_info_reports_the_paths_the_decoders_take(ops, quiet):
    info = build_info()
    assert set(info["decoders"]) == set(_backend.DECODER_OPS)
    for name, paths in info["decoders"].items():
        assert paths["cpu"] == "ext"  # every op has a CPU kernel
        for device, path in paths.items():
            assert path == _backend.resolve("auto", device, name)
    # the decoders read the same table: a decoder built with 'auto' takes that path
    for name, module in _small_decoders("cpu").items():
        assert module.backend == "auto"
        assert _backend.resolve(module.backend, "cpu", name) == info["decoders"][name]["cpu"]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return set(line.split(":", 1)[1].split())


_ISA_ORDER = ("baseline", "avx2", "avx512")
_ISA_PROBE = "import flame_ext; print(flame_ext.build_info()['cpu_isa'])"


@pytest.mark.parametrize("forced", [None, "avx2", "baseline"])
def test_build_info_reports_the_cpu_isa(ops, forced):
    """build_info()['cpu_isa'] is the instruction set cpu_isa.h picks: the widest the CPU
    has (read here from /proc/cpuinfo), capped by $FLAME_EXT_CPU_ISA, in a fresh process
    since the choice is made once per process."""
    import platform
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("FLAME_EXT_CPU_ISA", None)
    if forced:
        env["FLAME_EXT_CPU_ISA"] = forced
    result = subprocess.run([sys.executable, "-c", _ISA_PROBE], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = result.stdout.strip().splitlines()[-1]
    assert reported in _ISA_ORDER
    flags = _cpu_flags()
    if flags is None or platform.machine() not in ("x86_64", "AMD64"):
        return  # no flags to check against: the value's form is all there is to test
    widest = "baseline"
    if {"avx2", "fma"} <= flags:
        widest = "avx512" if {"avx512f", "avx512dq", "avx512vl"} <= flags else "avx2"
    expected = widest if forced is None else min(widest, forced, key=_ISA_ORDER.index)
    assert reported == expected, (flags & {"avx2", "fma", "avx512f"}, forced)


def test_build_info_without_the_library_has_no_cpu_isa(monkeypatch):
    monkeypatch.setattr(_ops, "available", lambda: False)
    assert _ops.build_config()["cpu_isa"] is None


def test_auto_needs_every_op_and_its_backward(ops, monkeypatch):
    missing = {("skin_backward", "CPU")}
    monkeypatch.setattr(_ops, "has_kernel", lambda op, key: (op, key) not in missing)
    monkeypatch.setattr(_backend, "_AUTO", {})
    _backend.prepare("auto")
    assert _backend.resolve("auto", "cpu", "FlameShape") == "reference"
    assert _backend.resolve("auto", "cpu", "FlameShapeLandmark") == "reference"
    assert _backend.resolve("auto", "cpu", "FlameTex") == "ext"
    assert _backend.resolve("auto", "cuda", "FlameShape") == "ext"


def test_forward_takes_no_lock(ops, quiet, monkeypatch):
    """Once constructed, a decoder's forward reads plain dicts only: the library's load
    lock (which torch.compile cannot trace) is never taken."""

    class NoLock:
        def __enter__(self):
            raise AssertionError("a forward took the library's load lock")

        def __exit__(self, *exc):
            return False

    modules = _small_decoders("cpu")
    monkeypatch.setattr(_ops, "_lock", NoLock())
    monkeypatch.setattr(_backend, "_warn_lock", NoLock())
    for name, module in modules.items():
        leaves, call = _call_args(name, module, "cpu")
        _outputs_and_grads(lambda **kw: call(module, **kw), leaves)
    assert _ops.available()


def test_fallback_without_the_library_warns_once_at_the_caller(ops, monkeypatch, quiet):
    """With the library missing, 'auto' decoders run the reference and warn once, naming
    the caller's line; 'ext' is a clear error."""
    monkeypatch.setattr(_ops, "_loaded", False)
    monkeypatch.setattr(_ops, "_error", "OSError: no library here")
    monkeypatch.setattr(_backend, "_AUTO", {})
    monkeypatch.setattr(_backend, "_STEPS", {})
    monkeypatch.setattr(_backend, "_warned_no_ext", False)
    n_shape, n_expr = _counts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shape = FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL)
        landmark = FlameLandmark(device="cpu", model_path=SMALL)
    notices = [w for w in caught if "could not be loaded" in str(w.message)]
    assert len(notices) == 1 and notices[0].category is RuntimeWarning
    assert "no library here" in str(notices[0].message)
    assert notices[0].filename == __file__
    assert _backend.resolve(shape.backend, "cpu", "FlameShape") == "reference"
    assert _backend.resolve(landmark.backend, "cpu", "FlameLandmark") == "reference"
    inputs = flame_inputs(shape, 2, 1, dtype=torch.float32)
    v, R = shape(**inputs)
    monkeypatch.undo()
    v0, R0 = FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL,
                        backend="reference")(**inputs)
    torch.testing.assert_close(v, v0)
    torch.testing.assert_close(R, R0)
    monkeypatch.setattr(_ops, "_loaded", False)
    monkeypatch.setattr(_ops, "_error", "OSError: no library here")
    with pytest.raises(RuntimeError, match="backend='ext'.*no library here"):
        FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL, backend="ext")


def test_extension_loading_and_fallback_warning_once(monkeypatch):
    """available() from many threads at once (the load state reset) loads the library
    once and agrees; the 'compiled ops could not be loaded' warning is given once however
    many threads hit it."""
    loads = []
    real_load_library = torch.ops.load_library

    def counting_load_library(path):
        loads.append(path)
        real_load_library(path)  # the same library again: dlopen returns the loaded one

    monkeypatch.setattr(torch.ops, "load_library", counting_load_library)
    monkeypatch.setattr(_ops, "_loaded", None)
    monkeypatch.setattr(_ops, "_error", None)
    results = in_threads(lambda i: _ops.available(), 8)
    assert len(set(results)) == 1
    assert len(loads) == (1 if os.environ.get("FLAME_EXT_LIB") else 0)
    monkeypatch.setattr(_backend, "_warned_no_ext", False)
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda *a, **k: calls.append(a))
    in_threads(lambda i: _backend._warn_no_extension(), 8)
    assert len(calls) == 1


# --- torch.func transforms ----------------------------------------------------------------


def test_auto_takes_the_reference_under_torch_func(ops):
    """Inside a torch.func transform or a forward-AD level 'auto' resolves to the
    reference (whose plain PyTorch has every rule functorch needs), outside them to the
    ops; explicit backends stay."""
    seen = {}

    def probe(x):
        for name in _backend.DECODER_OPS:
            seen[name] = _backend.resolve("auto", "cpu", name)
        seen["explicit"] = _backend.resolve("ext", "cpu", "FlameShape")
        return x.sum()

    def dual(f):
        def run(x):
            with torch.autograd.forward_ad.dual_level():
                return f(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
        return run

    for transform in (torch.func.grad, torch.func.vmap, torch.func.jacfwd, dual):
        seen.clear()
        transform(probe)(torch.ones(2, 3))
        assert seen == {**dict.fromkeys(_backend.DECODER_OPS, "reference"), "explicit": "ext"}
    assert all(_backend.resolve("auto", "cpu", n) == "ext" for n in _backend.DECODER_OPS)


def test_explicit_ext_refuses_a_tangent_and_only_a_tangent(ops, quiet):
    """With backend='ext' a forward-mode tangent reaching the ops (torch.func.jvp /
    jacfwd, a dual tensor of forward_ad) is a RuntimeError naming the op or method: torch
    would pass the ops' outputs on without a tangent (jacfwd gave a Jacobian of zeros).
    Where no tangent reaches them (a dual level with plain inputs, grad of a function in
    which the decoder's output is a constant, vmap) the ops run and agree with the
    reference."""
    from torch.autograd import forward_ad

    n_shape, n_expr = _counts()
    expr = torch.randn(1, n_expr, dtype=torch.float64)
    modules = {b: FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL, backend=b,
                             transforms="none").double() for b in ("ext", "reference")}
    landmark = FlameLandmark("mp", device="cpu", model_path=SMALL, backend="ext")
    ext, ref = modules["ext"], modules["reference"]
    v = ref(expr=expr)[0].detach()
    refused = {
        "flame_ext::blend": lambda: torch.func.jacfwd(lambda e: ext(expr=e)[0])(expr),
        "FlameShape.vertex_normals": lambda: torch.func.jacfwd(ext.vertex_normals)(v),
        "flame_ext::landmarks": lambda: torch.func.jvp(lambda x: landmark(x.float()), (v,),
                                                       (torch.ones_like(v),)),
    }
    for what, call in refused.items():
        with pytest.raises(RuntimeError, match=f"^{what} with backend='ext'"):
            call()
    with forward_ad.dual_level():
        with pytest.raises(RuntimeError, match="^flame_ext::blend with backend='ext'"):
            ext(expr=forward_ad.make_dual(expr, torch.ones_like(expr)))
        # a dual level, no tangent in the inputs
        torch.testing.assert_close(ext(expr=expr)[0], ref(expr=expr)[0])
    # grad where the decoder's output is a constant of the differentiated input
    w = torch.ones(1, dtype=torch.float64)
    got = torch.func.grad(lambda w: (w * ext(expr=expr)[0]).sum())(w)
    torch.testing.assert_close(got, ref(expr=expr)[0].sum().reshape(1))
    torch.testing.assert_close(torch.func.vmap(lambda e: ext(expr=e[None])[0][0])(expr),
                               ref(expr=expr)[0])
    # 'auto' differentiates through the reference there
    auto = FlameShape(n_shape, n_expr, device="cpu", model_path=SMALL,
                      transforms="none").double()
    jacobian = torch.func.jacfwd(lambda e: auto(expr=e)[0])(expr)
    want = torch.func.jacfwd(lambda e: ref(expr=e)[0])(expr)
    torch.testing.assert_close(jacobian, want)
    assert jacobian.abs().max() > 0


def _transform_cases(name, module, device):
    """(leaves, fn) with fn(**leaves) -> the decoder's outputs (tensors only), float64."""
    if name == "FlameLandmark":
        gen = torch.Generator().manual_seed(0)
        poses = (0.3 * torch.randn(3, 15, generator=gen, dtype=torch.float64)).to(device)
        v = torch.randn(3, module.num_vertices, 3, generator=gen, dtype=torch.float64)
        leaves, call = {"v": v.to(device)}, lambda m, v: m(v, poses)
    else:
        leaves, call = _call_args(name, module, device)
        leaves = {k: v.detach().double() for k, v in leaves.items()}

    def fn(**kw):
        out = call(module, **kw)
        return tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o is not None)

    return leaves, fn


@pytest.mark.parametrize("name", sorted(_backend.DECODER_OPS))
def test_decoders_compose_with_torch_func(ops, device, name, quiet):
    """grad, jacrev, jvp and vmap of every decoder with backend='auto' agree with eager
    autograd through the ops: torch.func.grad of a loss equals its autograd gradient, the
    jvp's tangent satisfies <u, J t> = <J^T u, t> with J^T u from eager autograd, and
    vmap over single samples equals the batched call."""
    module = _small_decoders(device)[name].double()
    leaves, fn = _transform_cases(name, module, device)
    names = list(leaves)
    gen = torch.Generator().manual_seed(5)
    outs = fn(**leaves)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device) for o in outs]
    tangents = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(device)
                for k, v in leaves.items()}

    def loss(*values):
        got = fn(**dict(zip(names, values)))
        return sum((w * o).sum() for w, o in zip(weights, got))

    # eager autograd through the ops (the 'auto' path outside any transform)
    assert _backend.resolve(module.backend, device.type, name) == "ext"
    eager_leaves = [v.clone().requires_grad_(True) for v in leaves.values()]
    eager = torch.autograd.grad(loss(*eager_leaves), eager_leaves)

    grads = torch.func.grad(loss, argnums=tuple(range(len(names))))(*leaves.values())
    for k, got, want in zip(names, grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad {k}")

    first = names[0]  # the Jacobian of 20 output values: rows of the gradient's form
    jac = torch.func.jacrev(lambda x: fn(**{**leaves, first: x})[0].flatten()[:20])(
        leaves[first])
    eager_rows = [torch.autograd.grad(outs_row, eager_leaves[0], retain_graph=True)[0]
                  for outs_row in fn(**dict(zip(names, eager_leaves)))[0].flatten()[:20]]
    torch.testing.assert_close(jac, torch.stack(eager_rows), rtol=1e-10, atol=1e-10)

    _, tangent_out = torch.func.jvp(lambda *v: fn(**dict(zip(names, v))),
                                    tuple(leaves.values()), tuple(tangents.values()))
    lhs = sum((w * t).sum() for w, t in zip(weights, tangent_out))
    rhs = sum((g * tangents[k]).sum() for k, g in zip(names, eager))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)

    if name != "FlameLandmark":  # FlameLandmark's poses are fixed: its batch is v's
        def one(*v):
            return fn(**{k: x[None] for k, x in zip(names, v)})[0][0]

        mapped = torch.func.vmap(one)(*leaves.values())
        torch.testing.assert_close(mapped, outs[0], rtol=1e-12, atol=1e-12)


def test_torch_func_grad_of_the_model_tables(ops, quiet):
    """torch.func.grad over FlameShape's tables, swapped in by functional_call (the tables
    derived from them are derived again inside the transform), equals eager autograd with
    the tables requiring grad."""
    module = _small_decoders("cpu")["FlameShape"].double()
    inputs = flame_inputs(module, 3, 2)
    names = ("shape_dirs", "J_regressor", "lbs_weights")
    tables = {k: getattr(module, k).detach().clone() for k in names}
    weights = torch.randn(module(**inputs)[0].shape, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)

    def loss(tables):
        return (weights * torch.func.functional_call(module, tables, kwargs=inputs)[0]).sum()

    got = torch.func.grad(loss)(tables)
    for k in names:
        getattr(module, k).requires_grad_(True)
    want = torch.autograd.grad((weights * module(**inputs)[0]).sum(),
                               [getattr(module, k) for k in names])
    for k, w in zip(names, want):
        torch.testing.assert_close(got[k], w, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("basis_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_half_basis_texture_composes_with_torch_func(ops, basis_dtype, backend, quiet):
    """A half-precision texture basis under grad and jacrev: the blocked half blend's
    autograd does not serve there, a plain product of the widened basis does, with the
    gradient eager autograd gives."""
    module = FlameTex(SMALL, n_tex=5, basis_dtype=basis_dtype, backend=backend)
    code = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(module(code).shape, generator=torch.Generator().manual_seed(5))

    def loss(c):
        return (weight * module(c)).sum()

    leaf = code.clone().requires_grad_(True)
    want = torch.autograd.grad(loss(leaf), leaf)[0]
    # two float32 sums over the M gathered rows in different orders: each within
    # M 2^-24 sum_m |w_m b_mk| of the exact gradient
    rows = module._gathered_basis.float()
    bound = 2 * rows.shape[0] * 2.0**-24 * (weight.reshape(2, -1).abs() @ rows.abs())
    err = (torch.func.grad(loss)(code) - want).abs()
    assert bool((err <= bound).all()), (err.max().item(), bound.min().item())
    jac = torch.func.jacrev(lambda c: module(c).flatten()[:10])(code)
    assert jac.shape == (10, 2, 5) and torch.isfinite(jac).all()


def test_forward_mode_ad_takes_the_reference(ops, quiet):
    """Inside a forward-AD dual level 'auto' takes the reference (the ops have no
    forward-mode rule): the tangent of FlameShape and of vertex_normals equals the
    directional derivative from eager autograd, <u, J t> = <J^T u, t>."""
    from torch.autograd import forward_ad

    module = _small_decoders("cpu")["FlameShape"].double()
    inputs = flame_inputs(module, 2, 6)
    expr = inputs.pop("expr")
    tangent = torch.randn(expr.shape, generator=torch.Generator().manual_seed(7),
                          dtype=torch.float64)
    with forward_ad.dual_level():
        v, _ = module(expr=forward_ad.make_dual(expr, tangent), **inputs)
        normals = flame_ext.vertex_normals(v, module.tris)
        v_tangent = forward_ad.unpack_dual(v).tangent
        n_tangent = forward_ad.unpack_dual(normals).tangent
    leaf = expr.clone().requires_grad_(True)
    v_eager, _ = module(expr=leaf, **inputs)
    n_eager = flame_ext.vertex_normals(v_eager, module.tris)
    gen = torch.Generator().manual_seed(8)
    for out, tan in ((v_eager, v_tangent), (n_eager, n_tangent)):
        u = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        vjp = torch.autograd.grad(out, leaf, u, retain_graph=True)[0]
        torch.testing.assert_close((u * tan).sum(), (vjp * tangent).sum(),
                                   rtol=1e-10, atol=1e-10)


def test_vertex_normals_compose_with_torch_func(ops, quiet):
    module = _small_decoders("cpu")["FlameShape"].double()
    v = module(**flame_inputs(module, 2, 9))[0].detach()
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(10),
                         dtype=torch.float64)

    def loss(x):
        return (weight * module.vertex_normals(x)).sum() + (
            weight * flame_ext.vertex_normals(x, module.tris)).sum()

    leaf = v.clone().requires_grad_(True)
    want = torch.autograd.grad(loss(leaf), leaf)[0]
    torch.testing.assert_close(torch.func.grad(loss)(v), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["FlameShape", "FlameTex"])
def test_compiled_torch_func_grad(ops, name, fresh_dynamo, quiet):
    """torch.compile of a function that takes torch.func.grad of a decoder: traced on
    the reference (the transform is active while dynamo traces it), equal to eager."""
    module = _small_decoders("cpu")[name]
    leaves, fn = _transform_cases(name, module.double(), torch.device("cpu"))
    first = next(iter(leaves))

    def loss(x):
        return sum(o.square().sum() for o in fn(**{**leaves, first: x}))

    want = torch.func.grad(loss)(leaves[first])
    got = torch.compile(lambda x: torch.func.grad(loss)(x), backend="aot_eager")(leaves[first])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- torch.compile with the default arguments ---------------------------------------------


def test_compile_flame_shape_with_every_default(ops, device, fresh_dynamo, monkeypatch, quiet):
    """`torch.compile(FlameShape(), fullgraph=True)(expr=e)`, the full-size model found
    through the data variable: the default backend ('auto'), inductor, forward and
    backward."""
    monkeypatch.setenv("FLAME_EXT_DATA", FULL)
    module = FlameShape().to(device)
    expr = (0.5 * torch.randn(2, 100, generator=torch.Generator().manual_seed(0))).to(device)
    compiled = torch.compile(module, fullgraph=True)
    got = _outputs_and_grads(lambda expr: compiled(expr=expr),
                             {"expr": expr.clone().requires_grad_(True)})
    want = _outputs_and_grads(lambda expr: module(expr=expr),
                              {"expr": expr.clone().requires_grad_(True)})
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["FlameShape", "FlameLandmark", "FlameTex",
                                  "FlameShapeLandmark"])
def test_compile_decoder_with_default_backend(ops, device, name, fresh_dynamo, quiet):
    """Each decoder built with backend='auto', compiled with fullgraph (inductor):
    outputs and gradients are eager mode's."""
    module = _small_decoders(device)[name]
    leaves, call = _call_args(name, module, device)
    compiled = torch.compile(module, fullgraph=True)
    got = _outputs_and_grads(lambda **kw: call(compiled, **kw), leaves)
    want = _outputs_and_grads(lambda **kw: call(module, **kw), leaves)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_user_function_calling_the_decoders(ops, device, fresh_dynamo, quiet):
    """A user's loss (FlameShape -> FlameLandmark, FlameTex) compiled whole with
    fullgraph: forward and gradients as in eager mode."""
    modules = _small_decoders(device)
    shape, landmark, texture = modules["FlameShape"], modules["FlameLandmark"], modules["FlameTex"]
    target = torch.zeros(3, 68, 3, device=device)

    def loss(expr, jaw_pose, texcode):
        v, R = shape(expr=expr, jaw_pose=jaw_pose)
        poses = torch.cat([shape.global_pose.expand(3, -1), shape.neck_pose.expand(3, -1),
                           jaw_pose, shape.eye_pose.expand(3, -1)], dim=1)
        lmk = landmark(v, poses)
        albedo = texture(texcode)
        return (lmk - target).square().sum() + R.mean() + albedo.mean()

    gen = torch.Generator().manual_seed(3)
    leaves = {
        "expr": torch.randn(3, shape.n_expr, generator=gen).to(device),
        "jaw_pose": (0.2 * torch.randn(3, 3, generator=gen)).to(device),
        "texcode": torch.randn(3, 5, generator=gen).to(device),
    }
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    compiled = torch.compile(loss, fullgraph=True)
    got = _outputs_and_grads(compiled, leaves)
    want = _outputs_and_grads(loss, leaves)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
