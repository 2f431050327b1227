"""The reuse cache of large CPU output blocks (csrc/cpu_output.h): a freed output of 4 MiB
or more keeps its huge-page block for the next output of about its size, up to a limit.

Outputs here come from the blend op with a tiny basis (K = 2): base (N,) + coeffs @ dirs.T
with B x N floats chosen to give whole numbers of 2 MiB pages. The limit is read once per
process, so the limit cases run in subprocesses.
"""

import gc
import os
import signal
import subprocess
import sys

import pytest
import torch

import flame_ext
from _process import in_threads

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the huge-page allocator is Linux only"
)

MIB = 1 << 20
PAGE = 2 * MIB
N = 1 << 18  # floats per sample: 1 MiB


def _ops():
    from flame_ext import _ops

    if not _ops.available():
        pytest.skip(f"compiled ops not loaded: {_ops.load_error()}")
    return torch.ops.flame_ext


def _inputs(mib, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=gen)
    dirs = torch.randn(N, 2, generator=gen)
    coeffs = torch.randn(mib, 2, generator=gen)
    return base, dirs, coeffs, torch.empty(0, N), torch.empty(mib, 0)


def _output(mib, seed=0):
    """A (mib, N) float32 output of `mib` MiB from the blend op."""
    return _ops().blend(*_inputs(mib, seed))


def _expected(mib, seed=0):
    base, dirs, coeffs, _, _ = _inputs(mib, seed)
    return (base.double() + coeffs.double() @ dirs.double().T).float()


def _address(t):
    return t.untyped_storage().data_ptr()


@pytest.fixture
def cache():
    """The counters, after freeing whatever earlier tests left (outputs still waiting for
    the garbage collector, kept blocks); skips where the limit set for this process keeps
    less than the tests' blocks."""
    _ops()
    gc.collect()
    flame_ext.empty_cpu_output_cache()
    if flame_ext.cpu_output_cache_info()["limit_bytes"] < 128 * MIB:
        pytest.skip("FLAME_EXT_CPU_OUTPUT_CACHE_MB keeps under 128 MiB in this process")
    yield flame_ext.cpu_output_cache_info
    flame_ext.empty_cpu_output_cache()


def test_freed_block_is_reused_and_rewritten(cache):
    first = _output(36)
    address, before = _address(first), cache()
    del first
    after_free = cache()
    assert after_free["cached_blocks"] == before["cached_blocks"] + 1
    assert after_free["cached_bytes"] == before["cached_bytes"] + 36 * MIB
    second = _output(36, seed=1)
    assert _address(second) == address
    assert cache()["reused"] == before["reused"] + 1
    assert cache()["cached_bytes"] == before["cached_bytes"]
    # Every value is the new call's, none left from the block's previous tensor.
    torch.testing.assert_close(second, _expected(36, seed=1), rtol=1e-6, atol=1e-6)


def test_block_size_rule(cache):
    """A kept block serves a request it covers with at most a quarter to spare."""
    kept = _output(36)
    address = _address(kept)
    del kept
    for too_large in (38, 64):  # the kept 36 MiB cannot hold them
        other = _output(too_large)
        assert _address(other) != address
        del other
        flame_ext.empty_cpu_output_cache()
        kept = _output(36)
        address = _address(kept)
        del kept
    wasteful = _output(34)  # 36 <= 34 * 5/4: reused
    assert _address(wasteful) == address
    del wasteful
    flame_ext.empty_cpu_output_cache()
    big = _output(64)
    address = _address(big)
    del big
    small = _output(40)  # 64 > 40 * 5/4: a new block, the 64 MiB one stays kept
    assert _address(small) != address
    assert cache()["cached_bytes"] == 64 * MIB


def test_below_the_threshold_nothing_is_kept(cache):
    before = cache()
    small = _output(3)  # under 4 MiB: at::empty, not the huge-page allocator
    del small
    assert cache() == before


def test_empty_frees_kept_blocks_only(cache):
    kept, alive = _output(36), _output(40, seed=1)
    del kept
    assert flame_ext.empty_cpu_output_cache() == 36 * MIB
    info = cache()
    assert (info["cached_bytes"], info["cached_blocks"]) == (0, 0)
    torch.testing.assert_close(alive, _expected(40, seed=1), rtol=1e-6, atol=1e-6)
    del alive  # freed after the emptying: back to the cache
    assert cache()["cached_bytes"] == 40 * MIB


def test_outputs_made_and_freed_in_threads(cache):
    def work(i):
        for round_ in range(4):
            out = _output(34 + 2 * (i % 2), seed=10 * i + round_)
            torch.testing.assert_close(
                out, _expected(34 + 2 * (i % 2), seed=10 * i + round_), rtol=1e-6, atol=1e-6
            )
            del out
        return True

    before = cache()["reused"]
    assert all(in_threads(work, 4))
    info = cache()
    assert info["cached_bytes"] <= info["limit_bytes"]
    assert info["cached_bytes"] % PAGE == 0 and info["cached_blocks"] >= 1
    assert info["reused"] > before


def test_lazy_clone_of_an_output(cache):
    """Storages of this allocator keep data and context equal, so copy-on-write clones
    (torch._lazy_clone) work on them as on any CPU tensor."""
    if not hasattr(torch, "_lazy_clone"):
        pytest.skip("this torch has no _lazy_clone")
    out = _output(36)
    clone = torch._lazy_clone(out)
    clone.add_(1)  # the write materialises the clone; out keeps its values
    torch.testing.assert_close(out, _expected(36), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clone, _expected(36) + 1, rtol=1e-6, atol=1e-5)


def test_outputs_in_a_forked_child(cache):
    """A child forked while blocks are kept and in use makes, frees and reuses its own
    (the lock and the lists start anew there); the parent's blocks stay the parent's."""
    kept, alive = _output(36), _output(38, seed=1)
    del kept
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            # A hang ends the child (SIGALRM) instead of the test run. One thread: a child
            # cannot use the parent's OpenMP pool (torch's DataLoader workers do the same).
            signal.alarm(120)
            torch.set_num_threads(1)
            inherited = alive.clone()
            del alive  # a block of the parent's lists: freed as ordinary memory
            first = _output(36, seed=2)
            address = _address(first)
            del first
            again = _output(36, seed=3)
            ok = (_address(again) == address
                  and torch.allclose(again, _expected(36, seed=3), rtol=1e-6, atol=1e-6)
                  and torch.allclose(inherited, _expected(38, seed=1), rtol=1e-6, atol=1e-6))
            status = 0 if ok else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    torch.testing.assert_close(alive, _expected(38, seed=1), rtol=1e-6, atol=1e-6)
    assert cache()["cached_bytes"] == 36 * MIB


_LIMIT_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import flame_ext
from test_cpu_output_cache import MIB, _expected, _output
limit = int(sys.argv[2]) * MIB
info = flame_ext.cpu_output_cache_info()
assert info["limit_bytes"] == limit, info
a, b, c = _output(36), _output(38), _output(40)
del a
del b
del c
# Freed in the order 36, 38, 40 MiB: the most recent ones that fit in the limit stay.
kept, total = [], 0
for mib in (40, 38, 36):
    if total + mib * MIB > limit:
        break
    kept.append(mib)
    total += mib * MIB
info = flame_ext.cpu_output_cache_info()
assert info["cached_bytes"] == total and info["cached_blocks"] == len(kept), (info, kept)
before = info["reused"]
again = [_output(mib, seed=5) for mib in (40, 38, 36)]
assert flame_ext.cpu_output_cache_info()["reused"] == before + len(kept)
for mib, out in zip((40, 38, 36), again):
    torch.testing.assert_close(out, _expected(mib, seed=5), rtol=1e-6, atol=1e-6)
del again
flame_ext.empty_cpu_output_cache()
# A block over the limit is freed with its tensor.
big = _output(max(34, limit // MIB + 2))
del big
assert flame_ext.cpu_output_cache_info()["cached_bytes"] == 0
print("ok")
"""


@pytest.mark.parametrize(
    "setting, limit_mib",
    [("0", 0), ("80", 80), ("200", 200), (None, 1024), ("lots", 1024), ("-5", 1024)],
)
def test_limit_from_the_environment(setting, limit_mib):
    _ops()
    env = dict(os.environ)
    env.pop("FLAME_EXT_CPU_OUTPUT_CACHE_MB", None)
    if setting is not None:
        env["FLAME_EXT_CPU_OUTPUT_CACHE_MB"] = setting
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", _LIMIT_SCRIPT, here, str(limit_mib)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
