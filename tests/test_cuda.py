"""CUDA behaviour of the decoders: agreement with the CPU, CUDA-graph capture and replay,
non-default streams, a second device. Skipped cleanly without a GPU; the op-level CUDA
tests live beside each op family's tests (tests/test_ops_*.py, `device` fixture).
"""

import pytest
import torch

from flame_ext import FlameLandmark, FlameShape, FlameTex
from flame_ext.decoders import INPUT_NAMES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

MODEL = "synthetic"  # full size: the kernels' real launch shapes


def _inputs(module, batch, device, seed=0, shared=False):
    gen = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(batch, getattr(module, n).shape[1], generator=gen) * 0.3
           for n in INPUT_NAMES}
    if shared:
        out["shape"] = out["shape"][:1]
    return {k: v.to(device) for k, v in out.items()}


@pytest.fixture(scope="module")
def shape_pair():
    cpu = FlameShape(device="cpu", model_path=MODEL, backend="reference").double()
    cuda = FlameShape(device="cuda", model_path=MODEL, backend="ext").double()
    return cpu, cuda


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 300])
def test_cuda_matches_cpu_reference_float64(shape_pair, batch, shared):
    cpu, cuda = shape_pair
    inputs = _inputs(cpu, batch, "cpu", seed=batch, shared=shared)
    v0, R0 = cpu(**inputs)
    v, R = cuda(**{k: t.cuda() for k, t in inputs.items()})
    torch.testing.assert_close(v.cpu(), v0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(R.cpu(), R0, rtol=1e-9, atol=1e-12)


def test_cuda_gradients_match_cpu(shape_pair):
    cpu, cuda = shape_pair
    inputs = _inputs(cpu, 5, "cpu", seed=3)
    grads = []
    for module, device in ((cpu, "cpu"), (cuda, "cuda")):
        leaves = {k: t.to(device).requires_grad_(True) for k, t in inputs.items()}
        v, R = module(**leaves)
        (v.square().sum() + R.sum()).backward()
        grads.append({k: t.grad.cpu() for k, t in leaves.items()})
    for name in inputs:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-8, atol=1e-10)


def test_decoders_capture_in_a_cuda_graph():
    shape = FlameShape(device="cuda", model_path=MODEL, backend="ext")
    lmk = FlameLandmark("68", device="cuda", model_path=MODEL, backend="ext")
    static = _inputs(shape, 16, "cuda", seed=1)
    for _ in range(2):  # warm up on a side stream, as capture requires
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            v, R = shape(**static)
            out = lmk(v, torch.cat([static[n] for n in INPUT_NAMES[2:]], 1))
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v, R = shape(**static)
        out = lmk(v, torch.cat([static[n] for n in INPUT_NAMES[2:]], 1))
    fresh = _inputs(shape, 16, "cuda", seed=2)
    for k in static:
        static[k].copy_(fresh[k])
    graph.replay()
    v_eager, R_eager = shape(**fresh)
    torch.testing.assert_close(v, v_eager)
    torch.testing.assert_close(R, R_eager)
    torch.testing.assert_close(out, lmk(v_eager, torch.cat([fresh[n] for n in INPUT_NAMES[2:]], 1)))


def test_backward_captures_in_a_cuda_graph():
    shape = FlameShape(device="cuda", model_path=MODEL, backend="ext", transforms="none")
    static = {k: t.requires_grad_(True) for k, t in _inputs(shape, 8, "cuda").items()}

    def step():
        for t in static.values():
            t.grad = None
        v, _ = shape(**static)
        v.square().sum().backward()

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v, _ = shape(**static)
        v.square().sum().backward()
    graph.replay()
    captured = {k: t.grad.clone() for k, t in static.items()}
    step()
    for k, t in static.items():
        torch.testing.assert_close(captured[k], t.grad)


def test_non_default_stream():
    shape = FlameShape(device="cuda", model_path=MODEL, backend="ext")
    tex = FlameTex(model_path=MODEL, n_tex=50, backend="ext").cuda()
    inputs = _inputs(shape, 32, "cuda", seed=4)
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device():
    cpu = FlameShape(device="cpu", model_path=MODEL, backend="reference")
    other = FlameShape(device="cuda:1", model_path=MODEL, backend="ext")
    inputs = _inputs(cpu, 4, "cpu", seed=5)
    v0, _ = cpu(**inputs)
    v, _ = other(**{k: t.to("cuda:1") for k, t in inputs.items()})
    assert v.device == torch.device("cuda:1")
    torch.testing.assert_close(v.cpu(), v0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lm_type", ["68", "mp"])
def test_landmarks_cuda_match_cpu(lm_type):
    gen = torch.Generator().manual_seed(6)
    cpu = FlameLandmark(lm_type, device="cpu", model_path=MODEL, backend="reference").double()
    cuda = FlameLandmark(lm_type, device="cuda", model_path=MODEL, backend="ext").double()
    v = torch.randn(9, 5023, 3, generator=gen, dtype=torch.float64) * 0.1
    poses = torch.randn(9, 15, generator=gen, dtype=torch.float64) * 0.5
    torch.testing.assert_close(cuda(v.cuda(), poses.cuda()).cpu(), cpu(v, poses))


def test_texture_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    cpu = FlameTex(model_path=MODEL, n_tex=50, backend="reference").double()
    cuda = FlameTex(model_path=MODEL, n_tex=50, backend="ext").double().cuda()
    code = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cuda(code.cuda()).cpu(), cpu(code))
