"""Tests of the blend op family: blend and blend_backward, forward, backward, double backward.

The compiled ops are compared with flame_ext.reference.blend evaluated in float64 (the
oracle), with an error bound derived from the dot-product lengths; gradients with
torch.autograd.gradcheck / gradgradcheck in float64; then the registrations (opcheck,
torch.compile), argument errors, NaN/inf propagation and determinism; properties over any
shape, layout and value; 64-bit indexing past 2^31 elements; the CUDA kernels against the
CPU ones.

Sizes are chosen to reach every code path of the CPU kernels: batches below, at and past
the sample tiles (2 or 4) and the sample groups (16), below and from the batch of 16 (17
for a dirs over 4 MiB) where the forward switches from dot tiles to k-major strips (every
strip width: STRIP_ROWS), N spanning several row chunks (256 rows forward, 256 to N/64
backward, fewer and longer for large batches, 64-row blocks), and K below, at and between
multiples of the SIMD width (16 float32 or 8 float64 lanes), including the masked tail
vector. The BLAS path of $FLAME_EXT_BLEND_BLAS_BATCH runs in a subprocess.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _oracle import (
    a64,
    assert_bad_argument_is_named,
    assert_deterministic_and_fully_written,
    assert_huge_page_output,
    assert_independent_of_thread_count,
    assert_matches,
    assert_same_bits,
    d64,
    needs_kernels,
    per_thread_count,
)
from _samples import (
    CORRUPTIONS,
    F32,
    F64,
    big_zeros,
    blend_inputs,
    dtypes,
    lay_out,
    layouts,
    random_values,
    seeds,
    specials,
)
from flame_ext import reference

N = 613  # 3 forward chunks, 3 backward chunks of 10 row blocks; odd, so every loop has a tail
SMALL_BATCHES = (1, 3, 8)
LARGE_BATCH = 40  # three sample groups of the CPU loops; above the CUDA hand kernels' 16


def _blend_mod():
    from flame_ext._ops import blend

    return blend


def _eps(dtype):
    return torch.finfo(dtype).eps


def _assert_blend_close(out, base, dirs, coeffs, pose_dirs, pose_coeffs):
    """|out - exact| <= 2 n eps (|base| + |coeffs| |dirs|^T + |pose_coeffs| |pose_dirs|).

    With n = K + P + 1 terms: the classical worst-case rounding bound of a sum of n terms
    in any order, FMA or not, is about n u |terms| with u = eps / 2; this allows four times
    that. `exact` is the float64 reference of the same inputs; its own error is negligible
    next to the float32 bound and inside the slack of the float64 one.
    """
    d64 = lambda x: None if x is None else x.double()  # noqa: E731
    exact = reference.blend(d64(base), d64(dirs), d64(coeffs), d64(pose_dirs), d64(pose_coeffs))
    magnitude = base.double().abs() + coeffs.double().abs() @ dirs.double().abs().mT
    terms = dirs.shape[1] + 1
    if pose_dirs is not None:
        magnitude = magnitude + pose_coeffs.double().abs() @ pose_dirs.double().abs()
        terms += pose_dirs.shape[0]
    bound = 2 * terms * _eps(out.dtype) * magnitude
    assert out.shape == exact.shape
    assert out.dtype == coeffs.dtype and out.device == coeffs.device
    assert out.is_contiguous()
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e} over the bound"


def _assert_adjoint_close(result, grad_out, dirs):
    """result = grad_out @ dirs, with the same bound over the N summed products."""
    exact = grad_out.double() @ dirs.double()
    bound = 2 * (grad_out.shape[1] + 1) * _eps(result.dtype) * (
        grad_out.double().abs() @ dirs.double().abs()
    )
    assert result.shape == exact.shape and result.dtype == grad_out.dtype
    err = (result.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e} over the bound"


# ---------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("batch", SMALL_BATCHES + (16, 17, LARGE_BATCH))
@pytest.mark.parametrize("k", [5, 16, 37, 100])
@pytest.mark.parametrize("p", [0, 9])
def test_blend_matches_reference(ops, device, dtype, batch, k, p):
    args = blend_inputs(batch, N, k, p, dtype, device)
    out = _blend_mod().blend(*args)
    _assert_blend_close(out, *args)


# 16 samples of 525000 values: a 33.6 MB float32 output, over the huge-page threshold.
HUGE_CASE = (16, 525000, 5, 3)


def test_blend_large_output_on_huge_pages(ops):
    args = blend_inputs(*HUGE_CASE, F32, "cpu")
    out = _blend_mod().blend(*args)
    _assert_blend_close(out, *args)
    assert_huge_page_output(out)


@pytest.mark.parametrize("base_kind", ["flat", "shared", "batched"])
@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_blend_base_shapes(ops, device, dtype, base_kind, batch):
    args = blend_inputs(batch, N, 37, 4, dtype, device, base_kind=base_kind)
    _assert_blend_close(_blend_mod().blend(*args), *args)


@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_blend_layouts(ops, device, batch):
    """Contiguous dirs, a transposed (column-major) dirs, an expanded base, strided coeffs."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(batch, N, 37, 6, torch.float64, device)
    blend = _blend_mod().blend
    expected = blend(base, dirs.contiguous(), coeffs, pose_dirs, pose_coeffs)
    column_major = dirs.mT.contiguous().mT
    assert column_major.stride(1) != 1
    torch.testing.assert_close(blend(base, column_major, coeffs, pose_dirs, pose_coeffs), expected)
    # A column slice is read in place: same answer as its contiguous copy.
    torch.testing.assert_close(blend(base, dirs, coeffs, pose_dirs, pose_coeffs), expected)
    expanded = base.expand(batch, N)
    torch.testing.assert_close(blend(expanded, dirs, coeffs, pose_dirs, pose_coeffs), expected)
    strided = torch.stack([coeffs, coeffs], dim=2)[..., 0]  # column stride 2
    assert not strided.is_contiguous()
    torch.testing.assert_close(blend(base, dirs, strided, pose_dirs, pose_coeffs), expected)
    pose_t = pose_dirs.mT.contiguous().mT
    torch.testing.assert_close(blend(base, dirs, coeffs, pose_t, pose_coeffs), expected)


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_blend_batch_sizes(ops, device, dtype, batch):
    args = blend_inputs(batch, N, 37, 9, dtype, device, base_kind="flat")
    _assert_blend_close(_blend_mod().blend(*args), *args)


def test_blend_degenerate_sizes(ops, device, dtype):
    blend = _blend_mod().blend
    # K = 0: out = base (+ pose).
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(3, N, 0, 4, dtype, device)
    _assert_blend_close(blend(base, dirs, coeffs, pose_dirs, pose_coeffs), base, dirs, coeffs,
                        pose_dirs, pose_coeffs)
    # N = 0.
    args = blend_inputs(3, 0, 7, 2, dtype, device)
    assert blend(*args).shape == (3, 0)
    # Explicit empty pose tensors are the same as none.
    base, dirs, coeffs, _, _ = blend_inputs(3, N, 7, 0, dtype, device)
    empty = blend(base, dirs, coeffs, dirs.new_empty((0, N)), coeffs.new_empty((3, 0)))
    torch.testing.assert_close(empty, blend(base, dirs, coeffs), rtol=0, atol=0)


# Row counts whose last 256-row forward chunk ends in each narrower strip of the CPU loops
# for batches of 16 and more (strips of 4, 3, 2, 1 vectors of rows: 64/48/32/16 rows in
# float32 with AVX-512, 32/24/16/8 in float64; 24/16/8 with AVX2), then fewer rows than a
# vector: 256 + 63, 256 + 47, 256 + 31, 256 + 23, 256 + 15 and 5.
STRIP_ROWS = (319, 303, 287, 279, 271, 5)


@pytest.mark.parametrize("n", STRIP_ROWS)
@pytest.mark.parametrize("k,p", [(3, 2), (37, 9), (150, 0), (5, 70)])
def test_blend_strip_widths(ops, device, dtype, n, k, p):
    """Batches of 16 and more read a dirs of this size through k-major strips (K in blocks
    of 64 or more columns: 150 spans three in float32 with AVX-512, and the pose rows are
    packed in blocks of as many: P = 70 spans two); every strip width and the rows past the
    last one, against the reference."""
    for batch in (16, 17, 21):
        args = blend_inputs(batch, n, k, p, dtype, device)
        _assert_blend_close(_blend_mod().blend(*args), *args)


def test_blend_flame_sizes(ops, device):
    """The decoder's call: 15069 rows, the 100 expression columns of a 400-wide matrix, P = 36
    (6 MB: B = 16 on the dot tiles, 17 on strips)."""
    n = 3 * 5023
    for batch in (1, 16, 17):
        args = blend_inputs(batch, n, 100, 36, torch.float32, device, column_offset=300)
        assert args[1].stride() == (405, 1)  # a view into the wide matrix
        _assert_blend_close(_blend_mod().blend(*args), *args)


# ---------------------------------------------------------------------------------------
# Backward op


@pytest.mark.parametrize("batch", SMALL_BATCHES + (16, 17, LARGE_BATCH))
@pytest.mark.parametrize("k", [5, 16, 37, 100])
def test_blend_backward_matches_reference(ops, device, dtype, batch, k):
    _, dirs, _, pose_dirs, _ = blend_inputs(batch, N, k, 9, dtype, device)
    grad_out = torch.randn(batch, N, dtype=torch.float64).to(dtype=dtype, device=device)
    grad_coeffs, grad_pose = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    _assert_adjoint_close(grad_coeffs, grad_out, dirs)
    _assert_adjoint_close(grad_pose, grad_out, pose_dirs.mT)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_blend_backward_outputs_not_needed_are_empty(ops, device, need):
    _, dirs, _, pose_dirs, _ = blend_inputs(3, N, 37, 9, torch.float64, device)
    grad_out = torch.randn(3, N, dtype=torch.float64, device=device)
    grad_coeffs, grad_pose = ops.blend_backward(grad_out, dirs, pose_dirs, *need)
    assert grad_coeffs.shape == ((3, 37) if need[0] else (0,))
    assert grad_pose.shape == ((3, 9) if need[1] else (0,))


@pytest.mark.parametrize("batch", [0, 1, 3, 300])
def test_blend_backward_batch_sizes_and_no_pose(ops, device, batch):
    _, dirs, _, _, _ = blend_inputs(batch, N, 37, 0, torch.float64, device)
    grad_out = torch.randn(batch, N, dtype=torch.float64, device=device)
    grad_coeffs, grad_pose = ops.blend_backward(
        grad_out, dirs, dirs.new_empty((0, N)), True, True
    )
    _assert_adjoint_close(grad_coeffs, grad_out, dirs)
    assert grad_pose.shape == (batch, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,p", [(37, 9), (32, 0), (300, 36)])
def test_blend_backward_one_sample_rows_match_the_column_blocks(ops, dtype, k, p):
    """A group of one sample (the 17th of B = 17) reads whole rows of dirs; two samples
    take the column blocks. The chunks depend on the sizes only, not on B, so sample 16's
    gradient is the same bits either way: K with and without the masked tail vector, N
    over several 64-row blocks."""
    _, dirs, _, pose_dirs, _ = blend_inputs(17, N, k, p, dtype, "cpu")
    if pose_dirs is None:
        pose_dirs = dirs.new_empty((0, N))
    grad_out = torch.randn(17, N, dtype=dtype)
    one = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    two = ops.blend_backward(grad_out[15:17].contiguous(), dirs, pose_dirs, True, True)
    assert torch.equal(one[0][16], two[0][1]) and torch.equal(one[1][16], two[1][1])
    _assert_adjoint_close(one[0], grad_out, dirs)


def test_blend_backward_degenerate_sizes(ops, device):
    # N = 0: the sums are empty, so the gradients are zero.
    grad_out = torch.randn(3, 0, dtype=torch.float64, device=device)
    grad_coeffs, grad_pose = ops.blend_backward(
        grad_out, grad_out.new_empty((0, 7)), grad_out.new_empty((2, 0)), True, True
    )
    assert torch.equal(grad_coeffs, grad_out.new_zeros((3, 7)))
    assert torch.equal(grad_pose, grad_out.new_zeros((3, 2)))


# ---------------------------------------------------------------------------------------
# Autograd


def _gradcheck_inputs(batch, base_kind, p=3, k=11, n=13):
    args = blend_inputs(batch, n, k, p, torch.float64, "cpu", base_kind=base_kind)
    return [None if a is None else a.detach().clone().requires_grad_() for a in args]


@pytest.mark.parametrize("batch", [3, 20])  # one and two sample groups (cuBLAS on a GPU)
@pytest.mark.parametrize("base_kind", ["flat", "shared", "batched"])
def test_blend_gradcheck(ops, device, batch, base_kind):
    inputs = [None if a is None else a.to(device).detach().requires_grad_()
              for a in _gradcheck_inputs(batch, base_kind)]
    assert torch.autograd.gradcheck(_blend_mod().blend, inputs)


@pytest.mark.parametrize("batch", [3, 20])
def test_blend_gradgradcheck(ops, device, batch):
    inputs = [a.to(device).detach().requires_grad_() for a in _gradcheck_inputs(batch, "shared")]
    assert torch.autograd.gradgradcheck(_blend_mod().blend, inputs)


def test_blend_gradcheck_without_pose_and_partial_requires_grad(ops, device):
    base, dirs, coeffs, _, _ = _gradcheck_inputs(3, "shared", p=0)
    base, dirs, coeffs = (a.to(device).detach() for a in (base, dirs, coeffs))
    coeffs.requires_grad_()
    blend = _blend_mod().blend
    assert torch.autograd.gradcheck(lambda c: blend(base, dirs, c), (coeffs,))
    assert torch.autograd.gradgradcheck(lambda c: blend(base, dirs, c), (coeffs,))
    # Only base: no kernel call in backward.
    base.requires_grad_()
    assert torch.autograd.gradcheck(lambda b: blend(b, dirs, coeffs.detach()), (base,))


def test_blend_backward_gradcheck(ops, device):
    """The backward op differentiated directly, with each output asked for or not."""
    _, dirs, _, pose_dirs, _ = _gradcheck_inputs(3, "shared")
    grad_out = torch.randn(3, dirs.shape[0], dtype=torch.float64, device=device, requires_grad=True)
    dirs = dirs.to(device).detach().requires_grad_()
    pose_dirs = pose_dirs.to(device).detach().requires_grad_()
    for need in [(True, True), (True, False), (False, True)]:

        def first_only(g, d, pd, need=need):
            gc, gp = ops.blend_backward(g, d, pd, *need)
            return gc if need[0] else gp

        assert torch.autograd.gradcheck(first_only, (grad_out, dirs, pose_dirs))
        assert torch.autograd.gradgradcheck(first_only, (grad_out, dirs, pose_dirs))


def test_blend_grad_matches_reference_autograd(ops, device, dtype):
    """float32 gradients of the op vs autograd through the reference, on decoder-like sizes."""
    args = blend_inputs(5, N, 37, 9, dtype, device)
    ours = [a.detach().clone().requires_grad_() for a in args]
    theirs = [a.detach().double().requires_grad_() for a in args]
    weight = torch.randn(5, N, dtype=torch.float64)
    (_blend_mod().blend(*ours).double() * weight.to(device)).sum().backward()
    (reference.blend(*theirs) * weight.to(device)).sum().backward()
    # Each gradient is a sum of at most N products of O(1) terms: N * eps relative to the
    # sum of magnitudes, which for randn data is ~sqrt(N) times the value: rtol below.
    rtol = 2e-4 if dtype == torch.float32 else 1e-10
    for mine, exact in zip(ours, theirs):
        torch.testing.assert_close(mine.grad.double(), exact.grad, rtol=rtol, atol=rtol * 10)


# ---------------------------------------------------------------------------------------
# Registrations


def test_opcheck(ops, device):
    for batch, p in [(3, 4), (20, 4), (3, 0)]:
        base, dirs, coeffs, pose_dirs, pose_coeffs = _gradcheck_inputs(batch, "shared", p=p)
        if pose_dirs is None:
            pose_dirs = torch.empty(0, dirs.shape[0], dtype=torch.float64)
            pose_coeffs = torch.empty(batch, 0, dtype=torch.float64)
        args = [a.to(device).detach() for a in (base, dirs, coeffs, pose_dirs, pose_coeffs)]
        torch.library.opcheck(ops.blend.default, tuple(args))
        with_grad = [a.clone().requires_grad_() for a in args]
        torch.library.opcheck(ops.blend.default, tuple(with_grad))
        grad_out = torch.randn(batch, dirs.shape[0], dtype=torch.float64, device=device)
        for need in [(True, True), (True, False), (False, False)]:
            torch.library.opcheck(ops.blend_backward.default, (grad_out, args[1], args[3], *need))
        torch.library.opcheck(
            ops.blend_backward.default,
            (grad_out.clone().requires_grad_(), with_grad[1], with_grad[3], True, True),
        )


def test_torch_compile_fullgraph(ops, device):
    blend = _blend_mod().blend
    base, dirs, coeffs, pose_dirs, pose_coeffs = (
        a.to(device) for a in blend_inputs(3, N, 37, 9, torch.float32, device)
    )

    def fn(base, dirs, coeffs, pose_dirs, pose_coeffs):
        return (blend(base, dirs, coeffs, pose_dirs, pose_coeffs) * 2).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    c1 = coeffs.clone().requires_grad_()
    c2 = coeffs.clone().requires_grad_()
    p1 = pose_coeffs.clone().requires_grad_()
    p2 = pose_coeffs.clone().requires_grad_()
    eager = fn(base, dirs, c1, pose_dirs, p1)
    traced = compiled(base, dirs, c2, pose_dirs, p2)
    torch.testing.assert_close(traced, eager)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(c2.grad, c1.grad)
    torch.testing.assert_close(p2.grad, p1.grad)
    # No pose: the wrapper builds the empty tensors inside the graph.
    compiled_no_pose = torch.compile(
        lambda b, d, c: blend(b, d, c), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled_no_pose(base, dirs, coeffs), blend(base, dirs, coeffs))


# ---------------------------------------------------------------------------------------
# Bad input


def test_blend_argument_errors(ops, device):
    blend = _blend_mod().blend
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(3, 10, 4, 2, torch.float32, device)
    with pytest.raises(TypeError, match="coeffs must be a torch.Tensor"):
        blend(base, dirs, [[1.0] * 4] * 3)
    with pytest.raises(TypeError, match="coeffs must be float32 or float64"):
        blend(base, dirs, coeffs.to(torch.int64))
    with pytest.raises(ValueError, match="coeffs must have 2 dimensions"):
        blend(base, dirs, coeffs[0])
    with pytest.raises(ValueError, match=r"dirs must have shape .*4.*got \(10, 3\)"):
        blend(base, dirs[:, :3], coeffs)
    with pytest.raises(ValueError, match="dirs must have 2 dimensions"):
        blend(base, dirs[None], coeffs)
    with pytest.raises(TypeError, match="dirs has dtype torch.float64 but coeffs"):
        blend(base, dirs.double(), coeffs)
    with pytest.raises(ValueError, match="dirs is on meta but coeffs"):
        blend(base, dirs.to("meta"), coeffs)
    with pytest.raises(ValueError, match=r"base must have shape \(10,\), \(1, 10\) or \(3, 10\)"):
        blend(base[:, :9], dirs, coeffs)
    with pytest.raises(ValueError, match="base must have shape"):
        blend(torch.randn(2, 10, device=device), dirs, coeffs)
    with pytest.raises(ValueError, match="base must have shape"):
        blend(torch.randn(1, 1, 10, device=device), dirs, coeffs)
    with pytest.raises(TypeError, match="base has dtype torch.float64"):
        blend(base.double(), dirs, coeffs)
    with pytest.raises(ValueError, match="given together"):
        blend(base, dirs, coeffs, pose_dirs)
    with pytest.raises(ValueError, match="given together"):
        blend(base, dirs, coeffs, pose_coeffs=pose_coeffs)
    with pytest.raises(ValueError, match=r"pose_dirs must have shape .*10.*got \(2, 9\)"):
        blend(base, dirs, coeffs, pose_dirs[:, :9], pose_coeffs)
    with pytest.raises(ValueError, match=r"pose_coeffs must have shape \(3, 2\)"):
        blend(base, dirs, coeffs, pose_dirs, pose_coeffs[:, :1])
    with pytest.raises(ValueError, match=r"pose_coeffs must have shape \(3, 2\)"):
        blend(base, dirs, coeffs, pose_dirs, pose_coeffs[:2])
    with pytest.raises(TypeError, match="pose_coeffs has dtype"):
        blend(base, dirs, coeffs, pose_dirs, pose_coeffs.double())


def test_kernels_check_their_inputs(ops):
    """Direct torch.ops calls (no wrapper) get a RuntimeError, never a crash."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(3, 10, 4, 2, torch.float32, "cpu")
    bad_calls = [
        lambda: ops.blend(base, dirs[:, :3], coeffs, pose_dirs, pose_coeffs),
        lambda: ops.blend(base[:, :9], dirs, coeffs, pose_dirs, pose_coeffs),
        lambda: ops.blend(base, dirs, coeffs, pose_dirs[:, :9], pose_coeffs),
        lambda: ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs[:, :1]),
        lambda: ops.blend(base, dirs, coeffs, pose_dirs[:0], pose_coeffs),
        lambda: ops.blend(base, dirs, coeffs.double(), pose_dirs, pose_coeffs),
        lambda: ops.blend(base, dirs, coeffs.long(), pose_dirs, pose_coeffs),
        lambda: ops.blend_backward(torch.randn(3, 9), dirs, pose_dirs, True, True),
        lambda: ops.blend_backward(torch.randn(3, 10), dirs, pose_dirs[:, :9], True, True),
        lambda: ops.blend_backward(
            torch.randn(3, 10, dtype=torch.float64), dirs, pose_dirs, True, True
        ),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()


# ---------------------------------------------------------------------------------------
# NaN / inf


@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_nan_propagates(ops, device, dtype, batch):
    blend = _blend_mod().blend
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(batch, N, 37, 9, dtype, device)
    coeffs = coeffs.clone()
    coeffs[1, 36] = float("nan")  # the last column: inside the masked tail vector
    out = blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
    assert bool(out[1].isnan().all())
    assert not bool(out[0].isnan().any()) and not bool(out[2].isnan().any())

    dirs = dirs.clone()
    dirs[300, 0] = float("nan")
    out = blend(base, dirs, coeffs.nan_to_num(), pose_dirs, pose_coeffs)
    assert bool(out[:, 300].isnan().all())
    assert int(out.isnan().sum()) == batch

    pose_dirs = pose_dirs.clone()
    pose_dirs[2, 612] = float("nan")  # the last row: the scalar tail of the pose loop
    out = blend(base, dirs.nan_to_num(), coeffs.nan_to_num(), pose_dirs, pose_coeffs)
    assert bool(out[:, 612].isnan().all()) and int(out.isnan().sum()) == batch

    grad_out = torch.randn(batch, N, dtype=dtype, device=device)
    grad_out[0, 5] = float("nan")
    grad_coeffs, grad_pose = ops.blend_backward(
        grad_out, dirs.nan_to_num(), pose_dirs.nan_to_num(), True, True
    )
    assert bool(grad_coeffs[0].isnan().all()) and bool(grad_pose[0].isnan().all())
    assert not bool(grad_coeffs[1:].isnan().any()) and not bool(grad_pose[1:].isnan().any())


@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_inf_stays_inf_in_the_tail(ops, device, dtype, batch):
    """An inf in the columns that the masked tail vector re-reads must not become NaN."""
    gen = torch.Generator().manual_seed(3)
    k = 37  # float32: vectors at 0, 16, then the masked one at 21 (lanes 21..31 zeroed)
    dirs = torch.rand(N, k, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    coeffs = torch.rand(batch, k, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    base = torch.rand(N, dtype=dtype, device=device)
    dirs[7, 25] = float("inf")
    coeffs[0, 30] = float("inf")
    out = _blend_mod().blend(base, dirs, coeffs)
    assert not bool(out.isnan().any())
    assert bool((out[:, 7] == float("inf")).all()) and bool((out[0] == float("inf")).all())

    grad_out = torch.rand(batch, N, generator=gen, dtype=torch.float64)
    grad_out = grad_out.to(dtype=dtype, device=device)
    grad_coeffs, _ = ops.blend_backward(grad_out, dirs, dirs.new_empty((0, N)), True, False)
    assert not bool(grad_coeffs.isnan().any())
    assert bool((grad_coeffs[:, 25] == float("inf")).all())
    assert bool(grad_coeffs[:, :25].isfinite().all())


# ---------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_deterministic(ops, device, batch):
    args = blend_inputs(batch, 3000, 100, 36, torch.float32, device)
    base, dirs, coeffs, pose_dirs, pose_coeffs = args
    grad_out = torch.randn(batch, 3000, device=device)
    first = ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
    first_grads = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    for _ in range(3):
        assert torch.equal(ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs), first)
        grads = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
        assert torch.equal(grads[0], first_grads[0]) and torch.equal(grads[1], first_grads[1])


@pytest.mark.parametrize("batch", [3, 17, 70])
def test_any_batch_is_independent_of_thread_count(ops, batch):
    """The hand loops reduce over fixed row chunks and sample groups, not per-thread ones:
    one group with 63 chunks, two groups with 32, five with 12 (row tails everywhere)."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(
        batch, 20000, 100, 36, torch.float32, "cpu")
    grad_out = torch.randn(batch, 20000)
    results = per_thread_count(
        lambda: (ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs),)
        + tuple(ops.blend_backward(grad_out, dirs, pose_dirs, True, True)))
    _assert_blend_close(results[0][0], base, dirs, coeffs, pose_dirs, pose_coeffs)
    _assert_adjoint_close(results[0][1], grad_out, dirs)
    _assert_adjoint_close(results[0][2], grad_out, pose_dirs.mT)
    assert_same_bits(results)


@pytest.mark.parametrize("batch", [2, 15, 18, 33, 47])
@pytest.mark.parametrize("k,p", [(0, 9), (37, 0), (37, 9), (100, 36)])
def test_blend_every_tile_remainder(ops, device, dtype, batch, k, p):
    """Batches that end a sample group (16) with each remainder of the sample tiles (1 to 3
    of 4, 1 of 2), N = 613 (row tiles of 4 with a tail), K = 0 and P = 0: forward and
    both gradients against the reference."""
    args = blend_inputs(batch, N, k, p, dtype, device)
    _assert_blend_close(_blend_mod().blend(*args), *args)
    _, dirs, _, pose_dirs, _ = args
    if pose_dirs is None:
        pose_dirs = dirs.new_empty((0, N))
    grad_out = torch.randn(batch, N, dtype=torch.float64).to(dtype=dtype, device=device)
    grad_coeffs, grad_pose = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    assert grad_coeffs.shape == (batch, k) and grad_pose.shape == (batch, p)
    _assert_adjoint_close(grad_coeffs, grad_out, dirs)
    _assert_adjoint_close(grad_pose, grad_out, pose_dirs.mT)


# ---------------------------------------------------------------------------------------
# Instruction-set variants of the CPU hand loops

# Settings read once per process are tested in a subprocess: this preamble loads this
# test module there as `t` (its helpers and sizes), then the case's script runs.
_SUBPROCESS_PREAMBLE = r"""
import importlib.util, os, sys, torch
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # the tests' helper modules
from flame_ext import _ops
assert _ops.available(), _ops.load_error()
spec = importlib.util.spec_from_file_location("t", sys.argv[1])
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
ops = torch.ops.flame_ext
"""


def _run_in_subprocess(script: str, **env_settings: str) -> None:
    """Runs the preamble and script in a fresh interpreter with these environment
    settings; asserts it printed "ok"."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, **env_settings)
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_PREAMBLE + script, __file__],
        env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


_ISA_SCRIPT = r"""
for dtype in (torch.float32, torch.float64):
    for n in t.STRIP_ROWS:
        for k, p in ((3, 2), (150, 9)):
            args = t.blend_inputs(21, n, k, p, dtype, "cpu")
            t._assert_blend_close(ops.blend(*args), *args)
    for k in (5, 16, 37, 100):
        for batch in (1, 2, 3, 18, 37):
            args = t.blend_inputs(batch, t.N, k, 9, dtype, "cpu")
            t._assert_blend_close(ops.blend(*args), *args)
            grad_out = torch.randn(batch, t.N, dtype=dtype)
            grad_coeffs, grad_pose = ops.blend_backward(grad_out, args[1], args[3], True, True)
            t._assert_adjoint_close(grad_coeffs, grad_out, args[1])
            t._assert_adjoint_close(grad_pose, grad_out, args[3].mT)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_isa_variants(ops, isa):
    """The AVX2 and baseline builds of the hand loops (this machine picks its widest one)."""
    _run_in_subprocess(_ISA_SCRIPT, FLAME_EXT_CPU_ISA=isa)


_BLAS_SCRIPT = r"""
for dtype in (torch.float32, torch.float64):
    for batch in (3, 4, 9):
        for k, p in ((37, 9), (37, 0), (0, 9)):
            args = t.blend_inputs(batch, t.N, k, p, dtype, "cpu")
            t._assert_blend_close(t._blend_mod().blend(*args), *args)
            grad_out = torch.randn(batch, t.N, dtype=dtype)
            pose_dirs = args[3] if args[3] is not None else args[1].new_empty((0, t.N))
            grad_coeffs, grad_pose = ops.blend_backward(grad_out, args[1], pose_dirs, True, True)
            t._assert_adjoint_close(grad_coeffs, grad_out, args[1])
            t._assert_adjoint_close(grad_pose, grad_out, pose_dirs.mT)
args = t.blend_inputs(*t.HUGE_CASE, torch.float32, "cpu")
out = t._blend_mod().blend(*args)
t._assert_blend_close(out, *args)
t.assert_huge_page_output(out)
print("ok")
"""


@pytest.mark.parametrize("setting", ["4", "0", "not a number"])
def test_blas_batch_setting(ops, setting):
    """$FLAME_EXT_BLEND_BLAS_BATCH=4 sends batches of 4 and more to BLAS (read once per
    process, hence the subprocess); 0 or a value that is not a positive integer leaves every
    batch to the hand loops. Both answer the reference."""
    _run_in_subprocess(_BLAS_SCRIPT, FLAME_EXT_BLEND_BLAS_BATCH=setting)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_cuda_graph_capture(ops, batch):
    """No host-device synchronisation in forward or backward: both capture into a graph."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(batch, N, 37, 9, torch.float32, "cuda")
    grad_out = torch.randn(batch, N, device="cuda")
    expected = ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
    expected_grads = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
        ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
        grads = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert torch.equal(grads[0], expected_grads[0]) and torch.equal(grads[1], expected_grads[1])


# ---------------------------------------------------------------------------------------
# Properties: any shapes, layouts and values give the reference's answer


@st.composite
def blend_cases(draw):
    batch = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 9, 17, 33]))  # tile and group remainders
    return dict(
        batch=batch,
        n=draw(st.integers(0, 70)),
        k=draw(st.integers(0, 40)),
        p=draw(st.sampled_from([None, 0, 1, 9, 36])),
        base_kind=draw(st.sampled_from(["flat", "shared", "batched"])),
        dtype=draw(dtypes),
        seed=draw(seeds),
        layouts=draw(st.lists(layouts, min_size=5, max_size=5)),
        inject=draw(st.lists(specials, min_size=5, max_size=5)),
        grad=draw(st.booleans()),
    )


def make_blend(case, device):
    b, n, kk, p = case["batch"], case["n"], case["k"], case["p"]
    base_shape = {"flat": (n,), "shared": (1, n), "batched": (b, n)}[case["base_kind"]]
    shapes = [base_shape, (n, kk), (b, kk), (p or 0, n), (b, p or 0)]
    args = []
    for i, shape in enumerate(shapes):
        x = random_values(case["seed"] + i, shape, inject=case["inject"][i])
        args.append(lay_out(x.to(case["dtype"]), case["layouts"][i], device))
    if p is None:
        args[3] = args[4] = None
    return args


@given(case=blend_cases())
def test_blend_any_input_matches_reference(ops, device, case):
    needs_kernels(device, "blend")
    base, dirs, coeffs, pose_dirs, pose_coeffs = make_blend(case, device)
    grad = case["grad"]
    leaves = [x.detach().requires_grad_(grad) if x is not None else None for x in
              (base, dirs, coeffs, pose_dirs, pose_coeffs)]
    out = _blend_mod().blend(*leaves)
    assert out.dtype == case["dtype"] and out.device == coeffs.device
    exact = reference.blend(*map(d64, leaves))
    magnitude = reference.blend(*map(a64, leaves))
    terms = case["k"] + (case["p"] or 0) + 1
    assert_matches(out, exact, magnitude, terms, "blend")
    if not grad or out.numel() == 0:
        return
    g = random_values(case["seed"] + 9, out.shape).to(out)
    got = torch.autograd.grad(out, [x for x in leaves if x is not None], g, allow_unused=True)
    ref_leaves = [d64(x).requires_grad_(True) if x is not None else None for x in leaves]
    want = torch.autograd.grad(
        reference.blend(*ref_leaves), [x for x in ref_leaves if x is not None], d64(g)
    )
    abs_leaves = [a64(x).requires_grad_(True) if x is not None else None for x in leaves]
    mags = torch.autograd.grad(
        reference.blend(*abs_leaves), [x for x in abs_leaves if x is not None], a64(g)
    )
    # Each gradient sums over the batch and / or the N rows.
    terms = max(case["batch"], case["n"], 1) + 1
    for name, a, e, m in zip(["base", "dirs", "coeffs", "pose_dirs", "pose_coeffs"], got, want, mags):
        assert_matches(a, e, m, terms, f"grad {name}")


@pytest.mark.parametrize("name", ["base", "dirs", "coeffs", "pose_dirs", "pose_coeffs"])
@given(how=st.sampled_from(CORRUPTIONS), variant=st.integers(0, 11))
def test_blend_bad_argument_is_named(ops, device, name, how, variant):
    assert_bad_argument_is_named(_blend_mod().blend, "blend", name, how, variant, device)


# ---------------------------------------------------------------------------------------
# Scale, determinism, agreement across devices


@pytest.mark.slow
def test_blend_reads_past_2_31(ops, device, nondeterministic_mode):
    """Forward: dirs (N, K) of 2.16e9 elements (row offset n * K past 2^31, batch 1 so
    the output stays small). Backward: grad_out (B, N) with B * N past 2^31 (the hand
    loop's sample offset s * N), dirs (N, 1)."""
    needs_kernels(device, "blend")
    n, k = 5_400_000, 400
    assert (n - 1) * k > 2**31
    dirs = big_zeros((n, k), F32, device)
    dirs[-1] = torch.arange(float(k))
    dirs[0] = 1.0
    out = ops.blend(torch.zeros(n, device=device), dirs, torch.ones(1, k, device=device),
                    torch.empty(0, n, device=device), torch.empty(1, 0, device=device))
    assert out[0, -1].item() == k * (k - 1) / 2 and out[0, 0].item() == k
    assert int(torch.count_nonzero(out)) == 2
    del dirs, out

    batch, n = 4, 720_000_000  # the CPU hand loop (cuBLAS takes larger batches on a GPU)
    assert (batch - 1) * n > 2**31
    grad_out = big_zeros((batch, n), F32, device)
    grad_out[-1, -1] = 2.0
    grad_out[0, -1] = 5.0
    dirs = big_zeros((n, 1), F32, device)
    dirs[-1] = 3.0
    grad_coeffs, _ = ops.blend_backward(grad_out, dirs, torch.empty(0, n, device=device),
                                        True, False)
    torch.testing.assert_close(grad_coeffs.cpu(), torch.tensor([[15.0], [0.0], [0.0], [6.0]]))


def _determinism_cases(device, dtype):
    """(name, function of leaves, leaves) over sizes that take each path: several
    reduction chunks, empty dimensions, one and several sample groups (cuBLAS on a GPU)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype).requires_grad_(True)

    blend = _blend_mod().blend
    cases = []
    for batch in (0, 3, 40):
        cases.append((f"blend B={batch}", blend,
                      [rand(1, 613), rand(613, 37), rand(batch, 37), rand(9, 613), rand(batch, 9)]))
    cases.append(("blend N=0", blend, [rand(0), rand(0, 5), rand(3, 5)]))
    cases.append(("blend K=0", blend, [rand(50), rand(50, 0), rand(3, 0)]))
    return cases


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_blend_deterministic_and_fully_written(ops, device, dtype, deterministic):
    """Under torch.use_deterministic_algorithms(True) (the cuBLAS path is not taken there)
    every case runs, repeats bit for bit, and writes every output element."""
    needs_kernels(device, "blend")
    assert_deterministic_and_fully_written(_determinism_cases(device, dtype))


def test_blend_results_do_not_depend_on_the_thread_count(ops):
    """Every reduction of the kernels runs over fixed chunks in a fixed order, so 1 and 2
    threads give the same bits at every batch size: the output and the gradients of
    coeffs, pose_coeffs and base. Not covered, because they are not the kernels': the
    gradients of the tables dirs and pose_dirs (torch matrix products over the batch,
    whose blocking may follow the thread count: MKL on AMD EPYC does)."""
    cases = []
    for name, fn, leaves in _determinism_cases("cpu", F32):
        if name.startswith("blend B="):
            base, dirs, coeffs, pose_dirs, pose_coeffs = leaves
            leaves = [base, dirs.detach(), coeffs, pose_dirs.detach(), pose_coeffs]
        cases.append((name, fn, leaves))
    assert_independent_of_thread_count(cases)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [3, LARGE_BATCH])
def test_blend_cuda_float32_matches_cpu(ops, batch):
    """float32 on one GPU against the CPU kernels, forward and backward, through both
    paths of the GPU's (hand kernels at B <= 16, cuBLAS above; hand loops at every B on the
    CPU): within the rounding of two float32 sums of the same terms."""
    needs_kernels("cuda", "blend")
    args = blend_inputs(batch, N, 37, 9, F32, "cpu", seed=11)
    base, dirs, coeffs, pose_dirs, pose_coeffs = args
    grad_out = torch.randn(batch, N, generator=torch.Generator().manual_seed(12))
    on_gpu = [a.cuda() for a in args]
    magnitude = reference.blend(*map(a64, args))
    want = ops.blend(*args)
    assert_matches(ops.blend(*on_gpu), d64(want), magnitude, 2 * (37 + 9 + 1), "blend")
    got = ops.blend_backward(grad_out.cuda(), on_gpu[1], on_gpu[3], True, True)
    want = ops.blend_backward(grad_out, dirs, pose_dirs, True, True)
    # grad_coeffs = grad_out @ dirs, grad_pose_coeffs = grad_out @ pose_dirs^T: N terms
    magnitudes = (a64(grad_out) @ a64(dirs), a64(grad_out) @ a64(pose_dirs).mT)
    for name, a, b, m in zip(("grad_coeffs", "grad_pose_coeffs"), got, want, magnitudes):
        assert_matches(a, d64(b), m, 2 * (N + 1), name)
