"""FlameTex: outputs of the three paths, buffers, count and input errors, properties over
any texture codes, and agreement of every device with the CPU reference.
"""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _oracle import (
    a64,
    assert_bad_decoder_input_is_named,
    assert_error_names,
    assert_matches,
    d64,
    needs_kernels,
)
from _samples import (
    CORRUPTIONS,
    F32,
    F64,
    FULL,
    SMALL,
    dtypes,
    lay_out,
    layouts,
    random_values,
    seeds,
    specials,
)
from flame_ext import FlameTex, reference


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_texture_paths_agree(backend):
    gen = torch.Generator().manual_seed(4)
    tex = FlameTex(model_path=SMALL, n_tex=4, backend=backend)
    base = FlameTex(model_path=SMALL, n_tex=4, backend="medusa")
    code = torch.randn(3, 4, generator=gen)
    out = tex(code)
    assert out.shape == (3, 3, 256, 256)
    # float32 sums of 4 products of O(1) values: 1e-6 is a few ulps
    torch.testing.assert_close(out, base(code), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_texture_tables_follow_their_buffers(backend):
    """The gathered texels follow the full buffers: written in place they are read at the
    next call, and a basis that requires grad gets medusa's gradient through them."""
    tex = FlameTex(model_path=SMALL, n_tex=4, backend=backend).double()
    base = FlameTex(model_path=SMALL, n_tex=4, backend="medusa").double()
    code = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tex(code)
    for module in (tex, base):
        module.texture_mean.add_(0.5)
        module.texture_basis.requires_grad_(True)
    got, want = tex(code), base(code)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), m.texture_basis)[0]
             for out, m in ((got, tex), (want, base))]
    assert torch.count_nonzero(grads[1]) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_texture_state_dict_and_errors():
    tex = FlameTex(model_path=SMALL, n_tex=3)
    assert set(tex.state_dict()) == {"texture_mean", "texture_basis"}
    with pytest.raises(ValueError, match="texcode"):
        tex(torch.randn(2, 5))
    with pytest.raises(ValueError, match="n_tex"):
        FlameTex(model_path=SMALL, n_tex=10**6)


@given(n_tex=st.one_of(st.integers(-3, 250), st.floats(0, 6), st.booleans(), st.none()))
def test_flame_tex_count_is_checked(n_tex):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(n_tex, int) and not isinstance(n_tex, bool) and 0 <= n_tex <= 5:
            assert FlameTex(SMALL, n_tex=n_tex).n_tex == n_tex
            return
        with pytest.raises((ValueError, TypeError)) as info:
            FlameTex(SMALL, n_tex=n_tex)
    assert_error_names(info, "n_tex")


@given(how=st.sampled_from(CORRUPTIONS + ("batch",)), variant=st.integers(0, 11),
       backend=st.sampled_from(["ext", "reference", "medusa"]))
def test_flame_tex_bad_input_is_named(decoder_cache, device, how, variant, backend):
    needs_kernels(device, "blend")
    gen = torch.Generator().manual_seed(variant)
    module = decoder_cache("tex", backend, F32, device, 5)
    good = dict(texcode=torch.rand(3, 5, generator=gen).to(device))
    assert_bad_decoder_input_is_named(lambda args: module(args["texcode"]), good, "texcode",
                                      how, variant)


# --- properties: any texture codes, against the float64 reference path --------------------


@st.composite
def texture_cases(draw):
    return dict(
        batch=draw(st.sampled_from([0, 1, 2, 4])),
        n_tex=draw(st.sampled_from([0, 1, 3, 5])),  # the small BFM basis has 5
        backend=draw(st.sampled_from(["ext", "medusa"])),
        layout=draw(layouts),
        dtype=draw(dtypes),
        seed=draw(seeds),
        inject=draw(specials),
    )


@given(case=texture_cases())
def test_flame_tex_matches_reference(decoder_cache, device, case):
    needs_kernels(device, "blend")
    module = decoder_cache("tex", case["backend"], case["dtype"], device, case["n_tex"])
    oracle = decoder_cache("tex", "reference", F64, "cpu", case["n_tex"])
    code = random_values(case["seed"], (case["batch"], case["n_tex"]), inject=case["inject"])
    code = lay_out(code.to(case["dtype"]), case["layout"], device)
    out = module(code)
    assert out.shape == (case["batch"], 3, 256, 256) and out.dtype == case["dtype"]
    exact = oracle(d64(code))
    magnitude = reference.blend(oracle._gathered_mean.abs(), oracle._gathered_basis.abs(),
                                a64(code)).view_as(exact)
    assert_matches(out, exact, magnitude, case["n_tex"] + 1, "texture")


# --- every device against the CPU reference (full-size model) -----------------------------


def test_device_matches_cpu_reference(ops, device, quiet):
    gen = torch.Generator().manual_seed(8)
    # built here, not cached: a float64 full-size basis is ~400 MB per module
    cpu = FlameTex(model_path=FULL, n_tex=50, backend="reference").double()
    module = FlameTex(model_path=FULL, n_tex=50, backend="ext").double().to(device)
    code = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(module(code.to(device)).cpu(), cpu(code))
