"""The decoders together: pickling, memory over many calls, determinism, threads, and
the CUDA-only behaviour (graph capture of a decode, non-default streams).

Each decoder's own contract is tested in tests/test_decoders_{shape,landmark,tex}.py,
the fitting decoder in tests/test_fitting.py, the path choice in tests/test_backend.py.
"""

import pytest
import torch

from _oracle import needs_kernels
from _process import in_threads, live_tensors, rss_bytes
from _samples import FULL, SMALL, flame_inputs, full_poses
from flame_ext import FlameLandmark, FlameShape, FlameTex


def _shape(backend="ext", device="cpu", **kwargs):
    return FlameShape(6, 4, device=device, model_path=SMALL, backend=backend, **kwargs)


def _landmark(backend="ext", device="cpu"):
    return FlameLandmark(device=device, model_path=SMALL, backend=backend)


def test_decoders_pickle_and_run_where_no_constructor_ran(monkeypatch):
    """torch.save of a whole module, or a module sent to a spawned worker, arrives in a
    process where no decoder constructor prepared the compiled-op step table."""
    import pickle

    from flame_ext import FlameShapeLandmark, _backend

    modules = [_shape("ext"), _landmark("ext"), FlameTex(SMALL, n_tex=3, backend="ext"),
               FlameShapeLandmark(6, 4, model_path=SMALL, backend="ext", device="cpu")]
    blobs = [pickle.dumps(m) for m in modules]
    monkeypatch.setattr(_backend, "_STEPS", {"reference": _backend._STEPS["reference"]})
    monkeypatch.setattr(_backend, "_AUTO", {})
    shape, landmark, texture, fit = (pickle.loads(b) for b in blobs)
    gen = torch.Generator().manual_seed(8)
    inputs = flame_inputs(shape, 2, gen)
    v, R = shape(**inputs)
    torch.testing.assert_close(v, modules[0](**inputs)[0])
    assert landmark(v, shape.get_full_pose().expand(2, -1)).shape == (2, 68, 3)
    assert texture(torch.randn(2, 3)).shape == (2, 3, 256, 256)
    assert fit(**inputs).shape == (2, 68, 3)
    # the derived buffers come back with load_state_dict on the unpickled module too
    shape.load_state_dict(modules[0].state_dict())
    torch.testing.assert_close(shape(**inputs)[0], v)


def _derivations(monkeypatch, classes):
    """The groups each `_compute_derived` call of `classes` computes, in call order."""
    calls = []
    for cls in classes:
        compute = cls._compute_derived

        def spy(self, groups, compute=compute):
            calls.append(tuple(groups))
            return compute(self, groups)
        monkeypatch.setattr(cls, "_compute_derived", spy)
    return calls


def test_constructors_derive_each_table_once_and_conversions_again(monkeypatch):
    """A constructor derives every group once, on the module's device (FlameShape used to
    derive on the CPU and again in its own .to(device)); .double() and load_state_dict
    derive them again, and a module built by from_decoders follows its buffers too."""
    from flame_ext import FlameShapeLandmark

    shape = _shape("ext")
    calls = _derivations(monkeypatch, [FlameShape, FlameTex, FlameShapeLandmark])
    builds = {
        FlameShape: lambda: _shape("ext"),
        FlameTex: lambda: FlameTex(SMALL, n_tex=3, backend="ext"),
        FlameShapeLandmark: lambda: FlameShapeLandmark(6, 4, model_path=SMALL,
                                                       backend="ext", device="cpu"),
        "from_decoders": lambda: FlameShapeLandmark.from_decoders(shape, _landmark("ext")),
    }
    for kind, build in builds.items():
        calls.clear()
        module = build()
        own = [c for c in calls if set(c) == set(type(module)._derived_from)]
        assert len(own) == 1, (kind, calls)
        calls.clear()
        module.double()
        assert calls and set(calls[-1]) == set(type(module)._derived_from), kind
        calls.clear()
        module.load_state_dict(module.state_dict())
        assert calls and set(calls[-1]) == set(type(module)._derived_from), kind


# --- memory, determinism, threads ---------------------------------------------------------


def _bad_index_states():
    """(decoder maker, state key, how the value is spoiled, error, message) for each index
    table of FlameShape and FlameLandmark ('68' and 'mp')."""
    shape, lmk68 = _shape, _landmark
    lmkmp = lambda: FlameLandmark("mp", device="cpu", model_path=SMALL)  # noqa: E731
    past = lambda bound: lambda t: t.view(-1).__setitem__(0, bound)  # noqa: E731
    return [
        (shape, "tris", past(-1), ValueError, "holds index -1"),
        (shape, "tris", lambda t: t.view(-1).__setitem__(5, t.max() + 1), ValueError,
         "out of range"),
        (shape, "parents", lambda t: t.__setitem__(2, 2), ValueError, "kinematic tree"),
        (shape, "parents", lambda t: t.__setitem__(0, 0), ValueError, "kinematic tree"),
        (shape, "tris", "float", TypeError, "integer indices"),
        (lmk68, "tris", past(10**6), ValueError, "out of range"),
        (lmk68, "lmk_faces_idx", past(10**6), ValueError, "out of range"),
        (lmk68, "dynamic_lmk_faces_idx", past(-2), ValueError, "holds index -2"),
        (lmkmp, "lmk_faces_idx", past(10**6), ValueError, "out of range"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_index_states())))
def test_a_bad_index_table_is_refused_at_load_and_nothing_is_copied(case, quiet):
    """load_state_dict checks the index tables of the state dict before it copies
    anything: the error names the entry, the module keeps its tables and still runs."""
    make, key, spoil, error, message = _bad_index_states()[case]
    state = {k: v.clone() for k, v in make().state_dict().items()}
    if spoil == "float":
        state[key] = state[key].float()
    else:
        spoil(state[key])
    module = make()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=message) as info:
        module.load_state_dict(state)
    assert repr(key) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    module.load_state_dict(before)  # a good state dict still loads


def test_memory_flat_over_1000_calls(ops, device, quiet):
    """FlameShape (ext) + FlameLandmark forward and backward 1,000 times, FlameTex 100
    times (each call moves 3 MB): resident memory and live tensors stay where they were.

    A leak of any per-call tensor would show: R alone is 64 x 67 x 16 floats (274 KB) per
    call, 270 MB over the loop, a texture 1.5 MB per call, 150 MB; the bound (32 MB of
    resident memory) leaves room for the allocator's own bookkeeping. The number of live
    tensors must not grow at all.
    """
    needs_kernels(device, "blend", "skin", "landmarks")
    shape = _shape("ext", device, parameters=["expr", "jaw_pose"])
    landmark = _landmark("ext", device)
    texture = FlameTex(SMALL, n_tex=5, backend="ext").to(device)
    gen = torch.Generator().manual_seed(0)
    code = torch.randn(2, 5, generator=gen).to(device).requires_grad_(True)
    global_pose = (0.2 * torch.randn(64, 3, generator=gen)).to(device)

    def decode():
        v, R = shape(global_pose=global_pose)
        lmk = landmark(v, shape.get_full_pose().expand(64, -1))
        (v.square().sum() + R.sum() + lmk.sum()).backward()
        shape.zero_grad(set_to_none=True)

    def albedo():
        texture(code).mean().backward()
        code.grad = None

    def loop(n_decode, n_albedo):
        for i in range(n_decode):
            decode()
            if i % 10 == 0 and i // 10 < n_albedo:
                albedo()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool only adds contention here
    try:
        loop(100, 10)  # warm-up: the allocator's pools, the op registrations, autograd
        if device.type == "cuda":
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated(device)
        rss, tensors = rss_bytes(), live_tensors()
        loop(1000, 100)
    finally:
        torch.set_num_threads(threads)
    assert live_tensors() <= tensors
    assert rss_bytes() - rss < 32 << 20, f"grew by {(rss_bytes() - rss) >> 20} MB"
    if device.type == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device) <= allocated


def test_decoders_deterministic(ops, device, deterministic, quiet):
    needs_kernels(device, "blend")
    shape = _shape("ext", device, parameters=["shape"])
    landmark = _landmark("ext", device)
    texture = FlameTex(SMALL, n_tex=5, backend="ext").to(device)

    def run():
        inputs = flame_inputs(shape, 6, 0, requires_grad=True)
        inputs.pop("shape")
        code = torch.randn(2, 5, generator=torch.Generator().manual_seed(1)).to(device)
        code.requires_grad_(True)
        v, R = shape(**inputs)
        lmk = landmark(v, shape.get_full_pose().expand(6, -1))
        tex = texture(code)
        loss = v.square().sum() + R.square().sum() + lmk.square().sum() + tex.square().mean()
        grads = torch.autograd.grad(loss, [shape.shape, code, *inputs.values()])
        return [v, R, lmk, tex, *grads]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b) and not a.isnan().any()


def test_threads_decoding_with_separate_modules(ops, device, quiet):
    """Two threads, each with its own FlameShape + FlameLandmark, decode different inputs
    forward and backward 50 times: the same bits as one thread doing it alone (every op's
    result is independent of the thread that runs it and of the thread count)."""
    needs_kernels(device, "blend")

    def decode(i, shape, landmark):
        inputs = flame_inputs(shape, 3 + i, 10 + i, requires_grad=True)
        v, R = shape(**inputs)
        lmk = landmark(v, full_poses(inputs))
        grads = torch.autograd.grad(v.square().sum() + R.sum() + lmk.sum(), list(inputs.values()))
        return [v.detach(), R.detach(), lmk.detach(), *grads]

    modules = [(_shape("ext", device), _landmark("ext", device)) for _ in range(2)]
    alone = [decode(i, *modules[i]) for i in range(2)]

    def worker(i):
        return [decode(i, *modules[i]) for _ in range(50)]

    for i, runs in enumerate(in_threads(worker, 2)):
        for run in runs:
            assert all(torch.equal(a, b) for a, b in zip(run, alone[i]))


def test_threads_sharing_one_module_for_inference(ops, quiet):
    """Forward does not change module state, so one module serves several threads."""
    shape = _shape("ext")
    batches = [flame_inputs(shape, 2, i) for i in range(4)]
    with torch.no_grad():
        alone = [shape(**b) for b in batches]

        def worker(i):
            return [shape(**batches[i]) for _ in range(30)]

        results = in_threads(worker, 4)
    for i, runs in enumerate(results):
        for v, R in runs:
            assert torch.equal(v, alone[i][0]) and torch.equal(R, alone[i][1])


# --- CUDA only ----------------------------------------------------------------------------


@pytest.mark.cuda
def test_decoders_capture_in_a_cuda_graph(ops, quiet):
    shape = FlameShape(device="cuda", model_path=FULL, backend="ext")
    lmk = FlameLandmark("68", device="cuda", model_path=FULL, backend="ext")
    static = flame_inputs(shape, 16, 1)
    for _ in range(2):  # warm up on a side stream, as capture requires
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            v, R = shape(**static)
            out = lmk(v, full_poses(static))
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v, R = shape(**static)
        out = lmk(v, full_poses(static))
    fresh = flame_inputs(shape, 16, 2)
    for k in static:
        static[k].copy_(fresh[k])
    graph.replay()
    v_eager, R_eager = shape(**fresh)
    torch.testing.assert_close(v, v_eager)
    torch.testing.assert_close(R, R_eager)
    torch.testing.assert_close(out, lmk(v_eager, full_poses(fresh)))


@pytest.mark.cuda
def test_non_default_stream(ops, quiet):
    shape = FlameShape(device="cuda", model_path=FULL, backend="ext")
    tex = FlameTex(model_path=FULL, n_tex=50, backend="ext").cuda()
    inputs = flame_inputs(shape, 32, 4)
    code = torch.randn(8, 50, device="cuda")
    v_default, _ = shape(**inputs)
    t_default = tex(code)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        v, _ = shape(**inputs)
        t = tex(code)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(v, v_default)
    torch.testing.assert_close(t, t_default)
