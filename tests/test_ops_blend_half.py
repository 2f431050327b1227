"""Tests of the blend ops over a half-precision dirs: float16 or bfloat16 storage, every
other argument float32 or float64 (FlameTex(basis_dtype=...)'s basis, read by the kernels).

The kernels widen each stored value exactly and then run the loops of the other
arguments' dtype, so the oracle is strict: every one of the 65536 bit patterns of each
format widens to the value torch gives it (NaN to NaN), and on random inputs the results
are bit for bit those of the same op on the widened table (itself tested against the
float64 reference in test_ops_blend.py), on every path of the CPU loops (dot tiles and
k-major strips, contiguous rows and column slices, pose correctives or none, every
instruction-set build, any thread count). Then float64 gradcheck / gradgradcheck through
a half dirs, opcheck, the argument errors, and on a GPU the CUDA kernels against the
float64 reference and (the hand kernels) the bits of the widened table.
"""

import pytest
import torch

from _oracle import assert_matches, assert_same_bits, needs_kernels, per_thread_count
from _samples import F32, F64, blend_inputs

HALF = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
N = 613  # three forward chunks of 256 rows with a tail


def _every_value(half, device, finite=False, columns=64):
    """(2^16 / columns, columns): every bit pattern of the format once; with finite=True
    the infinities and NaNs replaced by 1."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(half).reshape(-1, columns)
    if finite:
        values = torch.where(values.float().isfinite(), values, torch.ones_like(values))
    return values.to(device)


def _half_inputs(batch, n, k, p, half, dtype, device, layout="slice", seed=0,
                 base_kind="shared"):
    """blend_inputs with dirs stored as `half`: a column slice of a wider half matrix
    (row stride k + 8), or contiguous rows."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = blend_inputs(batch, n, k, p, dtype, device,
                                                              seed=seed, base_kind=base_kind)
    if layout == "slice":
        wide = torch.randn(n, k + 8, generator=torch.Generator().manual_seed(seed + 1))
        dirs = wide.to(device=device, dtype=half)[:, 3:3 + k]
    else:
        dirs = dirs.to(half).contiguous()
    if pose_dirs is None:
        pose_dirs, pose_coeffs = coeffs.new_empty((0, n)), coeffs.new_empty((batch, 0))
    return base, dirs, coeffs, pose_dirs, pose_coeffs


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("batch", [1, 20])  # dot tiles; k-major strips
@pytest.mark.parametrize("layout", ["contiguous", "slice"])
@pytest.mark.parametrize("columns", [64, 1])  # vectors of a row; one value per row
def test_every_half_value_is_widened_exactly(ops, device, half, batch, layout, columns):
    """Contiguous rows are widened as one run of vectors; a column slice row by row, so
    with one column every value takes the scalar widening of a row's tail."""
    values = _every_value(half, device, columns=columns)
    dirs = values if layout == "contiguous" else \
        torch.cat([values, values], 1)[:, :columns]  # the same values, row stride 2 columns
    rows, k = dirs.shape
    # sample b reads column b % k of every row: out[b, n] = dirs[n, b % k] + 0, or NaN
    # where another value of the row is infinite or NaN (0 * inf), as float64 has it
    coeffs = torch.zeros(batch, k, device=device)
    coeffs[torch.arange(batch), torch.arange(batch) % k] = 1.0
    out = ops.blend(torch.zeros(rows, device=device), dirs, coeffs,
                    coeffs.new_empty((0, rows)), coeffs.new_empty((batch, 0)))
    want = (coeffs.double() @ dirs.double().T).float()
    assert out.dtype == F32
    same = (out == want) | (out.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} values widened wrongly"
    # grad_coeffs[b, k] = sum over n of grad_out[b, n] dirs[n, k] with one 1 per row of
    # grad_out: the value of row b, exactly (finite values only: 0 * inf is NaN)
    finite = _every_value(half, device, finite=True, columns=columns)
    grad_out = torch.zeros(batch, rows, device=device)
    grad_out[torch.arange(batch), torch.arange(batch) * 37 % rows] = 1.0
    grad_coeffs, _ = ops.blend_backward(grad_out, finite, finite.new_empty((0, rows)).float(),
                                        True, False)
    assert torch.equal(grad_coeffs, finite.float()[torch.arange(batch) * 37 % rows])


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("k,p", [(5, 0), (50, 9), (100, 36), (0, 9)])
@pytest.mark.parametrize("layout, base_kind", [("contiguous", "flat"), ("slice", "shared"),
                                               ("slice", "batched")])
def test_half_dirs_give_the_bits_of_the_widened_table(ops, half, dtype, batch, k, p, layout,
                                                      base_kind):
    """CPU: forward and both gradients equal the op on dirs.to(dtype), bit for bit."""
    base, dirs, coeffs, pose_dirs, pose_coeffs = _half_inputs(batch, N, k, p, half, dtype,
                                                              "cpu", layout,
                                                              base_kind=base_kind)
    widened = dirs.to(dtype)
    out = ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs)
    assert out.dtype == dtype
    assert torch.equal(out, ops.blend(base, widened, coeffs, pose_dirs, pose_coeffs))
    grad_out = torch.randn(batch, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    for need in ((True, True), (True, False), (False, True)):
        got = ops.blend_backward(grad_out, dirs, pose_dirs, *need)
        want = ops.blend_backward(grad_out, widened, pose_dirs, *need)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), need


def test_half_dirs_at_texture_size(ops):
    """FlameTex's shape (K = 50, rows over the 4 MiB strip threshold) at B = 1, 17, 64."""
    gen = torch.Generator().manual_seed(3)
    n, k = 40000, 50
    dirs = (torch.randn(n, k, generator=gen) * 0.1).to(torch.float16)
    base = torch.rand(n, generator=gen)
    for batch in (1, 17, 64):
        coeffs = torch.randn(batch, k, generator=gen)
        empty_pose, empty_coeffs = coeffs.new_empty((0, n)), coeffs.new_empty((batch, 0))
        out = ops.blend(base, dirs, coeffs, empty_pose, empty_coeffs)
        assert torch.equal(out, ops.blend(base, dirs.float(), coeffs, empty_pose, empty_coeffs))


@pytest.mark.parametrize("half", HALF)
def test_half_dirs_are_independent_of_thread_count(ops, half):
    base, dirs, coeffs, pose_dirs, pose_coeffs = _half_inputs(40, 20000, 100, 36, half, F32,
                                                              "cpu")
    grad_out = torch.randn(40, 20000, generator=torch.Generator().manual_seed(2))
    assert_same_bits(per_thread_count(
        lambda: (ops.blend(base, dirs, coeffs, pose_dirs, pose_coeffs),)
        + tuple(ops.blend_backward(grad_out, dirs, pose_dirs, True, True))))


# Run by test_ops_blend's subprocess helper (its preamble loads that module as `t`); this
# module is loaded as `h`.
_ISA_SCRIPT = r"""
spec = importlib.util.spec_from_file_location(
    "h", os.path.join(os.path.dirname(sys.argv[1]), "test_ops_blend_half.py"))
h = importlib.util.module_from_spec(spec)
spec.loader.exec_module(h)
for half in (torch.float16, torch.bfloat16):
    for columns in (64, 1):
        values = h._every_value(half, "cpu", columns=columns)
        rows = values.shape[0]
        for dirs in (values, torch.cat([values, values], 1)[:, :columns]):
            for batch in (1, 20):
                coeffs = torch.zeros(batch, columns)
                coeffs[torch.arange(batch), torch.arange(batch) % columns] = 1.0
                out = ops.blend(torch.zeros(rows), dirs, coeffs, torch.empty(0, rows),
                                torch.empty(batch, 0))
                want = (coeffs.double() @ dirs.double().T).float()
                assert bool(((out == want) | (out.isnan() & want.isnan())).all()), half
    for batch, k, p, layout in ((3, 37, 9, "slice"), (21, 50, 0, "contiguous"),
                                (21, 100, 9, "slice")):
        args = h._half_inputs(batch, h.N, k, p, half, torch.float32, "cpu", layout)
        widened = (args[0], args[1].float()) + args[2:]
        assert torch.equal(ops.blend(*args), ops.blend(*widened))
        grad_out = torch.randn(batch, h.N)
        for a, b in zip(ops.blend_backward(grad_out, args[1], args[3], True, True),
                        ops.blend_backward(grad_out, widened[1], args[3], True, True)):
            assert torch.equal(a, b)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_half_dirs_cpu_isa_variants(ops, isa):
    """The widening of the AVX2 and baseline builds (AVX-512 converts float16 with its own
    instruction; the others by the bits)."""
    from test_ops_blend import _run_in_subprocess

    _run_in_subprocess(_ISA_SCRIPT, FLAME_EXT_CPU_ISA=isa)


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("batch", [3, 20])  # one and two sample groups (cuBLAS on a GPU)
def test_half_dirs_gradcheck(ops, device, half, batch):
    """float64 everywhere but the stored dirs, which is a constant here."""
    needs_kernels(device, "blend")
    from flame_ext._ops import blend

    base, dirs, coeffs, pose_dirs, pose_coeffs = _half_inputs(batch, 13, 11, 3, half, F64,
                                                              device)
    leaves = [x.clone().requires_grad_(True) for x in (base, coeffs, pose_dirs, pose_coeffs)]

    def fn(b, c, pd, pc):
        return blend.blend(b, dirs, c, pd, pc)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("half", HALF)
def test_a_trainable_half_dirs_gets_its_gradient(ops, device, half):
    needs_kernels(device, "blend")
    from flame_ext._ops import blend

    base, dirs, coeffs, pose_dirs, pose_coeffs = _half_inputs(4, 29, 6, 2, half, F32, device)
    dirs = dirs.detach().clone().requires_grad_(True)
    grad_out = torch.randn(4, 29, generator=torch.Generator().manual_seed(9)).to(device)
    (grad,) = torch.autograd.grad(blend.blend(base, dirs, coeffs, pose_dirs, pose_coeffs),
                                  dirs, grad_out)
    assert grad.dtype == half
    assert torch.equal(grad, (grad_out.mT @ coeffs).to(half))


@pytest.mark.parametrize("half", HALF)
def test_half_dirs_opcheck(ops, device, half):
    needs_kernels(device, "blend")
    for batch in (3, 20):
        base, dirs, coeffs, pose_dirs, pose_coeffs = _half_inputs(batch, 37, 7, 3, half, F32,
                                                                  device)
        coeffs.requires_grad_(True)
        torch.library.opcheck(ops.blend.default, (base, dirs, coeffs, pose_dirs, pose_coeffs))
        grad_out = torch.randn(batch, 37, device=device, requires_grad=True)
        torch.library.opcheck(ops.blend_backward.default,
                              (grad_out, dirs, pose_dirs, True, True))


def test_half_dirs_argument_errors(ops):
    from flame_ext._ops import blend

    base, dirs, coeffs, pose_dirs, pose_coeffs = _half_inputs(3, 17, 5, 2, torch.float16, F32,
                                                              "cpu")
    for name, bad in (
        ("dirs", dirs.to(torch.int16)),
        ("coeffs", coeffs.half()),
        ("base", base.half()),
    ):
        args = dict(base=base, dirs=dirs, coeffs=coeffs, pose_dirs=pose_dirs,
                    pose_coeffs=pose_coeffs)
        args[name] = bad
        with pytest.raises((TypeError, RuntimeError), match=name):
            blend.blend(**args)
        with pytest.raises(RuntimeError, match=name):
            ops.blend(*args.values())
    with pytest.raises(RuntimeError, match="dirs"):
        ops.blend_backward(torch.randn(3, 17), dirs.to(torch.int16), pose_dirs, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("batch", [3, 16, 40])  # hand kernels; widened blocks for cuBLAS
def test_half_dirs_cuda_match_float64_and_the_widened_table(ops, half, batch):
    needs_kernels("cuda", "blend")
    args = _half_inputs(batch, 5000, 50, 9, half, F32, "cpu")
    grad_out = torch.randn(batch, 5000, generator=torch.Generator().manual_seed(4))
    cuda = [x.cuda() for x in args]
    out = ops.blend(*cuda)
    exact = args[0].double() + args[2].double() @ args[1].double().T \
        + args[4].double() @ args[3].double()
    magnitude = args[0].double().abs() + args[2].double().abs() @ args[1].double().abs().T \
        + args[4].double().abs() @ args[3].double().abs()
    assert_matches(out.cpu(), exact, magnitude, 50 + 9 + 1, "blend")
    grad_coeffs, grad_pose = ops.blend_backward(grad_out.cuda(), cuda[1], cuda[3], True, True)
    assert_matches(grad_coeffs.cpu(), grad_out.double() @ args[1].double(),
                   grad_out.double().abs() @ args[1].double().abs(), 5000 + 1, "grad_coeffs")
    assert_matches(grad_pose.cpu(), grad_out.double() @ args[3].double().T,
                   grad_out.double().abs() @ args[3].double().abs().T, 5000 + 1, "grad_pose")
    if batch <= 16:  # the hand kernels: the bits of the same kernels on the widened table
        widened = (cuda[0], cuda[1].float()) + tuple(cuda[2:])
        assert torch.equal(out, ops.blend(*widened))


@pytest.mark.cuda
@pytest.mark.parametrize("half", HALF)
def test_half_dirs_cuda_hand_kernels_serve_large_batches(ops, half, deterministic):
    """Under use_deterministic_algorithms every batch takes the hand kernels."""
    needs_kernels("cuda", "blend")
    cuda = [x.cuda() for x in _half_inputs(40, 3000, 50, 9, half, F32, "cpu")]
    widened = (cuda[0], cuda[1].float()) + tuple(cuda[2:])
    assert torch.equal(ops.blend(*cuda), ops.blend(*widened))
    grad_out = torch.randn(40, 3000, device="cuda")
    for a, b in zip(ops.blend_backward(grad_out, cuda[1], cuda[3], True, True),
                    ops.blend_backward(grad_out, widened[1], cuda[3], True, True)):
        assert torch.equal(a, b)
