"""Hardening: scale (64-bit indexing), memory, determinism, concurrency, hostile files.

- Scale: each op family reads or writes an element whose flat index is past 2^31 (the
  line where 32-bit index arithmetic wraps), on the CPU, without 8 GB of RAM: the big
  inputs are anonymous memory maps that the kernel backs with the shared zero page until
  a page is written, so only the few pages the test marks (and the outputs) cost memory.
  Where an output must be dense the test is marked slow (~2 GB, seconds).
- Memory: 1,000 forward + backward passes leave the process's resident memory and its
  live tensors where they were after warm-up.
- Determinism: under torch.use_deterministic_algorithms(True) every op runs (our kernels
  have no atomics) and repeated runs give bit-identical outputs and gradients; on the CPU
  also for any thread count. Deterministic mode fills fresh tensors with NaN, so any
  output element a kernel forgets to write shows up here as a NaN.
- Concurrency: model loading and the one-time warnings from many threads at once;
  decoding in threads gives the single-threaded bits.
- Hostile files beyond tests/test_io.py: memo bombs (shared sub-lists that expand to
  1e9 elements), archive members declaring huge arrays, damaged zip fields, object arrays
  carrying payloads, torch storages carrying payloads, a sweep of dangerous globals, and
  values beyond float32's range. Each is refused naming the file; nothing from it runs.
"""

import contextlib
import gc
import io
import mmap
import os
import pickle
import signal
import struct
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch

from flame_ext import FlameLandmark, FlameShape, FlameTex, _backend, _ops, decoders, reference
from flame_ext import synthetic
from flame_ext import io as fio
from flame_ext.decoders import INPUT_NAMES

SMALL = "synthetic-small"
F32, F64 = torch.float32, torch.float64
INT31 = 2**31


def _page_bytes():
    return os.sysconf("SC_PAGE_SIZE")


def _rss_bytes():
    """Resident set size of this process, from /proc (no psutil here)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_bytes()


@contextlib.contextmanager
def _hang_guard(seconds=60):
    """Turns a hang into a failure (not a timing assert: the limit is minutes away from
    what any of these take)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def needs_kernels(device, *ops):
    """CUDA cases need the op families' CUDA kernels in this build (blend's are optional
    while csrc/blend has no .cu)."""
    device = torch.device(device)
    for op in ops:
        if device.type == "cuda" and not _ops.has_kernel(op, "CUDA"):
            pytest.skip(f"flame_ext::{op} has no CUDA kernel in this build")


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-model notice
        yield


def _shape(backend="ext", device="cpu", **kwargs):
    return FlameShape(6, 4, device=device, model_path=SMALL, backend=backend, **kwargs)


def _inputs(batch, seed, device="cpu", dtype=F32, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    sizes = {"shape": 6, "expr": 4, "eye_pose": 6}
    return {
        name: (scale * torch.randn(batch, sizes.get(name, 3), generator=gen, dtype=F64))
        .to(device, dtype).requires_grad_(True)
        for name in INPUT_NAMES
    }


# --------------------------------------------------------------------------------------
# Scale: 64-bit index arithmetic


def _big(shape, dtype, device):
    """A zero tensor of `shape` that costs (almost) no memory until written, on the CPU:
    an anonymous private map, which reads as zeros and is committed page by page. On a
    GPU, real (zeroed) memory, when the device has it."""
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        if torch.cuda.mem_get_info(device)[0] < nbytes + (2 << 30):
            pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory")
        return torch.zeros(shape, dtype=dtype, device=device)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError) as e:
        pytest.skip(f"cannot reserve {nbytes / 2**30:.1f} GiB of address space: {e}")
    # frombuffer keeps `buf` alive as long as the tensor.
    return torch.frombuffer(buf, dtype=dtype).view(shape)


@pytest.fixture
def nondeterministic_mode():
    """Deterministic mode fills every fresh output with NaN (committing its pages), which
    these tests do not need: they run with it off whatever the session's setting."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before)


def test_landmarks_read_past_2_31(ops, device, nondeterministic_mode):
    """v (B, V, 3) of 2.16e9 elements: the last sample starts past 2^31, so its base
    offset b * V * 3 and every corner read there need 64-bit arithmetic."""
    from flame_ext._ops import landmarks

    batch, n_verts = 1000, 720_000
    assert (batch - 1) * n_verts * 3 > INT31
    v = _big((batch, n_verts, 3), F32, device)
    tris = torch.tensor([[0, n_verts // 2, n_verts - 1]], device=device)
    corners = torch.arange(9.0, device=device).view(3, 3)
    marked = (0, 1, 500, batch - 2, batch - 1)
    for b in marked:
        v[b, tris[0]] = corners + b
    before = _rss_bytes()
    lmk = landmarks.landmarks(
        v, None, tris, torch.tensor([0], device=device),
        torch.tensor([[0.25, 0.5, 0.25]], device=device),
    )
    expected = torch.zeros(batch, 1, 3)
    for b in marked:  # 0.25 * (b + 0..2) + 0.5 * (b + 3..5) + 0.25 * (b + 6..8)
        expected[b, 0] = torch.tensor([3.0, 4.0, 5.0]) + b
    torch.testing.assert_close(lmk.cpu(), expected, rtol=0, atol=0)
    if device.type == "cpu":  # the reads went to the zero page: nothing was committed
        assert _rss_bytes() - before < 256 << 20


@pytest.mark.slow
def test_skin_backward_read_past_2_31(ops, device, nondeterministic_mode):
    """grad_vertex_transforms (B, V, 4, 4) of 2.3e9 elements: the last sample's rows sit
    past 2^31, read at 16 * (b * V + v). Its only non-zero vertex must reach
    grad_transforms of that sample and no other. grad_v_posed (1.7 GB) is dense."""
    batch, n_verts = 16, 9_000_000
    assert (batch - 1) * n_verts * 16 > INT31
    v_posed = _big((batch, n_verts, 3), F32, device)
    grad_v = _big((batch, n_verts, 3), F32, device)
    grad_vt = _big((batch, n_verts, 4, 4), F32, device)
    weights = _big((n_verts, 1), F32, device)
    weights[-1] = 1.0
    transforms = torch.eye(4, device=device).repeat(batch, 1, 1, 1)
    transforms[:, 0, :3, 3] = torch.arange(3.0 * batch, device=device).view(batch, 3)
    mark = torch.arange(16.0, device=device).view(4, 4)
    grad_vt[-1, -1] = mark
    grad_vt[0, -1] = -mark
    v_posed[-1, -1] = torch.tensor([1.0, 2.0, 3.0])
    grad_v[-1, -1] = torch.tensor([1.0, 10.0, 100.0])
    grad_v_posed, grad_transforms = ops.skin_backward(
        grad_v, grad_vt, v_posed, transforms, weights
    )
    expected = torch.zeros(batch, 1, 4, 4)
    expected[0, 0] = -mark.cpu()
    # grad T_v = grad_v (x) [v_posed; 1] on the top rows, plus grad_vertex_transforms.
    expected[-1, 0] = mark.cpu()
    expected[-1, 0, :3] += torch.tensor([1.0, 10.0, 100.0])[:, None] * torch.tensor(
        [1.0, 2.0, 3.0, 1.0]
    )
    torch.testing.assert_close(grad_transforms.cpu(), expected, rtol=0, atol=0)
    # T_v of the last vertex is A (weight 1, a translation): grad_v_posed = R^T grad_v.
    torch.testing.assert_close(grad_v_posed[-1, -1].cpu(), torch.tensor([1.0, 10.0, 100.0]))
    assert int(torch.count_nonzero(grad_v_posed)) == 3


@pytest.mark.slow
def test_blend_reads_past_2_31(ops, device, nondeterministic_mode):
    """Forward: dirs (N, K) of 2.16e9 elements (row offset n * K past 2^31, batch 1 so
    the output stays small). Backward: grad_out (B, N) with B * N past 2^31 (the hand
    loop's sample offset s * N), dirs (N, 1)."""
    needs_kernels(device, "blend")
    n, k = 5_400_000, 400
    assert (n - 1) * k > INT31
    dirs = _big((n, k), F32, device)
    dirs[-1] = torch.arange(float(k))
    dirs[0] = 1.0
    out = ops.blend(torch.zeros(n, device=device), dirs, torch.ones(1, k, device=device),
                    torch.empty(0, n, device=device), torch.empty(1, 0, device=device))
    assert out[0, -1].item() == k * (k - 1) / 2 and out[0, 0].item() == k
    assert int(torch.count_nonzero(out)) == 2
    del dirs, out

    batch, n = 4, 720_000_000  # batch <= 4: the CPU hand loop (larger batches use BLAS)
    assert (batch - 1) * n > INT31
    grad_out = _big((batch, n), F32, device)
    grad_out[-1, -1] = 2.0
    grad_out[0, -1] = 5.0
    dirs = _big((n, 1), F32, device)
    dirs[-1] = 3.0
    grad_coeffs, _ = ops.blend_backward(grad_out, dirs, torch.empty(0, n, device=device),
                                        True, False)
    torch.testing.assert_close(grad_coeffs.cpu(), torch.tensor([[15.0], [0.0], [0.0], [6.0]]))


# --------------------------------------------------------------------------------------
# Memory stays flat over repeated calls


def _live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


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
    landmark = FlameLandmark(device=device, model_path=SMALL, backend="ext")
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
        rss, tensors = _rss_bytes(), _live_tensors()
        loop(1000, 100)
    finally:
        torch.set_num_threads(threads)
    assert _live_tensors() <= tensors
    assert _rss_bytes() - rss < 32 << 20, f"grew by {(_rss_bytes() - rss) >> 20} MB"
    if device.type == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device) <= allocated


# --------------------------------------------------------------------------------------
# Determinism


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _op_cases(device, dtype):
    """(name, function of leaves, leaves) for every op, over sizes that take each path:
    several reduction chunks, empty dimensions, the blend hand loop and BLAS."""
    from flame_ext._ops import blend, landmarks, skin

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype).requires_grad_(True)

    def index(high, *shape):
        return torch.randint(0, high, shape, generator=gen).to(device)

    parents = torch.tensor([-1, 0, 1, 1, 1])
    tris = index(40, 60, 3)
    cases = []
    for batch in (0, 3, 40):
        cases.append((f"blend B={batch}", blend.blend,
                      [rand(1, 613), rand(613, 37), rand(batch, 37), rand(9, 613), rand(batch, 9)]))
    cases.append(("blend N=0", blend.blend, [rand(0), rand(0, 5), rand(3, 5)]))
    cases.append(("blend K=0", blend.blend, [rand(50), rand(50, 0), rand(3, 0)]))
    for batch in (0, 5):
        cases.append((f"rigid_transforms B={batch}",
                      lambda p, j: skin.rigid_transforms(p, j, parents),
                      [rand(batch, 5, 3), rand(batch, 5, 3)]))
    for n_verts in (0, 1100):
        for write in (True, False):
            cases.append((f"skin V={n_verts} T={write}",
                          lambda v, a, w, write=write: skin.skin(v, a, w, write),
                          [rand(3, n_verts, 3), rand(3, 5, 4, 4), rand(n_verts, 5)]))
    bary = torch.rand(7, 3, generator=gen, dtype=F64).to(device, dtype)
    dyn_faces, dyn_bary = index(60, 79, 5), torch.rand(79, 5, 3, generator=gen).to(device, dtype)
    poses = torch.randn(33, 15, generator=gen).to(device, dtype)
    faces = index(60, 7)
    cases.append(("landmarks contour",
                  lambda v: landmarks.landmarks(v, poses, tris, faces, bary, dyn_faces, dyn_bary),
                  [rand(33, 40, 3)]))
    cases.append(("landmarks static", lambda v: landmarks.landmarks(v, None, tris, faces[:0],
                                                                     bary[:0]),
                  [rand(33, 40, 3)]))
    return cases


def _run(fn, leaves, seed=1):
    outputs = fn(*leaves)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=F64).to(o) for o in outputs]
    if sum(o.numel() for o in outputs):
        got = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    else:
        got = [None] * len(leaves)
    return [o.detach() for o in outputs] + [g for g in got if g is not None]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_ops_deterministic_and_fully_written(ops, device, dtype, deterministic):
    """Runs (no 'does not have a deterministic implementation' error), repeats bit for
    bit, and writes every output element: fresh memory is NaN in this mode and every
    input is finite, so a NaN in an output is an element no kernel wrote."""
    for name, fn, leaves in _op_cases(device, dtype):
        if name.startswith("blend") and device.type == "cuda" and not _ops.has_kernel(
            "blend", "CUDA"
        ):
            continue
        first, second = _run(fn, leaves), _run(fn, leaves)
        for a, b in zip(first, second):
            assert torch.equal(a, b), name
            assert not a.isnan().any(), f"{name}: unwritten (NaN) output elements"


def test_cpu_results_do_not_depend_on_the_thread_count(ops):
    """Every reduction runs over fixed chunks in a fixed order, so 1 and 2 threads give
    the same bits (batches that take BLAS in blend are excluded: MKL's blocking may
    depend on the thread count)."""
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = [_run(fn, leaves) for name, fn, leaves in _op_cases("cpu", F32)
                          if "B=40" not in name]
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[1], results[2]):
        assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_decoders_deterministic(ops, device, deterministic, quiet):
    needs_kernels(device, "blend")
    shape = _shape("ext", device, parameters=["shape"])
    landmark = FlameLandmark(device=device, model_path=SMALL, backend="ext")
    texture = FlameTex(SMALL, n_tex=5, backend="ext").to(device)

    def run():
        inputs = _inputs(6, 0, device)
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


# --------------------------------------------------------------------------------------
# Concurrency


def _in_threads(fn, count):
    """Runs fn(i) in `count` threads started together; returns the results in order and
    re-raises the first exception."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _clear_synthetic_caches():
    for name in ("_build_model", "_build_bfm", "_build_flame_texture", "_mesh", "_size_spec"):
        cached = getattr(synthetic, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def test_concurrent_model_loading_and_warning(monkeypatch):
    """Eight threads load the synthetic model (caches cleared, so they build it at the
    same time) and the texture: every one gets the same arrays, and the synthetic-model
    notice is given exactly once."""
    expected = fio.load_flame_model(SMALL)
    _clear_synthetic_caches()
    monkeypatch.setattr(fio, "_warned_synthetic", set())
    notices = []
    real_warn = warnings.warn

    def counting_warn(message, *args, **kwargs):
        if "SYNTHETIC FLAME model" in str(message):
            notices.append(message)
        else:
            real_warn(message, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", counting_warn)

    def load(i):
        model = fio.load_flame_model(SMALL)
        embedding = fio.load_landmark_embedding("68", SMALL, num_faces=model.faces.shape[0])
        texture = fio.load_texture_space(SMALL, n_tex=1 + i % 5)
        return model, embedding, texture

    results = _in_threads(load, 8)
    assert len(notices) == 1
    for model, embedding, texture in results:
        for name in ("faces", "v_template", "shapedirs", "posedirs", "J_regressor",
                     "parents", "lbs_weights"):
            np.testing.assert_array_equal(getattr(model, name), getattr(expected, name))
        assert embedding.dynamic_lmk_faces_idx.shape == (79, 17)
    # Components are the same whatever n_tex built them.
    first = results[4][2].basis  # n_tex = 5
    for _, _, texture in results:
        np.testing.assert_array_equal(texture.basis, first[:, : texture.n_tex])


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
    results = _in_threads(lambda i: _ops.available(), 8)
    assert len(set(results)) == 1
    assert len(loads) == (1 if os.environ.get("FLAME_EXT_LIB") else 0)
    monkeypatch.setattr(_backend, "_warned_no_ext", False)
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda *a, **k: calls.append(a))
    _in_threads(lambda i: _backend._warn_no_extension(), 8)
    assert len(calls) == 1


def test_threads_decoding_with_separate_modules(ops, device, quiet):
    """Two threads, each with its own FlameShape + FlameLandmark, decode different inputs
    forward and backward 50 times: the same bits as one thread doing it alone (every op's
    result is independent of the thread that runs it and of the thread count)."""
    needs_kernels(device, "blend")

    def decode(i, shape, landmark):
        inputs = _inputs(3 + i, seed=10 + i, device=device)
        v, R = shape(**inputs)
        lmk = landmark(v, torch.cat([inputs[n] for n in decoders.POSE_NAMES], dim=1))
        grads = torch.autograd.grad(v.square().sum() + R.sum() + lmk.sum(), list(inputs.values()))
        return [v.detach(), R.detach(), lmk.detach(), *grads]

    modules = [(_shape("ext", device), FlameLandmark(device=device, model_path=SMALL,
                                                     backend="ext"))
               for _ in range(2)]
    alone = [decode(i, *modules[i]) for i in range(2)]

    def worker(i):
        return [decode(i, *modules[i]) for _ in range(50)]

    for i, runs in enumerate(_in_threads(worker, 2)):
        for run in runs:
            assert all(torch.equal(a, b) for a, b in zip(run, alone[i]))


def test_threads_sharing_one_module_for_inference(ops, quiet):
    """Forward does not change module state, so one module serves several threads."""
    shape = _shape("ext")
    batches = [{k: v.detach() for k, v in _inputs(2, seed=i).items()} for i in range(4)]
    with torch.no_grad():
        alone = [shape(**b) for b in batches]

        def worker(i):
            return [shape(**batches[i]) for _ in range(30)]

        results = _in_threads(worker, 4)
    for i, runs in enumerate(results):
        for v, R in runs:
            assert torch.equal(v, alone[i][0]) and torch.equal(R, alone[i][1])


# --------------------------------------------------------------------------------------
# Hostile and broken files (beyond tests/test_io.py)


def _model_raw(seed=0, V=12, F=10, S=4, E=3, J=5):
    """A small valid model dict, laid out as generic_model.pkl holds it."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.1, 1.0, (V, J))
    regressor = rng.uniform(0.1, 1.0, (J, V))
    parents = np.array([4294967295] + [max(0, j - 1) for j in range(1, J)], dtype=np.int64)
    return {
        "f": rng.integers(0, V, (F, 3)).astype(np.uint32),
        "v_template": rng.normal(size=(V, 3)),
        "shapedirs": rng.normal(size=(V, 3, S + E)),
        "posedirs": rng.normal(size=(V, 3, 9 * (J - 1))),
        "J_regressor": regressor / regressor.sum(1, keepdims=True),
        "kintree_table": np.stack([parents, np.arange(J)]),
        "weights": weights / weights.sum(1, keepdims=True),
        fio.N_SHAPE_KEY: S,
    }


def _write_pickle(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


class Payload:
    """Unpickling it calls func(*args): what a malicious file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch(marker):
    return Payload(os.system, f"touch {marker}")


def _memo_bomb(levels=3, width=1000):
    """Nested lists sharing one sub-list per level: width ** levels elements, a few KB
    pickled (the memo stores each list once)."""
    bomb = [0] * width
    for _ in range(levels - 1):
        bomb = [bomb] * width
    return bomb


@pytest.mark.parametrize("where", ["f", "chumpy", "sparse", "landmarks"])
def test_memo_bomb_refused_without_expanding(tmp_path, where):
    """A ~30 KB pickle whose lists expand to 1e9 elements (as an array, as a chumpy
    value, as sparse data, in the landmark file): refused by counting, before numpy would
    spend minutes and 8 GB building the array."""
    bomb = _memo_bomb()
    if where == "landmarks":
        raw = dict.fromkeys(fio._LMK68_KEYS, np.zeros(3, np.int64))
        raw["static_lmk_faces_idx"] = bomb
        path = tmp_path / "landmark_embedding.npy"
        np.save(path, raw, allow_pickle=True)
        load = lambda: fio.load_landmark_embedding("68", path)  # noqa: E731
    else:
        path = tmp_path / "generic_model.pkl"
        if where == "f":
            _write_pickle(path, dict(_model_raw(), f=bomb))
        elif where == "chumpy":
            path.write_bytes(_dumps_with_globals(dict(_model_raw(), v_template=_Ch(bomb))))
        else:
            state = {"_shape": (5, 12), "data": bomb, "indices": np.zeros(1, np.int32),
                     "indptr": np.zeros(13, np.int32)}
            path.write_bytes(_dumps_with_globals(dict(_model_raw(), J_regressor=_Csc(state))))
        load = lambda: fio.load_flame_model(path)  # noqa: E731
    assert path.stat().st_size < 100_000
    rss = _rss_bytes()
    with _hang_guard(), pytest.raises(ValueError, match=f"{path}.*nested list of more than"):
        load()
    assert _rss_bytes() - rss < 512 << 20


class _Ch:
    """Pickled as chumpy.ch.Ch holding `x`."""

    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        return (_copyreg_reconstructor(), (_named("chumpy.ch", "Ch"), object, None),
                {"x": self.x})


class _Csc:
    """Pickled as scipy.sparse.csc_matrix with the given state."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (_copyreg_reconstructor(), (_named("scipy.sparse._csc", "csc_matrix"), object,
                                           None), self.state)


def _named(module, name):
    """A class that pickles as the global module.name (whatever it really is)."""
    cls = type(name, (), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


def _copyreg_reconstructor():
    import copyreg

    return copyreg._reconstructor


def _dumps_with_globals(obj):
    """Pickles obj, writing classes as GLOBAL module.name from their declared path."""
    buf = io.BytesIO()
    pickler = pickle._Pickler(buf, protocol=2)

    def save_global(o, name=None, pickler=pickler):
        pickler.write(pickle.GLOBAL + f"{o.__module__}\n{o.__qualname__}\n".encode())
        pickler.memoize(o)

    pickler.dispatch = dict(pickle._Pickler.dispatch)
    pickler.dispatch[type] = lambda self, o: save_global(o)
    pickler.dump(obj)
    return buf.getvalue()


def _npy_bytes(shape, dtype="<f8", data=b""):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + data


@pytest.mark.parametrize("which", ["mean", "basis", "mediapipe"])
@pytest.mark.parametrize("declared", [3 * 4096**2, 3 * 2**48], ids=["400MB", "6PB"])
def test_npz_member_declaring_a_huge_array(tmp_path, which, declared):
    """A member's header declares far more data than it holds: refused naming the file
    and member before numpy allocates the declared size (6 PB: a MemoryError; 400 MB:
    memory for nothing)."""
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as z:
        if which == "mediapipe":
            z.writestr("lmk_face_idx.npy", _npy_bytes((declared,), "<u4", b"\0" * 64))
            z.writestr("lmk_b_coords.npy", _npy_bytes((4, 3), data=b"\0" * 96))
            z.writestr("landmark_indices.npy", _npy_bytes((4,), "<i8", b"\0" * 32))
        else:
            big, small = _npy_bytes((declared,), data=b"\0" * 64), _npy_bytes((48,), data=b"\0" * 384)
            big_pc = _npy_bytes((declared, 2), data=b"\0" * 64)
            z.writestr("MU.npy", big if which == "mean" else small)
            z.writestr("PC.npy", big_pc if which == "basis" else _npy_bytes((48, 2), data=b"\0" * 768))
    rss = _rss_bytes()
    with pytest.raises(ValueError, match=rf"{path}\[\w+\]: declares an array of shape"):
        if which == "mediapipe":
            fio.load_landmark_embedding("mp", path)
        else:
            fio.load_texture_space(path, n_tex=1)
    assert _rss_bytes() - rss < 64 << 20


def _patch_zip_field(data, signature, offset, fmt, value):
    """Overwrites a field at `offset` in every zip record starting with `signature`."""
    data = bytearray(data)
    start = 0
    while (i := data.find(signature, start)) >= 0:
        struct.pack_into(fmt, data, i + offset, value)
        start = i + 4
    return bytes(data)


@pytest.mark.parametrize(
    "field",
    ["method", "version", "size", "encrypted"],
)
def test_npz_with_damaged_zip_fields(tmp_path, field):
    """zipfile raises NotImplementedError / RuntimeError for these; the loader names the
    file instead of letting them through. 'size' states a huge uncompressed size for a
    stored member (what numpy would allocate before reading)."""
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(path, MU=np.zeros(48), PC=np.zeros((48, 2)))
    data = path.read_bytes()
    local, central = b"PK\x03\x04", b"PK\x01\x02"
    if field == "method":  # compression method 99 (AES) in both headers
        data = _patch_zip_field(data, local, 8, "<H", 99)
        data = _patch_zip_field(data, central, 10, "<H", 99)
    elif field == "version":  # "needs version 21.0 to extract"
        data = _patch_zip_field(data, central, 6, "<H", 210)
    elif field == "size":  # uncompressed size 4 GB - 1 in the central directory
        data = _patch_zip_field(data, central, 24, "<I", 0xFFFFFFF0)
    else:  # the "encrypted" flag bit
        data = _patch_zip_field(data, local, 6, "<H", 1)
        data = _patch_zip_field(data, central, 8, "<H", 1)
    path.write_bytes(data)
    with pytest.raises(ValueError, match=str(path)):
        fio.load_texture_space(path, n_tex=1)


def test_object_array_of_payloads_in_model(tmp_path):
    """An object array whose items are payloads: the items are pickled inline, and the
    first one stops the load at its global. Nothing runs."""
    marker = tmp_path / "pwned"
    array = np.empty(3, dtype=object)
    array[:] = [_touch(marker), _touch(marker), 1]
    path = _write_pickle(tmp_path / "generic_model.pkl", dict(_model_raw(), f=array))
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load.*system"):
        fio.load_flame_model(path)
    assert not marker.exists()


def test_harmless_object_array_is_a_type_error(tmp_path):
    array = np.array([[0, 1, 2]] * 10, dtype=object)
    path = _write_pickle(tmp_path / "generic_model.pkl", dict(_model_raw(), f=array))
    with pytest.raises(TypeError, match=f"{path}: f must be an integer array, got dtype object"):
        fio.load_flame_model(path)


def test_landmark_npy_that_is_an_object_array_of_payloads(tmp_path):
    """np.save of a 1-D object array: refused from the .npy header, never unpickled."""
    marker = tmp_path / "pwned"
    array = np.empty(2, dtype=object)
    array[:] = [_touch(marker), _touch(marker)]
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError, match=f"{path}: expected a pickled dict"):
        fio.load_landmark_embedding("68", path)
    assert not marker.exists()


def test_npz_object_member_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    array = np.empty(1, dtype=object)
    array[0] = _touch(marker)
    path = tmp_path / "mediapipe_landmark_embedding.npz"
    np.savez(path, lmk_face_idx=array, lmk_b_coords=np.zeros((1, 3)),
             landmark_indices=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=rf"{path}\[lmk_face_idx\]: is an object array"):
        fio.load_landmark_embedding("mp", path)
    assert not marker.exists()


class _HostileStorage:
    """Pickled as torch.storage._load_from_bytes(bytes): the bytes are a pickle that
    calls os.system, as a legacy torch.save stream would carry one."""

    def __init__(self, marker):
        self.data = pickle.dumps(_touch(marker), protocol=2)

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


def test_torch_storage_carrying_a_payload(tmp_path):
    """Storage bytes go through torch.load(weights_only=True), which refuses the global."""
    marker = tmp_path / "pwned"
    raw = dict.fromkeys(fio._LMK68_KEYS, np.zeros(3))
    raw["dynamic_lmk_faces_idx"] = _HostileStorage(marker)
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, raw, allow_pickle=True)
    with pytest.raises(ValueError, match=str(path)):
        fio.load_landmark_embedding("68", path)
    assert not marker.exists()


DANGEROUS_GLOBALS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "compile"), ("builtins", "getattr"), ("builtins", "setattr"),
    ("builtins", "__import__"), ("builtins", "open"), ("builtins", "globals"),
    ("__builtin__", "getattr"), ("importlib", "import_module"), ("runpy", "run_path"),
    ("pickle", "loads"), ("_pickle", "loads"), ("marshal", "loads"), ("shutil", "rmtree"),
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("functools", "partial"),
    ("sys", "exit"), ("ctypes", "CDLL"), ("numpy", "load"), ("numpy", "frompyfunc"),
    ("numpy.lib.npyio", "load"), ("numpy.core.multiarray", "array"),
    ("numpy._core.multiarray", "_reconstruct_bogus"), ("numpy.testing", "assert_"),
    ("scipy.sparse", "load_npz"), ("torch", "load"), ("torch.serialization", "load"),
    ("torch.jit", "load"), ("torch._utils", "_rebuild_parameter"), ("torch.nn", "Module"),
    ("torch", "from_file"), ("codecs", "encode"), ("_codecs", "decode"),
    ("collections", "namedtuple"), ("types", "FunctionType"), ("copyreg", "__newobj__"),
    ("webbrowser", "open"), ("pty", "spawn"), ("flame_ext.io", "_read_pickle_file"),
]


@pytest.mark.parametrize("module, name", DANGEROUS_GLOBALS,
                         ids=[f"{m}.{n}" for m, n in DANGEROUS_GLOBALS])
@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST"])
def test_dangerous_global_refused(tmp_path, module, name, opcode):
    """Each global, called with an argument, as a model value: refused by name when the
    unpickler resolves it (before it could be called), with every way of naming one."""
    arg = pickle.BINUNICODE + struct.pack("<I", 4) + b"true"
    if opcode == "GLOBAL":
        call = pickle.GLOBAL + f"{module}\n{name}\n".encode() + arg + pickle.TUPLE1 + pickle.REDUCE
    elif opcode == "STACK_GLOBAL":
        def string(s):
            return pickle.BINUNICODE + struct.pack("<I", len(s)) + s.encode()

        call = string(module) + string(name) + pickle.STACK_GLOBAL + arg + pickle.TUPLE1 + \
            pickle.REDUCE
    else:
        call = pickle.MARK + arg + pickle.INST + f"{module}\n{name}\n".encode()
    data = (pickle.PROTO + bytes([4]) + pickle.EMPTY_DICT + pickle.BINUNICODE +
            struct.pack("<I", 1) + b"f" + call + pickle.SETITEM + pickle.STOP)
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(data)
    with pytest.raises(fio.UnsafePickleError, match=f"{path}: refused to load.*{module}.{name}"):
        fio.load_flame_model(path)


@pytest.mark.parametrize(
    "data, match",
    [
        # numpy's _reconstruct asked to build a numpy.dtype instead of an ndarray
        (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R",
         "_reconstruct called with"),
        # bytes(10**12) would allocate a terabyte
        (b"c__builtin__\nbytes\n\x8a\x05\x00\x10\xa5\xd4\xe8\x85R", "only allowed without"),
        # _codecs.encode with a codec other than latin1
        (b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R", "latin1"),
        # numpy.dtype from something other than a string
        (b"cnumpy\ndtype\n}\x85R", "numpy.dtype from dict refused"),
    ],
    ids=["reconstruct-subtype", "bytes-size", "codec", "dtype-spec"],
)
def test_allowed_globals_refuse_bad_arguments(tmp_path, data, match):
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(b"\x80\x02" + data + b".")
    with pytest.raises(pickle.UnpicklingError, match=match):
        fio.load_flame_model(path)


@pytest.mark.parametrize("key", ["shapedirs", "v_template", "weights"])
def test_values_beyond_float32_refused(tmp_path, key):
    """1e39 is finite in float64 but inf in the float32 decoders: refused at load."""
    raw = _model_raw()
    raw[key] = raw[key].copy()
    raw[key].reshape(-1)[5] = -1e39
    path = _write_pickle(tmp_path / "generic_model.pkl", raw)
    with pytest.raises(ValueError, match=f"{path}: .*beyond the float32 range"):
        fio.load_flame_model(path)


def test_more_joints_than_the_kernels_hold(tmp_path):
    """A 17-joint model is consistent data and loads; the compiled ops refuse 17 joints
    with a clear error (the kernels hold at most 16) before any kernel runs."""
    path = _write_pickle(tmp_path / "generic_model.pkl", _model_raw(J=17))
    assert fio.load_flame_model(path).parents.shape == (17,)
    if _ops.available():
        from flame_ext._ops import skin

        pose = torch.zeros(2, 17, 3)
        with pytest.raises(ValueError, match="pose must have 1 to 16 joints"):
            skin.rigid_transforms(pose, pose, torch.tensor([-1] + list(range(16))))


# --------------------------------------------------------------------------------------
# FlameShape on models it cannot or can barely use


@pytest.mark.parametrize("backend", ["ext", "reference", "medusa"])
def test_flame_shape_refuses_a_model_without_five_joints(tmp_path, backend, quiet):
    path = _write_pickle(tmp_path / "generic_model.pkl", _model_raw(J=7))
    with pytest.raises(ValueError, match=rf"{path}.*7 joints"):
        FlameShape(4, 3, device="cpu", model_path=path, backend=backend)


@pytest.mark.parametrize("backend", ["ext", "reference", "medusa"])
def test_flame_shape_without_components(backend, quiet):
    """n_shape = n_expr = 0 is in range (SPEC 2): the mean shape, posed."""
    module = FlameShape(0, 0, device="cpu", model_path=SMALL, backend=backend).double()
    pose = 0.3 * torch.randn(2, 15, generator=torch.Generator().manual_seed(0), dtype=F64)
    v, _ = module(global_pose=pose[:, :3], neck_pose=pose[:, 3:6], jaw_pose=pose[:, 6:9],
                  eye_pose=pose[:, 9:])
    want, _ = reference.lbs(torch.zeros(1, 0, dtype=F64), pose, module.v_template,
                            module.shape_dirs, module.pose_dirs, module.J_regressor,
                            module.parents, module.lbs_weights)
    torch.testing.assert_close(v, want)
