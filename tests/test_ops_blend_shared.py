"""Tests of blend_shared and blend_shared_backward: blend with one more table whose
coefficients are one row for the whole batch (FlameShape with one identity for many frames),
or S rows with an identity per sample picking one (many identities in one batch).

The op is defined as blend(blend(base, shared_dirs, shared_coeffs), dirs, coeffs, pose_dirs,
pose_coeffs): it is compared with flame_ext.reference in float64 within the dot-product
rounding bound, and on the CPU bit for bit with those two blends (the fused loop runs the
same kernels over the same chunks); its backward's grad_coeffs and grad_pose_coeffs bit for
bit with blend_backward's, its grad_shared_coeffs with (sum_b grad_out[b]) @ shared_dirs
within the bound. Then float64 gradcheck / gradgradcheck over every tensor argument,
opcheck of both ops, the decoder's shared-identity path, argument errors, degenerate sizes
and the thread count.

With identity: the same against blend(blend(base, shared_dirs, shared_coeffs)[identity],
...) (bit for bit on the CPU), grad_shared_coeffs (S, Ks) against each row's summed
samples, an unused row's gradient exactly zero, gradcheck, opcheck, the range check and
the thread count.

Sizes: N spans several forward chunks (256 rows) and backward chunks with a row tail;
batches below and past the sample tiles and groups (16) and the k-major strips (from 16
or 17); Ks and K below, at and past the SIMD widths, and 0.
"""

import pytest
import torch

from _oracle import assert_matches, assert_same_bits, d64, a64, needs_kernels, per_thread_count
from _samples import F64, blend_inputs
from flame_ext import reference

N = 613


def _mod():
    from flame_ext._ops import blend

    return blend


def _inputs(batch, n, ks, k, p, dtype, device, seed=0, base_kind="flat"):
    """(base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs), random,
    dirs and shared_dirs column slices of wider matrices; pose terms None when p is 0."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(
        batch, n, k, p, dtype, device, base_kind=base_kind, seed=seed)
    _, shared_dirs, shared_coeffs, _, _ = blend_inputs(
        1, n, ks, 0, dtype, device, column_offset=1, seed=seed + 1)
    return base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs


def _with_empty_pose(args):
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = args
    if pose_dirs is None:
        pose_dirs = coeffs.new_empty((0, dirs.shape[0]))
        pose_coeffs = coeffs.new_empty((coeffs.shape[0], 0))
    return base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs


def _composed(blend, args):
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = args
    return blend(blend(base, shared_dirs, shared_coeffs), dirs, coeffs, pose_dirs, pose_coeffs)


def _assert_forward_close(out, args):
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = args
    exact = _composed(reference.blend, [d64(a) for a in args])
    magnitude = a64(base) + a64(shared_coeffs) @ a64(shared_dirs).T + a64(coeffs) @ a64(dirs).T
    terms = shared_dirs.shape[1] + dirs.shape[1] + 2
    if pose_dirs is not None:
        magnitude = magnitude + a64(pose_coeffs) @ a64(pose_dirs)
        terms += pose_dirs.shape[0]
    assert out.shape == (coeffs.shape[0], dirs.shape[0]) and out.dtype == coeffs.dtype
    assert_matches(out, exact.expand(out.shape), magnitude.expand(out.shape), terms,
                   "blend_shared")


@pytest.mark.parametrize("batch", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("ks,k,p", [(5, 16, 9), (37, 100, 36), (300, 7, 0), (0, 37, 9),
                                    (20, 0, 36)])
def test_forward_matches_reference(ops, device, dtype, batch, ks, k, p):
    needs_kernels(device, "blend_shared")
    args = _inputs(batch, N, ks, k, p, dtype, device)
    out = _mod().blend_shared(*args)
    _assert_forward_close(out, args)
    if device.type == "cpu":
        assert torch.equal(out, _composed(_mod().blend, args))


@pytest.mark.parametrize("batch", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("ks,k,p", [(5, 16, 9), (37, 100, 36), (300, 7, 0), (0, 37, 9)])
def test_backward_matches_reference(ops, device, dtype, batch, ks, k, p):
    needs_kernels(device, "blend_shared")
    args = _with_empty_pose(_inputs(batch, N, ks, k, p, dtype, device))
    _, shared_dirs, _, dirs, _, pose_dirs, _ = args
    grad = torch.randn(batch, N, dtype=dtype, device=device)
    grad_shared, grad_coeffs, grad_pose = ops.blend_shared_backward(
        grad, shared_dirs, dirs, pose_dirs, True, True, True)
    summed = d64(grad).sum(0, keepdim=True)
    assert grad_shared.shape == (1, ks) and grad_shared.dtype == dtype
    assert_matches(grad_shared, summed @ d64(shared_dirs), a64(grad).sum(0, keepdim=True)
                   @ a64(shared_dirs), N + batch, "grad_shared_coeffs")
    assert_matches(grad_coeffs, d64(grad) @ d64(dirs), a64(grad) @ a64(dirs), N + 1,
                   "grad_coeffs")
    assert_matches(grad_pose, d64(grad) @ d64(pose_dirs).T, a64(grad) @ a64(pose_dirs).T,
                   N + 1, "grad_pose_coeffs")
    if device.type == "cpu":
        want_coeffs, want_pose = ops.blend_backward(grad, dirs, pose_dirs, True, True)
        assert torch.equal(grad_coeffs, want_coeffs) and torch.equal(grad_pose, want_pose)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True),
                                  (False, False, True), (False, False, False)])
def test_backward_outputs_not_needed_are_empty(ops, device, need):
    needs_kernels(device, "blend_shared")
    args = _inputs(3, N, 5, 16, 9, torch.float32, device)
    _, shared_dirs, _, dirs, _, pose_dirs, _ = args
    grad = torch.randn(3, N, device=device)
    grads = ops.blend_shared_backward(grad, shared_dirs, dirs, pose_dirs, *need)
    full = ops.blend_shared_backward(grad, shared_dirs, dirs, pose_dirs, True, True, True)
    for got, want, needed in zip(grads, full, need):
        if needed:
            assert torch.equal(got, want)
        else:
            assert got.shape == (0,)


def test_degenerate_sizes(ops, device, dtype):
    needs_kernels(device, "blend_shared")
    blend_shared = _mod().blend_shared
    # batch 0: an empty output; the shared gradient is zero
    args = _with_empty_pose(_inputs(0, N, 5, 16, 9, dtype, device))
    assert blend_shared(*args).shape == (0, N)
    grads = ops.blend_shared_backward(torch.empty(0, N, dtype=dtype, device=device), args[1],
                                      args[3], args[5], True, True, True)
    assert torch.equal(grads[0], torch.zeros(1, 5, dtype=dtype, device=device))
    assert grads[1].shape == (0, 16) and grads[2].shape == (0, 9)
    # N = 0
    args = _with_empty_pose(_inputs(3, 0, 5, 16, 0, dtype, device))
    assert blend_shared(*args).shape == (3, 0)
    grads = ops.blend_shared_backward(torch.empty(3, 0, dtype=dtype, device=device), args[1],
                                      args[3], args[5], True, True, True)
    assert torch.equal(grads[0], torch.zeros(1, 5, dtype=dtype, device=device))
    assert torch.equal(grads[1], torch.zeros(3, 16, dtype=dtype, device=device))
    # Ks = 0 and K = 0 together: base plus the pose correctives
    args = _inputs(4, N, 0, 0, 9, dtype, device)
    _assert_forward_close(blend_shared(*args), args)


def _gradcheck_inputs(batch, p=3, base_kind="flat"):
    return [a.detach().requires_grad_() if a is not None else None
            for a in _inputs(batch, 13, 4, 5, p, F64, "cpu", base_kind=base_kind)]


@pytest.mark.parametrize("batch", [3, 20])
@pytest.mark.parametrize("base_kind", ["flat", "shared"])
def test_gradcheck(ops, device, batch, base_kind):
    needs_kernels(device, "blend_shared")
    inputs = [a.detach().to(device).requires_grad_() for a in _gradcheck_inputs(batch, 3, base_kind)]
    assert torch.autograd.gradcheck(_mod().blend_shared, inputs)
    assert torch.autograd.gradgradcheck(_mod().blend_shared, inputs)


def test_gradcheck_without_pose_and_partial_requires_grad(ops, device):
    needs_kernels(device, "blend_shared")
    base, shared_dirs, shared_coeffs, dirs, coeffs, _, _ = [
        None if a is None else a.detach().to(device) for a in _gradcheck_inputs(3, p=0)]
    blend_shared = _mod().blend_shared
    shared_coeffs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: blend_shared(base, shared_dirs, s, dirs, coeffs), (shared_coeffs,))
    assert torch.autograd.gradgradcheck(
        lambda s: blend_shared(base, shared_dirs, s, dirs, coeffs), (shared_coeffs,))
    shared_dirs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d: blend_shared(base, d, shared_coeffs.detach(), dirs, coeffs), (shared_dirs,))


def test_backward_gradcheck(ops, device):
    needs_kernels(device, "blend_shared")
    args = _with_empty_pose([a.detach().to(device) for a in _gradcheck_inputs(3)])
    grad = torch.randn(3, 13, dtype=F64, device=device, requires_grad=True)
    tables = [args[1].requires_grad_(), args[3].requires_grad_(), args[5].requires_grad_()]
    for need in [(True, True, True), (True, False, True), (False, True, False)]:
        def used(g, s, d, pd, need=need):
            outs = ops.blend_shared_backward(g, s, d, pd, *need)
            return tuple(o for o, n in zip(outs, need) if n)

        assert torch.autograd.gradcheck(used, (grad, *tables))
        assert torch.autograd.gradgradcheck(used, (grad, *tables))


def test_opcheck(ops, device):
    needs_kernels(device, "blend_shared")
    for batch, p in [(3, 4), (20, 4), (3, 0)]:
        args = [a.detach().to(device)
                for a in _with_empty_pose(_inputs(batch, 13, 4, 5, p, F64, "cpu"))]
        torch.library.opcheck(ops.blend_shared.default, tuple(args))
        with_grad = [a.clone().requires_grad_() for a in args]
        torch.library.opcheck(ops.blend_shared.default, tuple(with_grad))
        grad = torch.randn(batch, 13, dtype=F64, device=device)
        for need in [(True, True, True), (True, False, False), (False, False, False)]:
            torch.library.opcheck(ops.blend_shared_backward.default,
                                  (grad, args[1], args[3], args[5], *need))
        torch.library.opcheck(
            ops.blend_shared_backward.default,
            (grad.clone().requires_grad_(), with_grad[1], with_grad[3], with_grad[5], True,
             True, True))


def test_argument_errors(ops, device):
    blend_shared = _mod().blend_shared
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = _inputs(
        3, 10, 6, 4, 2, torch.float32, device)
    with pytest.raises(ValueError, match=r"shared_coeffs must have shape \(1, "):
        blend_shared(base, shared_dirs, shared_coeffs.expand(2, -1), dirs, coeffs)
    with pytest.raises(ValueError, match="shared_coeffs must have 2 dimensions"):
        blend_shared(base, shared_dirs, shared_coeffs[0], dirs, coeffs)
    with pytest.raises(ValueError, match=r"shared_dirs must have shape \(10, 6\)"):
        blend_shared(base, shared_dirs[:, :5], shared_coeffs, dirs, coeffs)
    with pytest.raises(ValueError, match=r"shared_dirs must have shape \(10, 6\)"):
        blend_shared(base, shared_dirs[:9], shared_coeffs, dirs, coeffs)
    with pytest.raises(TypeError, match="shared_dirs has dtype torch.float64"):
        blend_shared(base, shared_dirs.double(), shared_coeffs, dirs, coeffs)
    with pytest.raises(TypeError, match="shared_coeffs has dtype torch.float64"):
        blend_shared(base, shared_dirs, shared_coeffs.double(), dirs, coeffs)
    with pytest.raises(TypeError, match="dirs has dtype torch.float16"):
        blend_shared(base, shared_dirs, shared_coeffs, dirs.half(), coeffs)
    with pytest.raises(ValueError, match=r"base must have shape \(10,\) or \(1, 10\)"):
        blend_shared(base.expand(3, -1), shared_dirs, shared_coeffs, dirs, coeffs)
    with pytest.raises(ValueError, match=r"dirs must have shape .*4.*got \(10, 3\)"):
        blend_shared(base, shared_dirs, shared_coeffs, dirs[:, :3], coeffs)
    with pytest.raises(ValueError, match="given together"):
        blend_shared(base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs)
    with pytest.raises(ValueError, match=r"pose_coeffs must have shape \(3, 2\)"):
        blend_shared(base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs[:2])


def test_kernels_check_their_inputs(ops):
    """Direct torch.ops calls (no wrapper) get a RuntimeError, never a crash."""
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = _inputs(
        3, 10, 6, 4, 2, torch.float32, "cpu")
    bad_calls = [
        lambda: ops.blend_shared(base, shared_dirs[:, :5], shared_coeffs, dirs, coeffs,
                                 pose_dirs, pose_coeffs),
        lambda: ops.blend_shared(base, shared_dirs[:9], shared_coeffs, dirs, coeffs,
                                 pose_dirs, pose_coeffs),
        lambda: ops.blend_shared(base, shared_dirs, shared_coeffs.expand(3, -1), dirs,
                                 coeffs, pose_dirs, pose_coeffs),
        lambda: ops.blend_shared(base.expand(3, -1), shared_dirs, shared_coeffs, dirs,
                                 coeffs, pose_dirs, pose_coeffs),
        lambda: ops.blend_shared(base, shared_dirs, shared_coeffs, dirs.half(), coeffs,
                                 pose_dirs, pose_coeffs),
        lambda: ops.blend_shared(base, shared_dirs.double(), shared_coeffs, dirs, coeffs,
                                 pose_dirs, pose_coeffs),
        lambda: ops.blend_shared_backward(torch.randn(3, 10), shared_dirs[:9], dirs,
                                          pose_dirs, True, True, True),
        lambda: ops.blend_shared_backward(torch.randn(3, 10), shared_dirs.double(), dirs,
                                          pose_dirs, True, True, True),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize("batch", [3, 17, 70])
def test_independent_of_thread_count(ops, batch):
    """Fixed chunks and sample groups: the same bits for 1, 2 and 3 threads."""
    args = _with_empty_pose(_inputs(batch, 20000, 300, 100, 36, torch.float32, "cpu"))
    grad = torch.randn(batch, 20000)
    results = per_thread_count(lambda: (ops.blend_shared(*args),) + tuple(
        ops.blend_shared_backward(grad, args[1], args[3], args[5], True, True, True)))
    _assert_forward_close(results[0][0], args)
    assert_same_bits(results)


def test_blas_batches_match_the_hand_loops(ops):
    """$FLAME_EXT_BLEND_BLAS_BATCH sends batches to at::addmm / at::mm: same values within
    the rounding bound, in a subprocess (the setting is read once per process)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, torch
        sys.path[:0] = sys.argv[1:]
        from test_ops_blend_shared import _inputs, _assert_forward_close, _with_empty_pose
        from _oracle import assert_matches, a64, d64
        from flame_ext import _backend
        _backend.steps("ext")
        ops = torch.ops.flame_ext
        args = _with_empty_pose(_inputs(20, 613, 37, 100, 36, torch.float32, "cpu"))
        _assert_forward_close(ops.blend_shared(*args), args)
        grad = torch.randn(20, 613)
        g = ops.blend_shared_backward(grad, args[1], args[3], args[5], True, True, True)
        assert_matches(g[0], d64(grad).sum(0, keepdim=True) @ d64(args[1]),
                       a64(grad).sum(0, keepdim=True) @ a64(args[1]), 633, "grad_shared")
        assert_matches(g[1], d64(grad) @ d64(args[3]), a64(grad) @ a64(args[3]), 614, "grad")
        # S rows and an identity per sample
        from test_ops_blend_shared import _identity_inputs, _composed_identity
        from flame_ext import reference
        args, identity = _identity_inputs(20, 5, 613, 37, 100, 36, torch.float32, "cpu")
        args = _with_empty_pose(args)
        out = ops.blend_shared(*args, identity)
        exact = _composed_identity(reference.blend, [d64(a) for a in args], identity)
        torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4)
        g = ops.blend_shared_backward(grad, args[1], args[3], args[5], True, True, True,
                                      identity, 5)
        one_hot = (torch.arange(5)[:, None] == identity[None]).double()
        assert_matches(g[0], one_hot @ d64(grad) @ d64(args[1]),
                       one_hot @ a64(grad) @ a64(args[1]), 633, "grad_shared with identity")
        print("ok")
    """)
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FLAME_EXT_BLEND_BLAS_BATCH="16")
    done = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_decoder_shared_identity_uses_it(ops, decoder_cache, requires_grad):
    """FlameShape with one shape row for the batch runs blend_shared in its fused node (no
    separate blend of the shaped mesh), and agrees with the reference, gradients too."""
    from torch.profiler import ProfilerActivity, profile

    from _samples import flame_inputs

    module = decoder_cache("shape", "ext", torch.float64, "cpu", "vertex")
    reference_module = decoder_cache("shape", "reference", torch.float64, "cpu", "vertex")
    inputs = flame_inputs(module, 6, shared=True, requires_grad=requires_grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        v, R = module(**inputs)
        if requires_grad:
            (v.sum() + R.sum()).backward()
    names = {e.name for e in prof.events()}
    assert "flame_ext::blend_shared" in names
    assert ("flame_ext::blend_shared_backward" in names) == requires_grad
    ref_inputs = {k: x.detach().clone().requires_grad_(requires_grad) for k, x in inputs.items()}
    v_ref, R_ref = reference_module(**ref_inputs)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(R, R_ref, rtol=1e-10, atol=1e-11)
    if requires_grad:
        (v_ref.sum() + R_ref.sum()).backward()
        for name, x in inputs.items():
            torch.testing.assert_close(x.grad, ref_inputs[name].grad, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------
# S shared rows and an identity per sample.


def _identity_inputs(batch, rows, n, ks, k, p, dtype, device, seed=0):
    """_inputs with shared_coeffs (rows, Ks) and an identity (batch,) that repeats rows and
    leaves the last one unused (when there are at least two)."""
    args = list(_inputs(batch, n, ks, k, p, dtype, device, seed=seed))
    g = torch.Generator().manual_seed(seed + 2)
    args[2] = torch.randn(rows, ks, generator=g, dtype=dtype).to(device)
    used = max(1, rows - 1)
    identity = torch.randint(0, used, (batch,), generator=g).to(device)
    return args, identity


def _composed_identity(blend, args, identity):
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = args
    shaped = blend(base, shared_dirs, shared_coeffs)[identity]
    return blend(shaped, dirs, coeffs, pose_dirs, pose_coeffs)


@pytest.mark.parametrize("batch,rows", [(1, 1), (5, 3), (16, 8), (17, 8), (40, 20)])
@pytest.mark.parametrize("ks,k,p", [(5, 16, 9), (37, 100, 36), (0, 37, 9)])
def test_identity_forward_matches_reference(ops, device, dtype, batch, rows, ks, k, p):
    needs_kernels(device, "blend_shared")
    args, identity = _identity_inputs(batch, rows, N, ks, k, p, dtype, device)
    out = _mod().blend_shared(*args, identity=identity)
    exact = _composed_identity(reference.blend, [d64(a) for a in args], identity)
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = args
    magnitude = (a64(base) + (a64(shared_coeffs) @ a64(shared_dirs).T)[identity]
                 + a64(coeffs) @ a64(dirs).T)
    terms = ks + k + 2
    if pose_dirs is not None:
        magnitude = magnitude + a64(pose_coeffs) @ a64(pose_dirs)
        terms += p
    assert out.shape == (batch, N) and out.dtype == dtype
    assert_matches(out, exact, magnitude, terms, "blend_shared with identity")
    if device.type == "cpu":
        assert torch.equal(out, _composed_identity(_mod().blend, args, identity))


@pytest.mark.parametrize("batch,rows", [(1, 1), (5, 3), (16, 8), (40, 20)])
@pytest.mark.parametrize("ks,k,p", [(5, 16, 9), (37, 100, 36)])
def test_identity_backward_matches_reference(ops, device, dtype, batch, rows, ks, k, p):
    needs_kernels(device, "blend_shared")
    args, identity = _identity_inputs(batch, rows, N, ks, k, p, dtype, device)
    _, shared_dirs, _, dirs, _, pose_dirs, _ = _with_empty_pose(args)
    grad = torch.randn(batch, N, dtype=dtype, device=device)
    grad_shared, grad_coeffs, grad_pose = ops.blend_shared_backward(
        grad, shared_dirs, dirs, pose_dirs, True, True, True, identity, rows)
    one_hot = (torch.arange(rows, device=device)[:, None] == identity[None]).double()
    summed = one_hot @ d64(grad)
    assert grad_shared.shape == (rows, ks) and grad_shared.dtype == dtype
    assert_matches(grad_shared, summed @ d64(shared_dirs),
                   (one_hot @ a64(grad)) @ a64(shared_dirs), N + batch, "grad_shared_coeffs")
    if rows > 1:  # the last row picked by no sample: exactly zero
        assert torch.equal(grad_shared[-1], torch.zeros_like(grad_shared[-1]))
    want_coeffs, want_pose = ops.blend_backward(grad, dirs, pose_dirs, True, True)
    if device.type == "cpu":
        assert torch.equal(grad_coeffs, want_coeffs) and torch.equal(grad_pose, want_pose)
    else:
        assert_matches(grad_coeffs, d64(grad) @ d64(dirs), a64(grad) @ a64(dirs), N + 1,
                       "grad_coeffs")


def _identity_gradcheck_inputs(batch, rows, p=3):
    args, identity = _identity_inputs(batch, rows, 13, 4, 5, p, F64, "cpu")
    return [a.detach().requires_grad_() if a is not None else None for a in args], identity


@pytest.mark.parametrize("batch,rows", [(5, 3), (20, 4)])
def test_identity_gradcheck(ops, device, batch, rows):
    needs_kernels(device, "blend_shared")
    inputs, identity = _identity_gradcheck_inputs(batch, rows)
    inputs = [a.detach().to(device).requires_grad_() for a in inputs]
    identity = identity.to(device)

    def blend_shared(*tensors):
        return _mod().blend_shared(*tensors, identity=identity)

    assert torch.autograd.gradcheck(blend_shared, inputs)
    assert torch.autograd.gradgradcheck(blend_shared, inputs)


def test_identity_backward_gradcheck(ops, device):
    needs_kernels(device, "blend_shared")
    inputs, identity = _identity_gradcheck_inputs(5, 3)
    args = _with_empty_pose([a.detach().to(device) for a in inputs])
    identity = identity.to(device)
    grad = torch.randn(5, 13, dtype=F64, device=device, requires_grad=True)
    tables = [args[1].requires_grad_(), args[3].requires_grad_(), args[5].requires_grad_()]
    for need in [(True, True, True), (True, False, False)]:
        def used(g, s, d, pd, need=need):
            outs = ops.blend_shared_backward(g, s, d, pd, *need, identity, 3)
            return tuple(o for o, n in zip(outs, need) if n)

        assert torch.autograd.gradcheck(used, (grad, *tables))
        assert torch.autograd.gradgradcheck(used, (grad, *tables))


def test_identity_opcheck(ops, device):
    needs_kernels(device, "blend_shared")
    for batch, rows, p in [(5, 3, 4), (20, 4, 0)]:
        inputs, identity = _identity_gradcheck_inputs(batch, rows, p)
        args = [a.detach().to(device) for a in _with_empty_pose(inputs)]
        identity = identity.to(device)
        torch.library.opcheck(ops.blend_shared.default, (*args, identity))
        with_grad = [a.clone().requires_grad_() for a in args]
        torch.library.opcheck(ops.blend_shared.default, (*with_grad, identity))
        grad = torch.randn(batch, 13, dtype=F64, device=device)
        for need in [(True, True, True), (True, False, False)]:
            torch.library.opcheck(ops.blend_shared_backward.default,
                                  (grad, args[1], args[3], args[5], *need, identity, rows))
        torch.library.opcheck(
            ops.blend_shared_backward.default,
            (grad.clone().requires_grad_(), with_grad[1], with_grad[3], with_grad[5], True,
             True, True, identity, rows))


def test_identity_errors(ops):
    blend_shared = _mod().blend_shared
    args, identity = _identity_inputs(4, 3, 10, 6, 4, 2, torch.float32, "cpu")
    base, shared_dirs, shared_coeffs, dirs, coeffs, pose_dirs, pose_coeffs = args
    # The wrapper names the argument.
    with pytest.raises(TypeError, match="identity must have dtype torch.int64"):
        blend_shared(*args, identity=identity.int())
    with pytest.raises(ValueError, match=r"identity must have shape \(4,\)"):
        blend_shared(*args, identity=identity[:3])
    with pytest.raises(ValueError, match="at least one row"):
        blend_shared(base, shared_dirs, shared_coeffs[:0], dirs, coeffs, identity=identity)
    # Out of range on the CPU: a ValueError naming the sample, forward and backward.
    for bad in (3, -1):
        wrong = identity.clone()
        wrong[2] = bad
        with pytest.raises(ValueError, match=rf"identity\[2\] = {bad} is out of range for 3"):
            blend_shared(*args, identity=wrong)
        with pytest.raises(ValueError, match=rf"identity\[2\] = {bad} is out of range for 3"):
            ops.blend_shared_backward(torch.randn(4, 10), shared_dirs, dirs, pose_dirs, True,
                                      True, True, wrong, 3)
    # Direct calls: RuntimeErrors, never a crash.
    bad_calls = [
        lambda: ops.blend_shared(*args, identity.int()),
        lambda: ops.blend_shared(*args, identity[:3]),
        lambda: ops.blend_shared(*args, identity[None]),
        lambda: ops.blend_shared(*args),  # three rows and no identity
        lambda: ops.blend_shared_backward(torch.randn(4, 10), shared_dirs, dirs, pose_dirs,
                                          True, True, True, None, 3),
        lambda: ops.blend_shared_backward(torch.randn(4, 10), shared_dirs, dirs, pose_dirs,
                                          True, True, True, identity[:2], 3),
        lambda: ops.blend_shared_backward(torch.randn(4, 10), shared_dirs, dirs, pose_dirs,
                                          True, True, True, identity, 0),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()


def test_identity_degenerate_sizes(ops, device, dtype):
    needs_kernels(device, "blend_shared")
    args, identity = _identity_inputs(0, 3, N, 5, 16, 9, dtype, device)
    args = _with_empty_pose(args)
    assert _mod().blend_shared(*args, identity=identity).shape == (0, N)
    grads = ops.blend_shared_backward(torch.empty(0, N, dtype=dtype, device=device), args[1],
                                      args[3], args[5], True, True, True, identity, 3)
    assert torch.equal(grads[0], torch.zeros(3, 5, dtype=dtype, device=device))


@pytest.mark.parametrize("batch,rows", [(17, 8), (70, 9)])
def test_identity_independent_of_thread_count(ops, batch, rows):
    args, identity = _identity_inputs(batch, rows, 20000, 300, 100, 36, torch.float32, "cpu")
    args = _with_empty_pose(args)
    grad = torch.randn(batch, 20000)
    results = per_thread_count(lambda: (ops.blend_shared(*args, identity),) + tuple(
        ops.blend_shared_backward(grad, args[1], args[3], args[5], True, True, True, identity,
                                  rows)))
    assert_same_bits(results)
