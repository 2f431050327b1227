"""Identity-indexed batches: `shape` (S, n_shape) rows and `identity` (B,) picking one per
frame, in FlameShape and FlameShapeLandmark.

The contract: the same outputs and gradients as passing `shape=shape[identity]` (each
identity's mesh and joints blended once, then expression and pose per frame); gradients
to the shape rows accumulate over their frames deterministically; an index out of range is
a ValueError on the CPU and a NaN frame where checking would synchronise (a device, or a
compiled graph).
"""

import pytest
import torch

from _oracle import assert_deterministic_and_fully_written, run_with_grads
from _samples import SMALL, flame_inputs
from flame_ext import FlameShape
from flame_ext.fitting import FlameShapeLandmark

F32, F64 = torch.float32, torch.float64
IDENTITY = [2, 0, 1, 2, 2, 0, 1]  # 7 frames of 3 identities, out of order


@pytest.fixture(scope="module")
def modules():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-model notice
        built = {}
        for backend in ("ext", "reference", "medusa"):
            for transforms in ("vertex", "mean", "none"):
                if backend == "medusa" and transforms != "vertex":
                    continue
                built[backend, transforms] = FlameShape(
                    6, 4, device="cpu", model_path=SMALL, backend=backend,
                    transforms=transforms)
        for backend in ("ext", "reference"):
            built[backend, "landmarks"] = FlameShapeLandmark(
                6, 4, "68", device="cpu", model_path=SMALL, backend=backend)
    return built


def _leaves(module, dtype, identity=IDENTITY, rows=3, seed=0):
    values = flame_inputs(module, len(identity), seed, scale=0.4, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    values["shape"] = torch.randn(rows, module.n_shape, generator=gen, dtype=F64).to(dtype)
    leaves = {k: v.requires_grad_(True) for k, v in values.items()}
    return leaves, torch.tensor(identity, dtype=torch.int64)


def _both_ways(module, leaves, identity):
    """(indexed, per-frame rows): outputs and gradients of every leaf, detached."""
    names = list(leaves)

    def indexed(*values):
        return module(identity=identity, **dict(zip(names, values)))

    def per_frame(*values):
        inputs = dict(zip(names, values))
        inputs["shape"] = inputs["shape"][identity]
        return module(**inputs)

    values = list(leaves.values())
    return run_with_grads(indexed, values), run_with_grads(per_frame, values)


@pytest.mark.parametrize("key", [("ext", "vertex"), ("ext", "mean"), ("ext", "none"),
                                 ("reference", "vertex"), ("reference", "none"),
                                 ("medusa", "vertex"), ("ext", "landmarks"),
                                 ("reference", "landmarks")])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_equals_per_frame_shape_rows(modules, key, dtype):
    """float64: the same sums in another grouping, ~1e-15. float32: the identity's blend
    rounds once per row instead of once per frame: a few ulps of ~0.1 m coordinates and of
    gradients of magnitude ~10 (sums over V vertices), so 1e-5 / 1e-4 relative."""
    module = modules[key].to(dtype)
    try:
        leaves, identity = _leaves(module, dtype)
        got, want = _both_ways(module, leaves, identity)
    finally:
        module.float()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_gradcheck(modules, backend):
    module = modules[backend, "vertex"].double()
    try:
        leaves, identity = _leaves(module, F64, identity=[1, 0, 1], rows=2, seed=3)
        names = list(leaves)

        def fn(*values):
            return module(identity=identity, **dict(zip(names, values)))

        assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-7,
                                        fast_mode=True)
    finally:
        module.float()


@pytest.mark.parametrize("key", [("ext", "vertex"), ("ext", "landmarks")])
def test_ext_blends_the_rows_in_the_frames_pass(modules, key):
    """The compiled ops blend the S identity meshes inside blend_shared's pass over the
    tables (forward and backward), not in a blend of their own before it."""
    from torch.profiler import ProfilerActivity, profile

    module = modules[key]
    leaves, identity = _leaves(module, F32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = module(identity=identity, **leaves)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))
            if o is not None).backward()
    counts = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    assert counts.get("flame_ext::blend_shared") == 1
    assert counts.get("flame_ext::blend_shared_backward") == 1
    # what remains of blend: the joints' identity rows and their frames (forward only)
    assert counts.get("flame_ext::blend", 0) == 2


def test_one_row_is_the_shared_identity(modules):
    module = modules["ext", "vertex"]
    leaves, _ = _leaves(module, F32, identity=[0] * 5, rows=1)
    identity = torch.zeros(5, dtype=torch.int64)
    v, R = module(identity=identity, **leaves)
    v1, R1 = module(**leaves)  # shape of batch 1: blended once, broadcast
    assert torch.equal(v, v1) and torch.equal(R, R1)


def test_gradients_are_deterministic(modules, deterministic):
    cases = []
    for key in (("ext", "vertex"), ("ext", "landmarks")):
        module = modules[key]
        leaves, identity = _leaves(module, F32, identity=[1, 0, 1, 1, 0, 1, 1, 0] * 4)
        names = list(leaves)
        cases.append((str(key), lambda *values, m=module, i=identity, n=names: m(
            identity=i, **dict(zip(n, values))), list(leaves.values())))
    assert_deterministic_and_fully_written(cases)


def test_unused_identity_rows_get_zero_gradients(modules):
    module = modules["ext", "none"]
    leaves, identity = _leaves(module, F32, identity=[0, 2, 0], rows=4)
    v, _ = module(identity=identity, **leaves)
    (grad,) = torch.autograd.grad(v.square().sum(), [leaves["shape"]])
    assert torch.count_nonzero(grad[[1, 3]]) == 0
    assert torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[2]) > 0


def test_empty_batch(modules):
    module = modules["ext", "vertex"]
    leaves, identity = _leaves(module, F32, identity=[], rows=2)
    v, R = module(identity=identity, **leaves)
    assert v.shape == (0, module.v_template.shape[0], 3)


@pytest.mark.parametrize("identity, exc, match", [
    ([0, 3], ValueError, r"identity\[1\] = 3 is out of range for 3 shape rows"),
    ([-1, 0], ValueError, r"identity\[0\] = -1 is out of range"),
    ([[0, 1]], ValueError, "identity must have 1 dimensions"),
    ([0.0, 1.0], TypeError, "identity"),
])
def test_bad_identity_is_named(modules, identity, exc, match):
    module = modules["ext", "vertex"]
    leaves, _ = _leaves(module, F32, identity=[0, 1])
    with pytest.raises(exc, match=match):
        module(identity=torch.tensor(identity), **leaves)


def test_identity_batch_mismatches_are_named(modules):
    module = modules["ext", "vertex"]
    leaves, identity = _leaves(module, F32)
    with pytest.raises(ValueError, match="batch_size is 3 but identity has 7 frames"):
        module(batch_size=3, identity=identity, **leaves)
    leaves["expr"] = leaves["expr"][:2]
    with pytest.raises(ValueError, match="expr has batch size 2"):
        module(identity=identity, **leaves)
    with pytest.raises(ValueError, match="at least one shape row"):
        module(identity=identity, shape=leaves["shape"][:0])
    with pytest.raises(TypeError, match="identity must be a torch.Tensor"):
        module(identity=[0, 1], shape=leaves["shape"])


@pytest.mark.parametrize("key", [("ext", "vertex"), ("ext", "landmarks")])
def test_compiled_fullgraph(modules, key, fresh_dynamo):
    """torch.compile(fullgraph=True): the same values and gradients; inside a graph the
    range is not checked on the host (that would break the graph): an index out of range
    gives its frame NaN outputs and leaves every other frame exact."""
    module = modules[key]
    leaves, identity = _leaves(module, F32)
    names = list(leaves)
    compiled = torch.compile(module, fullgraph=True)

    def eager(*values):
        return module(identity=identity, **dict(zip(names, values)))

    def traced(*values):
        return compiled(identity=identity, **dict(zip(names, values)))

    values = list(leaves.values())
    for a, b in zip(run_with_grads(traced, values), run_with_grads(eager, values)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bad = identity.clone()
    bad[3] = 7
    with torch.no_grad():
        out = compiled(identity=bad, **leaves)
        ref = module(identity=identity, **leaves)
    out = out[0] if isinstance(out, tuple) else out
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert out[3].isnan().all()
    keep = [i for i in range(len(identity)) if i != 3]
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_out_of_range_frames_are_nan_without_a_sync(quiet):
    module = FlameShape(6, 4, device="cuda", model_path=SMALL, backend="ext")
    leaves, identity = _leaves(module, F32)
    leaves = {k: v.detach().cuda().requires_grad_(True) for k, v in leaves.items()}
    bad = identity.cuda()
    bad[3] = 7
    bad[5] = -2
    v, R = module(identity=bad, **leaves)
    assert v[3].isnan().all() and v[5].isnan().all() and R[3].isnan().all()
    keep = [0, 1, 2, 4, 6]
    good, _ = module(identity=identity.cuda(), **leaves)
    torch.testing.assert_close(v[keep], good[keep])
    torch.autograd.grad(v[keep].sum(), [leaves["shape"]])  # no device assert
    torch.cuda.synchronize()


def test_identity_rows_sum_gradients_in_frame_order():
    """On the CPU each row's gradient is the sum of its frames' gradients in frame order,
    bit for bit and for any thread count (frames out of order, magnitudes 1e-3..1e3 so
    that another order rounds differently)."""
    from flame_ext._parametric import identity_rows

    gen = torch.Generator().manual_seed(0)
    frames = 64
    identity = torch.randperm(frames, generator=gen) * 8 // frames
    rows = torch.randn(8, 999, generator=gen, requires_grad=True)
    grad = torch.randn(frames, 999, generator=gen) * torch.logspace(-3, 3, frames)[:, None]
    want = torch.zeros(8, 999)
    for frame in range(frames):
        want[identity[frame]] += grad[frame]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            (got,) = torch.autograd.grad(identity_rows(rows, identity), rows, grad)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)
