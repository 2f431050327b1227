"""Shared test fixtures: the device and dtype matrix, the compiled-op guard, numeric modes,
decoders built once per session, and the hypothesis profiles.

Devices: every test that takes the `device` fixture runs on the CPU and, marked `cuda`, on
the GPU; a test that only makes sense on a GPU carries `@pytest.mark.cuda`. Both skip
cleanly when no GPU is present (decided here, in one place).

Hypothesis: the default profile runs 25 examples per property (CI);
FLAME_EXT_HYPOTHESIS=thorough runs 500.

Helpers the test files import live beside this file: _samples.py (random inputs),
_oracle.py (comparisons with the float64 reference), _process.py (memory, hangs, threads).
"""

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

from _samples import SMALL

CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]

settings.register_profile(
    "flame_ext",
    max_examples=25,
    deadline=None,
    print_blob=True,
    # `device` is a function-scoped pytest fixture, but it only names a device.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("flame_ext"), max_examples=500)
settings.load_profile(os.environ.get("FLAME_EXT_HYPOTHESIS", "flame_ext"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not CUDA:
        pytest.skip("CUDA not available")


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


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-model notice
        yield


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True), with fresh memory filled with NaN (so an
    output element no kernel wrote shows up)."""
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def nondeterministic_mode():
    """Deterministic mode fills every fresh output with NaN (committing its pages), which
    the 2^31 tests do not need: they run with it off whatever the session's setting."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session")
def decoder_cache():
    """get(kind, backend, dtype, device, option, model_path=SMALL): a decoder built once
    per combination (construction loads the model, which most tests are not about).

    kind 'shape' (option: transforms; the small model's 6 + 4 components, the full one's
    300 + 100), 'landmark' (option: (lm_type, lm_dim, contour_rule)) or 'tex' (option:
    n_tex). Callers must not change the modules.
    """
    from flame_ext import FlameLandmark, FlameShape, FlameTex

    cache = {}

    def get(kind, backend, dtype, device, option, model_path=SMALL):
        key = (kind, backend, dtype, str(device), option, model_path)
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the synthetic-model notice
                if kind == "shape":
                    counts = (6, 4) if model_path == SMALL else (300, 100)
                    module = FlameShape(*counts, device=device, model_path=model_path,
                                        backend=backend, transforms=option)
                elif kind == "landmark":
                    lm_type, lm_dim, rule = option
                    module = FlameLandmark(lm_type, lm_dim, device=device, model_path=model_path,
                                           backend=backend, contour_rule=rule)
                else:
                    module = FlameTex(model_path, n_tex=option, backend=backend).to(device)
            cache[key] = module.to(dtype)
        return cache[key]

    return get
