"""Comparisons against the float64 oracle (flame_ext.reference), shared by the test files.

Tolerances of the property tests. A sum of n products computed in floating point in any
order is within n * eps * sum|terms| of the exact sum. The oracle is the reference
evaluated in float64 on the same inputs, and `sum|terms|` is that reference evaluated on
absolute values (every op is multilinear in its float inputs, or has an explicit bound
where it is tested), so a comparison is as tight as the conditioning of each output
allows: terms of 1e30 that cancel get a wide tolerance, a well-conditioned output a tight
one. Outputs the oracle gives as NaN / inf must be non-finite in the op too, and finite
ones finite (for the kinematic chain, see `assert_within`: the op may keep finite what the
reference's 4x4 products turn into 0 * NaN). The decoders, whole pipelines, are held to
the fixed tolerances of `decoder_bound`.
"""

import sys

import pytest
import torch
from hypothesis import assume

from _samples import ALSO_ACCEPTED, F64, INF, OPTIONAL_PAIRS, bad_op_cases, corrupt, yaw_degrees


def needs_kernels(device, *ops):
    """Skips a CUDA case when this build lacks one of the op families' CUDA kernels."""
    from flame_ext import _ops

    device = torch.device(device)
    for op in ops:
        if device.type == "cuda" and not _ops.has_kernel(op, "CUDA"):
            pytest.skip(f"flame_ext::{op} has no CUDA kernel in this build")


def d64(x):
    return None if x is None else x.detach().to("cpu", F64)


def a64(x):
    return None if x is None else x.detach().to("cpu", F64).abs()


def assert_matches(actual, exact, magnitude, terms, what, **kwargs):
    """actual (any dtype/device) against the float64 oracle `exact`, within
    2 * terms * eps * magnitude (see the module docstring); kwargs as assert_within."""
    eps = torch.finfo(actual.dtype).eps
    bound = 2 * terms * eps * magnitude.nan_to_num(nan=INF) + torch.finfo(actual.dtype).tiny
    assert_within(actual, exact, bound, what, **kwargs)


def assert_within(actual, exact, bound, what, finite=None, exact_nan=True, keep_sample_nan=True,
                  ignore=None):
    """|actual - exact| <= bound where both are finite, and a matching non-finite pattern.

    `ignore` (a mask) leaves entries unchecked: where an intermediate of the computation
    is past the dtype's range (inf in float32) while the float64 output is not.

    `finite` (default: where `exact` is finite) is where the op must give finite values.
    With exact_nan, it must give non-finite values everywhere else; without, it may give
    a finite value where the oracle's NaN comes from a 0 * NaN of its own formulation
    (a rotation entry does not depend on a joint location, but a 4x4 product multiplies
    it by 0), as long as (keep_sample_nan) every sample with a non-finite oracle output
    has one too.
    """
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    got = actual.detach().to("cpu", F64)
    finite = exact.isfinite() if finite is None else finite & exact.isfinite()
    # float32 outputs of finite float64 values beyond float32's range overflow to inf.
    representable = finite & (exact.abs() < torch.finfo(actual.dtype).max / 2)
    mismatch = (got.isfinite() != finite) if exact_nan else (finite & ~got.isfinite())
    mismatch &= ~(finite & ~representable)
    if ignore is not None:
        mismatch &= ~ignore
        representable = representable & ~ignore
    assert not mismatch.any(), (
        f"{what}: finite where the reference is not (or the reverse) at "
        f"{mismatch.nonzero()[:3].tolist()}: got {got[mismatch][:3].tolist()}, "
        f"reference {exact[mismatch][:3].tolist()}"
    )
    if not exact_nan and keep_sample_nan and got.dim() and got.numel():
        lost = ~finite.flatten(1).all(dim=1) & got.flatten(1).isfinite().all(dim=1)
        assert not lost.any(), f"{what}: samples {lost.nonzero().flatten().tolist()} lost their NaN"
    bound = torch.as_tensor(bound, dtype=F64).expand_as(exact)
    err = (got - exact).abs()
    bad = representable & got.isfinite() & ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} values beyond the tolerance, e.g. got "
        f"{got[bad][:3].tolist()}, reference {exact[bad][:3].tolist()}, bound "
        f"{bound[bad][:3].tolist()}"
    )


def assert_error_names(exc_info, *names):
    message = str(exc_info.value)
    assert any(name in message for name in names), f"{names} not named in: {message}"


def assert_bad_argument_is_named(fn, op, name, how, variant, device):
    """`fn` (the checked wrapper of `op`) called with argument `name` corrupted (`how`,
    `variant`: see _samples.corrupt) raises a ValueError / TypeError naming it."""
    good, size_dims, partners = bad_op_cases(device)[op]
    dims = size_dims[name]
    assume(how != "size" or dims)
    if how == "rank_down" and good[name].dim() == 1:
        assume(name != "parents")  # parents () is caught as a shape error too
    args = dict(good, **{name: corrupt(good[name], how, dims, variant)})
    assume(not (how == "dtype" and args[name].dtype in ALSO_ACCEPTED.get((op, name), ())))
    if args[name] is None and name in OPTIONAL_PAIRS:
        with pytest.raises(ValueError) as info:
            fn(**args)
        assert_error_names(info, name, OPTIONAL_PAIRS[name])
        return
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**args)
    assert_error_names(info, name, *(partners.get(name, ()) if how == "size" else ()))


def assert_bad_decoder_input_is_named(call, good, name, how, variant):
    """call(inputs) with input `name` of the `good` inputs made bad (`how`: a corruption
    of _samples.corrupt, or 'batch': 2 samples where the others have 3, neither 3 nor 1)
    raises a ValueError / TypeError naming it."""
    x = good[name]
    assume(not (how == "batch" and len(good) == 1))  # one input: any batch is fine
    if how == "batch":
        bad = x[:2]
    elif how == "dtype" and variant % 2:
        bad = x.double()  # float64 into a float32 module
    else:
        bad = corrupt(x, how, (x.dim() - 1,), variant)
    if name == "v" and how == "rank_up":
        bad = x.unsqueeze(0)  # (1, B, V, 3): rank 4
    with pytest.raises((ValueError, TypeError)) as info:
        call(dict(good, **{name: bad}))
    if how == "batch":  # medusa's rule: the first input sets the batch, a later one is wrong
        assert_error_names(info, name, "batch size")
    else:
        assert_error_names(info, name)


def ambiguous_bins(poses, rule, dtype):
    """Samples whose continuous yaw is within float rounding of a .5 bin boundary, or whose
    angles are so large that the rounding of sin / cos / the norm moves the yaw: either
    bin is right there."""
    yaw = yaw_degrees(poses, rule)
    poses = poses.detach().to("cpu", F64)
    margin = 1e4 * torch.finfo(dtype).eps * (1 + poses[:, :6].abs().amax(dim=1))
    tie = (yaw - yaw.floor() - 0.5).abs() < margin
    return tie | ~yaw.isfinite() | ~poses[:, :6].isfinite().all(dim=1) | (margin > 0.1)


# Decoder tolerances against the float64 reference path. float64: the two paths differ
# only in summation order, ~1e-15 relative on coordinates of ~1. float32: the blend sums
# 10 products, the chain multiplies 3 rotations of angles up to ~5 rad (argument
# reduction loses ~eps * angle) and translations of ~1: a few 1e-6 absolute, so 5e-5 and
# 1e-4 relative leave headroom without hiding a wrong term (those are O(0.01..1)).
DECODER_TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 5e-5)}


def decoder_bound(exact, dtype, scale=1.0):
    rtol, atol = DECODER_TOL[dtype]
    return atol * scale + rtol * exact.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def run_with_grads(fn, leaves, seed=1):
    """fn's outputs (None dropped) and the gradients of the leaves that require them under
    random output gradients, detached: what the determinism tests compare bit for bit."""
    outputs = fn(*leaves)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=F64).to(o) for o in outputs]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if sum(o.numel() for o in outputs) and wanted:
        got = torch.autograd.grad(outputs, wanted, grads, allow_unused=True)
    else:
        got = [None] * len(wanted)
    return [o.detach() for o in outputs] + [g for g in got if g is not None]


def assert_deterministic_and_fully_written(cases):
    """Each (name, fn, leaves) runs twice, bit for bit the same, and writes every output
    element: under the `deterministic` fixture fresh memory is NaN and every input is
    finite, so a NaN in an output is an element no kernel wrote."""
    for name, fn, leaves in cases:
        first, second = run_with_grads(fn, leaves), run_with_grads(fn, leaves)
        for a, b in zip(first, second):
            assert torch.equal(a, b), name
            assert not a.isnan().any(), f"{name}: unwritten (NaN) output elements"


def per_thread_count(call, counts=(1, 2, 3)):
    """CPU: call() run with each thread count in turn (the count is restored after);
    returns the results in the order of `counts`."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(call())
    finally:
        torch.set_num_threads(threads)
    return results


def assert_same_bits(results):
    """Every result (a sequence of tensors) is bit for bit the first."""
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def assert_independent_of_thread_count(cases):
    """CPU: each (name, fn, leaves) gives the same bits with 1 and 2 threads."""
    results = per_thread_count(
        lambda: [run_with_grads(fn, leaves) for name, fn, leaves in cases], counts=(1, 2))
    for one, two in zip(*results):
        assert all(torch.equal(a, b) for a, b in zip(one, two))


def assert_close_to_reference(got, want, dtype, f32_tol):
    """float64: agreement to rounding (1e-10 relative to the magnitudes involved);
    float32 (want computed in float64 from the same inputs): f32_tol."""
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(got.double(), want, rtol=f32_tol, atol=f32_tol)


HUGE_PAGE_BYTES = 2 << 20
HUGE_OUTPUT_BYTES = 4 << 20  # kHugeOutputBytes of csrc/cpu_output.h


def assert_huge_page_output(t):
    """A CPU output of HUGE_OUTPUT_BYTES or more comes from the huge-page allocator
    (csrc/cpu_output.h): on Linux its block starts on a 2 MiB boundary (the default
    allocator's 64-byte alignment never lands there for a block glibc maps itself). It must
    behave as any tensor: written in place, grown (its allocator reallocates and copies)
    and freed."""
    assert t.device.type == "cpu" and t.nbytes >= HUGE_OUTPUT_BYTES
    if sys.platform.startswith("linux"):
        assert t.untyped_storage().data_ptr() % HUGE_PAGE_BYTES == 0, (
            "a large CPU output is not on the huge-page allocator")
    kept = t.detach().clone().flatten()
    grown = t.detach()
    grown.resize_(t.numel() + HUGE_PAGE_BYTES)
    assert torch.equal(grown[: kept.numel()], kept)
    grown.add_(1)
