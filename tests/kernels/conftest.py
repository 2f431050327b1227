"""Fixtures of the kernel tests: the CUDA kernels of csrc/ executed on the CPU.

The SIMT test library (tools/build_simt.py) holds every CUDA launcher of csrc/ compiled for
the CPU, registered as `torch.ops.flame_ext_simt.<op>`, and the planted defects. It is
built with AddressSanitizer, so it loads only into a process that preloads the ASan
runtime: `make test-kernels` (run by `make test`) does that and sets FLAME_EXT_SIMT_LIB.
A plain `pytest tests` skips the emulated cases. On a machine with a GPU the same tests
run the real CUDA kernels too (the `cuda` cases: `pytest tests/kernels -k cuda`).
"""

import pytest

import torch

from _simt import OnCuda, configure, load_simt, set_target


@pytest.fixture
def simt():
    """The emulated ops, in order, CUDA's limits; restored after the test."""
    set_target("simt")
    ops = load_simt()
    configure()
    yield ops
    configure()


@pytest.fixture(params=["simt", "cuda"])
def kernels(request):
    """The kernels of each family: emulated on the CPU, and the real ones on a GPU."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        import flame_ext._ops as ops

        if not ops.has_kernel("blend", "CUDA"):
            pytest.skip("flame_ext was built without its CUDA kernels")
        set_target("cuda")
        yield OnCuda()
        set_target("simt")
        return
    set_target("simt")
    ops = load_simt()
    configure()
    yield ops
    configure()


@pytest.fixture(autouse=True)
def _compiled_ops():
    import flame_ext._ops as ops

    if not ops.available():
        pytest.skip(f"compiled flame_ext ops not loaded: {ops.load_error()}")
