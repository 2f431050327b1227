"""Shared test fixtures: the device and dtype matrix, and the compiled-op guard.

CUDA cases are parametrised everywhere and skip cleanly when no GPU is present.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA not available")
    ),
]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture(scope="session")
def ops():
    """torch.ops.flame_ext, failing (not skipping) when the library did not load.

    A missing extension must fail the op tests: a skip would let a broken build pass.
    """
    from flame_ext import _ops

    assert _ops.available(), f"compiled ops did not load: {_ops.load_error()}"
    return torch.ops.flame_ext
