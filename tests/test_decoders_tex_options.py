"""FlameTex's options: specular=True (AlbedoMM's diffuse + specular parts), basis_dtype
(a float16 / bfloat16 basis with float32 sums, its error bound and gradients) and
compact=True (only the gathered rows: the same output bit for bit, its state dicts),
each against the pure-PyTorch reference, under torch.compile(fullgraph=True), with bad
input, on every device.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _oracle import assert_bad_decoder_input_is_named, needs_kernels
from _samples import CORRUPTIONS, SMALL
from flame_ext import FlameTex, load_texture_space, reference
from flame_ext._ops import half_blend

HALF = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
# unit roundoff of a round-to-nearest conversion to each dtype
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _tex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-model notice
        return FlameTex(*args, **kwargs)


def _albedomm_file(tmp_path, H=16, W=12, P=6, seed=3, flat=False):
    """A small AlbedoMM file in the published layout (image-shaped, 0..1, float32)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "MU": rng.uniform(0.2, 0.8, (H, W, 3)),
        "PC": rng.normal(0, 0.05, (H, W, 3, P)),
        "specMU": rng.uniform(0.05, 0.3, (H, W, 3)),
        "specPC": rng.normal(0, 0.02, (H, W, 3, P)),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    if flat:
        arrays = {k: v.reshape(H * W * 3, *v.shape[3:]) for k, v in arrays.items()}
    path = tmp_path / "albedoModel2020_FLAME_albedoPart.npz"
    np.savez(path, vt=rng.uniform(0, 1, (9, 2)), **arrays)
    return path


def _reference_parts(model_path, n_tex, code, dtype=torch.float64):
    """Each part's texture by flame_ext.reference.texture, in `dtype`."""
    space = load_texture_space(model_path, n_tex, specular=True)
    parts = []
    for mean, basis in ((space.mean, space.basis),
                        (space.specular_mean, space.specular_basis)):
        parts.append(reference.texture(torch.from_numpy(mean).to(dtype),
                                       torch.from_numpy(basis).to(dtype), code.to(dtype),
                                       space.height, space.width))
    return parts


def _code(batch, n_tex, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_tex, generator=gen) * 1.5).to(dtype)


# --- specular=True ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ext", "reference", "medusa"])
@pytest.mark.parametrize("flat", [False, True])
def test_specular_matches_reference(tmp_path, backend, flat):
    # flat arrays are read as square textures; image-shaped ones may be any H x W
    path = _albedomm_file(tmp_path, W=16 if flat else 12, flat=flat)
    module = _tex(path, n_tex=5, backend=backend, specular=True)
    code = _code(3, 5)
    diffuse, specular = module(code)
    want = _reference_parts(path, 5, code)
    for got, exact in zip((diffuse, specular), want):
        assert got.shape == (3, 3, 256, 256) and got.dtype == torch.float32
        # float32 sums of 5 products of O(0.1) values with an O(1) mean: a few ulps
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-6)
    # the diffuse part is what the module without the specular part decodes, bit for bit
    alone = _tex(path, n_tex=5, backend=backend)(code)
    assert torch.equal(diffuse, alone)


def test_specular_float64_gradcheck(tmp_path):
    path = _albedomm_file(tmp_path, H=8, W=8, P=3)
    for backend in ("ext", "reference"):
        module = _tex(path, n_tex=3, backend=backend, specular=True).double()
        code = _code(2, 3, dtype=torch.float64).requires_grad_(True)
        exact = _reference_parts(path, 3, code.detach())
        torch.testing.assert_close(module(code.detach())[1], exact[1], rtol=1e-12, atol=1e-12)
        # a fixed random projection keeps gradcheck's Jacobian small
        proj = torch.randn(2, 3, 256, 256, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
        assert torch.autograd.gradcheck(
            lambda c: tuple((o * proj).sum((1, 2, 3)) for o in module(c)), (code,))


def test_synthetic_albedomm():
    module = _tex("synthetic-small", n_tex=7, specular=True, backend="reference")
    code = _code(2, 7)
    want = _reference_parts("synthetic-small", 7, code)
    for got, exact in zip(module(code), want):
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-6)
    assert set(module.state_dict()) == {"texture_mean", "texture_basis", "specular_mean",
                                        "specular_basis"}
    assert module.specular_basis.shape == (1, 8 * 8 * 3, 7)


def test_specular_without_a_specular_part_names_model_path(tmp_path):
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    rng = np.random.default_rng(0)
    np.savez(path, MU=rng.uniform(0, 1, 192), PC=rng.normal(0, 0.1, (192, 4)))
    with pytest.raises(ValueError, match="model_path") as info:
        _tex(path, n_tex=4, specular=True)
    assert str(path) in str(info.value)
    with pytest.raises(TypeError, match="specular"):
        _tex(path, n_tex=4, specular="yes")


# --- basis_dtype ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, error", [
    ("float16", TypeError), (np.float16, TypeError), (16, TypeError),
    (torch.float64, ValueError), (torch.int8, ValueError), (torch.complex64, ValueError),
])
def test_bad_basis_dtype_is_named(value, error):
    with pytest.raises(error, match="basis_dtype"):
        _tex(SMALL, n_tex=3, basis_dtype=value)


@pytest.mark.parametrize("name", ["compact"])
def test_bad_flags_are_named(name):
    with pytest.raises(TypeError, match=name):
        _tex(SMALL, n_tex=3, **{name: 1})


def _error_bound(module32, code, dtype):
    """|half - float32| per element: the half rounding of each basis value (relative
    UNIT, or 2^-25 absolute for a float16 subnormal), then two float32 sums of K + 1
    terms."""
    mean, basis = (t.double() for t in module32._tables())
    c = code.double().abs()
    magnitude = mean.abs() + c @ basis.abs().t()
    subnormal = 2.0**-25 * c.sum(1, keepdim=True) if dtype == torch.float16 else 0.0
    K = basis.shape[1]
    return (UNIT[dtype] * (c @ basis.abs().t()) + subnormal
            + 2 * (K + 1) * 2.0**-24 * magnitude * (1 + UNIT[dtype]))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_half_basis_error_bound(dtype, backend):
    module32 = _tex(SMALL, n_tex=5, backend=backend)
    module = _tex(SMALL, n_tex=5, backend=backend, basis_dtype=dtype)
    assert module.texture_basis.dtype == dtype and module.texture_mean.dtype == torch.float32
    assert module._gathered_basis.dtype == dtype
    code = _code(4, 5, seed=2) * 3
    out, out32 = module(code), module32(code)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 256, 256)
    err = (out.double() - out32.double()).abs().view(4, -1)
    bound = _error_bound(module32, code, dtype)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # the rounding is real: the bound is not vacuous here
    # against float64 on the rounded basis: only the float32 sums remain
    mean, basis = module._tables()
    exact = reference.blend(mean.double(), basis.double(), code.double())
    magnitude = reference.blend(mean.double().abs(), basis.double().abs(), code.double().abs())
    assert ((out.view(4, -1).double() - exact).abs() <= 6 * 2.0**-24 * magnitude).all()


@pytest.mark.parametrize("dtype", HALF)
def test_half_basis_gradients_match_float64_on_the_rounded_basis(dtype):
    module = _tex(SMALL, n_tex=5, backend="ext", basis_dtype=dtype)
    mean, basis = module._tables()
    code = _code(3, 5, seed=4).requires_grad_(True)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(3, 3, 256, 256, generator=gen)
    (grad,) = torch.autograd.grad(module(code), code, grad_out, create_graph=True)
    code64 = code.detach().double().requires_grad_(True)
    exact = reference.blend(mean.double(), basis.double(), code64)
    (grad64,) = torch.autograd.grad(exact, code64, grad_out.double().view(3, -1),
                                    create_graph=True)
    scale = grad_out.double().abs().view(3, -1) @ basis.double().abs()
    N = basis.shape[0]
    # float32 sums over N rows, in blocks
    assert ((grad.double() - grad64).abs() <= N * 2.0**-24 * scale).all()
    # double backward: the backward is linear in grad_out; its derivative is a blend again
    grad_out.requires_grad_(True)
    (grad,) = torch.autograd.grad(module(code), code, grad_out, create_graph=True)
    v = torch.randn(3, 5, generator=gen)
    (gg,) = torch.autograd.grad((grad * v).sum(), grad_out)
    want = (v.double() @ basis.double().t()).view_as(gg)
    assert ((gg.double() - want).abs() <= 6 * 2.0**-24 * (v.double().abs() @ basis.double().abs().t()).view_as(gg)).all()


@pytest.mark.parametrize("dtype", HALF)
def test_half_blend_op_registrations(dtype):
    gen = torch.Generator().manual_seed(6)
    N, K = 777, 4
    basis = (torch.randn(N, K, generator=gen) * 0.1).to(dtype)
    mean = torch.rand(N, generator=gen)
    code = torch.randn(2, K, generator=gen).requires_grad_(True)
    for args in ((mean, basis, code, 100), (None, basis, code, 64), (mean, basis, code, N)):
        torch.library.opcheck(torch.ops.flame_ext_py.half_blend.default, args)
    torch.library.opcheck(torch.ops.flame_ext_py.half_blend_backward.default,
                          (torch.randn(2, N, generator=gen).requires_grad_(True), basis, 100))
    # the blocks tile the rows exactly, whatever the block size
    want = reference.blend(mean.double(), basis.double(), code.detach().double())
    for rows in (1, 64, 100, N - 1, N, 10 * N):
        out = torch.ops.flame_ext_py.half_blend(mean, basis, code.detach(), rows)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)


def test_half_blend_wrapper_checks():
    basis = torch.zeros(10, 3, dtype=torch.float16) + 0.5
    good = dict(mean=torch.rand(10), basis=basis, coeffs=torch.randn(2, 3))
    bad = {
        "coeffs": [torch.randn(2, 3, dtype=torch.float64), torch.randn(3), [[1.0, 2.0, 3.0]]],
        "basis": [basis.float(), basis[:, :2], basis[None]],
        "mean": [torch.rand(11), torch.rand(10, dtype=torch.float64)],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises((ValueError, TypeError), match=name):
                half_blend.half_blend(**{**good, name: value})


def test_half_basis_out_of_range_is_refused(tmp_path):
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    rng = np.random.default_rng(0)
    pc = rng.normal(0, 0.1, (192, 4))
    pc[5, 1] = 1e5  # beyond float16's 65504
    np.savez(path, MU=rng.uniform(0, 1, 192), PC=pc)
    with pytest.raises(ValueError, match="basis_dtype"):
        _tex(path, n_tex=4, basis_dtype=torch.float16)
    assert _tex(path, n_tex=4, basis_dtype=torch.bfloat16).texture_basis.dtype == torch.bfloat16


def test_half_basis_loads_a_float32_state_dict():
    module32 = _tex(SMALL, n_tex=5)
    module = _tex(SMALL, n_tex=5, basis_dtype=torch.float16)
    module.texture_basis.zero_()
    module.load_state_dict(module32.state_dict())
    assert module.texture_basis.dtype == torch.float16
    assert torch.equal(module._gathered_basis,
                       module32._gathered_basis.to(torch.float16))


# --- compact=True ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("specular", [False, True])
def test_compact_is_bit_identical(tmp_path, backend, basis_dtype, specular):
    path = _albedomm_file(tmp_path, H=512, W=512, P=3)  # larger than the output: 4x rows
    options = dict(n_tex=3, backend=backend, basis_dtype=basis_dtype, specular=specular)
    full, compact = _tex(path, **options), _tex(path, compact=True, **options)
    code = _code(2, 3, seed=7)
    a, b = full(code), compact(code)
    for x, y in zip(a if specular else (a,), b if specular else (b,)):
        assert torch.equal(x, y)
    parts = 2 if specular else 1
    assert set(compact.state_dict()) == {"gathered_mean", "gathered_basis"}
    assert compact.gathered_basis.shape == (parts * 3 * 256 * 256, 3)
    assert compact.gathered_basis.dtype == basis_dtype
    full_bytes = sum(b.numel() * b.element_size() for b in full.buffers())
    compact_bytes = sum(b.numel() * b.element_size() for b in compact.buffers())
    # the full module holds the 512x512 buffers (4 units) and their gathered rows (1 unit)
    assert full_bytes == 5 * compact_bytes

    # a full state dict loads into a compact module (the pre-hook gathers it)
    other = _tex(path, compact=True, **options)
    other.gathered_basis.zero_()
    other.load_state_dict(full.state_dict())
    assert torch.equal(other.gathered_basis, compact.gathered_basis)
    assert torch.equal(other.gathered_mean, compact.gathered_mean)
    # and a compact one does too
    other.gathered_basis.zero_()
    other.load_state_dict(compact.state_dict())
    assert torch.equal(other.gathered_basis, compact.gathered_basis)


def test_compact_state_dict_errors():
    compact = _tex(SMALL, n_tex=3, compact=True)
    full = _tex(SMALL, n_tex=3).state_dict()
    wrong = dict(full, texture_basis=full["texture_basis"][:, :, :2])
    with pytest.raises(ValueError, match="texture_basis"):
        compact.load_state_dict(wrong)
    with pytest.raises(ValueError, match="texture_mean"):
        compact.load_state_dict({"texture_basis": full["texture_basis"]})
    # a compact state dict cannot be un-gathered into a full module
    with pytest.raises(RuntimeError, match="gathered_basis"):
        _tex(SMALL, n_tex=3).load_state_dict(compact.state_dict())
    with pytest.raises(ValueError, match="compact"):
        _tex(SMALL, n_tex=3, compact=True, backend="medusa")


# --- torch.compile and devices -------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(specular=True), dict(basis_dtype=torch.float16), dict(compact=True),
    dict(specular=True, compact=True, basis_dtype=torch.bfloat16),
], ids=["specular", "half", "compact", "all"])
def test_compile_fullgraph(options):
    torch._dynamo.reset()
    module = _tex("synthetic-small", n_tex=5, backend="ext", **options)
    compiled = torch.compile(module, fullgraph=True)
    code = _code(2, 5, seed=8).requires_grad_(True)
    eager, got = module(code), compiled(code)
    eager = eager if isinstance(eager, tuple) else (eager,)
    got = got if isinstance(got, tuple) else (got,)
    for x, y in zip(eager, got):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    grad = torch.autograd.grad(sum(o.square().sum() for o in got), code)[0]
    want = torch.autograd.grad(sum(o.square().sum() for o in eager), code)[0]
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("options", [
    dict(specular=True), dict(basis_dtype=torch.float16), dict(basis_dtype=torch.bfloat16),
    dict(compact=True, specular=True),
], ids=["specular", "f16", "bf16", "compact"])
def test_device_matches_cpu(device, options):
    needs_kernels(device, "blend")
    cpu = _tex("synthetic-small", n_tex=5, backend="ext", **options)
    module = _tex("synthetic-small", n_tex=5, backend="auto", **options).to(device)
    code = _code(3, 5, seed=9).requires_grad_(True)
    a, b = cpu(code), module(code.to(device))
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for x, y in zip(a, b):
        assert y.device.type == torch.device(device).type and y.dtype == torch.float32
        torch.testing.assert_close(y.cpu(), x, rtol=1e-6, atol=1e-6)
    grad = torch.autograd.grad(sum(o.sum() for o in b), code)[0]
    want = torch.autograd.grad(sum(o.sum() for o in a), code)[0]
    torch.testing.assert_close(grad.cpu(), want, rtol=1e-5, atol=1e-3)


@given(how=st.sampled_from(CORRUPTIONS + ("batch",)), variant=st.integers(0, 11),
       option=st.sampled_from(["specular", "f16", "bf16", "compact"]))
def test_bad_texcode_is_named(how, variant, option):
    module = _option_module(option)
    gen = torch.Generator().manual_seed(variant)
    good = dict(texcode=torch.rand(3, 5, generator=gen))
    assert_bad_decoder_input_is_named(lambda args: module(args["texcode"]), good, "texcode",
                                      how, variant)


_OPTION_MODULES = {}


def _option_module(option):
    options = {"specular": dict(specular=True), "f16": dict(basis_dtype=torch.float16),
               "bf16": dict(basis_dtype=torch.bfloat16), "compact": dict(compact=True)}
    if option not in _OPTION_MODULES:
        _OPTION_MODULES[option] = _tex("synthetic-small", n_tex=5, **options[option])
    return _OPTION_MODULES[option]


def test_option_modules_pickle():
    import pickle

    code = _code(2, 5, seed=10)
    for option in ("specular", "f16", "compact"):
        module = _option_module(option)
        again = pickle.loads(pickle.dumps(module))
        for x, y in zip(*(m(code) if option == "specular" else (m(code),)
                          for m in (module, again))):
            assert torch.equal(x, y)
