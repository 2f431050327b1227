"""The SIMT test library as the kernel tests use it: loading, the schedule and launch
limits, which kernels ran, random inputs and comparisons."""

import contextlib
import json
import os

import pytest
import torch

LIB = os.environ.get("FLAME_EXT_SIMT_LIB")
SCHEDULES = ("in_order", "reversed", "random")
SEED = 20261201

_loaded = False


def load_simt():
    """Loads the SIMT library once; skips when it is not this process's to load."""
    global _loaded
    if not LIB:
        pytest.skip("the SIMT kernel tests run with `make test-kernels`")
    if not _loaded:
        torch.ops.load_library(LIB)
        _loaded = True
    return torch.ops.flame_ext_simt


# Where the kernels of the current test run: 'simt' (the emulation, CPU tensors) or 'cuda'
# (the real kernels on a GPU, through torch.ops.flame_ext with the inputs moved there).
_target = "simt"


def set_target(name):
    global _target
    _target = name


def emulated():
    """Whether the current test runs the kernels in the emulation (else on a GPU)."""
    return _target == "simt"


def configure(order="in_order", seed=SEED, max_grid=(0, 0, 0)):
    """Sets the schedule and (0: CUDA's) grid limits of the runtime; nothing on a GPU."""
    if _target == "simt":
        load_simt().simt_configure(order, seed, *max_grid)


def kernel_stats():
    """{kernel name: (launches, blocks, threads, barriers, warp ops)} so far."""
    return {k: tuple(v) for k, v in json.loads(load_simt().simt_stats()).items()}


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(y, device) for y in x)
    return x


class OnCuda:
    """torch.ops.flame_ext with CPU tensors in and out: the test's inputs go to the GPU,
    the real CUDA kernels run, the results come back for the same comparisons."""

    def __getattr__(self, name):
        op = getattr(torch.ops.flame_ext, name)
        return lambda *args: _to(op(*_to(args, "cuda")), "cpu")


F32, F64 = torch.float32, torch.float64
DTYPES = (F32, F64)


def rand(gen, *shape, dtype=F64, scale=1.0, low=None):
    """Normal values (or uniform in (low, low + scale) when low is given), never zeros."""
    if low is None:
        x = torch.randn(*shape, generator=gen, dtype=F64) * scale
    else:
        x = low + scale * torch.rand(*shape, generator=gen, dtype=F64)
    return x.to(dtype)


@contextlib.contextmanager
def launches(*kernels, exactly=False):
    """Asserts that the block launched each kernel at least once (exactly: only these)."""
    if _target != "simt":  # a GPU keeps no such record
        yield
        return
    before = kernel_stats()
    yield
    after = kernel_stats()
    ran = {k for k, v in after.items() if v[0] > before.get(k, (0,))[0]}
    missing = set(kernels) - ran
    assert not missing, f"kernels not launched: {sorted(missing)} (ran: {sorted(ran)})"
    if exactly:
        assert ran == set(kernels), f"unexpected kernels launched: {sorted(ran - set(kernels))}"


def under_every_schedule(call):
    """Runs call() under each schedule; asserts the outputs are bitwise equal (the kernels
    claim results independent of thread order) and returns the first. On a GPU: three
    runs, bitwise equal (the kernels claim run-to-run determinism)."""
    outs = []
    for order in ("in_order", "reversed", "random"):
        configure(order)
        outs.append(call())
    configure()
    first = outs[0]
    for order, out in zip(("reversed", "random"), outs[1:]):
        assert_bitwise(first, out, f"in_order vs {order}")
    return first


def assert_bitwise(a, b, what=""):
    if isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{what}[{i}]")
        return
    assert a.shape == b.shape and a.dtype == b.dtype, what
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    assert bool(same.all()), f"{what}: not bitwise equal, max diff {(a - b).abs().max()}"


def assert_matches_cpu(got, cpu, what="", bound=None, ulps=64):
    """A kernel's result against the CPU loops'. Both evaluate the family's shared math
    in the same order; in the emulation one host compiler builds both, with no FMA
    contraction, so the bits are the same. nvcc contracts a * b + c into one rounding by
    default, so on a GPU a step may differ by an ulp: there the two agree within `bound`
    (elementwise, a tensor or a number: twice the test's bound against the exact
    result, both sides being within it) or, without one, within `ulps` ulps of the
    largest magnitude; NaN exactly where the CPU has NaN."""
    if isinstance(got, (tuple, list)):
        for i, (x, y) in enumerate(zip(got, cpu)):
            assert_matches_cpu(x, y, f"{what}[{i}]", bound, ulps)
        return
    if emulated() or not got.is_floating_point():
        assert_bitwise(got, cpu, what)
        return
    assert got.shape == cpu.shape and got.dtype == cpu.dtype, what
    nan = torch.isnan(cpu)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN where the CPU has none or not"
    err = (got.double() - cpu.double()).abs()[~nan]
    if bound is None:
        finite = cpu.double()[~nan]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        bound = ulps * torch.finfo(got.dtype).eps * scale
    elif isinstance(bound, torch.Tensor):
        bound = bound.double().expand(cpu.shape)[~nan]
    assert bool((err <= bound).all()), f"{what}: off the CPU loops by {err.max().item():.3g}"


def assert_within(out, exact, bound, what=""):
    """|out - exact| <= bound elementwise (exact in float64)."""
    err = (out.double() - exact.double()).abs()
    excess = err - bound.double()
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(exact.shape)}"
    assert bool((excess <= 0).all()), (
        f"{what}: error {err.max().item():.3g} over the bound at "
        f"{tuple(int(i) for i in torch.nonzero(excess > 0)[0])}"
    )


def sum_bound(n_terms, magnitude, dtype):
    """Rounding bound of a sum of n products in any order: 2 n eps * sum |terms| (four
    times the classical n u |terms|, u = eps / 2), plus a float64 reference's own error."""
    eps = torch.finfo(dtype).eps
    return 2.0 * (n_terms + 1) * eps * magnitude + 1e-13 * magnitude
