"""Fixtures of the kernel tests: the CUDA kernels of csrc/ executed on the CPU.

The SIMT test library (tools/build_simt.py) holds every CUDA launcher of csrc/ compiled for
the CPU, registered as `torch.ops.flame_ext_simt.<op>`, and the planted defects. It is
built with AddressSanitizer, so it loads only into a process that preloads the ASan
runtime: `make test-kernels` (run by `make test`) does that and sets FLAME_EXT_SIMT_LIB.
A plain `pytest tests` skips this folder.
"""

import pytest

from _simt import SCHEDULES, configure, load_simt


@pytest.fixture
def simt():
    """The emulated ops, in order, CUDA's limits; restored after the test."""
    ops = load_simt()
    configure()
    yield ops
    configure()


@pytest.fixture(params=SCHEDULES)
def schedule(request, simt):
    """Each test under each schedule of the threads of a block."""
    configure(request.param)
    yield request.param


@pytest.fixture(autouse=True)
def _compiled_ops():
    import flame_ext._ops as ops

    if not ops.available():
        pytest.skip(f"compiled flame_ext ops not loaded: {ops.load_error()}")
